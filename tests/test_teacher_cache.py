"""The teacher cache's writer rule (own files only, atomically, under a lock) and its one loader for both file kinds."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
from torch import nn

import metagate.teachers.cache as cache_mod
import metagate.teachers.training as training
from metagate.data import get_task
from metagate.errors import StaleCacheError, StorageError
from metagate.io import atomic_save, safe_load, tensor_checksum
from metagate.seq_models import GRUSeq2Seq
from metagate.teachers.build import build_bank
from metagate.teachers.cache import cached_logits, cached_token_logits, logits_file, teacher_file, token_logits_file

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return get_task("digits", noise=0.4)


@pytest.fixture(scope="module")
def g2p():
    return get_task("g2p", subset=150, noise=0.1)


def _teacher(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


def _gru(task) -> nn.Module:
    torch.manual_seed(0)
    return GRUSeq2Seq(len(task.info["chars"]), task.num_classes, 16, 24).eval()


def test_rebuild_replaces_only_a_teacher_cache_file(digits, tmp_path):
    t = _teacher()
    logits = cached_logits(t, "m", digits, tmp_path)
    path = tmp_path / digits.key / logits_file("m")
    blob = safe_load(path)
    assert blob["checksum"] == tensor_checksum(logits) and torch.equal(blob["logits"], logits)
    # a damaged cache file of ours is replaced on --rebuild-cache
    blob["logits"] = torch.zeros_like(logits)
    atomic_save(blob, path)
    with pytest.raises(StaleCacheError, match="checksum"):
        cached_logits(t, "m", digits, tmp_path)
    assert torch.equal(cached_logits(t, "m", digits, tmp_path, rebuild=True), logits)
    assert torch.equal(safe_load(path)["logits"], logits)
    # anything else under that name is left as it is
    path.write_bytes(b"my notes, not a cache\n")
    with pytest.raises(StorageError, match=rf"will not replace {path}: it should be a metagate teacher logits cache "
                                           r"but does not load as one"):
        build_bank(digits, [("m", t)], cache_dir=tmp_path, rebuild=True)
    assert path.read_bytes() == b"my notes, not a cache\n"
    torch.save({"mine": torch.ones(2)}, path)  # loads, but is not a teacher cache file
    before = path.read_bytes()
    with pytest.raises(StorageError, match=r"is not one \(no 'fingerprint'\)"):
        cached_logits(t, "m", digits, tmp_path, rebuild=True)
    assert path.read_bytes() == before
    path.unlink()
    path.mkdir()
    with pytest.raises(StorageError, match=r"logits-m\.pt: it should be a metagate teacher logits cache but is a "
                                           r"directory"):
        cached_logits(t, "m", digits, tmp_path, rebuild=True)
    assert path.is_dir() and not list(path.iterdir())


def test_retrain_replaces_only_a_teacher_checkpoint_and_refuses_before_training(digits, tmp_path, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("trained although the checkpoint path holds another file")

    monkeypatch.setattr(training, "train_teacher", no_training)
    name = digits.teacher_specs[0].name
    path = tmp_path / digits.key / teacher_file(name)
    path.parent.mkdir(parents=True)
    path.write_text("a user's file\n")
    with pytest.raises(StorageError, match=rf"will not replace {path}: it should be a metagate teacher checkpoint"):
        training.load_or_train_teachers(digits, 1, tmp_path, retrain=True, progress=False)
    assert path.read_text() == "a user's file\n"


def test_cache_path_that_is_a_fifo_is_refused_without_blocking(digits, tmp_path):
    path = tmp_path / digits.key / logits_file("m")
    path.parent.mkdir(parents=True)
    os.mkfifo(path)
    out: list = []

    def load():
        try:
            cached_logits(_teacher(), "m", digits, tmp_path)
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            out.append(e)

    t0 = time.monotonic()
    th = threading.Thread(target=load, daemon=True)
    th.start()
    th.join(5)
    assert not th.is_alive() and time.monotonic() - t0 < 1.0
    assert isinstance(out[0], StaleCacheError)
    assert str(out[0]).startswith(f"teacher logits cache {path} is a FIFO (named pipe), not a cache file")


def test_two_loaders_compute_a_logits_file_once(digits, tmp_path, monkeypatch):
    """Two loaders on one empty cache: one computes and writes under the lock; the other waits and reads it."""
    calls = []
    real = cache_mod.teacher_logits

    def slow(*args, **kwargs):
        calls.append(threading.get_ident())
        time.sleep(0.3)  # the other loader reaches the lock meanwhile
        return real(*args, **kwargs)

    monkeypatch.setattr(cache_mod, "teacher_logits", slow)
    t = _teacher()
    got: list = [None, None]

    def load(i):
        got[i] = cached_logits(t, "m", digits, tmp_path)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert len(calls) == 1
    assert torch.equal(got[0], got[1])
    assert sorted(p.name for p in (tmp_path / digits.key).iterdir()) == [".teachers.lock", logits_file("m")]


def test_sequence_cache_has_the_same_checks_and_recomputes_an_older_file(g2p, tmp_path):
    teacher = _gru(g2p)
    full = cached_token_logits(teacher, "g", g2p, tmp_path)
    path = tmp_path / g2p.key / token_logits_file("g")
    blob = safe_load(path)
    assert blob["checksum"] == tensor_checksum(full) and blob["logits"].dtype == torch.float16
    # flipped values: refused, and the file is left as it is
    blob["logits"][3, 2] += 1
    atomic_save(blob, path)
    before = path.read_bytes()
    with pytest.raises(StaleCacheError, match=rf"damaged teacher cache {path}: the logits' checksum is"):
        cached_token_logits(teacher, "g", g2p, tmp_path)
    assert path.read_bytes() == before
    # a file of an older version (no checksum) is recomputed and rewritten with one
    del blob["checksum"]
    atomic_save(blob, path)
    assert torch.equal(cached_token_logits(teacher, "g", g2p, tmp_path), full)
    assert safe_load(path)["checksum"] == tensor_checksum(full)
    # the top-k form: its values and indices are checked the same way
    top = cached_token_logits(teacher, "g", g2p, tmp_path, topk=4)
    tpath = tmp_path / g2p.key / token_logits_file("g", 4)
    tblob = safe_load(tpath)
    assert tblob["checksum"] == f"{tensor_checksum(tblob['values'])}-{tensor_checksum(tblob['indices'])}"
    assert torch.equal(cached_token_logits(teacher, "g", g2p, tmp_path, topk=4), top)
    tblob["indices"] = tblob["indices"].long()
    atomic_save(tblob, tpath)
    m = int(g2p.train.mask.sum())
    with pytest.raises(StaleCacheError, match=rf"indices are torch.int64 \({m}, 4\), expected uint8 or int16 or int32 "
                                              rf"\[{m}, k\]"):
        cached_token_logits(teacher, "g", g2p, tmp_path, topk=4)


def test_temporary_files_of_killed_writes_are_removed_under_the_lock_and_only_those(digits, tmp_path):
    d = tmp_path / digits.key
    d.mkdir(parents=True)
    ours = [d / ".logits-m.pt.k1x2.tmp", d / ".teacher-cnn16.pt.9zz.tmp", d / ".tokens-g-top4.pt.a.tmp"]
    theirs = [d / ".notes.tmp", d / ".my.pt.backup.tmp", d / "draft.tmp"]
    for p in ours + theirs:
        p.write_bytes(b"x")
    cached_logits(_teacher(), "m", digits, tmp_path)  # computes: takes the lock
    assert not any(p.exists() for p in ours)
    assert all(p.read_bytes() == b"x" for p in theirs)
