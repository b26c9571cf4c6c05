"""One distillation run end to end: task -> teachers -> gate -> shared trainer -> metrics."""

from __future__ import annotations

import argparse
import json
import math
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from metagate.bank import TeacherBank, build_bank, default_cache_dir, teacher_logits
from metagate.data import get_task
from metagate.data.task import Task
from metagate.errors import ConfigError
from metagate.gates import GATES, Gate, get_gate_class
from metagate.logger import Logger
from metagate.teachers import load_or_train_teachers
from metagate.trainer import TrainConfig, Trainer, resolve_device, seed_everything


@dataclass
class DistillConfig:
    """Everything one ``metagate distill`` run needs (parsed from flags or a YAML file, as data).

    :param gate_options: gate-specific options by their flag name without dashes, e.g. ``{"alpha": 0.1}``
    """

    task: str = "digits"
    noise: float = 0.0
    noise_type: str = "symmetric"
    data_seed: int = 0
    val_fraction: float = 0.1
    data_dir: str | None = None
    student: str | None = None
    teachers: int = 3
    adversarial_teacher: bool = False
    gate: str = "fixed"
    gate_options: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    logdir: str | None = None
    cache_dir: str | None = None
    rebuild_cache: bool = False
    retrain_teachers: bool = False
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.train, dict):
            self.train = TrainConfig(**self.train)
        get_gate_class(self.gate)  # unknown gate -> ConfigError
        if self.teachers < 0:
            raise ConfigError(f"--teachers must be >= 0, got {self.teachers}")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite exclude each other")

    @property
    def run_dir(self) -> Path:
        if self.logdir:
            return Path(self.logdir)
        return Path("runs") / f"{self.task}-n{self.noise:g}" / f"{self.gate}-seed{self.train.seed}"

    def hparams(self, gate: Gate) -> dict[str, Any]:
        hp: dict[str, Any] = {k: v for k, v in asdict(self).items() if k not in ("train", "gate_options")}
        hp.update({f"train_{k}": v for k, v in asdict(self.train).items()})
        hp.update(gate.hparams())
        return {k: ("" if v is None else v) for k, v in hp.items()}


def gate_parser() -> argparse.ArgumentParser:
    """A parser holding every registered gate's options (for defaults and the CLI)."""
    p = argparse.ArgumentParser(add_help=False)
    for cls in {id(c): c for c in GATES.values()}.values():
        cls.add_arguments(p)
    return p


def build_gate(name: str, options: dict[str, Any] | None = None) -> Gate:
    """Build a registered gate; ``options`` override its command-line defaults."""
    cls = get_gate_class(name)
    ns = gate_parser().parse_args([])
    for k, v in (options or {}).items():
        key = k.replace("-", "_")
        if not hasattr(ns, key):
            raise ConfigError(f"unknown gate option {k!r} for gate {name!r}")
        setattr(ns, key, v)
    return cls.from_args(ns)


def load_task(cfg: DistillConfig) -> Task:
    return get_task(cfg.task, noise=cfg.noise, noise_type=cfg.noise_type, data_seed=cfg.data_seed,
                    val_fraction=cfg.val_fraction, data_dir=cfg.data_dir)


def load_teachers(cfg: DistillConfig, task: Task, progress: bool = True,
                  verbose: bool = False) -> tuple[TeacherBank, list[dict[str, float]]]:
    """Teachers of the run (trained once, cached) and their training-split logits bank."""
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    device = resolve_device(cfg.train.device)
    modules, names, stats = load_or_train_teachers(task, cfg.teachers, cache, cfg.adversarial_teacher,
                                                   str(device), cfg.retrain_teachers, progress, verbose)
    for m, n, st in zip(modules, names, stats):
        if math.isnan(st.get("test_acc", 0.0)):
            st["test_acc"] = float((teacher_logits(m, task.test.x, device).argmax(-1) == task.test.y)
                                   .float().mean())
        st["name"] = n  # type: ignore[assignment]
    bank = build_bank(task, modules, names, cache, device, cfg.rebuild_cache or cfg.retrain_teachers)
    return bank, stats


def run_distill(cfg: DistillConfig, gate: Gate | None = None, task: Task | None = None,
                verbose: bool = False) -> dict[str, Any]:
    """Run one distillation; return final metrics (``test/acc`` ...), diagnostics and teacher stats."""
    task = task or load_task(cfg)
    gate = gate or build_gate(cfg.gate, cfg.gate_options)
    bank, tstats = (load_teachers(cfg, task, cfg.train.progress, verbose) if gate.uses_teachers
                    else (None, []))
    run_dir = cfg.run_dir
    ckpt = run_dir / "checkpoint.pt"
    if ckpt.exists() and not (cfg.resume or cfg.overwrite):
        raise ConfigError(f"run directory {run_dir} already holds a checkpoint; pass --resume to continue it, "
                          "--overwrite to replace it, or another --logdir")
    if cfg.resume and not ckpt.exists():
        raise ConfigError(f"--resume: no checkpoint at {ckpt}")
    if cfg.overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    seed_everything(cfg.train.seed)
    student = task.make_student(cfg.student)
    identity = {"task": task.key, "data": task.fingerprint(), "gate": gate.name, "student": cfg.student or
                task.default_student, "teachers": ",".join(bank.names) if bank else ""}
    trainer = Trainer(task, student, gate, bank, cfg.train, Logger(run_dir), run_dir, identity)
    if cfg.resume:
        trainer.load_checkpoint(ckpt)
    try:
        metrics = trainer.fit()
        trainer.log_final(metrics, cfg.hparams(gate))
    finally:
        trainer.logger.close()
    result: dict[str, Any] = dict(metrics)
    result["teachers"] = tstats
    (run_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    return result


def config_from_yaml(path: str | Path) -> dict[str, Any]:
    """Parse a YAML config as data (``yaml.safe_load``); never executes anything."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of option -> value")
    known = {f.name for f in fields(DistillConfig)} | {f.name for f in fields(TrainConfig)}
    unknown = [k for k in data if k.replace("-", "_") not in known and k not in ("gate_options",)]
    if unknown:
        raise ConfigError(f"config {path}: unknown option(s) {unknown}")
    return {k.replace("-", "_"): v for k, v in data.items()}
