"""``metagate train-policy``: train a teacher-weighting policy with PPO or A2C on
``metagate/TeacherWeighting-v0`` and save it as a stable-baselines3 zip that
``metagate distill --gate policy --policy PATH`` deploys; with ``--env temperature`` a per-unit temperature
policy on ``metagate/InstanceTemperature-v0`` that ``--gate temperature --temp-policy PATH`` deploys.

TensorBoard (``--logdir``) receives stable-baselines3's scalars (``rollout/``, ``train/``) plus, per
rollout, histograms and means of the chosen KD-internal weight of every teacher
(``weights/teacher{j}``, ``weights/mean_teacher{j}``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metagate.cli_args import add_data_arguments, config_from_args, set_help
from metagate.envs.config import DATA_OPTIONS, TASK_OPTIONS, EnvConfig, TeacherWeightingEnvConfig, TemperatureEnvConfig
from metagate.errors import ConfigError
from metagate.options import Options, add_options, option, option_values, set_options

ALGOS = ("ppo", "a2c")
#: ``--env`` -> the env's config class
ENV_CONFIGS: dict[str, type[EnvConfig]] = {"weights": TeacherWeightingEnvConfig, "temperature": TemperatureEnvConfig}
ENVS = tuple(ENV_CONFIGS)
#: env options that are data options (``add_data_arguments`` adds their flags; their values come from
#: :func:`config_from_args`, with the run's defaults and checks)
DATA_FIELDS = (*DATA_OPTIONS, "device")


@dataclass
class AgentConfig(Options):
    """The stable-baselines3 agent (PPO or A2C) and its policy network."""

    algo: str = option("ppo", "stable-baselines3 algorithm", choices=ALGOS)
    timesteps: int = option(5000, "total env steps (student updates)")
    n_steps: int = option(30, "env steps per rollout (>= 2)")
    n_epochs: int = option(4, "PPO: optimisation epochs per rollout")
    policy_lr: float = option(3e-3, "agent learning rate")
    gamma: float = option(0.9, "discount")
    gae_lambda: float = option(0.9, "GAE lambda")
    hidden: int = option(16, "policy encoder width")
    shared_log_std: float = option(-0.5, "initial log-std of the exploration noise shared by a batch's units")
    unit_log_std: float | None = option(None, "initial log-std of per-unit exploration noise (unset: off)")
    seed: int = option(0, "seed of the agent and of the students' seeds")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.timesteps < 1:
            raise ConfigError(f"--timesteps must be >= 1, got {self.timesteps}")
        if self.n_steps < 2:
            raise ConfigError(f"--n-steps must be >= 2, got {self.n_steps}")
        if self.n_epochs < 1 or self.hidden < 1:
            raise ConfigError("--n-epochs and --hidden must be >= 1")
        if not self.policy_lr > 0:
            raise ConfigError(f"--policy-lr must be > 0, got {self.policy_lr}")
        if not (0.0 <= self.gamma <= 1.0 and 0.0 <= self.gae_lambda <= 1.0):
            raise ConfigError("--gamma and --gae-lambda must be in [0, 1]")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_data_arguments(p)
    set_help(p, "device", "device of the students (default: 'cpu')")
    g = p.add_argument_group("environment (one step = one student update)")
    g.add_argument("--env", default="weights", choices=list(ENVS),
                   help="weights: per-unit teacher weights (TeacherWeighting-v0); temperature: per-unit KD "
                        "temperatures (InstanceTemperature-v0)")
    done = set(DATA_FIELDS)
    add_options(g, EnvConfig, done=done)
    for name, cls in ENV_CONFIGS.items():
        add_options(p.add_argument_group(f"--env {name}: {(cls.__doc__ or '').strip().splitlines()[0]}"), cls,
                    done=done)
    add_options(p.add_argument_group("agent"), AgentConfig)
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="the policy zip to write (.zip appended to a name without a suffix): "
                                                "a new file, or a policy zip train-policy wrote, replaced")
    g.add_argument("--logdir", default=None, help="TensorBoard directory (default: <out without .zip>-tb)")
    g.add_argument("--verbose", action="store_true", help="print stable-baselines3's progress table")


def env_config_from_args(args: argparse.Namespace) -> EnvConfig:
    """The config of ``--env``'s environment from the flags (data options with the run's defaults and checks);
    a flag of the other env is a :class:`ConfigError`."""
    kind = getattr(args, "env", "weights")
    cls = ENV_CONFIGS[kind]
    given = set_options(args, EnvConfig)
    for other, other_cls in ENV_CONFIGS.items():
        foreign = sorted(set(set_options(args, other_cls)) - cls.option_names())
        if other != kind and foreign:
            raise ConfigError(f"{', '.join('--' + n.replace('_', '-') for n in foreign)}: an option of --env {other}, "
                              f"not of --env {kind}")
    given.update(set_options(args, cls))
    data = config_from_args(args, gate="fixed", strict=False)  # the data options, with their defaults and checks
    given.update({n: getattr(data, n) for n in DATA_FIELDS if n not in ("device", *TASK_OPTIONS)})
    given.update({n: v for n, v in data.task_options.items() if n in TASK_OPTIONS})
    if getattr(args, "device", None) is not None:
        given["device"] = args.device
    plugin = {n: v for n, v in data.task_options.items() if n not in TASK_OPTIONS}  # a plugin task's own
    return dataclasses.replace(cls.from_options(given), plugin_task_options=plugin)  # type: ignore[return-value]


#: the JSON entries that mark a zip as a policy written by ``metagate train-policy`` (teacher weights, temperatures)
POLICY_MARKS = ("metagate-policy.json", "metagate-temperature-policy.json")


def policy_out(out: str | Path) -> Path:
    """The zip ``--out`` names, checked before any training: ``.zip`` appended to a name without a suffix; a new
    file, or a policy zip an earlier ``train-policy`` wrote (replaced when the new one is saved). Refused: an
    existing directory, any other existing file, another suffix, a path under a file.

    :raises ConfigError: naming the path and the reason; nothing is written
    """
    p = Path(out)
    if p.is_dir():
        raise ConfigError(f"--out {out} is an existing directory; give the zip's file name, e.g. --out {p / 'policy.zip'}")
    if p.suffix not in ("", ".zip"):
        raise ConfigError(f"--out {out}: a policy is a .zip file; give a name ending in .zip (or without a suffix: "
                          ".zip is appended)")
    zipped = p if p.suffix else p.with_name(p.name + ".zip")
    if zipped.is_dir():
        raise ConfigError(f"--out {out}: {zipped} is an existing directory; give another file name")
    if zipped.exists() or zipped.is_symlink():
        if not zipped.is_file() or zipped.is_symlink():
            raise ConfigError(f"--out {out}: {zipped} exists and is not a regular file; refused")
        if not _is_policy_zip(zipped):
            raise ConfigError(f"--out {out}: {zipped} exists and is not a policy zip written by metagate "
                              "train-policy; refused, nothing written (give a new file name)")
    for parent in zipped.parents:  # the nearest existing ancestor must be a directory
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"--out {out}: {parent} is a file, not a directory")
            break
    return zipped


def _is_policy_zip(path: Path) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            return any(n in zf.namelist() for n in POLICY_MARKS)
    except (OSError, zipfile.BadZipFile):
        return False


def agent_config_from_args(args: argparse.Namespace) -> AgentConfig:
    return AgentConfig.from_options(set_options(args, AgentConfig))  # type: ignore[return-value]


class TeacherWeightCallback:
    """Factory for a stable-baselines3 callback logging histograms of the chosen teacher weights."""

    @staticmethod
    def make() -> Any:
        import numpy as np
        from stable_baselines3.common.callbacks import BaseCallback

        class _Callback(BaseCallback):
            def __init__(self) -> None:
                super().__init__()
                self._buf: list[Any] = []

                self._tau: list[Any] = []

            def _on_step(self) -> bool:
                for info in self.locals.get("infos", []):
                    w = info.get("teacher_weights")
                    if w is not None:
                        self._buf.append(w)
                    t = info.get("temperatures")
                    if t is not None:
                        self._tau.append(t)
                return True

            def _on_rollout_end(self) -> None:
                if self._tau:
                    t = np.concatenate(self._tau)
                    self._tau.clear()
                    self.logger.record("temperature/tau", t, exclude=("stdout", "log", "json", "csv"))
                    self.logger.record("temperature/mean", float(t.mean()))
                if not self._buf:
                    return
                w = np.concatenate(self._buf, 0)
                self._buf.clear()
                for j in range(w.shape[1]):
                    self.logger.record(f"weights/teacher{j}", w[:, j].copy(), exclude=("stdout", "log", "json", "csv"))
                    self.logger.record(f"weights/mean_teacher{j}", float(w[:, j].mean()))

        return _Callback()


def make_env_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The env's options from the flags, as keywords of the env (``gym.make(id, **kwargs)``)."""
    config = env_config_from_args(args)
    kwargs = option_values(config)
    if config.plugin_task_options:
        kwargs["plugin_task_options"] = config.plugin_task_options
    return kwargs


