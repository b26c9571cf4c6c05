"""Temperature pieces: per-unit tau in the loss, gradient reversal, CTKD's curriculum and modules,
the ITKD state and policy, the InstanceTemperature env and the SB3 temperature policy."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from metagate.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


# -- the loss with a per-unit temperature ------------------------------------------------------------
def _softmax(z: list[float], t: float) -> list[float]:
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


def test_unit_losses_per_unit_tau_against_hand_computation():
    from metagate.losses import reduce_weighted, unit_losses

    s = [[1.0, -0.5, 0.2], [0.3, 0.3, -1.0], [-2.0, 1.0, 0.5]]
    t = [[[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]], [[-1.0, 2.0, 0.0], [0.0, 1.0, 1.0]], [[0.0, 0.0, 3.0], [1.0, -1.0, 0.0]]]
    y = [0, 1, 2]
    taus = [1.0, 2.5, 7.0]
    hand = []
    for i in range(3):
        row = [-math.log(_softmax(s[i], 1.0)[y[i]])]
        q = _softmax(s[i], taus[i])
        for k in range(2):
            p = _softmax(t[i][k], taus[i])
            row.append(taus[i] ** 2 * sum(pc * (math.log(pc) - math.log(qc)) for pc, qc in zip(p, q)))
        hand.append(row)
    got = unit_losses(torch.tensor(s, dtype=torch.float64), torch.tensor(t, dtype=torch.float64), torch.tensor(y),
                      torch.tensor(taus, dtype=torch.float64))
    torch.testing.assert_close(got, torch.tensor(hand, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    w = torch.tensor([[0.2, 0.4, 0.4], [1.0, 0.0, 0.0], [0.0, 0.5, 0.5]], dtype=torch.float64)
    ref = sum(sum(a * b for a, b in zip(wr, hr)) for wr, hr in zip(w.tolist(), hand)) / 3
    assert float(reduce_weighted(got, w)) == pytest.approx(ref, rel=1e-12)


# -- gradient reversal and the curriculum -----------------------------------------------------------
@pytest.mark.parametrize("epoch", [0, 1, 5, 10, 30])
def test_gradient_reversal_is_exact_at_curriculum_points(epoch):
    from metagate.gates.temperature.reversal import cosine_curriculum, grad_reverse

    lam = cosine_curriculum(epoch, 10)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y = grad_reverse(x, lam)
    assert torch.equal(y, x)  # forward: identity
    g = torch.randn(4, 3, dtype=torch.float64)
    (gx,) = torch.autograd.grad(y, x, g)
    assert torch.equal(gx, -lam * g)
    # composed with a nonlinear f: the gradient is -lam times f's, checked against central differences
    w = torch.randn(3, dtype=torch.float64)
    f = lambda v: torch.sin(v @ w).sum()  # noqa: E731
    (ga,) = torch.autograd.grad(f(grad_reverse(x, lam)), x)
    fd = torch.zeros_like(x)
    for i in range(4):
        for j in range(3):
            e = torch.zeros_like(x)
            e[i, j] = 1e-6
            fd[i, j] = (f(x.detach() + e) - f(x.detach() - e)) / 2e-6
    torch.testing.assert_close(ga, -lam * fd, rtol=1e-7, atol=1e-8)


def test_cosine_curriculum_values():
    from metagate.gates.temperature.reversal import cosine_curriculum

    # independent: the official CosineDecay(max=0, min=-1, loops=10) is -lambda
    def official(i, loops=10):
        i = min(max(i, 0), loops)
        return (math.cos(i * math.pi / loops) + 1.0) * 0.5 * (0 - (-1)) + (-1)

    for e in [0, 1, 2, 5, 9, 10, 11, 240]:
        assert cosine_curriculum(e, 10) == pytest.approx(-official(e), abs=1e-15)
    assert cosine_curriculum(0, 10) == 0.0
    assert cosine_curriculum(1, 10) == pytest.approx(0.0244717418, abs=1e-9)
    assert cosine_curriculum(5, 10) == pytest.approx(0.5)
    assert cosine_curriculum(10, 10) == 1.0 and cosine_curriculum(25, 10) == 1.0
    assert cosine_curriculum(0, 0) == 1.0  # no curriculum: full reversal from the start
    with pytest.raises(ConfigError, match="--ctkd-curriculum-epochs"):
        cosine_curriculum(0, -1)


def test_global_temperature_defaults_and_reversed_gradient():
    from metagate.gates.temperature.reversal import GlobalTemperature

    mod = GlobalTemperature()
    t = mod(0.7)
    assert float(t.detach()) == pytest.approx(1 + 20 / (1 + math.exp(-1.0)))  # 15.62: the official start
    (t**2).backward()  # d/dtheta of T^2 is 2 T * 20 sigmoid'(1); reversed and scaled by 0.7
    sig = 1 / (1 + math.exp(-1.0))
    assert float(mod.theta.grad) == pytest.approx(-0.7 * 2 * float(t.detach()) * 20 * sig * (1 - sig), rel=1e-6)


def test_instance_temperature_starts_global_and_reverses():
    from metagate.gates.temperature.reversal import GlobalTemperature, InstanceTemperature

    torch.manual_seed(0)
    net = InstanceTemperature(num_classes=5, hidden=8)
    s = torch.log_softmax(torch.randn(6, 5), -1)
    t = torch.log_softmax(torch.randn(6, 2, 5), -1)
    torch.testing.assert_close(net(s, t, 1.0), GlobalTemperature()(1.0).expand(6))
    with torch.no_grad():
        net.net[2].weight.normal_()
    weights = torch.randn(6)
    grads = {}
    for lam in (0.0, 0.3, 1.0):
        net.zero_grad()
        (net(s, t, lam) * weights).sum().backward()
        grads[lam] = [p.grad.clone() for p in net.parameters()]
    plain = InstanceTemperature(num_classes=5, hidden=8)
    plain.load_state_dict(net.state_dict())
    z = plain.net(torch.cat([s.exp(), t.exp().mean(1)], -1)).squeeze(-1)
    (torch.sigmoid(z) * 20 * weights).sum().backward()
    for lam in (0.0, 0.3, 1.0):
        for g, p in zip(grads[lam], plain.parameters()):
            torch.testing.assert_close(g, -lam * p.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("t_min,t_max,flag", [(0.0, 5.0, "--ctkd-t-min"), (-1.0, 5.0, "--ctkd-t-min"),
                                              (3.0, 3.0, "--ctkd-t-max"), (4.0, 2.0, "--ctkd-t-max")])
def test_bad_temperature_range(t_min, t_max, flag):
    from metagate.gates.temperature.reversal import GlobalTemperature, InstanceTemperature

    with pytest.raises(ConfigError, match=flag):
        GlobalTemperature(t_min, t_max)
    with pytest.raises(ConfigError, match=flag):
        InstanceTemperature(10, t_min=t_min, t_max=t_max)


# -- ITKD state and policy --------------------------------------------------------------------------
def test_itkd_state_takes_the_second_largest_probability():
    from metagate.gates.temperature.policy import NUM_STATE, TemperatureState, temperature_state

    # student probabilities 0.5, 0.3, 0.15, 0.05: margin 0.2 (the second *smallest* would give 0.35)
    s = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    t = torch.log(torch.tensor([[[0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1]]]))  # mean: 0.4, 0.1, 0.4, 0.1
    st = temperature_state(s, t, torch.tensor([0]))
    assert st.shape == (1, 1, NUM_STATE)
    torch.testing.assert_close(st[0, 0, :3], torch.tensor([0.5, 0.4, 0.2]))
    torch.manual_seed(0)
    s, t, y = torch.randn(20, 4) * 3, torch.randn(20, 2, 4) * 3, torch.randint(0, 4, (20,))
    fast = TemperatureState(t, y)
    ids = torch.tensor([3, 0, 7, 19])
    torch.testing.assert_close(fast.state(s[ids], ids, 0.4), temperature_state(s[ids], t[ids], y[ids], 0.4),
                               rtol=1e-5, atol=1e-5)


def test_temperature_policy_range_init_and_errors():
    from metagate.gates.temperature.policy import (
        ACTION_BOUND,
        TemperaturePolicy,
        action_temperature,
        temperature_action,
    )

    pol = TemperaturePolicy(t_min=0.5, t_max=10.0, init=4.0)
    x = torch.rand(16, 1, pol.num_state)
    tau = pol.temperature(pol.mean_action(x)).detach()
    assert tau.shape == (16,) and float((tau - 4.0).abs().max()) < 0.05
    a = torch.tensor([-100.0, -ACTION_BOUND, 0.0, ACTION_BOUND, 100.0])
    t = action_temperature(a, 0.5, 10.0)
    assert float(t[0]) == float(t[1]) and float(t[3]) == float(t[4])  # clipped to the box
    assert float(t[2]) == pytest.approx(5.25) and 0.5 < float(t.min()) and float(t.max()) < 10.0
    assert float(action_temperature(torch.tensor(temperature_action(2.0, 0.5, 10.0)), 0.5, 10.0)) == \
        pytest.approx(2.0, rel=1e-6)
    with pytest.raises(ConfigError, match="--temp-min"):
        TemperaturePolicy(t_min=0.0)
    with pytest.raises(ConfigError, match="--temp-max"):
        TemperaturePolicy(t_min=5.0, t_max=2.0)
    with pytest.raises(ConfigError, match="--temp-init"):
        TemperaturePolicy(t_min=1.0, t_max=3.0, init=4.0)


def test_reinforce_moves_the_temperature_toward_the_best_one():
    """A toy where temperature 8 is always best: REINFORCE moves every unit's temperature from 4 toward it."""
    from metagate.gates.temperature.policy import TemperaturePolicy
    from metagate.policies.reinforce import ReinforceLearner

    torch.manual_seed(0)
    pol = TemperaturePolicy(t_min=1.0, t_max=10.0, init=4.0, log_std=-0.5, shared_log_std=None)
    learner = ReinforceLearner(pol, lr=3e-2, baseline_decay=0.9)
    states = torch.rand(32, 1, pol.num_state)
    start = float(pol.temperature(pol.mean_action(states)).detach().mean())
    for _ in range(150):
        with torch.no_grad():
            a = pol.distribution(states).sample()
        learner.record(states, a)
        learner.finish(-float(((pol.temperature(a) - 8.0) ** 2).mean()))
    end = pol.temperature(pol.mean_action(states)).detach()
    assert start == pytest.approx(4.0, abs=0.05)
    assert float(end.mean()) > 7.0 and float((end - 8.0).abs().max()) < 1.5


