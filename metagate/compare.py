"""Several gates x seeds on one task: the comparison ``make demo`` prints."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from metagate.report import comparison_table, fmt, table


def compare(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """Run every ``--gates`` entry for every ``--seeds`` entry; print and save the table."""
    from metagate.cli import config_from_args
    from metagate.run import load_task, run_distill

    results: dict[str, list[dict[str, Any]]] = {}
    first = config_from_args(args, gate=args.gates[0], seed=args.seeds[0], logdir="unused")
    task = load_task(first)
    teachers: list[dict[str, Any]] = []
    for gate in args.gates:
        for seed in args.seeds:
            cfg = config_from_args(args, gate=gate, seed=seed, logdir=str(Path(args.logdir) / gate / f"seed{seed}"))
            res = run_distill(cfg, task=task)
            teachers = res.get("teachers") or teachers
            results.setdefault(gate, []).append(res)
            print(f"  {gate:>10} seed {seed}: test acc {100 * res['test/acc']:.2f}  nll {res['test/nll']:.4f}  "
                  f"ece {res['test/ece']:.4f}", flush=True)
    print()
    if teachers:
        print(table(["teacher", "test acc"], [[t["name"], fmt(t["test_acc"])] for t in teachers]))
        print()
    print(f"{task.key}, {len(args.seeds)} seeds (mean ± std):")
    print(comparison_table(results))
    out = Path(args.logdir) / "comparison.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({g: [{k: v for k, v in r.items() if k != "teachers"} for r in rs]
                               for g, rs in results.items()}, indent=2))
    print(f"\nruns and comparison.json in {args.logdir}   (tensorboard --logdir {args.logdir})")
    return results
