"""The ``metagate`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

from metagate.errors import MetagateError
from metagate.gates import GATES
from metagate.run import DistillConfig, config_from_yaml, gate_parser
from metagate.trainer import TrainConfig

F = argparse.ArgumentDefaultsHelpFormatter

#: subcommand name -> (add_arguments, run) for commands added by other modules
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("task and data")
    g.add_argument("--task", default="digits", help="built-in task: digits | fashion")
    g.add_argument("--noise", type=float, default=0.0, help="label-noise rate injected into train")
    g.add_argument("--noise-type", default="symmetric", choices=["symmetric", "pairflip"], help="label-noise model")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the split and the noise")
    g.add_argument("--val-fraction", type=float, default=0.1, help="clean validation share of train (meta+select)")
    g.add_argument("--data-dir", default=None, help="fashion: directory with the idx .gz files")
    g.add_argument("--teachers", type=int, default=3, help="number of teachers K")
    g.add_argument("--adversarial-teacher", action="store_true",
                   help="make the last teacher a planted adversarial one (permuted classes)")
    g.add_argument("--cache-dir", default=None, help="teacher cache (default: $METAGATE_CACHE or ~/.cache/metagate)")
    g.add_argument("--rebuild-cache", action="store_true", help="recompute cached teacher logits")
    g.add_argument("--retrain-teachers", action="store_true", help="retrain teachers even if cached")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    g = p.add_argument_group("student training")
    g.add_argument("--student", default=None, help="student architecture: mlp | mlp-bn | cnn (task default: mlp)")
    g.add_argument("--epochs", type=int, default=d.epochs, help="training epochs")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="units per step")
    g.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    g.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="weight decay")
    g.add_argument("--optimizer", default=d.optimizer, choices=["sgd", "adam"], help="student optimizer")
    g.add_argument("--schedule", default=d.schedule, choices=["cosine", "constant"], help="learning-rate schedule")
    g.add_argument("--seed", type=int, default=d.seed, help="training seed")


def config_from_args(args: argparse.Namespace, gate: str | None = None, seed: int | None = None,
                     logdir: str | None = None) -> DistillConfig:
    """Build a :class:`DistillConfig` from parsed flags (a ``--config`` YAML gives the defaults)."""
    base: dict[str, Any] = config_from_yaml(args.config) if getattr(args, "config", None) else {}
    v = {k: getattr(args, k) for k in vars(args)}
    for k, val in base.items():  # YAML values apply where the flag was left at its default
        if k in v and v[k] == _defaults().get(k):
            v[k] = val
    train_keys = {f.name for f in fields(TrainConfig)}
    train = {k: v[k] for k in train_keys if k in v}
    train["device"] = v.get("device", "auto")
    train["progress"] = not v.get("no_progress", False)
    if seed is not None:
        train["seed"] = seed
    gate_name = gate or v["gate"]
    gate_keys = set(vars(gate_parser().parse_args([])))
    return DistillConfig(
        task=v["task"], noise=v["noise"], noise_type=v["noise_type"], data_seed=v["data_seed"],
        val_fraction=v["val_fraction"], data_dir=v["data_dir"], student=v["student"], teachers=v["teachers"],
        adversarial_teacher=v["adversarial_teacher"], gate=gate_name,
        gate_options={k: v[k] for k in gate_keys if k in v}, train=TrainConfig(**train),
        logdir=logdir if logdir is not None else v.get("logdir"), cache_dir=v["cache_dir"],
        rebuild_cache=v["rebuild_cache"], retrain_teachers=v["retrain_teachers"],
        resume=v.get("resume", False), overwrite=v.get("overwrite", False),
    )


_DEFAULTS: dict[str, Any] = {}


def _defaults() -> dict[str, Any]:
    if not _DEFAULTS:
        _DEFAULTS.update(vars(build_parser().parse_args(["distill"])))
    return _DEFAULTS


def cmd_distill(args: argparse.Namespace) -> int:
    from metagate.report import print_run

    cfg = config_from_args(args)
    result = run_distill_cli(cfg)
    print_run(cfg, result)
    return 0


def run_distill_cli(cfg: DistillConfig) -> dict[str, Any]:
    from metagate.run import run_distill

    return run_distill(cfg, verbose=True)


def cmd_teachers(args: argparse.Namespace) -> int:
    from metagate.report import print_teachers
    from metagate.run import load_task, load_teachers

    cfg = config_from_args(args, gate="fixed")
    task = load_task(cfg)
    _, stats = load_teachers(cfg, task, progress=cfg.train.progress, verbose=True)
    print_teachers(task, stats)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from metagate.compare import compare

    compare(args)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from metagate.bench import bench

    bench(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    import metagate.train_policy  # noqa: F401  (registers `train-policy` in COMMANDS)
    parser = argparse.ArgumentParser(prog="metagate", description="Learned gates for knowledge distillation.",
                                     formatter_class=F)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("distill", help="train a student with a gate", formatter_class=F,
                       parents=[gate_parser()], conflict_handler="resolve")
    add_data_arguments(p)
    add_train_arguments(p)
    p.add_argument("--gate", default="fixed", choices=sorted(GATES), help="which gate decides W")
    p.add_argument("--logdir", default=None, help="run directory (default: runs/<task>-n<noise>/<gate>-seed<seed>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --logdir from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --logdir")
    p.add_argument("--config", default=None, help="YAML file of options (parsed as data)")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("teachers", help="train and cache the task's teachers, print their accuracy",
                       formatter_class=F)
    add_data_arguments(p)
    p.set_defaults(func=cmd_teachers, student=None, gate="fixed", config=None, **{
        f.name: f.default for f in fields(TrainConfig) if f.name not in ("device", "progress")})

    p = sub.add_parser("compare", help="several gates x seeds; print mean ± std", formatter_class=F,
                       parents=[gate_parser()], conflict_handler="resolve")
    add_data_arguments(p)
    add_train_arguments(p)
    p.add_argument("--gates", nargs="+", default=["ce", "fixed", "hard"], help="gates to compare")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds")
    p.add_argument("--logdir", default="runs/compare", help="parent directory of the runs")
    p.add_argument("--config", default=None, help="YAML file of options (parsed as data)")
    p.set_defaults(func=cmd_compare, gate="fixed", overwrite=True, resume=False)

    p = sub.add_parser("bench", help="step-time ratios of gates vs a hand-written KD step", formatter_class=F)
    p.add_argument("--task", default="fashion", help="task whose shapes to use (digits | fashion)")
    p.add_argument("--batch-size", type=int, default=128, help="units per step")
    p.add_argument("--steps", type=int, default=50, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=30, help="interleaved repeats, order rotated (median reported)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1 gives steadier ratios on a shared CPU; 0 keeps torch's default)")
    p.add_argument("--teachers", type=int, default=3, help="number of teachers K")
    p.add_argument("--students", nargs="+", default=["mlp", "cnn"], help="student architectures")
    p.add_argument("--gates", nargs="+", default=["fixed", "hard"],
                   help="gates through the trainer: NAME or NAME:option=value,... (e.g. meta:meta_backend=closed-form)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.set_defaults(func=cmd_bench)

    for name, (add, run) in COMMANDS.items():
        doc = (run.__doc__ or "").strip().splitlines()
        sp = sub.add_parser(name, formatter_class=F, help=doc[0] if doc else None)
        add(sp)
        sp.set_defaults(func=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MetagateError as e:
        print(f"metagate: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
