"""In-loop REINFORCE: estimator sign on a toy bandit, the gate on digits with a planted teacher, CLI."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


def _bandit_features(n: int = 32) -> torch.Tensor:
    """Two teachers: teacher 0 always agrees with the label, teacher 1 never does."""
    g = torch.Generator().manual_seed(0)
    f = torch.rand(n, 2, 11, generator=g) * 0.2
    f[:, 0, 5], f[:, 0, 1] = 1.0, 0.9
    f[:, 1, 5], f[:, 1, 1] = 0.0, 0.05
    return f


@pytest.mark.parametrize("mode", ["weights", "select"])
def test_reinforce_gradient_sign_on_toy_bandit(mode):
    """Reward = weight on the right teacher. The estimator's expected gradient must raise that weight."""
    from metagate.policies import ReinforcePolicy

    torch.manual_seed(0)
    f = _bandit_features()
    pol = ReinforcePolicy(mode)
    with torch.no_grad():
        pol.net.head.weight.normal_(std=0.1)  # a non-degenerate starting point

    def right_share(w):
        return (w[:, 1] - w[:, 2]).mean()

    grads = [torch.zeros_like(p) for p in pol.parameters()]
    rewards, samples = [], []
    for _ in range(400):
        dist = pol.distribution(f)
        a = dist.sample()
        samples.append(a)
        rewards.append(float(right_share(pol.gate_weights(a, 0.0))))
    baseline = sum(rewards) / len(rewards)
    for a, r in zip(samples, rewards):  # REINFORCE surrogate: -(R - b) log pi(a)
        pol.zero_grad()
        (-(r - baseline) * pol.distribution(f).log_prob(a)).backward()
        for g, p in zip(grads, pol.parameters()):
            if p.grad is not None:
                g += p.grad / len(rewards)
    # a small step against the estimated gradient raises the policy's preference for teacher 0
    def preference():
        m = pol.mean_logits(f)
        return float((m[:, 0] - m[:, 1]).mean())

    with torch.no_grad():
        before = preference()
        for g, p in zip(grads, pol.parameters()):
            p -= 0.05 * g / (g.norm() + 1e-12)
        after = preference()
    assert after > before
    # and the exact directional derivative agrees in sign
    pol.zero_grad()
    mean_logits = pol.mean_logits(f)
    (mean_logits[:, 0] - mean_logits[:, 1]).mean().backward()
    directional = sum(float((p.grad * -g).sum()) for p, g in zip(pol.parameters(), grads) if p.grad is not None)
    assert directional > 0


@pytest.mark.parametrize("mode,antithetic", [("weights", True), ("weights", False), ("select", False)])
def test_learner_solves_toy_bandit(mode, antithetic):
    from metagate.policies import ReinforceLearner, ReinforcePolicy

    torch.manual_seed(0)
    f = _bandit_features()
    pol = ReinforcePolicy(mode)
    learner = ReinforceLearner(pol, lr=1e-2, antithetic=antithetic)
    noise = None
    for _ in range(200):
        dist = pol.distribution(f)
        if mode == "weights" and antithetic:
            noise = torch.randn(1, 2) if learner.first_of_pair else -noise
            a = dist.sample(noise)
        else:
            a = dist.sample()
        learner.record(f, a)
        w = pol.gate_weights(a, 0.0)
        learner.finish(float((w[:, 1] - w[:, 2]).mean()))
    with torch.no_grad():
        w = pol.gate_weights(pol.distribution(f).mode(), 0.0)
    assert float(w[:, 1].mean()) > 0.9


def _mean_kd_weights(trainer, gate) -> torch.Tensor:
    """Mean KD-internal weight per teacher of the gate's mean policy over the training set."""
    gate.policy.eval()
    ws = []
    with torch.no_grad():
        for b in trainer.epoch_batches(12345):
            ws.append(gate.weights(trainer.make_view(b, trainer.student(b.x))).weights)
    gate.policy.train()
    w = torch.cat(ws)[:, 1:]
    return (w / w.sum(1, keepdim=True)).mean(0)


def test_adversarial_teacher_weight_decreases_on_digits(digits_bank):
    """digits, --teachers 3 --adversarial-teacher: the reinforce gate learns to drop the planted teacher."""
    from metagate.gates.policy import ReinforceGate
    from metagate.run import DistillConfig, load_task
    from metagate.teachers.build import load_teachers
    from metagate.trainer import TrainConfig, Trainer

    cfg = DistillConfig(task="digits", noise=0.4, teachers=3, adversarial_teacher=True,
                        train=TrainConfig(device="cpu", progress=False))
    task = load_task(cfg)
    bank, _ = load_teachers(cfg, task, progress=False)  # two real teachers (cached) + the permuted one
    assert bank.names[-1].startswith("adv-")
    torch.manual_seed(0)
    gate = ReinforceGate(rl_episode=5, rl_lr=1e-2)
    tr = Trainer(task, task.make_student(), gate, bank,
                 TrainConfig(epochs=8, batch_size=32, progress=False, device="cpu", seed=0))
    start = _mean_kd_weights(tr, gate)
    assert abs(float(start[2]) - 1 / 3) < 0.05  # the untrained policy is close to equal weights
    for _ in range(8):
        tr.run_epoch()
    end = _mean_kd_weights(tr, gate)
    assert float(end[2]) < 0.2, end
    assert float(end[2]) < float(start[2]) - 0.1
    diag = tr.weight_diagnostics()
    assert diag["gate/mean_w_teacher2"] < diag["gate/mean_w_teacher0"]
    assert diag["diag/teacher_choice_gain"] > 0.03  # KD weight moved to the teachers right on each unit (0.077)


