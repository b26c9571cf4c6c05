"""The equivariant stable-baselines3 policy: equivariance, distribution, PPO run, save/load, deployment."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gymnasium import spaces

pytestmark = pytest.mark.usefixtures("one_thread")


def _policy(b=8, k=3, **kw):
    from metagate.policies.sb3 import TeacherWeightingPolicy

    obs = spaces.Box(0.0, 5.0, (b, k, 11), np.float32)
    act = spaces.Box(-1.0, 1.0, (b, k), np.float32)
    torch.manual_seed(0)
    return TeacherWeightingPolicy(obs, act, lambda _: 1e-3, **kw)


def test_encoder_and_policy_are_permutation_equivariant():
    from metagate.policies import ReinforcePolicy, TeacherEncoder

    torch.manual_seed(0)
    x = torch.rand(4, 8, 3, 11) * 2
    perm = torch.tensor([2, 0, 1])
    enc = TeacherEncoder(11, 16)
    torch.testing.assert_close(enc(x[:, :, perm]), enc(x)[:, :, perm])
    pol = _policy()
    with torch.no_grad():
        for p in pol.actor.head.parameters():  # make the head non-trivial
            p.normal_()
        mu, mu_p = pol.mean_logits(x), pol.mean_logits(x[:, :, perm])
        torch.testing.assert_close(mu_p, mu[..., perm])
        v, v_p = pol.predict_values(x.reshape(4, -1)), pol.predict_values(x[:, :, perm].reshape(4, -1))
        torch.testing.assert_close(v_p, v)  # the critic pools: invariant
        a = torch.rand(4, 8, 3) * 2 - 1
        lp = pol.evaluate_actions(x.reshape(4, -1), a.reshape(4, -1))[1]
        lp_p = pol.evaluate_actions(x[:, :, perm].reshape(4, -1), a[..., perm].reshape(4, -1))[1]
        torch.testing.assert_close(lp_p, lp)
    rp = ReinforcePolicy("select")
    with torch.no_grad():
        torch.testing.assert_close(rp.mean_logits(x[0][:, perm]), rp.mean_logits(x[0])[:, perm])
    # one policy serves any number of teachers and units
    assert pol.mean_logits(torch.rand(5, 7, 11)).shape == (5, 7)


@pytest.mark.parametrize("unit,shared", [(-1.0, None), (-1.0, -0.5), (None, -0.5)])
def test_teacher_gaussian_density(unit, shared):
    from metagate.policies import TeacherGaussian

    torch.manual_seed(0)
    b, k = 6, 3
    mu = torch.randn(b, k)
    lu = None if unit is None else torch.tensor(unit)
    ls = None if shared is None else torch.tensor(shared)
    dist = TeacherGaussian(mu, lu, ls)
    a = dist.sample()
    if unit is not None:  # compare with torch's multivariate normal, column by column
        cov = np.exp(2 * unit) * torch.eye(b) + (0 if shared is None else np.exp(2 * shared)) * torch.ones(b, b)
        ref = sum(torch.distributions.MultivariateNormal(mu[:, j], cov).log_prob(a[:, j]) for j in range(k))
        torch.testing.assert_close(dist.log_prob(a), ref, rtol=1e-4, atol=1e-4)
        ent = k * torch.distributions.MultivariateNormal(mu[:, 0], cov).entropy()
        torch.testing.assert_close(dist.entropy(), ent, rtol=1e-4, atol=1e-4)
    else:  # shared only: every unit of a teacher gets the same offset
        d = a - mu
        torch.testing.assert_close(d, d[:1].expand_as(d))
        eps = d[0] / np.exp(shared)
        ref = torch.distributions.Normal(0.0, 1.0).log_prob(eps).sum() - k * shared
        torch.testing.assert_close(dist.log_prob(a), ref, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short PPO run (a few hundred steps on digits with planted teachers) through train-policy."""
    from metagate.cli import build_parser
    from metagate.data import get_task
    from metagate.envs import TeacherWeightingEnv
    from metagate.envs.synthetic import synthetic_bank
    from metagate.train_policy import train_policy

    task = get_task("digits")
    env = TeacherWeightingEnv(task, synthetic_bank(task), batch_size=32, episode_steps=20)
    out = tmp_path_factory.mktemp("policy") / "policy.zip"
    args = build_parser().parse_args(["train-policy", "--task", "digits", "--algo", "ppo", "--timesteps", "200",
                                      "--n-steps", "20", "--out", str(out)])
    model = train_policy(args, env=env)
    return model, out, env


