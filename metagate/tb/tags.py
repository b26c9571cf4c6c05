"""What every logged tag means: the description TensorBoard shows on hover, teacher names included.

One table of ``(pattern, text)``; ``{k}`` in a pattern is a teacher index and ``{teacher}`` in the text
becomes ``teacher{k} (its name, and whether it is the planted adversarial teacher)``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

#: prefix of the planted adversarial teacher's name (metagate.teachers.training names it ``adv-<first teacher>``)
PLANTED_PREFIX = "adv-"

_SPLIT = {"test": "the test split", "select": "the clean select split (model selection; a few dozen units on "
          "digits)", "meta": "the clean meta split"}

_METRICS = {
    "acc": "accuracy of the student's top class",
    "nll": "mean negative log-likelihood of the label (lower is better)",
    "ece": "expected calibration error over 15 equal-width confidence bins (lower is better)",
    "mce": "maximum calibration error: the largest |confidence - accuracy| over the non-empty bins, however "
           "few units a bin holds (see mce_min*)",
    "brier": "Brier score, sum over classes of (p - onehot)^2, averaged over units",
}

_TABLE: list[tuple[str, str]] = [
    (r"(test|select)/mce_min(\d+)", "maximum calibration error over the bins holding at least {1} units (bins with "
     "fewer are too noisy to judge; the raw maximum is {0}/mce)"),
    *[(rf"(test|select)/{m}", text + ", on {split}") for m, text in _METRICS.items()],
    (r"train/loss", "mean weighted training loss of the epoch (sum over columns of mean loss x mean weight)"),
    (r"train/loss_label", "mean cross-entropy of the (noisy) training label over the epoch's units"),
    (r"train/loss_teacher{k}", "mean tau^2-scaled KL from {teacher} to the student over the epoch's units"),
    (r"gate/mean_w_label", "mean weight of the label CE column over all training units (1 for ce)"),
    (r"gate/mean_w_teacher{k}", "mean absolute weight of the KL column of {teacher} over all training units"),
    (r"gate/teacher_share", "mean share of each unit's total weight that goes to the teachers, sum_k w_k / sum_j w_j "
     "(0 for ce)"),
    (r"diag/auroc_teacher_share", "AUROC of the per-unit teacher share for 'this label is corrupted' (1: every "
     "corrupted unit gets more teacher weight than every clean one; 0.5: no relation, e.g. a constant share)"),
    (r"diag/w_label_(corrupted|clean)", "mean label weight on the training units whose label is {0} (a gate "
     "that spots noise puts less on corrupted units)"),
    (r"diag/teacher_share_(corrupted|clean)", "mean teacher share of the training units whose label is {0}"),
    (r"diag/kd_on_right_teachers", "share of all KD weight that goes to a teacher whose top class is its unit's "
     "clean label"),
    (r"diag/kd_on_right_teachers_equal", "the same as kd_on_right_teachers if each unit's KD weight were split "
     "equally among teachers (the fixed gate's value; moves with which units get KD weight)"),
    (r"diag/teacher_choice_gain", "kd_on_right_teachers minus kd_on_right_teachers_equal: what choosing between "
     "teachers gained (0 for equal splits, > 0 when the gate favours the teacher right on each unit)"),
    (r"diag/tau_mean", "mean over the training units of the KD temperature each was last given (temperature "
     "gates)"),
    (r"diag/tau_(corrupted|clean)", "mean last KD temperature of the training units whose label is {0}"),
    (r"diag/kd_share_teacher{k}_(right|wrong)", "mean share of its unit's KD weight that {teacher} gets on the "
     "units where it is {0} (equal weights: 1/K on both)"),
    (r"gate/share_(frequent|rare|code|prose)_t{k}", "mean share of its token's KD weight that {teacher} gets on the "
     "{0} training tokens (lm task, metagate.data.lm_classes; equal weights: 1/K)"),
    (r"gate/w_label_(frequent|rare|code|prose)", "mean label weight on the {0} training tokens (lm task)"),
    (r"diag/right_(frequent|rare|code|prose)_t{k}", "fraction of the {0} training tokens where the top-1 of "
     "{teacher} is the clean token (from the bank: the same whatever the gate does)"),
    (r"meta/loss", "meta gate: mean validation loss after the one-step look-ahead, over the epoch's meta updates"),
    (r"meta/hypergrad_norm", "meta gate: mean norm of the hypergradient on the gate parameters"),
    (r"meta/updates", "meta gate: number of meta updates so far"),
    (r"policy/reward", "policy gate: the last episode's reward, 100 x the drop of the validation loss"),
    (r"policy/advantage", "policy gate: the last reward minus the running baseline"),
    (r"policy/baseline", "policy gate: running mean of the rewards (the REINFORCE baseline)"),
    (r"policy/advantage_spread", "temperature gate, --temp-reward redistributed: standard deviation of the "
     "per-unit advantages of the last episode (0 would mean the episode reward spread equally)"),
    (r"policy/rrd_r2", "temperature gate, --temp-reward redistributed: R^2 of the return-decomposition model on "
     "the episodes it was fitted on"),
    (r"policy/(unit|shared)_log_std", "policy gate: log standard deviation of the {0} exploration noise"),
    (r"temperature/(.+)", "learned KD temperature ({0})"),
    (r"teachers/tau_teacher{k}", "temperature tau_k of {teacher} fitted by NLL on the clean meta split (temperature "
     "scaling, Guo et al. 2017; < 1 sharpens an under-confident teacher); the calibrated teacher is softmax(t/tau_k)"),
    (r"teachers/ensemble_tau", "temperature r fitted on the meta split for the calibrated teachers used together as "
     "one gauge, mean_k softmax(t_k/(tau_k r))"),
    (r"teachers/meta_(nll|ece)_tau([0-9.]+)_teacher{k}", "{0} of {teacher} on the clean meta split at temperature {1}"),
    (r"teachers/meta_(nll|ece)_teacher{k}", "{0} of {teacher} on the clean meta split at its fitted temperature"),
    (r"teachers/meta_(nll|ece)_tau([0-9.]+)_ensemble", "{0} of the teachers' mean probability on the clean meta "
     "split, every teacher at temperature {1}"),
    (r"teachers/meta_(nll|ece)_ensemble", "{0} of the calibrated teachers' ensemble on the clean meta split at its "
     "fitted temperature r"),
]


def teacher_label(k: int, names: Sequence[str]) -> str:
    """``teacher2 (adv-cnn16, the planted adversarial teacher)``; ``teacher2`` when names are unknown."""
    if k >= len(names):
        return f"teacher{k}"
    name = names[k]
    return f"teacher{k} ({name}, the planted adversarial teacher)" if is_planted(name) else f"teacher{k} ({name})"


def is_planted(name: str) -> bool:
    """Whether ``name`` is the planted adversarial teacher's (``--adversarial-teacher``)."""
    return name.startswith(PLANTED_PREFIX)


