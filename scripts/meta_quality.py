"""Quality of the meta gate vs fixed/hard KD on noisy Fashion-MNIST (issue 4's evidence).

Protocol (every choice on the ``select`` split, never on ``meta`` or ``test``):

1. ``fixed-tuned``: grid over ``--alphas`` x ``--taus`` with the tuning seed; the best
   ``select`` accuracy (ties: lower ``select`` NLL) wins.
2. meta learning rates: ``meta/table`` over ``--table-lrs``, ``meta/net`` over ``--net-lrs``,
   tuning seed, best ``select`` accuracy. Both meta gates start from the tuned mix
   (label ``alpha*``, each teacher ``(1 - alpha*) / K``, ``tau*``) and, by default, learn only the
   label column (``--meta-columns label``): every unit keeps the tuned teacher signal while the
   gate raises the label weight where the label helps the clean validation loss and lowers it
   where it hurts (corrupted labels).
3. evaluation seeds: ``ce``, ``fixed`` (AMAL's 0.1/0.9 split, tau 4), ``fixed-tuned``, ``hard``,
   ``meta/table``, ``meta/net``; test accuracy, NLL, ECE, the corrupted-label AUROC of the
   teacher share, mean label weight / teacher share on clean vs corrupted units; mean ± std and
   the paired per-seed difference to ``fixed-tuned``.

    METAGATE_CACHE=/tmp/mgcache python scripts/meta_quality.py --epochs 10 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

KEYS = ("test/acc", "test/nll", "test/ece", "diag/auroc_teacher_share", "diag/w_label_clean",
        "diag/w_label_corrupted", "diag/teacher_share_clean", "diag/teacher_share_corrupted")


def run(task: Any, args: argparse.Namespace, gate: str, options: dict[str, Any], seed: int, tag: str) -> dict:
    from metagate.run import DistillConfig, run_distill
    from metagate.trainer import TrainConfig

    cfg = DistillConfig(task=args.task, noise=args.noise, teachers=args.teachers, student=args.student, gate=gate,
                        gate_options=options, overwrite=True,
                        train=TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=seed,
                                          device="cpu", progress=False, eval_test_every_epoch=False),
                        logdir=str(Path(args.out) / "runs" / tag / f"seed{seed}"))
    t0 = time.time()
    res = run_distill(cfg, task=task)
    res = {k: v for k, v in res.items() if k != "teachers"}
    res["seconds"] = time.time() - t0
    print(f"  {tag:>28} seed {seed}: select acc {100 * res['select/acc']:.2f}  test acc {100 * res['test/acc']:.2f}"
          f"  nll {res['test/nll']:.4f}  ece {res['test/ece']:.4f}  auroc {res.get('diag/auroc_teacher_share', math.nan):.3f}"
          f"  ({res['seconds']:.0f}s)", flush=True)
    return res


def best(results: dict[str, dict]) -> str:
    return max(results, key=lambda k: (results[k]["select/acc"], -results[k]["select/nll"]))


def fmt_ms(vals: list[float], scale: float = 1.0, digits: int = 4) -> str:
    vals = [v * scale for v in vals]
    if any(math.isnan(v) for v in vals):
        return "-"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):.{digits}f} ± {sd:.{digits}f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="fashion")
    p.add_argument("--noise", type=float, default=0.4)
    p.add_argument("--teachers", type=int, default=3)
    p.add_argument("--student", default="mlp")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--tune-seed", type=int, default=100)
    p.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7])
    p.add_argument("--taus", type=float, nargs="+", default=[2.0, 4.0])
    p.add_argument("--table-lrs", type=float, nargs="+", default=[2000.0, 8000.0])
    p.add_argument("--net-lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    p.add_argument("--meta-columns", default="label")
    p.add_argument("--meta-normalize", default="none")
    p.add_argument("--meta-lookahead", default="all")
    p.add_argument("--out", default="/tmp/meta_bench/quality")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    p.add_argument("--report", default=None, help="only print the tables of an existing quality.json")
    args = p.parse_args()
    if args.report:
        report(json.loads(Path(args.report).read_text()))
        return
    import torch

    torch.set_num_threads(args.threads)

    from metagate.run import DistillConfig, load_task
    from metagate.teachers.build import load_teachers
    from metagate.trainer import TrainConfig

    task = load_task(DistillConfig(task=args.task, noise=args.noise, teachers=args.teachers))
    _, tstats = load_teachers(DistillConfig(task=args.task, noise=args.noise, teachers=args.teachers,
                                            train=TrainConfig(device="cpu", progress=False)), task, progress=False)
    print("teachers:", ", ".join(f"{t['name']} {100 * t['test_acc']:.2f}%" for t in tstats), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log: dict[str, Any] = {"args": vars(args)}

    print(f"[1] fixed grid on select (seed {args.tune_seed})", flush=True)
    grid = {}
    for a in args.alphas:
        for t in args.taus:
            grid[f"{a}/{t}"] = run(task, args, "fixed", {"alpha": a, "tau": t}, args.tune_seed, f"tune-fixed-a{a}-t{t}")
    key = best(grid)
    alpha, tau = (float(v) for v in key.split("/"))
    print(f"    fixed-tuned: alpha {alpha}, tau {tau}", flush=True)
    log["fixed_grid"] = grid
    log["fixed_tuned"] = {"alpha": alpha, "tau": tau}

    k = args.teachers
    base = {"meta_init_label": alpha, "meta_init_teacher": (1 - alpha) / k, "meta_tau": tau,
            "meta_normalize": args.meta_normalize, "meta_lookahead": args.meta_lookahead,
            "meta_columns": args.meta_columns}
    print(f"[2] meta learning rates on select (seed {args.tune_seed})", flush=True)
    meta_cfg: dict[str, dict[str, Any]] = {}
    for param, lrs in (("table", args.table_lrs), ("net", args.net_lrs)):
        res = {str(lr): run(task, args, "meta", {**base, "meta_param": param, "meta_lr": lr}, args.tune_seed,
                            f"tune-meta-{param}-lr{lr:g}") for lr in lrs}
        lr = float(best(res))
        meta_cfg[f"meta/{param}"] = {**base, "meta_param": param, "meta_lr": lr}
        log[f"meta_{param}_grid"] = res
        print(f"    meta/{param}: lr {lr:g}", flush=True)
    log["meta_configs"] = meta_cfg

    gates: dict[str, tuple[str, dict[str, Any]]] = {
        "ce": ("ce", {}),
        "fixed": ("fixed", {"alpha": 0.1, "tau": 4.0}),
        "fixed-tuned": ("fixed", {"alpha": alpha, "tau": tau}),
        "hard": ("hard", {}),
        **{name: ("meta", opts) for name, opts in meta_cfg.items()},
    }
    print(f"[3] evaluation, seeds {args.seeds}", flush=True)
    results: dict[str, list[dict]] = {g: [] for g in gates}
    for seed in args.seeds:
        for name, (gate, opts) in gates.items():
            results[name].append(run(task, args, gate, opts, seed, name.replace("/", "-")))
        log["results"] = results
        (out / "quality.json").write_text(json.dumps(log, indent=2))

    report(log)


def report(log: dict[str, Any]) -> None:
    """Print the comparison tables from a ``quality.json`` log (complete seeds only)."""
    from metagate.report import table

    results, args = log["results"], argparse.Namespace(**log["args"])
    alpha, tau, meta_cfg = log["fixed_tuned"]["alpha"], log["fixed_tuned"]["tau"], log["meta_configs"]
    n = min(len(rs) for rs in results.values())
    results = {g: rs[:n] for g, rs in results.items()}
    seeds = args.seeds[:n]
    task_key = f"{args.task} noise {args.noise}"
    ref = results["fixed-tuned"]
    rows = []
    for name, rs in results.items():
        diff = [100 * (r["test/acc"] - f["test/acc"]) for r, f in zip(rs, ref)]
        dnll = [r["test/nll"] - f["test/nll"] for r, f in zip(rs, ref)]
        dece = [r["test/ece"] - f["test/ece"] for r, f in zip(rs, ref)]
        rows.append([name, str(len(rs)), fmt_ms([r["test/acc"] for r in rs], 100, 2),
                     fmt_ms([r["test/nll"] for r in rs]), fmt_ms([r["test/ece"] for r in rs]),
                     fmt_ms([r.get("diag/auroc_teacher_share", math.nan) for r in rs], 1, 3),
                     " ".join(f"{d:+.2f}" for d in diff), " ".join(f"{d:+.3f}" for d in dnll),
                     " ".join(f"{d:+.3f}" for d in dece)])
    print(f"\n{task_key}, student {args.student}, {args.epochs} epochs, seeds {seeds}; "
          f"fixed-tuned alpha {alpha} tau {tau}; meta: {json.dumps(meta_cfg)}")
    print(table(["gate", "seeds", "test acc %", "test NLL", "test ECE", "AUROC", "Δacc vs tuned (per seed)",
                 "ΔNLL", "ΔECE"], rows))
    wrows = []
    for name, rs in results.items():
        wrows.append([name] + [fmt_ms([r.get(key, math.nan) for r in rs], 1, 3) for key in KEYS[4:]])
    print(table(["gate", "w_label clean", "w_label corrupted", "teacher share clean", "teacher share corrupted"],
                wrows))
    print(f"\nresults in {args.out}/quality.json")


if __name__ == "__main__":
    main()