def test_ppo_run_writes_tensorboard(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out, _ = trained
    logdir = out.with_name("policy-tb")
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    for t in ("rollout/ep_rew_mean", "train/value_loss", "train/policy_gradient_loss", "weights/mean_teacher2"):
        assert t in tags["scalars"], (t, tags["scalars"])
    for t in ("weights/teacher0", "weights/teacher1", "weights/teacher2"):
        assert t in tags["histograms"], (t, tags["histograms"])
    assert len(acc.Scalars("weights/mean_teacher0")) >= 5  # one per rollout


def test_save_load_round_trip_gives_identical_actions(trained):
    from stable_baselines3 import PPO

    from metagate.gates.policy import load_sb3_policy

    model, out, env = trained
    obs, _ = env.reset(seed=11)
    a0, _ = model.predict(obs, deterministic=True)
    loaded = PPO.load(out, device="cpu")
    a1, _ = loaded.predict(obs, deterministic=True)
    np.testing.assert_array_equal(a0, a1)
    pol = load_sb3_policy(out)  # the gate's loader: algorithm-agnostic
    with torch.no_grad():
        a2 = pol.mean_logits(torch.as_tensor(obs)).numpy()
    np.testing.assert_allclose(a2, a0, atol=1e-6)
    assert pol.weight_temperature == env.temperature and pol.label_alpha == env.alpha


def test_a2c_runs(tmp_path):
    from metagate.cli import build_parser
    from metagate.data import get_task
    from metagate.envs import TeacherWeightingEnv
    from metagate.envs.synthetic import synthetic_bank
    from metagate.gates.policy import load_sb3_policy
    from metagate.train_policy import train_policy

    task = get_task("digits")
    env = TeacherWeightingEnv(task, synthetic_bank(task), batch_size=16, episode_steps=10)
    out = tmp_path / "a2c.zip"
    args = build_parser().parse_args(["train-policy", "--algo", "a2c", "--timesteps", "20", "--n-steps", "5",
                                      "--out", str(out)])
    train_policy(args, env=env)
    assert load_sb3_policy(out).mean_logits(torch.rand(4, 3, 11)).shape == (4, 3)


def test_distill_with_trained_policy(trained, tmp_path, capsys):
    from metagate.data import get_task
    from metagate.envs.synthetic import synthetic_bank
    from metagate.gates.policy import PolicyGate
    from metagate.trainer import TrainConfig, Trainer

    _, out, _ = trained
    task = get_task("digits")
    bank = synthetic_bank(task)
    for online in (False, True):
        gate = PolicyGate(policy=out, online=online, rl_episode=2)
        tr = Trainer(task, task.make_student(), gate, bank, TrainConfig(epochs=1, batch_size=64, progress=False,
                                                                         device="cpu"))
        before = [p.detach().clone() for p in gate.parameters()]
        stats = tr.run_epoch()
        assert abs(stats["weight_label"] - 0.5) < 1e-6
        changed = any(not torch.equal(a, b) for a, b in zip(before, gate.parameters()))
        assert changed == online  # mean action is frozen; --online learns
        state = gate.state_dict()
        gate.load_state_dict(state)


def test_policy_gate_errors(tmp_path):
    from metagate.errors import ConfigError
    from metagate.gates.policy import PolicyGate

    with pytest.raises(ConfigError, match="--policy"):
        PolicyGate()
    with pytest.raises(ConfigError, match="no such file"):
        PolicyGate(policy=tmp_path / "missing.zip")
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ConfigError):
        PolicyGate(policy=bad)


def test_cli_distill_gate_policy(trained, digits_bank, tmp_path, capsys):
    from metagate.cli import main

    _, out, _ = trained
    run = tmp_path / "run"
    assert main(["distill", "--task", "digits", "--noise", "0.4", "--teachers", "3", "--adversarial-teacher",
                 "--gate", "policy", "--policy", str(out), "--epochs", "1", "--logdir", str(run), "--device", "cpu",
                 "--no-progress"]) == 0
    assert "gate/mean_w_teacher2" in capsys.readouterr().out
    assert main(["distill", "--task", "digits", "--noise", "0.4", "--gate", "policy", "--policy",
                 str(tmp_path / "nope.zip"), "--epochs", "1", "--logdir", str(tmp_path / "r2"), "--device", "cpu",
                 "--no-progress"]) == 2


@pytest.mark.slow
def test_ppo_with_defaults_learns_to_avoid_a_planted_teacher(tmp_path):
    """``metagate train-policy`` with its defaults (5000 steps, ~10 s) on digits with real CNN teachers and
    a permuted one: the deployed policy gives the permuted teacher < 0.1 of the KD weight on a new student
    (measured 0.055-0.070 over agent seeds 0-2; equal weights give 0.333)."""
    from metagate.cli import build_parser
    from metagate.gates.policy import PolicyGate, load_sb3_policy
    from metagate.run import DistillConfig, load_task
    from metagate.teachers.build import load_teachers
    from metagate.train_policy import train_policy
    from metagate.trainer import TrainConfig, Trainer, seed_everything

    out = tmp_path / "policy.zip"
    args = build_parser().parse_args(["train-policy", "--task", "digits", "--noise", "0.4", "--teachers", "3",
                                      "--adversarial-teacher", "--out", str(out)])
    train_policy(args)
    cfg = DistillConfig(task="digits", noise=0.4, teachers=3, adversarial_teacher=True,
                        train=TrainConfig(device="cpu", progress=False))
    task = load_task(cfg)
    bank, _ = load_teachers(cfg, task, progress=False)
    seed_everything(100)
    tr = Trainer(task, task.make_student(None), PolicyGate(module=load_sb3_policy(out)), bank,
                 TrainConfig(epochs=5, seed=100, device="cpu", progress=False, eval_test_every_epoch=False))
    for _ in range(5):
        tr.run_epoch()
    kd = tr.unit_weights[:, 1:]
    share = (kd / kd.sum(1, keepdim=True)).mean(0)
    assert float(share[-1]) < 0.1, share.tolist()
