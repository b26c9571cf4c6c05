"""One compare engine for the command line and ``metagate.compare_gates`` (issue 25), and compare outputs that
never overwrite what a user wrote (issue 26: marked, locked, replaced by swap)."""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from torch import nn

import metagate
from metagate.cli import main
from metagate.compare.user import UserRuns
from metagate.data import get_task
from metagate.errors import ConfigError
from metagate.models import MLP
from metagate.rundir import COMPARE_MARKER

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
GATES = ["fixed", "hard:hard_tau=2"]
EPOCHS = 2
CLI = ["compare", "--task", "digits", "--noise", "0.4", "--seeds", "0", "1", "--same-data", "--epochs", str(EPOCHS),
       "--teachers", "3", "--device", "cpu", "--threads", "1", "--no-progress"]
FAST = {"epochs": EPOCHS, "device": "cpu", "progress": False}


def digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path -> sha256): a directory byte for byte."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def rows_of(out: Path) -> dict[tuple[str, int], dict]:
    return {(r["label"], r["seed"]): r for r in json.loads((out / "results.json").read_text())["rows"]}


def section(out: Path, start: str, end: str) -> str:
    md = (out / "results.md").read_text()
    return md[md.index(start): md.index(end)]


def user_data(task) -> dict:
    """Noisy digits (data draw 0) as a user brings them: tensors, and the three teachers' logits."""
    return {"meta": (task.meta.x, task.meta.y), "select": (task.select.x, task.select.y),
            "test": (task.test.x, task.test.y), "corrupted": task.corrupted, "clean_labels": task.clean_train_labels}


@pytest.fixture(scope="module")
def cli_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("engine") / "cli"
    assert main([*CLI, "--gates", *GATES, "--out", str(out)]) == 0
    return out


def test_compare_gates_writes_the_command_lines_files_and_resumes(cli_out, digits_noisy, digits_bank, tmp_path,
                                                                  monkeypatch, capsys):
    """The same data, teachers and student from Python, two worker processes: the same rows, tables and files as
    ``metagate compare``; a second call reuses every finished cell."""
    task = digits_noisy
    bank, _ = digits_bank
    teachers = {n: bank.logits[:, k].clone() for k, n in enumerate(bank.names)}
    out = tmp_path / "api"
    args = (task.students["mlp"], teachers, (task.train.x, task.train.y))
    kw = {"gates": GATES, "seeds": [0, 1], "train_config": FAST, "threads": 1, **user_data(task)}
    res = metagate.compare_gates(*args, out=out, jobs=2, **kw)
    printed = capsys.readouterr().out
    assert "Δacc vs fixed (95% t)" in printed and "step cost vs fixed" in printed  # the engine's tables

    cli, api = rows_of(cli_out), rows_of(out)
    assert set(api) == set(cli) == {(g, s) for g in GATES for s in (0, 1)}
    for key in cli:
        assert api[key]["metrics"] == cli[key]["metrics"]  # bit-identical runs
        assert api[key]["fingerprints"]["split"] == cli[key]["fingerprints"]["split"]
        assert api[key]["calibration"] == cli[key]["calibration"]
    assert res["fixed"] == [cli[("fixed", 0)]["metrics"], cli[("fixed", 1)]["metrics"]]
    assert res.summary["gates"]["hard:hard_tau=2"]["vs_fixed"]["test/acc"]["t"] == \
        json.loads((cli_out / "results.json").read_text())["summary"]["gates"]["hard:hard_tau=2"]["vs_fixed"][
            "test/acc"]["t"]
    files = {p.name for p in out.iterdir() if p.is_file()}
    assert files == {p.name for p in cli_out.iterdir() if p.is_file()}
    assert {"results.json", "results.csv", "results.md", "reliability.png", COMPARE_MARKER} <= files
    assert set(res.paths.values()) == {out / n for n in files - {COMPARE_MARKER}}
    assert section(out, "## Results", "## Cost") == section(cli_out, "## Results", "## Cost")
    with open(out / "results.csv") as a, open(cli_out / "results.csv") as b:
        assert next(csv.reader(a)) == next(csv.reader(b))  # the same columns

    finished = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed*/metrics.json")}
    assert len(finished) == 4
    ran = []
    real = UserRuns.run_one
    monkeypatch.setattr(UserRuns, "run_one", lambda self, *a: ran.append(a) or real(self, *a))
    again = metagate.compare_gates(*args, out=out, **kw)  # resumed: nothing to run
    assert "4 finished, 0 to continue" in capsys.readouterr().out
    assert ran == [] and all(p.stat().st_mtime_ns == t for p, t in finished.items())
    assert again.metrics == res.metrics

    with pytest.raises(ConfigError, match="made with other options"):  # another setting into the same output
        metagate.compare_gates(*args, out=out, **{**kw, "train_config": {**FAST, "lr": 0.01}})


