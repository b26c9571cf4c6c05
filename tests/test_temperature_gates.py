"""The ``ctkd`` and ``temperature`` gates and their compositions through the shared trainer."""

from __future__ import annotations

import math

import pytest
import torch

from metagate.errors import ConfigError, InputError

pytestmark = pytest.mark.usefixtures("one_thread")


def _trainer(task, bank, gate, **train):
    from metagate.trainer import TrainConfig, Trainer

    torch.manual_seed(0)
    cfg = TrainConfig(**{"epochs": 2, "device": "cpu", "progress": False, **train})
    return Trainer(task, task.make_student(), gate, bank, cfg)


def test_ctkd_theta_is_a_student_optimizer_step_on_the_reversed_gradient(digits_noisy, digits_bank):
    """One step: theta moves by SGD on -lambda * dL/dtheta, with dL/dT from autograd of the same loss at T."""
    from metagate.gates.temperature.ctkd import CTKDGate
    from metagate.losses import reduce_weighted, unit_losses

    bank, _ = digits_bank
    gate = CTKDGate(alpha=0.3)
    tr = _trainer(digits_noisy, bank, gate, weight_decay=1e-3)
    assert len(tr.optimizer.param_groups) == 2 and tr.optimizer.param_groups[1]["params"] == [gate.module.theta]
    batch = next(tr.epoch_batches(0))
    theta0 = float(gate.module.theta.detach())
    with torch.no_grad():
        logits = tr.student(batch.x)
    t = torch.tensor(1 + 20 * (1 / (1 + math.exp(-theta0))), requires_grad=True)
    w = torch.tensor([0.3] + [0.7 / 3] * 3).expand(len(batch), -1)
    loss = reduce_weighted(unit_losses(logits, bank.lookup(batch.ids), batch.y, t), w)
    (dl_dt,) = torch.autograd.grad(loss, t)
    lam = gate.curriculum()
    assert lam == pytest.approx((1 - math.cos(math.pi / 10)) / 2)  # epoch 1 of the 10-epoch curriculum
    sig = 1 / (1 + math.exp(-theta0))
    grad = -lam * float(dl_dt) * 20 * sig * (1 - sig)
    tr.train_step(batch)
    lr = tr.optimizer.param_groups[1]["lr"]
    assert float(gate.module.theta.detach()) == pytest.approx(theta0 - lr * (grad + 1e-3 * theta0), rel=1e-5, abs=1e-9)


