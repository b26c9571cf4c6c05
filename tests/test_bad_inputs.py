"""A table of bad inputs -- command line, YAML, files, API -- each giving a clear error of the right class that
names the offending option or file, and leaving existing files as they were (issue 12, points 5 and 8).

Every command-line case runs the subcommand itself (so the exception class is visible) and through
``metagate.cli.main`` (exit code 2 and a one-line message, never a traceback).
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import shutil
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from metagate.cli import build_parser, main
from metagate.errors import CheckpointError, ConfigError, InputError, StaleCacheError, StorageError
from metagate.teachers.cache import default_cache_dir

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = ["distill", "--task", "digits", "--noise", "0.4", "--teachers", "3", "--epochs", "1", "--batch-size", "64",
        "--device", "cpu", "--no-progress"]


@dataclass
class Case:
    """``make(tmp)`` prepares files and returns the input (argv, or a callable for API cases);
    ``needle(tmp)`` is what the message must contain (the option or the file)."""

    name: str
    make: Callable[[Path], Any]
    error: type[BaseException]
    needle: Callable[[Path], str] | str
    watch: Callable[[Path], list[Path]] = lambda tmp: []  # files that must be unchanged afterwards


def _snapshot(paths: list[Path]) -> dict[str, str]:
    out = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
        if root.is_dir():
            out[str(root) + "/"] = ",".join(sorted(p.name for p in root.iterdir()))
    return out


# -- file builders ---------------------------------------------------------------------------------------------
def _file(tmp: Path, name: str = "afile.txt", text: str = "my notes\n") -> Path:
    p = tmp / name
    p.write_text(text)
    return p


def _thesis(tmp: Path) -> Path:
    d = tmp / "thesis"
    (d / ".git").mkdir(parents=True)
    (d / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (d / "thesis.tex").write_text("\\chapter{Results}\n")
    return d


def _idx(values: bytes, *shape: int, dtype: int = 0x08) -> bytes:
    return struct.pack(">HBB", 0, dtype, len(shape)) + struct.pack(">" + "I" * len(shape), *shape) + values


def _fashion(tmp: Path, **override: bytes) -> Path:
    """A Fashion-MNIST-shaped --data-dir of 4 (+ 2 test) images, with some files replaced."""
    d = tmp / "fashion"
    d.mkdir(exist_ok=True)
    files = {"train-images-idx3-ubyte.gz": _idx(bytes(4 * 784), 4, 28, 28),
             "train-labels-idx1-ubyte.gz": _idx(bytes([0, 1, 2, 3]), 4),
             "t10k-images-idx3-ubyte.gz": _idx(bytes(2 * 784), 2, 28, 28),
             "t10k-labels-idx1-ubyte.gz": _idx(bytes([0, 1]), 2)}
    for key, raw in override.items():
        files[key.replace("_", "-") + ".gz" if not key.endswith(".gz") else key] = raw
    for name, raw in files.items():
        (d / name).write_bytes(gzip.compress(raw, compresslevel=1))
    return d


def _fashion_raw(tmp: Path, name: str, raw: bytes) -> Path:
    d = _fashion(tmp)
    (d / name).write_bytes(raw)
    return d


TRAIN_IMAGES, TRAIN_LABELS = "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"


def _yaml(tmp: Path, text: str) -> list[str]:
    p = tmp / "run.yaml"
    p.write_text(text)
    return ["distill", "--device", "cpu", "--no-progress", "--config", str(p), "--logdir", str(tmp / "run")]


def _run_dir(tmp: Path) -> Path:
    """A finished 1-epoch fixed run (copied from a module-wide one)."""
    dst = tmp / "run"
    shutil.copytree(_PREPARED["run"], dst)
    return dst


def _cache(tmp: Path, corrupt: Callable[[dict], None] | None = None) -> Path:
    """A copy of the session's teacher cache for noisy digits, one logits file damaged by ``corrupt``."""
    dst = tmp / "cache"
    shutil.copytree(default_cache_dir(), dst)
    if corrupt is not None:
        path = next(dst.rglob("logits-cnn16.pt"))
        blob = torch.load(path, weights_only=True)
        corrupt(blob)
        torch.save(blob, path)
    return dst


