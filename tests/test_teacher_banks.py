"""Named teacher banks (issue 28): members, reproducibility from the seed, the specialists' parts, wiring."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


def test_class_parts_and_members(digits_noisy):
    from metagate.errors import ConfigError
    from metagate.teachers.banks import MEMORISER_EPOCHS, bank_members, class_parts

    assert class_parts(10, 3) == [(0, 1, 2, 3), (4, 5, 6), (7, 8, 9)]
    assert class_parts(4, 4) == [(0,), (1,), (2,), (3,)]
    with pytest.raises(ConfigError, match="K=11"):
        class_parts(10, 11)
    mem = bank_members(digits_noisy, "memoriser", 3)
    assert [m.name for m in mem] == ["mem-cnn32", "es-cnn16", "es-cnn24"]  # the widest of the first three fits
    assert [m.early_stopping for m in mem] == [False, True, True]
    assert [m.epochs for m in mem] == [30 * MEMORISER_EPOCHS, 30, 30]
    spec = bank_members(digits_noisy, "specialist", 3)
    assert [m.name for m in spec] == ["spec0-cnn16", "spec1-cnn24", "spec2-cnn32"]
    assert [m.classes for m in spec] == class_parts(10, 3)
    with pytest.raises(ConfigError, match="--teachers >= 2"):
        bank_members(digits_noisy, "memoriser", 1)
    with pytest.raises(ConfigError, match="'default'"):
        bank_members(digits_noisy, "default", 3)


def test_specialist_bank_reproducible_from_its_seed_and_good_on_its_part(digits_noisy, tmp_path):
    from metagate.teachers.bank import teacher_logits
    from metagate.teachers.banks import bank_members, load_or_train_bank, member_task

    task = digits_noisy
    a, names, stats = load_or_train_bank(task, "specialist", 3, None, seed=0)
    b, _, _ = load_or_train_bank(task, "specialist", 3, None, seed=0)
    c, _, _ = load_or_train_bank(task, "specialist", 3, None, seed=1)
    la = torch.stack([teacher_logits(m, task.train.x) for m in a], 1)
    assert torch.equal(la, torch.stack([teacher_logits(m, task.train.x) for m in b], 1))
    assert not torch.equal(la, torch.stack([teacher_logits(m, task.train.x) for m in c], 1))
    assert names == ["spec0-cnn16", "spec1-cnn24", "spec2-cnn32"]
    y = task.test.y
    for k, (m, part) in enumerate(zip(a, [(0, 1, 2, 3), (4, 5, 6), (7, 8, 9)])):
        own = torch.isin(y, torch.tensor(part))
        pred = teacher_logits(m, task.test.x).argmax(-1)
        assert float((pred == y)[own].float().mean()) > 0.85, k  # good on its own classes ...
        assert float((pred == y)[~own].float().mean()) < 0.05, k  # ... and wrong elsewhere (it never saw them)
        assert stats[k]["bank"] == "specialist"
    sub = member_task(task, bank_members(task, "specialist", 3)[1])
    assert set(sub.train.y.unique().tolist()) == {4, 5, 6} and set(sub.select.y.unique().tolist()) == {4, 5, 6}
    # cached: a second load reads the checkpoints (same logits), a retrain from the seed writes the same
    d, _, _ = load_or_train_bank(task, "specialist", 3, tmp_path, seed=0)
    e, _, _ = load_or_train_bank(task, "specialist", 3, tmp_path, seed=0)
    for m1, m2, m3 in zip(a, d, e):
        assert torch.equal(teacher_logits(m1, task.train.x), teacher_logits(m3, task.train.x))
        assert torch.equal(teacher_logits(m2, task.train.x), teacher_logits(m3, task.train.x))
    assert len(list(tmp_path.rglob("teacher-specialist-*-s0.pt"))) == 3


def test_teacher_bank_option_through_load_teachers(digits_noisy, tmp_path):
    from metagate.errors import ConfigError
    from metagate.run import DistillConfig
    from metagate.teachers.build import load_teachers
    from metagate.trainer import TrainConfig

    cfg = DistillConfig(task="digits", noise=0.4, teacher_bank="specialist", cache_dir=str(tmp_path),
                        train=TrainConfig(device="cpu", progress=False))
    bank, stats = load_teachers(cfg, digits_noisy, progress=False)
    assert bank.names == ["spec0-cnn16", "spec1-cnn24", "spec2-cnn32"]
    assert bank.logits.shape == (len(digits_noisy.train), 3, 10)
    assert [s["name"] for s in stats] == bank.names and all(0.2 < s["test_acc"] < 0.45 for s in stats)
    with pytest.raises(ConfigError, match="--adversarial-teacher"):
        DistillConfig(task="digits", teacher_bank="memoriser", adversarial_teacher=True)
    with pytest.raises(ConfigError, match="teacher_bank|teacher-bank"):
        DistillConfig(task="digits", teacher_bank="oracle")


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_capacity_members(digits_noisy):
    """The capacity bank: a large CNN (4x the first teacher's channels, 2x its hidden width) that fits for 3x the
    epochs, K - 2 of the task's teachers early-stopped, and a teacher of the default student's architecture; a task
    whose first teacher is no CNN is refused by name."""
    import dataclasses
    from functools import partial

    from metagate.data.task import TeacherSpec
    from metagate.errors import ConfigError
    from metagate.models import MLP
    from metagate.teachers.banks import MEMORISER_EPOCHS, bank_members

    cap = bank_members(digits_noisy, "capacity", 3)
    assert [m.name for m in cap] == ["large-cnn64h256", "mid-cnn16", "small-mlp"]
    assert [m.early_stopping for m in cap] == [False, True, True]
    assert [m.epochs for m in cap] == [30 * MEMORISER_EPOCHS, 30, 30]
    sizes = [_params(m.spec.factory()) for m in cap]
    assert sizes == [601994, 71850, 1210]  # 8x and 500x apart
    assert sizes[2] == _params(digits_noisy.make_student())  # the student's own size
    assert [m.name for m in bank_members(digits_noisy, "capacity", 2)] == ["large-cnn64h256", "small-mlp"]
    assert [m.name for m in bank_members(digits_noisy, "capacity", 4)] == ["large-cnn64h256", "mid-cnn16",
                                                                           "mid-cnn24", "small-mlp"]
    mlp_teachers = dataclasses.replace(digits_noisy, teacher_specs=[TeacherSpec("mlp32", partial(MLP, 64, (32,), 10))])
    with pytest.raises(ConfigError, match="'mlp32' is not a metagate.models.CNN"):
        bank_members(mlp_teachers, "capacity", 2)
    with pytest.raises(ConfigError, match="--teachers >= 2"):
        bank_members(digits_noisy, "capacity", 1)
    with pytest.raises(ConfigError, match="--teachers 8 needs 6 of them"):
        bank_members(digits_noisy, "capacity", 8)


def test_capacity_small_member_reproducible_from_its_seed(digits_noisy):
    """The student-sized member trains reproducibly from its seed (another seed, another teacher), early-stopped
    on select, and loads into the task's student architecture."""
    from metagate.teachers.bank import teacher_logits
    from metagate.teachers.banks import bank_members, train_member

    task = digits_noisy
    small = bank_members(task, "capacity", 3)[2]
    a, st = train_member(task, small, seed=5)
    b, _ = train_member(task, small, seed=5)
    c, _ = train_member(task, small, seed=6)
    la = teacher_logits(a, task.train.x)
    assert torch.equal(la, teacher_logits(b, task.train.x))
    assert not torch.equal(la, teacher_logits(c, task.train.x))
    task.make_student().load_state_dict(a.state_dict())  # strict: the same architecture
    assert st["epoch"] < 30 and st["train_fit"] < 0.7  # early-stopped before it fits the 40% noise


@pytest.mark.slow
def test_capacity_bank_through_load_teachers(digits_noisy, tmp_path):
    """``--teacher-bank capacity`` end to end on noisy digits (the large teacher trains ~2 CPU-minutes): the large
    teacher fits the noisy labels and is the worst on test; a second load reads the same teachers from the cache."""
    from metagate.run import DistillConfig
    from metagate.teachers.build import load_teachers
    from metagate.trainer import TrainConfig

    cfg = DistillConfig(task="digits", noise=0.4, teacher_bank="capacity", cache_dir=str(tmp_path),
                        train=TrainConfig(device="cpu", progress=False))
    bank, stats = load_teachers(cfg, digits_noisy, progress=False)
    assert bank.names == ["large-cnn64h256", "mid-cnn16", "small-mlp"]
    large, mid, small = stats
    assert large["train_fit"] > 0.99 and large["epoch"] == 90
    assert large["test_acc"] < min(mid["test_acc"], small["test_acc"])
    again, _ = load_teachers(cfg, digits_noisy, progress=False)
    assert torch.equal(bank.logits, again.logits)
    assert len(list(tmp_path.rglob("teacher-capacity-*-s0.pt"))) == 3


def test_capacity_bank_on_digits_is_unchanged(digits_noisy):
    """Per-architecture widening leaves digits' capacity bank as it was: the large member builds exactly
    ``CNN(1, 8, 64, 10, 256)`` (the same modules and, from one seed, the same weights) and the others are the task's
    own specs."""
    from metagate.models import CNN
    from metagate.teachers.banks import bank_members

    large, mid, small = bank_members(digits_noisy, "capacity", 3)
    torch.manual_seed(0)
    got = large.spec.factory()
    torch.manual_seed(0)
    want = CNN(1, 8, 64, 10, 256)
    assert repr(got) == repr(want)
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), want.state_dict().values()))
    assert (large.spec.epochs, large.spec.lr, large.spec.batch_size) == (30, 2e-3, 64)  # the first teacher's
    assert mid.spec is digits_noisy.teacher_specs[0]
    assert small.spec.factory is digits_noisy.students["mlp"]


