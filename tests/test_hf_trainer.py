"""``metagate.hf.GatedKDTrainer``: a tiny random GPT-2 student, two tiny teachers, every supported gate."""

from __future__ import annotations

import pytest
import torch
from hf_models import tiny_gpt2, tiny_llama, token_sequences

from metagate.errors import ConfigError, InputError

pytestmark = pytest.mark.usefixtures("one_thread")
V = 50


class _Items(torch.utils.data.Dataset):
    def __init__(self, seqs, with_ids=False):
        self.seqs, self.with_ids = seqs, with_ids

    def __len__(self):
        return len(self.seqs)

    def __getitem__(self, i):
        item = {"input_ids": self.seqs[i]}
        if self.with_ids:
            item["seq_id"] = i
        return item


def _args(tmp_path, **over):
    from transformers import TrainingArguments

    opts = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=4, logging_steps=2,
                learning_rate=5e-3, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
                dataloader_num_workers=0)
    opts.update(over)
    return TrainingArguments(**opts)


def _trainer(tmp_path, gate="fixed", gate_options=None, bank=None, student_seed=3, **args):
    from metagate.hf import GatedKDTrainer
    from metagate.hf.trainer import causal_lm_collator

    seqs = token_sequences(16, V, seed=1)
    teachers = None if bank is not None else [tiny_gpt2(V, seed=1), tiny_llama(V, seed=2)]
    return GatedKDTrainer(model=tiny_gpt2(V, seed=student_seed).train(), args=_args(tmp_path, **args),
                          train_dataset=_Items(seqs, with_ids=bank is not None), data_collator=causal_lm_collator(),
                          teachers=teachers, sparse_bank=bank, gate=gate, gate_options=gate_options)


def _logs(trainer):
    return [h for h in trainer.state.log_history if "gate/label_share" in h]


@pytest.mark.parametrize("gate,options", [
    ("fixed", {"alpha": 0.3, "tau": 2.0}),
    ("hard", {}),
    ("hard", {"hard_level": "sentence"}),
    ("label-filter", {"alpha": 0.5}),
    ("conf-teachers", {"alpha": 0.2}),
    ("ce", {}),
])
def test_every_gate_trains_a_tiny_gpt2_from_two_online_teachers(tmp_path, gate, options):
    tr = _trainer(tmp_path, gate, options)
    before = [p.detach().clone() for p in tr.model.parameters()]
    tr.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.model.parameters()))
    logs = _logs(tr)
    assert len(logs) == 2
    for h in logs:
        assert h["loss"] > 0 and h["train/ppl"] > 1 and 0 <= h["train/token_ece"] <= 1
        assert h["gate/label_share"] + h["gate/kd_share"] == pytest.approx(1.0)
        if gate == "fixed":
            assert h["gate/label_share"] == pytest.approx(0.3)
            assert h["gate/teacher0_share"] == pytest.approx(0.5) and h["gate/teacher1_share"] == pytest.approx(0.5)
        if gate == "conf-teachers":
            assert h["gate/label_share"] == pytest.approx(0.2)
            assert h["gate/teacher0_share"] + h["gate/teacher1_share"] == pytest.approx(1.0)
            assert h["gate/teacher0_share"] != pytest.approx(0.5)  # per token, by each teacher's p(gold)
        if gate == "ce":
            assert h["gate/label_share"] == 1.0
        if gate == "hard":
            assert 0.0 <= h["gate/kd_share"] <= 1.0


def test_fixed_loss_is_gated_kd_of_the_batch(tmp_path):
    """The trainer's loss on a batch is metagate.losses.gated_kd of the same logits (no extra scaling)."""
    from metagate.losses import gated_kd
    from metagate.teachers.sparse import forward_logits

    tr = _trainer(tmp_path, "fixed", {"alpha": 0.4, "tau": 3.0})
    batch = next(iter(tr.get_train_dataloader()))
    tr.model.eval()
    with torch.no_grad():
        got = tr.compute_loss(tr.model, batch)
        s = tr.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t = [forward_logits(te, batch["input_ids"], batch["attention_mask"]) for te in tr.online_teachers]
        want = gated_kd(s, t, batch["labels"], tau=3.0, alpha=0.4)
        assert got.item() == pytest.approx(want.item(), rel=1e-6)
        n = int((batch["labels"][:, 1:] != -100).sum())
        assert tr.compute_loss(tr.model, batch, num_items_in_batch=2 * n).item() == pytest.approx(want.item() / 2,
                                                                                                  rel=1e-6)


