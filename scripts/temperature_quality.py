"""Temperature gates vs fixed KD: test accuracy, NLL and ECE over seeds, the paired difference to fixed KD
with a 95% interval, and the temperatures each gate chose.

    .venv/bin/python scripts/temperature_quality.py --task digits --noise 0.4 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import math

import torch

from metagate.run import DistillConfig, build_gate, load_task, load_teachers
from metagate.trainer import TrainConfig, Trainer, seed_everything

GATES = {"fixed tau=4": ("fixed", {"tau": 4.0}), "ctkd global": ("ctkd", {}),
         "ctkd instance": ("ctkd", {"ctkd_variant": "instance"}), "temperature": ("temperature", {})}
T95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776}  # Student t, two-sided 95%, by number of seeds


def run(task, bank, gate_name, opts, seed, epochs):
    seed_everything(seed)
    gate = build_gate(gate_name, opts)
    tr = Trainer(task, task.make_student(), gate, bank, TrainConfig(epochs=epochs, seed=seed, device="cpu",
                                                                    progress=False, eval_test_every_epoch=False))
    m = tr.fit()
    log = getattr(gate, "_log", None)
    tau = log.unit_tau if log is not None else torch.full((len(task.train),), 4.0)
    return m, tau


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--task", default="digits")
    p.add_argument("--noise", type=float, default=0.4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=30)
    a = p.parse_args()
    torch.set_num_threads(1)
    cfg = DistillConfig(task=a.task, noise=a.noise, train=TrainConfig(device="cpu", progress=False))
    task = load_task(cfg)
    bank, _ = load_teachers(cfg, task, progress=False)
    res = {k: [run(task, bank, g, o, s, a.epochs) for s in a.seeds] for k, (g, o) in GATES.items()}
    corrupted = task.corrupted
    conf = torch.softmax(bank.logits.float(), -1).mean(1).max(-1).values
    lo, hi = torch.quantile(conf, torch.tensor([1 / 3, 2 / 3])).tolist()
    print(f"{a.task} noise {a.noise}, {len(a.seeds)} seeds, {a.epochs} epochs")
    for metric in ("acc", "nll", "ece"):
        base = [m[f"test/{metric}"] for m, _ in res["fixed tau=4"]]
        for k, rows in res.items():
            v = [m[f"test/{metric}"] for m, _ in rows]
            d = [x - y for x, y in zip(v, base)]
            mean = sum(v) / len(v)
            sd = math.sqrt(sum((x - mean) ** 2 for x in v) / max(1, len(v) - 1))
            dm = sum(d) / len(d)
            dsd = math.sqrt(sum((x - dm) ** 2 for x in d) / max(1, len(d) - 1))
            half = T95.get(len(d), 2.0) * dsd / math.sqrt(len(d))
            print(f"  {metric:4s} {k:14s} {mean:.4f} ± {sd:.4f}   diff to fixed {dm:+.4f} [{dm - half:+.4f}, "
                  f"{dm + half:+.4f}]")
    for k, rows in res.items():
        tau = torch.stack([t for _, t in rows]).float()
        c = corrupted.to(tau.device)
        print(f"  tau {k:14s} mean {tau.mean():.2f} (min {tau.min():.2f}, max {tau.max():.2f}); corrupted "
              f"{tau[:, c].mean():.2f} clean {tau[:, ~c].mean():.2f}; teacher confidence lowest third "
              f"{tau[:, conf < lo].mean():.2f}, highest third {tau[:, conf >= hi].mean():.2f} (cut {lo:.2f}/{hi:.2f})")


if __name__ == "__main__":
    main()
