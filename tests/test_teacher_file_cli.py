"""``--teacher-file`` (CLI and YAML) on digits, and per-token ``[N, T, V]`` teacher files on g2p."""

from __future__ import annotations

import json
import os
import re
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

import metagate
from metagate.cli import main
from metagate.data import get_task
from metagate.errors import InputError
from metagate.teachers.files import read_teacher_file, token_table, topk_arrays
from metagate.units import PAD_ID

pytestmark = pytest.mark.usefixtures("one_thread")

DIGITS = ["distill", "--task", "digits", "--noise", "0.4", "--gate", "fixed", "--epochs", "2", "--device", "cpu",
          "--no-progress"]


def _metrics(logdir) -> dict:
    return json.loads((logdir / "metrics.json").read_text())


def _student_metrics(m: dict) -> dict:
    return {k: v for k, v in m.items() if k != "teachers"}


def test_teacher_file_flag_equals_the_in_project_teacher_on_digits(digits_bank, tmp_path, capsys):
    bank, _ = digits_bank  # the session's cached CNN teachers (same cache as the CLI's)
    name = bank.names[0]
    np.save(tmp_path / "t0.npy", bank.logits[:, 0].numpy())
    assert main([*DIGITS, "--teachers", "1", "--logdir", str(tmp_path / "a")]) == 0
    assert main([*DIGITS, "--teachers", "0", "--teacher-file", f"{name}=" + str(tmp_path / "t0.npy"),
                 "--logdir", str(tmp_path / "b")]) == 0
    a, b = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert _student_metrics(a) == _student_metrics(b)
    assert b["teachers"] == [{"name": name, "kind": "file"}]
    # two files (the flag repeated; a top-k .pt named by its stem) after the trained teacher; and from YAML
    torch.save(topk_arrays(bank.logits[:, 1], 5), tmp_path / "top5.pt")
    assert main([*DIGITS, "--teachers", "1", "--teacher-file", str(tmp_path / "t0.npy"), "--teacher-file",
                 str(tmp_path / "top5.pt"), "--logdir", str(tmp_path / "c")]) == 0
    assert [t["name"] for t in _metrics(tmp_path / "c")["teachers"]] == [name, "t0", "top5"]
    (tmp_path / "run.yaml").write_text(f"teachers: 0\nteacher_file: ['{name}={tmp_path / 't0.npy'}']\n")
    assert main([*DIGITS, "--config", str(tmp_path / "run.yaml"), "--logdir", str(tmp_path / "d")]) == 0
    assert _student_metrics(_metrics(tmp_path / "d")) == _student_metrics(b)
    capsys.readouterr()
    np.save(tmp_path / "short.npy", bank.logits[:100, 0].numpy())
    assert main([*DIGITS, "--teachers", "0", "--teacher-file", str(tmp_path / "short.npy"),
                 "--logdir", str(tmp_path / "e")]) != 0
    assert f"short.npy has 100 rows but the training split has {bank.num_units} units" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    assert "--teacher-file [NAME=]PATH" in capsys.readouterr().out


