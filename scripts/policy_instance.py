"""Evidence: teacher quality varying per instance (issue 5).

Synthetic teachers (``metagate.envs.synthetic``) on a clean task: teacher 0 knows classes 0-4 and is
confidently wrong on 5-9, teacher 1 the reverse (optionally a third, uniformly mediocre one). Equal
weights average a right and a wrong teacher on every unit; a weighting that follows each unit's
features can pick the right one. Compares ``fixed`` (equal weights), ``reinforce`` (shared
per-teacher exploration noise, the default), ``reinforce`` with per-unit noise only (Yuan et al.'s
per-instance exploration) and ``reinforce --rl-mode select``; reports test accuracy, the mean
KD-internal weight on the *right* teacher of each unit, the teacher-choice gain (``diag/``) and the
share of units trained on their label alone. A control, ``label-only at random``, is ``fixed`` with a
random share of units (select's measured share, per seed) trained on their label alone: it tells
whether select gains by choosing teachers or by dropping KD on some units.

``--bank noisy-copies`` uses real teachers instead: CNNs of one architecture, each trained (early stopping on
the clean ``select`` split) on its own independently corrupted copy of the training labels, so each is wrong
where its copy was and it memorised that; the student learns from the task's labels (``--noise``).

    python scripts/policy_instance.py --task digits --seeds 0 1 2 --epochs 30 --batch-size 32
    python scripts/policy_instance.py --task digits --bank noisy-copies --teachers 3 --teacher-noise 0.4 --noise 0.4
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from policy_common import mean_std, one_thread  # noqa: E402

from metagate.data import get_task  # noqa: E402
from metagate.data.task import Split, Task, inject_noise  # noqa: E402
from metagate.diagnostics import kd_shares  # noqa: E402
from metagate.envs.synthetic import synthetic_bank  # noqa: E402
from metagate.gates.base import GateOutput, UnitView  # noqa: E402
from metagate.gates.fixed import FixedGate  # noqa: E402
from metagate.gates.policy import ReinforceGate  # noqa: E402
from metagate.teachers.bank import TeacherBank, teacher_logits  # noqa: E402
from metagate.teachers.training import train_teacher  # noqa: E402
from metagate.trainer import TrainConfig, Trainer, seed_everything  # noqa: E402


class RandomLabelOnly(FixedGate):
    """``fixed``, except that a random ``rate`` of each batch's units learn from their label alone."""

    def __init__(self, alpha: float, rate: float) -> None:
        super().__init__(alpha=alpha)
        self.rate = float(rate)

    def weights(self, view: UnitView) -> GateOutput:
        out = super().weights(view)
        drop = torch.rand(view.num_units, device=out.weights.device) < self.rate
        label_only = torch.zeros_like(out.weights[0])
        label_only[0] = 1.0
        return GateOutput(torch.where(drop.unsqueeze(1), label_only, out.weights), out.tau)


def noisy_copy_bank(task: Task, k: int, noise: float) -> TeacherBank:
    """``k`` teachers of the task's first architecture, teacher ``j`` trained on the clean training labels
    corrupted anew (symmetric, rate ``noise``, generator seed ``1000 + j``)."""
    spec = task.teacher_specs[0]
    logits, names = [], []
    for j in range(k):
        y, corrupted = inject_noise(task.clean_train_labels, task.num_classes, noise, "symmetric",
                                    torch.Generator().manual_seed(1000 + j))
        copy = dataclasses.replace(task, train=Split(task.train.x, y), corrupted=corrupted)
        model, stats = train_teacher(copy, spec, seed=j, device="cpu", progress=False)
        logits.append(teacher_logits(model, task.train.x))
        names.append(f"{spec.name}-copy{j}")
        print(f"teacher {names[-1]}: test acc {stats['test_acc']:.4f} (best epoch {stats['epoch']})", flush=True)
    return TeacherBank(torch.stack(logits, 1), names)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="digits")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--noise", type=float, default=0.0, help="symmetric label noise (teachers see clean labels)")
    p.add_argument("--alpha", type=float, default=0.5, help="label weight of every gate")
    p.add_argument("--bank", default="synthetic", choices=["synthetic", "noisy-copies"])
    p.add_argument("--teachers", type=int, default=3, help="noisy-copies: number of teachers")
    p.add_argument("--teacher-noise", type=float, default=0.4, help="noisy-copies: each copy's corruption rate")
    args = p.parse_args()
    one_thread()
    task = get_task(args.task, noise=args.noise)
    right: torch.Tensor | None = None  # synthetic: the index of the right teacher of every unit
    if args.bank == "synthetic":
        bank = synthetic_bank(task, accuracies=(0.95, 0.95), good_classes=([0, 1, 2, 3, 4], [5, 6, 7, 8, 9]),
                              adversarial=False)
        right = (task.clean_train_labels >= 5).long()
    else:
        bank = noisy_copy_bank(task, args.teachers, args.teacher_noise)
    gates = {
        "fixed": lambda: FixedGate(alpha=args.alpha),
        "reinforce (shared noise)": lambda: ReinforceGate(alpha=args.alpha),
        "reinforce (per-unit noise)": lambda: ReinforceGate(alpha=args.alpha, rl_no_shared_noise=True, rl_log_std=-1.0),
        "reinforce select": lambda: ReinforceGate(alpha=args.alpha, rl_mode="select"),
        "label-only at random": lambda: RandomLabelOnly(args.alpha, select_rate),
    }
    keys = ("acc", "right", "gain", "label_only")
    res: dict[str, dict[str, list[float]]] = {g: {k: [] for k in keys} for g in gates}
    for seed in args.seeds:
        select_rate = 0.0
        for name, make in gates.items():
            seed_everything(seed)
            tr = Trainer(task, task.make_student(), make(), bank,
                         TrainConfig(epochs=args.epochs, batch_size=args.batch_size, seed=seed, device="cpu",
                                     progress=False, eval_test_every_epoch=False))
            for _ in range(args.epochs):
                tr.run_epoch()
            w = tr.unit_weights[:, 1:]
            share = kd_shares(tr.unit_weights)
            right_w = float(share.gather(1, right.view(-1, 1)).mean()) if right is not None else float("nan")
            label_only = float((w.sum(1) <= 0).float().mean())  # units of the last epoch with no KD weight
            if name == "reinforce select":
                select_rate = label_only
            acc = tr.evaluate("test")["acc"]
            gain = tr.weight_diagnostics().get("diag/teacher_choice_gain", float("nan"))  # nan: no KD weight at all
            for k, v in zip(keys, (acc, right_w, gain, label_only)):
                res[name][k].append(v)
            print(f"seed {seed} {name:28s} test acc {acc:.4f}  weight on the right teacher {right_w:.3f}  "
                  f"teacher-choice gain {gain:+.4f}  label-only units {label_only:.3f}", flush=True)
    what = "2 teachers, each right on half of the classes" if args.bank == "synthetic" else \
        f"{args.teachers} teachers, each trained on its own copy of the labels with {args.teacher_noise} noise"
    print(f"\n{args.task} (label noise {args.noise}, alpha {args.alpha}): {what}; epochs={args.epochs} "
          f"batch={args.batch_size} seeds={args.seeds}")
    for name, r in res.items():
        print(f"{name:28s} acc {mean_std(r['acc']):>18s}   right-teacher weight {mean_std(r['right']):>18s}   "
              f"gain {mean_std(r['gain']):>18s}   label-only {mean_std(r['label_only']):>18s}")


if __name__ == "__main__":
    main()
