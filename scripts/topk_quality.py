"""What storing teacher token logits as top-k changes on g2p: the KL error, the cache size, the student.

For the task's cached teachers: the mean KL(full ‖ rebuilt) per real training token at τ = 1 and τ = 4 (the
rebuilt distribution spreads the remainder mass uniformly over the other tokens), the mass the top-k keep, and
the size on disk of the float16 and the top-k caches. Then the same students (same seeds, data and teachers)
trained against the full and the top-k bank: test PER, WER, token accuracy, NLL and ECE, mean ± std over seeds
and the paired difference top-k − full with a 95% t interval.

    .venv/bin/python scripts/topk_quality.py --topk 8 --seeds 0 1 2 --epochs 15
    .venv/bin/python scripts/topk_quality.py --subset 300 --teachers 2 --seeds 0 --epochs 1   # a smoke run
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from metagate.compare.stats import mean_std, paired_t
from metagate.run import DistillConfig, build_gate, load_task
from metagate.teachers.build import load_teachers
from metagate.teachers.cache import default_cache_dir, token_logits_file
from metagate.trainer import TrainConfig, Trainer, seed_everything

METRICS = ("per", "wer", "acc", "nll", "ece")


def kl_error(full: torch.Tensor, rebuilt: torch.Tensor, tau: float) -> float:
    """Mean over rows and teachers of KL(softmax(full/τ) ‖ softmax(rebuilt/τ)); ``[M, K, V]`` each."""
    lp, lq = F.log_softmax(full.float() / tau, -1), F.log_softmax(rebuilt.float() / tau, -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--topk", type=int, default=8, help="kept log-probabilities per token (default: 8)")
    p.add_argument("--noise", type=float, default=0.2, help="token noise rate (default: 0.2)")
    p.add_argument("--subset", type=int, default=None, help="CMUdict words (default: the task's, 8000)")
    p.add_argument("--teachers", type=int, default=3, help="teachers K (default: 3)")
    p.add_argument("--gate", default="fixed", help="the students' gate (default: fixed)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="student seeds (default: 0 1 2)")
    p.add_argument("--epochs", type=int, default=15, help="student epochs (default: 15)")
    p.add_argument("--out", type=Path, default=None, help="write the numbers as JSON")
    a = p.parse_args()
    torch.set_num_threads(1)
    train = TrainConfig(device="cpu", progress=False)
    base = dict(task="g2p", noise=a.noise, teachers=a.teachers, train=train)
    full_cfg = DistillConfig(**base, task_options={"subset": a.subset})
    top_cfg = DistillConfig(**base, task_options={"subset": a.subset, "topk": a.topk})
    task = load_task(full_cfg)
    full, teacher_metrics = load_teachers(full_cfg, task, progress=False)
    top, _ = load_teachers(top_cfg, task, progress=False)
    m = int(full.logits.shape[0]) - 1  # the packed real tokens (the last row stands for padding)
    kept = float(F.softmax(full.logits[:m].float(), -1).topk(a.topk, -1).values.sum(-1).mean())
    kl = {tau: kl_error(full.logits[:m], top.logits[:m], tau) for tau in (1.0, 4.0)}
    cache = default_cache_dir() / task.key
    names = [t["name"] for t in teacher_metrics]
    sizes = {form: sum((cache / token_logits_file(n, k)).stat().st_size for n in names)
             for form, k in (("float16", None), (f"top{a.topk}", a.topk))}
    print(f"g2p, {len(task.train)} training words ({m} tokens, vocabulary {task.num_classes}), noise {a.noise}, "
          f"K={len(names)} ({', '.join(names)})")
    print(f"top-{a.topk} keeps {kept:.4f} of the mass; mean KL(full || rebuilt) {kl[1.0]:.5f} at tau=1, "
          f"{kl[4.0]:.5f} at tau=4")
    print(f"cache on disk, {len(names)} teachers: "
          + ", ".join(f"{form} {size / 2**20:.1f} MiB" for form, size in sizes.items()))

    def student(bank, seed: int) -> dict[str, float]:
        seed_everything(seed)
        cfg = TrainConfig(epochs=a.epochs, seed=seed, optimizer="adam", lr=3e-3, weight_decay=0.0, batch_size=64,
                          device="cpu", progress=False, eval_test_every_epoch=False)
        got = Trainer(task, task.make_student(), build_gate(a.gate, {}), bank, cfg).fit()
        return {k: float(got[f"test/{k}"]) for k in METRICS}

    rows = {"full": [student(full, s) for s in a.seeds], f"top{a.topk}": [student(top, s) for s in a.seeds]}
    print(f"\nstudents ({a.gate}, {a.epochs} epochs, seeds {a.seeds}): mean ± std; Δ top-k − full [95% t]")
    print(f"| metric | full | top-{a.topk} | Δ |\n|---|---|---|---|")
    summary = {}
    for k in METRICS:
        f_, t_ = [r[k] for r in rows["full"]], [r[k] for r in rows[f"top{a.topk}"]]
        (fm, fs), (tm, ts), d = mean_std(f_), mean_std(t_), paired_t(t_, f_)
        summary[k] = {"full": [fm, fs], "topk": [tm, ts], "diff": [d.mean, d.lo, d.hi]}
        print(f"| {k} | {fm:.4f} ± {fs:.4f} | {tm:.4f} ± {ts:.4f} | {d.mean:+.4f} [{d.lo:+.4f}, {d.hi:+.4f}] |")
    if a.out is not None:
        a.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "kept_mass": kept,
                                     "kl": {str(t): v for t, v in kl.items()}, "cache_bytes": sizes,
                                     "rows": rows, "summary": summary}, indent=2))
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
