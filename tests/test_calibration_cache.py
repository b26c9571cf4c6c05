"""The teachers' temperature fit and reliability table cached with the bank (metagate.teachers.calibration_cache):
a loaded fit gives the computed run bit for bit, is used instead of refitting, is stale for other teachers or
another meta split, and a damaged file is named."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

import metagate.teachers.build as build
from metagate.data.task import Split
from metagate.errors import StaleCacheError, StorageError
from metagate.run import DistillConfig, load_task, run_distill
from metagate.teachers.build import fit_teacher_temperatures, load_teachers
from metagate.teachers.calibration_cache import FIT_VERSION, calibration_file
from metagate.teachers.training import load_or_train_teachers
from metagate.trainer import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["cnn16", "cnn24", "cnn32"]  # noisy digits' three teachers (checked below against the bank)


@pytest.fixture
def fits(monkeypatch):
    """Counts the fits on meta (the split's logits and the temperature search) that actually run."""
    calls = {"n": 0}
    real = build.calibrate_teachers

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(build, "calibrate_teachers", counted)
    return calls


@pytest.fixture
def cache(digits_noisy, digits_bank, tmp_path) -> Path:
    """A cache directory holding the session's trained digits teachers and their logits, but no fit."""
    src = Path(os.environ["METAGATE_CACHE"]) / digits_noisy.key
    dst = tmp_path / "cache" / digits_noisy.key
    dst.mkdir(parents=True)
    for f in [*src.glob("teacher-cnn*.pt"), *src.glob("logits-cnn*.pt")]:
        shutil.copy(f, dst / f.name)
    assert digits_bank[0].names == NAMES
    return tmp_path / "cache"


def _cfg(cache: Path, **extra) -> DistillConfig:
    return DistillConfig(task="digits", noise=0.4, cache_dir=str(cache),
                         train=TrainConfig(epochs=1, device="cpu", progress=False), **{"teachers": 3, **extra})


def _file(cache: Path, task) -> Path:
    return cache / task.key / calibration_file(NAMES)


def test_a_cached_fit_gives_the_computed_run_bit_for_bit(cache, digits_noisy, fits, tmp_path):
    """hard (calibrated teachers: tau_k and the ensemble's r decide every unit) for one epoch: the run that fits
    and writes the cache and the run that reads it give the same metrics exactly; the fit ran once."""
    computed = run_distill(_cfg(cache, gate="hard", logdir=str(tmp_path / "computed")), task=digits_noisy)
    assert fits["n"] == 1 and _file(cache, digits_noisy).is_file()
    loaded = run_distill(_cfg(cache, gate="hard", logdir=str(tmp_path / "loaded")), task=digits_noisy)
    assert fits["n"] == 1  # read from the cache, not refitted
    scalars = [k for k, v in computed.items() if isinstance(v, float)]
    assert {"test/acc", "test/ece", "gate/teacher_share", "diag/auroc_teacher_share"} <= set(scalars)
    assert {k: loaded[k] for k in scalars} == {k: computed[k] for k in scalars}
    assert loaded["teachers"] == computed["teachers"]  # tau, meta NLL / ECE at 1, 1.5 and tau per teacher
    assert all(0 < t["tau"] < 1 for t in loaded["teachers"])
    hp = [json.loads((tmp_path / d / "hparams.json").read_text())["hparams"] for d in ("computed", "loaded")]
    fit_keys = [k for k in hp[0] if k.startswith("teacher_") or k.startswith("hard_")]
    assert "teacher_ensemble_tau" in fit_keys and "hard_gauge_tau" in fit_keys
    assert {k: hp[1][k] for k in fit_keys} == {k: hp[0][k] for k in fit_keys}
    rebuilt = run_distill(_cfg(cache, gate="hard", rebuild_cache=True, logdir=str(tmp_path / "rebuilt")),
                          task=digits_noisy)  # --rebuild-cache refits
    assert fits["n"] == 2 and {k: rebuilt[k] for k in scalars} == {k: computed[k] for k in scalars}


def test_the_cached_fit_holds_the_report_and_the_reliability_table(cache, digits_noisy, digits_bank, fits):
    fresh, _ = load_teachers(_cfg(cache), digits_noisy, progress=False)
    again, stats = load_teachers(_cfg(cache), digits_noisy, progress=False)
    assert fits["n"] == 1
    assert again.calibration == fresh.calibration and torch.equal(again.reliability, fresh.reliability)
    assert again.reliability.shape == (3, 10) and again.reliability.dtype == torch.float32
    # the session's bank (fitted in its own cache) has the same fit: the cache changes no number
    assert again.calibration == digits_bank[0].calibration
    assert torch.equal(again.reliability, digits_bank[0].reliability)
    blob = json.loads(_file(cache, digits_noisy).read_text())
    assert blob["version"] == FIT_VERSION and blob["calibration"]["names"] == NAMES
    st = blob["calibration"]["stats"]
    assert set(st) == {*NAMES, "ensemble"}
    assert {"nll_tau1", "ece_tau1", "nll_tau1.5", "ece_tau1.5", "nll", "ece"} <= set(st["cnn16"])
    assert blob["calibration"]["ensemble_tau"] == again.calibration.ensemble_tau
    assert stats[0]["tau"] == blob["calibration"]["taus"][0]
    assert stats[0]["meta_ece_tau1.5"] == st["cnn16"]["ece_tau1.5"]
    # fewer teachers: another bank, another file
    two, _ = load_teachers(_cfg(cache, teachers=2), digits_noisy, progress=False)
    assert fits["n"] == 2 and (cache / digits_noisy.key / calibration_file(NAMES[:2])).is_file()
    assert two.calibration.taus == fresh.calibration.taus[:2]  # the per-teacher fit does not depend on the others


def test_another_meta_split_or_other_teachers_make_the_fit_stale(cache, digits_noisy, fits):
    cfg = _cfg(cache)
    load_teachers(cfg, digits_noisy, progress=False)
    path = _file(cache, digits_noisy)
    written = path.read_bytes()
    y = digits_noisy.meta.y.clone()
    y[0] = (y[0] + 1) % 10  # one meta label changed
    moved = dataclasses.replace(digits_noisy, meta=Split(digits_noisy.meta.x, y))
    with pytest.raises(StaleCacheError, match=f"stale teacher calibration cache {re.escape(str(path))}.*meta split"):
        load_teachers(cfg, moved, progress=False)
    assert fits["n"] == 1 and path.read_bytes() == written  # nothing refitted, nothing overwritten
    # other teachers: one weight of a teacher moved
    modules, names, stats = load_or_train_teachers(digits_noisy, 3, cache, progress=False)
    bank, _ = load_teachers(cfg, digits_noisy, progress=False)
    with torch.no_grad():
        next(modules[1].parameters()).view(-1)[0] += 1e-3
    with pytest.raises(StaleCacheError, match="teachers \\(names and weights\\)"):
        fit_teacher_temperatures(bank, digits_noisy, modules, "cpu", stats, cache)
    # --rebuild-cache refits for the new split and replaces the file; the old split is then stale
    load_teachers(_cfg(cache, rebuild_cache=True), moved, progress=False)
    assert fits["n"] == 2 and path.read_bytes() != written
    with pytest.raises(StaleCacheError, match="stale teacher calibration cache"):
        load_teachers(cfg, digits_noisy, progress=False)


def test_a_damaged_cache_file_is_named(cache, digits_noisy, fits):
    cfg = _cfg(cache)
    fresh, _ = load_teachers(cfg, digits_noisy, progress=False)
    path = _file(cache, digits_noisy)
    named = f"damaged teacher calibration cache {re.escape(str(path))}"
    good = path.read_text()
    blob = json.loads(good)
    blob["calibration"]["taus"][0] *= 2  # an edited value: the checksum no longer holds
    path.write_text(json.dumps(blob))
    with pytest.raises(StaleCacheError, match=f"{named}: its checksum"):
        load_teachers(cfg, digits_noisy, progress=False)
    del blob["reliability"]
    path.write_text(json.dumps(blob))
    with pytest.raises(StaleCacheError, match="damaged .*'reliability'"):
        load_teachers(cfg, digits_noisy, progress=False)
    path.write_text(good[: len(good) // 2])  # truncated: not JSON
    with pytest.raises(StaleCacheError, match=f"{named}: it is not a metagate"):
        load_teachers(cfg, digits_noisy, progress=False)
    # not recognisably the cache's own: --rebuild-cache leaves it as it is
    with pytest.raises(StorageError, match=f"will not replace {re.escape(str(path))}"):
        load_teachers(_cfg(cache, rebuild_cache=True), digits_noisy, progress=False)
    assert path.read_text() == good[: len(good) // 2] and fits["n"] == 1
    path.unlink()
    path.mkdir()
    with pytest.raises(StaleCacheError, match=f"{re.escape(str(path))} is a directory"):
        load_teachers(cfg, digits_noisy, progress=False)
    path.rmdir()
    # a fit of another method version is the cache's own: refitted and replaced without asking
    path.write_text(good.replace(FIT_VERSION, "0; an older search"))
    again, _ = load_teachers(cfg, digits_noisy, progress=False)
    assert fits["n"] == 2 and path.read_text() == good and again.calibration == fresh.calibration


def test_the_lm_sparse_bank_gets_the_cached_fit(tmp_path, fits):
    """tiny-random lm: the sparse top-k bank's fit is written beside it (keyed by its fingerprint), read on the
    next load, and equals the dense bank's fit of the same teachers."""
    from metagate.teachers.sparse_seq import SeqSparseBank

    opts = {"lm_documents": 12, "lm_doc_tokens": 80, "lm_seq_len": 16}
    dense_cfg = DistillConfig(task="lm", task_options=opts, teachers=2, cache_dir=str(tmp_path),
                              train=TrainConfig(epochs=1, progress=False))
    sparse_cfg = dataclasses.replace(dense_cfg, task_options={**opts, "topk": 16})
    task = load_task(sparse_cfg)
    sparse, stats = load_teachers(sparse_cfg, task, progress=False)
    assert isinstance(sparse, SeqSparseBank) and fits["n"] == 1
    path = tmp_path / task.key / calibration_file(sparse.names, 16)
    assert path.is_file() and path.name == "calibration-gpt2-128+llama-96-top16.json"
    assert json.loads(path.read_text())["reliability"] is None  # token units: no reliability table
    again, stats2 = load_teachers(sparse_cfg, task, progress=False)
    assert fits["n"] == 1 and again.calibration == sparse.calibration and stats2 == stats
    dense, _ = load_teachers(dense_cfg, load_task(dense_cfg), progress=False)
    assert fits["n"] == 2 and dense.calibration == sparse.calibration  # the fit reads the modules, not the bank
    # a sparse bank of other teachers (k changes its fingerprint) in the same file name: stale
    blob = json.loads(path.read_text())
    blob["fingerprint"] = "0" * 16
    path.write_text(json.dumps(blob))
    with pytest.raises(StaleCacheError, match=f"stale teacher calibration cache {re.escape(str(path))}"):
        load_teachers(sparse_cfg, task, progress=False)


def test_a_file_teacher_is_in_the_key_unfitted(cache, digits_noisy, digits_bank, fits, tmp_path):
    """Two trained teachers and a logits file: the file teacher keeps tau = 1 and no ensemble is fitted, in the
    computed fit and in the cached one; the file's name is part of the file name and of the key."""
    import numpy as np

    np.save(tmp_path / "t2.npy", digits_bank[0].logits[:, 2].numpy())
    cfg = _cfg(cache, teachers=2, teacher_file=(f"extra={tmp_path / 't2.npy'}",))
    fresh, stats = load_teachers(cfg, digits_noisy, progress=False)
    again, stats2 = load_teachers(cfg, digits_noisy, progress=False)
    assert fits["n"] == 1 and again.calibration == fresh.calibration and stats2 == stats
    cal = again.calibration
    assert cal.names == [*NAMES[:2], "extra"] and cal.calibrated == [True, True, False]
    assert cal.taus[2] == 1.0 and cal.ensemble_tau == 1.0 and "extra" not in cal.stats
    assert cal.taus[:2] == digits_bank[0].calibration.taus[:2] and again.reliability is None
    assert stats2[2] == {"name": "extra", "kind": "file"}
    blob = json.loads((cache / digits_noisy.key / calibration_file([*NAMES[:2], "extra"])).read_text())
    assert blob["reliability"] is None and blob["calibration"]["calibrated"] == [True, True, False]