def test_compare_gates_without_out_prints_the_engines_table(digits_noisy, digits_bank, capsys):
    task = digits_noisy
    bank, _ = digits_bank
    res = metagate.compare_gates(task.students["mlp"], [bank.logits[:, 0].clone()], (task.train.x, task.train.y),
                                 gates=["fixed", "fixed:alpha=0.2"], seeds=[0], train_config={**FAST, "epochs": 1},
                                 **user_data(task))
    out = capsys.readouterr().out
    assert "| `fixed:alpha=0.2` | baseline | 1 |" in out and "Δacc vs fixed" in out
    assert res.out is None and res.paths == {} and len(res["fixed:alpha=0.2"]) == 1
    assert res.summary["fixed"] == "fixed"


def local_student_factory():  # noqa: D103 - the test defines a local one below
    return MLP(64, (8,), 10)


class Unpicklable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(64, 10)
        self.hook = lambda x: x  # a lambda attribute: the module cannot be pickled

    def forward(self, x):
        return self.net(x.flatten(1))


@pytest.mark.parametrize("kind", ["lambda", "local", "module"])
def test_jobs_2_refuses_a_student_it_cannot_send_to_the_workers(digits_noisy, digits_bank, tmp_path, kind):
    task = digits_noisy

    def local():
        return MLP(64, (8,), 10)

    student = {"lambda": lambda: MLP(64, (8,), 10), "local": local, "module": Unpicklable()}[kind]
    words = {"lambda": ["jobs=2", "<lambda>", "is a lambda", "top-level function", "jobs=1"],
             "local": ["jobs=2", "local", "is a local function", "jobs=1"],
             "module": ["jobs=2", "Unpicklable instance", "cannot be pickled", "jobs=1"]}[kind]
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as e:
        metagate.compare_gates(student, [digits_bank[0].logits[:, 0].clone()], (task.train.x, task.train.y),
                               gates=["fixed"], seeds=[0], out=out, jobs=2, train_config=FAST, **user_data(task))
    assert all(w in str(e.value) for w in words), str(e.value)
    assert not out.exists()  # refused before anything ran
    # a module-level factory (or a partial of a class) is accepted: checked by the same function
    from metagate.compare.user import check_sendable

    check_sendable(functools.partial(MLP, 64, (8,), 10), None, 2, "local")
    check_sendable(local_student_factory, None, 2, "local")


# -- issue 26: compare outputs ------------------------------------------------------------------------------
def test_compare_refuses_a_directory_holding_the_users_results(tmp_path, capsys):
    """Case 4: ``--out D`` where D holds the user's results.md / results.json: refused, files untouched."""
    d = tmp_path / "mine"
    d.mkdir()
    (d / "results.md").write_text("# my thesis results\n")
    (d / "results.json").write_text('{"acc": 0.97}')
    before = digest(d)
    assert main([*CLI, "--gates", "fixed", "--out", str(d)]) == 2
    err = capsys.readouterr().err
    assert str(d) in err and "not a metagate compare output" in err and COMPARE_MARKER in err
    assert digest(d) == before and sorted(p.name for p in d.iterdir()) == ["results.json", "results.md"]
    task = get_task("digits")
    with pytest.raises(ConfigError, match="not a metagate compare output"):  # the API: the same rule
        metagate.compare_gates(task.students["mlp"], None, (task.train.x, task.train.y), gates=["ce"], seeds=[0],
                               out=d, train_config=FAST, val=(task.meta.x, task.meta.y))
    assert digest(d) == before