@pytest.fixture(scope="module")
def g2p_small():
    from metagate.data import get_task

    return get_task("g2p", subset=150, noise=0.1)


def test_capacity_members_on_g2p(g2p_small):
    """g2p's capacity bank: bigru128 widened 2x (embedding 128, GRU 256, still one bidirectional layer, ~3.9x the
    parameters) fits for 3x the epochs, K - 2 of the task's teachers early-stopped, a teacher of the student's own
    architecture; a first teacher without a widening rule (a Transformer) is refused by name and class, the other
    named banks still refuse token units."""
    import dataclasses

    from metagate.errors import ConfigError
    from metagate.seq_models import GRUSeq2Seq
    from metagate.teachers.banks import MEMORISER_EPOCHS, bank_members

    task = g2p_small
    cap = bank_members(task, "capacity", 3)
    assert [m.name for m in cap] == ["large-bigru256", "mid-bigru128", "small-gru"]
    assert [m.early_stopping for m in cap] == [False, True, True]
    assert [m.epochs for m in cap] == [30 * MEMORISER_EPOCHS, 30, 30] == [90, 30, 30]
    large = cap[0].spec.factory()
    assert isinstance(large, GRUSeq2Seq) and large.bidirectional and large.layers == 1
    assert (large.src_emb.embedding_dim, large.encoder.hidden_size, large.decoder.hidden_size) == (128, 256, 256)
    assert large.drop.p == 0.1
    assert (cap[0].spec.lr, cap[0].spec.batch_size) == (3e-3, 64)  # bigru128's optimiser
    sizes = [_params(m.spec.factory()) for m in cap]
    assert sizes == [1246657, 320257, 61473]  # this draw's vocabularies: 32 characters, 65 phoneme ids
    assert _params(task.teacher_specs[0].factory()) == sizes[1]  # bigru128
    assert sizes[0] > 3.8 * sizes[1] and sizes[0] > 6 * max(_params(s.factory()) for s in task.teacher_specs[1:])
    task.make_student().load_state_dict(cap[2].spec.factory().state_dict())  # strict: the student's architecture
    assert [m.name for m in bank_members(task, "capacity", 5)] == ["large-bigru256", "mid-bigru128",
                                                                    "mid-transformer64", "mid-gru96", "small-gru"]
    transformer_first = dataclasses.replace(task, teacher_specs=task.teacher_specs[1:])
    with pytest.raises(ConfigError, match=r"'transformer64' is not a metagate.models.CNN or a "
                                          r"metagate.seq_models.GRUSeq2Seq .*metagate.seq_models.TransformerSeq2Seq"):
        bank_members(transformer_first, "capacity", 3)
    for bank in ("memoriser", "specialist"):
        with pytest.raises(ConfigError, match=f"--teacher-bank {bank} is for tasks with one unit per example"):
            bank_members(task, bank, 3)


