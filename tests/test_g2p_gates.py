"""Learned gates on token units (g2p): meta net / table per token, reinforce per token or per word, a deployed
policy trained on the token env, the temperature gates. Small subset, random-init teachers, one epoch."""

from __future__ import annotations

import math

import pytest
import torch

from metagate.data import get_task
from metagate.data.task import Task
from metagate.errors import ConfigError
from metagate.gates.meta import MetaGate
from metagate.gates.meta.learner import check_table_size
from metagate.gates.policy import PolicyGate, ReinforceGate
from metagate.gates.temperature.ctkd import CTKDGate
from metagate.gates.temperature.itkd import TemperatureGate
from metagate.seq_metrics import sequence_metrics
from metagate.seq_models import GRUSeq2Seq
from metagate.teachers.build import build_bank
from metagate.trainer import TrainConfig, Trainer
from metagate.units import PAD_ID

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def g2p() -> tuple[Task, object]:
    task = get_task("g2p", subset=300, noise=0.2)
    torch.manual_seed(0)
    teachers = [GRUSeq2Seq(len(task.info["chars"]), task.num_classes, 16, 24).eval() for _ in range(2)]
    return task, build_bank(task, [("a", teachers[0]), ("b", teachers[1])])[0]


def _fit(task: Task, bank, gate, epochs: int = 1) -> Trainer:
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=epochs, batch_size=32, lr=3e-3, optimizer="adam", weight_decay=0.0, device="cpu",
                      progress=False, eval_test_every_epoch=False)
    tr = Trainer(task, task.make_student(), gate, bank, cfg)
    for _ in range(epochs):
        tr.run_epoch()
    return tr


def _check_run(task: Task, tr: Trainer) -> torch.Tensor:
    """Finite PER/WER on test; per-token weights of every training token position, none on padding."""
    m = sequence_metrics(tr.student, task.test)
    assert math.isfinite(m["per"]) and 0 < m["per"] < 10 and 0 <= m["wer"] <= 1 and math.isfinite(m["nll"])
    n, t = task.train.y.shape
    w = tr.unit_weights
    assert w.shape == (n * t, 3) and tr.num_train_units == n * t
    pad = (task.train.y == PAD_ID).reshape(-1)
    assert bool(pad.any()) and (w[pad] == 0).all()  # padding tokens get no weight
    assert (w[~pad].sum(1) > 0).all()  # every real token was decided (one epoch visits every word)
    return w.view(n, t, 3)


def test_meta_net_per_token(g2p) -> None:
    task, bank = g2p
    gate = MetaGate(meta_param="net")
    tr = _fit(task, bank, gate)
    w = _check_run(task, tr)
    real = task.train.y != PAD_ID
    # weights come from token features: they differ between the tokens of one word
    assert float(w[real][:, 0].std()) > 0
    assert gate.updates == tr.step > 0 and math.isfinite(gate.last_hypergrad_norm)


def test_meta_table_per_token_position(g2p) -> None:
    task, bank = g2p
    gate = MetaGate(meta_param="table", meta_lr=50.0)
    tr = _fit(task, bank, gate)
    n, t = task.train.y.shape
    assert gate.param.raw.shape == (n * t, 3)  # one row per token position
    w = _check_run(task, tr)
    real = task.train.y != PAD_ID
    c = gate.config
    init = torch.tensor([c.init_label, c.init_teacher(2), c.init_teacher(2)])
    moved = (w[real] - init).abs().amax(1) > 1e-6
    assert 0.5 < float(moved.float().mean())  # the look-ahead moved the rows of the real tokens it saw
    rows = gate.param.raw.detach().view(n, t, 3)
    assert torch.equal(rows[~real], init.expand(int((~real).sum()), 3))  # padding rows never get a hypergradient


def test_meta_table_too_big_is_refused_with_its_size() -> None:
    check_table_size(1000, 3, torch.float32, limit=12_000)
    with pytest.raises(ConfigError, match=r"1001 units x 3 columns.*--meta-param net"):
        check_table_size(1001, 3, torch.float32, limit=12_000)