def test_overwrite_refuses_a_directory_that_is_not_a_compare_output(tmp_path, capsys):
    """Case 5: ``--overwrite --out D`` on a directory that is not a compare output (it even looks like one:
    runs/fixed/seed0/ with the user's file, a results.md): refused, nothing deleted or overwritten."""
    d = tmp_path / "looks-like-one"
    (d / "runs" / "fixed" / "seed0").mkdir(parents=True)
    (d / "runs" / "fixed" / "seed0" / "notes.txt").write_text("my notes\n")
    (d / "results.md").write_text("mine\n")
    before = digest(d)
    assert main([*CLI, "--gates", "fixed", "--out", str(d), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert str(d) in err and "refusing to write into or delete it" in err
    assert digest(d) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["looks-like-one"]  # no sibling left behind


def test_a_run_directory_is_not_a_compare_output_and_back(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["distill", "--task", "digits", "--gate", "ce", "--epochs", "1", "--device", "cpu",
                 "--no-progress", "--logdir", str(run)]) == 0
    before = digest(run)
    assert main([*CLI, "--gates", "ce", "--out", str(run), "--overwrite"]) == 2
    assert "not a metagate compare output" in capsys.readouterr().err
    assert digest(run) == before


def test_overwrite_replaces_a_compare_output_only_after_success(cli_out, tmp_path, monkeypatch, capsys):
    import shutil

    import metagate.compare.cell as cell

    out = tmp_path / "old"
    shutil.copytree(cli_out, out)
    before = digest(out)

    def boom(*a, **k):
        raise RuntimeError("the new compare failed")

    monkeypatch.setattr(cell, "run_distill", boom)
    with pytest.raises(RuntimeError, match="the new compare failed"):
        main([*CLI, "--gates", "fixed", "--out", str(out), "--overwrite", "--seeds", "0"])
    assert digest(out) == before  # the old output as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    monkeypatch.undo()
    assert main([*CLI, "--gates", "fixed", "--out", str(out), "--overwrite", "--seeds", "0"]) == 0
    assert set(rows_of(out)) == {("fixed", 0)}  # replaced whole: the old rows are gone
    assert sorted(p.name for p in (out / "runs").iterdir() if p.is_dir()) == ["fixed"]
    assert rows_of(out)[("fixed", 0)]["metrics"] == rows_of(cli_out)[("fixed", 0)]["metrics"]
    assert rows_of(out)[("fixed", 0)]["config"]["logdir"] == str((out / "runs" / "fixed" / "seed0").resolve())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_a_second_compare_into_the_same_out_is_refused_naming_the_first(tmp_path, capsys):
    out = tmp_path / "busy"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "metagate.cli", *CLI, "--gates", "fixed", "--epochs", "400",
                              "--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        marker = out / COMPARE_MARKER
        deadline = time.monotonic() + 120
        while f'"pid": {first.pid}' not in (marker.read_text() if marker.is_file() else ""):
            assert first.poll() is None and time.monotonic() < deadline, "the first compare did not start"
            time.sleep(0.05)
        assert main([*CLI, "--gates", "fixed", "--epochs", "400", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"in use by another metagate compare (pid {first.pid})" in err and str(out) in err
        assert first.poll() is None  # the first one runs on, undisturbed
    finally:
        first.kill()
        first.wait(timeout=30)


def test_a_repeated_option_in_a_gate_spec_is_refused(tmp_path, capsys):
    out = tmp_path / "dup"
    assert main([*CLI, "--gates", "fixed:alpha=0.3,alpha=0.5", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "'fixed:alpha=0.3,alpha=0.5'" in err and "'alpha' is given twice" in err
    assert not out.exists()
    from metagate.compare.specs import parse_specs

    with pytest.raises(ConfigError, match="'hard_tau' is given twice"):
        parse_specs(["hard:hard_tau=2,hard-tau=3"])  # the flag spelling is the same option
    assert parse_specs(["fixed:alpha=0.3,tau=2"])[0].options == {"alpha": 0.3, "tau": 2}


def test_a_compare_output_older_than_the_marker_is_adopted_by_creating_it(cli_out, tmp_path, capsys):
    import shutil

    out = tmp_path / "older"
    shutil.copytree(cli_out, out)
    (out / COMPARE_MARKER).unlink()  # as a metagate before the marker wrote it
    assert main([*CLI, "--gates", *GATES, "--out", str(out)]) == 2
    assert f"adopted by creating the empty file {out / COMPARE_MARKER}" in capsys.readouterr().err
    (out / COMPARE_MARKER).touch()
    assert main([*CLI, "--gates", *GATES, "--out", str(out)]) == 0
    assert "4 finished, 0 to continue" in capsys.readouterr().out
    assert {k: r["metrics"] for k, r in rows_of(out).items()} == {k: r["metrics"] for k, r in rows_of(cli_out).items()}


def test_compare_gates_runs_the_tuned_and_rule_baselines(digits_noisy, digits_bank, tmp_path, capsys):
    task = digits_noisy
    bank, _ = digits_bank
    teachers = {n: bank.logits[:, k].clone() for k, n in enumerate(bank.names)}
    gates = ["fixed", "fixed-tuned:alpha_grid=0.1/0.9,tau_grid=4/,lr_scales=1/", "label-filter",
             f"best-teacher:best_teacher={bank.names[1]}", "conf-teachers"]
    out = tmp_path / "baselines"
    res = metagate.compare_gates(task.students["mlp"], teachers, (task.train.x, task.train.y), gates=gates,
                                 seeds=[0], out=out, train_config={**FAST, "epochs": 1}, verbose=False,
                                 **user_data(task))
    assert capsys.readouterr().out == ""  # verbose=False: nothing printed
    rows = {r["label"]: r for r in res.rows}
    grid = rows[gates[1]]["tuning"]["grid"]
    assert [(p["alpha"], p["tau"]) for p in grid] == [(0.1, 4.0), (0.9, 4.0)]
    best = max(grid, key=lambda p: (p["select/acc"], -p["select/nll"]))
    assert rows[gates[1]]["tuning"]["chosen"]["alpha"] == best["alpha"]
    assert rows[gates[1]]["metrics"]["select/acc"] == best["select/acc"]
    # the grid points run outside the TensorBoard logdir <out>/runs (only the compared rows are charted there)
    assert sorted(p.name for p in (out / "tuning" / "fixed-tuned__alpha_grid=0.1_0.9_tau_grid=4__lr_scales=1_" /
                                   "seed0").iterdir()) == ["alpha0.1-tau4-lr0.05", "alpha0.9-tau4-lr0.05"]
    assert all(res.summary["gates"][g]["baseline"] for g in gates)
    assert res.summary["best_baseline"] in gates
    assert "## Tuned on select" in (out / "results.md").read_text()
    assert rows[gates[3]]["config"]["gate_options"]["best_teacher"] == bank.names[1]
