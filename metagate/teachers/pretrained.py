"""A task's pretrained teachers' ``select`` and ``test`` accuracy, measured once and cached beside the bank.

A teacher trained by the project keeps the accuracy of its best epoch on ``select`` and its ``test`` accuracy in
its checkpoint (:mod:`metagate.teachers.training`). A task's pretrained teachers (``info["pretrained_teachers"]``:
the lm task's SmolLM2 with ``--lm-teacher smollm2``) are measured here the same way -- the accuracy the shared
loop's ``evaluate`` gives a model (:func:`~metagate.seq_metrics.language_metrics`' ``acc``: the argmax token
against the target over the split's real tokens, teacher forcing; per example on a task with one unit per
example) -- a batch at a time, never a ``[tokens, V]`` table. So ``best-teacher`` can choose one and the
compare's teacher table shows it.

SmolLM2 costs about 5 ms a token and every compare cell loads the teachers, so the two numbers are kept in a
small JSON file beside the bank, with the policy of :mod:`metagate.teachers.calibration_cache` (its
:func:`~metagate.teachers.calibration_cache.cached_json`)::

    pretrained-<name>+<name>....json            (every teacher of the bank in the name, as the fit's file)
    pretrained-<name>+<name>...-top<k>.json     the sparse top-k bank (lm)

    {"format": "metagate-pretrained-teacher-stats", "version": STATS_VERSION, "fingerprint": ...,
     "stats": {"<pretrained name>": {"select_acc": ..., "test_acc": ...}}, "checksum": ...}

keyed by the teachers' identity (the sparse bank's fingerprint, which hashes every teacher's weights; else each
pretrained teacher's weights), the bank's names and the ``select`` and ``test`` splits' inputs and targets.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metagate.data.task import Split, Task
from metagate.io import state_fingerprint
from metagate.teachers.bank import TeacherBank
from metagate.teachers.cache import cache_file
from metagate.teachers.calibration_cache import JsonCache, bank_file, bank_identity, cached_json, content_fingerprint
from metagate.units import PAD_ID

#: how the accuracies are measured: bump the leading number when that changes
STATS_VERSION = "1; argmax (first on a tie) == target over real units, teacher forcing"
#: the stats file's kind
STATS = JsonCache(format="metagate-pretrained-teacher-stats", version=STATS_VERSION, fields=("stats",),
                  what="pretrained teacher stats cache",
                  covers="teachers (names and weights) and select and test splits", noun="pretrained teacher stats",
                  redo="remeasure", made="measured")
#: the stats a pretrained teacher gets here
KEYS = ("select_acc", "test_acc")


def stats_file(names: Sequence[str], topk: int | None = None) -> str:
    """The cache file name of the pretrained teachers' stats in the bank of teachers ``names``."""
    return bank_file("pretrained", names, topk)


@torch.no_grad()
def split_accuracy(model: nn.Module, split: Split, device: torch.device | str = "cpu",
                   batch_size: int | None = None) -> float:
    """The fraction of ``split``'s real units (tokens not ``PAD_ID``, or examples) whose argmax class is the
    target: the ``acc`` of the shared loop's ``evaluate``, a batch of ``batch_size`` examples at a time (default:
    8 sequences, as :func:`~metagate.seq_metrics.language_metrics`, or 1024 examples).

    :raises ValueError: a split without a real unit
    """
    model.eval().to(device)
    batch_size = batch_size or (8 if split.y.ndim == 2 else 1024)
    right = total = 0
    for i in range(0, len(split.x), batch_size):
        y = split.y[i : i + batch_size]
        pred = model(split.x[i : i + batch_size].to(device)).argmax(-1).cpu()  # the argmax per batch: no [tokens, V]
        keep = y != PAD_ID if y.ndim == 2 else torch.ones_like(y, dtype=torch.bool)
        right += int((pred[keep] == y[keep]).sum())
        total += int(keep.sum())
    if total == 0:
        raise ValueError("the split has no real unit to measure an accuracy on")
    return right / total


def measure(modules: Sequence[nn.Module], names: Sequence[str], task: Task,
            device: torch.device | str = "cpu") -> dict[str, dict[str, float]]:
    """Each teacher's ``select_acc`` and ``test_acc`` (:func:`split_accuracy`)."""
    return {n: {"select_acc": split_accuracy(m, task.select, device), "test_acc": split_accuracy(m, task.test, device)}
            for m, n in zip(modules, names)}


def _decode(payload: dict[str, Any], path: Path) -> dict[str, dict[str, float]]:
    stats = payload["stats"]
    out = {str(n): {k: float(st[k]) for k in KEYS} for n, st in stats.items()}
    if any(not 0.0 <= v <= 1.0 for st in out.values() for v in st.values()):
        raise STATS.damaged(path, "an accuracy is outside [0, 1]")
    return out


def pretrained_stats(task: Task, bank: TeacherBank, modules: Sequence[nn.Module], names: Sequence[str],
                     cache_dir: Path | None, device: torch.device | str = "cpu",
                     rebuild: bool = False) -> dict[str, dict[str, float]]:
    """The pretrained teachers' (``modules``, named ``names``, members of ``bank``) ``select_acc`` and
    ``test_acc``: read from ``<cache_dir>/<task key>/`` (:func:`stats_file`) when measured for these teachers
    and splits, else measured and written there.

    :param cache_dir: ``None``: measured, not cached
    :param rebuild: remeasure and replace the file (``--rebuild-cache``)
    :raises StaleCacheError: the file was measured for other teachers or splits, or is damaged
    """
    if not modules:
        return {}
    teachers, topk = bank_identity(bank, lambda: [state_fingerprint(m) for m in modules])
    fp = content_fingerprint({"names": list(bank.names), "pretrained": list(names), "teachers": teachers},
                             [task.select.x, task.select.y, task.test.x, task.test.y])
    path = cache_file(cache_dir, task, stats_file(bank.names, topk))
    got = cached_json(STATS, path, fp, lambda: measure(modules, names, task, device), lambda s: {"stats": s}, _decode,
                      rebuild)
    if sorted(got) != sorted(names):
        raise STATS.damaged(path, f"it holds stats of {sorted(got)}, the bank's pretrained teachers are {list(names)}")
    return got
