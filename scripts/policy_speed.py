"""Speed of the policy machinery, measured in one process (issue 5 targets):

* env step / trainer step -- ``TeacherWeightingEnv.step`` (student update + reward + next observation)
  vs the shared trainer's ``train_step`` with the fixed gate, same batch size (target <= 1.5x);
* reinforce step / fixed step -- ``train_step`` with the in-loop REINFORCE gate vs the fixed gate
  (target <= 1.15x);
* deployed step / fixed step -- ``train_step`` with a policy deployed as the gate (``--gate policy``,
  mean action, no learning): the cost of acting alone (unit features, the policy's forward, the
  weights), a floor under any in-loop policy gate's step.

Interleaved repeats; the median per-step time is reported.

    METAGATE_CACHE=/tmp/mgcache python scripts/policy_speed.py --task fashion --noise 0.4
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import numpy as np
import torch

from metagate.bench import interleaved_medians, time_steps
from metagate.envs import TeacherWeightingEnv
from metagate.gates.fixed import FixedGate
from metagate.gates.policy import PolicyGate, ReinforceGate
from metagate.policies import ReinforcePolicy
from metagate.run import DistillConfig, load_task
from metagate.teachers.build import load_teachers
from metagate.trainer import TrainConfig, Trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="digits")
    p.add_argument("--noise", type=float, default=0.4)
    p.add_argument("--teachers", type=int, default=3)
    p.add_argument("--student", default=None)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--episode", type=int, default=5, help="reinforce: steps per episode (--rl-episode)")
    p.add_argument("--update-units", type=int, default=None, help="reinforce: --rl-update-units (default all)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = DistillConfig(task=args.task, noise=args.noise, teachers=args.teachers, adversarial_teacher=True,
                        train=TrainConfig(device="cpu", progress=False))
    task = load_task(cfg)
    bank, _ = load_teachers(cfg, task, progress=False)
    bs = args.batch_size

    def trainer(gate):
        torch.manual_seed(0)
        return Trainer(task, task.make_student(args.student), gate, bank,
                       TrainConfig(epochs=50, batch_size=bs, device="cpu", progress=False))

    fixed = trainer(FixedGate())
    rl = trainer(ReinforceGate(rl_episode=args.episode, rl_update_units=args.update_units))
    deployed = trainer(PolicyGate(module=ReinforcePolicy()))  # acting cost does not depend on the weights
    batches = [b for b in fixed.epoch_batches(0) if len(b) == bs][: args.steps]
    env = TeacherWeightingEnv(task, bank, batch_size=bs, episode_steps=10**9, student=args.student)
    env.reset(seed=0)
    action = np.zeros(env.action_space.shape, np.float32)

    def time_env():
        t0 = time.perf_counter()
        for _ in batches:
            env.step(action)
        return (time.perf_counter() - t0) / len(batches)

    cpu = torch.device("cpu")
    runs = {name: partial(time_steps, tr.train_step, batches, cpu)
            for name, tr in (("fixed", fixed), ("reinforce", rl), ("deployed", deployed))}
    runs["env"] = time_env
    for run in runs.values():  # warm-up
        run()
    med = interleaved_medians(runs, args.repeats)
    print(f"{args.task} student={args.student or task.default_student} B={bs} K={bank.num_teachers} "
          f"threads={args.threads} steps={len(batches)} repeats={args.repeats} "
          f"episode={args.episode} update_units={args.update_units or 'all'}")
    for k, v in med.items():
        print(f"  {k:10s} {1e3 * v:8.3f} ms/step")
    print(f"  env step / trainer step      {med['env'] / med['fixed']:.3f}x  (target <= 1.5)")
    print(f"  reinforce step / fixed step  {med['reinforce'] / med['fixed']:.3f}x  (target <= 1.15)")
    print(f"  deployed step / fixed step   {med['deployed'] / med['fixed']:.3f}x  (acting alone: the floor)")


if __name__ == "__main__":
    main()