def test_gradient_accumulation_gives_the_full_batch_step(tmp_path):
    """2 x 2 accumulated equals one batch of 4: the loss is divided by the whole batch's token count."""
    a = _trainer(tmp_path / "a", "fixed", max_steps=2, per_device_train_batch_size=4)
    b = _trainer(tmp_path / "b", "fixed", max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    a.train()
    b.train()
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("gate", ["fixed", "hard", "conf-teachers"])
def test_trains_from_a_sparse_bank(tmp_path, gate):
    from metagate.teachers.sparse import score_sparse

    seqs = token_sequences(16, V, seed=1)
    bank = score_sparse([tiny_gpt2(V, seed=1), tiny_llama(V, seed=2)], seqs, k=8)
    tr = _trainer(tmp_path, gate, bank=bank)
    tr.train()
    logs = _logs(tr)
    assert len(logs) == 2 and all(h["loss"] > 0 and h["train/ppl"] > 1 for h in logs)


def test_sparse_bank_with_all_but_one_token_is_close_to_online(tmp_path):
    """k = V-1 of V: the bank's loss is the online teachers' to the tail's mass."""
    from metagate.teachers.sparse import score_sparse

    seqs = token_sequences(16, V, seed=1)
    bank = score_sparse([tiny_gpt2(V, seed=1), tiny_llama(V, seed=2)], seqs, k=V - 1)
    on, off = _trainer(tmp_path / "on", "fixed"), _trainer(tmp_path / "off", "fixed", bank=bank)
    batch = next(iter(off.get_train_dataloader()))
    with torch.no_grad():
        a = on.compute_loss(on.model, {k: v for k, v in batch.items() if k != "seq_id"}).item()
        b = off.compute_loss(off.model, batch).item()
    assert b == pytest.approx(a, rel=2e-3)


def test_clear_errors(tmp_path):
    from metagate.hf import GatedKDTrainer
    from metagate.teachers.sparse import score_sparse

    with pytest.raises(InputError, match=r"teacher 0 has V = 60 tokens, the student V = 50"):
        GatedKDTrainer(model=tiny_gpt2(V), args=_args(tmp_path), teachers=[tiny_gpt2(60)])
    bank = score_sparse([tiny_gpt2(60)], token_sequences(2, 60), k=4)
    with pytest.raises(InputError, match=r"sparse bank was scored with V = 60 tokens, the student has V = 50"):
        GatedKDTrainer(model=tiny_gpt2(V), args=_args(tmp_path), sparse_bank=bank)
    with pytest.raises(ConfigError, match="runs the gates"):
        GatedKDTrainer(model=tiny_gpt2(V), args=_args(tmp_path), teachers=[tiny_gpt2(V)], gate="oracle-filter")
    with pytest.raises(ConfigError, match="needs teachers"):
        GatedKDTrainer(model=tiny_gpt2(V), args=_args(tmp_path), gate="fixed")


def test_core_package_does_not_import_transformers():
    import subprocess
    import sys

    code = ("import sys, metagate, metagate.losses, metagate.run, metagate.hf, metagate.teachers.sparse; "
            "print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("gate,options", [("fixed", {}), ("hard", {}), ("hard", {"hard_level": "sentence"}),
                                          ("conf-teachers", {})])