# -- the environment --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_clean():
    from metagate.data import get_task

    return get_task("digits")


@pytest.fixture(scope="module")
def synth_bank(digits_clean):
    from metagate.envs.synthetic import synthetic_bank

    return synthetic_bank(digits_clean, accuracies=(0.95, 0.9), adversarial=False)


def make_env(task, bank, **kw):
    from metagate.envs import InstanceTemperatureEnv

    kw.setdefault("batch_size", 16)
    kw.setdefault("episode_steps", 6)
    return InstanceTemperatureEnv(task, bank, **kw)


def test_temperature_env_passes_both_checkers(digits_clean, synth_bank):
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SB3 mistakes a [B, 1, S] float Box for an image
        check_env(make_env(digits_clean, synth_bank), skip_render_check=True)
        sb3_check_env(make_env(digits_clean, synth_bank), warn=False)


def test_temperature_env_registered_and_steps_are_trainer_steps(digits_clean, synth_bank):
    import gymnasium

    import metagate  # noqa: F401  (registers the envs)
    from metagate.gates.base import GateOutput
    from metagate.gates.fixed import FixedGate, fixed_weights
    from metagate.gates.temperature.policy import NUM_STATE
    from metagate.trainer import TrainConfig, Trainer

    env = gymnasium.make("metagate/InstanceTemperature-v0", task=digits_clean, bank=synth_bank, batch_size=16,
                         episode_steps=4, t_min=2.0, t_max=6.0).unwrapped
    obs, info = env.reset(seed=1)
    assert obs.shape == (16, 1, NUM_STATE) and obs.dtype == np.float32
    rng = np.random.default_rng(0)
    batches, actions, truncated = [], [], False
    while not truncated:
        a = rng.uniform(-6, 6, env.action_space.shape).astype(np.float32)
        batches.append(env._batch)
        actions.append(a)
        obs, r, _, truncated, step_info = env.step(a)
        assert np.isfinite(r)
        tau = step_info["temperatures"]
        assert tau.shape == (16,) and tau.min() > 2.0 and tau.max() < 6.0
    assert len(actions) == 4
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(info["student_seed"])
        student = digits_clean.make_student()
    tr = Trainer(digits_clean, student, FixedGate(), synth_bank, TrainConfig(seed=info["student_seed"],
                                                                              **env.train_config))
    tr.set_total_steps(env.episode_steps)
    w = fixed_weights(16, 2, env.alpha, "cpu", torch.float32)
    for b, a in zip(batches, actions):
        tau = 2.0 + 4.0 * torch.sigmoid(torch.as_tensor(a).reshape(-1))
        tr.train_step(b, GateOutput(w, tau))
    for (k, p), q in zip(tr.student.state_dict().items(), env.trainer.student.state_dict().values()):
        torch.testing.assert_close(p, q, msg=k)


