"""The lm task on its CI path (tiny-random: a BPE trained here, models from scratch, nothing downloaded)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import hf_models  # noqa: F401  (sets HF_HUB_OFFLINE before transformers is imported)
import pytest
import torch

from metagate.data import get_task
from metagate.data.lm import chunk_document, load_corpus, split_documents, task_tokenizer
from metagate.errors import ConfigError, InputError, StaleCacheError
from metagate.teachers.sparse import cached_sparse_bank

SMALL = {"lm_documents": 12, "lm_doc_tokens": 80, "lm_seq_len": 16}


def test_chunks_overlap_by_one_and_pad_the_last():
    x, y = chunk_document([5, 6, 7, 8, 9, 10], 2)
    assert x.tolist() == [[5, 6], [7, 8], [9, 0]]
    assert y.tolist() == [[6, 7], [8, 9], [10, 0]]
    x, y = chunk_document([5, 6, 7], 2)
    assert x.tolist() == [[5, 6]] and y.tolist() == [[6, 7]]


def test_split_never_puts_a_document_in_two_parts():
    names = sorted(load_corpus())
    assert len(names) == 79  # CPython 3.11's pydoc topics
    for seed in (0, 1, 2):
        parts = split_documents(names, seed, 0.1)
        seen = [d for p in parts.values() for d in p]
        assert sorted(seen) == names and len(set(seen)) == len(seen)
        assert [len(parts[k]) for k in ("train", "meta", "select", "test")] == [64, 3, 4, 8]
    # the test part does not move with data_seed; the validation parts do
    assert split_documents(names, 0, 0.1)["test"] == split_documents(names, 1, 0.1)["test"]
    assert split_documents(names, 0, 0.1)["meta"] != split_documents(names, 1, 0.1)["meta"]

    task = get_task("lm", **SMALL)
    tok = task.info["tokenizer"]
    corpus = load_corpus()
    docs = {}
    for name in ("train", "meta", "select", "test"):
        split = getattr(task, name)
        assert split.docs == task.info["documents"][name]
        for j, d in enumerate(split.docs):
            assert d not in docs, f"{d} in {docs.get(d)} and {name}"
            docs[d] = name
            # the split's targets of this document, in order, are exactly the document's tokens after the first
            rows = split.doc == j
            want = tok(corpus[d], add_special_tokens=False)["input_ids"][:80]
            assert split.y[rows][split.mask[rows]].tolist() == want[1:]
            assert split.x[rows][0, 0].item() == want[0]
    assert len(docs) == 12


def test_student_and_teachers_share_the_tokenizer():
    task = get_task("lm", **SMALL)
    tok = task.info["tokenizer"]
    assert len(tok) == task.num_classes == 384
    assert tok.get_vocab() == task_tokenizer("tiny-random").get_vocab()
    models = [task.make_student(), *(s.factory() for s in task.teacher_specs)]
    assert [m.model.config.vocab_size for m in models] == [384, 384, 384]
    assert [m(task.train.x[:2]).shape for m in models] == [torch.Size([2, 16, 384])] * 3
    assert not task.make_student().model.config.tie_word_embeddings
    ids = tok("The capital of France is", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "The capital of France is" and 0 not in ids


def test_token_noise_corrupts_targets_and_the_inputs_read_them():
    clean = get_task("lm", **SMALL)
    noisy = get_task("lm", noise=0.2, **SMALL)
    real = clean.train.mask
    assert int(noisy.corrupted.sum()) == round(0.2 * int(real.sum())) == 142
    assert torch.equal(noisy.corrupted, (noisy.train.y != clean.train.y))
    assert torch.equal(noisy.clean_train_labels, clean.train.y)
    shifted = torch.where(clean.train.y[:, 1:] == 0, clean.train.x[:, 1:], noisy.train.y[:, :-1])
    assert torch.equal(noisy.train.x[:, 1:], shifted)
    assert torch.equal(noisy.train.x != 0, clean.train.x != 0)  # the inputs keep their real positions
    assert torch.equal(clean.train.x != 0, clean.train.mask)  # one input per target
    assert int(noisy.corrupted[:, -1].sum()) > 0  # a last target's corruption is in no input of its row
    for part in ("meta", "select", "test"):
        assert torch.equal(getattr(noisy, part).y, getattr(clean, part).y)


def test_bad_lm_options_are_refused():
    with pytest.raises(ConfigError, match="--lm-documents 500 exceeds the corpus's 79"):
        get_task("lm", lm_documents=500)
    with pytest.raises(ConfigError, match="--lm-teacher must be one of tiny-random, smollm2, got 'gpt5'"):
        get_task("lm", lm_teacher="gpt5", **SMALL)
    with pytest.raises(ConfigError, match="--noise-type for lm"):
        get_task("lm", noise=0.1, noise_type="pairflip", **SMALL)
    with pytest.raises(InputError, match="too few"):
        get_task("lm", corpus={"a": "one two three", "b": "four five six", "c": "seven eight"})


def test_builds_offline_with_an_empty_cache(tmp_path):
    code = ("from metagate.data import get_task\n"
            "t = get_task('lm', lm_documents=8, lm_doc_tokens=40, lm_seq_len=8)\n"
            "print(t.num_classes, len(t.train), t.info['tokens']['train'])\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "METAGATE_CACHE": str(tmp_path / "mg"), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["384", "25", "195"]  # 5 train documents x 39 targets, 5 chunks of 8 each
    assert not (tmp_path / "mg").exists() and not (tmp_path / "hf").exists()  # nothing cached or fetched


def test_a_cached_bank_for_other_text_raises(tmp_path):
    task = get_task("lm", **SMALL)
    teacher = task.teacher_specs[0].factory().eval()
    seqs = [row[m] for row, m in zip(task.train.x, task.train.x != 0)]
    path = tmp_path / "bank.safetensors"
    bank = cached_sparse_bank(path, [teacher], seqs, 8)
    assert bank.num_units == sum(s.numel() for s in seqs) and bank.vocab_size == 384
    again = cached_sparse_bank(path, [teacher], seqs, 8)
    assert torch.equal(again.ids, bank.ids) and again.fingerprint == bank.fingerprint
    before = path.read_bytes()
    other = get_task("lm", data_seed=1, **SMALL)  # other documents in train
    other_seqs = [row[m] for row, m in zip(other.train.x, other.train.x != 0)]
    with pytest.raises(StaleCacheError, match="stale sparse bank"):
        cached_sparse_bank(path, [teacher], other_seqs, 8)
    with pytest.raises(StaleCacheError, match="stale sparse bank"):
        cached_sparse_bank(path, [task.teacher_specs[1].factory().eval()], seqs, 8)
    assert path.read_bytes() == before  # the user's file is never overwritten


def test_tiny_compare_runs_end_to_end(tmp_path):
    from metagate.cli import main

    start = time.process_time()  # CPU time: what the run costs, whatever else shares the machine
    rc = main(["compare", "--task", "lm", "--lm-documents", "8", "--lm-doc-tokens", "48", "--lm-seq-len", "16",
               "--gates", "ce", "fixed", "meta", "--epochs", "1", "--teachers", "1", "--seeds", "1",
               "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--out", str(tmp_path / "out")])
    took = time.process_time() - start
    assert rc == 0
    assert took < 60, f"the tiny lm compare took {took:.1f} s of CPU"
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert sorted(r["gate"] for r in rows) == ["ce", "fixed", "meta"]
    for r in rows:
        m = r["metrics"]
        assert m["test/ppl"] == pytest.approx(math.exp(m["test/nll"]))
        assert m["test/nll"] < math.log(384)  # one epoch already beats the uniform model
    md = (tmp_path / "out" / "results.md").read_text()
    table = md.split("## Language modelling")[1].split("## Cost")[0]
    assert "| gate | seeds | perplexity | token NLL |" in table
    ppl = {r["gate"]: r["metrics"]["test/ppl"] for r in rows}
    for gate, value in ppl.items():
        assert f"| `{gate}` | 1 | {value:.2f} ± 0.00 |" in table


def test_language_metrics_equal_the_classification_metrics_a_batch_at_a_time():
    from metagate.metrics import classification_metrics
    from metagate.seq_metrics import language_metrics, teacher_forced_logits

    task = get_task("lm", lm_documents=30, lm_doc_tokens=200, lm_seq_len=16)
    torch.manual_seed(0)
    model = task.make_student()
    logits = teacher_forced_logits(model, task.test.x)
    want = classification_metrics(logits.reshape(-1, 384), task.test.y.reshape(-1), task.test.mask.reshape(-1))
    got = language_metrics(model, task.test, batch_size=3)
    assert int(task.test.mask.sum()) > 20 * 15  # enough tokens for a bin of MCE_MIN_COUNT
    assert set(got) == {*want, "ppl"} and "mce_min20" in got
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-9), k
    assert got["ppl"] == pytest.approx(math.exp(want["nll"]))
    assert 5.5 < want["nll"] < 6.5  # a random model: about log 384 = 5.95


def _teachers(topk, cache, **extra):
    from metagate.run import DistillConfig, load_task
    from metagate.teachers.build import load_teachers
    from metagate.trainer import TrainConfig

    opts = {**SMALL, **({"topk": topk} if topk else {})}
    cfg = DistillConfig(task="lm", task_options=opts, teachers=2, cache_dir=str(cache),
                        train=TrainConfig(epochs=1, progress=False), **extra)
    task = load_task(cfg)
    return cfg, task, *load_teachers(cfg, task, progress=False)


def test_the_sparse_bank_serves_the_dense_banks_top_k_per_token(tmp_path):
    from metagate.teachers.build import calibrated_bank
    from metagate.teachers.sparse_seq import SeqSparseBank

    _, task, dense, _ = _teachers(None, tmp_path)
    _, _, sparse, _ = _teachers(16, tmp_path)  # the same cached teachers, scored into a top-16 bank
    assert isinstance(sparse, SeqSparseBank) and sparse.names == dense.names == ["gpt2-128", "llama-96"]
    assert sparse.num_units == dense.num_units == len(task.train) and sparse.num_classes == 384
    assert (tmp_path / task.key / "sparse-gpt2-128+llama-96-top16.safetensors").exists()
    ids = torch.tensor([0, 3, len(task.train) - 1])
    real = task.train.mask[ids].reshape(-1)
    d = torch.log_softmax(dense.lookup(ids), -1)[real]
    s = sparse.unit_log_probs(1.0, ids)
    assert s.shape == (3 * 16, 2, 384)
    assert torch.allclose(s[real].topk(16, -1).values, d.topk(16, -1).values, atol=2e-2)  # float16 dense storage
    assert torch.allclose(s.logsumexp(-1), torch.zeros(3 * 16, 2), atol=1e-5)
    assert torch.allclose(s[~real], torch.full_like(s[~real], -math.log(384)))  # padding: uniform
    right_d, right_s = dense.unit_right(task.clean_train_labels), sparse.unit_right(task.clean_train_labels)
    assert right_s.shape == right_d.shape and (right_s == right_d).float().mean() > 0.99
    with pytest.raises(InputError, match="no \\[N, K, V\\]"):
        sparse.log_probs(1.0)
    # calibrated: teacher k's rows are read at tau * tau_k
    sparse.calibration = dense.calibration
    cal = calibrated_bank(sparse)
    taus = dense.calibration.taus
    want = torch.stack([sparse.unit_log_probs(2.0 * t, ids)[:, j] for j, t in enumerate(taus)], 1)
    assert cal.calibrated and torch.equal(cal.unit_log_probs(2.0, ids), want)


def test_a_large_vocabulary_needs_topk_and_the_temperature_gate_runs_on_the_sparse_bank(tmp_path):
    """The temperature gate reads the teachers per batch; its diagnostics' confidence tertiles come from the
    sparse bank's per-unit summary (the rule gates: tests/test_lm_rules.py)."""
    from dataclasses import replace

    from metagate.data.lm import LMConfig
    from metagate.run import run_distill

    task = get_task("lm", **SMALL)
    task.num_classes = 49152
    with pytest.raises(ConfigError, match="49,152 tokens.*give --topk"):
        LMConfig().check_task(task)
    cfg, *_ = _teachers(16, tmp_path, gate="temperature")
    result = run_distill(replace(cfg, logdir=str(tmp_path / "run")))
    assert result["test/nll"] < math.log(384) and 0 < result["diag/tau_mean"] < 100


