"""The cost of the lm step with ``fixed`` in metagate's core loop against a hand-written ``transformers`` KD loop
(README, "The lm task"): run from the repository root,
``OMP_NUM_THREADS=1 python scripts/lm_cost.py [--steps 20 --rounds 5 --out cost.json]``.

Both loops train the same student (the task's GPT-2, the same initial weights) on the same batches (the core
loop's own batch order) with the same optimizer (Adam, the same learning rate and cosine schedule over the same
number of steps), against the same cached sparse top-k bank (``--topk``): metagate's step is
:meth:`metagate.trainer.Trainer.train_step` with the ``fixed`` gate (label weight ``alpha``, the teachers sharing
``1 - alpha``, temperature ``tau``); the hand loop is what a user would write around ``transformers`` -- the
Hugging Face model's forward, cross-entropy on the real tokens, and per teacher ``tau^2 KL(p_tau || q_tau)`` with
the teacher's top-k rebuilt by its uniform tail, written in closed form over the top-k and the tail (no
``[tokens, V]`` teacher table). Each step is timed alone (batches are built beforehand on both sides); one process
alternates the two loops for ``--rounds`` rounds, and the ratio of the medians per round is reported.

The default is the CI path (``--lm-teacher tiny-random``, 384 tokens); ``--lm-teacher smollm2`` adds the pretrained
SmolLM2-135M to the teachers (its GGUF wheel, ``metagate[lm]``; scoring its bank takes minutes the first time).
``--loss-vocab 49152`` also times the loss and its backward alone at SmolLM2's vocabulary on random logits (no model
needed): the core loop rebuilds each teacher's ``[tokens, V]`` rows per batch, the closed form does not.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402

from metagate.data.task import Batch, Task  # noqa: E402
from metagate.gates.fixed import FixedGate  # noqa: E402
from metagate.teachers.sparse_seq import SeqSparseBank  # noqa: E402
from metagate.trainer import TrainConfig, Trainer  # noqa: E402


def hand_kd_loss(logits: Tensor, y: Tensor, rows: Tensor, ids: Tensor, logprobs: Tensor, vocab: int,
                 alpha: float = 0.5, tau: float = 4.0) -> Tensor:
    """``alpha CE + (1 - alpha) / K sum_k tau^2 KL(p_k,tau || q_tau)``, mean over the real tokens, written out.

    :param logits: ``[B, L, V]`` the student's
    :param y: ``[B, L]`` next tokens, 0 = padding
    :param rows: ``[B, L]`` each token's row in the sparse bank
    :param ids: ``[N, K, k]`` the bank's top-k token ids; ``logprobs`` ``[N, K, k]`` their log-probabilities
    :param vocab: ``V``; a teacher's tail mass ``r = 1 - sum exp(top-k)`` is spread evenly over the ``V - k`` others
    """
    real = y != 0
    s = logits[real]  # [n, V]
    ce = F.cross_entropy(s, y[real])
    log_q = F.log_softmax(s / tau, -1)
    sum_log_q = log_q.sum(-1)
    top_ids, top_lp = ids[rows[real]].long(), logprobs[rows[real]].double()  # [n, K, k]
    k = top_lp.shape[-1]
    m = vocab - k
    r = (-torch.expm1(torch.logsumexp(top_lp, -1))).clamp_min(0.0)  # tail mass at tau = 1
    a_top = top_lp / tau
    a_tail = torch.where(r > 0, (r.log() - math.log(m)) / tau, torch.full_like(r, -math.inf))  # per tail token
    log_z = torch.logsumexp(torch.cat([a_top, (a_tail + math.log(m)).unsqueeze(-1)], -1), -1)
    lp_top = (a_top - log_z.unsqueeze(-1)).float()  # the teacher at tau: its top-k ...
    lp_tail = (a_tail - log_z).float()  # ... and each of its V - k tail tokens
    lq_top = torch.gather(log_q.unsqueeze(1).expand(-1, top_ids.shape[1], -1), 2, top_ids)  # [n, K, k]
    kl_top = (lp_top.exp() * (lp_top - lq_top)).sum(-1)
    lq_tail_sum = sum_log_q.unsqueeze(1) - lq_top.sum(-1)  # sum of log q over the tail tokens
    p_tail = lp_tail.exp()
    kl_tail = torch.where(p_tail > 0, p_tail * (m * lp_tail - lq_tail_sum), torch.zeros_like(p_tail))
    kd = (kl_top + kl_tail).mean(0) * tau**2  # [K]
    return alpha * ce + (1 - alpha) * kd.mean()


class HandLoop:
    """The hand-written loop: the student's ``transformers`` model, Adam with the core loop's cosine schedule."""

    def __init__(self, student: torch.nn.Module, bank: SeqSparseBank, vocab: int, lr: float, total_steps: int,
                 alpha: float, tau: float) -> None:
        self.model = student.model.train()  # the Hugging Face model inside metagate's CausalLM wrapper
        self.bank, self.vocab, self.alpha, self.tau = bank, vocab, alpha, tau
        self.lr, self.total_steps, self.step_n = lr, total_steps, 0
        self.opt = torch.optim.Adam(self.model.parameters(), lr=lr, weight_decay=0.0)

    def loss(self, x: Tensor, y: Tensor, ids: Tensor) -> Tensor:
        logits = self.model(input_ids=x, attention_mask=(x != 0).long()).logits
        rows = self.bank.token_index[ids]
        return hand_kd_loss(logits, y, rows, self.bank.sparse.ids, self.bank.sparse.logprobs, self.vocab,
                            self.alpha, self.tau)

    def step(self, x: Tensor, y: Tensor, ids: Tensor) -> float:
        for g in self.opt.param_groups:
            g["lr"] = 0.5 * self.lr * (1 + math.cos(math.pi * min(self.step_n, self.total_steps) / self.total_steps))
        loss = self.loss(x, y, ids)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.step_n += 1
        return float(loss.detach())


def core_trainer(task: Task, bank: SeqSparseBank, seed: int, batch_size: int, lr: float, steps: int,
                 alpha: float, tau: float) -> Trainer:
    """metagate's core loop with ``fixed``, its student initialised from ``seed``."""
    torch.manual_seed(seed)
    student = task.make_student()
    cfg = TrainConfig(epochs=1, batch_size=batch_size, lr=lr, optimizer="adam", weight_decay=0.0, seed=seed,
                      device="cpu", progress=False)
    tr = Trainer(task, student, FixedGate(alpha=alpha, tau=tau), bank, cfg)
    tr.set_total_steps(steps)
    return tr