def test_temperature_env_bad_range(digits_clean, synth_bank):
    with pytest.raises(ConfigError, match="--temp-min"):
        make_env(digits_clean, synth_bank, t_min=0.0)
    with pytest.raises(ConfigError, match="--temp-max"):
        make_env(digits_clean, synth_bank, t_min=3.0, t_max=1.0)


def test_sb3_temperature_policy_save_load_gives_identical_actions(digits_clean, synth_bank, tmp_path):
    from stable_baselines3 import PPO

    from metagate.gates.temperature.sb3 import TemperaturePolicySB3

    env = make_env(digits_clean, synth_bank, episode_steps=10)
    model = PPO(TemperaturePolicySB3, env, n_steps=8, batch_size=8, n_epochs=1, seed=0, device="cpu",
                policy_kwargs=dict(t_min=env.t_min, t_max=env.t_max, label_alpha=env.alpha))
    model.learn(total_timesteps=16)
    model.save(tmp_path / "temp.zip")
    loaded = PPO.load(tmp_path / "temp.zip", device="cpu")
    obs, _ = env.reset(seed=2)
    a1, _ = model.predict(obs, deterministic=True)
    a2, _ = loaded.predict(obs, deterministic=True)
    np.testing.assert_array_equal(a1, a2)
    assert loaded.policy.t_max == env.t_max and loaded.policy.num_state == obs.shape[-1]
    x = torch.as_tensor(obs)
    torch.testing.assert_close(loaded.policy.temperature(loaded.policy.mean_action(x)),
                               env.temperatures_from_action(a1))
