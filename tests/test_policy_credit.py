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


def _right_teacher_share(trainer, gate, parts) -> float:
    """Mean KD-internal weight of each training unit's right teacher (the one whose class part holds its class),
    under the gate's mean policy."""
    gate.policy.eval()
    ws, ids = [], []
    with torch.no_grad():
        for b in trainer.epoch_batches(12345):
            ws.append(gate.weights(trainer.make_view(b, trainer.student(b.x))).weights)
            ids.append(b.ids)
    gate.policy.train()
    w = torch.cat(ws)[:, 1:]
    w = w / w.sum(1, keepdim=True)
    y = trainer.task.clean_train_labels[torch.cat(ids)]
    right = torch.zeros_like(y)
    for k, part in enumerate(parts):
        right[torch.isin(y, torch.tensor(part))] = k
    return float(w.gather(1, right.view(-1, 1)).mean())


def test_credited_policy_finds_the_right_teacher_per_class():
    """Teacher k is right exactly on class part k (confidently wrong elsewhere): the hypergradient-credited policy
    puts most KD weight on the right teacher within 76 steps (0.84; ~all of it with a smaller entropy bonus); the
    scalar-reward policy (the default) is still near equal weights then and has moved only part of the way (0.64)
    after 304 steps."""
    from metagate.data import get_task
    from metagate.envs.synthetic import synthetic_bank
    from metagate.gates.policy import ReinforceGate
    from metagate.teachers.banks import class_parts
    from metagate.trainer import TrainConfig, Trainer

    task = get_task("digits")
    parts = class_parts(10, 3)
    assert parts == [(0, 1, 2, 3), (4, 5, 6), (7, 8, 9)]
    bank = synthetic_bank(task, (1.0, 1.0, 1.0), parts, adversarial=False, noise_std=0.5)
    shares = {}
    for credit in ("hypergradient", "episode"):
        torch.manual_seed(0)
        gate = ReinforceGate(rl_credit=credit)
        tr = Trainer(task, task.make_student(), gate, bank,
                     TrainConfig(epochs=8, batch_size=32, progress=False, device="cpu", seed=0))
        start = _right_teacher_share(tr, gate, parts)
        assert abs(start - 1 / 3) < 0.01  # the untrained policy: equal weights
        tr.run_epoch()
        tr.run_epoch()
        shares[credit] = [_right_teacher_share(tr, gate, parts)]
        for _ in range(6):
            tr.run_epoch()
        assert tr.step == 304
        shares[credit].append(_right_teacher_share(tr, gate, parts))
    assert shares["hypergradient"][0] > 0.8, shares
    assert shares["hypergradient"][1] > 0.9, shares
    assert shares["episode"][0] < 0.4, shares
    assert 0.4 < shares["episode"][1] < 0.9, shares


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("gate,options", [
    ("reinforce", {"rl_credit": "hypergradient", "rl_features": "reliability"}),
    ("meta+policy", {"rl_credit": "hypergradient", "meta_columns": "split", "rl_credit_every": 2}),
])
def test_credited_policy_resumes_bit_identically(digits_noisy, digits_bank, tmp_path, gate, options):
    """The credit's optimizer, its moving RMS and its validation batches are in the checkpoint."""
    from metagate.callbacks import EpochFn
    from metagate.run import build_gate
    from metagate.trainer import TrainConfig, Trainer, seed_everything

    bank, _ = digits_bank

    def trainer(run_dir):
        seed_everything(0)
        cfg = TrainConfig(epochs=3, batch_size=64, seed=0, device="cpu", progress=False)
        return Trainer(digits_noisy, digits_noisy.make_student(), build_gate(gate, options), bank, cfg,
                       run_dir=run_dir, identity={"gate": gate})

    full = trainer(None)
    m_full = full.fit()

    def stop(tr, record):
        if tr.epoch == 1:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        trainer(tmp_path).fit([EpochFn(stop)])
    torch.manual_seed(999)
    resumed = trainer(tmp_path)
    resumed.load_checkpoint(tmp_path / "checkpoint.pt")
    assert resumed.fit() == m_full
    for p, q in zip(full.gate.parameters(), resumed.gate.parameters()):
        assert torch.equal(p, q)
    assert m_full["test/acc"] > 0.5


def test_credit_options_refused():
    from metagate.errors import ConfigError
    from metagate.gates.policy import ReinforceGate

    with pytest.raises(ConfigError, match="--rl-mode select"):
        ReinforceGate(rl_credit="hypergradient", rl_mode="select")
    with pytest.raises(ConfigError, match="--rl-credit-every must be >= 1, got 0"):
        ReinforceGate(rl_credit="hypergradient", rl_credit_every=0)
    with pytest.raises(ConfigError, match="--rl-credit-entropy must be >= 0, got -1"):
        ReinforceGate(rl_credit="hypergradient", rl_credit_entropy=-1.0)
    with pytest.raises(ConfigError, match="rl_credit|rl-credit"):
        ReinforceGate(rl_credit="dense")


def test_credit_needs_a_linear_head():
    from metagate.data.task import Split
    from metagate.errors import ConfigError
    from metagate.gates.credit import HeadCredit

    run = SimpleNamespace(student=torch.nn.Sequential(torch.nn.Linear(3, 2)), meta=Split(torch.zeros(2, 3),
                          torch.zeros(2, dtype=torch.long)), seed=0, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="linear head.*Sequential"):
        HeadCredit(run, 4.0, 8)
