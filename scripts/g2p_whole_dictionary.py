"""Teachers and a ``ce`` student on the whole CMU Pronouncing Dictionary: PER and WER on test, beside the
published numbers (BLSTM, Yao & Zweig 2015: PER 5.45%, WER 23.55%; attention ensemble, Toshniwal 2016:
4.69% / 20.24%).

The split is the project's: by word (a word's alternative pronunciations stay together), seeded, with the
clean ``meta`` and ``select`` parts; no label noise. Each model trains with the task's own recipe (Adam,
cosine schedule, early stopping on ``select``) but for at most ``--epochs`` passes, since the recipe's 30
passes over ~100k words take hours on 2 CPU cores. Nothing is written to the teacher cache.

    .venv/bin/python scripts/g2p_whole_dictionary.py --epochs 4 --out runs/g2p_whole.json
    .venv/bin/python scripts/g2p_whole_dictionary.py --subset 300 --epochs 1 --models gru96   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from metagate.data import get_task
from metagate.data.task import TeacherSpec
from metagate.teachers.training import train_teacher

PUBLISHED = {"BLSTM (Yao & Zweig 2015)": (5.45, 23.55), "attention ensemble (Toshniwal & Livescu 2016)": (4.69, 20.24)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=4, help="at most this many passes per model (default: 4)")
    p.add_argument("--subset", type=int, default=None, help="words (default: the whole dictionary)")
    p.add_argument("--models", nargs="+", default=None,
                   help="teacher names and/or 'ce' (the default student); default: every teacher and ce")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=None, help="write the numbers as JSON")
    a = p.parse_args()
    if a.epochs < 1:
        p.error(f"--epochs must be >= 1, got {a.epochs}")
    if a.threads:
        torch.set_num_threads(a.threads)
    task = get_task("g2p", subset=a.subset)
    sizes = {name: len(getattr(task, name)) for name in ("train", "meta", "select", "test")}
    print(f"g2p, {sum(sizes.values())} words: " + ", ".join(f"{k} {v}" for k, v in sizes.items())
          + f"; {task.num_classes} target tokens", flush=True)
    specs = {s.name: s for s in task.teacher_specs}
    # the ce student: the default student under the teachers' recipe
    specs["ce"] = TeacherSpec("ce", task.make_student, epochs=30, lr=3e-3, batch_size=64)
    names = a.models or list(specs)
    unknown = sorted(set(names) - set(specs))
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(specs)}")
    results = {}
    for name in names:
        spec = replace(specs[name], epochs=min(a.epochs, specs[name].epochs))
        t0 = time.perf_counter()
        model, stats = train_teacher(task, spec, seed=0, device="cpu", progress=False)
        params = sum(x.numel() for x in model.parameters())
        results[name] = {**stats, "params": params, "epochs_max": spec.epochs, "seconds": time.perf_counter() - t0}
        print(f"{name:14s} {params / 1e3:7.0f}k params  best epoch {stats['epoch']}/{spec.epochs}  "
              f"PER {100 * stats['test_per']:.2f}%  WER {100 * stats['test_wer']:.2f}%  "
              f"token acc {100 * stats['test_acc']:.2f}%  ({results[name]['seconds']:.0f} s)", flush=True)
    print("\n| model | parameters | epochs (best / at most) | test PER % | test WER % |\n|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['params'] / 1e3:.0f}k | {r['epoch']} / {r['epochs_max']} | {100 * r['test_per']:.2f} "
              f"| {100 * r['test_wer']:.2f} |")
    for name, (per, wer) in PUBLISHED.items():
        print(f"| {name} (published) | | | {per:.2f} | {wer:.2f} |")
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "split": sizes,
                                     "results": results, "published": PUBLISHED}, indent=2))
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
