"""Several gates x seeds on one task: the comparison ``make demo`` prints."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from metagate.cli_args import add_data_arguments, add_gate_arguments, add_train_arguments, config_from_args
from metagate.errors import ConfigError
from metagate.gates import get_gate_class, option_owners
from metagate.report import comparison_table, fmt, table
from metagate.tb.hparams import RunRecord, write_comparison_summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``metagate compare``'s options: the data and training of ``distill``, every gate's options (each
    applies to the compared gates that take it), the gates and the seeds."""
    add_data_arguments(p)
    add_train_arguments(p)
    p.add_argument("--gates", nargs="+", default=["ce", "fixed", "hard"], help="gates to compare (default: ce fixed hard)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (default: 0 1 2)")
    p.add_argument("--logdir", default="runs/compare", help="parent directory of the runs (default: runs/compare)")
    p.add_argument("--config", default=None, help="YAML file of options (parsed as data)")
    add_gate_arguments(p)


def check_shared_options(args: argparse.Namespace) -> None:
    """Every gate option given must be taken by at least one compared gate."""
    for gate in args.gates:
        get_gate_class(gate)
    takes = {g: get_gate_class(g).config_class.option_names() for g in args.gates}
    for name, owners in option_owners().items():
        if getattr(args, name, None) is not None and not any(name in t for t in takes.values()):
            raise ConfigError(f"option --{name.replace('_', '-')} is taken by {', '.join(owners)}, none of the "
                              f"compared gates ({', '.join(args.gates)})")


def compare(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """Run every ``--gates`` entry for every ``--seeds`` entry; print and save the table."""
    from metagate.run import load_task, run_distill

    check_shared_options(args)
    results: dict[str, list[dict[str, Any]]] = {}
    run_dirs: list[Path] = []
    first = config_from_args(args, gate=args.gates[0], seed=args.seeds[0], logdir="unused", strict=False)
    task = load_task(first)
    teachers: list[dict[str, Any]] = []
    for gate in args.gates:
        for seed in args.seeds:
            cfg = config_from_args(args, gate=gate, seed=seed, logdir=str(Path(args.logdir) / gate / f"seed{seed}"),
                                   strict=False)
            cfg.overwrite = True
            res = run_distill(cfg, task=task)
            run_dirs.append(cfg.run_dir)
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
    write_comparison_summary(args.logdir, [RunRecord.load(d) for d in run_dirs])
    print(f"\nruns and comparison.json in {args.logdir}   (tensorboard --logdir {args.logdir})")
    return results