def test_capacity_bank_compare_on_g2p(g2p_small, tmp_path):
    """``metagate compare --task g2p --teacher-bank capacity`` end to end (150 words, one epoch): the large member
    trains all 90 epochs and fits the noisy training tokens, the others stop early; the members and their per-token
    logits are cached under the bank's names and the compare's rows read them."""
    import json
    import math

    from metagate.cli import main

    out, cache = tmp_path / "cmp", tmp_path / "cache"
    rc = main(["compare", "--task", "g2p", "--subset", "150", "--noise", "0.1", "--teacher-bank", "capacity",
               "--teachers", "3", "--seeds", "0", "--epochs", "1", "--optimizer", "adam", "--lr", "0.003",
               "--batch-size", "32", "--device", "cpu", "--threads", "1", "--no-progress", "--cache-dir", str(cache),
               "--gates", "fixed", "best-teacher", "--out", str(out)])
    assert rc == 0
    blob = json.loads((out / "results.json").read_text())
    large, mid, small = blob["teachers"]["0"]
    assert [t["name"] for t in (large, mid, small)] == ["large-bigru256", "mid-bigru128", "small-gru"]
    assert all(t["bank"] == "capacity" and 0 < t["test_per"] < 10 for t in (large, mid, small))
    assert large["epoch"] == 90 and large["train_fit"] > 0.95  # no early stopping: it fits the noisy tokens
    assert mid["epoch"] < 30 and small["epoch"] < 30 and max(mid["train_fit"], small["train_fit"]) < 0.5
    names = {p.name for p in cache.rglob("*.pt")}
    assert {f"teacher-capacity-{n}-s0.pt" for n in ("large-bigru256", "mid-bigru128", "small-gru")} <= names
    assert {f"tokens-{n}.pt" for n in ("large-bigru256", "mid-bigru128", "small-gru")} <= names
    rows = {r["label"]: r for r in blob["rows"]}
    best = rows["best-teacher"]["metrics"]  # the large member has the best select accuracy on 150 words
    assert (best["gate/mean_w_teacher0"], best["gate/mean_w_teacher1"], best["gate/mean_w_teacher2"]) == (0.5, 0, 0)
    assert all(math.isfinite(r["metrics"]["test/per"]) for r in rows.values())
    # a reload reads the cached members (same stats, the word metrics too); train_fit counts the real tokens only
    from metagate.teachers.banks import load_or_train_bank

    task = g2p_small
    modules, names, stats = load_or_train_bank(task, "capacity", 3, cache, seed=0)
    assert names == ["large-bigru256", "mid-bigru128", "small-gru"]
    for got, want in zip(stats, (large, mid, small)):
        assert got == {k: want[k] for k in got} and {"test_per", "test_wer", "train_fit"} <= set(got)
    with torch.no_grad():
        right = modules[0](task.train.x).argmax(-1) == task.train.y
    assert large["train_fit"] == pytest.approx(float(right[task.train.y != 0].float().mean()), abs=1e-7)


def test_a_dense_bank_declares_the_closed_form_reads_and_refuses_them():
    """The bank protocol's closed-form reads exist on every bank; a dense one says it has none (the trainer reads
    them only when ``closed_form_kd`` is set)."""
    from metagate.teachers.bank import TeacherBank

    bank = TeacherBank(torch.randn(4, 2, 3), ["a", "b"])
    ids, log_q = torch.tensor([0, 2]), torch.log_softmax(torch.randn(2, 3), -1)
    assert bank.closed_form_kd is False and bank.reliability is None
    with pytest.raises(NotImplementedError, match="no closed-form KD columns"):
        bank.unit_kd(ids, log_q, 1.0)
    with pytest.raises(NotImplementedError, match="reads no single tokens"):
        bank.unit_token_log_probs(ids, torch.tensor([0, 1]))
    with pytest.raises(NotImplementedError, match="no closed-form unit features"):
        bank.unit_teacher_features(ids, log_q, torch.tensor([0, 1]))
