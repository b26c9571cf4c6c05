"""``metagate compare``: specs, shared data draws and teachers, outputs, resume, --jobs, Ray, paired intervals."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from metagate.cli import main
from metagate.compare.stats import paired_bootstrap, paired_t, t_quantile

ROOT = Path(__file__).resolve().parents[1]
GATES = ["fixed", "hard:hard_tau=2"]
ARGS = ["compare", "--task", "digits", "--noise", "0.4", "--seeds", "0", "1", "--epochs", "8", "--teachers", "2",
        "--device", "cpu", "--threads", "1", "--no-progress"]


def compare_args(out: Path, gates: list[str] = GATES, *extra: str) -> list[str]:
    return [*ARGS, "--gates", *gates, "--out", str(out), *extra]


def rows_of(out: Path) -> dict[tuple[str, int], dict]:
    return {(r["label"], r["seed"]): r for r in json.loads((out / "results.json").read_text())["rows"]}


def results_section(out: Path) -> str:
    """The results table of ``results.md`` (the cost table below it holds wall times)."""
    md = (out / "results.md").read_text()
    return md[md.index("## Results"): md.index("## Cost")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A two-gate, two-seed compare on digits, serial."""
    out = tmp_path_factory.mktemp("compare") / "ref"
    assert main(compare_args(out)) == 0
    return out


