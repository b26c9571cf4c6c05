"""The rule gates and the oracle rows on a sequence bank: the same decisions from a dense per-token bank and from
the same bank held sparse with k = V (top-k entries and gold log-probabilities, no [tokens, V] table)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import metagate.gates  # noqa: F401  (registers the gates)
from metagate.gates.registry import get_gate_class
from metagate.teachers.sequence import SeqTeacherBank, token_index
from metagate.teachers.sparse import SparseBank
from metagate.teachers.sparse_seq import SeqSparseBank, training_sequences

V, K, L = 11, 3, 5
GATES = [("label-filter", {"alpha": 0.3}), ("conf-teachers", {"alpha": 0.2}), ("ca-mkd", {}),
         ("ca-mkd", {"ca_mkd_mass": "unit"}), ("best-teacher", {"best_teacher": "t1", "alpha": 0.4}),
         ("oracle-filter", {"alpha": 0.5}), ("oracle-teachers", {"alpha": 0.5})]


def _text() -> tuple[torch.Tensor, torch.Tensor]:
    """``x, y [6, L]`` chunks of three documents as the lm task cuts them (``y`` the next tokens, the last chunk
    of a document right-padded with 0); tokens 1..V-1."""
    g = torch.Generator().manual_seed(3)
    xs, ys = [], []
    for length in (11, 7, 14):  # tokens per document: chunks of L + 1 overlapping by one
        doc = torch.randint(1, V, (length,), generator=g)
        for a in range(0, length - 1, L):
            part = doc[a : a + L + 1]
            x, y = torch.zeros(L, dtype=torch.long), torch.zeros(L, dtype=torch.long)
            x[: part.numel() - 1], y[: part.numel() - 1] = part[:-1], part[1:]
            xs.append(x)
            ys.append(y)
    return torch.stack(xs), torch.stack(ys)


def _banks() -> tuple[SeqTeacherBank, SeqSparseBank, torch.Tensor, torch.Tensor]:
    x, y = _text()
    mask = y != 0
    m = int(mask.sum())
    logits = torch.randn(m, K, V, generator=torch.Generator().manual_seed(5)) * 2.5
    # a teacher confident in the label on a few tokens, so that the rules' branches all fire
    lab = y[mask]
    logits[::3, 0].scatter_(1, lab[::3].view(-1, 1), 9.0)
    dense = SeqTeacherBank(logits, token_index(mask), [f"t{j}" for j in range(K)])
    seqs, index = training_sequences(x)
    assert torch.equal(index < m, mask)  # the sparse rows are the dense rows (x and y have the same real tokens)
    lp = torch.log_softmax(logits, -1)
    vals, ids = lp.topk(V, -1)  # k = V: nothing is dropped
    tokens = torch.cat(seqs)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.tensor([s.numel() for s in seqs]).cumsum(0)])
    sparse = SparseBank(tokens.to(torch.int32), offsets, ids.to(torch.int32), vals, torch.zeros(m, K), V,
                        list(dense.names), tail="uniform")
    nxt = sparse.next_tokens()
    has = nxt >= 0
    sparse.gold[has] = lp[has].gather(2, nxt[has].view(-1, 1, 1).expand(-1, K, 1)).squeeze(2)
    return dense, SeqSparseBank(sparse, index), y, lab


def _run(bank, y: torch.Tensor, clean: torch.Tensor) -> SimpleNamespace:
    corrupted = torch.zeros(y.numel(), dtype=torch.bool)
    corrupted[::4] = True
    return SimpleNamespace(bank=bank, num_teachers=K, train_y=y, device=torch.device("cpu"), dtype=torch.float32,
                           corrupted=corrupted & (y.reshape(-1) != 0), teacher_right=bank.unit_right(clean),
                           num_train_units=y.numel())


def test_the_summaries_agree_between_the_dense_bank_and_the_same_bank_held_sparse():
    dense, sparse, y, _ = _banks()
    ids = torch.arange(y.shape[0])
    real = (y != 0).reshape(-1)
    pd, ps = dense.unit_label_probs(ids, y), sparse.unit_label_probs(ids, y)
    assert pd.shape == ps.shape == (y.numel(), K)
    assert torch.allclose(pd, ps, atol=1e-6)
    vd, td = dense.unit_ensemble_top(ids)
    vs, ts = sparse.unit_ensemble_top(ids)
    assert torch.equal(td, ts) and torch.allclose(vd, vs, atol=1e-6)
    # against a hand reading of the dense table: teacher 0's probability of each real token's label
    want = torch.softmax(dense.logits[:-1, 0].float(), -1).gather(1, y[y != 0].view(-1, 1)).squeeze(1)
    assert torch.allclose(ps[real, 0], want, atol=1e-6)
    assert bool((ps[real, 0] > 0.95).sum() >= 5)  # the planted confident tokens


@pytest.mark.parametrize("gate,options", GATES)
def test_rule_gates_decide_the_same_on_a_dense_and_a_sparse_bank(gate, options):
    dense, sparse, y, _ = _banks()
    clean = y.clone()
    tables = []
    for bank in (dense, sparse):
        g = get_gate_class(gate)(**options)
        g.setup(_run(bank, y, clean))
        tables.append(g._table)  # noqa: SLF001
    assert tables[0].shape == (y.numel(), 1 + K)
    assert torch.allclose(tables[0], tables[1], atol=1e-6)
    real = (y != 0).reshape(-1)
    if gate == "label-filter":  # both branches fire on the real tokens
        assert bool((tables[1][real, 0] == 0).any()) and bool((tables[1][real, 0] == 0.3).any())
    if gate == "oracle-filter":
        run = _run(sparse, y, clean)
        assert torch.equal(tables[1][:, 0] == 0, run.corrupted)


def test_a_batch_reads_its_token_rows_of_the_table():
    """weights() gathers the rows of the batch's token units (example id * L + position)."""
    from metagate.gates.base import UnitView

    dense, sparse, y, _ = _banks()
    g = get_gate_class("conf-teachers")(alpha=0.2)
    g.setup(_run(sparse, y, y))
    ids = torch.tensor([4, 1])
    lab = y[ids].reshape(-1)
    view = UnitView(torch.zeros(lab.numel(), V), None, lab, (lab != 0).float(), ids, (2, L))
    w = g.decide(view).weights
    p = sparse.unit_label_probs(ids, y[ids])
    assert torch.allclose(w[:, 1:], 0.8 * p / p.sum(1, keepdim=True), atol=1e-6)
    assert torch.allclose(w, g._table[torch.cat([torch.arange(4 * L, 5 * L), torch.arange(L, 2 * L)])])  # noqa: SLF001


