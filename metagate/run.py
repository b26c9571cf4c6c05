"""One distillation run end to end: task -> teachers -> gate -> shared trainer -> metrics."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metagate.callbacks import BaseCallback, EpochFn
from metagate.data import TaskConfig, get_task, task_config
from metagate.data.task import Task
from metagate.driver import drive
from metagate.errors import ConfigError
from metagate.gates import Gate, GateConfig, gate_config, get_gate_class
from metagate.logger import Logger
from metagate.options import Options, option, option_values
from metagate.teachers.build import calibrated_bank, load_teachers
from metagate.trainer import TrainConfig, Trainer, preserved_rng, seed_everything


@dataclass
class DistillConfig(Options):
    """Everything one ``metagate distill`` run needs (from flags, a YAML file or Python; typed, validated).

    :param task_options: the task's own options by field name, e.g. ``{"subset": 300}`` for g2p (see the
        task's :class:`~metagate.data.TaskConfig`); validated against the chosen task when the config is built
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
    task_options: dict[str, Any] = field(default_factory=dict)
    student: str | None = option(None, "student architecture: mlp | mlp-bn | cnn (unset: the task's default, mlp)")
    teachers: int | None = option(None, "number of teachers K trained by the project (0: only --teacher-file "
                                  "teachers; unset: the task config's default_teachers)", shown="the task's, 3; lm: 2")
    teacher_file: tuple[str, ...] = option((), "a teacher whose logits come from a file, NAME=PATH or PATH (name: "
                                           "the file's stem): .npy/.npz/.pt/.safetensors, [N, C] or per-token "
                                           "[N, T, V], full or top-k, row i = training unit i or keyed by 'ids'; "
                                           "added to the bank after the trained teachers", metavar="[NAME=]PATH")
    adversarial_teacher: bool = option(False, "make the last teacher a planted adversarial one (permuted classes)")
    teacher_bank: str = option("default", "which --teachers K teachers the project trains: the task's own (default), "
                               "memoriser (one fits the noisy labels, K-1 early-stopped), specialist (teacher k "
                               "trained on class part k) or capacity (a widened copy of the first teacher that fits, "
                               "K-2 of the task's, one of the student's size); see metagate.teachers.banks",
                               choices=("default", "memoriser", "specialist", "capacity"))
    teacher_calibration: str = option("none", "temperature: the gate reads calibrated teachers, each teacher's logits "
                                      "divided by the temperature fitted by NLL on the clean meta split (Guo et al. "
                                      "2017); the hard gate asks for them itself unless --hard-tau is a number",
                                      choices=("none", "temperature"))
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
        if not isinstance(self.task_options, dict):
            raise ConfigError(f"task_options must be a mapping of option -> value, got {self.task_options!r}")
        self.task_options = {k.replace("-", "_"): v for k, v in self.task_options.items()}
        task_cfg = self.task_config()  # unknown task, an option of another task, ill-typed -> ConfigError now
        if self.teachers is None:  # unset: as many teachers as the task defines by default
            self.teachers = task_cfg.default_teachers
        if not 0.0 <= self.noise < 1.0:
            raise ConfigError(f"--noise must be in [0, 1), got {self.noise}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.teachers < 0:
            raise ConfigError(f"--teachers must be >= 0, got {self.teachers}")
        if self.teacher_bank != "default" and self.adversarial_teacher:
            raise ConfigError(f"--teacher-bank {self.teacher_bank} has no planted teacher; drop --adversarial-teacher")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite exclude each other")

    def gate_config(self) -> GateConfig:
        """The chosen gate's typed options."""
        return gate_config(self.gate, self.gate_options)

    def task_config(self) -> TaskConfig:
        """The chosen task's typed options."""
        return task_config(self.task, self.task_options)

    @property
    def topk(self) -> int | None:
        """The teacher bank's top-k compression: the task's ``topk`` option (``None`` when it has none)."""
        return getattr(self.task_config(), "topk", None)

    @property
    def run_dir(self) -> Path:
        if self.logdir:
            return Path(self.logdir)
        return Path("runs") / f"{self.task}-n{self.noise:g}" / f"{self.gate}-seed{self.train.seed}"

    def hparams(self, gate: Gate) -> dict[str, Any]:
        hp: dict[str, Any] = option_values(self)
        hp.update(option_values(self.task_config()))
        hp.update(option_values(self.train, "train_"))
        hp.update(gate.hparams())
        return {k: ("" if v is None else ",".join(v) if isinstance(v, tuple) else v) for k, v in hp.items()}


def wants_calibrated_teachers(cfg: DistillConfig, gate: Gate) -> bool:
    """``--teacher-calibration temperature``, or a gate that asks for calibrated teachers itself
    (``gate.teacher_calibration == "temperature"``: ``hard`` unless ``--hard-tau`` is a number)."""
    return cfg.teacher_calibration == "temperature" or gate.teacher_calibration == "temperature"


def run_hparams(cfg: DistillConfig, trainer: Trainer) -> dict[str, Any]:
    """The run's HPARAMS: its options, the gate's resolved values and the teachers' fitted temperatures."""
    hp = cfg.hparams(trainer.gate)
    cal = trainer.bank.calibration if trainer.bank is not None else None
    if cal is not None:  # per teacher also in the teacher stats and as teachers/* scalars (callbacks.log_final)
        hp.update({f"teacher_tau{k}": t for k, t in enumerate(cal.taus)})
        hp["teacher_ensemble_tau"] = cal.ensemble_tau
    return hp


def build_gate(name: str, options: dict[str, Any] | None = None) -> Gate:
    """Build a registered gate from its options (field names of its ``config_class``)."""
    return get_gate_class(name)(gate_config(name, options))


# the DistillConfig fields load_task reads: a cache of loaded tasks must key on all of them (task_key)
TASK_FIELDS = ("task", "noise", "noise_type", "data_seed", "val_fraction", "task_options")


#: DistillConfig fields that became task options (``task_options``): read from configs saved before
LEGACY_TASK_FIELDS = ("data_dir", "subset", "g2p_all_words", "g2p_no_stress", "topk")


def upgrade_saved_config(saved: dict[str, Any]) -> dict[str, Any]:
    """A config saved as ``asdict(DistillConfig)`` before the task options moved into ``task_options``, in
    today's form: the old flat fields that were set go to ``task_options``, the unset ones are dropped."""
    out = dict(saved)
    moved = {k: out.pop(k) for k in LEGACY_TASK_FIELDS if k in out}
    if moved:
        out["task_options"] = {**{k: v for k, v in moved.items() if v not in (None, False)},
                               **(out.get("task_options") or {})}
    return out


def task_key(cfg: DistillConfig) -> tuple[tuple[str, Any], ...]:
    """The options that shape the loaded task, hashable (``task_options`` as sorted pairs)."""
    return tuple((f, tuple(sorted(cfg.task_options.items())) if f == "task_options" else getattr(cfg, f))
                 for f in TASK_FIELDS)


def load_task(cfg: DistillConfig) -> Task:
    """The run's task, built from the shared data options and the task's own (:meth:`DistillConfig.task_config`),
    then checked against them (e.g. g2p's ``--topk`` against its vocabulary) before any teacher work."""
    options = cfg.task_config()
    task = get_task(cfg.task, noise=cfg.noise, noise_type=cfg.noise_type, data_seed=cfg.data_seed,
                    val_fraction=cfg.val_fraction, **options.builder_kwargs())
    options.check_task(task)
    return task


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
        if bank is not None and wants_calibrated_teachers(cfg, gate):
            bank = calibrated_bank(bank)
        student = task.make_student(cfg.student)
        identity = {"task": task.key, "data": task.fingerprint(), "gate": gate.name, "student": student_name,
                    "teachers": ",".join(bank.names) if bank else ""}
        return Trainer(task, student, gate, bank, cfg.train, Logger(work), work, identity)

    extra = [] if on_epoch_end is None else [EpochFn(on_epoch_end)]
    early = {"task": task.key, "data": task.fingerprint(), "student": student_name} if cfg.resume else None
    done = drive(build, cfg.train, run_dir=cfg.run_dir, resume=cfg.resume, overwrite=cfg.overwrite,
                 identity=early, hparams=lambda tr: run_hparams(cfg, tr),
                 summary=lambda metrics: {**metrics, "teachers": tstats}, callbacks=[*extra, *callbacks])
    return done.record