def _logits(tmp: Path) -> Path:
    return next((tmp / "cache").rglob("logits-cnn16.pt"))


def _flip_bit(blob: dict) -> None:
    raw = blob["logits"].view(torch.int32)
    raw[5, 3] ^= 1 << 20


def _roll(blob: dict) -> None:
    blob["logits"] = blob["logits"].roll(1, 0)


def _zero(blob: dict) -> None:
    blob["logits"] = torch.zeros_like(blob["logits"])


def _int64(blob: dict) -> None:
    blob["logits"] = blob["logits"].long()


def _ckpt_without(key: str) -> Callable[[Path], list[str]]:
    def make(tmp: Path) -> list[str]:
        run = _run_dir(tmp)
        state = torch.load(run / "checkpoint.pt", weights_only=True)
        del state[key]
        torch.save(state, run / "checkpoint.pt")
        return [*BASE, "--logdir", str(run), "--epochs", "2", "--resume"]

    return make


def _locked(tmp: Path) -> list[str]:
    from metagate.rundir import RunDir

    run = _run_dir(tmp)
    holder = RunDir(run, resume=True).__enter__()  # another "process" holds the run (flock is per open file)
    _PREPARED["holder"] = holder
    return [*BASE, "--logdir", str(run), "--epochs", "2", "--resume"]


def _policy_zip_with_features(tmp: Path) -> list[str]:
    from metagate.policies.safe_zip import META_NAME

    z = tmp / "policy.zip"
    meta = {"format": "metagate-policy", "version": 1, "policy_class": "metagate.policies.sb3.TeacherWeightingPolicy",
            "observation_shape": [8, 3, 4], "action_shape": [8, 3], "observation_low": 0.0,
            "observation_high": 5.0, "action_low": -1.0, "action_high": 1.0, "policy_kwargs": {}}
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr(META_NAME, json.dumps(meta))
        zf.writestr("policy.pth", b"")
    return [*BASE, "--gate", "policy", "--policy", str(z), "--logdir", str(tmp / "run")]


# -- API cases -------------------------------------------------------------------------------------------------
def _losses(**kw: Any) -> Callable[[Path], Callable[[], Any]]:
    from metagate.losses import unit_losses

    args = {"student_logits": torch.zeros(4, 3), "teacher_logits": torch.zeros(4, 2, 3),
            "labels": torch.tensor([0, 1, 2, 0]), "tau": 2.0}
    args.update(kw)
    return lambda tmp: lambda: unit_losses(**args)


def _reduce(weights: torch.Tensor, mask: torch.Tensor | None = None) -> Callable[[Path], Callable[[], Any]]:
    from metagate.losses import reduce_weighted

    return lambda tmp: lambda: reduce_weighted(torch.ones(4, 3), weights, mask)


def _disk_full(tmp: Path) -> Callable[[], Any]:
    from metagate.io import atomic_save

    target = tmp / "checkpoint.pt"
    atomic_save({"epoch": 1}, target)

    def run() -> None:
        with pytest.MonkeyPatch.context() as mp:
            def full(fd: int) -> None:
                raise OSError(errno.ENOSPC, "No space left on device")

            mp.setattr("os.fsync", full)
            atomic_save({"epoch": 2, "big": torch.zeros(1000)}, target)

    return run


def _read_only_logdir(tmp: Path) -> list[str]:
    d = tmp / "ro"
    d.mkdir()
    _PREPARED["read_only"] = d
    return [*BASE, "--logdir", str(d / "run")]