G2P = ["distill", "--task", "g2p", "--subset", "150", "--noise", "0.1", "--gate", "fixed", "--epochs", "2",
       "--optimizer", "adam", "--lr", "0.003", "--batch-size", "32", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def g2p_task():
    return get_task("g2p", subset=150, noise=0.1)


def _per_token_file(task, tmp_path) -> tuple[str, torch.Tensor]:
    """The in-project teacher's cached token logits unpacked into ``[N, T, V]`` (padding: zeros)."""
    (cached,) = (tmp_path / "cache").glob("*/tokens-*.pt")
    blob = torch.load(cached, weights_only=True)
    mask = task.train.y != PAD_ID
    full = torch.zeros(*mask.shape, task.num_classes)
    full[mask] = blob["logits"].float()
    return cached.stem.removeprefix("tokens-"), full


def test_per_token_teacher_file_equals_the_in_project_teacher_on_g2p(g2p_task, tmp_path):
    cache = ["--cache-dir", str(tmp_path / "cache")]
    assert main([*G2P, "--teachers", "1", *cache, "--logdir", str(tmp_path / "a")]) == 0
    name, full = _per_token_file(g2p_task, tmp_path)
    np.save(tmp_path / "tok.npy", full.numpy())
    assert main([*G2P, "--teachers", "0", "--teacher-file", f"{name}={tmp_path / 'tok.npy'}", *cache,
                 "--logdir", str(tmp_path / "b")]) == 0
    a, b = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert _student_metrics(a) == _student_metrics(b)
    # top-k (k = 8 of V) per token: the rebuilt distribution keeps the top 8 and spreads the rest
    torch.save(topk_arrays(full, 8), tmp_path / "top8.pt")
    assert main([*G2P, "--teachers", "0", "--teacher-file", str(tmp_path / "top8.pt"), *cache,
                 "--logdir", str(tmp_path / "c")]) == 0
    c = _metrics(tmp_path / "c")
    assert abs(c["test/per"] - a["test/per"]) < 5 and np.isfinite(c["test/nll"])


def test_bad_per_token_files_are_clear_errors(g2p_task, tmp_path):
    mask = g2p_task.train.y != PAD_ID
    n, t = mask.shape
    v = g2p_task.num_classes
    ids = torch.arange(n)
    good = torch.randn(n, t, v)

    def table(blob, name="f.pt"):
        torch.save(blob, tmp_path / name)
        return token_table(read_teacher_file(tmp_path / name), ids, mask, v)

    assert table({"logits": good}).shape == (int(mask.sum()), v)
    with pytest.raises(InputError, match=rf"f.pt has T = {t + 1} positions per unit but the task's padded target "
                                         rf"length is {t}"):
        table({"logits": torch.randn(n, t + 1, v)})
    with pytest.raises(InputError, match=rf"vocabulary mismatch: .*f.pt has V = {v + 2} target tokens but the "
                                         rf"task's \(and the student's\) target vocabulary has {v}"):
        table({"logits": torch.randn(n, t, v + 2)})
    with pytest.raises(InputError, match=rf"f.pt has {n - 1} rows but the training split has {n} units"):
        table({"logits": good[1:]})
    bad = good.clone()
    bad[3, 1, 2] = float("nan")
    with pytest.raises(InputError, match=r"f.pt: 'logits' holds 1 NaN/inf value\(s\) .* first in row 3"):
        table({"logits": bad})
    with pytest.raises(InputError, match=rf"f.pt: 1 of its {n} unit id\(s\) are not in the data, first {n + 7}"):
        table({"logits": good, "ids": torch.cat([ids[:-1], torch.tensor([n + 7])])})
    with pytest.raises(InputError, match=rf"f.pt stores the top {v} of {v} classes: top-k needs k < C"):
        top = torch.log_softmax(good, -1).topk(v, -1)
        table({"indices": top.indices, "log_probs": top.values})
    with pytest.raises(InputError, match=rf"f.pt is \[N, C\] but the task is a sequence task.*\[{n}, {t}, {v}\]"):
        table({"logits": torch.randn(n, v)})
    from metagate.teachers.files import teacher_table

    with pytest.raises(InputError, match=r"f.pt is a per-token \[N, T, V\] file \(T = 4\) but the task has one unit "
                                         r"per example"):
        torch.save({"logits": torch.randn(5, 4, 3)}, tmp_path / "f.pt")
        teacher_table(read_teacher_file(tmp_path / "f.pt"), torch.arange(5), 3, what="the task")


def test_compare_takes_teacher_files_for_one_data_draw(digits_bank, tmp_path, capsys):
    bank, _ = digits_bank
    np.save(tmp_path / "t0.npy", bank.logits[:, 0].numpy())
    base = ["compare", "--task", "digits", "--noise", "0.4", "--gates", "fixed", "hard", "--teachers", "0",
            "--teacher-file", str(tmp_path / "t0.npy"), "--epochs", "1", "--device", "cpu", "--no-progress"]
    assert main([*base, "--seeds", "0", "--out", str(tmp_path / "one")]) == 0
    out = capsys.readouterr().out
    assert "fixed" in out and "hard" in out
    assert main([*base, "--seeds", "0", "1", "--out", str(tmp_path / "two")]) != 0
    assert "--teacher-file with --seeds 0 1: each seed is its own data draw" in capsys.readouterr().err
    # --same-data: every seed trains on the file's draw
    assert main([*base, "--seeds", "0", "1", "--same-data", "--out", str(tmp_path / "same")]) == 0
    rows = json.loads((tmp_path / "same" / "results.json").read_text())["rows"]
    assert sorted((r["label"], r["seed"], r["config"]["data_seed"]) for r in rows) == [
        ("fixed", 0, 0), ("fixed", 1, 0), ("hard", 0, 0), ("hard", 1, 0)]


# -- inputs that are not teacher files: refused, named, never read ----------------------------------------
def _in_thread(fn, seconds: float):
    """``fn()``'s result (or the exception it raised), run in a daemon thread: the test fails instead of hanging
    when ``fn`` blocks (a reader opening a FIFO without a writer waits forever)."""
    out: list = []

    def run():
        try:
            out.append(fn())
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds} s"
    return out[0]


