"""Golden values for the loss columns (KL argument order!) and the weighted reduction."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metagate.errors import InputError
from metagate.losses import check_weights, kd_per_unit, reduce_weighted, unit_losses

S = torch.tensor([[1.0, 2.0, 0.5]], dtype=torch.float64)
T = torch.tensor([[[2.0, 0.0, 1.0], [-1.0, 3.0, 0.0]]], dtype=torch.float64)  # K = 2
Y = torch.tensor([1])
# computed by hand with math.exp/log, tau = 2
CE = 0.4643687841079447
KL_T0 = 0.7811333595370792  # tau² KL(p_teacher || q_student)
KL_T0_REVERSED = 0.9070937679273354  # tau² KL(q_student || p_teacher): the classic bug
KL_T1 = 0.6114306470118425


def test_unit_losses_golden_values():
    L = unit_losses(S, T, Y, tau=2.0)
    assert L.shape == (1, 3)
    assert L[0, 0].item() == pytest.approx(CE, abs=1e-12)
    assert L[0, 1].item() == pytest.approx(KL_T0, abs=1e-12)
    assert L[0, 2].item() == pytest.approx(KL_T1, abs=1e-12)
    assert L[0, 1].item() != pytest.approx(KL_T0_REVERSED, abs=1e-3)


def test_kd_matches_torch_kl_div_argument_order():
    s, t = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 3, 5, dtype=torch.float64)
    ours = kd_per_unit(s, t, 3.0)
    for k in range(3):
        ref = F.kl_div(F.log_softmax(s / 3, -1), F.log_softmax(t[:, k] / 3, -1), reduction="none",
                       log_target=True).sum(-1) * 9
        torch.testing.assert_close(ours[:, k], ref)


def test_per_unit_temperature_equals_scalar_rows():
    s, t = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 2, 6, dtype=torch.float64)
    taus = torch.tensor([1.0, 2.0, 3.0, 0.5], dtype=torch.float64)
    per_unit = kd_per_unit(s, t, taus)
    for i, tau in enumerate(taus.tolist()):
        torch.testing.assert_close(per_unit[i], kd_per_unit(s[i : i + 1], t[i : i + 1], tau)[0])


def test_precomputed_teacher_log_probs_give_same_losses():
    s, t, y = torch.randn(5, 4), torch.randn(5, 3, 4), torch.randint(0, 4, (5,))
    lp = F.log_softmax(t / 2.5, -1)
    torch.testing.assert_close(unit_losses(s, t, y, 2.5), unit_losses(s, None, y, 2.5, teacher_log_probs=lp))


def test_no_teacher_gives_label_column_only():
    assert unit_losses(S, None, Y).shape == (1, 1)


def test_reduce_weighted_with_mask_and_weights():
    losses = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    w = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.2, 0.8]])
    mask = torch.tensor([1.0, 1.0, 0.0])
    # (0.5+1) + 3 = 4.5, over 2 unmasked units
    assert reduce_weighted(losses, w, mask).item() == pytest.approx(2.25)
    assert reduce_weighted(losses, w, mask, "sum").item() == pytest.approx(4.5)
    torch.testing.assert_close(reduce_weighted(losses, w, mask, "none"), torch.tensor([1.5, 3.0, 0.0]))
    assert reduce_weighted(losses, w).item() == pytest.approx((1.5 + 3.0 + 5.8) / 3)
    assert reduce_weighted(losses, w, torch.zeros(3)).item() == 0.0  # all padding: no NaN


def test_reduce_weighted_rejects_unknown_reduction():
    with pytest.raises(ValueError, match="reduction"):
        reduce_weighted(torch.ones(2, 2), torch.ones(2, 2), reduction="max")


@pytest.mark.parametrize("bad,msg", [(float("nan"), "NaN"), (-0.1, ">= 0")])
def test_check_weights_rejects_nan_and_negative(bad, msg):
    w = torch.ones(3, 2)
    w[1, 1] = bad
    with pytest.raises(InputError, match=msg):
        check_weights(w)


@pytest.mark.parametrize("tau_shape", [(), (5,)], ids=["global", "per-unit"])
def test_tempered_kd_node_matches_autograd_of_the_formula(tau_shape) -> None:
    """The fused tensor-temperature KD node (ctkd, temperature): value, first and second derivatives against
    autograd of the plain formula and finite differences (float64)."""
    from metagate.losses import TemperedKD, _tempered_kd_reference

    g = torch.Generator().manual_seed(3)
    s = torch.randn(5, 7, generator=g, dtype=torch.double, requires_grad=True)
    t = torch.randn(5, 3, 7, generator=g, dtype=torch.double) * 3
    tau = (torch.rand(tau_shape, generator=g, dtype=torch.double) * 5 + 1).requires_grad_()
    assert torch.autograd.gradcheck(TemperedKD.apply, (s, t, tau))
    assert torch.autograd.gradgradcheck(TemperedKD.apply, (s, t, tau))  # create_graph (meta + ctkd)
    ours, ref = kd_per_unit(s, t, tau), _tempered_kd_reference(s, t, tau)
    assert ours.grad_fn.name() == "TemperedKDBackward"  # the trainer's tensor-temperature path takes the node
    torch.testing.assert_close(ours, ref)
    w = torch.randn(5, 3, generator=g, dtype=torch.double)
    for a, b in zip(torch.autograd.grad(ours, (s, tau), w), torch.autograd.grad(ref, (s, tau), w)):
        torch.testing.assert_close(a, b)
    # a temperature without a gradient (the temperature gate's policy output): the student's gradient only
    fixed_tau = tau.detach()
    (gs,) = torch.autograd.grad(kd_per_unit(s, t, fixed_tau), (s,), w)
    torch.testing.assert_close(gs, torch.autograd.grad(_tempered_kd_reference(s, t, fixed_tau), (s,), w)[0])
    with pytest.raises(RuntimeError, match="teacher"):
        TemperedKD.apply(s, t.clone().requires_grad_(), tau).sum().backward()
