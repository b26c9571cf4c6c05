"""The g2p noise study: gates on CMUdict grapheme-to-phoneme with token noise, over seeds.

For each gate and seed: PER and WER of greedy decodings on test, token ECE and sentence ECE; then mean ± std
over seeds and the paired difference to ``fixed`` with a 95% Student-t interval (cells of one seed share the
data draw and the teachers). The HKD claim to check: ``hard`` lowers token ECE against ``fixed`` with PER no
worse. Teachers are trained once per (data, noise) and cached like every run's.

    .venv/bin/python scripts/g2p_quality.py --noise 0.2 --seeds 0 1 2 3 4 --epochs 30 --out g2p_quality.json
    .venv/bin/python scripts/g2p_quality.py --subset 300 --teachers 2 --seeds 0 --epochs 1   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from metagate.compare.stats import mean_std, paired_t
from metagate.run import DistillConfig, build_gate, load_task
from metagate.teachers.build import load_teachers
from metagate.trainer import TrainConfig, Trainer, seed_everything

#: label -> (gate, options); ``fixed`` is the reference of every paired difference
GATES = {
    "ce": ("ce", {}),
    "fixed": ("fixed", {}),
    "hard token gold": ("hard", {"hard_level": "token", "hard_reference": "gold"}),
    "hard token pred": ("hard", {"hard_level": "token", "hard_reference": "pred"}),
    "hard sentence gold": ("hard", {"hard_level": "sentence", "hard_reference": "gold"}),
    "hard sentence pred": ("hard", {"hard_level": "sentence", "hard_reference": "pred"}),
    "hard token hinton": ("hard", {"hard_level": "token", "hard_temper_student": True}),  # not the paper's
    "meta net": ("meta", {"meta_param": "net"}),
    "reinforce": ("reinforce", {}),
}
METRICS = ("per", "wer", "ece", "sent_ece", "acc", "nll")


def train_config(a: argparse.Namespace, seed: int) -> TrainConfig:
    return TrainConfig(epochs=a.epochs, seed=seed, optimizer="adam", lr=a.lr, weight_decay=0.0,
                       batch_size=a.batch_size, device="cpu", progress=False, eval_test_every_epoch=False)


def run_cell(task, bank, gate: str, opts: dict, seed: int, a: argparse.Namespace) -> dict[str, float]:
    seed_everything(seed)
    tr = Trainer(task, task.make_student(), build_gate(gate, opts), bank, train_config(a, seed))
    m = tr.fit()
    return {k: float(m[f"test/{k}"]) for k in METRICS}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--noise", type=float, default=0.2, help="token noise rate (default: 0.2)")
    p.add_argument("--noise-type", default="symmetric", help="symmetric (per token) or word (default: symmetric)")
    p.add_argument("--subset", type=int, default=None, help="CMUdict words (default: the task's, 8000)")
    p.add_argument("--teachers", type=int, default=3, help="teachers K (default: 3)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="student seeds (default: 0..4)")
    p.add_argument("--epochs", type=int, default=30, help="student epochs (default: 30)")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default: 0.003)")
    p.add_argument("--batch-size", type=int, default=64, help="words per step (default: 64)")
    p.add_argument("--gates", nargs="+", default=list(GATES), choices=list(GATES), help="gates (default: all)")
    p.add_argument("--out", type=Path, default=None, help="write every cell and the summary as JSON")
    a = p.parse_args()
    if "fixed" not in a.gates:
        a.gates = ["fixed", *a.gates]
    torch.set_num_threads(1)
    cfg = DistillConfig(task="g2p", noise=a.noise, noise_type=a.noise_type, teachers=a.teachers,
                        task_options={"subset": a.subset},
                        train=TrainConfig(device="cpu", progress=False))
    task = load_task(cfg)
    bank, teacher_metrics = load_teachers(cfg, task, progress=False)
    cells = {label: [run_cell(task, bank, *GATES[label], s, a) for s in a.seeds] for label in a.gates}
    summary: dict[str, dict[str, dict[str, float]]] = {}
    print(f"g2p, {len(task.train)} training words, noise {a.noise} ({a.noise_type}), K={a.teachers}, "
          f"seeds {a.seeds}, {a.epochs} epochs")
    header = f"{'gate':20s}" + "".join(f"{m:>26s}" for m in METRICS[:4])
    print(header + "\n" + "-" * len(header))
    for label, rows in cells.items():
        summary[label] = {}
        line = f"{label:20s}"
        for metric in METRICS:
            v = [r[metric] for r in rows]
            mean, sd = mean_std(v)
            d = paired_t(v, [r[metric] for r in cells["fixed"]])
            summary[label][metric] = {"mean": mean, "std": sd, "diff_to_fixed": d.mean, "diff_lo": d.lo,
                                      "diff_hi": d.hi}
            if metric in METRICS[:4]:
                line += f"{mean:>10.4f} ± {sd:<6.4f}"
                line += f" {d.mean:+.4f}" if label != "fixed" else "        "
        print(line)
    print("(each cell: mean ± std over seeds, then the mean paired difference to fixed; intervals in --out)")
    if a.out is not None:
        blob = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
                "teachers": teacher_metrics, "cells": cells, "summary": summary}
        a.out.write_text(json.dumps(blob, indent=2, default=lambda x: None if isinstance(x, float) and
                                    math.isnan(x) else x))
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