def test_split_kd_share_and_selection_weights():
    from metagate.policies import selection_weights, split_kd_share

    probs = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    w = split_kd_share(torch.tensor([0.3, 1.0]), probs)
    torch.testing.assert_close(w, torch.tensor([[0.3, 0.35, 0.35, 0.0], [1.0, 0.0, 0.0, 0.0]]))
    w = split_kd_share(torch.tensor(0.5), probs, kd_share=torch.tensor([1.0, 2.0]))  # a meta gate's split
    torch.testing.assert_close(w[:, 1:].sum(1), torch.tensor([1.0, 2.0]))
    sel = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(selection_weights(sel, 0.4), torch.tensor([[0.4, 0.3, 0.0, 0.3], [1.0, 0, 0, 0]]))


def test_action_weights_is_split_kd_share_of_teacher_probs():
    """The fast action -> weights mapping of the env and the policy gates equals the reference composition."""
    from metagate.data import get_task
    from metagate.envs import TeacherWeightingEnv
    from metagate.envs.synthetic import synthetic_bank
    from metagate.policies import split_kd_share, teacher_probs
    from metagate.policies.core import action_weights

    a = torch.randn(6, 3) * 2  # beyond the action box: clipped first
    ref = split_kd_share(torch.tensor(0.3), teacher_probs(a.clamp(-1, 1), 0.25))
    torch.testing.assert_close(action_weights(a.clone(), 0.3, 0.25), ref)
    torch.testing.assert_close(action_weights(a.clone(), 0.3, 0.25, torch.full((6, 1), 0.3)), ref)
    task = get_task("digits")
    env = TeacherWeightingEnv(task, synthetic_bank(task), batch_size=6, alpha=0.3)
    torch.testing.assert_close(env.weights_from_action(a.numpy()), ref)


def test_cli_distill_reinforce_and_resume(digits_bank, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from metagate.cli import main

    run = tmp_path / "run"
    args = ["distill", "--task", "digits", "--noise", "0.4", "--gate", "reinforce", "--teachers", "3",
            "--adversarial-teacher", "--epochs", "2", "--batch-size", "64", "--logdir", str(run), "--device", "cpu",
            "--no-progress", "--rl-episode", "3"]
    assert main(args) == 0
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    for t in ("policy/reward", "policy/baseline", "policy/shared_log_std", "gate/mean_w_teacher2"):
        assert t in acc.Tags()["scalars"], t
    assert "policy/mean_w_teacher2" not in acc.Tags()["scalars"]  # the same quantity as gate/mean_w_teacher2
    args[args.index("2")] = "3"  # one more epoch, resumed from the checkpoint (gate state included)
    assert main([*args, "--resume"]) == 0
    assert main([*args[:-2], "--rl-mode", "select", "--overwrite"]) == 0
    capsys.readouterr()
    assert main([*args, "--rl-episode", "0", "--overwrite"]) == 2
    assert "--rl-episode" in capsys.readouterr().err


def test_meta_plus_policy_composes(digits_bank, tmp_path):
    """--gate meta+policy: the meta gate's label weight and KD share, the policy's teacher distribution."""
    from metagate.cli import main
    from metagate.gates.compose import MetaPolicyGate
    from metagate.run import build_gate

    gate = build_gate("meta+policy", {"meta_columns": "split", "meta_param": "net"})
    assert isinstance(gate, MetaPolicyGate)
    run = tmp_path / "run"
    assert main(["distill", "--task", "digits", "--noise", "0.4", "--gate", "meta+policy", "--meta-columns", "split",
                 "--teachers", "3", "--adversarial-teacher", "--epochs", "1", "--logdir", str(run), "--device", "cpu",
                 "--no-progress"]) == 0
    import json

    m = json.loads((run / "metrics.json").read_text())
    assert 0 < m["gate/mean_w_label"] and m["gate/mean_w_teacher2"] >= 0


def test_update_on_unit_subsets_is_unbiased():
    """Shared per-teacher noise: the episode's log-probability gradient is a mean over its units, so the
    mean of the gradients on the chunks of a partition (what ``--rl-update-units`` scores, one random
    chunk per step) equals the full gradient."""
    from metagate.policies import ReinforcePolicy

    torch.manual_seed(0)
    pol = ReinforcePolicy("weights", shared_log_std=-0.5)
    feats = torch.rand(4, 32, 3, 11)  # 4 steps of 32 units
    eps = torch.randn(1, 3)

    def grad(f: torch.Tensor) -> torch.Tensor:
        pol.zero_grad()
        dist = pol.distribution(f.reshape(-1, 3, 11))
        with torch.no_grad():
            act = dist.mean + dist.var_t.sqrt() * eps  # the sample the episode held
        dist.log_prob(act).backward()
        return torch.cat([p.grad.reshape(-1) for p in pol.net.parameters()])

    full = grad(feats)
    chunks = torch.stack([grad(feats[:, i * 8:(i + 1) * 8]) for i in range(4)]).mean(0)
    assert full.abs().max() > 1e-4
    torch.testing.assert_close(chunks, full, rtol=1e-4, atol=1e-6)
