"""scripts/temperature_quality.py end to end on digits (the #14 evidence run, tiny): rows, tuning, resume."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


def _script():
    path = Path(__file__).resolve().parents[1] / "scripts" / "temperature_quality.py"
    spec = importlib.util.spec_from_file_location("temperature_quality", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_temperature_quality_runs_tunes_on_select_and_resumes(digits_noisy, digits_bank, tmp_path, capsys):
    tq = _script()
    argv = ["--task", "digits", "--noises", "0.4", "--seeds", "0", "--epochs", "1", "--policy-timesteps", "40",
            "--out", str(tmp_path), "--gates", "fixed:tau=4", "fixed-tuned:alpha_grid=0.5/,tau_grid=2/4,lr_scales=1/",
            "temperature:temp_policy=PPO"]
    tq.main(argv)
    text = capsys.readouterr().out
    runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    by_label = {json.loads(r["key"])[4]: r["result"] for r in runs}
    # fixed at tau 4 is the grid point alpha 0.5 / tau 4 / lr 0.05: run once (2 grid points + the PPO row)
    assert len(runs) == 3 and "fixed:tau=4" not in by_label
    grid = {t: by_label[f"fixed:alpha=0.5,tau={t},lr=0.05"]["metrics"] for t in (2, 4)}
    best = max((2, 4), key=lambda t: (grid[t]["select/acc"], -grid[t]["select/nll"], t == 4))
    assert f"seed 0: tau {best}" in text
    acc_line = next(line for line in text.splitlines() if line.strip().startswith("acc  fixed:tau=4"))
    diff = grid[4]["test/acc"] - grid[best]["test/acc"]
    assert f"{grid[4]['test/acc']:.4f}" in acc_line and f"{diff:+.4f}" in acc_line
    ppo = [k for k in by_label if k.startswith("temperature:temp_policy=temp-ppo-digits-n0.4")]
    assert len(ppo) == 1 and (tmp_path / "temp-ppo-digits-n0.4-d0-t40.zip").is_file()
    assert 1.0 < by_label[ppo[0]]["tau_corrupted"] < 10.0 and 1.0 < by_label[ppo[0]]["tau_clean"] < 10.0
    assert by_label["fixed:alpha=0.5,tau=4,lr=0.05"]["tau_clean"] == 4.0
    tq.main(argv)  # everything is in runs.jsonl: nothing runs again
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == len(runs)
    assert "training the PPO" not in capsys.readouterr().out