CASES = [
    # command line: numbers out of range or of the wrong type
    Case("seed-float", lambda t: [*BASE, "--seed", "1e23"], SystemExit, "--seed"),
    Case("seed-huge", lambda t: [*BASE, "--seed", str(10**23)], ConfigError, "--seed"),
    Case("seed-negative", lambda t: [*BASE, "--seed", "-1"], ConfigError, "--seed"),
    Case("momentum-negative", lambda t: [*BASE, "--momentum", "-5"], ConfigError, "--momentum"),
    Case("tau-inf", lambda t: [*BASE, "--tau", "inf"], ConfigError, "--tau"),
    Case("weight-decay-nan", lambda t: [*BASE, "--weight-decay", "nan"], ConfigError, "--weight-decay"),
    Case("rl-hidden-0", lambda t: [*BASE, "--gate", "reinforce", "--rl-hidden", "0"], ConfigError, "--rl-hidden"),
    Case("epochs-0", lambda t: [*BASE, "--epochs", "0"], ConfigError, "--epochs"),
    Case("lr-0", lambda t: [*BASE, "--lr", "0"], ConfigError, "--lr"),
    Case("batch-size-0", lambda t: [*BASE, "--batch-size", "0"], ConfigError, "--batch-size"),
    Case("noise-1.5", lambda t: [*BASE, "--noise", "1.5"], ConfigError, "--noise"),
    Case("alpha-2", lambda t: [*BASE, "--alpha", "2"], ConfigError, "--alpha"),
    Case("rl-episode-0", lambda t: [*BASE, "--gate", "reinforce", "--rl-episode", "0"], ConfigError, "--rl-episode"),
    Case("teachers-negative", lambda t: [*BASE, "--teachers", "-1"], ConfigError, "--teachers"),
    Case("val-fraction-0", lambda t: [*BASE, "--val-fraction", "0"], ConfigError, "--val-fraction"),
    Case("unknown-task", lambda t: [*BASE, "--task", "imagenet", "--logdir", str(t / "run")], ConfigError, "imagenet"),
    Case("device-tpu", lambda t: [*BASE, "--device", "tpu", "--logdir", str(t / "run")], ConfigError, "--device"),
    Case("resume-and-overwrite", lambda t: [*BASE, "--resume", "--overwrite"], ConfigError, "--resume"),
    Case("adversarial-one-teacher", lambda t: [*BASE, "--teachers", "1", "--adversarial-teacher", "--logdir",
                                               str(t / "run")], ConfigError, "--adversarial-teacher"),
    Case("policy-unset", lambda t: [*BASE, "--gate", "policy", "--logdir", str(t / "run")], ConfigError, "--policy"),
    Case("policy-missing", lambda t: [*BASE, "--gate", "policy", "--policy", str(t / "none.zip")], ConfigError,
         lambda t: str(t / "none.zip")),
    Case("policy-not-a-zip", lambda t: [*BASE, "--gate", "policy", "--policy", str(_file(t, "p.zip"))], ConfigError,
         lambda t: str(t / "p.zip"), lambda t: [t / "p.zip"]),
    Case("policy-other-features", _policy_zip_with_features, ConfigError, "unit features",
         lambda t: [t / "policy.zip"]),
    # run directories
    Case("logdir-is-a-file", lambda t: [*BASE, "--logdir", str(_file(t))], StorageError,
         lambda t: str(t / "afile.txt"), lambda t: [t / "afile.txt"]),
    Case("logdir-under-a-file", lambda t: [*BASE, "--logdir", str(_file(t) / "run")], StorageError,
         lambda t: str(t / "afile.txt"), lambda t: [t / "afile.txt"]),
    Case("logdir-read-only", _read_only_logdir, StorageError, lambda t: str(t / "ro"), lambda t: [t / "ro"]),
    Case("overwrite-a-thesis", lambda t: [*BASE, "--logdir", str(_thesis(t)), "--overwrite"], ConfigError,
         lambda t: str(t / "thesis"), lambda t: [t / "thesis"]),
    Case("write-into-a-thesis", lambda t: [*BASE, "--logdir", str(_thesis(t))], ConfigError,
         lambda t: str(t / "thesis"), lambda t: [t / "thesis"]),
    Case("existing-run-no-flag", lambda t: [*BASE, "--logdir", str(_run_dir(t))], ConfigError, "--resume",
         lambda t: [t / "run"]),
    Case("resume-without-checkpoint", lambda t: [*BASE, "--logdir", str(t / "empty"), "--resume"], ConfigError,
         "--resume"),
    Case("resume-corrupt-checkpoint", lambda t: (_run_dir(t) / "checkpoint.pt").write_bytes(b"\0junk") and
         [*BASE, "--logdir", str(t / "run"), "--resume", "--epochs", "2"], CheckpointError,
         lambda t: str(t / "run" / "checkpoint.pt"), lambda t: [t / "run"]),
    Case("resume-other-alpha", lambda t: [*BASE, "--logdir", str(_run_dir(t)), "--resume", "--alpha", "0.2"],
         CheckpointError, "--alpha", lambda t: [t / "run"]),
    Case("resume-other-seed", lambda t: [*BASE, "--logdir", str(_run_dir(t)), "--resume", "--seed", "3"],
         CheckpointError, "--seed", lambda t: [t / "run"]),
    Case("resume-other-schedule", lambda t: [*BASE, "--logdir", str(_run_dir(t)), "--resume", "--schedule",
                                             "constant"], CheckpointError, "--schedule", lambda t: [t / "run"]),
    Case("checkpoint-without-rng", _ckpt_without("rng"), CheckpointError, "lacks rng"),
    Case("checkpoint-without-student", _ckpt_without("student"), CheckpointError, "lacks student"),
    Case("run-in-use", _locked, ConfigError, "in use by another metagate run", lambda t: [t / "run"]),
    # teacher cache
    Case("cache-dir-is-a-file", lambda t: [*BASE, "--cache-dir", str(_file(t)), "--logdir", str(t / "run")],
         StorageError, "--cache-dir", lambda t: [t / "afile.txt"]),
    Case("cache-dir-under-a-file", lambda t: [*BASE, "--cache-dir", str(_file(t) / "c"), "--logdir", str(t / "run")],
         StorageError, "--cache-dir", lambda t: [t / "afile.txt"]),
    Case("cache-logits-zeroed", lambda t: [*BASE, "--cache-dir", str(_cache(t, _zero)), "--logdir", str(t / "run")],
         StaleCacheError, "--rebuild-cache", lambda t: [t / "cache"]),
    Case("cache-logits-rolled", lambda t: [*BASE, "--cache-dir", str(_cache(t, _roll)), "--logdir", str(t / "run")],
         StaleCacheError, lambda t: str(_logits(t)), lambda t: [t / "cache"]),
    Case("cache-logits-bit-flip", lambda t: [*BASE, "--cache-dir", str(_cache(t, _flip_bit)), "--logdir",
                                             str(t / "run")], StaleCacheError, "checksum", lambda t: [t / "cache"]),
    Case("cache-logits-int64", lambda t: [*BASE, "--cache-dir", str(_cache(t, _int64)), "--logdir", str(t / "run")],
         StaleCacheError, "torch.int64", lambda t: [t / "cache"]),
    # Fashion-MNIST idx files
    Case("idx-empty", lambda t: ["distill", "--task", "fashion", "--data-dir", str(_fashion(t, **{TRAIN_IMAGES: b""}))],
         InputError, TRAIN_IMAGES, lambda t: [t / "fashion"]),
    Case("idx-short-header", lambda t: ["distill", "--task", "fashion", "--data-dir",
                                        str(_fashion(t, **{TRAIN_LABELS: b"\0\0"}))], InputError, TRAIN_LABELS,
         lambda t: [t / "fashion"]),
    Case("idx-3d-labels", lambda t: ["distill", "--task", "fashion", "--data-dir",
                                     str(_fashion(t, **{TRAIN_LABELS: _idx(bytes(4), 4, 1, 1)}))], InputError,
         "3 dimensions", lambda t: [t / "fashion"]),
    Case("idx-count-mismatch", lambda t: ["distill", "--task", "fashion", "--data-dir",
                                          str(_fashion(t, **{TRAIN_LABELS: _idx(bytes(3), 3)}))], InputError,
         TRAIN_LABELS, lambda t: [t / "fashion"]),
    Case("idx-truncated", lambda t: ["distill", "--task", "fashion", "--data-dir",
                                     str(_fashion(t, **{TRAIN_IMAGES: _idx(bytes(100), 4, 28, 28)}))], InputError,
         "truncated", lambda t: [t / "fashion"]),
    Case("idx-gzip-bomb", lambda t: ["distill", "--task", "fashion", "--data-dir",
                                     str(_fashion(t, **{TRAIN_IMAGES: _idx(bytes(8 << 20), 4, 28, 28)}))], InputError,
         "longer than its header", lambda t: [t / "fashion"]),
    Case("idx-not-gzip", lambda t: ["distill", "--task", "fashion", "--data-dir",
                                    str(_fashion_raw(t, TRAIN_IMAGES, b"plain bytes"))], InputError, TRAIN_IMAGES,
         lambda t: [t / "fashion"]),
    Case("idx-labels-out-of-range", lambda t: ["distill", "--task", "fashion", "--data-dir",
                                               str(_fashion(t, **{TRAIN_LABELS: _idx(bytes([0, 1, 2, 42]), 4)}))],
         InputError, "42", lambda t: [t / "fashion"]),
    Case("idx-other-image-size", lambda t: ["distill", "--task", "fashion", "--data-dir",
                                            str(_fashion(t, **{TRAIN_IMAGES: _idx(bytes(4 * 64), 4, 8, 8)}))],
         InputError, "28x28", lambda t: [t / "fashion"]),
    # YAML configs
    Case("yaml-noise-lots", lambda t: _yaml(t, "noise: lots\n"), ConfigError, "noise"),
    Case("yaml-epochs-two", lambda t: _yaml(t, "epochs: two\n"), ConfigError, "epochs"),
    Case("yaml-lr-string", lambda t: _yaml(t, "lr: '0.1'\n"), ConfigError, "lr"),
    Case("yaml-teachers-list", lambda t: _yaml(t, "teachers: [1, 2]\n"), ConfigError, "teachers"),
    Case("yaml-epochs-float", lambda t: _yaml(t, "epochs: 2.7\n"), ConfigError, "epochs"),
    Case("yaml-epochs-bool", lambda t: _yaml(t, "epochs: true\n"), ConfigError, "epochs"),
    Case("yaml-unknown-key", lambda t: _yaml(t, "epochz: 3\n"), ConfigError, "epochz"),
    Case("yaml-not-a-mapping", lambda t: _yaml(t, "- 1\n- 2\n"), ConfigError, lambda t: str(t / "run.yaml")),
    Case("yaml-billion-laughs", lambda t: _yaml(t, "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi")) + "adversarial_teacher: *i\n"),
         ConfigError, lambda t: str(t / "run.yaml")),
    Case("yaml-overwrite-thesis", lambda t: _yaml(t, f"logdir: {_thesis(t)}\noverwrite: true\n")[:-2], ConfigError,
         lambda t: str(t / "thesis"), lambda t: [t / "thesis"]),
    # API
    Case("losses-label-out-of-range", _losses(labels=torch.tensor([0, 1, 2, 3])), InputError, "labels"),
    Case("losses-float-labels", _losses(labels=torch.zeros(4)), InputError, "labels"),
    Case("losses-nan-student", _losses(student_logits=torch.full((4, 3), float("nan"))), InputError,
         "student_logits"),
    Case("losses-inf-teacher", _losses(teacher_logits=torch.full((4, 2, 3), float("inf"))), InputError,
         "teacher_logits"),
    Case("losses-tau-0", _losses(tau=0.0), InputError, "tau"),
    Case("losses-tau-negative-tensor", _losses(tau=torch.tensor([1.0, -1.0, 1.0, 1.0])), InputError, "tau"),
    Case("losses-teacher-classes", _losses(teacher_logits=torch.zeros(4, 2, 5)), InputError, "class-count"),
    Case("losses-1d-student", _losses(student_logits=torch.zeros(4)), InputError, "student_logits"),
    Case("reduce-negative-weights", _reduce(torch.full((4, 3), -1.0)), InputError, "weights"),
    Case("reduce-nan-weights", _reduce(torch.full((4, 3), float("nan"))), InputError, "weights"),
    Case("reduce-weight-shape", _reduce(torch.ones(4, 2)), InputError, "weights"),
    Case("reduce-mask-shape", _reduce(torch.ones(4, 3), torch.ones(5)), InputError, "mask"),
    Case("disk-full", _disk_full, StorageError, "no space left on device", lambda t: [t / "checkpoint.pt"]),
]

