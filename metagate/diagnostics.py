"""What a gate learned, judged against the task's ground truth (corrupted labels, planted teachers)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from metagate.metrics import auroc
from metagate.tb.tags import is_planted


def teacher_share(unit_weights: Tensor) -> Tensor:
    """``[N]`` share of each unit's total weight that goes to the teachers."""
    return unit_weights[:, 1:].sum(1) / unit_weights.sum(1).clamp_min(1e-12)


def kd_shares(unit_weights: Tensor) -> Tensor:
    """``[N, K]`` each teacher's share of its unit's KD weight, ``w_k / sum_j w_j`` (0 where a unit has none)."""
    kd = unit_weights[:, 1:]
    return kd / kd.sum(1, keepdim=True).clamp_min(1e-12)


def teacher_right(teacher_logits: Tensor, clean_labels: Tensor) -> Tensor:
    """``[N, K]`` bool: teacher ``k``'s top class is unit ``i``'s clean label (the ground truth a gate never sees)."""
    return teacher_logits.argmax(-1) == clean_labels.to(teacher_logits.device).view(-1, 1)


def teacher_trust(unit_weights: Tensor, right: Tensor) -> dict[str, float]:
    """How a gate's KD weight follows the teachers' per-unit correctness.

    * ``diag/kd_on_right_teachers``: share of all KD weight that goes to a teacher right on its unit,
      ``sum_ik w_ik r_ik / sum_ik w_ik``;
    * ``diag/kd_on_right_teachers_equal``: the same if each unit's KD weight were split equally (the
      ``fixed`` gate's value; it moves with *which units* get KD weight);
    * ``diag/teacher_choice_gain``: the first minus the second -- what choosing *between* teachers gained
      (0 for any gate that splits KD equally, > 0 when a gate favours the teachers right on each unit);
    * ``diag/kd_share_teacher{k}_right`` / ``_wrong``: teacher ``k``'s mean share of its unit's KD weight on
      the units where it is right / wrong (equal weights: ``1/K`` on both).

    :param unit_weights: ``[N, 1+K]``
    :param right: ``[N, K]`` bool, from :func:`teacher_right`
    """
    w = unit_weights.detach().float()
    kd = w[:, 1:]
    r = right.to(kd.device, kd.dtype)
    total = kd.sum(1)
    out: dict[str, float] = {}
    denom = float(total.sum())
    if denom > 0:
        out["diag/kd_on_right_teachers"] = float((kd * r).sum()) / denom
        out["diag/kd_on_right_teachers_equal"] = float((total * r.mean(1)).sum()) / denom
        out["diag/teacher_choice_gain"] = out["diag/kd_on_right_teachers"] - out["diag/kd_on_right_teachers_equal"]
    share = kd_shares(w)
    has_kd = total > 0
    for k in range(kd.shape[1]):
        for name, sel in (("right", right[:, k]), ("wrong", ~right[:, k])):
            sel = sel.to(kd.device) & has_kd
            if sel.any():
                out[f"diag/kd_share_teacher{k}_{name}"] = float(share[sel, k].mean())
    return out


def class_shares(unit_weights: Tensor, classes: dict[str, Tensor], right: Tensor | None = None) -> dict[str, float]:
    """Each teacher's share of the KD weight, and the label weight, by class of unit (the lm task's token classes,
    :func:`metagate.data.lm_classes.class_masks`).

    * ``gate/share_{class}_t{k}``: mean over the class's units that get KD weight of ``w_k / sum_j w_j``;
    * ``gate/w_label_{class}``: mean label weight ``w_0`` over the class's units;
    * with ``right``: ``diag/right_{class}_t{k}``, the fraction of the class's units where teacher ``k``'s top-1
      is the clean label (the bank's, whatever the gate did: do the shares follow who is right?).

    :param unit_weights: ``[N, 1+K]``
    :param classes: ``name -> [N]`` bool masks over the same units
    :param right: ``[N, K]`` bool, from :func:`teacher_right`
    """
    w = unit_weights.detach().float()
    share = kd_shares(w)
    has_kd = w[:, 1:].sum(1) > 0
    right_f = None if right is None else right.to(w.device).float()
    out: dict[str, float] = {}
    for name, mask in classes.items():
        sel = mask.to(w.device).bool()
        if not sel.any():
            continue
        out[f"gate/w_label_{name}"] = float(w[sel, 0].mean())
        kd = sel & has_kd
        if kd.any():
            out.update({f"gate/share_{name}_t{k}": float(v) for k, v in enumerate(share[kd].mean(0))})
        if right_f is not None:
            out.update({f"diag/right_{name}_t{k}": float(v) for k, v in enumerate(right_f[sel].mean(0))})
    return out