def batches(tr: Trainer, steps: int) -> list[Batch]:
    """The core loop's first ``steps`` batches (its epochs' seeded order, repeated past one epoch)."""
    out: list[Batch] = []
    epoch = 0
    while len(out) < steps:
        out += list(tr.epoch_batches(epoch))
        epoch += 1
    return out[:steps]


def run_core(task: Task, bank: SeqSparseBank, plan: list[Batch], a: argparse.Namespace) -> tuple[list[float], list[float]]:
    tr = core_trainer(task, bank, a.seed, a.batch_size, a.lr, len(plan), a.alpha, a.tau)
    times, losses = [], []
    for b in plan:
        t0 = time.perf_counter()
        res = tr.train_step(b)
        losses.append(float(res.loss))  # the item() is part of a step: the core loop checks the loss is finite
        times.append(time.perf_counter() - t0)
    return times, losses


def run_hand(task: Task, bank: SeqSparseBank, plan: list[Batch], a: argparse.Namespace) -> tuple[list[float], list[float]]:
    torch.manual_seed(a.seed)
    loop = HandLoop(task.make_student(), bank, task.num_classes, a.lr, len(plan), a.alpha, a.tau)
    times, losses = [], []
    for b in plan:
        t0 = time.perf_counter()
        losses.append(loop.step(b.x, b.y, b.ids))
        times.append(time.perf_counter() - t0)
    return times, losses