_PREPARED: dict[str, Any] = {}


@pytest.fixture(scope="module", autouse=True)
def _prepared(tmp_path_factory, digits_bank):
    run = tmp_path_factory.mktemp("prepared") / "run"
    assert main([*BASE, "--gate", "fixed", "--logdir", str(run)]) == 0
    _PREPARED["run"] = run
    yield


def _needle(case: Case, tmp: Path) -> str:
    return case.needle(tmp) if callable(case.needle) else case.needle


def _cli_exception(argv: list[str], capsys) -> BaseException | None:
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
    except SystemExit as e:
        e.args = (capsys.readouterr().err,)
        return e
    except BaseException as e:  # noqa: BLE001 - the case asserts which class it is
        return e
    return None


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gives_a_clear_error(case, tmp_path, capsys, monkeypatch):
    # as root chmod cannot make a directory read-only: the check's probe (os.access) is what fails
    real_access, ro = os.access, str(tmp_path / "ro")
    monkeypatch.setattr("os.access", lambda p, m, **kw: False if str(p).startswith(ro) else real_access(p, m, **kw))
    made = case.make(tmp_path)
    watched = case.watch(tmp_path)
    before = _snapshot(watched)
    try:
        if callable(made):
            with pytest.raises(case.error) as info:
                made()
            exc: BaseException | None = info.value
        else:
            exc = _cli_exception(made, capsys)
            assert isinstance(exc, case.error), f"expected {case.error.__name__}, got {exc!r}"
            if not isinstance(exc, SystemExit):  # and through main: exit 2 with the message, no traceback
                capsys.readouterr()
                assert main(made) == 2
                assert _needle(case, tmp_path) in capsys.readouterr().err
        message = exc.args[0] if isinstance(exc, SystemExit) else str(exc)
        assert exc is not None and _needle(case, tmp_path) in message, message
        assert _snapshot(watched) == before
    finally:
        holder = _PREPARED.pop("holder", None)
        if holder is not None:
            holder.__exit__(None, None, None)


def test_the_table_is_large():
    assert len(CASES) >= 40


def test_stale_cache_error_says_how_to_rebuild_and_rebuild_works(digits_bank, tmp_path):
    cache = _cache(tmp_path, _zero)
    args = [*BASE, "--cache-dir", str(cache), "--logdir", str(tmp_path / "run")]
    assert main(args) == 2
    assert main([*args, "--rebuild-cache"]) == 0
    blob = torch.load(_logits(tmp_path), weights_only=True)
    assert blob["logits"].abs().sum() > 0 and "checksum" in blob


def test_losses_validation_accepts_good_input():
    from metagate.losses import reduce_weighted, unit_losses

    s, t, y = torch.randn(4, 3), torch.randn(4, 2, 3), torch.tensor([0, 1, 2, 0])
    a = unit_losses(s, t, y, 2.0)
    b = unit_losses(s, t, y, 2.0, validate=False)
    assert torch.equal(a, b)
    assert torch.equal(reduce_weighted(a, torch.full((4, 3), 0.5)),
                       reduce_weighted(a, torch.full((4, 3), 0.5), validate=False))