def test_padding_changes_no_loss_metric_or_gate_decision(tmp_path, gate, options):
    """The same batch padded by 3 more positions: the same loss, the same logged numbers (gate shares, ECE, ppl)."""
    tr = _trainer(tmp_path, gate, options)
    batch = next(iter(tr.get_train_dataloader()))
    pad = 3
    longer = {"input_ids": torch.cat([batch["input_ids"], torch.full((4, pad), 7)], 1),
              "attention_mask": torch.cat([batch["attention_mask"], torch.zeros(4, pad, dtype=torch.long)], 1),
              "labels": torch.cat([batch["labels"], torch.full((4, pad), -100)], 1)}
    out = []
    for b in (batch, longer):
        tr._stats = {}
        with torch.no_grad():
            loss = tr.compute_loss(tr.model, b).item()
        out.append((loss, tr.gate_logs()))
    assert out[1][0] == pytest.approx(out[0][0], rel=1e-5)
    assert out[0][1].keys() == out[1][1].keys() and len(out[0][1]) >= 5
    for k, v in out[0][1].items():
        assert out[1][1][k] == pytest.approx(v, rel=1e-5, abs=1e-7), k


def test_a_llama_student_trains(tmp_path):
    from metagate.hf import GatedKDTrainer
    from metagate.hf.trainer import causal_lm_collator

    seqs = token_sequences(16, V, seed=1)
    tr = GatedKDTrainer(model=tiny_llama(V, seed=4).train(), args=_args(tmp_path), train_dataset=_Items(seqs),
                        data_collator=causal_lm_collator(), teachers=[tiny_gpt2(V, seed=1), tiny_llama(V, seed=2)],
                        gate="hard")
    tr.train()
    assert len(_logs(tr)) == 2 and all(h["loss"] > 0 for h in _logs(tr))


def test_reinforce_learns_its_policy_from_held_out_text(tmp_path):
    from metagate.hf import GatedKDTrainer
    from metagate.hf.trainer import causal_lm_collator

    seqs = token_sequences(16, V, seed=1)
    meta = [{"input_ids": s} for s in token_sequences(6, V, seed=7)]
    tr = GatedKDTrainer(model=tiny_gpt2(V, seed=3).train(), args=_args(tmp_path, max_steps=6),
                        train_dataset=_Items(seqs), data_collator=causal_lm_collator(),
                        teachers=[tiny_gpt2(V, seed=1), tiny_llama(V, seed=2)], gate="reinforce",
                        gate_options={"rl_episode": 2, "alpha": 0.3}, meta_dataset=meta)
    before = [p.detach().clone() for p in tr.gate.parameters()]
    # the gate's validation CE is the model's own next-token CE on the held-out text
    x = tr._run.meta.x
    with torch.no_grad():
        logits = tr.model(input_ids=x).logits[:, :-1]
        y = x[:, 1:]
        real = tr._run.meta.y > 0
        want = torch.nn.functional.cross_entropy(logits[real], y[real])
    tr.gate._val_x, tr.gate._val_y = x, tr._run.meta.y
    assert tr.gate.validation_loss() == pytest.approx(want.item(), rel=1e-5)
    tr.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.gate.parameters()))  # episodes ended, it learned
    for h in _logs(tr):
        assert h["gate/label_share"] == pytest.approx(0.3)  # reinforce splits the KD share between teachers
        assert h["gate/teacher0_share"] + h["gate/teacher1_share"] == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="pass meta_dataset="):
        GatedKDTrainer(model=tiny_gpt2(V), args=_args(tmp_path), teachers=[tiny_gpt2(V)], gate="reinforce")


