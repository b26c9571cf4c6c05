"""One distillation run end to end: task -> teachers -> gate -> shared trainer -> metrics."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metagate.bank import TeacherBank, build_bank, default_cache_dir, teacher_logits
from metagate.callbacks import BaseCallback, EpochFn
from metagate.data import get_task
from metagate.data.task import Task
from metagate.driver import drive
from metagate.errors import ConfigError
from metagate.gates import Gate, GateConfig, gate_config, get_gate_class
from metagate.io import ensure_dir
from metagate.logger import Logger
from metagate.options import Options, option, option_values
from metagate.seq_bank import build_seq_bank
from metagate.teachers import load_or_train_teachers
from metagate.trainer import TrainConfig, Trainer, preserved_rng, resolve_device, seed_everything
from metagate.units import is_sequence


@dataclass
class DistillConfig(Options):
    """Everything one ``metagate distill`` run needs (from flags, a YAML file or Python; typed, validated).

    :param gate_options: the gate's options by field name, e.g. ``{"alpha": 0.1}`` (see the gate's
        ``config_class``); validated against the chosen gate when the config is built
    :param train: the student's :class:`TrainConfig` (or a mapping of its fields)
    """

    task: str = option("digits", "task: digits | fashion | g2p, an installed plugin or package.module:builder "
                       "(the flag's help lists what is installed)")
    noise: float = option(0.0, "label-noise rate injected into train, in [0, 1)")
    noise_type: str = option("symmetric", "label-noise model (g2p: symmetric per token, or word)",
                             choices=("symmetric", "pairflip", "word"))
    data_seed: int = option(0, "seed of the split and the noise")
    val_fraction: float = option(0.1, "clean validation share of train (meta + select), in (0, 1)")
    data_dir: str | None = option(None, "fashion: directory with the idx .gz files")
    subset: int | None = option(None, "g2p: number of CMUdict words, a seeded sample (unset: 8000)")
    g2p_all_words: bool = option(False, "g2p: the whole dictionary (126,052 words) instead of --subset")
    g2p_no_stress: bool = option(False, "g2p: phonemes without stress digits")
    topk: int | None = option(None, "g2p: cache teacher token logits as the k largest log-probabilities + the "
                              "remaining mass (unset: every logit, float16); k < vocabulary size")
    student: str | None = option(None, "student architecture: mlp | mlp-bn | cnn (unset: the task's default, mlp)")
    teachers: int = option(3, "number of teachers K trained by the project (0: only --teacher-file teachers)")
    teacher_file: tuple[str, ...] = option((), "a teacher whose logits come from a file, NAME=PATH or PATH (name: "
                                           "the file's stem): .npy/.npz/.pt/.safetensors, [N, C] or per-token "
                                           "[N, T, V], full or top-k, row i = training unit i or keyed by 'ids'; "
                                           "added to the bank after the trained teachers", metavar="[NAME=]PATH")
    adversarial_teacher: bool = option(False, "make the last teacher a planted adversarial one (permuted classes)")
    gate: str = option("fixed", "which gate decides W")
    gate_options: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    logdir: str | None = option(None, "run directory (unset: runs/<task>-n<noise>/<gate>-seed<seed>)")
    cache_dir: str | None = option(None, "teacher cache (unset: $METAGATE_CACHE or ~/.cache/metagate)")
    rebuild_cache: bool = option(False, "recompute cached teacher logits")
    retrain_teachers: bool = option(False, "retrain teachers even if cached")
    resume: bool = option(False, "continue the run in --logdir from its checkpoint")
    overwrite: bool = option(False, "replace an existing run in --logdir")

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.train, dict):
            self.train = TrainConfig.from_options(self.train, what="train")  # type: ignore[assignment]
        if not isinstance(self.train, TrainConfig):
            raise ConfigError(f"train must be a TrainConfig or a mapping, got {type(self.train).__name__}")
        if not isinstance(self.gate_options, dict):
            raise ConfigError(f"gate_options must be a mapping of option -> value, got {self.gate_options!r}")
        self.gate_config()  # unknown gate, unknown or ill-typed option -> ConfigError now, not mid-run
        if not 0.0 <= self.noise < 1.0:
            raise ConfigError(f"--noise must be in [0, 1), got {self.noise}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.teachers < 0:
            raise ConfigError(f"--teachers must be >= 0, got {self.teachers}")
        if self.subset is not None and self.subset < 1:
            raise ConfigError(f"--subset must be >= 1 word (an empty subset has no data), got {self.subset}")
        if self.subset is not None and self.g2p_all_words:
            raise ConfigError(f"--subset {self.subset} and --g2p-all-words exclude each other")
        if self.topk is not None and self.topk < 1:
            raise ConfigError(f"--topk must be >= 1, got {self.topk}")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite exclude each other")

    def gate_config(self) -> GateConfig:
        """The chosen gate's typed options."""
        return gate_config(self.gate, self.gate_options)

    @property
    def run_dir(self) -> Path:
        if self.logdir:
            return Path(self.logdir)
        return Path("runs") / f"{self.task}-n{self.noise:g}" / f"{self.gate}-seed{self.train.seed}"

    def hparams(self, gate: Gate) -> dict[str, Any]:
        hp: dict[str, Any] = option_values(self)
        hp.update(option_values(self.train, "train_"))
        hp.update(gate.hparams())
        return {k: ("" if v is None else ",".join(v) if isinstance(v, tuple) else v) for k, v in hp.items()}


