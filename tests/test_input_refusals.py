"""Issue 26's input items: --config that is not a regular file (refused within a second, never read), YAML
logdir relative to the current directory, train-policy --out that would overwrite or mislead, and the Python
API's clear errors for a dict split, items of different shapes, string labels and a student factory that
returns no module (before any data work)."""

from __future__ import annotations

import os
import threading
import time
import zipfile

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import metagate
from metagate.cli import build_parser, config_from_args, main
from metagate.errors import ConfigError, InputError
from metagate.yaml_config import MAX_BYTES, read_yaml


def _timed(fn, limit: float = 1.0):
    """``fn()`` run in a thread; fails if it has not returned within ``limit`` seconds."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    start = time.monotonic()
    t.start()
    t.join(limit)
    assert not t.is_alive(), f"still running after {limit} s"
    return box, time.monotonic() - start


@pytest.mark.parametrize("kind", ["dev-zero", "fifo", "symlink-to-dev-zero", "directory"])
def test_config_that_is_not_a_regular_file_is_refused_within_a_second(tmp_path, kind, capsys):
    path = tmp_path / "cfg.yaml"
    if kind == "dev-zero":
        path = "/dev/zero"
    elif kind == "fifo":
        os.mkfifo(path)  # no writer: opening it for reading would wait forever
    elif kind == "symlink-to-dev-zero":
        path.symlink_to("/dev/zero")
    else:
        path.mkdir()
    what = {"dev-zero": "a character device", "fifo": "a FIFO", "symlink-to-dev-zero": "a character device",
            "directory": "a directory"}[kind]
    box, _ = _timed(lambda: read_yaml(path))
    assert isinstance(box.get("error"), ConfigError)
    assert str(box["error"]) == f"config {path} is {what}{' (named pipe)' if kind == 'fifo' else ''}, not a " \
                                "regular file; refused"
    box, _ = _timed(lambda: main(["distill", "--config", str(path)]))
    assert box["value"] == 2 and "not a regular file; refused" in capsys.readouterr().err


def test_config_size_is_capped(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("a: 1\n" + "#" * MAX_BYTES)
    with pytest.raises(ConfigError, match=f"larger than {MAX_BYTES} bytes; refused"):
        read_yaml(big)
    ok = tmp_path / "ok.yaml"
    ok.write_text("noise: 0.2\n" + "#" * (MAX_BYTES - 20))
    assert read_yaml(ok) == {"noise": 0.2}


def test_yaml_logdir_is_relative_to_the_current_directory_not_the_file(tmp_path, monkeypatch):
    """Documented choice: relative paths in a --config file resolve as the same flags do, against the current
    directory (docs/design.md, README)."""
    (tmp_path / "configs").mkdir()
    yml = tmp_path / "configs" / "run.yaml"
    yml.write_text("logdir: out/run1\ncache_dir: cache\n")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    cfg = config_from_args(build_parser().parse_args(["distill", "--config", str(yml)]))
    flag = config_from_args(build_parser().parse_args(["distill", "--logdir", "out/run1"]))
    assert cfg.run_dir.resolve() == flag.run_dir.resolve() == work / "out" / "run1"
    assert cfg.cache_dir == "cache"


# -- train-policy --out -----------------------------------------------------------------------------------------
def _policy_args(out):
    return build_parser().parse_args(["train-policy", "--timesteps", "4", "--n-steps", "2", "--out", str(out)])


def test_train_policy_out_refusals_touch_nothing(tmp_path, capsys):
    from metagate.train_policy import policy_out

    precious = tmp_path / "precious.txt"
    precious.write_text("my notes")
    not_ours = tmp_path / "other.zip"
    with zipfile.ZipFile(not_ours, "w") as zf:
        zf.writestr("data.csv", "1,2")
    before = not_ours.read_bytes()
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "keep.txt").write_text("keep")
    cases = [
        (precious, "a policy is a .zip file"),
        (not_ours, "exists and is not a policy zip written by metagate train-policy; refused, nothing written"),
        (folder, f"--out {folder} is an existing directory; give the zip's file name, e.g. --out "
                 f"{folder / 'policy.zip'}"),
        (precious / "p.zip", f"{precious} is a file, not a directory"),
        (precious / "sub" / "p.zip", f"{precious} is a file, not a directory"),
    ]
    for out, message in cases:
        with pytest.raises(ConfigError) as e:
            policy_out(out)
        assert message in str(e.value)
        assert main(["train-policy", "--timesteps", "4", "--n-steps", "2", "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
    assert precious.read_text() == "my notes" and not_ours.read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["keep.txt"]
    assert not (tmp_path / "models.zip").exists() and not (tmp_path / "models-tb").exists()
    assert policy_out(tmp_path / "new") == tmp_path / "new.zip"  # .zip appended to a bare name
    assert policy_out(tmp_path / "a" / "b.zip") == tmp_path / "a" / "b.zip"  # parents are made when saving


@pytest.mark.slow
def test_train_policy_prints_the_true_path_and_replaces_its_own_zip(tmp_path, capsys, monkeypatch):
    from metagate.policies.safe_zip import load_policy_zip

    monkeypatch.chdir(tmp_path)
    assert main(["train-policy", "--timesteps", "4", "--n-steps", "2", "--episode-steps", "4", "--no-progress",
                 "--out", "pol"]) == 0
    out = capsys.readouterr().out
    assert "saved pol.zip; deploy with `metagate distill --gate policy --policy pol.zip`" in out
    load_policy_zip(tmp_path / "pol.zip")  # what the message names loads
    first = (tmp_path / "pol.zip").read_bytes()
    assert main(["train-policy", "--timesteps", "4", "--n-steps", "2", "--episode-steps", "4", "--no-progress",
                 "--seed", "1", "--out", "pol.zip"]) == 0  # its own zip: replaced
    assert (tmp_path / "pol.zip").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pol-tb", "pol.zip"]  # no temporary file left


# -- the Python API's input checks ------------------------------------------------------------------------------
X = np.random.default_rng(0).normal(size=(40, 4)).astype("float32")
Y = np.arange(40) % 2
VAL = (X[:10] + 5, Y[:10])


def _distill(student=None, **kw):
    return metagate.distill(student or (lambda: nn.Linear(4, 2)), None, gate="ce",
                            train_config={"epochs": 1, "progress": False, "device": "cpu"}, **kw)


class Items(Dataset):
    """10 items of input shape (4,), item 7's (5,); ``ids``: items carry ids 100 + i; ``label``: every label."""

    def __init__(self, ids: bool = False, label=None, odd: int = 7) -> None:
        self.ids, self.label, self.odd = ids, label, odd

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i):
        x = torch.full((5 if i == self.odd else 4,), float(i))
        y = i % 2 if self.label is None else self.label
        return (x, y, 100 + i) if self.ids else (x, y)