@pytest.mark.parametrize("level", ["token", "sentence"])
@pytest.mark.parametrize("source", ["online", "bank"])
def test_hard_gold_fast_path_is_the_hard_gates_own_decision(tmp_path, level, source):
    """The trainer decides ``hard`` (gold reference) from the gold tokens' log-probabilities only; the gate's
    own ``decide`` on the full [N, K, V] view gives the same weights."""
    from metagate.hf.trainer import _hard_gold
    from metagate.teachers.sparse import score_sparse

    bank = None
    if source == "bank":
        bank = score_sparse([tiny_gpt2(V, seed=1), tiny_llama(V, seed=2)], token_sequences(16, V, seed=1), k=6)
    tr = _trainer(tmp_path, "hard", {"hard_level": level, "hard_tau": 2.0}, bank=bank)
    batch = next(iter(tr.get_train_dataloader()))
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "seq_id")}
    with torch.no_grad():
        logits = tr.model(**inputs).logits
    teachers = tr._teachers(inputs, batch.get("seq_id"))
    y = torch.cat([batch["labels"][:, 1:], torch.full_like(batch["labels"][:, :1], -100)], 1)
    view = tr._view(logits, teachers, y)
    fast, slow = _hard_gold(tr.gate, view, teachers), tr.gate.decide(view)
    assert torch.equal(fast.weights, slow.weights)
    assert fast.tau == slow.tau and fast.student_tau == slow.student_tau
    g = fast.weights[:, 1:].sum(1)
    real = view.mask.bool()
    if level == "token":
        assert 0 < g[real].sum() < real.sum()  # both decisions occur in this batch
    else:  # one decision per sentence, on its every real token
        gr, mr = g.reshape(view.seq_shape), real.reshape(view.seq_shape)
        assert all(len(set(row[m].tolist())) == 1 for row, m in zip(gr, mr))


def _meta_trainer(tmp_path, bank=None, **over):
    from metagate.hf import GatedKDTrainer
    from metagate.hf.trainer import causal_lm_collator

    seqs = token_sequences(16, V, seed=1)
    meta = [{"input_ids": s} for s in token_sequences(6, V, seed=7)]
    teachers = None if bank is not None else [tiny_gpt2(V, seed=1), tiny_llama(V, seed=2)]
    return GatedKDTrainer(model=tiny_gpt2(V, seed=3).train(), args=_args(tmp_path, **over),
                          train_dataset=_Items(seqs, with_ids=bank is not None), data_collator=causal_lm_collator(),
                          teachers=teachers, sparse_bank=bank, gate="meta",
                          gate_options={"meta_param": "net", "meta_lr": 1e-2}, meta_dataset=meta)


def test_meta_net_learns_per_token_weights_by_the_look_ahead_on_held_out_text(tmp_path):
    """``meta --meta-param net`` on a tiny GPT-2: the generic autograd look-ahead (the real forward reused,
    attention switched to eager for the double backward), one meta update per step moving the net, and the
    trainer's loss is gated_kd with the net's per-token weights on the real tokens."""
    from metagate.features import unit_features
    from metagate.losses import gated_kd
    from metagate.teachers.sparse import forward_logits

    tr = _meta_trainer(tmp_path)
    assert tr.gate.route == "autograd" and tr.model.config._attn_implementation == "eager"
    assert tr.gate.sampler.x.shape[0] == 6  # the validation batches come from meta_dataset
    assert (tr._run.num_train_units, tr._run.steps_per_epoch) == (16, 4)  # 16 sequences, batches of 4
    before = [p.detach().clone() for p in tr.gate.parameters()]
    tr.train()
    assert tr.gate.updates == 4
    assert all(not torch.equal(a, b) for a, b in zip(before, tr.gate.parameters()))  # every layer of the net moved
    logs = _logs(tr)
    assert len(logs) == 2 and all(h["loss"] > 0 and h["train/ppl"] > 1 for h in logs)
    assert logs[0]["gate/label_share"] != pytest.approx(0.5, abs=1e-4)  # learned, off the initial 0.5

    batch = next(iter(tr.get_train_dataloader()))
    tr.model.eval()
    with torch.no_grad():
        got = tr.compute_loss(tr.model, batch)
        s = tr.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t = [forward_logits(te, batch["input_ids"], batch["attention_mask"]) for te in tr.online_teachers]
        b, n = s.shape[:2]
        y = torch.cat([batch["labels"][:, 1:], torch.full((b, 1), -100)], 1)
        feats = unit_features(s.reshape(b * n, V), torch.stack([x.reshape(b * n, V) for x in t], 1),
                              y.reshape(-1).clamp_min(0), tr.progress)
        w = tr.gate.param(feats) * (y.reshape(-1, 1) != -100)
        want = gated_kd(s, t, batch["labels"], w.reshape(b, n, 3), tau=tr.gate.tau)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert w[y.reshape(-1) != -100].std(0).min() > 0  # per token, not one row for all


