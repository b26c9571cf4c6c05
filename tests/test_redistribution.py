"""ITKD's reward redistribution for the temperature gate (issue #14): the return model credits the right units."""

from __future__ import annotations

import copy

import pytest
import torch

from metagate.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def _planted_episode(g, n=32):
    """States ``[n, 3]`` whose first feature marks half the units (say, corrupted ones); actions ``[n]``; the
    return: only marked units' actions matter (2 per unit of action), plus a state-only term and an offset."""
    s = torch.rand(n, 3, generator=g)
    s[:, 0] = (torch.arange(n) % 2).float()
    a = torch.randn(n, generator=g)
    per_unit = 2.0 * a * s[:, 0] + 0.3 * s[:, 1]
    ret = float(per_unit.sum()) + 1.0 + 0.01 * float(torch.randn(1, generator=g))
    return s, a, ret, per_unit


def test_return_model_assigns_the_planted_credit_to_the_right_units():
    from metagate.gates.temperature.redistribution import ReturnDecomposition

    g = torch.Generator().manual_seed(0)
    model = ReturnDecomposition(3, window=200)
    s, a, ret, _ = _planted_episode(g)
    assert not model.fitted
    torch.testing.assert_close(model.redistribute(s, a, ret), torch.full((32,), ret / 32))  # unfitted: spread
    for _ in range(150):
        model.add(*_planted_episode(g)[:3])
    assert model.fitted and model.r2 > 0.999
    s, a, ret, per_unit = _planted_episode(g)
    r = model.redistribute(s, a, ret)
    assert float(r.sum()) == pytest.approx(ret, abs=1e-4)  # the credit adds up to the episode's reward
    # each unit gets its own share (the offset 1.0 and the noise spread equally): within 0.03 of the truth
    expected = per_unit + (ret - float(per_unit.sum())) / 32
    assert float((r - expected).abs().max()) < 0.03
    marked = s[:, 0] == 1
    # the action of an unmarked unit earns it nothing: its credit does not follow its action
    slope_unmarked = torch.linalg.lstsq(torch.stack([a[~marked], torch.ones(16)], 1), r[~marked, None]).solution[0]
    slope_marked = torch.linalg.lstsq(torch.stack([a[marked], torch.ones(16)], 1), r[marked, None]).solution[0]
    assert abs(float(slope_unmarked)) < 0.05 and float(slope_marked) == pytest.approx(2.0, abs=0.05)
    # the state round trip refits the same model
    again = ReturnDecomposition(3, window=200)
    again.load_state_dict(model.state_dict())
    torch.testing.assert_close(again.redistribute(s, a, ret), r)


def test_unit_rewards_spread_equally_give_plain_reinforce_step():
    """finish_units with r_i = R / n is plain REINFORCE's step; with the whole credit on one unit only that
    unit's log-probability moves the policy."""
    from metagate.gates.temperature.policy import TemperaturePolicy
    from metagate.policies.reinforce import ReinforceLearner

    torch.manual_seed(0)
    pol = TemperaturePolicy(hidden=8, log_std=-0.5, shared_log_std=None, num_state=3)
    feats = torch.rand(2, 6, 1, 3)
    acts = [pol.distribution(f).sample() for f in feats]

    def run(unit_rewards):
        p = copy.deepcopy(pol)
        lrn = ReinforceLearner(p, lr=1e-2)
        lrn.baseline, lrn.reward_var = 0.5, 4.0
        for f, a in zip(feats, acts):
            lrn.record(f, a)
        if unit_rewards is None:
            lrn.finish(3.0)
        else:
            lrn.finish_units(3.0, unit_rewards)
        return p

    plain, spread = run(None), run(torch.full((12,), 3.0 / 12))
    for (k, x), y in zip(plain.state_dict().items(), spread.state_dict().values()):
        torch.testing.assert_close(x, y, msg=k)
    assert any(not torch.equal(x, y) for x, y in zip(plain.state_dict().values(), pol.state_dict().values()))
    # credit on one unit: the step is that unit's score times its advantage alone
    one = torch.zeros(12)
    one[4] = 3.0
    p = copy.deepcopy(pol)
    lrn = ReinforceLearner(p, lr=1e-2)
    lrn.baseline, lrn.reward_var = 0.0, 4.0
    for f, a in zip(feats, acts):
        lrn.record(f, a)
    all_f, all_a = lrn.episode_units()
    dist = pol.distribution(all_f)
    lp = dist.unit_log_prob(all_a)
    torch.testing.assert_close(lp.sum(), dist.log_prob(all_a))  # per-unit scores add up to the joint one
    adv = 12 * 3.0 / 2.0  # n (r - b/n) / s for the credited unit, 0 for the others (baseline 0)
    ref = copy.deepcopy(pol)
    torch.optim.Adam(ref.parameters(), lr=1e-2)
    loss = -(min(adv, 5.0) * ref.distribution(all_f).unit_log_prob(all_a)[4]) / 2
    grads = torch.autograd.grad(loss, [q for q in ref.parameters()], allow_unused=True)
    lrn.finish_units(3.0, one)
    for (name, q0), q1, gr in zip(pol.named_parameters(), p.parameters(), grads):
        if gr is None or float(gr.abs().max()) == 0:
            continue
        step = q1.detach() - q0.detach()
        # Adam's first step moves each weight by lr * sign(grad) (where the gradient is not tiny)
        big = gr.abs() > 1e-6
        torch.testing.assert_close(step[big], -1e-2 * gr[big].sign(), rtol=1e-3, atol=1e-5, msg=name)


def test_temperature_gate_redistributed_runs_and_resumes(digits_noisy, digits_bank, tmp_path):
    from metagate.gates.temperature.itkd import TemperatureGate
    from metagate.trainer import TrainConfig, Trainer

    bank, _ = digits_bank

    def trainer(gate):
        torch.manual_seed(0)
        return Trainer(digits_noisy, digits_noisy.make_student(), gate, bank,
                       TrainConfig(epochs=3, batch_size=64, device="cpu", progress=False,
                                   eval_test_every_epoch=False))

    opts = dict(temp_reward="redistributed", rl_episode=1, temp_rrd_window=40)
    gate = TemperatureGate(**opts)
    assert gate.policy.shared_log_std is None and float(gate.policy.unit_log_std.detach()) == -0.5 and not gate.antithetic
    tr = trainer(gate)
    tr.run_epoch()
    tr.run_epoch()
    model = gate.redistribution
    assert model is not None and model.fitted and len(model.sums) == 2 * tr.steps_per_epoch - 1
    assert "advantage_spread" in gate._last and gate._last["advantage_spread"] > 0
    tr.save_checkpoint(tmp_path / "checkpoint.pt")
    saved = len(model.sums)
    tr.run_epoch()
    assert len(model.sums) == 40  # the window
    resumed_gate = TemperatureGate(**opts)
    resumed = trainer(resumed_gate)
    resumed.load_checkpoint(tmp_path / "checkpoint.pt")
    assert len(resumed_gate.redistribution.sums) == saved
    resumed.run_epoch()
    torch.testing.assert_close(torch.stack(resumed_gate.redistribution.sums), torch.stack(model.sums))
    with pytest.raises(ConfigError, match="temp-reward"):
        TemperatureGate(temp_reward="per-step")