def teacher_trust_figure(unit_weights: Tensor, right: Tensor, names: list[str] | None = None,
                         title: str = "") -> Any:
    """Bar chart of each teacher's mean *absolute* KD weight ``w_k`` on the units where it is right vs wrong.

    Absolute, not shares among teachers: a gate that gives the teachers almost nothing shows short bars (shares
    would sit near ``1/K`` whatever the gate does). A tick per bar marks what an equal split of the same units'
    KD weight would give; each bar is labelled with its number of units. The y axis fits the data.

    :param unit_weights: ``[N, 1+K]``
    :param right: ``[N, K]`` bool, from :func:`teacher_right`
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = unit_weights.detach().float().cpu()
    kd, r = w[:, 1:], right.cpu().bool()
    k = kd.shape[1]
    labels = [f"{j}: {n}" + (" (planted)" if is_planted(n) else "") for j, n in enumerate(names)] \
        if names is not None and len(names) == k else [f"teacher{j}" for j in range(k)]
    equal = kd.sum(1) / max(k, 1)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * k, 3.6))
    top = 0.0
    for off, kind, color in ((-0.2, "right", "tab:green"), (0.2, "wrong", "tab:red")):
        for j in range(k):
            sel = r[:, j] if kind == "right" else ~r[:, j]
            n = int(sel.sum())
            if n == 0:
                continue
            v, ref = float(kd[sel, j].mean()), float(equal[sel].mean())
            ax.bar(j + off, v, width=0.4, color=color, label=f"where it is {kind}")
            ax.plot([j + off - 0.2, j + off + 0.2], [ref, ref], color="black", lw=1.5,
                    label="equal split of the same units' KD weight")
            ax.text(j + off, max(v, ref), f"n={n}", ha="center", va="bottom", fontsize=6)
            top = max(top, v, ref)
    handles = dict(zip(*reversed(ax.get_legend_handles_labels())))  # one entry per label
    ax.set_xticks(range(k), labels, rotation=15, fontsize=7)
    ax.set_ylabel("mean KD weight w_k on those units")
    ax.set_ylim(0, top * 1.3 if top > 0 else 1)
    total = float(kd.sum(1).mean()) if k else 0.0
    on_right = float((kd * r).sum() / kd.sum().clamp_min(1e-12)) if k else 0.0
    ax.set_title(f"{title}  mean KD weight per unit {total:.3f}, {on_right:.1%} of it on right teachers".strip(),
                 fontsize=8)
    ax.legend(list(handles.values()), list(handles.keys()), fontsize=6, loc="upper center",
              bbox_to_anchor=(0.5, -0.22), ncol=3, frameon=False)
    fig.tight_layout()
    return fig


def gate_diagnostics(unit_weights: Tensor, corrupted: Tensor | None,
                     right: Tensor | None = None, classes: dict[str, Tensor] | None = None) -> dict[str, float]:
    """Summaries of ``W [N, 1+K]`` (the weights last used for each training unit).

    * ``gate/teacher_share``: mean of ``sum_k w_k / sum_j w_j``;
    * ``gate/mean_w{j}``: mean weight of each column (a planted bad teacher shows up here);
    * with label noise: ``diag/auroc_teacher_share`` -- AUROC of the teacher share for predicting
      "this label was corrupted" (1 = the gate hands every corrupted unit to the teachers) --
      and the mean label weight / teacher share on corrupted vs clean units;
    * with ``right`` (``[N, K]``, each teacher's per-unit correctness): :func:`teacher_trust`;
    * with ``classes`` (``name -> [N]`` bool, e.g. the lm task's token classes): :func:`class_shares`.
    """
    w = unit_weights.detach().float()
    out: dict[str, float] = {}
    means = w.mean(0).tolist()
    out["gate/mean_w_label"] = means[0]
    for j, m in enumerate(means[1:]):
        out[f"gate/mean_w_teacher{j}"] = m
    share = teacher_share(w)  # 0 for ce: its summaries are the fill-ins that keep it in every comparison
    out["gate/teacher_share"] = float(share.mean())
    if corrupted is not None and corrupted.any() and (~corrupted).any():
        c = corrupted.bool()
        out["diag/auroc_teacher_share"] = auroc(share, c)
        out["diag/w_label_corrupted"] = float(w[c, 0].mean())
        out["diag/w_label_clean"] = float(w[~c, 0].mean())
        out["diag/teacher_share_corrupted"] = float(share[c].mean())
        out["diag/teacher_share_clean"] = float(share[~c].mean())
    if right is not None:
        out.update(teacher_trust(w, right))
    if classes:
        out.update(class_shares(w, classes, right))
    return out
