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
        DistillConfig(task="digits", teacher_bank="capacity")
