"""``--teacher-file`` (CLI and YAML) on digits, and per-token ``[N, T, V]`` teacher files on g2p."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

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