def test_meta_net_trains_from_a_sparse_bank_and_refuses_what_it_cannot_run(tmp_path):
    from metagate.hf import GatedKDTrainer
    from metagate.teachers.sparse import score_sparse

    bank = score_sparse([tiny_gpt2(V, seed=1), tiny_llama(V, seed=2)], token_sequences(16, V, seed=1), k=8)
    tr = _meta_trainer(tmp_path, bank=bank, max_steps=2)
    before = [p.detach().clone() for p in tr.gate.parameters()]
    tr.train()
    assert tr.gate.updates == 2 and any(not torch.equal(a, b) for a, b in zip(before, tr.gate.parameters()))
    meta = [{"input_ids": s} for s in token_sequences(2, V, seed=7)]
    for opts, match in [({"meta_param": "table"}, "meta_param='net'"),
                        ({"meta_param": "net", "meta_schedule": "amal"}, "closed form"),
                        ({"meta_param": "net", "meta_no_reuse": True}, "drop meta_no_reuse")]:
        with pytest.raises(ConfigError, match=match):
            GatedKDTrainer(model=tiny_gpt2(V), args=_args(tmp_path), teachers=[tiny_gpt2(V)], gate="meta",
                           gate_options=opts, meta_dataset=meta)
    with pytest.raises(ConfigError, match="pass meta_dataset="):
        GatedKDTrainer(model=tiny_gpt2(V), args=_args(tmp_path), teachers=[tiny_gpt2(V)], gate="meta",
                       gate_options={"meta_param": "net"})


def _hand_view(tr, p_gold):
    """One sequence of 3 positions whose 2 dense teachers give the gold token (token 5 at every position after
    the shift) the probabilities ``p_gold [3, 2]`` (the rest spread evenly), and a random student."""
    n = p_gold.shape[0]
    probs = ((1.0 - p_gold) / (V - 1)).unsqueeze(-1).expand(n, 2, V).clone()
    probs[:, :, 5] = p_gold
    teachers = [probs[:, j].log().unsqueeze(0) for j in range(2)]
    s = torch.randn(1, n, V, generator=torch.Generator().manual_seed(0))
    y = torch.full((1, n), 5)
    y[0, -1] = -100  # the last position has no next token
    return tr._view(s, teachers, y), teachers


def test_ca_mkd_and_best_teacher_decide_per_token_on_hand_made_teachers(tmp_path):
    """CA-MKD's published rows ``(gamma, alpha a_k / K)`` with ``a_0 = p_0(y) / (p_0(y) + p_1(y))`` for K = 2 (the
    softmax over the teachers' CE, by hand), and best-teacher's constant row, from each position's teachers."""
    p = torch.tensor([[0.9, 0.1], [0.2, 0.6], [0.5, 0.5]])
    tr = _trainer(tmp_path / "c", "ca-mkd")
    view, teachers = _hand_view(tr, p)
    w = tr._decide(view, teachers).weights
    a0 = p[:, 0] / p.sum(1)
    want = torch.stack([torch.ones(3), a0 / 2, (1 - a0) / 2], 1)
    torch.testing.assert_close(w[:2], want[:2], rtol=1e-5, atol=1e-6)  # the real positions
    assert tr._decide(view, teachers).tau == 4.0
    tr = _trainer(tmp_path / "b", "best-teacher", {"best_teacher": "teacher1", "alpha": 0.3, "tau": 2.0})
    view, teachers = _hand_view(tr, p)
    out = tr._decide(view, teachers)
    torch.testing.assert_close(out.weights, torch.tensor([[0.3, 0.0, 0.7]]).expand(3, -1))
    assert out.tau == 2.0
    with pytest.raises(ConfigError, match=r"best_teacher 'gpt2' is not one of the teachers \(teacher0, teacher1\)"):
        _trainer(tmp_path / "x", "best-teacher", {"best_teacher": "gpt2"})