@pytest.mark.parametrize("unit", ["token", "word"])
def test_reinforce_per_token_or_word(g2p, unit: str) -> None:
    task, bank = g2p
    gate = ReinforceGate(rl_unit=unit, rl_episode=2, rl_log_std=-0.5)
    before = [p.detach().clone() for p in gate.parameters()]
    tr = _fit(task, bank, gate)
    assert any(not torch.equal(a, b) for a, b in zip(before, gate.parameters()))  # REINFORCE updated it
    w = _check_run(task, tr)
    real = task.train.y != PAD_ID
    kd = w[..., 1:] / w[..., 1:].sum(-1, keepdim=True).clamp_min(1e-12)
    first = kd[:, :1].expand_as(kd)
    same_in_word = ((kd - first).abs().amax(-1) < 1e-6)[real]
    if unit == "word":
        assert bool(same_in_word.all())  # one decision per word, on every token
    else:
        assert not bool(same_in_word.all())  # per-unit noise: tokens of a word differ
    torch.testing.assert_close(w[real][:, 0], torch.full((int(real.sum()),), 0.5))  # --alpha 0.5 label share


def test_deployed_policy_trained_on_the_token_env(g2p, tmp_path) -> None:
    from metagate.cli import build_parser
    from metagate.envs import TeacherWeightingEnv
    from metagate.train_policy import train_policy

    task, bank = g2p
    env = TeacherWeightingEnv(task, bank, batch_size=4, episode_steps=4, val_size=16, optimizer="adam", lr=3e-3)
    t = task.train.y.shape[1]
    obs, _ = env.reset(seed=0)
    assert obs.shape == (4 * t, 2, 11) and env.action_space.shape == (4 * t, 2)  # token units
    real = int((env._batch.y != PAD_ID).sum())
    obs, reward, _, _, info = env.step(env.action_space.sample())
    assert math.isfinite(reward) and math.isfinite(info["train_loss"])
    w = info["teacher_weights"]  # the decided batch's real tokens only: padding decides nothing
    assert w.shape == (real, 2) and abs(w.sum(1) - 1.0).max() < 1e-5
    out = tmp_path / "policy.zip"
    args = build_parser().parse_args(["train-policy", "--algo", "a2c", "--timesteps", "8", "--n-steps", "4",
                                      "--out", str(out)])
    train_policy(args, env=env)
    gate = PolicyGate(policy=out)
    before = [p.detach().clone() for p in gate.parameters()]
    tr = _fit(task, bank, gate)
    assert all(torch.equal(a, b) for a, b in zip(before, gate.parameters()))  # deployed: mean action, frozen
    _check_run(task, tr)


@pytest.mark.parametrize("make", [lambda: TemperatureGate(rl_episode=2), lambda: CTKDGate()], ids=["temperature",
                                                                                                 "ctkd"])
def test_temperature_gates_on_tokens(g2p, make) -> None:
    task, bank = g2p
    gate = make()
    tr = _fit(task, bank, gate)
    _check_run(task, tr)


def test_bench_g2p_runs_fixed_against_the_hand_written_seq_kd_step() -> None:
    from metagate.bench import bench_student

    res = bench_student("g2p", "gru-tiny", 2, 8, 2, 1, torch.device("cpu"), gates=("fixed", "hard"),
                        task_options={"subset": 200})
    assert set(res) == {"hand-written KD", "trainer + fixed", "trainer + hard"}
    assert all(math.isfinite(t) and t > 0 for t in res.values())


