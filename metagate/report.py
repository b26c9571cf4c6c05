"""Plain-text tables for the terminal."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

MAIN_METRICS = ("test/acc", "test/nll", "test/ece", "test/mce", "test/brier")
#: sequence tasks: decoded-word metrics (test/acc, nll, ece are then per token)
SEQ_METRICS = ("test/per", "test/wer", "test/sent_ece", "test/sent_mce", "test/sent_conf")
DIAG_METRICS = ("gate/teacher_share", "diag/auroc_teacher_share", "diag/w_label_clean", "diag/w_label_corrupted",
                "diag/kd_on_right_teachers", "diag/kd_on_right_teachers_equal", "diag/teacher_choice_gain")


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A left-aligned text table with a rule under the header."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), "  ".join("-" * w for w in widths)]
    lines += [fmt.format(*map(str, r)) for r in rows]
    return "\n".join(lines)


NAN = float("nan")


def fmt(v: Any, digits: int = 4) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def print_run(cfg: Any, result: dict[str, Any]) -> None:
    """Final table of one run."""
    if result.get("teachers"):
        ts = result["teachers"]
        seq = [k for k in ("test_per", "test_wer") if all(k in t for t in ts)]  # sequence teachers
        print(table(["teacher", "test acc", "select acc", *(k[5:].upper() for k in seq)],
                    [[t["name"], fmt(t.get("test_acc", NAN)), fmt(t.get("select_acc", NAN)), *(fmt(t[k]) for k in seq)]
                     for t in ts]))  # a file teacher has no accuracies
        print()
    keys = [k for k in (*MAIN_METRICS, *SEQ_METRICS, *DIAG_METRICS) if k in result]
    keys += sorted(k for k in result if k.startswith("gate/mean_w"))
    print(table(["metric", f"{cfg.gate} (seed {cfg.train.seed})"], [[k, fmt(result[k])] for k in keys]))
    print(f"\nrun directory: {cfg.run_dir}   (tensorboard --logdir {cfg.run_dir.parent})")


def print_teachers(task: Any, stats: list[dict[str, Any]]) -> None:
    print(f"teachers of {task.key}:")
    seq = [k for k in ("test_per", "test_wer") if all(k in s for s in stats)]  # sequence teachers
    print(table(["teacher", "test acc", "select acc", "best epoch", *(k[5:].upper() for k in seq)],
                [[s["name"], fmt(s["test_acc"]), fmt(s["select_acc"]), s.get("epoch", ""), *(fmt(s[k]) for k in seq)]
                 for s in stats]))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    vals = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return m, sd


def comparison_table(results: dict[str, list[dict[str, Any]]], keys: Sequence[str] = (*MAIN_METRICS[:4],
                     "diag/auroc_teacher_share", "diag/teacher_choice_gain")) -> str:
    """``gate -> [per-seed results]`` as mean ± std (accuracy in %)."""
    rows = []
    for gate, runs in results.items():
        row = [gate, str(len(runs))]
        for k in keys:
            vals = [r.get(k, float("nan")) for r in runs]
            scale = 100.0 if k.endswith("/acc") else 1.0
            m, sd = mean_std([v * scale for v in vals])
            d = 2 if scale == 100 else 4
            m = round(m, d) + 0.0  # no "-0.0000" for a rounding residue
            row.append("-" if math.isnan(m) else f"{m:.{d}f} ± {sd:.{d}f}")
        rows.append(row)
    header = ["gate", "seeds", *[k.replace("/acc", "/acc%") for k in keys]]
    return table(header, rows)