def loss_part(vocab: int, tokens: int, teachers: int, k: int, rounds: int, alpha: float = 0.5,
              tau: float = 4.0) -> dict[str, Any]:
    """The loss and its backward alone (no model) at a vocabulary of ``vocab`` on random logits and random
    top-``k`` teachers: the core loop's (each teacher's rows rebuilt to ``[tokens, V]``, then the dense KL) against
    :func:`hand_kd_loss`'s closed form; alternating, ``rounds`` times (what a large vocabulary does to the step
    when no pretrained model is at hand)."""
    from metagate.losses import SparseTeacher, reduce_weighted, sparse_log_probs_at, unit_losses

    g = torch.Generator().manual_seed(0)
    top = torch.log_softmax(torch.randn(tokens, teachers, vocab, generator=g) * 3, -1).topk(k, -1)
    ids, lp = top.indices.to(torch.int32), top.values
    s = torch.randn(tokens, vocab, generator=g, requires_grad=True)
    y = torch.randint(1, vocab, (tokens,), generator=g)
    w = torch.tensor([alpha] + [(1 - alpha) / teachers] * teachers).expand(tokens, -1)
    rows = torch.arange(tokens).unsqueeze(0)

    def core() -> Tensor:
        t = sparse_log_probs_at(SparseTeacher(ids.long(), lp, tail="uniform"), vocab, tau)
        return reduce_weighted(unit_losses(s, None, y, tau, t, validate=False), w, validate=False)

    def hand() -> Tensor:
        return hand_kd_loss(s.unsqueeze(0), y.unsqueeze(0), rows, ids, lp, vocab, alpha, tau)

    times: dict[str, list[float]] = {"core": [], "hand": []}
    values = {}
    for r in range(rounds + 1):  # round 0 warms up
        for name, f in ((("core", core), ("hand", hand)) if r % 2 == 0 else (("hand", hand), ("core", core))):
            t0 = time.perf_counter()
            loss = f()
            loss.backward()
            s.grad = None
            if r:
                times[name].append(time.perf_counter() - t0)
            values[name] = float(loss.detach())
    core_t, hand_t = statistics.median(times["core"]), statistics.median(times["hand"])
    return {"vocab": vocab, "tokens": tokens, "teachers": teachers, "k": k, "core_s": core_t, "hand_s": hand_t,
            "ratio": core_t / hand_t, "loss_core": values["core"], "loss_hand": values["hand"]}