def test_handwritten_seq_kd_step_matches_the_trainer_with_fixed(g2p) -> None:
    """The bench's reference computes the same loss as the trainer's fixed gate: one SGD step from the same
    weights on the same batch lands on the same parameters."""
    import copy

    from metagate.bench import handwritten_seq_kd_step
    from metagate.gates.fixed import FixedGate

    task, bank = g2p
    torch.manual_seed(0)
    init = task.make_student()
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.05, momentum=0.0, weight_decay=0.0, device="cpu", progress=False)
    tr = Trainer(task, copy.deepcopy(init), FixedGate(alpha=0.5, tau=4.0), bank, cfg)
    batch = next(tr.epoch_batches(0))
    s = copy.deepcopy(init)
    handwritten_seq_kd_step(s, torch.optim.SGD(s.parameters(), lr=0.05), bank, 0.5, 4.0)(batch)
    tr.train_step(batch)
    for a, b in zip(s.parameters(), tr.student.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_instance_temperature_env_on_token_units(g2p, tmp_path) -> None:
    """InstanceTemperature-v0 on g2p: one temperature per token position (both checkers pass), the state equals
    the reference :func:`temperature_state` over the batch's tokens, a step is the trainer's step with those
    temperatures, and a PPO policy trained on it deploys as the `temperature` gate on the same tokens."""
    import warnings

    import numpy as np
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    from metagate.cli import build_parser
    from metagate.envs import InstanceTemperatureEnv
    from metagate.gates.base import GateOutput
    from metagate.gates.fixed import FixedGate, fixed_weights
    from metagate.gates.temperature.policy import NUM_STATE, temperature_state
    from metagate.train_policy import train_policy
    from metagate.units import flat_logits

    task, bank = g2p
    t = task.train.y.shape[1]

    def make() -> InstanceTemperatureEnv:
        return InstanceTemperatureEnv(task, bank, batch_size=4, episode_steps=4, val_size=16, optimizer="adam",
                                      lr=3e-3, t_min=2.0, t_max=6.0)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SB3 mistakes a [N, 1, S] float Box for an image
        check_env(make(), skip_render_check=True)
        sb3_check_env(make(), warn=False)
    env = make()
    obs, info = env.reset(seed=0)
    assert obs.shape == (4 * t, 1, NUM_STATE) and env.action_space.shape == (4 * t, 1)
    b = env._batch
    with torch.no_grad():
        logits = env.trainer.student(b.x)
    ref = temperature_state(flat_logits(logits), bank.lookup(b.ids), b.y.reshape(-1), env.trainer.progress)
    np.testing.assert_allclose(obs, ref.numpy(), rtol=1e-5, atol=1e-6)
    batches, actions = [], []
    rng = np.random.default_rng(0)
    for _ in range(3):
        a = rng.uniform(-6, 6, env.action_space.shape).astype(np.float32)
        batches.append(env._batch)
        actions.append(a)
        real = int((env._batch.y != PAD_ID).sum())
        _, r, _, _, step_info = env.step(a)
        tau = step_info["temperatures"]
        assert math.isfinite(r) and tau.shape == (real,) and tau.min() > 2.0 and tau.max() < 6.0  # real tokens
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(info["student_seed"])
        student = task.make_student()
    tr = Trainer(task, student, FixedGate(), bank, TrainConfig(seed=info["student_seed"], **env.train_config))
    tr.set_total_steps(env.episode_steps)
    w = fixed_weights(4 * t, 2, env.alpha, "cpu", torch.float32)
    for batch, a in zip(batches, actions):
        tr.train_step(batch, GateOutput(w, 2.0 + 4.0 * torch.sigmoid(torch.as_tensor(a).reshape(-1))))
    for (k, p), q in zip(tr.student.state_dict().items(), env.trainer.student.state_dict().values()):
        torch.testing.assert_close(p, q, msg=k)
    out = tmp_path / "temp.zip"
    args = build_parser().parse_args(["train-policy", "--env", "temperature", "--timesteps", "8", "--n-steps", "4",
                                      "--out", str(out)])
    train_policy(args, env=make())
    gate = TemperatureGate(temp_policy=str(out))
    tr = _fit(task, bank, gate)
    _check_run(task, tr)
    assert 2.0 < gate.diagnostics()["diag/tau_mean"] < 6.0  # the deployed policy keeps its own range


@pytest.mark.parametrize("unit", ["token", "word"])
def test_reinforce_hypergradient_credit_per_token_or_word(g2p, unit: str, monkeypatch) -> None:
    """``--rl-credit hypergradient`` on token units: one look-ahead per step over the student's output layer,
    reusing the real forward's head input (one extra ``features`` call per step: the ``meta`` batch), a finite
    look-ahead loss and a non-zero credit; the policy moves; no weight on padding, the label share is alpha, and
    per word one decision on all its tokens."""
    task, bank = g2p
    calls = []
    features = GRUSeq2Seq.features

    def counted(self, x):
        calls.append(x.shape[0])
        return features(self, x)

    monkeypatch.setattr(GRUSeq2Seq, "features", counted)
    gate = ReinforceGate(rl_credit="hypergradient", rl_unit=unit, rl_val_size=64)
    before = [p.detach().clone() for p in gate.parameters()]
    tr = _fit(task, bank, gate)
    n_meta = len(task.meta.y)  # 14 words < --rl-val-size
    sizes = [len(b.y) for b in tr.epoch_batches(0)]
    assert n_meta == 14 and tr.step == len(sizes) == 9
    # the trainer's shape probe, then per step the real forward and the look-ahead's meta batch: the head input
    # of the real forward is reused, never recomputed
    assert calls == [2] + [n for b in sizes for n in (b, n_meta)]
    monkeypatch.undo()
    assert any(not torch.equal(a, b) for a, b in zip(before, gate.parameters()))
    assert math.isfinite(gate._last["val_lookahead"]) and gate._last["credit_rms"] > 0
    w = _check_run(task, tr)
    real = task.train.y != PAD_ID
    torch.testing.assert_close(w[real][:, 0], torch.full((int(real.sum()),), 0.5))
    kd = w[..., 1:] / w[..., 1:].sum(-1, keepdim=True).clamp_min(1e-12)
    same_in_word = ((kd - kd[:, :1]).abs().amax(-1) < 1e-6)[real]
    assert bool(same_in_word.all()) == (unit == "word")


def test_meta_gate_route_on_tokens_is_unchanged_and_closed_form_is_refused(g2p) -> None:
    """The seq2seq students have the feature protocol now, but the meta gate's look-ahead on them keeps its
    route (autograd over `out`, not the closed form over a unit student's `head`); the closed-form backend, which
    would need it, is refused by name."""
    task, bank = g2p
    cfg = TrainConfig(epochs=1, batch_size=32, device="cpu", progress=False)
    for options in ({}, {"meta_lookahead": "last"}):
        gate = MetaGate(**options)
        Trainer(task, task.make_student(), gate, bank, cfg)
        assert gate.route == "autograd"
    with pytest.raises(ConfigError, match="closed-form meta backend .*GRUSeq2Seq is not one"):
        Trainer(task, task.make_student(), MetaGate(meta_backend="closed-form"), bank, cfg)


@pytest.fixture(scope="module")
def g2p_fitted() -> tuple[Task, object, list]:
    """The ``g2p`` fixture's task and teachers, their bank with its fit on ``meta`` (the temperatures and the
    per-token reliability table)."""
    from metagate.teachers.build import fit_teacher_temperatures

    task = get_task("g2p", subset=300, noise=0.2)
    torch.manual_seed(0)
    teachers = [GRUSeq2Seq(len(task.info["chars"]), task.num_classes, 16, 24).eval() for _ in range(2)]
    bank, stats = build_bank(task, [("a", teachers[0]), ("b", teachers[1])])
    fit_teacher_temperatures(bank, task, teachers, "cpu", stats)
    return task, bank, teachers


def test_reliability_table_per_real_token_by_counting(g2p_fitted) -> None:
    """The sequence bank's reliability table: P(teacher right | teacher predicts phoneme c) over the real tokens
    of ``meta`` (teacher forcing), (right + 1) / (predicted + 2), counted here token by token."""
    task, bank, teachers = g2p_fitted
    c = task.num_classes
    assert bank.reliability is not None and bank.reliability.shape == (2, c)
    real = task.meta.y != PAD_ID
    y = task.meta.y[real]
    assert len(y) > 100
    for k, teacher in enumerate(teachers):
        with torch.no_grad():
            pred = teacher(task.meta.x).argmax(-1)[real]
        counts, hits = [0] * c, [0] * c
        for p, t in zip(pred.tolist(), y.tolist()):
            counts[p] += 1
            hits[p] += int(p == t)
        want = torch.tensor([(h + 1) / (n + 2) for h, n in zip(hits, counts)])
        torch.testing.assert_close(bank.reliability[k], want)
        assert sum(counts) == len(y) and max(counts) < len(y)  # more than one class predicted


def test_reliability_features_of_a_token_view_leave_padding_at_zero(g2p_fitted) -> None:
    """A sequence batch's features with the reliability table: the unit features, then per real token the
    reliability features of its teacher rows; padding tokens (NaN teacher rows here) get reliability features 0."""
    from metagate.features import (
        NUM_FEATURES,
        TeacherFeatureCache,
        ViewReliability,
        clamped_view_features,
        reliability_features,
        view_features,
    )
    from metagate.gates.base import UnitView

    task, bank, _ = g2p_fitted
    y = task.train.y[:6]
    b, t = y.shape
    mask = (y != PAD_ID).reshape(-1).float()
    assert bool((mask == 0).any())
    rows = torch.randn(b * t, 2, task.num_classes, generator=torch.Generator().manual_seed(0))
    rows[mask == 0] = float("nan")
    student = torch.randn(b * t, task.num_classes, generator=torch.Generator().manual_seed(1))
    view = UnitView(student, rows, y.reshape(-1), mask, torch.arange(b), (b, t), 0.3)
    run = type("Run", (), {"bank": bank, "train_y": task.train.y})()
    source = TeacherFeatureCache.for_run(run, reliability=True)
    assert isinstance(source, ViewReliability) and source.num_features == NUM_FEATURES + 3
    assert TeacherFeatureCache.for_run(run) is None  # without the table: the view's own features, no cache
    got = clamped_view_features(view, source)
    real = mask > 0
    assert got.shape == (b * t, 2, NUM_FEATURES + 3) and bool(torch.isfinite(got[real]).all())
    torch.testing.assert_close(got[real, :, :NUM_FEATURES], view_features(view)[real].clamp(0, 5))
    torch.testing.assert_close(got[real, :, NUM_FEATURES:],
                               reliability_features(rows[real], bank.reliability).clamp(0, 5))
    assert bool((got[~real, :, NUM_FEATURES:] == 0).all())


@pytest.mark.parametrize("unit", ["token", "word"])
def test_credited_policy_with_reliability_features_on_tokens(g2p_fitted, unit: str) -> None:
    """``--rl-features reliability`` on g2p: the policy reads 14 features per token (or word), moves, and the
    run's weights keep the label share alpha and nothing on padding."""
    task, bank, _ = g2p_fitted
    gate = ReinforceGate(rl_credit="hypergradient", rl_features="reliability", rl_unit=unit, rl_val_size=64)
    first = next(m for m in gate.policy.net.modules() if isinstance(m, torch.nn.Linear))
    assert first.in_features == 14
    before = [p.detach().clone() for p in gate.parameters()]
    tr = _fit(task, bank, gate)
    assert any(not torch.equal(a, b) for a, b in zip(before, gate.parameters()))
    w = _check_run(task, tr)
    real = task.train.y != PAD_ID
    torch.testing.assert_close(w[real][:, 0], torch.full((int(real.sum()),), 0.5))


def test_reliability_features_are_refused_on_a_bank_without_the_table(g2p) -> None:
    """A bank never fitted on ``meta`` (here: built without a fit) has no table: a clear error, not a crash."""
    task, bank = g2p
    assert bank.reliability is None
    with pytest.raises(ConfigError, match="teacher-reliability features need each teacher's logits on the meta"):
        _fit(task, bank, ReinforceGate(rl_credit="hypergradient", rl_features="reliability"))


def test_token_env_dense_reward_equals_autograd_through_the_look_ahead(g2p) -> None:
    """``--env-reward hypergradient`` on token units: the step's reward is ``reward_scale * sum W_ik A_ik`` over the
    batch's token positions, ``A`` the centred derivative of the meta batch's real-token CE after one SGD step of
    the head on the masked-mean weighted loss (autograd through the step here); padding positions get A = 0."""
    import numpy as np
    import torch.nn.functional as F

    from metagate.envs import TeacherWeightingEnv
    from metagate.losses import reduce_weighted, unit_losses

    task, bank = g2p
    env = TeacherWeightingEnv(task, bank, batch_size=4, episode_steps=4, val_size=16, optimizer="adam", lr=3e-3,
                              env_reward="hypergradient", alpha=0.3)
    env.reset(seed=0)
    student, batch, tau = env.trainer.student, env._batch, env.tau
    sampler = env._credit.sampler
    state = sampler.state_dict()
    xv, yv = sampler.next()  # the meta batch the env's look-ahead draws
    sampler.load_state_dict(state)
    t = bank.lookup(batch.ids).reshape(-1, 2, task.num_classes)
    y = batch.y.reshape(-1)
    mask = (y != PAD_ID).float()
    lr = env.trainer.lr_at(env.trainer.step)
    action = np.random.default_rng(0).uniform(-1, 1, env.action_space.shape).astype(np.float32)
    w = env.weights_from_action(action).requires_grad_(True)
    head = student.head
    with torch.no_grad():
        h, hv = student.features(batch.x), student.features(xv)
    wt, b = head.weight.detach().clone().requires_grad_(True), head.bias.detach().clone().requires_grad_(True)
    inner = reduce_weighted(unit_losses((h @ wt.t() + b).reshape(-1, task.num_classes), t, y, tau), w, mask)
    gw, gb = torch.autograd.grad(inner, (wt, b), create_graph=True)
    val = F.cross_entropy((hv @ (wt - lr * gw).t() + (b - lr * gb)).reshape(-1, task.num_classes),
                          yv.reshape(-1), ignore_index=PAD_ID)
    d = torch.autograd.grad(val, w)[0]
    a = -(d[:, 1:] - d[:, 1:].mean(1, keepdim=True))
    assert bool((a[mask == 0] == 0).all()) and float(a[mask > 0].abs().max()) > 0
    hand = env.reward_scale * float((w[:, 1:] * a).sum().detach())
    _, reward, _, _, _ = env.step(action)
    # small (Adam's lr 3e-3 is the look-ahead's step) but a signal: 1e3x the float rounding of equal weights
    assert reward == pytest.approx(hand, rel=1e-4, abs=1e-12) and abs(reward) > 1e-8
    _, zero, _, _, _ = env.step(np.zeros(env.action_space.shape, np.float32))
    assert abs(zero) < 1e-11  # equal weights earn nothing: the credit is centred over each token's teachers
    env.close()