def _not_a_file(tmp_path, kind: str) -> tuple[str, str]:
    """A path of ``kind`` and how the error names it."""
    if kind == "directory":
        (tmp_path / "logits.npy").mkdir()
        return str(tmp_path / "logits.npy"), "is a directory"
    if kind == "fifo":
        os.mkfifo(tmp_path / "logits.npy")
        return str(tmp_path / "logits.npy"), r"is a FIFO \(named pipe\)"
    if kind == "device":
        return "/dev/zero", "is a character device"
    (tmp_path / "zero.npy").symlink_to("/dev/zero")
    return str(tmp_path / "zero.npy"), "is a symlink to /dev/zero, a character device"


@pytest.mark.parametrize("kind", ["directory", "fifo", "device", "symlink-to-device"])
def test_teacher_file_that_is_not_a_regular_file_is_named_within_a_second(tmp_path, capsys, kind):
    path, said = _not_a_file(tmp_path, kind)
    t0 = time.monotonic()
    err = _in_thread(lambda: read_teacher_file(path), 5.0)
    assert time.monotonic() - t0 < 1.0
    assert isinstance(err, InputError)
    assert re.fullmatch(rf"teacher logits file {re.escape(path)} {said}, not a regular file", str(err)), str(err)
    args = [*DIGITS, "--teachers", "0", "--cache-dir", str(tmp_path / "cache"), "--logdir", str(tmp_path / "run")]
    assert main([*args, "--teacher-file", str(tmp_path / "missing.npy")]) == 2  # (loads the data once)
    assert "missing.npy does not exist" in capsys.readouterr().err
    t0 = time.monotonic()
    rc = _in_thread(lambda: main([*args, "--teacher-file", f"t={path}"]), 10.0)
    assert time.monotonic() - t0 < 1.0 and rc == 2
    assert re.search(rf"teacher logits file {re.escape(path)} {said}, not a regular file", capsys.readouterr().err)
    # the Python API reads the teacher's class count first: the same refusal
    task = get_task("digits", noise=0.4)
    err = _in_thread(lambda: metagate.distill(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), [path], (task.train.x, task.train.y),
                                              val=(task.meta.x, task.meta.y), gate="fixed"), 5.0)
    assert isinstance(err, InputError) and re.search(rf"{re.escape(path)} {said}", str(err))


def test_missing_teacher_file_and_dangling_symlink_are_named(tmp_path):
    with pytest.raises(InputError, match=r"teacher logits file .*nowhere\.npy does not exist$"):
        read_teacher_file(tmp_path / "nowhere.npy")
    (tmp_path / "link.npy").symlink_to(tmp_path / "gone.npy")
    with pytest.raises(InputError, match=r"link\.npy is a symlink to .*gone\.npy, which does not exist"):
        read_teacher_file(tmp_path / "link.npy")


def test_corrupt_safetensors_header_is_an_input_error_naming_the_file(tmp_path):
    bad = tmp_path / "teacher.safetensors"
    bad.write_bytes((16).to_bytes(8, "little") + b"{garbage-header}")  # header length 16, then not JSON
    with pytest.raises(InputError, match=rf"teacher logits file {re.escape(str(bad))} is not a readable safetensors "
                                         r"file \(SafetensorError: .*header"):
        read_teacher_file(bad)
    bad.write_bytes(b"\xff" * 8)  # a header length of 2**64 - 1
    with pytest.raises(InputError, match=r"teacher\.safetensors is not a readable safetensors file .*too large"):
        read_teacher_file(bad)
    # a readable file with a bad array is still named by its own check, not as unreadable
    from safetensors.torch import save_file

    save_file({"logits": torch.zeros(2, 3, dtype=torch.int32)}, str(bad))
    with pytest.raises(InputError, match=r"teacher\.safetensors: 'logits' must be floating point, got torch\.int32"):
        read_teacher_file(bad)


def test_g2p_topk_at_least_the_vocabulary_is_refused_before_any_teacher_is_trained(g2p_task, tmp_path, capsys,
                                                                                   monkeypatch):
    import metagate.teachers.training as training

    def no_training(*args, **kwargs):
        raise AssertionError("a teacher was trained before the options were checked")

    monkeypatch.setattr(training, "train_teacher", no_training)
    v = g2p_task.num_classes
    cache = tmp_path / "cache"
    for k in (100000, v):
        assert main([*G2P, "--teachers", "1", "--topk", str(k), "--cache-dir", str(cache), "--logdir",
                     str(tmp_path / f"run{k}")]) == 2
        assert f"--topk must be in [1, V) = [1, {v}) for a vocabulary of {v} tokens, got {k}" in capsys.readouterr().err
    assert not list(cache.rglob("*.pt"))
    # a task with one unit per example refuses --topk before training too
    assert main([*DIGITS, "--teachers", "1", "--topk", "5", "--cache-dir", str(cache), "--logdir",
                 str(tmp_path / "digits")]) == 2
    assert "task 'digits' does not take option(s) --topk (an option of task g2p, lm)" in capsys.readouterr().err
    assert not list(cache.rglob("*.pt"))
