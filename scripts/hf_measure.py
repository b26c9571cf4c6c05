"""Measurements of the Hugging Face surface (README, "Language models"): run from the repository root,
``OMP_NUM_THREADS=1 python scripts/hf_measure.py [--part bank|speed|all]``.

* bank: memory and disk of the sparse top-k bank against a dense float16 one for ``V = 49,152``, ``k = 8/32/64``,
  on a tiny random GPT-2's scored text (64 sequences x 64 tokens); KL(full || top-k rebuilt, tail uniform) per k
  and the KD column's relative error (bucket and uniform tails) against the dense formula, for the random
  teacher and the same teacher sharpened (logits x 20 and x 60, the latter about as peaked as a trained LM);
* speed: ``GatedKDTrainer`` step time (``--gates``: ``fixed`` by default; ``meta`` is ``meta --meta-param net``)
  against a hand-written ``transformers`` KD loop with the same work (AdamW, linear schedule, gradient clipping at
  1.0, the same top-k bank), same process, interleaved.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hf_models import tiny_gpt2, token_sequences  # noqa: E402

from metagate.losses import SparseTeacher, kd_per_unit, sparse_kd_per_unit, sparse_log_probs_at  # noqa: E402
from metagate.teachers.sparse import score_sparse  # noqa: E402

V = 49_152


class _Sharp(torch.nn.Module):
    """A teacher whose logits are another's times ``scale`` (a peaked distribution)."""

    def __init__(self, inner: torch.nn.Module, scale: float) -> None:
        super().__init__()
        self.inner, self.scale = inner, scale

    def forward(self, input_ids, attention_mask=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits * self.scale


def bank_part() -> None:
    seqs = token_sequences(64, V, seed=0, lo=64, hi=64)
    tokens = sum(s.numel() for s in seqs)
    base = tiny_gpt2(V, seed=1, n_embd=32)
    print(f"scored text: {len(seqs)} sequences, {tokens} tokens, V = {V}, one teacher")
    print(f"dense bank: float16 {tokens * V * 2 / 2**20:.1f} MiB, float32 {tokens * V * 4 / 2**20:.1f} MiB "
          "(tokens x V, computed: not materialised)")
    print("| teacher | k | memory (MiB) | file (MiB) | vs dense fp16 | tail mass r (mean) | KL(full||rebuilt) mean "
          "| max | KD err bucket tau=1 | uniform tau=1 | bucket tau=2 | uniform tau=2 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(5)
    x = torch.stack(seqs[:8])
    student = torch.randn(8 * 64, V, generator=g, dtype=torch.float64)  # a random student for the KD column's error
    for name, teacher in (("random GPT-2", _Sharp(base, 1.0)), ("sharpened x20", _Sharp(base, 20.0)), ("sharpened x60", _Sharp(base, 60.0))):
        with torch.no_grad():
            # float64: the table measures the top-k approximation, not float32 rounding (which can leave a
            # peaked teacher's top-64 summing to >= 1, r = 0, and the rebuilt tail at -inf)
            full = F.log_softmax(teacher(x).double(), -1).reshape(-1, V)
        for k in (8, 32, 64):
            bank = score_sparse([teacher], seqs, k=k)
            with tempfile.TemporaryDirectory() as d:
                path = Path(d) / "b.safetensors"
                bank.save(path)
                size = path.stat().st_size
            lp, ids = full.topk(k, -1)
            te = SparseTeacher(ids, lp)
            rebuilt = sparse_log_probs_at(te, V, 1.0)
            kl = (full.exp() * (full - rebuilt)).sum(-1)
            r = 1 - lp.exp().sum(-1)
            errs = []
            for tau in (1.0, 2.0):
                dense = kd_per_unit(student, full.unsqueeze(1), tau)[:, 0]
                for tail in ("bucket", "uniform"):
                    sp = sparse_kd_per_unit(student, SparseTeacher(ids, lp, None, tail), tau)
                    errs.append(float(((sp - dense).abs() / dense).mean()))
            print(f"| {name} | {k} | {bank.nbytes / 2**20:.2f} | {size / 2**20:.2f} | "
                  f"{tokens * V * 2 / bank.nbytes:.0f}x smaller | {float(r.mean()):.3f} | {float(kl.mean()):.4f} | "
                  f"{float(kl.max()):.4f} | " + " | ".join(f"{e:.2%}" for e in errs) + " |")


def speed_part(steps: int = 12, rounds: int = 5, device: str = "cpu", bf16: bool = False,
               gates: tuple[str, ...] = ("fixed",)) -> None:
    from transformers import TrainerCallback, TrainingArguments, get_linear_schedule_with_warmup

    from metagate.hf import GatedKDTrainer
    from metagate.hf.trainer import causal_lm_collator

    def hand_kd(logits, teachers, labels, tau=4.0, alpha=0.5):
        """The textbook top-k KD loss written out (DistillKit's bucket): alpha CE + (1-alpha) mean_k tau^2 KL."""
        s, y = logits[:, :-1], labels[:, 1:]
        real = y != -100
        s = s[real]
        ce = F.cross_entropy(s, y[real])
        log_q = F.log_softmax(s / tau, -1)
        kd = 0.0
        for te in teachers:
            ids, lp = te.ids[:, :-1][real], te.logprobs[:, :-1][real]
            lq = log_q.gather(1, ids)
            r = (1 - lp.exp().sum(-1, keepdim=True)).clamp_min(1e-12)
            lp_b = F.log_softmax(torch.cat([lp, r.log()], -1) / tau, -1)
            lq_b = torch.cat([lq, (1 - lq.exp().sum(-1, keepdim=True)).clamp_min(1e-12).log()], -1)
            kd = kd + (lp_b.exp() * (lp_b - lq_b)).sum(-1).mean() * tau**2
        return alpha * ce + (1 - alpha) * kd / len(teachers)

    seqs = token_sequences(steps * 4, V, seed=0, lo=64, hi=64)
    bank = score_sparse([tiny_gpt2(V, seed=1, n_embd=32), tiny_gpt2(V, seed=2, n_embd=32)], seqs, k=32)
    meta = [{"input_ids": s} for s in token_sequences(8, V, seed=99, lo=64, hi=64)]  # the learned gates' held-out text
    options = {"meta": {"meta_param": "net"}}

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return len(seqs)

        def __getitem__(self, i):
            return {"input_ids": seqs[i], "seq_id": i}

    class Clock(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], 0.0

        def on_step_begin(self, *a, **k):
            sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            sync()
            self.times.append(time.perf_counter() - self.t0)

    collate = causal_lm_collator()

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def trainer_run(gate: str) -> float:
        with tempfile.TemporaryDirectory() as d:
            clock = Clock()
            args = TrainingArguments(output_dir=d, per_device_train_batch_size=4, max_steps=steps, logging_steps=4,
                                     learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=device == "cpu",
                                     disable_tqdm=True, seed=0, bf16=bf16)
            tr = GatedKDTrainer(model=tiny_gpt2(V, seed=3, n_embd=32).train(), args=args, train_dataset=Items(),
                                data_collator=collate, sparse_bank=bank, gate=gate, callbacks=[clock],
                                gate_options=options.get(gate),
                                meta_dataset=meta if gate in ("reinforce", "meta", "temperature") else None)
            tr.train()
            return statistics.median(clock.times[2:])

    def hand_run() -> float:
        torch.manual_seed(0)
        model = tiny_gpt2(V, seed=3, n_embd=32).train().to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
        sched = get_linear_schedule_with_warmup(opt, 0, steps)
        loader = torch.utils.data.DataLoader(Items(), batch_size=4, shuffle=True, collate_fn=collate)
        times = []
        for batch in loader:
            sync()
            t0 = time.perf_counter()
            seq_id = batch.pop("seq_id")
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                logits = model(**batch).logits.float()
            teachers = bank.teachers(seq_id, batch["input_ids"], batch["attention_mask"])
            loss = hand_kd(logits, teachers, labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times[2:])

    ratios: dict[str, list[float]] = {g: [] for g in gates}
    for _ in range(rounds):
        h = hand_run()
        for g in gates:
            t = trainer_run(g)
            ratios[g].append(t / h)
            print(f"hand loop {h * 1e3:.1f} ms/step, GatedKDTrainer({g}) {t * 1e3:.1f} ms/step, ratio {t / h:.3f}")
    for g in gates:
        print(f"{g}: median ratio over {rounds} interleaved rounds: {statistics.median(ratios[g]):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=("bank", "speed", "all"), default="all")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="the speed part's device")
    ap.add_argument("--bf16", action="store_true", help="the speed part in bf16 autocast (both loops)")
    ap.add_argument("--gates", nargs="+", default=["fixed"], help="GatedKDTrainer's gates to time (speed part)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (speed part; the median is reported)")
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if a.part in ("bank", "all"):
        bank_part()
    if a.part in ("speed", "all"):
        speed_part(rounds=a.rounds, device=a.device, bf16=a.bf16, gates=tuple(a.gates))


if __name__ == "__main__":
    main()
