"""Classification and calibration metrics (token-level when units are tokens)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

N_BINS = 15
#: ``mce_min{MCE_MIN_COUNT}`` only judges bins holding at least this many units (the raw MCE may come from one)
MCE_MIN_COUNT = 20


def calibration_bins(probs: Tensor, labels: Tensor, n_bins: int = N_BINS) -> dict[str, Tensor]:
    """Equal-width confidence bins ``(lo, hi]`` (the first also holds 0).

    :param probs: ``[N, C]``
    :param labels: ``[N]``
    :return: per-bin ``count``, ``confidence`` (mean), ``accuracy`` and the bin ``edges``
    """
    conf, pred = probs.max(-1)
    return confidence_bins(conf, (pred == labels).to(probs.dtype), n_bins)


def confidence_bins(conf: Tensor, correct: Tensor, n_bins: int = N_BINS) -> dict[str, Tensor]:
    """:func:`calibration_bins` from each unit's top-label confidence ``[N]`` and correctness ``[N]`` (what a
    caller keeps when the ``[N, C]`` probabilities are too large to hold at once, e.g. a 49,152-token vocabulary)."""
    correct = correct.to(conf.dtype)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=conf.dtype, device=conf.device)
    idx = (torch.bucketize(conf, edges[1:-1], right=False)).clamp(0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=conf.dtype, device=conf.device).index_add_(0, idx, torch.ones_like(conf))
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


def mce_min_count(probs: Tensor, labels: Tensor, min_count: int = MCE_MIN_COUNT, n_bins: int = N_BINS) -> float:
    """Maximum calibration error over the bins holding at least ``min_count`` units (NaN if none does)."""
    b = calibration_bins(probs, labels, n_bins)
    big = b["count"] >= min_count
    return float((b["confidence"] - b["accuracy"]).abs()[big].max()) if big.any() else float("nan")


def classification_metrics(logits: Tensor, labels: Tensor, mask: Tensor | None = None) -> dict[str, float]:
    """Accuracy, NLL, ECE, MCE (raw, and ``mce_min{MCE_MIN_COUNT}`` over the bins holding at least
    :data:`MCE_MIN_COUNT` units, when one does) and Brier score of ``logits [N, C]`` (masked units dropped)."""
    if mask is not None:
        keep = mask.bool()
        logits, labels = logits[keep], labels[keep]
    logits = logits.double()
    probs = F.softmax(logits, -1)
    ece, mce = ece_mce(probs, labels)
    onehot = F.one_hot(labels, logits.shape[-1]).to(probs.dtype)
    out = {
        "acc": float((probs.argmax(-1) == labels).double().mean()),
        "nll": float(F.cross_entropy(logits, labels)),
        "ece": ece,
        "mce": mce,
        "brier": float(((probs - onehot) ** 2).sum(-1).mean()),
    }
    mce_min = mce_min_count(probs, labels)
    if mce_min == mce_min:  # left out when no bin is full enough (a small split), not NaN
        out[f"mce_min{MCE_MIN_COUNT}"] = mce_min
    return out


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


def reliability_figure(probs: Tensor, labels: Tensor, title: str = "", n_bins: int = N_BINS,
                       min_count: int = MCE_MIN_COUNT) -> Any:
    """A matplotlib reliability diagram: accuracy vs confidence per bin (gap hatched) above the bins' unit counts.

    Bins with fewer than ``min_count`` units are drawn pale: ``mce_min{min_count}`` ignores them, the raw MCE
    does not. The legend sits below the axes so it never covers a bar.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p, y = probs.double().cpu(), labels.cpu()
    b = calibration_bins(p, y, n_bins)
    ece, mce = ece_mce(p, y, n_bins)
    mce_min = mce_min_count(p, y, min_count, n_bins)
    centers = ((b["edges"][1:] + b["edges"][:-1]) / 2).numpy()
    width = 1.0 / n_bins
    count = b["count"].numpy()
    fig, (ax, axc) = plt.subplots(2, 1, figsize=(4.6, 5.6), dpi=100, sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1.2]})
    has, big = count > 0, count >= min_count
    acc, conf = b["accuracy"].numpy(), b["confidence"].numpy()
    for sel, alpha, lab in ((has & big, 0.85, f"accuracy (bins with >= {min_count} units)"),
                            (has & ~big, 0.3, f"accuracy (bins with < {min_count} units)")):
        if sel.any():
            ax.bar(centers[sel], acc[sel], width=width, color="tab:blue", alpha=alpha, edgecolor="black", label=lab)
    # the gap between each bin's mean confidence and its accuracy, hatched over the bar
    ax.bar(centers[has], abs(conf[has] - acc[has]), bottom=np.minimum(conf[has], acc[has]), width=width,
           fill=False, hatch="//", edgecolor="red", lw=0.8, label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    mce_txt = "-" if mce_min != mce_min else f"{mce_min:.3f}"
    ax.set_title(f"{title} ECE={ece:.3f} MCE={mce:.3f} MCE(>={min_count})={mce_txt}".strip(), fontsize=9)
    axc.bar(centers, count, width=width, color=np.where(big, "tab:gray", "lightgray"), edgecolor="black")
    for x, n in zip(centers[has], count[has]):
        axc.text(x, n, f"{int(n)}", ha="center", va="bottom", fontsize=6)
    axc.axhline(min_count, color="tab:orange", lw=1, ls=":")
    axc.set_ylim(0, max(count.max(), min_count) * 1.25)
    axc.set_xlabel("confidence")
    axc.set_ylabel(f"units (n={int(count.sum())})", fontsize=8)
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    return fig


def reliability_table(probs: Tensor, labels: Tensor, n_bins: int = N_BINS) -> str:
    """The reliability diagram's numbers as a markdown table (bin, units, mean confidence, accuracy, gap)."""
    b = calibration_bins(probs.double().cpu(), labels.cpu(), n_bins)
    e = b["edges"].tolist()
    rows = ["| bin | units | mean confidence | accuracy | gap |", "|---|---|---|---|---|"]
    for i, (n, c, a) in enumerate(zip(b["count"].tolist(), b["confidence"].tolist(), b["accuracy"].tolist())):
        cells = (f"{c:.3f}", f"{a:.3f}", f"{abs(c - a):.3f}") if n else ("-", "-", "-")
        rows.append(f"| ({e[i]:.3f}, {e[i + 1]:.3f}] | {int(n)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
