"""Distil teachers that are not torch models into a small torch student, through the Python API.

A random forest and a gradient-boosting classifier (scikit-learn) are trained on a noisy copy of a tabular
dataset that ships with scikit-learn (wine, or breast cancer); their ``predict_proba`` log-probabilities for
the training units are saved to ``.npy`` files -- the teachers the student sees are those files. The
probabilities of the training units are *out of fold* (``cross_val_predict``): a forest's in-sample
probabilities would repeat the noisy labels it memorised. Then ``metagate.compare_gates`` trains a small MLP
with ``ce`` (no teachers) and the ``fixed``, ``hard``, ``meta`` and ``reinforce`` gates over three seeds.

    .venv/bin/python examples/tabular_forest_teacher.py                 # wine, 30% label noise
    .venv/bin/python examples/tabular_forest_teacher.py --dataset breast_cancer --noise 0.2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer, load_wine
from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
from sklearn.model_selection import cross_val_predict, train_test_split
from torch import nn

import metagate
from metagate.report import comparison_table

#: a class probability of 0 has no log: teachers' probabilities are floored here and renormalised
PROB_FLOOR = 1e-3


def load(name: str) -> tuple[np.ndarray, np.ndarray]:
    d = {"wine": load_wine, "breast_cancer": load_breast_cancer}[name]()
    return d.data.astype(np.float64), d.target.astype(np.int64)


def log_probs(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, PROB_FLOOR, 1.0)
    return np.log(p / p.sum(1, keepdims=True)).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="wine", choices=("wine", "breast_cancer"))
    ap.add_argument("--noise", type=float, default=0.3, help="symmetric label noise in train (default 0.3)")
    ap.add_argument("--gates", nargs="+", default=["ce", "fixed", "hard", "meta", "reinforce"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--out", default="runs/examples/tabular", help="where the teacher files go")
    args = ap.parse_args()
    torch.set_num_threads(1)  # a tiny model: more threads only cost

    x, y = load(args.dataset)
    c = int(y.max()) + 1
    rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=0.3, stratify=y, random_state=0)
    x_train, x_val, y_train, y_val = train_test_split(rest, y_rest, test_size=0.2, stratify=y_rest, random_state=0)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-8
    x_train, x_val, x_test = ((a - mean) / std for a in (x_train, x_val, x_test))
    # symmetric noise in the training labels only (val and test stay clean)
    rng = np.random.default_rng(0)
    corrupted = rng.random(len(y_train)) < args.noise
    noisy = y_train.copy()
    noisy[corrupted] = (y_train[corrupted] + rng.integers(1, c, corrupted.sum())) % c

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teachers = {}
    for name, model in (("forest", RandomForestClassifier(300, random_state=0)),
                        ("boosting", GradientBoostingClassifier(random_state=0))):
        oof = cross_val_predict(model, x_train, noisy, cv=5, method="predict_proba")
        path = out / f"{args.dataset}-{name}.npy"
        np.save(path, log_probs(oof))
        acc = (model.fit(x_train, noisy).predict(x_test) == y_test).mean()
        print(f"teacher {name:>8}: test acc {100 * acc:.2f}   ({path})")
        teachers[name] = path

    def student() -> nn.Module:
        return nn.Sequential(nn.Linear(x.shape[1], 32), nn.ReLU(), nn.Linear(32, c))

    print(f"\n{args.dataset}: {len(y_train)} train ({int(corrupted.sum())} corrupted labels), {len(y_val)} val "
          f"(meta + select), {len(y_test)} test; student MLP {x.shape[1]}-32-{c}\n")
    results = metagate.compare_gates(
        student, teachers, (x_train, noisy), gates=args.gates, seeds=args.seeds, val=(x_val, y_val),
        test=(x_test, y_test), corrupted=torch.from_numpy(corrupted), clean_labels=torch.from_numpy(y_train),
        train_config={"epochs": args.epochs, "batch_size": 16, "device": "cpu", "progress": False}, verbose=False)
    print(f"{args.dataset}, noise {args.noise:g}, {len(args.seeds)} seeds (mean ± std):")
    print(comparison_table(results, keys=("test/acc", "test/nll", "test/ece", "diag/auroc_teacher_share")))


if __name__ == "__main__":
    main()
