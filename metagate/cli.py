"""The ``metagate`` command line (its options come from the config dataclasses, :mod:`metagate.cli_args`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from metagate import compare, train_policy
from metagate.cli_args import (
    HelpFormatter,
    add_data_arguments,
    add_gate_arguments,
    add_task_arguments,
    add_train_arguments,
    config_from_args,
)
from metagate.errors import MetagateError
from metagate.gates import GATES


def cmd_distill(args: argparse.Namespace) -> int:
    from metagate.report import print_run
    from metagate.run import run_distill

    cfg = config_from_args(args)
    print_run(cfg, run_distill(cfg, verbose=True))
    return 0


def cmd_teachers(args: argparse.Namespace) -> int:
    from metagate.report import print_teachers
    from metagate.run import load_task
    from metagate.teachers.build import load_teachers

    cfg = config_from_args(args, gate="fixed")
    task = load_task(cfg)
    _, stats = load_teachers(cfg, task, progress=cfg.train.progress, verbose=True)
    print_teachers(task, stats)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    compare.compare(args)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from metagate.bench import bench

    bench(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metagate", description="Learned gates for knowledge distillation.",
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("distill", help="train a student with a gate", formatter_class=HelpFormatter)
    add_data_arguments(p)
    add_train_arguments(p)
    p.add_argument("--gate", default=None, choices=sorted(GATES), help="which gate decides W (default: fixed)")
    p.add_argument("--logdir", default=None, help="run directory (default: runs/<task>-n<noise>/<gate>-seed<seed>)")
    p.add_argument("--resume", action="store_const", const=True, default=None,
                   help="continue the run in --logdir from its checkpoint")
    p.add_argument("--overwrite", action="store_const", const=True, default=None,
                   help="replace an existing run in --logdir")
    p.add_argument("--config", default=None,
                   help="YAML file of options (parsed as data; flags given on the command line win; relative paths "
                        "in it resolve against the current directory, as flags do)")
    add_gate_arguments(p)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("teachers", help="train and cache the task's teachers, print their accuracy",
                       formatter_class=HelpFormatter)
    add_data_arguments(p)
    p.set_defaults(func=cmd_teachers)

    p = sub.add_parser("compare", help="several gates x seeds; print mean ± std", formatter_class=HelpFormatter)
    compare.add_arguments(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("bench", help="step-time ratios of gates vs a hand-written KD step",
                       formatter_class=HelpFormatter)
    p.add_argument("--task", default="fashion",
                   help="task whose shapes to use (digits | fashion | g2p, lm: token units; default: fashion); its "
                        "options below (e.g. --lm-documents) shape it")
    p.add_argument("--batch-size", type=int, default=128, help="units per step (default: 128)")
    p.add_argument("--steps", type=int, default=50, help="timed steps per repeat (default: 50)")
    p.add_argument("--repeats", type=int, default=30,
                   help="interleaved repeats, order rotated (median reported; default: 30)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1 gives steadier ratios on a shared CPU; 0 keeps torch's default)")
    p.add_argument("--teachers", type=int, default=None,
                   help="number of teachers K (default: the task's count, 3; lm: 2)")
    p.add_argument("--students", nargs="+", default=None,
                   help="student architectures (default: mlp cnn; gru for g2p; another task's default student, "
                        "gpt2 for lm)")
    p.add_argument("--gates", nargs="+", default=["fixed", "hard"],
                   help="gates through the trainer: NAME or NAME:option=value,... (e.g. meta:meta_backend=closed-form)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    p.add_argument("--loader", action="store_true",
                   help="time the DataLoader path (num_workers=0; over the split's tensors and over an item-by-item "
                        "dataset) against the in-memory path for each of --gates, batches included")
    add_task_arguments(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("train-policy", help=(train_policy.run.__doc__ or "").strip(),
                       formatter_class=HelpFormatter)
    train_policy.add_arguments(p)
    p.set_defaults(func=train_policy.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MetagateError as e:
        print(f"metagate: error: {e}", file=sys.stderr)
        return 2


__all__ = ["build_parser", "config_from_args", "main"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
