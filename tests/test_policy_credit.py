"""Per-(unit, teacher) hypergradient credit of the in-loop policy (issue 28): the centred credit against finite
differences of the validation loss after one step, and the credited policy on toy and digits banks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


def _one_step_val_loss(student, x, y, t, w, lr, tau, xv, yv):
    """Validation CE after one plain SGD step of the student's head on the ``w``-weighted loss (float64)."""
    from metagate.losses import reduce_weighted, unit_losses

    head = student.head
    with torch.no_grad():
        h = student.features(x)
    wt, b = head.weight.detach().clone().requires_grad_(True), head.bias.detach().clone().requires_grad_(True)
    loss = reduce_weighted(unit_losses(h @ wt.t() + b, t, y, tau), w)
    gw, gb = torch.autograd.grad(loss, (wt, b))
    with torch.no_grad():
        zv = student.features(xv) @ (wt - lr * gw).t() + (b - lr * gb)
        return float(torch.nn.functional.cross_entropy(zv, yv))


def test_centred_credit_equals_finite_differences():
    """d CE_val(theta'(W)) / dW by the closed form, centred over each unit's teachers, equals a central difference
    of the validation loss after one step along ``e_k - mean`` (a mass-preserving move of unit i's KD weight)."""
    from metagate.data.task import Split
    from metagate.gates.base import UnitView
    from metagate.gates.credit import HeadCredit, centred_credit
    from metagate.models import MLP

    torch.manual_seed(0)
    n, k, c, d, m = 6, 3, 4, 5, 8
    student = MLP(d, (7,), c).double()
    x, y = torch.randn(n, d, dtype=torch.float64), torch.randint(0, c, (n,))
    t = torch.randn(n, k, c, dtype=torch.float64) * 2
    xv, yv = torch.randn(m, d, dtype=torch.float64), torch.randint(0, c, (m,))
    run = SimpleNamespace(student=student, meta=Split(xv, yv), seed=0, device=torch.device("cpu"))
    tau, lr, alpha = 2.0, 0.5, 0.3
    credit = HeadCredit(run, tau, val_batch=m)  # the whole meta split: the look-ahead's batch is all of it
    logits = student(x)  # the real forward, in grad mode: its head input is kept
    view = UnitView(logits, t, y, torch.ones(n), torch.arange(n), (n, 1))
    probs = torch.softmax(torch.randn(n, k, dtype=torch.float64), -1)
    w = torch.cat([torch.full((n, 1), alpha, dtype=torch.float64), (1 - alpha) * probs], 1)
    val, dw = credit.hypergrad(view, w, lr)
    assert abs(float(val) - _one_step_val_loss(student, x, y, t, w, lr, tau, xv, yv)) < 1e-12
    a = centred_credit(dw)
    torch.testing.assert_close(a.sum(1), torch.zeros(n, dtype=torch.float64), atol=1e-15, rtol=0)
    eps = 1e-5
    fd = torch.zeros(n, k, dtype=torch.float64)
    for i in range(n):
        for j in range(k):
            e = torch.zeros(n, 1 + k, dtype=torch.float64)
            e[i, 1 + j] = 1.0
            e[i, 1:] -= 1.0 / k  # the row's KD mass is unchanged
            up = _one_step_val_loss(student, x, y, t, w + eps * e, lr, tau, xv, yv)
            down = _one_step_val_loss(student, x, y, t, w - eps * e, lr, tau, xv, yv)
            fd[i, j] = -(up - down) / (2 * eps)  # credit: the fall of the validation loss
    torch.testing.assert_close(a, fd, atol=1e-9, rtol=1e-6)
    assert float(a.abs().max()) > 1e-4  # a real signal, not zeros on both sides
    credit.close()
