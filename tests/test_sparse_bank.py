"""The sparse top-k teacher bank: scored from tiny random causal LMs, on disk with a fingerprint."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hf_models import tiny_gpt2, tiny_llama, token_sequences

from metagate.errors import InputError, StaleCacheError
from metagate.losses import gated_kd
from metagate.teachers.sparse import SparseBank, cached_sparse_bank, score_sparse

pytestmark = pytest.mark.usefixtures("one_thread")
V = 50


def _pad(seqs):
    t = max(s.numel() for s in seqs)
    x = torch.zeros(len(seqs), t, dtype=torch.long)
    m = torch.zeros(len(seqs), t, dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, : s.numel()], m[i, : s.numel()] = s, 1
    return x, m


def test_bank_holds_each_teachers_top_k_and_gold_and_rebuilds_the_batch(tmp_path):
    teachers = [tiny_gpt2(V, seed=1), tiny_llama(V, seed=2)]
    seqs = token_sequences(6, V)
    bank = score_sparse(teachers, seqs, k=5, names=["gpt2", "llama"])
    n = sum(s.numel() for s in seqs)
    assert bank.ids.shape == (n, 2, 5) and bank.gold.shape == (n, 2) and bank.vocab_size == V
    assert bank.nbytes == n * 4 + 7 * 8 + n * 2 * 5 * (4 + 4) + n * 2 * 4  # O(tokens * K * k), no V
    x, m = _pad(seqs[:3])
    got = bank.teachers(torch.tensor([0, 1, 2]), x, m)
    with torch.no_grad():
        for j, te in enumerate(teachers):
            logp = F.log_softmax(te(input_ids=x, attention_mask=m).logits, -1)
            top_v, top_i = logp.topk(5, -1)
            real = m.bool()
            assert torch.equal(got[j].ids[real], top_i[real])
            torch.testing.assert_close(got[j].logprobs[real], top_v[real], rtol=0, atol=1e-6)
            gold = logp[:, :-1].gather(-1, x[:, 1:].unsqueeze(-1)).squeeze(-1)
            inner = real[:, 1:]  # positions with a next token
            torch.testing.assert_close(got[j].gold_logprob[:, :-1][inner], gold[inner], rtol=0, atol=1e-6)
    # the loss from the bank equals the loss from the batch's own top-k
    labels = torch.where(m.bool(), x, torch.full_like(x, -100))
    s = torch.randn(3, x.shape[1], V)
    with torch.no_grad():
        direct = [F.log_softmax(te(input_ids=x, attention_mask=m).logits, -1).topk(5, -1) for te in teachers]
    from metagate.losses import SparseTeacher
    ref = gated_kd(s, [SparseTeacher(i, v) for v, i in direct], labels, tau=2.0)
    assert gated_kd(s, got, labels, tau=2.0).item() == pytest.approx(ref.item(), rel=1e-5)

    path = tmp_path / "bank.safetensors"
    bank.save(path)
    back = SparseBank.load(path, fingerprint=bank.fingerprint)
    assert back.names == ["gpt2", "llama"] and back.fingerprint == bank.fingerprint
    assert torch.equal(back.ids, bank.ids) and torch.equal(back.logprobs, bank.logprobs)
    assert path.stat().st_size < bank.nbytes + 2048  # the file is the tensors and a small header


def test_cached_bank_is_reused_and_a_stale_one_refused(tmp_path):
    teachers = [tiny_gpt2(V, seed=1)]
    seqs = token_sequences(4, V)
    path = tmp_path / "b.safetensors"
    a = cached_sparse_bank(path, teachers, seqs, k=3)
    mtime = path.stat().st_mtime_ns
    b = cached_sparse_bank(path, teachers, seqs, k=3)
    assert path.stat().st_mtime_ns == mtime and torch.equal(a.ids, b.ids)
    with pytest.raises(StaleCacheError, match="stale sparse bank"):
        cached_sparse_bank(path, teachers, seqs, k=4)
    with pytest.raises(StaleCacheError):
        cached_sparse_bank(path, [tiny_gpt2(V, seed=9)], seqs, k=3)
    assert path.stat().st_mtime_ns == mtime  # never overwritten


def test_clear_errors(tmp_path):
    seqs = token_sequences(3, V)
    with pytest.raises(InputError, match=r"teacher 'b' has V = 60 tokens, the first teacher V = 50"):
        score_sparse([tiny_gpt2(V), tiny_gpt2(60)], seqs, k=3, names=["a", "b"])
    with pytest.raises(InputError, match=r"teacher 'teacher0' has V = 50 tokens, the student V = 40"):
        score_sparse([tiny_gpt2(V)], seqs, k=3, vocab_size=40)
    with pytest.raises(InputError, match=r"k = 50 for a vocabulary of V = 50"):
        score_sparse([tiny_gpt2(V)], seqs, k=50)
    bank = score_sparse([tiny_gpt2(V)], seqs, k=3)
    x, m = _pad(seqs)
    with pytest.raises(InputError, match=r"sequence 1 has 10 tokens in the sparse bank but 9 in the batch"):
        bank.teachers(torch.tensor([1, 0, 2]), x, m)  # the batch's sequences in another order
    with pytest.raises(InputError, match=r"sequence 1 position 0: the batch has token"):
        bank.teachers(torch.tensor([1, 0, 2]), x)  # without a mask the tokens themselves disagree
    other = (x + 1) % V
    with pytest.raises(InputError, match="another tokenizer or other text"):
        bank.teachers(torch.arange(3), other, m)
    with pytest.raises(InputError, match="tokens in the sparse bank but"):
        bank.teachers(torch.arange(3), x, torch.ones_like(m))
    with pytest.raises(InputError, match="holds 3 sequences"):
        bank.teachers(torch.tensor([0, 1, 3]), x, m)
    (tmp_path / "junk.safetensors").write_bytes(b"not a bank")
    with pytest.raises(InputError, match="is not a sparse teacher bank"):
        SparseBank.load(tmp_path / "junk.safetensors")


def test_bank_protocol_rows_index_right_and_the_refused_whole_table_reads():
    """The sparse bank is a TeacherBank over tokens: rows rebuilt from top-k (uniform tail), the token index,
    each row's top-1 for unit_right, and the whole [N, K, V] table refused with a clear error."""
    from metagate.losses import SparseTeacher, sparse_log_probs_at
    from metagate.teachers.bank import TeacherBank

    teachers = [tiny_gpt2(V, seed=1), tiny_llama(V, seed=2)]
    seqs = token_sequences(4, V)
    bank = score_sparse(teachers, seqs, k=6)
    assert isinstance(bank, TeacherBank) and not bank.online and bank.calibration is None
    n = sum(s.numel() for s in seqs)
    assert (bank.num_units, bank.num_teachers, bank.num_classes) == (n, 2, V)
    idx = bank.token_index
    lengths = [s.numel() for s in seqs]
    assert idx.shape == (4, max(lengths))
    assert idx[1, 0].item() == lengths[0] and idx[1, lengths[1] - 1].item() == lengths[0] + lengths[1] - 1
    if lengths[1] < max(lengths):
        assert idx[1, lengths[1]].item() == n  # past the end: the no-token row
    assert torch.equal(bank.tokens[idx[2, : lengths[2]]].long(), seqs[2])
    rows = torch.tensor([0, 3, n - 1, n])
    lp = bank.unit_log_probs(2.0, rows)
    assert lp.shape == (4, 2, V)
    for j in range(2):
        te = SparseTeacher(bank.ids[rows[:3], j].long(), bank.logprobs[rows[:3], j])
        torch.testing.assert_close(lp[:3, j], sparse_log_probs_at(te, V, 2.0))
    torch.testing.assert_close(lp[3], torch.full((2, V), -torch.log(torch.tensor(float(V)))))
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(4, 2))
    torch.testing.assert_close(bank.lookup(rows), bank.unit_log_probs(1.0, rows))
    nxt = bank.next_tokens()
    assert nxt[lengths[0] - 1].item() == -100 and nxt[0].item() == seqs[0][1].item()
    right = bank.unit_right(nxt)
    want = (bank.ids[:, :, 0].long() == nxt.unsqueeze(1)) & (nxt != -100).unsqueeze(1)
    assert right.shape == (n, 2) and torch.equal(right, want) and not right[lengths[0] - 1].any()
    assert bank.unit_right(nxt[:-1]) is None
    with pytest.raises(InputError, match=rf"no \[N, K, V\] logits table \(N = {n} tokens, V = {V}\)"):
        bank.logits  # noqa: B018
    with pytest.raises(InputError, match="no \\[N, K, V\\] log-probability table"):
        bank.log_probs(1.0)
    with pytest.raises(InputError, match=f"token rows reach {n + 1}"):
        bank.unit_log_probs(1.0, torch.tensor([n + 1]))
    assert bank.to("cpu") is bank


def test_a_top_k_holding_all_the_mass_rebuilds_finite_rows():
    """A confident pretrained teacher's top-k can hold all its mass in float32 (SmolLM2 on code): the tail tokens
    then get the floor mass, not log 0 = -inf, and the KD term stays finite (0 * -inf was NaN)."""
    from metagate.losses import TAIL_FLOOR, SparseTeacher, sparse_log_probs_at

    vocab = 50
    lp = torch.tensor([[0.0, -80.0, -90.0, -100.0]])  # exp sums to 1 in float32: no tail mass left
    teacher = SparseTeacher(torch.arange(4).view(1, 4), lp, tail="uniform")
    rows = sparse_log_probs_at(teacher, vocab, 1.0)
    assert torch.isfinite(rows).all()
    assert rows[0, 10].item() == pytest.approx(math.log(TAIL_FLOOR / (vocab - 4)), rel=1e-6)
    assert rows[0, 0].exp().item() == pytest.approx(1.0, abs=1e-8)
    student = torch.randn(1, vocab, requires_grad=True)
    kd = (rows.exp() * (rows - torch.log_softmax(student, -1))).sum()
    kd.backward()
    assert torch.isfinite(kd) and torch.isfinite(student.grad).all()
