"""The options of the gymnasium environments over the shared student loop, declared once.

:class:`EnvConfig` holds what every env takes; :class:`TeacherWeightingEnvConfig` and
:class:`TemperatureEnvConfig` add the options of ``metagate/TeacherWeighting-v0`` and
``metagate/InstanceTemperature-v0``. An option that is also an option of the run (``teachers``, ``noise``,
...), of a task (``subset``, ``topk``, ``data_dir``: handed to the run config's ``task_options`` when set), of
the student's training (``lr``, ``batch_size``, ...) or of a gate (``alpha``, ``tau``, ``temp_min``) is that
option (:func:`metagate.options.same_as`: its help and choices come from the class
that declares it; only the env's default may differ). ``metagate train-policy``'s environment flags are
generated from these classes, and the envs take them as keywords (``gym.make(id, batch_size=16, ...)``)
or as a built config (``config=``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from metagate.data.builtin import FashionConfig
from metagate.data.g2p import G2PConfig
from metagate.errors import ConfigError
from metagate.gates.fixed import KDMixConfig
from metagate.gates.policy import ReinforceConfig
from metagate.gates.temperature.itkd import TemperatureConfig
from metagate.gates.temperature.policy import ITKD_T_MAX, ITKD_T_MIN
from metagate.gates.temperature.reversal import check_range
from metagate.options import Options, option, same_as
from metagate.run import DistillConfig
from metagate.trainer import TrainConfig

#: the env options that are options of a task (:class:`~metagate.data.TaskConfig`; handed to the run config as
#: ``task_options`` when set: an option of another task than the env's is an error there)
TASK_OPTIONS = ("data_dir", "subset", "g2p_all_words", "g2p_no_stress", "topk")
#: the env options that are options of the run's data and teachers (handed to :class:`DistillConfig`)
DATA_OPTIONS = ("teachers", "adversarial_teacher", "teacher_bank", "teacher_file", "teacher_calibration", "noise",
                "noise_type", "data_seed",
                "val_fraction", *TASK_OPTIONS, "cache_dir", "rebuild_cache", "retrain_teachers")

#: ``env_reward`` of ``metagate/TeacherWeighting-v0``: the scalar validation improvement, or the dense
#: hypergradient credit of the step's teacher weights
ENV_REWARDS = ("scalar", "hypergradient")

__all__ = ["DATA_OPTIONS", "ENV_REWARDS", "TASK_OPTIONS", "EnvConfig", "TeacherWeightingEnvConfig", "TemperatureEnvConfig", "env_config"]


@dataclass
class EnvConfig(Options):
    """Options of every env over the shared student loop (one step = one student update)."""

    # the data and teachers (loaded when the env gets a task name)
    teachers: int = same_as(DistillConfig, "teachers", 3)  # the env tasks (digits, fashion, g2p) define 3
    adversarial_teacher: bool = same_as(DistillConfig, "adversarial_teacher")
    teacher_bank: str = same_as(DistillConfig, "teacher_bank")
    teacher_file: tuple[str, ...] = same_as(DistillConfig, "teacher_file")
    teacher_calibration: str = same_as(DistillConfig, "teacher_calibration")
    noise: float = same_as(DistillConfig, "noise")
    noise_type: str = same_as(DistillConfig, "noise_type")
    data_seed: int = same_as(DistillConfig, "data_seed")
    val_fraction: float = same_as(DistillConfig, "val_fraction")
    data_dir: str | None = same_as(FashionConfig, "data_dir")
    subset: int | None = same_as(G2PConfig, "subset")
    g2p_all_words: bool = same_as(G2PConfig, "g2p_all_words")
    g2p_no_stress: bool = same_as(G2PConfig, "g2p_no_stress")
    topk: int | None = same_as(G2PConfig, "topk")
    cache_dir: str | None = same_as(DistillConfig, "cache_dir")
    rebuild_cache: bool = same_as(DistillConfig, "rebuild_cache")
    retrain_teachers: bool = same_as(DistillConfig, "retrain_teachers")
    student: str | None = same_as(DistillConfig, "student")
    # the episode and its reward
    batch_size: int = same_as(TrainConfig, "batch_size", 64)
    episode_steps: int = option(60, "student updates per episode (one short training run)")
    alpha: float = same_as(KDMixConfig, "alpha", 0.5)
    reward: str = option("loss", "the reward: improvement of the validation loss or accuracy", choices=("loss", "acc"))
    reward_scale: float = option(10.0, "reward multiplier")
    val_size: int = option(64, "size of the fixed meta subset the reward is measured on")
    reward_every: int = option(1, "validate (and reward) every this many steps and at the episode's end; the "
                                  "improvement since the last measurement is that step's reward, other steps get 0")
    # the students' optimisation (a cosine schedule over the episode by default)
    lr: float = same_as(TrainConfig, "lr")
    momentum: float = same_as(TrainConfig, "momentum")
    optimizer: str = same_as(TrainConfig, "optimizer")
    schedule: str = same_as(TrainConfig, "schedule")
    device: str = same_as(TrainConfig, "device", "cpu")
    #: the options of a plugin task (its own ``config_class``), beyond the built-in tasks' above
    plugin_task_options: dict[str, Any] = field(default_factory=dict)

    #: old keyword names still accepted by the env constructors (name -> option)
    aliases: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("episode_steps", "reward_every", "val_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.teachers < (0 if self.teacher_file else 1):
            raise ConfigError(f"--teachers must be >= 1 (or >= 0 with --teacher-file), got {self.teachers}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"--alpha must be in [0, 1], got {self.alpha}")
        if not 0.0 <= self.noise < 1.0:
            raise ConfigError(f"--noise must be in [0, 1), got {self.noise}")
        self.data_config(None)  # the data options, checked by the run's own rules
        for cls in (FashionConfig, G2PConfig):  # (a plugin's are checked by its config when its task loads)  # and the tasks' options by their tasks' rules
            cls.from_options({n: v for n, v in self.task_options().items() if n in cls.option_names()})
        if not isinstance(self.plugin_task_options, dict):
            raise ConfigError(f"plugin_task_options must be a mapping, got {self.plugin_task_options!r}")
        TrainConfig(batch_size=self.batch_size, lr=self.lr, momentum=self.momentum, optimizer=self.optimizer,
                    schedule=self.schedule, device=self.device)  # the student's options, checked once

    @property
    def kd_tau(self) -> float:
        """The KD temperature of a step whose decision gives none."""
        raise NotImplementedError

    def task_options(self) -> dict[str, Any]:
        """The task options that are set (not their unset default), a plugin task's included."""
        defaults = {f.name: f.default for f in fields(self)}
        return {**{n: getattr(self, n) for n in TASK_OPTIONS if getattr(self, n) != defaults[n]},
                **self.plugin_task_options}

    def data_config(self, task: str | None = "digits") -> DistillConfig:
        """The run config that loads this env's task and teachers (its data options, the rest defaults);
        ``None``: the data options without the task's (checked apart)."""
        run = {name: getattr(self, name) for name in DATA_OPTIONS if name not in TASK_OPTIONS}
        return DistillConfig(task=task or "digits", train=TrainConfig(device=self.device, progress=False),
                             task_options=self.task_options() if task else {}, **run)