def test_tiny_compare_on_the_sparse_bank(tmp_path):
    from metagate.cli import main

    rc = main(["compare", "--task", "lm", "--lm-documents", "8", "--lm-doc-tokens", "48", "--lm-seq-len", "16",
               "--topk", "16", "--gates", "fixed", "hard", "meta", "--epochs", "1", "--teachers", "2", "--seeds", "1",
               "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--out", str(tmp_path / "out")])
    assert rc == 0
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert sorted(r["gate"] for r in rows) == ["fixed", "hard", "meta"]
    fps = {r["fingerprints"]["teachers"] for r in rows}
    assert len(fps) == 1
    for r in rows:
        assert r["metrics"]["test/nll"] < math.log(384)
    # the teachers' shares by token class: fixed splits KD equally on every class; hard gives each token to one
    # teacher; every gate reads the same bank's per-class correctness
    m = {r["gate"]: r["metrics"] for r in rows}
    classes = ("frequent", "rare", "code", "prose")
    present = [c for c in classes if f"gate/w_label_{c}" in m["fixed"]]
    assert present == ["frequent", "rare", "prose"]  # the first 48 tokens of these documents hold no code line
    for c in present:
        assert m["fixed"][f"gate/share_{c}_t0"] == m["fixed"][f"gate/share_{c}_t1"] == pytest.approx(0.5)
        assert m["fixed"][f"gate/w_label_{c}"] == pytest.approx(m["fixed"]["gate/mean_w_label"])
        assert m["hard"][f"gate/share_{c}_t0"] + m["hard"][f"gate/share_{c}_t1"] == pytest.approx(1.0)
        for k in (0, 1):
            assert m["fixed"][f"diag/right_{c}_t{k}"] == m["hard"][f"diag/right_{c}_t{k}"] == \
                m["meta"][f"diag/right_{c}_t{k}"]
    assert m["fixed"]["diag/right_frequent_t0"] > m["fixed"]["diag/right_rare_t0"]  # frequent tokens are easier
    saved = json.loads((tmp_path / "out" / "runs" / "fixed" / "seed1" / "metrics.json").read_text())
    assert saved["gate/share_rare_t0"] == m["fixed"]["gate/share_rare_t0"]
    md = (tmp_path / "out" / "results.md").read_text()
    table = md.split("## Teacher shares by token class")[1].split("## Cost")[0]
    assert "| gate | seeds | gpt2-128: frequent | gpt2-128: rare | gpt2-128: code | gpt2-128: prose | llama-96: frequent" \
        in table
    assert "| `fixed` | 1 | 0.500 ± 0.000 | 0.500 ± 0.000 | - | 0.500 ± 0.000 | 0.500 ± 0.000 |" in table
    right = [f"{100 * m['fixed'][f'diag/right_{c}_t0']:.1f} ± 0.0" if c in present else "-" for c in classes]
    assert "| teacher top-1 right % (bank) | 1 | " + " | ".join(right) + " |" in table


