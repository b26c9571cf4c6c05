"""End to end: ``metagate distill`` on digits writes the expected TensorBoard tags."""

from __future__ import annotations

import json
import time

import pytest

from metagate.cli import build_parser, main


def _events(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_distill_end_to_end_writes_tensorboard(digits_bank, tmp_path, capsys):
    run = tmp_path / "run"
    t0 = time.perf_counter()
    rc = main(["distill", "--task", "digits", "--noise", "0.4", "--gate", "hard", "--teachers", "3", "--epochs", "3",
               "--seed", "0", "--logdir", str(run), "--device", "cpu", "--no-progress"])
    elapsed = time.perf_counter() - t0
    assert rc == 0
    out = capsys.readouterr().out
    for word in ("test/acc", "test/nll", "test/ece", "test/mce", "diag/auroc_teacher_share", "cnn16"):
        assert word in out
    assert elapsed < 60
    acc = _events(run)
    tags = acc.Tags()
    for t in ("train/loss_label", "train/loss_teacher0", "train/loss_teacher2", "gate/mean_w_label",
              "test/acc", "test/nll", "test/ece", "select/acc", "gate/teacher_share", "diag/auroc_teacher_share",
              "gate/mean_w_teacher1", "diag/kd_on_right_teachers", "diag/kd_share_teacher2_wrong"):
        assert t in tags["scalars"], t
    assert len(acc.Scalars("test/acc")) == 3  # one per epoch
    for t in ("weights/label/all", "weights/teacher0/all", "weights/teacher2/all", "weights/teacher_share/all",
              "weights/label/corrupted", "weights/label/clean"):
        assert t in tags["tensors"], t  # histograms in TensorBoard's tensor form
    assert "test/reliability" in tags["images"] and "diag/teacher_trust" in tags["images"]
    assert any("hparams" in t for t in acc.PluginTagToContent("hparams")) or acc.PluginTagToContent("hparams")
    saved = json.loads((run / "hparams.json").read_text())
    assert saved["hparams"]["gate"] == "hard" and "test/acc" in saved["metrics"]
    assert (run / "checkpoint.pt").exists() and (run / "metrics.json").exists()


def test_existing_run_is_not_overwritten_without_flag(digits_bank, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["distill", "--gate", "fixed", "--epochs", "1", "--logdir", str(run), "--device", "cpu", "--no-progress",
            "--noise", "0.4"]
    assert main(args) == 0
    before = (run / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
    assert (run / "checkpoint.pt").read_bytes() == before
    assert main([*args, "--resume"]) == 0  # already complete: resumes to the same end
    assert main([*args, "--overwrite"]) == 0


def test_cli_errors_are_clear(capsys):
    assert main(["distill", "--task", "mnist", "--no-progress"]) == 2
    assert "unknown task 'mnist'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["distill", "--gate", "soft"])
    assert main(["distill", "--alpha", "1.5", "--no-progress", "--epochs", "1"]) == 2
    assert "--alpha must be in [0, 1]" in capsys.readouterr().err


def test_help_documents_every_option_with_defaults():
    p = build_parser()
    sub = p._subparsers._group_actions[0].choices["distill"]  # noqa: SLF001
    text = sub.format_help()
    for opt in ("--task", "--noise", "--noise-type", "--gate", "--teachers", "--seed", "--epochs", "--logdir",
                "--alpha", "--tau", "--hard-level", "--hard-reference", "--hard-tau", "--device", "--resume"):
        assert opt in text
    assert "(default: 0.5)" in text


def test_yaml_config_is_data(tmp_path, digits_bank):
    from metagate.cli import config_from_args

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("gate: hard\nepochs: 2\nnoise: 0.4\n")
    args = build_parser().parse_args(["distill", "--config", str(cfg_file), "--seed", "3"])
    cfg = config_from_args(args)
    assert (cfg.gate, cfg.train.epochs, cfg.noise, cfg.train.seed) == ("hard", 2, 0.4, 3)
    bad = tmp_path / "bad.yaml"
    bad.write_text("!!python/object/apply:os.system ['echo pwned']\n")
    from metagate.errors import ConfigError

    with pytest.raises(ConfigError):
        config_from_args(build_parser().parse_args(["distill", "--config", str(bad)]))


def test_bench_runs_learned_gates_and_reports_ratios(capsys, one_thread):
    assert main(["bench", "--task", "digits", "--students", "mlp", "--steps", "2", "--repeats", "1",
                 "--gates", "reinforce", "meta:meta_backend=closed-form,meta_val_batch=32"]) == 0
    out = capsys.readouterr().out
    assert "ratio to trainer + fixed" in out
    for variant in ("hand-written KD", "trainer + fixed", "trainer + reinforce",
                    "trainer + meta:meta_backend=closed-form,meta_val_batch=32"):
        assert variant in out


def test_bench_gate_specs_are_data():
    from metagate.bench import parse_gate_spec
    from metagate.errors import ConfigError

    assert parse_gate_spec("meta:meta_backend=closed-form,meta-lr=0.5,meta_no_reuse=true") == \
        ("meta", {"meta_backend": "closed-form", "meta_lr": 0.5, "meta_no_reuse": True})
    assert parse_gate_spec("fixed") == ("fixed", {})
    # a one-value grid is text, as the grid option is (it was read as the float 0.5 and refused)
    assert parse_gate_spec("fixed-tuned:alpha_grid=0.5,tau_grid=4") == \
        ("fixed-tuned", {"alpha_grid": "0.5", "tau_grid": "4"})
    from metagate.compare.specs import parse_specs
    (spec,) = parse_specs(["fixed-tuned:alpha_grid=0.5,tau_grid=1/4"])
    assert spec.options == {"alpha_grid": "0.5", "tau_grid": "1/4"}
    with pytest.raises(ConfigError, match="alpha-grid"):
        parse_specs(["fixed-tuned:alpha_grid=1.5"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_gate_spec("meta:closed-form")
    assert main(["bench", "--task", "digits", "--students", "mlp", "--gates", "meta:no_such_option=1",
                 "--steps", "1"]) == 2