@dataclass
class TeacherWeightingEnvConfig(EnvConfig):
    """``metagate/TeacherWeighting-v0`` (``--env weights``): per-unit teacher weights."""

    tau: float = same_as(KDMixConfig, "tau", 4.0)
    temperature: float = same_as(ReinforceConfig, "rl_temperature")
    env_reward: str = option("scalar", "the reward of a step: scalar: the scaled change of the validation loss (or "
                                       "accuracy, --reward) on the fixed meta subset; hypergradient: dense, "
                                       "--reward-scale x the first-order fall of the one-step look-ahead validation "
                                       "CE that the step's teacher weights give over equal weights, from the "
                                       "per-(unit, teacher) hypergradient credit of metagate.gates.credit (a "
                                       "--val-size meta batch per step; needs a student with a linear head: "
                                       "MLP/CNN, the seq2seq students per token; and --reward loss)",
                             choices=ENV_REWARDS)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.env_reward == "hypergradient" and self.reward != "loss":
            raise ConfigError(f"--env-reward hypergradient is a change of the validation loss; it needs --reward "
                              f"loss, got --reward {self.reward}")
        if self.env_reward == "hypergradient" and self.reward_every != 1:
            raise ConfigError(f"--env-reward hypergradient rewards every step; --reward-every {self.reward_every} "
                              "has no meaning with it (leave it at 1)")
        if not self.tau > 0:
            raise ConfigError(f"--tau must be > 0, got {self.tau}")
        if not self.temperature > 0:
            raise ConfigError(f"--temperature must be > 0, got {self.temperature}")

    @property
    def kd_tau(self) -> float:
        return self.tau


@dataclass
class TemperatureEnvConfig(EnvConfig):
    """``metagate/InstanceTemperature-v0`` (``--env temperature``): per-unit KD temperatures."""

    temp_min: float = same_as(TemperatureConfig, "temp_min", ITKD_T_MIN)
    temp_max: float = same_as(TemperatureConfig, "temp_max", ITKD_T_MAX)

    aliases: ClassVar[dict[str, str]] = {"t_min": "temp_min", "t_max": "temp_max"}

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self.temp_min, self.temp_max, ("--temp-min", "--temp-max"))

    @property
    def kd_tau(self) -> float:
        return 0.5 * (self.temp_min + self.temp_max)


def env_config(cls: type[EnvConfig], config: EnvConfig | None, options: dict[str, Any]) -> EnvConfig:
    """``config`` (an instance of ``cls``) or ``cls`` built from keyword ``options`` (not both)."""
    if config is not None:
        if options:
            raise ConfigError(f"give the env a config or options, not both (got {', '.join(sorted(options))})")
        if not isinstance(config, cls):
            raise ConfigError(f"expected a {cls.__name__}, got {type(config).__name__}")
        return config
    opts = {cls.aliases.get(k, k): v for k, v in options.items()}
    plugin = opts.pop("plugin_task_options", None) or {}  # not a flag: a plugin task's own options
    config = cls.from_options(opts, what=cls.__name__)
    return dataclasses.replace(config, plugin_task_options=plugin) if plugin else config  # type: ignore[return-value]