def test_outputs_exist_and_agree(reference, capsys):
    rows = rows_of(reference)
    assert sorted(rows) == [("fixed", 0), ("fixed", 1), ("hard:hard_tau=2", 0), ("hard:hard_tau=2", 1)]
    blob = json.loads((reference / "results.json").read_text())
    with open(reference / "results.csv") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == 4
    for line in lines:
        r = rows[(line["label"], int(line["seed"]))]
        assert float(line["test/acc"]) == pytest.approx(r["metrics"]["test/acc"], abs=1e-12)
        assert float(line["test/ece"]) == pytest.approx(r["metrics"]["test/ece"], abs=1e-12)
        assert float(line["config.train.epochs"]) == 8 and line["config.gate"] == r["gate"]
        assert int(line["config.data_seed"]) == int(line["seed"])  # another data draw per seed
    hard = [rows[("hard:hard_tau=2", s)] for s in (0, 1)]
    assert all(r["config"]["gate_options"]["hard_tau"] == 2 for r in hard)  # the spec's option reached the run
    s = blob["summary"]["gates"]["hard:hard_tau=2"]
    accs = [r["metrics"]["test/acc"] for r in hard]
    assert s["metrics"]["test/acc"]["mean"] == pytest.approx(np.mean(accs))
    assert s["metrics"]["test/acc"]["std"] == pytest.approx(np.std(accs, ddof=1))
    d = [h["metrics"]["test/acc"] - rows[("fixed", i)]["metrics"]["test/acc"] for i, h in enumerate(hard)]
    iv = s["vs_fixed"]["test/acc"]["t"]
    assert iv["mean"] == pytest.approx(np.mean(d))
    assert iv["hi"] - iv["mean"] == pytest.approx(12.706204736174698 * np.std(d, ddof=1) / math.sqrt(2))
    # the markdown table shows the same numbers
    md = results_section(reference)
    assert f"{100 * np.mean(accs):.2f} ± {100 * np.std(accs, ddof=1):.2f}" in md
    assert f"{100 * np.mean(d):+.2f} [{100 * iv['lo']:.2f}, {100 * iv['hi']:.2f}]" in md
    for name in ("acc_ece.png", "reliability.png", "weights.png"):
        assert (reference / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for r in rows.values():  # figure data: calibration bins over the whole test split, weight histograms
        assert sum(r["calibration"]["count"]) == 450
        assert set(r["weights"]["kd_share"]) == {"cnn16", "cnn24"}


def test_identical_data_and_teachers_within_a_seed(reference):
    rows = rows_of(reference)
    for seed in (0, 1):
        a, b = rows[("fixed", seed)]["fingerprints"], rows[("hard:hard_tau=2", seed)]["fingerprints"]
        assert a == b and a["teachers"]
    f0, f1 = rows[("fixed", 0)]["fingerprints"], rows[("fixed", 1)]["fingerprints"]
    for key in ("data", "noise", "split", "teachers"):
        assert f0[key] != f1[key], key


def test_same_data_keeps_one_draw_for_every_seed(reference, tmp_path):
    out = tmp_path / "same"
    assert main(compare_args(out, ["fixed"], "--same-data", "--data-seed", "1")) == 0
    rows = rows_of(out)
    assert [rows[("fixed", s)]["config"]["data_seed"] for s in (0, 1)] == [1, 1]
    assert rows[("fixed", 0)]["fingerprints"] == rows[("fixed", 1)]["fingerprints"]
    # data seed 1 with training seed 1 is the reference's seed-1 run; training seed 0 on it differs
    ref = rows_of(reference)[("fixed", 1)]
    assert rows[("fixed", 1)]["metrics"]["test/acc"] == ref["metrics"]["test/acc"]
    assert rows[("fixed", 0)]["fingerprints"] == ref["fingerprints"]
    assert "on data draw 1" in (out / "results.md").read_text()


def test_bad_spec_fails_before_anything_runs(tmp_path, capsys):
    for gates, words in ((["fixed", "nosuchgate"], ["nosuchgate", "choose from"]),
                         (["fixed", "hard:alpah=0.1"], ["hard:alpah=0.1", "'alpah'", "hard_tau"]),
                         (["fixed:alpha=2"], ["--alpha", "[0, 1]"]),
                         (["fixed", "fixed"], ["twice"])):
        out = tmp_path / "bad"
        assert main(compare_args(out, gates)) == 2
        err = capsys.readouterr().err
        assert all(w in err for w in words), err
        assert not out.exists()


def test_changed_options_on_an_existing_out_are_an_error(reference, capsys):
    assert main([*compare_args(reference), "--lr", "0.01"]) == 2
    assert "made with other options" in capsys.readouterr().err


def test_resume_after_kill_skips_finished_runs(reference, tmp_path, capsys):
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "metagate.cli", *compare_args(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs = out / "runs"
    try:
        while proc.poll() is None:  # kill -9 while a cell is half done, after one has finished
            done = [p for p in runs.glob("*/seed*/metrics.json") if "compare" in p.read_text()]
            ckpts = [p.parent for p in runs.glob("*/seed*/checkpoint.pt")]
            if done and any(not (d / "metrics.json").exists() for d in ckpts):
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the compare ended before it could be killed mid-run"
    finished = {p: p.stat().st_mtime_ns for p in runs.glob("*/seed*/metrics.json") if "compare" in p.read_text()}
    assert 1 <= len(finished) < 4
    capsys.readouterr()
    assert main(compare_args(out)) == 0
    assert f"{len(finished)} finished, 1 to continue from a checkpoint" in capsys.readouterr().out
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())  # skipped, not rerun
    ref, got = rows_of(reference), rows_of(out)
    assert {k: r["metrics"] for k, r in got.items()} == {k: r["metrics"] for k, r in ref.items()}
    assert results_section(out) == results_section(reference)


def test_jobs_2_gives_the_serial_metrics(reference, tmp_path, monkeypatch):
    import metagate.compare.engine as compare_main

    pools = []
    real_pool = compare_main.worker_pool
    monkeypatch.setattr(compare_main, "worker_pool", lambda *a: pools.append(a) or real_pool(*a))
    out = tmp_path / "jobs"
    assert main([*compare_args(out), "--jobs", "2"]) == 0
    assert pools == [(2, 1)]  # one pool of workers prepares the teachers and runs the cells
    ref, got = rows_of(reference), rows_of(out)
    assert set(got) == set(ref) == {(g, s) for g in GATES for s in (0, 1)}
    for k, r in got.items():
        assert r["metrics"] == ref[k]["metrics"]
    assert [r["label"] for r in json.loads((out / "results.json").read_text())["rows"]] == \
        [r["label"] for r in json.loads((reference / "results.json").read_text())["rows"]]  # grid order kept


def test_jobs_submit_learned_gates_first():
    from types import SimpleNamespace

    from metagate.compare.backends import _longest_first
    from metagate.compare.specs import parse_specs

    specs = parse_specs(["fixed", "meta", "hard", "reinforce"])
    cells = [SimpleNamespace(spec=sp, seed=s) for sp in specs for s in (0, 1)]
    order = [(c.spec.label, c.seed) for c in _longest_first(cells)]
    assert order == [("meta", 0), ("meta", 1), ("reinforce", 0), ("reinforce", 1), ("fixed", 0), ("fixed", 1),
                     ("hard", 0), ("hard", 1)]


@pytest.mark.slow  # starting Ray takes 20-100 s on a shared 2-core machine
def test_ray_gives_the_serial_metrics(reference, tmp_path):
    ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'metagate[ray]')")
    out = tmp_path / "ray"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert main([*compare_args(out, ["fixed"]), "--backend", "ray"]) == 0
    finally:
        ray.shutdown()
    ref, got = rows_of(reference), rows_of(out)
    assert set(got) == {("fixed", 0), ("fixed", 1)}
    for k, r in got.items():
        assert r["metrics"] == ref[k]["metrics"]


