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
import json
from pathlib import Path
from typing import Any

from metagate.cli_args import add_data_arguments, config_from_args
from metagate.errors import ConfigError
from metagate.policies.temperature import ITKD_T_MAX, ITKD_T_MIN

ALGOS = ("ppo", "a2c")
ENVS = ("weights", "temperature")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_data_arguments(p)
    g = p.add_argument_group("environment (one step = one student update)")
    g.add_argument("--env", default="weights", choices=list(ENVS),
                   help="weights: per-unit teacher weights (TeacherWeighting-v0); temperature: per-unit KD "
                        "temperatures (InstanceTemperature-v0)")
    # own dests: --temp-min/--temp-max are also the temperature gate's options, which this command does not take
    g.add_argument("--temp-min", dest="env_t_min", type=float, default=ITKD_T_MIN,
                   help="temperature env: lowest temperature")
    g.add_argument("--temp-max", dest="env_t_max", type=float, default=ITKD_T_MAX,
                   help="temperature env: highest temperature")
    g.add_argument("--student", default=None, help="student architecture (task default: mlp)")
    g.add_argument("--batch-size", type=int, default=64, help="units per env step (observation [B, K, F])")
    g.add_argument("--episode-steps", type=int, default=60, help="student updates per episode")
    g.add_argument("--alpha", type=float, default=0.5, help="label weight; the teachers share 1 - alpha")
    g.add_argument("--tau", type=float, default=4.0, help="KD temperature")
    g.add_argument("--temperature", type=float, default=0.25, help="softmax temperature mapping actions to weights")
    g.add_argument("--reward", default="loss", choices=["loss", "acc"], help="validation loss or accuracy improvement")
    g.add_argument("--reward-scale", type=float, default=10.0, help="reward multiplier")
    g.add_argument("--val-size", type=int, default=64, help="size of the fixed meta subset for the reward")
    g.add_argument("--reward-every", type=int, default=1, help="validate (and reward) every this many steps")
    g.add_argument("--lr", type=float, default=0.05, help="student learning rate")
    g.add_argument("--momentum", type=float, default=0.9, help="student SGD momentum")
    g = p.add_argument_group("agent")
    g.add_argument("--algo", default="ppo", choices=list(ALGOS), help="stable-baselines3 algorithm")
    g.add_argument("--timesteps", type=int, default=5000, help="total env steps (student updates)")
    g.add_argument("--n-steps", type=int, default=30, help="env steps per rollout")
    g.add_argument("--n-epochs", type=int, default=4, help="PPO: optimisation epochs per rollout")
    g.add_argument("--policy-lr", type=float, default=3e-3, help="agent learning rate")
    g.add_argument("--gamma", type=float, default=0.9, help="discount")
    g.add_argument("--gae-lambda", type=float, default=0.9, help="GAE lambda")
    g.add_argument("--hidden", type=int, default=16, help="policy encoder width")
    g.add_argument("--shared-log-std", type=float, default=-0.5,
                   help="initial log-std of the per-teacher exploration noise")
    g.add_argument("--unit-log-std", type=float, default=None,
                   help="initial log-std of per-unit exploration noise (default: off)")
    g.add_argument("--seed", type=int, default=0, help="seed of the agent and of the students' seeds")
    g.add_argument("--out", required=True, help="where to save the policy zip")
    g.add_argument("--logdir", default=None, help="TensorBoard directory (default: <out without .zip>-tb)")
    g.add_argument("--verbose", action="store_true", help="print stable-baselines3's progress table")


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
    data = config_from_args(args, gate="fixed")  # the data options, with their defaults and checks
    kind = dict(tau=args.tau, temperature=args.temperature) if getattr(args, "env", "weights") == "weights" else \
        dict(t_min=args.env_t_min, t_max=args.env_t_max)
    return dict(teachers=data.teachers, adversarial_teacher=data.adversarial_teacher, noise=data.noise,
                data_seed=data.data_seed, student=args.student, batch_size=args.batch_size,
                episode_steps=args.episode_steps, alpha=args.alpha, **kind,
                reward=args.reward, reward_scale=args.reward_scale, val_size=args.val_size, reward_every=args.reward_every, lr=args.lr,
                momentum=args.momentum, cache_dir=data.cache_dir, device="cpu")


