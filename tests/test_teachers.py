"""Teacher bank: training once, cache reuse, stale-cache detection."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from metagate.errors import InputError, StaleCacheError
from metagate.io import atomic_save, safe_load
from metagate.teachers.bank import TeacherBank
from metagate.teachers.build import build_bank
from metagate.teachers.cache import default_cache_dir
from metagate.teachers.training import load_or_train_teachers


def test_teachers_are_stronger_than_chance_and_frozen(digits_noisy, digits_bank):
    bank, stats = digits_bank
    assert bank.logits.shape == (len(digits_noisy.train), 3, 10)
    assert all(s["test_acc"] > 0.85 for s in stats), stats
    mods, _, _ = load_or_train_teachers(digits_noisy, 3, default_cache_dir())
    assert all(not p.requires_grad for m in mods for p in m.parameters())
    assert all(not m.training for m in mods)


def test_cache_is_reused_not_recomputed(digits_noisy, digits_bank):
    bank, _ = digits_bank
    cache = default_cache_dir() / digits_noisy.key
    files = sorted(cache.glob("*.pt"))
    mtimes = {f: f.stat().st_mtime_ns for f in files}
    mods, names, _ = load_or_train_teachers(digits_noisy, 3, default_cache_dir())
    bank2, _ = build_bank(digits_noisy, [*zip(names, mods)], cache_dir=default_cache_dir())
    assert {f: f.stat().st_mtime_ns for f in files} == mtimes  # nothing retrained or rewritten
    torch.testing.assert_close(bank2.logits, bank.logits)


def test_stale_logits_cache_raises(digits_noisy, digits_bank, tmp_path):
    mods, names, _ = load_or_train_teachers(digits_noisy, 1, default_cache_dir())
    build_bank(digits_noisy, [*zip(names, mods)], cache_dir=tmp_path)
    path = tmp_path / digits_noisy.key / f"logits-{names[0]}.pt"
    blob = safe_load(path)
    # a different teacher checkpoint under the same name -> stale
    with torch.no_grad():
        next(mods[0].parameters()).add_(0.01)
    with pytest.raises(StaleCacheError, match="stale teacher cache"):
        build_bank(digits_noisy, [*zip(names, mods)], cache_dir=tmp_path)
    with torch.no_grad():
        next(mods[0].parameters()).sub_(0.01)
    # tampered cache contents
    blob["fingerprint"] = "0" * 16
    atomic_save(blob, path)
    with pytest.raises(StaleCacheError):
        build_bank(digits_noisy, [*zip(names, mods)], cache_dir=tmp_path)
    before = path.read_bytes()
    with pytest.raises(StaleCacheError):
        build_bank(digits_noisy, [*zip(names, mods)], cache_dir=tmp_path)
    assert path.read_bytes() == before  # a failed load never rewrites the cache


def test_cache_of_other_data_raises(digits_bank, tmp_path):
    from metagate.data import get_task

    clean = get_task("digits", noise=0.4, data_seed=0)
    mods, names, _ = load_or_train_teachers(clean, 1, default_cache_dir())
    build_bank(clean, [*zip(names, mods)], cache_dir=tmp_path)
    other = get_task("digits", noise=0.4, data_seed=0)
    other.train.y[:5] = (other.train.y[:5] + 1) % 10  # same key, different labels
    src = tmp_path / clean.key
    assert src.exists()
    with pytest.raises(StaleCacheError):
        build_bank(other, [*zip(names, mods)], cache_dir=tmp_path)


def test_teacher_checkpoint_of_other_data_raises(digits_bank, tmp_path):
    from metagate.data import get_task

    task = get_task("digits", noise=0.4)
    src = default_cache_dir() / task.key
    dst = tmp_path / task.key
    dst.mkdir(parents=True)
    for f in src.glob("teacher-*.pt"):
        (dst / f.name).write_bytes(f.read_bytes())
    task.train.y[0] = (task.train.y[0] + 1) % 10
    with pytest.raises(StaleCacheError, match="trained on other data"):
        load_or_train_teachers(task, 1, tmp_path)


def test_bank_rejects_nan_logits():
    x = torch.zeros(4, 2, 3)
    x[1, 0, 2] = float("nan")
    with pytest.raises(InputError, match="teacher logits contain 1 NaN"):
        TeacherBank(x, ["a", "b"])


def test_adversarial_teacher_is_permuted_copy(digits_noisy, digits_bank):
    mods, names, _ = load_or_train_teachers(digits_noisy, 3, default_cache_dir(), adversarial=True)
    assert names[-1] == f"adv-{names[0]}"
    x = digits_noisy.test.x[:50]
    with torch.no_grad():
        good, bad = mods[0](x).argmax(-1), mods[-1](x).argmax(-1)
    assert torch.equal(bad, (good + 1) % 10)


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("METAGATE_CACHE", str(tmp_path))
    assert default_cache_dir() == Path(tmp_path)
    assert os.environ["METAGATE_CACHE"] == str(tmp_path)


def test_bank_protocol_declares_the_optional_features():
    """Every bank answers token_index, online, set_step and unit_right; a cached per-example bank has the defaults."""
    from metagate.teachers.online import OnlineBank
    from metagate.teachers.sequence import SeqTeacherBank, token_index
    from metagate.units import PAD_ID

    logits = torch.tensor([[[2.0, 0.0, 1.0], [0.0, 3.0, 0.0]],
                           [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]])  # teacher argmax: unit 0 -> (0, 1), unit 1 -> (2, 0)
    bank = TeacherBank(logits, ["a", "b"])
    assert bank.token_index is None and bank.online is False
    ids = torch.tensor([1, 0])
    before = bank.lookup(ids).clone()
    bank.set_step(torch.randn(2, 5), ids)  # cached logits ignore the step's inputs
    assert torch.equal(bank.lookup(ids), before)
    assert bank.unit_right(torch.tensor([0, 0])).tolist() == [[True, False], [False, True]]
    assert bank.unit_right(torch.tensor([0, 0, 0])) is None  # labels that do not cover the units
    # per token: the index maps (example, position) to stored rows; padding (class PAD_ID) is never right
    mask = torch.tensor([[True, True, False], [True, False, False]])
    tok = torch.tensor([[[0, 5.0, 0, 0], [0, 0, 5.0, 0]],   # token row 0: teacher a says 1, b says 2
                        [[0, 0, 0, 5.0], [0, 5.0, 0, 0]],   # row 1: a says 3, b says 1
                        [[0, 5.0, 0, 0], [0, 5.0, 0, 0]]])  # row 2: both say 1
    seq = SeqTeacherBank(tok, token_index(mask), ["a", "b"])
    assert seq.online is False and seq.token_index.tolist() == [[0, 1, 3], [2, 3, 3]]
    right = seq.unit_right(torch.tensor([[1, 1, PAD_ID], [1, PAD_ID, PAD_ID]]))
    assert right.tolist() == [[True, False], [False, True], [False, False], [True, True], [False, False],
                              [False, False]]
    # online: the step's inputs reach the module column through set_step
    lin = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(3, 4))
    online = OnlineBank([lin, torch.zeros(6, 3)], ["m", "z"], torch.zeros(6, 4), 3)
    assert online.online is True and online.token_index is None
    x = torch.arange(8.0).view(2, 4)
    online.set_step(x, ids)
    torch.testing.assert_close(online.lookup(ids)[:, 0], x[:, :3])
    torch.testing.assert_close(online.lookup(ids)[:, 1], torch.zeros(2, 3))