def test_paired_t_interval_against_a_hand_computation():
    a = [0.91, 0.88, 0.93, 0.90, 0.87]
    b = [0.89, 0.87, 0.90, 0.91, 0.85]
    d = [0.02, 0.01, 0.03, -0.01, 0.02]
    mean = sum(d) / 5
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 4)
    t975_4 = 2.7764451051977987  # Student t, 0.975 quantile, 4 degrees of freedom (tables)
    assert t_quantile(0.975, 4) == pytest.approx(t975_4, rel=1e-12)
    scipy_stats = pytest.importorskip("scipy.stats")
    assert t_quantile(0.975, 4) == scipy_stats.t.ppf(0.975, 4)
    iv = paired_t(a, b)
    assert iv.n == 5 and iv.mean == pytest.approx(mean, abs=1e-15)
    assert iv.lo == pytest.approx(mean - t975_4 * sd / math.sqrt(5), abs=1e-12)
    assert iv.hi == pytest.approx(mean + t975_4 * sd / math.sqrt(5), abs=1e-12)
    assert paired_t([0.5], [0.4]).mean == pytest.approx(0.1) and math.isnan(paired_t([0.5], [0.4]).lo)


def test_paired_bootstrap():
    # two seeds: the resampled means are d1, (d1+d2)/2, d2 with probabilities 1/4, 1/2, 1/4, so the
    # 2.5% / 97.5% percentiles are d1 and d2 themselves
    iv = paired_bootstrap([0.9, 0.8], [0.85, 0.81], samples=4000)
    assert (iv.lo, iv.hi) == pytest.approx((-0.01, 0.05)) and iv.mean == pytest.approx(0.02)
    a = [0.91, 0.88, 0.93, 0.90, 0.87]
    b = [0.89, 0.87, 0.90, 0.91, 0.85]
    again = paired_bootstrap(a, b)
    assert paired_bootstrap(a, b) == again  # seeded
    d = np.subtract(a, b)
    rng = np.random.default_rng(0)
    means = d[rng.integers(0, 5, size=(10_000, 5))].mean(1)
    assert (again.lo, again.hi) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])))
    assert again.lo < again.mean < again.hi