def test_with_k_below_v_the_label_probability_is_the_stored_gold_where_the_bank_has_it():
    """k = 2: where the label is the next token the bank scored (every position but a chunk's last), each
    teacher's probability of it is exact (the gold log-probability), top-k or not; at a chunk's last position
    it is the rebuild's value (the top-k entry, or the tail ``(1 - top-k mass) / (V - k)``)."""
    dense, full, y, _ = _banks()
    s = full.sparse
    small = SeqSparseBank(SparseBank(s.tokens, s.offsets, s.ids[:, :, :2].clone(), s.logprobs[:, :, :2].clone(),
                                     s.gold, V, list(s.names), tail="uniform"), full.token_index)
    ids = torch.arange(y.shape[0])
    exact, got = dense.unit_label_probs(ids, y), small.unit_label_probs(ids, y)
    real = (y != 0).reshape(-1)
    last = torch.zeros_like(y, dtype=torch.bool)
    last[torch.arange(y.shape[0]), (y != 0).sum(1) - 1] = True
    last = last.reshape(-1)
    inner = real & ~last
    assert torch.allclose(got[inner], exact[inner], atol=1e-6)
    top2 = s.logprobs[:, :, :2].exp()
    tail = (1 - top2.sum(-1)) / (V - 2)  # [M, K]
    rows = full.token_index.reshape(-1)[last]
    lab = y.reshape(-1)[last]
    hit = s.ids[rows, :, :2].long() == lab.view(-1, 1, 1)
    want = torch.where(hit.any(-1), (top2[rows] * hit).sum(-1), tail[rows])
    assert torch.allclose(got[last], want, atol=1e-6)
    assert bool((~hit.any(-1)).any())  # some last labels fall in the tail: the rebuild's value, not the truth
    assert not torch.allclose(got[last], exact[last], atol=1e-3)
    # the ensemble's top token from the top-k entries alone is the argmax of the rebuilt rows' mean
    mean = small.unit_log_probs(1.0, ids).exp().mean(1)
    val, top = small.unit_ensemble_top(ids)
    assert torch.equal(top[real], mean.argmax(-1)[real])
    assert torch.allclose(val, mean.max(-1).values, atol=1e-6)


def test_calibrated_teachers_give_the_same_summaries_dense_and_sparse():
    """A calibrated sparse bank (teacher j read at tau_j) against the dense bank of the logits divided by tau_j."""
    dense, full, y, _ = _banks()
    taus = [0.5, 1.0, 2.0]
    t = torch.tensor(taus).view(1, -1, 1)
    cal_dense = SeqTeacherBank(dense.logits[:-1] / t, dense.token_index, list(dense.names))
    cal_sparse = SeqSparseBank(full.sparse, full.token_index, taus)
    ids = torch.arange(y.shape[0])
    assert torch.allclose(cal_dense.unit_label_probs(ids, y), cal_sparse.unit_label_probs(ids, y), atol=1e-6)
    assert not torch.allclose(cal_dense.unit_label_probs(ids, y), dense.unit_label_probs(ids, y), atol=1e-2)
    vd, td = cal_dense.unit_ensemble_top(ids)
    vs, ts = cal_sparse.unit_ensemble_top(ids)
    assert torch.equal(td, ts) and torch.allclose(vd, vs, atol=1e-6)
