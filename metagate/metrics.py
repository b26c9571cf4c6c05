"""Classification and calibration metrics (token-level when units are tokens)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

N_BINS = 15


def calibration_bins(probs: Tensor, labels: Tensor, n_bins: int = N_BINS) -> dict[str, Tensor]:
    """Equal-width confidence bins ``(lo, hi]`` (the first also holds 0).

    :param probs: ``[N, C]``
    :param labels: ``[N]``
    :return: per-bin ``count``, ``confidence`` (mean), ``accuracy`` and the bin ``edges``
    """
    conf, pred = probs.max(-1)
    correct = (pred == labels).to(probs.dtype)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=probs.dtype, device=probs.device)
    idx = (torch.bucketize(conf, edges[1:-1], right=False)).clamp(0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=probs.dtype, device=probs.device).index_add_(0, idx, torch.ones_like(conf))
    s_conf = torch.zeros_like(count).index_add_(0, idx, conf)
    s_acc = torch.zeros_like(count).index_add_(0, idx, correct)
    denom = count.clamp_min(1)
    return {"count": count, "confidence": s_conf / denom, "accuracy": s_acc / denom, "edges": edges}


def ece_mce(probs: Tensor, labels: Tensor, n_bins: int = N_BINS) -> tuple[float, float]:
    """Expected and maximum calibration error over ``n_bins`` equal-width bins."""
    b = calibration_bins(probs, labels, n_bins)
    gap = (b["confidence"] - b["accuracy"]).abs()
    nonempty = b["count"] > 0
    ece = float((gap * b["count"]).sum() / b["count"].sum().clamp_min(1))
    mce = float(gap[nonempty].max()) if nonempty.any() else 0.0
    return ece, mce


def classification_metrics(logits: Tensor, labels: Tensor, mask: Tensor | None = None) -> dict[str, float]:
    """Accuracy, NLL, ECE, MCE and Brier score of ``logits [N, C]`` (masked units dropped)."""
    if mask is not None:
        keep = mask.bool()
        logits, labels = logits[keep], labels[keep]
    logits = logits.double()
    probs = F.softmax(logits, -1)
    ece, mce = ece_mce(probs, labels)
    onehot = F.one_hot(labels, logits.shape[-1]).to(probs.dtype)
    return {
        "acc": float((probs.argmax(-1) == labels).double().mean()),
        "nll": float(F.cross_entropy(logits, labels)),
        "ece": ece,
        "mce": mce,
        "brier": float(((probs - onehot) ** 2).sum(-1).mean()),
    }


def auroc(scores: Tensor, positives: Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties); NaN if one class is absent."""
    scores = scores.detach().double().flatten().cpu()
    pos = positives.bool().flatten().cpu()
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(scores)
    _, inverse, counts = torch.unique_consecutive(scores[order], return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    ranks = torch.empty_like(scores)
    ranks[order] = (ends - (counts - 1) / 2.0)[inverse]  # mid-ranks for ties
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def reliability_figure(probs: Tensor, labels: Tensor, title: str = "", n_bins: int = N_BINS) -> Any:
    """A matplotlib reliability diagram (accuracy vs confidence per bin, gap shaded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = calibration_bins(probs.double().cpu(), labels.cpu(), n_bins)
    ece, mce = ece_mce(probs.double().cpu(), labels.cpu(), n_bins)
    centers = ((b["edges"][1:] + b["edges"][:-1]) / 2).numpy()
    width = 1.0 / n_bins
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    has = (b["count"] > 0).numpy()
    acc, conf = b["accuracy"].numpy()[has], b["confidence"].numpy()[has]
    ax.bar(centers[has], acc, width=width, color="tab:blue", alpha=0.8, edgecolor="black", label="accuracy")
    # the gap between each bin's mean confidence and its accuracy, hatched over the bar
    ax.bar(centers[has], abs(conf - acc), bottom=np.minimum(conf, acc), width=width, fill=False, hatch="//",
           edgecolor="red", lw=0.8, label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f"{title} ECE={ece:.3f} MCE={mce:.3f}".strip())
    ax.legend(loc="upper left")
    fig.tight_layout()
    return fig