def test_a_dict_split_is_named():
    with pytest.raises(InputError, match=r"^train: a mapping \(keys 'x', 'y'\) is not a split; give train=\(x, y\) "
                                         r"or \(x, y, ids\)"):
        _distill(train={"x": X, "y": Y}, val=VAL)
    with pytest.raises(InputError, match=r"^val: a mapping \(keys 'x', 'y'\)"):
        _distill(train=(X, Y), val={"x": X, "y": Y})


def test_items_of_different_shapes_name_both_items():
    with pytest.raises(InputError, match=r"^val: inputs of different shapes cannot be stacked into a batch: item 0 "
                                         r"has shape \(4,\), item 7 has \(5,\)"):
        _distill(train=(X, Y), val=Items())
    with pytest.raises(InputError, match=r"^val: .*item 0 \(id 100\) has shape \(4,\), item 7 \(id 107\) has \(5,\)"):
        _distill(train=(X, Y), val=Items(ids=True))
    # a training Dataset is read by id (not into memory): the same error when its items are read
    with pytest.raises(InputError, match=r"^train: .*item 0 has shape \(4,\), item 7 has \(5,\)"):
        _distill(train=Items(), val=VAL)


def test_string_labels_are_named():
    for train, where in (((X, np.array(["cat", "dog"] * 20)), "train labels"), (Items(label="cat", odd=-1),
                                                                                   "train labels")):
        with pytest.raises(InputError, match=rf"^{where} hold text, e.g. 'cat', not numbers \(class labels must be "
                                             r"integer ids 0..C-1"):
            _distill(train=train, val=VAL)
    with pytest.raises(InputError, match=r"^val labels hold text, e.g. 'cat'"):
        _distill(train=(X, Y), val=Items(label="cat", odd=-1))


def test_a_student_factory_is_checked_before_any_data_work():
    read = []

    class Watched(Items):
        def __getitem__(self, i):
            read.append(i)
            return super().__getitem__(i)

    with pytest.raises(ConfigError, match=r"^student: the factory '<lambda>' returned a str, not an nn.Module"):
        _distill(student=lambda: "net", train=Watched(odd=-1), val=VAL)
    assert read == []  # refused before the data were touched
    with pytest.raises(ConfigError, match="^student must be an nn.Module or a zero-argument factory of one, got int"):
        _distill(student=3, train=(X, Y), val=VAL)
    with pytest.raises(ConfigError, match=r"^student: calling the factory 'needs' with no arguments failed"):
        def needs(width):
            return nn.Linear(4, width)
        _distill(student=needs, train=(X, Y), val=VAL)