def train_policy(args: argparse.Namespace, env: Any = None) -> Any:
    """Train and save; return the stable-baselines3 model. ``env`` overrides the one built from ``args``."""
    from stable_baselines3 import A2C, PPO
    from stable_baselines3.common.logger import configure
    from stable_baselines3.common.monitor import Monitor
    from stable_baselines3.common.vec_env import DummyVecEnv

    from metagate.envs import InstanceTemperatureEnv, TeacherWeightingEnv
    from metagate.policies.safe_zip import write_policy_meta
    from metagate.policies.sb3 import TeacherWeightingPolicy
    from metagate.policies.sb3_temperature import TemperaturePolicySB3, write_temperature_meta

    if args.timesteps < 1:
        raise ConfigError(f"--timesteps must be >= 1, got {args.timesteps}")
    if args.n_steps < 2:
        raise ConfigError(f"--n-steps must be >= 2, got {args.n_steps}")
    out = Path(args.out)
    logdir = Path(args.logdir) if args.logdir else out.with_name(out.stem + "-tb")
    temperature = getattr(args, "env", "weights") == "temperature"
    if env is None:
        env_class = InstanceTemperatureEnv if temperature else TeacherWeightingEnv
        env = env_class(args.task or "digits", **make_env_kwargs(args))
    temperature = isinstance(env, InstanceTemperatureEnv)
    vec = DummyVecEnv([lambda: Monitor(env)])
    vec.seed(args.seed)
    policy_kwargs: dict[str, Any] = dict(hidden=args.hidden, log_std_init=args.unit_log_std,
                                         shared_log_std_init=args.shared_log_std, label_alpha=env.alpha)
    if temperature:
        policy_kwargs.update(t_min=env.t_min, t_max=env.t_max)
    else:
        policy_kwargs.update(weight_temperature=env.temperature, kd_tau=env.tau)
    policy_class = TemperaturePolicySB3 if temperature else TeacherWeightingPolicy
    common = dict(learning_rate=args.policy_lr, n_steps=args.n_steps, gamma=args.gamma, gae_lambda=args.gae_lambda,
                  policy_kwargs=policy_kwargs, seed=args.seed, device="cpu", verbose=0)
    if args.algo == "ppo":
        model = PPO(policy_class, vec, batch_size=args.n_steps, n_epochs=args.n_epochs, **common)
    else:
        model = A2C(policy_class, vec, **common)
    formats = ["tensorboard", "csv"] + (["stdout"] if args.verbose else [])
    model.set_logger(configure(str(logdir), formats))
    model.learn(total_timesteps=args.timesteps, callback=TeacherWeightCallback.make())
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save(out)
    zipped = out if out.suffix else out.with_suffix(".zip")
    if temperature:
        write_temperature_meta(zipped, model.policy, args.algo)
    else:
        write_policy_meta(zipped, model.policy, args.algo)
    meta = {"algo": args.algo, "timesteps": args.timesteps, "task": getattr(env.task, "name", args.task),
            "teachers": env.num_teachers, "env": {k: v for k, v in make_env_kwargs(args).items() if k != "cache_dir"}}
    (logdir / "train_policy.json").write_text(json.dumps(meta, indent=2, default=str))
    return model


def run(args: argparse.Namespace) -> int:
    """train a teacher-weighting policy (PPO/A2C) on the gymnasium env; save a zip"""
    train_policy(args)
    out = Path(args.out)
    deploy = f"--gate temperature --temp-policy {args.out}" if args.env == "temperature" else \
        f"--gate policy --policy {args.out}"
    print(f"saved {out if out.suffix else out.with_suffix('.zip')}; deploy with `metagate distill {deploy}`")
    return 0
