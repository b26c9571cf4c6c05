"""The TensorBoard view, read back with TensorBoard's own event accumulator and plugin data (issue 16)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing import plugin_event_accumulator as pea
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import metadata as cs_metadata
from tensorboard.plugins.hparams import api_pb2
from tensorboard.plugins.hparams import metadata as hp_metadata
from tensorboard.plugins.hparams.backend_context import _sort_and_reduce_to_hparams_limit
from tensorboard.util import tensor_util

from metagate.metrics import MCE_MIN_COUNT, calibration_bins, ece_mce, mce_min_count, reliability_figure
from metagate.tb.hparams import BOOKKEEPING, ROOT_SUFFIX, RunRecord, write_comparison_summary
from metagate.tb.summaries import histogram_buckets

GATES = ("ce", "fixed", "hard", "meta")
pytestmark = pytest.mark.usefixtures("one_thread")


def _acc(path: Path) -> pea.EventAccumulator:
    acc = pea.EventAccumulator(str(path), size_guidance={"tensors": 0})
    acc.Reload()
    return acc


def _scalar_tags(acc: pea.EventAccumulator) -> list[str]:
    return [t for t in acc.Tags()["tensors"] if acc.SummaryMetadata(t).plugin_data.plugin_name == "scalars"]


def _layout(acc: pea.EventAccumulator) -> layout_pb2.Layout:
    (event,) = acc.Tensors(cs_metadata.CONFIG_SUMMARY_TAG)
    return layout_pb2.Layout.FromString(tensor_util.make_ndarray(event.tensor_proto).item())


@pytest.fixture(scope="module")
def comparison(digits_bank, tmp_path_factory):
    """A mixed compare on noisy digits (1 epoch, 1 seed, a planted teacher) through the command line."""
    from metagate.cli import main

    out = tmp_path_factory.mktemp("cmp")
    assert main(["compare", "--task", "digits", "--noise", "0.4", "--gates", *GATES, "--seeds", "0", "--epochs", "1",
                 "--teachers", "3", "--adversarial-teacher", "--out", str(out), "--device", "cpu",
                 "--no-progress"]) == 0
    root = out / "runs"  # the compare's runs, and the directory TensorBoard is pointed at
    runs = {g: _acc(root / g / "seed0") for g in GATES}
    return root, _acc(root), runs


def test_one_experiment_lists_every_hparam_of_every_gate(comparison):
    root, root_acc, runs = comparison
    (exp_file,) = root.glob(f"events.out.tfevents.*{ROOT_SUFFIX}")
    assert hp_metadata.EXPERIMENT_TAG in root_acc.PluginTagToContent("hparams")
    exp = hp_metadata.parse_experiment_plugin_data(root_acc.PluginTagToContent("hparams")[hp_metadata.EXPERIMENT_TAG])
    infos = {h.name: h for h in exp.hparam_infos}
    for g in GATES:  # the runs carry session records only: the root's experiment is the one TensorBoard reads
        assert hp_metadata.EXPERIMENT_TAG not in runs[g].PluginTagToContent("hparams")
        saved = json.loads((root / g / "seed0" / "hparams.json").read_text())
        assert set(saved["hparams"]) <= set(infos), g
    assert {"alpha", "hard_tau", "meta_lr", "meta_param", "train_seed", "gate"} <= set(infos)
    assert not [n for n in infos if n in BOOKKEEPING or n.removeprefix("train_") in BOOKKEEPING]
    assert list(infos["gate"].domain_discrete) == list(GATES) and infos["gate"].differs
    assert infos["adversarial_teacher"].type == api_pb2.DATA_TYPE_BOOL
    assert infos["train_seed"].type == api_pb2.DATA_TYPE_STRING and list(infos["train_seed"].domain_discrete) == ["0"]
    assert infos["train_lr"].type == api_pb2.DATA_TYPE_FLOAT64
    assert "meta" in infos["meta_lr"].description
    # TensorBoard sorts differing hparams first and ticks five: gate and seed are among them
    _sort_and_reduce_to_hparams_limit(exp)
    assert [h.name for h in exp.hparam_infos][:2] == ["gate", "train_seed"]
    metrics = [m.name.tag for m in exp.metric_infos]
    assert metrics[:5] == ["test/acc", "test/nll", "test/ece", f"test/mce_min{MCE_MIN_COUNT}", "test/brier"]
    every_tag = {t for acc in runs.values() for t in _scalar_tags(acc)}
    assert set(metrics) <= every_tag and "diag/auroc_teacher_share" in metrics
    assert not [t for t in every_tag if t.startswith("hparam/")]
    # writing it again replaces the root's experiment instead of adding a second one
    write_comparison_summary(root, [RunRecord.load(root / g / "seed0") for g in GATES])
    assert len(list(root.glob("events.out.tfevents.*"))) == 1 and exp_file not in list(root.glob("*"))


def test_each_session_has_its_gate_group_and_metrics(comparison):
    root, _, runs = comparison
    for g, acc in runs.items():
        content = acc.PluginTagToContent("hparams")
        start = hp_metadata.parse_session_start_info_plugin_data(content[hp_metadata.SESSION_START_INFO_TAG])
        end = hp_metadata.parse_session_end_info_plugin_data(content[hp_metadata.SESSION_END_INFO_TAG])
        assert start.hparams["gate"].string_value == g and start.group_name == g
        assert start.hparams["train_seed"].string_value == "0"
        assert end.status == api_pb2.STATUS_SUCCESS
        metrics = json.loads((root / g / "seed0" / "metrics.json").read_text())
        last = tensor_util.make_ndarray(acc.Tensors("test/acc")[-1].tensor_proto).item()
        assert last == pytest.approx(metrics["test/acc"], abs=1e-6)


def test_every_scalar_tag_is_described_once_per_quantity(comparison):
    _, _, runs = comparison
    for g, acc in runs.items():
        tags = _scalar_tags(acc)
        assert "test/acc" in tags and "diag/w_label_clean" in tags
        for t in tags:
            d = acc.SummaryMetadata(t).summary_description
            assert d and "no description" not in d, (g, t)
        assert not [t for t in tags if t.startswith(("train/weight_", "policy/mean_w"))], g
    d = runs["hard"].SummaryMetadata("gate/mean_w_teacher2").summary_description
    assert "adv-cnn16" in d and "planted" in d


def test_ce_logs_the_fill_in_values(comparison):
    root, _, runs = comparison
    m = json.loads((root / "ce" / "seed0" / "metrics.json").read_text())
    assert m["gate/mean_w_label"] == 1.0 and m["gate/teacher_share"] == 0.0
    assert m["diag/w_label_clean"] == m["diag/w_label_corrupted"] == 1.0
    assert m["diag/teacher_share_clean"] == 0.0 and m["diag/auroc_teacher_share"] == 0.5  # a constant share
    assert "weights/teacher_share/all" in runs["ce"].Tags()["tensors"]


def test_layout_names_existing_tags_and_teachers(comparison):
    root, root_acc, runs = comparison
    every_tag = {t for acc in runs.values() for t in _scalar_tags(acc)}
    layout = _layout(root_acc)
    titles = [c.title for cat in layout.category for c in cat.chart]
    assert {"test accuracy", "test NLL", "test ECE", "label weight, clean vs corrupted units"} <= set(titles)
    assert any("adv-cnn16, the planted adversarial teacher" in t for t in titles)
    assert any("teacher0 (cnn16)" in t for t in titles)
    for acc in [root_acc, *runs.values()]:
        own = set(_scalar_tags(acc)) or every_tag  # the root's layout names the runs' tags
        for cat in _layout(acc).category:
            for chart in cat.chart:
                for rx in chart.multiline.tag:
                    assert any(re.search(rx, t) for t in own), rx
    assert not any("teacher" in c.title and "cnn" in c.title for cat in _layout(runs["ce"]).category
                   for c in cat.chart)  # ce has no teacher charts of its own
    names = tensor_util.make_ndarray(runs["meta"].Tensors("teachers")[0].tensor_proto).item().decode()
    assert "adv-cnn16" in names and "**yes**" in names and "cnn24" in names


def test_reliability_counts_sum_to_the_test_size(comparison, digits_noisy):
    _, _, runs = comparison
    table = tensor_util.make_ndarray(runs["fixed"].Tensors("test/reliability_bins")[0].tensor_proto).item().decode()
    counts = [int(line.split("|")[2]) for line in table.splitlines()[2:]]
    assert len(counts) == 15 and sum(counts) == len(digits_noisy.test)
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(300, 10, generator=g, dtype=torch.float64) * 3, -1)
    labels = torch.randint(0, 10, (300,), generator=g)
    fig = reliability_figure(probs, labels, "t")
    heights = [p.get_height() for p in fig.axes[1].patches]
    assert sum(heights) == 300 and heights == calibration_bins(probs, labels)["count"].tolist()
    assert fig.legends and not fig.axes[0].get_legend()  # the legend sits below the axes, not on the bars


def test_mce_min_ignores_sparse_bins():
    """Golden: 40 units at confidence 0.95, 38 right; 1 unit at 0.55, wrong (gap 0.55 in a bin of one)."""
    probs = torch.tensor([[0.95, 0.05]] * 40 + [[0.55, 0.45]], dtype=torch.float64)
    labels = torch.tensor([0] * 38 + [1, 1] + [1])
    _, mce = ece_mce(probs, labels)
    assert mce == pytest.approx(0.55)
    assert mce_min_count(probs, labels, 20) == pytest.approx(abs(0.95 - 38 / 40))
    assert np.isnan(mce_min_count(probs, labels, 41))


def test_constant_weights_are_a_spike(comparison):
    buckets = histogram_buckets(np.full(7, 0.5), span=(0.0, 1.0))
    assert buckets.tolist() == [[0.0, 0.5, 0.0], [0.5, 0.5, 7.0], [0.5, 1.0, 0.0]]
    assert histogram_buckets(np.array([0.0, 1.0, 1.0]), (0.0, 1.0)).tolist() == [[0, 0, 1], [0, 1, 0], [1, 1, 2]]
    spread = histogram_buckets(np.linspace(0.2, 0.8, 100), (0.0, 1.0))
    assert spread[0, 0] == 0.0 and spread[-1, 1] == 1.0 and spread[:, 2].sum() == 100
    _, _, runs = comparison  # the fixed gate's label weight is the constant alpha = 0.5
    b = tensor_util.make_ndarray(runs["fixed"].Tensors("weights/label/all")[-1].tensor_proto)
    nonzero = b[b[:, 2] > 0]
    assert nonzero.tolist() == [[0.5, 0.5, float(b[:, 2].sum())]]
    tags = runs["hard"].Tags()["tensors"]
    assert {"weights/label/clean", "weights/label/corrupted", "weights/teacher2/all"} <= set(tags)


def test_teacher_trust_figure_shows_absolute_kd_weight():
    from metagate.diagnostics import teacher_right, teacher_trust_figure

    logits = torch.tensor([[[5.0, 0.0], [0.0, 5.0]], [[0.0, 5.0], [0.0, 5.0]], [[5.0, 0.0], [0.0, 5.0]]])
    right = teacher_right(logits, torch.tensor([0, 1, 1]))  # t0 right on units 0, 1; t1 on units 1, 2
    w = torch.tensor([[0.9, 0.08, 0.02], [0.9, 0.05, 0.05], [0.9, 0.06, 0.04]])  # almost no KD weight
    fig = teacher_trust_figure(w, right, ["a", "adv-a"], title="x")
    ax = fig.axes[0]
    heights = sorted(round(p.get_height(), 6) for p in ax.patches)
    # t0 right: (0.08 + 0.05) / 2, wrong: 0.06; t1 right: (0.05 + 0.04) / 2, wrong: 0.02
    assert heights == sorted([0.065, 0.06, 0.045, 0.02])
    assert ax.get_ylim()[1] < 0.2  # the axis fits the weights, not 0-1
    texts = [t.get_text() for t in ax.texts]
    assert texts.count("n=2") == 2 and texts.count("n=1") == 2
    assert "planted" in " ".join(t.get_text() for t in ax.get_xticklabels())