@pytest.mark.parametrize("gate,options", [("ca-mkd", {}), ("best-teacher", {"best_teacher": "teacher1", "alpha": 0.3})])
def test_rule_gates_train_a_tiny_gpt2(tmp_path, gate, options):
    tr = _trainer(tmp_path, gate, options)
    tr.train()
    logs = _logs(tr)
    assert len(logs) == 2
    for h in logs:
        assert h["loss"] > 0 and h["train/ppl"] > 1 and h["gate/tau_mean"] == 4.0
        if gate == "ca-mkd":  # the published mass: gamma = 1 on the label, alpha / K = 1/2 over the teachers
            assert h["gate/label_share"] == pytest.approx(1.0) and h["gate/kd_share"] == pytest.approx(0.5)
            assert h["gate/teacher0_share"] != pytest.approx(0.5)
        else:
            assert h["gate/label_share"] == pytest.approx(0.3) and h["gate/teacher1_share"] == pytest.approx(1.0)


def test_ctkd_learns_its_temperature_through_the_students_optimizer(tmp_path):
    """CTKD's global temperature is a parameter group of the Trainer's optimizer, the loss keeps it in its graph
    (gradient reversal: it moves), and the loss is gated_kd at that temperature."""
    from metagate.losses import gated_kd
    from metagate.teachers.sparse import forward_logits

    tr = _trainer(tmp_path, "ctkd", {"ctkd_curriculum_epochs": 0, "alpha": 0.4})
    theta = tr.gate.student_parameters()
    before = [p.detach().clone() for p in theta]
    tr.train()
    assert any(p is theta[0] for g in tr.optimizer.param_groups for p in g["params"])
    assert not torch.equal(before[0], theta[0])
    logs = _logs(tr)
    assert len(logs) == 2 and 1.0 < logs[-1]["gate/tau_mean"] < 21.0 and logs[-1]["gate/tau_mean"] != logs[0][
        "gate/tau_mean"]
    batch = next(iter(tr.get_train_dataloader()))
    tr.model.eval()
    with torch.no_grad():
        got = tr.compute_loss(tr.model, batch)
        tau = float(tr.gate.module(1.0))
        s = tr.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t = [forward_logits(te, batch["input_ids"], batch["attention_mask"]) for te in tr.online_teachers]
        want = gated_kd(s, t, batch["labels"], tau=tau, alpha=0.4)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    with pytest.raises(ConfigError, match="ctkd_variant='global'"):
        _trainer(tmp_path / "i", "ctkd", {"ctkd_variant": "instance"})


def test_temperature_gate_learns_per_token_temperatures_from_held_out_text(tmp_path):
    from metagate.hf import GatedKDTrainer
    from metagate.hf.trainer import causal_lm_collator

    seqs = token_sequences(16, V, seed=1)
    meta = [{"input_ids": s} for s in token_sequences(6, V, seed=7)]
    tr = GatedKDTrainer(model=tiny_gpt2(V, seed=3).train(), args=_args(tmp_path, max_steps=6),
                        train_dataset=_Items(seqs), data_collator=causal_lm_collator(),
                        teachers=[tiny_gpt2(V, seed=1), tiny_llama(V, seed=2)], gate="temperature",
                        gate_options={"rl_episode": 2, "temp_hidden": 8, "alpha": 0.3}, meta_dataset=meta)
    before = [p.detach().clone() for p in tr.gate.parameters()]
    batch = next(iter(tr.get_train_dataloader()))
    with torch.no_grad():
        logits = tr.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    y = torch.cat([batch["labels"][:, 1:], torch.full_like(batch["labels"][:, :1], -100)], 1)
    tr.gate.policy.eval()
    out = tr._decide(tr._view(logits, tr._teachers(batch, None), y))
    tr.gate.policy.train()
    tau = out.tau[y.reshape(-1) != -100]
    assert tau.shape[0] == int((y != -100).sum()) and tau.std() > 0  # one temperature per token
    assert bool(((tau > tr.gate.t_min) & (tau < tr.gate.t_max)).all())
    tr.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.gate.parameters()))  # an episode pair ended
    for h in _logs(tr):
        assert h["gate/label_share"] == pytest.approx(0.3) and h["gate/tau_mean"] != pytest.approx(4.0)
    with pytest.raises(ConfigError, match="pass meta_dataset="):
        GatedKDTrainer(model=tiny_gpt2(V), args=_args(tmp_path), teachers=[tiny_gpt2(V)], gate="temperature")