def load(a: argparse.Namespace) -> tuple[Task, SeqSparseBank, list[str]]:
    """The lm task and its cached sparse bank (teachers trained and scored once, under ``--cache-dir``)."""
    from metagate.run import DistillConfig, load_task
    from metagate.teachers.build import load_teachers

    opts: dict[str, Any] = {"lm_teacher": a.lm_teacher, "lm_documents": a.lm_documents,
                            "lm_doc_tokens": a.lm_doc_tokens, "lm_seq_len": a.lm_seq_len, "topk": a.topk}
    cfg = DistillConfig(task="lm", task_options=opts, teachers=a.teachers, cache_dir=a.cache_dir,
                        train=TrainConfig(device="cpu", progress=False))
    task = load_task(cfg)
    bank, _ = load_teachers(cfg, task, progress=False)
    if not isinstance(bank, SeqSparseBank):
        raise SystemExit(f"expected the sparse bank, got {type(bank).__name__}")
    return task, bank, list(bank.names)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lm-teacher", choices=("tiny-random", "smollm2"), default="tiny-random")
    ap.add_argument("--lm-documents", type=int, default=12)
    ap.add_argument("--lm-doc-tokens", type=int, default=400)
    ap.add_argument("--lm-seq-len", type=int, default=64)
    ap.add_argument("--teachers", type=int, default=2, help="in-domain teachers trained here (smollm2 joins them)")
    ap.add_argument("--topk", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    ap.add_argument("--steps", type=int, default=20, help="steps per loop and round")
    ap.add_argument("--warmup", type=int, default=2, help="first steps of each run left out of its median")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (the order flips each round)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--tau", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--cache-dir", default=None, help="teacher cache (unset: metagate's default)")
    ap.add_argument("--loss-vocab", type=int, default=None, help="also time the loss and its backward alone at this "
                    "vocabulary (e.g. 49152) on random logits and random top-k teachers, batch-size x lm-seq-len "
                    "tokens, teachers + 1 of them (the run's teachers and a pretrained one)")
    ap.add_argument("--out", default=None, help="write the measurements as JSON here")
    a = ap.parse_args(argv)
    if a.steps <= a.warmup:
        raise SystemExit(f"--steps ({a.steps}) must exceed --warmup ({a.warmup})")
    torch.set_num_threads(a.threads)
    task, bank, names = load(a)
    plan = batches(core_trainer(task, bank, a.seed, a.batch_size, a.lr, a.steps, a.alpha, a.tau), a.steps)
    tokens = sum(int((b.y != 0).sum()) for b in plan) / len(plan)
    print(f"lm ({a.lm_teacher}, V = {task.num_classes}), teachers {names}, top-{a.topk} sparse bank; student "
          f"{sum(p.numel() for p in task.make_student().parameters()):,} parameters; {a.steps} steps of "
          f"{a.batch_size} x {a.lm_seq_len} ({tokens:.0f} real tokens / step on average), {a.threads} thread(s)")
    rounds = []
    for r in range(a.rounds):
        order = ("core", "hand") if r % 2 == 0 else ("hand", "core")
        got = {name: (run_core if name == "core" else run_hand)(task, bank, plan, a) for name in order}
        core = statistics.median(got["core"][0][a.warmup:])
        hand = statistics.median(got["hand"][0][a.warmup:])
        dloss = max(abs(c - h) for c, h in zip(got["core"][1], got["hand"][1]))
        rounds.append({"order": list(order), "core_s_per_step": core, "hand_s_per_step": hand, "ratio": core / hand,
                       "first_loss_core": got["core"][1][0], "first_loss_hand": got["hand"][1][0],
                       "max_abs_loss_diff": dloss})
    print("| round | first | metagate fixed s/step | hand loop s/step | ratio | max |Δloss| over the steps |")
    print("|---|---|---|---|---|---|")
    for i, r in enumerate(rounds):
        print(f"| {i} | {r['order'][0]} | {r['core_s_per_step']:.4f} | {r['hand_s_per_step']:.4f} | "
              f"{r['ratio']:.3f} | {r['max_abs_loss_diff']:.2e} |")
    ratios = [r["ratio"] for r in rounds]
    result = {
        "settings": {k: v for k, v in vars(a).items() if k != "out"}, "teachers": names, "vocab": task.num_classes,
        "real_tokens_per_step": tokens, "rounds": rounds,
        "core_s_per_step_median": statistics.median(r["core_s_per_step"] for r in rounds),
        "hand_s_per_step_median": statistics.median(r["hand_s_per_step"] for r in rounds),
        "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
    }
    print(f"median over {a.rounds} rounds: metagate {result['core_s_per_step_median']:.4f} s/step, hand loop "
          f"{result['hand_s_per_step_median']:.4f} s/step, ratio {result['ratio_median']:.3f} "
          f"(min {result['ratio_min']:.3f}, max {result['ratio_max']:.3f})")
    if a.loss_vocab:
        lp = loss_part(a.loss_vocab, a.batch_size * a.lm_seq_len, a.teachers + 1, a.topk, a.rounds, a.alpha, a.tau)
        result["loss_part"] = lp
        print(f"the loss and its backward alone at V = {lp['vocab']:,} ({lp['tokens']} tokens, {lp['teachers']} "
              f"top-{lp['k']} teachers): core loop {lp['core_s']:.3f} s, closed form {lp['hand_s']:.3f} s, ratio "
              f"{lp['ratio']:.2f} (losses {lp['loss_core']:.6f} / {lp['loss_hand']:.6f})")
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {a.out}")
    return result


if __name__ == "__main__":
    main()