_COMPILED = [(re.compile("^" + p.replace("{k}", r"(?P<k>\d+)") + "$"), text) for p, text in _TABLE]


def describe(tag: str, teachers: Sequence[str] = ()) -> str | None:
    """The description of ``tag`` (markdown, shown on hover), or None if the tag is not in the table."""
    for rx, text in _COMPILED:
        m = rx.match(tag)
        if m is None:
            continue
        groups = [g for name, g in zip(_group_names(rx), m.groups()) if name != "k"]
        split = _SPLIT.get(tag.split("/", 1)[0], "")
        k = m.groupdict().get("k")
        teacher = teacher_label(int(k), teachers) if k is not None else ""
        return text.format(*groups, split=split, teacher=teacher)
    return None


def _group_names(rx: re.Pattern[str]) -> list[str]:
    names = {i: n for n, i in rx.groupindex.items()}
    return [names.get(i, "") for i in range(1, rx.groups + 1)]


#: tags that repeat another tag's quantity: not written (one tag per quantity), the tag they repeat is
DUPLICATES: dict[str, str] = {
    r"train/weight_(label|teacher\d+)": "gate/mean_w_{0}",  # every unit is visited once per epoch: same mean
}
_DUPLICATES = [re.compile(f"^{p}$") for p in DUPLICATES]


def is_duplicate(tag: str) -> bool:
    """Whether ``tag`` only repeats a quantity another tag already holds (see :data:`DUPLICATES`)."""
    return any(rx.match(tag) for rx in _DUPLICATES)
