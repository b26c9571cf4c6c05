"""PNG figures of a compare (matplotlib, Agg backend): accuracy and ECE per gate with error bars,
reliability diagrams side by side, and the learned weight distributions (corrupted vs clean units; each
teacher's share of the KD weight, by teacher name), pooled over seeds."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from metagate.compare.summary import by_label


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def accuracy_ece_figure(summary: dict[str, Any], path: Path) -> Path:
    """Two panels: test accuracy (%) and ECE per gate, mean ± std over seeds; baselines grey."""
    plt = _plt()
    labels = list(summary["gates"])
    fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 1.0 + 1.3 * len(labels)), 3.6))
    colors = ["0.6" if summary["gates"][lb]["baseline"] else "tab:blue" for lb in labels]
    for ax, (key, title, scale) in zip(axes, (("test/acc", "test accuracy %", 100.0), ("test/ece", "test ECE", 1.0))):
        m = [summary["gates"][lb]["metrics"][key]["mean"] * scale for lb in labels]
        sd = [summary["gates"][lb]["metrics"][key]["std"] * scale for lb in labels]
        ax.bar(range(len(labels)), m, yerr=sd, color=colors, capsize=4, edgecolor="black", lw=0.6)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
        finite = [v for v, s in zip(m, sd) if not math.isnan(v)]
        if key == "test/acc" and finite:
            lo = min(v - s for v, s in zip(m, sd) if not math.isnan(v))
            ax.set_ylim(max(0.0, lo - 2.0), min(100.0, max(finite) + max(sd) + 1.0))
    fig.suptitle("mean ± std over seeds (grey: baselines)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def reliability_grid(rows: list[dict[str, Any]], path: Path) -> Path:
    """One reliability diagram per gate (test, bins pooled over seeds), side by side."""
    plt = _plt()
    groups = by_label(rows)
    n = len(groups)
    fig, axes = plt.subplots(1, n, figsize=(2.8 * n, 3.0), squeeze=False)
    for ax, (label, rs) in zip(axes[0], groups.items()):
        count = np.sum([r["calibration"]["count"] for r in rs], 0)
        conf = np.sum([np.multiply(r["calibration"]["confidence"], r["calibration"]["count"]) for r in rs], 0)
        acc = np.sum([np.multiply(r["calibration"]["accuracy"], r["calibration"]["count"]) for r in rs], 0)
        has = count > 0
        conf, acc = conf[has] / count[has], acc[has] / count[has]
        bins = len(count)
        centers = (np.arange(bins) + 0.5)[has] / bins
        ece = float(np.sum(np.abs(conf - acc) * count[has]) / max(1.0, count.sum()))
        ax.bar(centers, acc, width=1.0 / bins, color="tab:blue", alpha=0.8, edgecolor="black", lw=0.5)
        ax.bar(centers, np.abs(conf - acc), bottom=np.minimum(conf, acc), width=1.0 / bins, fill=False,
               hatch="//", edgecolor="red", lw=0.6)
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"{label}\nECE {ece:.3f}", fontsize=8)
        ax.set_xlabel("confidence", fontsize=8)
    axes[0][0].set_ylabel("accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def weights_figure(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Per gate that uses teachers: the label weight on corrupted vs clean units, and each teacher's share of
    the KD weight (by name). ``None`` when no gate has teacher weights."""
    plt = _plt()
    groups = {lb: rs for lb, rs in by_label(rows).items() if all("weights" in r for r in rs)}
    if not groups:
        return None
    fig, axes = plt.subplots(len(groups), 2, figsize=(8.0, 2.4 * len(groups)), squeeze=False)
    for (ax_l, ax_t), (label, rs) in zip(axes, groups.items()):
        edges = np.asarray(rs[0]["weights"]["edges"])
        centers, width = (edges[1:] + edges[:-1]) / 2, edges[1] - edges[0]

        def pooled(key: str, rs: list[dict[str, Any]] = rs) -> np.ndarray:
            h = np.sum([r["weights"][key] for r in rs], 0).astype(float)
            return h / max(1.0, h.sum())

        for key, color, name in (("label_clean", "tab:green", "clean units"),
                                 ("label_corrupted", "tab:red", "corrupted units")):
            ax_l.bar(centers, pooled(key), width=width, alpha=0.55, color=color, label=name)
        ax_l.set_title(f"{label}: label weight", fontsize=8)
        ax_l.legend(fontsize=7)
        names = list(rs[0]["weights"]["kd_share"])
        for j, name in enumerate(names):
            h = np.sum([r["weights"]["kd_share"][name] for r in rs], 0).astype(float)
            ax_t.step(centers, h / max(1.0, h.sum()), where="mid", lw=1.4, label=name, color=f"C{j}")
        ax_t.set_title(f"{label}: share of the unit's KD weight, per teacher", fontsize=8)
        ax_t.legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("weight / share")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_figures(out: Path, rows: list[dict[str, Any]], summary: dict[str, Any]) -> dict[str, Path]:
    """All figures into ``out``; return name -> path."""
    paths = {"acc_ece": accuracy_ece_figure(summary, out / "acc_ece.png"),
             "reliability": reliability_grid(rows, out / "reliability.png")}
    w = weights_figure(rows, out / "weights.png")
    if w is not None:
        paths["weights"] = w
    return paths
