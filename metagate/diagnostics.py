"""What a gate learned, judged against the task's ground truth (corrupted labels, planted teachers)."""

from __future__ import annotations

from torch import Tensor

from metagate.metrics import auroc


def teacher_share(unit_weights: Tensor) -> Tensor:
    """``[N]`` share of each unit's total weight that goes to the teachers."""
    return unit_weights[:, 1:].sum(1) / unit_weights.sum(1).clamp_min(1e-12)


def gate_diagnostics(unit_weights: Tensor, corrupted: Tensor | None) -> dict[str, float]:
    """Summaries of ``W [N, 1+K]`` (the weights last used for each training unit).

    * ``gate/teacher_share``: mean of ``sum_k w_k / sum_j w_j``;
    * ``gate/mean_w{j}``: mean weight of each column (a planted bad teacher shows up here);
    * with label noise: ``diag/auroc_teacher_share`` -- AUROC of the teacher share for predicting
      "this label was corrupted" (1 = the gate hands every corrupted unit to the teachers) --
      and the mean label weight / teacher share on corrupted vs clean units.
    """
    w = unit_weights.detach().float()
    out: dict[str, float] = {}
    means = w.mean(0).tolist()
    out["gate/mean_w_label"] = means[0]
    for j, m in enumerate(means[1:]):
        out[f"gate/mean_w_teacher{j}"] = m
    if w.shape[1] == 1:
        return out
    share = teacher_share(w)
    out["gate/teacher_share"] = float(share.mean())
    if corrupted is not None and corrupted.any() and (~corrupted).any():
        c = corrupted.bool()
        out["diag/auroc_teacher_share"] = auroc(share, c)
        out["diag/w_label_corrupted"] = float(w[c, 0].mean())
        out["diag/w_label_clean"] = float(w[~c, 0].mean())
        out["diag/teacher_share_corrupted"] = float(share[c].mean())
        out["diag/teacher_share_clean"] = float(share[~c].mean())
    return out