def train_policy(args: argparse.Namespace, env: Any = None) -> Any:
    """Train and save; return the stable-baselines3 model. ``env`` overrides the one built from ``args``."""
    from stable_baselines3 import A2C, PPO
    from stable_baselines3.common.logger import configure
    from stable_baselines3.common.monitor import Monitor
    from stable_baselines3.common.vec_env import DummyVecEnv

    from metagate.envs import InstanceTemperatureEnv, TeacherWeightingEnv
    from metagate.gates.temperature.sb3 import TemperaturePolicySB3, write_temperature_meta
    from metagate.policies.safe_zip import write_policy_meta
    from metagate.policies.sb3 import TeacherWeightingPolicy

    agent = agent_config_from_args(args)
    zipped = policy_out(args.out)  # before any training: a refused --out costs nothing
    logdir = Path(args.logdir) if args.logdir else zipped.with_name(zipped.stem + "-tb")
    if env is None:
        config = env_config_from_args(args)
        env_class = InstanceTemperatureEnv if isinstance(config, TemperatureEnvConfig) else TeacherWeightingEnv
        env = env_class(args.task or "digits", config=config)
    temperature = isinstance(env, InstanceTemperatureEnv)
    vec = DummyVecEnv([lambda: Monitor(env)])
    vec.seed(agent.seed)
    policy_kwargs: dict[str, Any] = dict(hidden=agent.hidden, log_std_init=agent.unit_log_std,
                                         shared_log_std_init=agent.shared_log_std, label_alpha=env.alpha)
    if temperature:
        policy_kwargs.update(t_min=env.t_min, t_max=env.t_max)
    else:
        policy_kwargs.update(weight_temperature=env.temperature, kd_tau=env.tau)
    policy_class = TemperaturePolicySB3 if temperature else TeacherWeightingPolicy
    common = dict(learning_rate=agent.policy_lr, n_steps=agent.n_steps, gamma=agent.gamma,
                  gae_lambda=agent.gae_lambda, policy_kwargs=policy_kwargs, seed=agent.seed, device="cpu", verbose=0)
    if agent.algo == "ppo":
        model = PPO(policy_class, vec, batch_size=agent.n_steps, n_epochs=agent.n_epochs, **common)
    else:
        model = A2C(policy_class, vec, **common)
    formats = ["tensorboard", "csv"] + (["stdout"] if args.verbose else [])
    model.set_logger(configure(str(logdir), formats))
    model.learn(total_timesteps=agent.timesteps, callback=TeacherWeightCallback.make())
    try:
        zipped.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {args.out}: cannot create {zipped.parent}: {e}") from e
    policy_out(args.out)  # checked again: the path may have changed while training
    tmp = zipped.with_name(f".{zipped.stem}.{os.getpid()}.tmp.zip")
    try:
        model.save(tmp)
        if temperature:
            write_temperature_meta(tmp, model.policy, agent.algo)
        else:
            write_policy_meta(tmp, model.policy, agent.algo)
        os.replace(tmp, zipped)  # a complete zip, or the old one: never half of one
    finally:
        tmp.unlink(missing_ok=True)
    env_options = option_values(env.config) if isinstance(getattr(env, "config", None), EnvConfig) else {}
    meta = {"algo": agent.algo, "timesteps": agent.timesteps, "task": getattr(env.task, "name", args.task),
            "teachers": env.num_teachers, "agent": option_values(agent),
            "env": {k: v for k, v in env_options.items() if k != "cache_dir"}}
    (logdir / "train_policy.json").write_text(json.dumps(meta, indent=2, default=str))
    return model


def run(args: argparse.Namespace) -> int:
    """train a teacher-weighting policy (PPO/A2C) on the gymnasium env; save a zip"""
    train_policy(args)
    zipped = policy_out(args.out)
    deploy = f"--gate temperature --temp-policy {zipped}" if args.env == "temperature" else \
        f"--gate policy --policy {zipped}"
    print(f"saved {zipped}; deploy with `metagate distill {deploy}`")
    return 0
