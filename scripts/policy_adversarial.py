"""Evidence: a planted bad teacher (issue 5).

Task with K teachers of which the last is the permuted (adversarial) one. Trains a PPO policy on
``metagate/TeacherWeighting-v0`` (students drawn from the env's seed), then for each seed compares
the student's test accuracy of: equal-weight ``fixed`` KD, the best single teacher (chosen by its
*select* accuracy), the in-loop ``reinforce`` gate and the deployed PPO ``policy`` gate; and reports
the mean KD-internal weight each gate gave the adversarial teacher.

    METAGATE_CACHE=/tmp/mgcache OMP_NUM_THREADS=1 python scripts/policy_adversarial.py \
        --task fashion --noise 0.4 --seeds 0 1 2 3 4 --epochs 10 --timesteps 5000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from policy_common import mean_std, one_thread, run_gate, single_teacher  # noqa: E402

from metagate.cli import build_parser  # noqa: E402
from metagate.envs import TeacherWeightingEnv  # noqa: E402
from metagate.gates.fixed import FixedGate  # noqa: E402
from metagate.gates.policy import PolicyGate, ReinforceGate, load_sb3_policy  # noqa: E402
from metagate.run import DistillConfig, load_task  # noqa: E402
from metagate.teachers.build import load_teachers  # noqa: E402
from metagate.train_policy import train_policy  # noqa: E402
from metagate.trainer import TrainConfig  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="digits")
    p.add_argument("--noise", type=float, default=0.4)
    p.add_argument("--teachers", type=int, default=3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--timesteps", type=int, default=5000, help="PPO env steps")
    p.add_argument("--agent-seed", type=int, default=0, help="PPO seed (its students' seeds follow from it)")
    p.add_argument("--policy", default=None, help="reuse a trained policy zip instead of training one")
    p.add_argument("--student", default=None)
    p.add_argument("--out", default="runs/policy_adversarial")
    p.add_argument("--gates", nargs="+", default=["fixed", "single", "reinforce", "policy"])
    args = p.parse_args()
    one_thread()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = DistillConfig(task=args.task, noise=args.noise, teachers=args.teachers, adversarial_teacher=True,
                        train=TrainConfig(device="cpu", progress=False))
    task = load_task(cfg)
    bank, stats = load_teachers(cfg, task, progress=False)
    k = bank.num_teachers
    real = [j for j in range(k - 1)]
    best = max(real, key=lambda j: stats[j]["select_acc"])
    print("teachers:", [(n, round(s.get("test_acc", float("nan")), 4)) for n, s in zip(bank.names, stats)],
          "best single (by select acc):", bank.names[best], flush=True)

    policy_path = args.policy
    if "policy" in args.gates and policy_path is None:
        policy_path = str(out / f"ppo-{args.task}-agent{args.agent_seed}.zip")
        t0 = time.perf_counter()
        env = TeacherWeightingEnv(task, bank, batch_size=64, episode_steps=60)
        targs = build_parser().parse_args(["train-policy", "--task", args.task, "--algo", "ppo", "--timesteps",
                                           str(args.timesteps), "--out", policy_path, "--seed", str(args.agent_seed)])
        train_policy(targs, env=env)
        print(f"PPO: {args.timesteps} env steps in {time.perf_counter() - t0:.1f}s -> {policy_path}", flush=True)

    results: dict[str, list[dict[str, float]]] = {g: [] for g in args.gates}
    for seed in args.seeds:
        for g in args.gates:
            if g == "fixed":
                r = run_gate(task, bank, FixedGate(), seed, args.epochs, args.student)
            elif g == "single":
                r = run_gate(task, single_teacher(bank, best), FixedGate(), seed, args.epochs, args.student)
            elif g == "reinforce":
                r = run_gate(task, bank, ReinforceGate(), seed, args.epochs, args.student)
            elif g == "policy":
                r = run_gate(task, bank, PolicyGate(module=load_sb3_policy(policy_path)), seed, args.epochs, args.student)
            else:
                raise SystemExit(f"unknown gate {g}")
            results[g].append(r)
            adv = r.get(f"kd_w{k - 1}", float("nan")) if g != "single" else float("nan")
            print(f"seed {seed} {g:9s} test acc {r['test_acc']:.4f}  adv KD weight {adv:.4f}  "
                  f"teacher-choice gain {r['teacher_choice_gain']:+.4f}  ({r['seconds']:.1f}s)", flush=True)
        (out / "results.json").write_text(json.dumps({"args": vars(args), "teachers": bank.names,
                                                      "results": results}, indent=2))
    print(f"\n{args.task} noise={args.noise} K={k} (last = adversarial), epochs={args.epochs}, seeds={args.seeds}")
    print(f"{'gate':10s} {'test acc':>18s} {'adv KD weight':>18s} {'teacher-choice gain':>20s}")
    for g, rs in results.items():
        acc = mean_std([r["test_acc"] for r in rs])
        adv = mean_std([r[f"kd_w{k - 1}"] for r in rs]) if g != "single" else "-"
        gain = mean_std([r["teacher_choice_gain"] for r in rs]) if g != "single" else "-"
        print(f"{g:10s} {acc:>18s} {adv:>18s} {gain:>20s}")


if __name__ == "__main__":
    main()