def build_gate(name: str, options: dict[str, Any] | None = None) -> Gate:
    """Build a registered gate from its options (field names of its ``config_class``)."""
    return get_gate_class(name)(gate_config(name, options))


# the DistillConfig fields load_task reads: a cache of loaded tasks must key on all of them
TASK_FIELDS = ("task", "noise", "noise_type", "data_seed", "val_fraction", "data_dir", "subset", "g2p_all_words",
               "g2p_no_stress")


def load_task(cfg: DistillConfig) -> Task:
    extra: dict[str, Any] = {}
    if cfg.task == "g2p":
        extra["no_stress"] = cfg.g2p_no_stress
        if cfg.g2p_all_words:
            extra["subset"] = None
        elif cfg.subset is not None:
            extra["subset"] = cfg.subset
    return get_task(cfg.task, noise=cfg.noise, noise_type=cfg.noise_type, data_seed=cfg.data_seed,
                    val_fraction=cfg.val_fraction, data_dir=cfg.data_dir, **extra)


def load_teachers(cfg: DistillConfig, task: Task, progress: bool = True,
                  verbose: bool = False) -> tuple[TeacherBank, list[dict[str, float]]]:
    """Teachers of the run (trained once, cached) and their training-split logits bank."""
    cache = ensure_dir(Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir(), "--cache-dir")
    device = resolve_device(cfg.train.device)
    files = parse_teacher_files(cfg.teacher_file)
    if cfg.teachers == 0 and not files:
        raise ConfigError("--teachers 0 leaves no teacher for this gate; give --teachers K >= 1 or --teacher-file")
    modules, names, stats = (load_or_train_teachers(task, cfg.teachers, cache, cfg.adversarial_teacher,
                                                    str(device), cfg.retrain_teachers, progress, verbose)
                             if cfg.teachers else ([], [], []))
    for m, n, st in zip(modules, names, stats):
        if math.isnan(st.get("test_acc", 0.0)):
            st["test_acc"] = float((teacher_logits(m, task.test.x, device).argmax(-1) == task.test.y)
                                   .float().mean())
        st["name"] = n  # type: ignore[assignment]
    rebuild = cfg.rebuild_cache or cfg.retrain_teachers
    if is_sequence(task):
        bank: TeacherBank = build_seq_bank(task, modules, names, cache, device, rebuild, cfg.topk, files)
    else:
        if cfg.topk is not None:
            raise ConfigError(f"--topk is for sequence tasks (g2p); task {cfg.task!r} has one unit per example")
        bank = build_bank(task, modules, names, cache, device, rebuild, files)
    taken = set(names)
    for name, _ in files:
        if name in taken:
            raise ConfigError(f"--teacher-file: two teachers are named {name!r}; name it as NAME=PATH")
        taken.add(name)
        stats.append({"name": name, "kind": "file"})  # type: ignore[dict-item]
    return bank, stats


def parse_teacher_files(specs: tuple[str, ...]) -> list[tuple[str, Path]]:
    """``NAME=PATH`` or ``PATH`` (named by the file's stem) -> ``(name, path)`` pairs."""
    out = []
    for spec in specs:
        name, eq, path = spec.partition("=")
        if not eq:
            name, path = Path(spec).stem, spec
        if not name or not path:
            raise ConfigError(f"--teacher-file {spec!r}: expected NAME=PATH or PATH")
        out.append((name, Path(path)))
    return out


def run_distill(cfg: DistillConfig, gate: Gate | None = None, task: Task | None = None,
                verbose: bool = False, on_epoch_end: Callable[[Trainer, dict[str, float]], None] | None = None,
                callbacks: Sequence[BaseCallback] = ()) -> dict[str, Any]:
    """Run one distillation (through the one driver, :func:`metagate.driver.drive`); return final metrics
    (``test/acc`` ...), diagnostics and teacher stats.

    The seed is set before the gate and the student are built (a gate's policy is initialised from
    it); loading or training teachers does not move the run's random state. A ``gate`` passed in is used as
    it was built: one with random parameters reproduces only if it was built after seeding.

    :param on_epoch_end: ``fn(trainer, record)`` called after each epoch, e.g. to time epochs
    :param callbacks: epoch-end callbacks (:mod:`metagate.callbacks`) after the run's own
    """
    task = task or load_task(cfg)
    student_name = cfg.student or task.default_student
    tstats: list[dict[str, float]] = []

    def build(work: Path | None) -> Trainer:
        nonlocal gate
        seed_everything(cfg.train.seed)
        gate = gate or build_gate(cfg.gate, cfg.gate_options)
        with preserved_rng():
            bank, stats = (load_teachers(cfg, task, cfg.train.progress, verbose) if gate.uses_teachers
                           else (None, []))
        tstats.extend(stats)
        student = task.make_student(cfg.student)
        identity = {"task": task.key, "data": task.fingerprint(), "gate": gate.name, "student": student_name,
                    "teachers": ",".join(bank.names) if bank else ""}
        return Trainer(task, student, gate, bank, cfg.train, Logger(work), work, identity)

    extra = [] if on_epoch_end is None else [EpochFn(on_epoch_end)]
    early = {"task": task.key, "data": task.fingerprint(), "student": student_name} if cfg.resume else None
    done = drive(build, cfg.train, run_dir=cfg.run_dir, resume=cfg.resume, overwrite=cfg.overwrite,
                 identity=early, hparams=lambda tr: cfg.hparams(tr.gate),
                 summary=lambda metrics: {**metrics, "teachers": tstats}, callbacks=[*extra, *callbacks])
    return done.record
