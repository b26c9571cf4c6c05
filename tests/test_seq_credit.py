"""Hypergradient credit per token on sequence students (issue 28): the seq2seq students' feature protocol, the
closed-form look-ahead over their head on token units against autograd through an explicit one-step look-ahead
(float64, padded batches), padding's (non-)influence, and the per-word decisions' credit."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from metagate.data.task import Split
from metagate.gates.base import UnitView
from metagate.gates.credit import HeadCredit, centred_credit
from metagate.losses import reduce_weighted, unit_losses
from metagate.seq_models import BOS, EOS, PAD, GRUSeq2Seq, TransformerSeq2Seq, greedy_decode

pytestmark = pytest.mark.usefixtures("one_thread")

SRC_V, TGT_V, K, TAU, LR = 9, 7, 3, 2.0, 0.5

ARCHS = {"gru": lambda: GRUSeq2Seq(SRC_V, TGT_V, 5, 6),
         "bigru": lambda: GRUSeq2Seq(SRC_V, TGT_V, 5, 6, 1, True),
         "transformer": lambda: TransformerSeq2Seq(SRC_V, TGT_V, 8, 2, 1, 16, 0.0, 12)}


def _words(lengths: list[int], width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [B, 2, width]``, ``y [B, width]``: words of the given target lengths (``<eos>`` included), right-padded."""
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    src = torch.randint(3, SRC_V, (b, width), generator=g)
    y = torch.randint(3, TGT_V, (b, width), generator=g)
    for i, n in enumerate(lengths):
        src[i, n:] = PAD
        y[i, n - 1] = EOS
        y[i, n:] = PAD
    dec = torch.full_like(y, PAD)
    dec[:, 0] = BOS
    dec[:, 1:] = torch.where(y[:, :-1] == EOS, PAD, y[:, :-1])
    return torch.stack([src, dec], 1), y


