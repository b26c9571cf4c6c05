"""Evidence for issue 28: who gets the KD weight where the teachers disagree, from a finished compare.

Reads each cell's ``unit_weights`` (the weights last used for every training unit, in its checkpoint) and the
compare's teacher bank, and reports per gate (mean ± std over seeds) the KD share of the right teacher on units
where exactly one teacher is right (by the clean label), and of the wrong teacher where exactly one is wrong
(on g2p per real token: ``--task g2p --noise 0.2``).

    python scripts/weighting_evidence.py --out runs/cmp-specialist --teacher-bank specialist --noise 0.4
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from metagate.run import DistillConfig, load_task
from metagate.teachers.build import load_teachers
from metagate.trainer import TrainConfig
from metagate.units import PAD_ID


def shares(unit_weights: torch.Tensor, right: torch.Tensor) -> tuple[float, float, int, int]:
    """``(share of the one right teacher, share of the one wrong teacher, #units, #units)``."""
    kd = unit_weights[:, 1:].double()
    kd = kd / kd.sum(1, keepdim=True).clamp_min(1e-12)
    k = right.shape[1]
    one_right = right.sum(1) == 1
    one_wrong = right.sum(1) == k - 1
    r = float((kd * right)[one_right].sum(1).mean()) if one_right.any() else float("nan")
    w = float((kd * ~right)[one_wrong].sum(1).mean()) if one_wrong.any() else float("nan")
    return r, w, int(one_right.sum()), int(one_wrong.sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the compare's --out directory")
    p.add_argument("--task", default="digits")
    p.add_argument("--noise", type=float, default=0.4)
    p.add_argument("--teacher-bank", default="default")
    p.add_argument("--teachers", type=int, default=3)
    p.add_argument("--cache-dir", default=None)
    a = p.parse_args()
    cfg = DistillConfig(task=a.task, noise=a.noise, teacher_bank=a.teacher_bank, teachers=a.teachers,
                        cache_dir=a.cache_dir, train=TrainConfig(device="cpu", progress=False))
    task = load_task(cfg)
    bank, _ = load_teachers(cfg, task, progress=False)
    clean = task.clean_train_labels
    right = bank.unit_right(clean)  # [N, K] (sequences: [N * L, K] per token, all False on padding)
    k = right.shape[1]
    n_units = int((clean != PAD_ID).sum()) if clean.ndim == 2 else len(right)  # real tokens on sequences
    n1, nk = int((right.sum(1) == 1).sum()), int((right.sum(1) == k - 1).sum())
    print(f"{a.teacher_bank}: {n_units} training units; exactly one teacher right on {n1} "
          f"({100 * n1 / n_units:.1f}%), exactly one wrong on {nk} ({100 * nk / n_units:.1f}%); "
          f"equal weights give {1 / k:.3f} to either")
    print("| gate | KD share of the one right teacher | KD share of the one wrong teacher |")
    print("|---|---|---|")
    for row in sorted(p for p in (Path(a.out) / "runs").iterdir() if p.is_dir()):
        rs, ws = [], []
        for seed in sorted(row.glob("seed*")):
            ck = torch.load(seed / "checkpoint.pt", weights_only=True)
            uw = ck.get("unit_weights")
            if uw is None or uw.shape[1] != k + 1 or not bool(torch.isfinite(uw).all()):
                continue
            r, w, _, _ = shares(uw, right)
            rs.append(r)
            ws.append(w)
        if rs:
            def fmt(v: list[float]) -> str:
                v = [x for x in v if x == x]  # NaN: no such unit
                if not v:
                    return "-"
                return f"{statistics.mean(v):.3f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.3f}"
            print(f"| `{row.name.replace('__', ':')}` | {fmt(rs)} | {fmt(ws)} |")


if __name__ == "__main__":
    main()