def test_tuned_and_rule_baselines_in_a_compare(reference, tmp_path):
    out = tmp_path / "baselines"
    gates = ["fixed", "fixed-tuned:alpha_grid=0.1/0.9,tau_grid=4/,lr_scales=1/", "label-filter", "best-teacher",
             "conf-teachers"]
    args = [*ARGS[:ARGS.index("--seeds")], "--seeds", "0", *ARGS[ARGS.index("--seeds") + 3:]]
    assert main([*args, "--gates", *gates, "--out", str(out)]) == 0
    blob = json.loads((out / "results.json").read_text())
    rows = {r["label"]: r for r in blob["rows"]}
    tuned = rows[gates[1]]
    grid = tuned["tuning"]["grid"]
    assert [(p["alpha"], p["tau"]) for p in grid] == [(0.1, 4.0), (0.9, 4.0)]
    best = max(grid, key=lambda p: (p["select/acc"], -p["select/nll"]))
    assert tuned["tuning"]["chosen"]["alpha"] == best["alpha"]
    assert tuned["metrics"]["select/acc"] == best["select/acc"]
    chosen = rows["best-teacher"]["config"]["gate_options"]["best_teacher"]
    stats = {t["name"]: t["select_acc"] for t in rows["best-teacher"]["teachers"]}
    assert stats[chosen] == max(stats.values())
    assert all(blob["summary"]["gates"][g]["baseline"] for g in gates)
    assert "## Tuned on select" in (out / "results.md").read_text()
    # TensorBoard (pointed at out/runs) sees the compared rows only: the grid points live in out/tuning, the
    # chosen point's events are copied into the tuned cell
    runs = {p.parent.relative_to(out / "runs").as_posix() for p in (out / "runs").rglob("events.out.tfevents.*")}
    assert len(runs - {"."}) == len(gates) and all(r.count("/") == 1 for r in runs - {"."})  # .: the experiment
    assert len(list((out / "tuning").rglob("events.out.tfevents.*"))) >= 2


def test_temperature_table_against_hand_computation():
    from metagate.compare.outputs import temperature_table

    rows = [{"label": "ctkd", "metrics": {"diag/tau_mean": 15.0, "diag/tau_corrupted": 14.0, "diag/tau_clean": 16.0}},
            {"label": "ctkd", "metrics": {"diag/tau_mean": 17.0, "diag/tau_corrupted": 18.0, "diag/tau_clean": 16.0}},
            {"label": "fixed", "metrics": {"test/acc": 0.9}}]
    table = temperature_table(rows)
    assert "`fixed`" not in table  # no temperatures chosen
    assert "| `ctkd` | 2 | 16.00 ± 1.41 | 16.00 ± 2.83 | 16.00 ± 0.00 |" in table
    assert temperature_table(rows[2:]) == ""


def test_a_rerun_of_a_finished_compare_keeps_its_wall_time(reference, tmp_path):
    import shutil

    out = tmp_path / "again"
    shutil.copytree(reference, out)
    before = json.loads((out / "results.json").read_text())["run"]["wall_seconds"]
    assert main(compare_args(out)) == 0  # every run finished: only the outputs are written again
    after = json.loads((out / "results.json").read_text())["run"]["wall_seconds"]
    assert before <= after < before + 60
    assert f"Made by `metagate compare` in {after:.0f} s" in (out / "results.md").read_text()


def test_runs_made_before_an_option_existed_still_resume(reference, tmp_path):
    import shutil

    out = tmp_path / "old"
    shutil.copytree(reference, out)
    cell = out / "runs" / "fixed" / "seed0" / "cell.json"
    saved = json.loads(cell.read_text())
    del saved["config"]["teacher_file"], saved["config"]["train"]["precision"]  # as written before they existed
    cell.write_text(json.dumps(saved))
    assert main(compare_args(out)) == 0  # left at their defaults now: the same run
    assert rows_of(out)[("fixed", 0)]["metrics"] == rows_of(reference)[("fixed", 0)]["metrics"]
    saved["config"]["train"]["epochs"] = 3  # a real difference is still refused
    cell.write_text(json.dumps(saved))
    assert main(compare_args(out)) == 2


def test_a_gate_with_random_parameters_does_not_depend_on_the_cells_before_it(tmp_path):
    """A cell's gate is built after its seed is set: the same reinforce run alone and after a meta-net cell in
    the same process (as in a worker, whose cells are not the serial order) gives the same metrics."""
    args = ["--seeds", "1", "--epochs", "3"]
    alone, after = tmp_path / "alone", tmp_path / "after"
    assert main([*compare_args(alone, ["reinforce"]), *args]) == 0
    assert main([*compare_args(after, ["meta:meta_param=net", "reinforce"]), *args]) == 0
    assert rows_of(after)[("reinforce", 1)]["metrics"] == rows_of(alone)[("reinforce", 1)]["metrics"]