def test_a_deployed_policy_weights_teachers_per_token_without_held_out_text(tmp_path):
    """``policy`` deployed (an SB3 TeacherWeightingPolicy, mean action): W = (alpha, (1 - alpha) softmax(a / T))
    per token from the policy's own features, padding at zero; the policy does not move."""
    import numpy as np
    from gymnasium import spaces

    from metagate.features import NUM_FEATURES, clamped_view_features
    from metagate.gates.policy import PolicyGate
    from metagate.hf import GatedKDTrainer
    from metagate.hf.trainer import causal_lm_collator
    from metagate.policies.core import action_weights
    from metagate.policies.sb3 import TeacherWeightingPolicy

    torch.manual_seed(0)
    module = TeacherWeightingPolicy(spaces.Box(0.0, 5.0, (8, 2, NUM_FEATURES), np.float32),
                                    spaces.Box(-1.0, 1.0, (8, 2), np.float32), lambda _: 1e-3, label_alpha=0.3)
    gate = PolicyGate(module=module)
    tr = GatedKDTrainer(model=tiny_gpt2(V, seed=3).train(), args=_args(tmp_path), train_dataset=_Items(
        token_sequences(16, V, seed=1)), data_collator=causal_lm_collator(),
        teachers=[tiny_gpt2(V, seed=1), tiny_llama(V, seed=2)], gate=gate)
    before = [p.detach().clone() for p in module.parameters()]
    batch = next(iter(tr.get_train_dataloader()))
    with torch.no_grad():
        logits = tr.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        y = torch.cat([batch["labels"][:, 1:], torch.full_like(batch["labels"][:, :1], -100)], 1)
        view = tr._view(logits, tr._teachers(batch, None), y)
        w = tr._decide(view).weights
        want = action_weights(module.mean_logits(clamped_view_features(view)), 0.3, gate.temperature)
    real = y.reshape(-1) != -100
    torch.testing.assert_close(w[real], want[real])
    assert bool((w[~real] == 0).all()) and w[real][:, 1].std() > 0
    tr.train()
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))
    assert all(h["gate/label_share"] == pytest.approx(0.3) for h in _logs(tr))
    with pytest.raises(ConfigError, match="'policy' learns from held-out text: pass meta_dataset="):
        GatedKDTrainer(model=tiny_gpt2(V), args=_args(tmp_path), teachers=[tiny_gpt2(V), tiny_gpt2(V)],
                       gate=PolicyGate(module=module, online=True))


def test_a_policy_zip_from_train_policy_is_deployed_by_name(tmp_path):
    """``gate="policy", gate_options={"policy": zip}``: the zip ``metagate train-policy`` wrote (A2C, a few steps
    on digits) weights the LM's teachers per token with the label weight it was trained with."""
    from metagate.cli import build_parser
    from metagate.data import get_task
    from metagate.envs import TeacherWeightingEnv
    from metagate.envs.synthetic import synthetic_bank
    from metagate.train_policy import train_policy

    task = get_task("digits")
    env = TeacherWeightingEnv(task, synthetic_bank(task), batch_size=16, episode_steps=10)
    out = tmp_path / "a2c.zip"
    train_policy(build_parser().parse_args(["train-policy", "--algo", "a2c", "--timesteps", "20", "--n-steps", "5",
                                            "--out", str(out)]), env=env)
    tr = _trainer(tmp_path, "policy", {"policy": str(out)})
    before = [p.detach().clone() for p in tr.gate.parameters()]
    tr.train()
    logs = _logs(tr)
    assert len(logs) == 2 and all(h["loss"] > 0 for h in logs)
    for h in logs:
        assert h["gate/label_share"] == pytest.approx(tr.gate.alpha)
        assert h["gate/teacher0_share"] + h["gate/teacher1_share"] == pytest.approx(1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, tr.gate.parameters()))  # deployed: it does not learn