def test_ctkd_instance_resumes_to_the_same_result(digits_noisy, digits_bank, tmp_path):
    from metagate.gates.temperature.ctkd import CTKDGate

    bank, _ = digits_bank
    opts = {"ctkd_variant": "instance", "ctkd_curriculum_epochs": 1}
    full = _trainer(digits_noisy, bank, CTKDGate(**opts))
    full.run_epoch()
    full.save_checkpoint(tmp_path / "checkpoint.pt")
    full.run_epoch()
    gate = CTKDGate(**opts)
    resumed = _trainer(digits_noisy, bank, gate)
    resumed.load_checkpoint(tmp_path / "checkpoint.pt")
    resumed.run_epoch()
    for (k, p), q in zip(full.student.state_dict().items(), resumed.student.state_dict().values()):
        torch.testing.assert_close(p, q, msg=k, rtol=0, atol=0)
    for p, q in zip(full.gate.student_parameters(), gate.student_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert any(float(p.detach().abs().max()) > 0 for p in gate.module.net[2].parameters())


def test_ctkd_run_writes_temperature_diagnostics(digits_noisy, digits_bank, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    from metagate.run import DistillConfig, run_distill
    from metagate.trainer import TrainConfig

    cfg = DistillConfig(task="digits", noise=0.4, gate="ctkd", gate_options={"ctkd_curriculum_epochs": 1},
                        logdir=str(tmp_path / "r"), train=TrainConfig(epochs=1, device="cpu", progress=False))
    result = run_distill(cfg, task=digits_noisy)
    assert math.isfinite(result["test/nll"])
    ea = EventAccumulator(str(tmp_path / "r"), size_guidance={"tensors": 0, "scalars": 0}).Reload()
    tags = set(ea.Tags()["tensors"]) | set(ea.Tags()["scalars"])
    assert {"temperature/mean", "temperature/lambda", "temperature/tau/all", "temperature/tau/corrupted",
            "temperature/tau/clean", "temperature/tau/teacher_conf_low", "temperature/tau/teacher_conf_high"} <= tags

    def last(tag):
        if tag in ea.Tags()["scalars"]:
            return ea.Scalars(tag)[-1].value
        return float(tensor_util.make_ndarray(ea.Tensors(tag)[-1].tensor_proto))

    assert last("temperature/lambda") == pytest.approx(1.0)
    assert last("temperature/mean") == pytest.approx(15.6, abs=0.2)


def test_ctkd_nan_temperature_stops_the_run_naming_the_gate(digits_noisy, digits_bank, tmp_path):
    from metagate.gates.temperature.ctkd import CTKDGate

    bank, _ = digits_bank
    gate = CTKDGate()
    tr = _trainer(digits_noisy, bank, gate)
    batch = next(tr.epoch_batches(0))
    tr.train_step(batch)
    tr.save_checkpoint(tmp_path / "checkpoint.pt")
    with torch.no_grad():
        gate.module.theta.fill_(float("nan"))
    with pytest.raises(InputError, match="gate 'ctkd'.*NaN"):
        tr.train_step(batch)
    fresh = CTKDGate()
    tr2 = _trainer(digits_noisy, bank, fresh)
    tr2.load_checkpoint(tmp_path / "checkpoint.pt")
    assert math.isfinite(float(fresh.module.theta.detach())) and tr2.step == 1


@pytest.mark.parametrize("options,flag", [
    ({"ctkd_curriculum_epochs": -1}, "--ctkd-curriculum-epochs"), ({"ctkd_t_min": 0.0}, "--ctkd-t-min"),
    ({"ctkd_t_min": 5.0, "ctkd_t_max": 5.0}, "--ctkd-t-max")])
def test_ctkd_bad_options(options, flag):
    from metagate.run import build_gate

    with pytest.raises(ConfigError, match=flag):
        build_gate("ctkd", options)


@pytest.mark.parametrize("options,flag", [
    ({"temp_min": -1.0}, "--temp-min"), ({"temp_min": 4.0, "temp_max": 2.0}, "--temp-max"),
    ({"temp_init": 20.0}, "--temp-init"), ({"temp_warmup_epochs": -1}, "--temp-warmup-epochs")])
def test_temperature_bad_options(options, flag):
    from metagate.run import build_gate

    with pytest.raises(ConfigError, match=flag):
        build_gate("temperature", options)


def test_temperature_gate_learns_in_the_loop_with_warmup(digits_noisy, digits_bank):
    from metagate.gates.temperature.itkd import TemperatureGate

    bank, _ = digits_bank
    gate = TemperatureGate(temp_warmup_epochs=1, rl_episode=2)
    tr = _trainer(digits_noisy, bank, gate)
    before = [p.detach().clone() for p in gate.policy.parameters()]
    b = next(tr.epoch_batches(0))
    out = gate.decide(tr.make_view(b, tr.student(b.x)))
    assert out.tau == 4.0  # warm-up at --tau
    tr.run_epoch()
    assert all(torch.equal(p, q) for p, q in zip(before, gate.policy.parameters()))  # no learning in warm-up
    out = gate.decide(tr.make_view(b, tr.student(b.x)))
    assert out.tau.shape == (len(b),) and float(out.tau.min()) > 1.0 and float(out.tau.max()) < 10.0
    tr.run_epoch()
    assert any(not torch.equal(p, q) for p, q in zip(before, gate.policy.parameters()))
    assert gate.learner.episodes > 0


def test_temperature_gate_samples_its_policy_distribution(digits_noisy, digits_bank):
    """The gate's fused sampling draws what the policy's own distribution draws from the same generator state
    (per-unit noise, then the episode's shared offset), and acts on the mean when not learning."""
    from metagate.gates.temperature.itkd import TemperatureGate

    bank, _ = digits_bank
    gate = TemperatureGate(temp_log_std=-1.0, rl_episode=3)
    tr = _trainer(digits_noisy, bank, gate)
    b = next(tr.epoch_batches(0))
    state = gate.state(tr.make_view(b, tr.student(b.x).detach()))
    gate._act(state, learning=True)  # draws the episode's shared noise
    torch.manual_seed(5)
    got = gate._act(state, learning=True)
    torch.manual_seed(5)
    want = gate.policy.distribution(state).sample(gate._noise)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, gate.policy.mean_action(state))  # it explores
    torch.testing.assert_close(gate._act(state, learning=False), gate.policy.mean_action(state).detach())


def test_deployed_ppo_temperature_policy_acts_as_saved(digits_noisy, digits_bank, tmp_path):
    """train-policy --env temperature writes a zip; the gate deploys its mean action (identical to SB3's)."""
    import numpy as np
    from stable_baselines3 import PPO

    from metagate.cli import build_parser
    from metagate.envs import InstanceTemperatureEnv
    from metagate.gates.temperature.itkd import TemperatureGate
    from metagate.train_policy import train_policy

    bank, _ = digits_bank
    env = InstanceTemperatureEnv(digits_noisy, bank, batch_size=128, episode_steps=10, t_min=2.0, t_max=8.0)
    args = build_parser().parse_args(["train-policy", "--env", "temperature", "--timesteps", "40", "--n-steps", "20",
                                      "--n-epochs", "1", "--out", str(tmp_path / "t.zip")])
    train_policy(args, env=env)
    gate = TemperatureGate(temp_policy=str(tmp_path / "t.zip"))
    assert (gate.t_min, gate.t_max) == (2.0, 8.0) and not gate.learn
    tr = _trainer(digits_noisy, bank, gate)
    b = next(tr.epoch_batches(0))
    view = tr.make_view(b, tr.student(b.x))
    tau = gate.decide(view).tau
    obs = gate.state(view).numpy()
    action, _ = PPO.load(tmp_path / "t.zip", device="cpu").predict(obs, deterministic=True)
    torch.testing.assert_close(tau, env.temperatures_from_action(action))
    tr.train_step(b)
    assert np.isfinite(float(tr.evaluate("select")["nll"]))


def test_temperature_policy_zip_for_another_state_size(tmp_path):
    import gymnasium as gym
    import numpy as np
    from stable_baselines3 import PPO

    from metagate.gates.temperature.itkd import load_temperature_policy
    from metagate.gates.temperature.policy import NUM_STATE
    from metagate.gates.temperature.sb3 import TemperaturePolicySB3, write_temperature_meta

    class Tiny(gym.Env):
        observation_space = gym.spaces.Box(0.0, 5.0, (4, 1, NUM_STATE + 2), np.float32)
        action_space = gym.spaces.Box(-6.0, 6.0, (4, 1), np.float32)

        def reset(self, *, seed=None, options=None):
            return np.zeros(self.observation_space.shape, np.float32), {}

        def step(self, action):
            return np.zeros(self.observation_space.shape, np.float32), 0.0, False, True, {}

    model = PPO(TemperaturePolicySB3, Tiny(), n_steps=4, batch_size=4, device="cpu")
    model.save(tmp_path / "other.zip")
    write_temperature_meta(tmp_path / "other.zip", model.policy, "ppo")
    with pytest.raises(ConfigError, match=rf"--temp-policy .*other.zip.*{NUM_STATE + 2} state features"):
        load_temperature_policy(tmp_path / "other.zip")
    with pytest.raises(ConfigError, match="--temp-policy"):
        load_temperature_policy(tmp_path / "missing.zip")


@pytest.mark.parametrize("name", ["hard+temperature", "meta+ctkd"])
def test_composition_takes_the_mix_of_one_gate_and_the_temperature_of_another(name, digits_noisy, digits_bank):
    from metagate.gates.compose import ComposedGate
    from metagate.run import build_gate

    bank, _ = digits_bank
    gate = build_gate(name, {"meta_param": "net"} if name.startswith("meta") else {})
    assert isinstance(gate, ComposedGate)
    tr = _trainer(digits_noisy, bank, gate)
    b = next(tr.epoch_batches(0))
    view = tr.make_view(b, tr.student(b.x))
    out = gate.decide(view)
    mix = gate.mix.decide(view)
    torch.testing.assert_close(out.weights, mix.weights)
    assert torch.is_tensor(out.tau) and out.logit_grad is None
    ref = gate.temperature.decide(view).tau
    torch.testing.assert_close(out.tau.detach().expand_as(ref), ref.detach())
    tr.run_epoch()
    assert math.isfinite(tr.evaluate("select")["nll"])
    if name.endswith("ctkd"):
        assert len(tr.optimizer.param_groups) == 2