def _student(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return ARCHS[arch]().double()


def _credit(student, xv, yv) -> HeadCredit:
    run = SimpleNamespace(student=student, meta=Split(xv, yv), seed=0, device=torch.device("cpu"))
    return HeadCredit(run, TAU, val_batch=len(yv))  # the whole meta split: the look-ahead's batch is all of it


def _view(logits: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> UnitView:
    b, length = y.shape
    mask = (y != PAD).reshape(-1).to(torch.float32)
    return UnitView(logits.reshape(-1, logits.shape[-1]), t, y.reshape(-1), mask, torch.arange(b), (b, length))


def _reference(student, x, y, t, w, xv, yv) -> tuple[float, torch.Tensor]:
    """CE over the real tokens of ``(xv, yv)`` after one plain SGD step of the head on the ``w``-weighted masked
    mean loss of ``(x, y)``, and its gradient w.r.t. ``w``, by autograd (a second-order graph through the step)."""
    head = student.head
    with torch.no_grad():
        h, hv = student.features(x), student.features(xv)
    wr = w.detach().clone().requires_grad_(True)
    mask = (y != PAD).reshape(-1).to(w.dtype)
    z = F.linear(h, head.weight, head.bias).reshape(-1, TGT_V)
    inner = reduce_weighted(unit_losses(z, t, y.reshape(-1), TAU), wr, mask)
    gw, gb = torch.autograd.grad(inner, (head.weight, head.bias), create_graph=True)
    zv = F.linear(hv, head.weight - LR * gw, head.bias - LR * gb)
    val = F.cross_entropy(zv.reshape(-1, TGT_V), yv.reshape(-1), ignore_index=PAD)
    return float(val.detach()), torch.autograd.grad(val, wr)[0]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_seq2seq_feature_protocol_keeps_checkpoint_keys(arch: str) -> None:
    """``features`` is the output layer's input, ``head`` is ``out`` itself (no new module, no new state-dict key),
    and the protocol's checks see it."""
    from metagate.gates.meta.linear_route import head_protocol
    from metagate.gates.meta.lookahead import features_and_logits, resolve_names

    model = _student(arch).eval()
    x, _ = _words([4, 2, 5], 6, 1)
    assert model.head is model.out and head_protocol(model)
    keys = list(model.state_dict())
    assert "out.weight" in keys and "out.bias" in keys and not any(k.startswith("head.") for k in keys)
    assert not any(n.startswith("head") for n, _ in model.named_modules())
    assert resolve_names(model, "last") == ["out.weight", "out.bias"]  # the meta gate's "last" is what it was
    h, z = features_and_logits(model, x)
    assert h.shape == (3, 6, model.out.in_features)
    with torch.no_grad():  # (an eval-mode nn.Transformer takes its fast path without grad: compare like with like)
        assert torch.equal(z, model(x)) and torch.equal(model.out(h), model(x))
    src = x[:, 0]
    tokens, score = greedy_decode(model, src, 6)  # decoding's step() still ends in the same layer
    assert tokens.shape == (3, 6) and torch.isfinite(score).all()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_sequence_hypergradient_equals_autograd_through_one_step(arch: str) -> None:
    """On token units with padding, the closed form gives the look-ahead's validation CE (mean over the ``meta``
    batch's real tokens) and ``d CE / dW`` of autograd through an explicit one-step look-ahead of the head whose
    loss is the real step's masked mean; padding rows get exactly 0 credit. The real forward's head input is
    reused (kept by the hook through the flattened logits); a forward of ``x`` gives the same."""
    student = _student(arch)
    x, y = _words([6, 3, 1, 4], 6, 1)
    xv, yv = _words([5, 2, 3, 6, 1], 6, 2)
    n = y.numel()
    t = torch.randn(n, K, TGT_V, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 2
    w = torch.rand(n, 1 + K, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    credit = _credit(student, xv, yv)
    logits = student(x)  # the real forward, in grad mode
    view = _view(logits, t, y)
    assert credit.capture.kept_for(view.student_logits) is not None  # [B*T, V] rows of the hooked [B, T, V] output
    assert credit.capture.kept_for(view.student_logits.clone()) is None  # equal values, not that forward's
    val, dw = credit.hypergrad(view, w, LR)
    ref_val, ref_dw = _reference(student, x, y, t, w, xv, yv)
    assert abs(float(val) - ref_val) < 1e-12
    torch.testing.assert_close(dw, ref_dw, atol=1e-13, rtol=1e-9)
    pad = y.reshape(-1) == PAD
    assert int(pad.sum()) == 10 and bool((dw[pad] == 0).all())
    assert float(dw[~pad].abs().min()) > 0 and float(dw.abs().max()) > 1e-3  # a real signal on every real token
    a = centred_credit(dw)
    assert bool((a[pad] == 0).all())
    torch.testing.assert_close(a.sum(1), torch.zeros(n, dtype=torch.float64), atol=1e-15, rtol=0)
    # no kept input (other logits of the same values): a forward of x, the same numbers (the validation batch is
    # the whole split again)
    val2, dw2 = credit.hypergrad(_view(logits.detach().clone(), t, y), w, LR, x)
    assert abs(float(val2) - ref_val) < 1e-12
    torch.testing.assert_close(dw2, ref_dw, atol=1e-13, rtol=1e-9)
    credit.close()


@pytest.mark.parametrize("arch", ["gru", "transformer"])
def test_padding_has_no_influence_on_the_credit(arch: str) -> None:
    """Extra padded positions in the training and validation batches, holding NaN teacher rows and arbitrary
    weights, change neither the validation CE nor any real token's credit; their own credit is 0."""
    student = _student(arch)
    x, y = _words([5, 3, 2], 5, 5)
    xv, yv = _words([4, 2, 5, 3], 5, 6)
    n = y.numel()
    t = torch.randn(n, K, TGT_V, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    w = torch.rand(n, 1 + K, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    credit = _credit(student, xv, yv)
    val, dw = credit.hypergrad(_view(student(x), t, y), w, LR)
    credit.close()
    extra = 3
    xp, yp = F.pad(x, (0, extra)), F.pad(y, (0, extra))
    xvp, yvp = F.pad(xv, (0, extra)), F.pad(yv, (0, extra))
    b, length = yp.shape
    tp = torch.full((b, length, K, TGT_V), float("nan"), dtype=torch.float64)
    tp[:, :5] = t.view(len(y), 5, K, TGT_V)
    wp = torch.rand(b, length, 1 + K, dtype=torch.float64, generator=torch.Generator().manual_seed(9)) * 5
    wp[:, :5] = w.view(len(y), 5, 1 + K)
    credit = _credit(student, xvp, yvp)
    valp, dwp = credit.hypergrad(_view(student(xp), tp.view(-1, K, TGT_V), yp), wp.view(-1, 1 + K), LR)
    credit.close()
    assert abs(float(valp) - float(val)) < 1e-12
    dwp = dwp.view(b, length, 1 + K)
    torch.testing.assert_close(dwp[:, :5].reshape(-1, 1 + K), dw, atol=1e-13, rtol=1e-9)
    assert bool((dwp[:, 5:] == 0).all()) and bool(torch.isfinite(dwp).all())


def test_decisions_credit_per_real_token_and_per_word() -> None:
    """A policy's decisions on a sequence batch: one row per real token (the credit of those units), or one row
    per word (every token of word b trains on row b: its credit is autograd's through that expansion)."""
    student = _student("gru")
    x, y = _words([4, 6, 2], 6, 11)
    xv, yv = _words([3, 5, 6], 6, 12)
    b, length = y.shape
    n = y.numel()
    real = (y != PAD).reshape(-1)
    t = torch.randn(n, K, TGT_V, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    credit = _credit(student, xv, yv)
    view = _view(student(x), t, y)
    w_tok = torch.rand(int(real.sum()), 1 + K, dtype=torch.float64, generator=torch.Generator().manual_seed(14))
    val, dw_tok = credit.decision_hypergrad(view, w_tok, LR)
    full = torch.zeros(n, 1 + K, dtype=torch.float64)
    full[real] = w_tok
    ref_val, ref_dw = _reference(student, x, y, t, full, xv, yv)
    assert dw_tok.shape == (12, 1 + K) and abs(float(val) - ref_val) < 1e-12
    torch.testing.assert_close(dw_tok, ref_dw[real], atol=1e-13, rtol=1e-9)
    w_word = torch.rand(b, 1 + K, dtype=torch.float64, generator=torch.Generator().manual_seed(15))
    val, dw_word = credit.decision_hypergrad(view, w_word, LR, per_word=True)
    leaf = w_word.clone().requires_grad_(True)
    head = student.head
    with torch.no_grad():
        h, hv = student.features(x), student.features(xv)
    z = F.linear(h, head.weight, head.bias).reshape(-1, TGT_V)
    inner = reduce_weighted(unit_losses(z, t, y.reshape(-1), TAU), leaf.repeat_interleave(length, 0),
                            real.to(torch.float64))
    gw, gb = torch.autograd.grad(inner, (head.weight, head.bias), create_graph=True)
    ce = F.cross_entropy(F.linear(hv, head.weight - LR * gw, head.bias - LR * gb).reshape(-1, TGT_V),
                         yv.reshape(-1), ignore_index=PAD)
    assert dw_word.shape == (b, 1 + K) and abs(float(val) - float(ce.detach())) < 1e-12
    torch.testing.assert_close(dw_word, torch.autograd.grad(ce, leaf)[0], atol=1e-13, rtol=1e-9)
    credit.close()