def test_the_steps_closed_form_kd_equals_the_rebuilt_rows(tmp_path):
    """The sparse bank's KD columns in closed form (the step's path) equal kd_per_unit against the rebuilt
    [n, K, V] rows, plain and calibrated, and a training step gives the same loss and update either way."""
    from metagate.gates.fixed import FixedGate
    from metagate.losses import kd_per_unit
    from metagate.teachers.sparse_seq import SeqSparseBank
    from metagate.trainer import TrainConfig, Trainer

    cfg, task, sparse, _ = _teachers(16, tmp_path)
    ids = torch.tensor([0, 3, len(task.train) - 1])
    n = 3 * 16
    torch.manual_seed(0)
    s = torch.randn(n, 384) * 3
    real = task.train.mask[ids].reshape(-1).nonzero().squeeze(1)
    assert 0 < real.numel() < n  # the last example has padding
    calibrated = SeqSparseBank(sparse.sparse, sparse.token_index, [0.7, 1.3])
    for bank in (sparse, calibrated):
        for tau in (1.0, 2.5):
            log_q = torch.log_softmax(s / tau, -1)
            want = kd_per_unit(s, None, tau, teacher_log_probs=bank.unit_log_probs(tau, ids)) / tau**2
            got = bank.unit_kd(ids, log_q, tau)
            assert got.shape == (n, 2) and torch.allclose(got, want, rtol=1e-4, atol=1e-5)
            assert torch.allclose(bank.unit_kd(ids, log_q[real], tau, real), want[real], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(calibrated.unit_kd(ids, log_q, 1.0), sparse.unit_kd(ids, log_q, 1.0))

    def one_step(closed: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(0)
        bank = SeqSparseBank(sparse.sparse, sparse.token_index)
        bank.closed_form_kd = closed
        if closed:  # the closed form never rebuilds the [n, K, V] rows
            bank.unit_log_probs = bank.lookup = None  # type: ignore[method-assign,assignment]
        trainer = Trainer(task, task.make_student(None), FixedGate(tau=2.0), bank,
                          TrainConfig(epochs=1, progress=False, seed=0))
        res = trainer.train_step(next(iter(trainer.epoch_batches(0))))
        return res.loss, [p.detach().clone() for p in trainer.student.parameters()]

    (l1, p1), (l0, p0) = one_step(True), one_step(False)
    assert torch.isfinite(l1) and l1.item() == pytest.approx(l0.item(), rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(p1, p0, strict=True))


def test_hard_reads_one_token_per_unit_from_the_sparse_bank(tmp_path):
    """The sparse bank's one-token log-probabilities equal the rebuilt rows' (the scored next token: its stored,
    exact value), and the hard gate's step on the sparse bank never rebuilds [n, K, V] rows yet decides as the
    rule on the rebuilt rows does wherever the gold token is in every teacher's top-k."""
    from metagate import units
    from metagate.gates.hard import HardGate
    from metagate.teachers.sparse_seq import SeqSparseBank
    from metagate.trainer import TrainConfig, Trainer

    _, task, sparse, _ = _teachers(16, tmp_path)
    ids = torch.tensor([0, 3, len(task.train) - 1])
    n, k = 3 * 16, 2
    torch.manual_seed(0)
    tokens = torch.randint(0, 384, (n,))
    rows = sparse.token_index[ids].reshape(-1)
    real = rows < sparse.sparse.num_units
    nxt = sparse.sparse.next_tokens()[rows.clamp_max(sparse.sparse.num_units - 1)]
    tokens[:8] = nxt[:8]  # some units ask for the scored next token
    gold = real & (tokens == nxt)
    assert 0 < int(gold.sum()) < int(real.sum())
    for tau in (1.0, 1.7):
        dense = sparse.unit_log_probs(tau, ids)
        want = dense.gather(2, tokens.view(-1, 1, 1).expand(-1, k, 1)).squeeze(2)
        got = sparse.unit_token_log_probs(ids, tokens, tau)
        assert torch.allclose(got[~gold], want[~gold], atol=1e-5)
    exact = sparse.sparse.gold[rows[gold]].float()  # at tau = 1: the stored log-probability of the next token
    assert torch.allclose(sparse.unit_token_log_probs(ids, tokens, 1.0)[gold], exact, atol=1e-6)

    bank = SeqSparseBank(sparse.sparse, sparse.token_index)
    trainer = Trainer(task, task.make_student(None), HardGate(hard_tau=1.5), bank,
                      TrainConfig(epochs=1, progress=False, seed=0))
    batch = next(iter(trainer.epoch_batches(0)))
    with torch.no_grad():
        tb, logits = units.token_units(batch, trainer.student(batch.x))
    sparse_view, dense_view = trainer.make_view(tb, logits), trainer.make_view(tb, logits)
    dense_view.teacher_token_log_probs_fn = None  # the rule on the rebuilt [n, K, V] rows
    w_sparse, w_dense = trainer.gate.decide(sparse_view).weights, trainer.gate.decide(dense_view).weights
    rows = bank.token_index[batch.ids].reshape(-1)
    mask = tb.mask.reshape(-1).bool()
    y = tb.y.reshape(-1).clamp_min(0)
    in_top = (bank.sparse.ids[rows.clamp_max(bank.sparse.num_units - 1)].long() == y.view(-1, 1, 1)).any(-1).all(-1)
    assert int((in_top & mask).sum()) > 10
    assert torch.equal(w_sparse[in_top & mask], w_dense[in_top & mask])
    assert float(w_sparse[~mask][:, 1:].sum()) == 0.0 and set(w_sparse[:, 0][mask].tolist()) == {0.0, 1.0}
    bank.unit_log_probs = bank.lookup = None  # type: ignore[method-assign,assignment]
    assert torch.isfinite(trainer.train_step(batch).loss)  # the whole step: no [n, K, V] rows


@pytest.mark.parametrize("param", ["table", "net"])
def test_the_meta_lookahead_on_the_sparse_bank_takes_the_closed_form(tmp_path, param):
    """The meta gate's look-ahead (autograd route) reads the sparse bank's KD columns in closed form: the same
    weights and update over two steps as against the rebuilt [n, K, V] rows."""
    from metagate.gates.meta import MetaGate
    from metagate.teachers.sparse_seq import SeqSparseBank
    from metagate.trainer import TrainConfig, Trainer

    _, task, sparse, _ = _teachers(16, tmp_path)

    def two_steps(closed: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        torch.manual_seed(0)
        bank = SeqSparseBank(sparse.sparse, sparse.token_index)
        bank.closed_form_kd = closed
        kd = bank.unit_kd

        def counted(*args: object, **kw: object) -> torch.Tensor:
            calls.append(args[3] if len(args) > 3 else kw.get("real"))
            return kd(*args, **kw)  # type: ignore[arg-type]

        bank.unit_kd = counted  # type: ignore[method-assign]
        trainer = Trainer(task, task.make_student(None), MetaGate(meta_param=param, meta_tau=2.0), bank,
                          TrainConfig(epochs=1, progress=False, seed=0, batch_size=4))
        batches = iter(trainer.epoch_batches(0))
        ws = [trainer.train_step(next(batches)).weights for _ in range(2)]
        return ws, [p.detach().clone() for p in trainer.student.parameters()]

    calls: list[object] = []
    (w1, p1) = two_steps(True)
    assert sum(c is None for c in calls) == 2 and len(calls) == 4  # per step: the look-ahead's and the real step's
    calls.clear()
    (w0, p0) = two_steps(False)
    assert not calls
    assert not torch.allclose(w1[1], w1[0])  # the gate moved its weights after its first look-ahead
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(w1, w0, strict=True))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(p1, p0, strict=True))


def test_the_sparse_banks_unit_features_equal_the_rebuilt_rows(tmp_path):
    """The unit features' teacher columns from the top-k entries (plain and calibrated, padding included) equal
    unit_features on the rebuilt [n, K, V] rows; a policy gate on the sparse bank builds no such rows."""
    from metagate.features import unit_features, with_student_features
    from metagate.teachers.sparse_seq import SeqSparseBank

    _, task, sparse, _ = _teachers(16, tmp_path)
    ids = torch.tensor([0, 3, len(task.train) - 1])
    n = 3 * 16
    torch.manual_seed(0)
    s = torch.randn(n, 384) * 3
    labels = task.train.y[ids].reshape(-1)
    rows = sparse.token_index[ids].reshape(-1)
    assert bool((rows >= sparse.sparse.num_units).any())  # padding rows are in the batch
    labels[:5] = sparse.sparse.ids[rows[:5], 0, 0].long()  # some labels are a teacher's top token
    for bank in (sparse, SeqSparseBank(sparse.sparse, sparse.token_index, [0.7, 1.3])):
        want = unit_features(s, bank.lookup(ids), labels, 0.25)
        log_ps = torch.log_softmax(s, -1)
        got = with_student_features(bank.unit_teacher_features(ids, log_ps, labels), log_ps, labels, 0.25)
        assert got.shape == want.shape == (n, 2, 11)
        assert torch.allclose(got, want, atol=2e-5)
        assert 0 < float(got[..., 5].mean()) < 1  # agreement varies

    from metagate.gates.policy import ReinforceGate
    from metagate.trainer import TrainConfig, Trainer

    bank = SeqSparseBank(sparse.sparse, sparse.token_index)
    trainer = Trainer(task, task.make_student(None), ReinforceGate(tau=1.0), bank,
                      TrainConfig(epochs=1, progress=False, seed=0, batch_size=4))
    bank.unit_log_probs = bank.lookup = None  # type: ignore[method-assign,assignment]
    for batch in list(trainer.epoch_batches(0))[:2]:
        res = trainer.train_step(batch)
        assert torch.isfinite(res.loss) and res.weights[:, 1:].sum() > 0
