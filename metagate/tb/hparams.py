"""TensorBoard's HPARAMS: per run only its session records, per comparison one experiment at the root.

TensorBoard keeps the first experiment summary it reads, so runs never write one: a compare writes the one
experiment covering every hyperparameter and metric of all its runs (:func:`write_comparison_summary`), and
a run alone is shown from its session records. Sessions of one gate spec share a group name, so the seeds of a
gate sit together (and TensorBoard can aggregate them).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

from metagate.errors import InputError
from metagate.metrics import MCE_MIN_COUNT
from metagate.options import option_values
from metagate.report import DIAG_METRICS
from metagate.tb.custom_scalars import build_layout, layout_summary
from metagate.tb.tags import describe

#: options that say where/how a run is kept, not what it is (never HPARAMS columns); ``train_`` prefix ignored
BOOKKEEPING = frozenset({"cache_dir", "data_dir", "logdir", "overwrite", "resume", "rebuild_cache",
                         "retrain_teachers", "progress", "no_progress", "device", "eval_test_every_epoch",
                         "config"})
#: the HPARAMS metrics in this order first (TensorBoard ticks the first five)
LEADING_METRICS = ("test/acc", "test/nll", "test/ece", f"test/mce_min{MCE_MIN_COUNT}", "test/brier", "test/mce",
                   *DIAG_METRICS)
#: the axes of a comparison: marked ``differs`` even when one value was run, because TensorBoard sorts the
#: differing hyperparameters first and ticks the first five (so gate and seed are always shown)
LEADING_HPARAMS = ("gate", "train_seed", "seed")


class RunRecord(NamedTuple):
    """One run of a comparison: its directory, hyperparameters, final metrics by tag, and (optional) every
    scalar tag it logged and its teachers' names (for the layout; default: the metrics' tags, no names)."""

    logdir: str | Path
    hparams: Mapping[str, Any]
    metrics: Mapping[str, Any]
    tags: Sequence[str] = ()
    teachers: Sequence[str] = ()

    @classmethod
    def load(cls, logdir: str | Path) -> RunRecord:
        """The record a run wrote into ``logdir/hparams.json`` (:meth:`metagate.logger.Logger.session`)."""
        path = Path(logdir) / "hparams.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read the run record {path}: {e}") from e
        return cls(logdir, data["hparams"], data["metrics"], data.get("tags", ()), data.get("teachers", ()))


def clean_hparams(hparams: Mapping[str, Any]) -> dict[str, bool | int | float | str]:
    """Drop bookkeeping options; ``None`` becomes ``""``, anything not a scalar its ``str``."""
    out: dict[str, bool | int | float | str] = {}
    for k, v in hparams.items():
        if k in BOOKKEEPING or k.removeprefix("train_") in BOOKKEEPING:
            continue
        out[k] = "" if v is None else v if isinstance(v, (bool, int, float, str)) else str(v)
    return out


def _encode(value: bool | int | float | str) -> tuple[int, Any]:
    """``(data type, proto value)``; integers as strings, so a seed reads ``1``, not ``1.0000``."""
    if isinstance(value, bool):
        return api_pb2.DATA_TYPE_BOOL, value
    if isinstance(value, int):
        return api_pb2.DATA_TYPE_STRING, str(value)
    if isinstance(value, float):
        return api_pb2.DATA_TYPE_FLOAT64, value
    return api_pb2.DATA_TYPE_STRING, str(value)


def _summary(tag: str, data: plugin_data_pb2.HParamsPluginData) -> summary_pb2.Summary:
    s = summary_pb2.Summary()
    s.value.add(tag=tag, metadata=metadata.create_summary_metadata(data), tensor=metadata.NULL_TENSOR)
    return s


def session_start(hparams: Mapping[str, Any], group: str, start_time: float | None = None) -> summary_pb2.Summary:
    """The session-start record of one run; ``group`` is its gate spec (the same for all its seeds)."""
    info = plugin_data_pb2.SessionStartInfo(group_name=group, start_time_secs=start_time or time.time())
    for k, v in clean_hparams(hparams).items():
        kind, val = _encode(v)
        field = {api_pb2.DATA_TYPE_BOOL: "bool_value", api_pb2.DATA_TYPE_FLOAT64: "number_value"}.get(
            kind, "string_value")
        setattr(info.hparams[k], field, val)
    return _summary(metadata.SESSION_START_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_start_info=info))


def session_end(status: int = api_pb2.STATUS_SUCCESS, end_time: float | None = None) -> summary_pb2.Summary:
    """The session-end record of one run."""
    info = plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=end_time or time.time())
    return _summary(metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=info))


def metric_order(tags: Iterable[str]) -> list[str]:
    """Test metrics first (accuracy, NLL, ECE, ...), then the gate diagnostics, then the rest by name."""
    tags = set(tags)
    lead = [t for t in LEADING_METRICS if t in tags]
    rank = {"test": 0, "diag": 1, "gate": 2, "select": 3}
    rest = sorted(tags - set(lead), key=lambda t: (rank.get(t.split("/", 1)[0], 4), t))
    return lead + rest


def experiment(runs: Sequence[RunRecord], teachers: Sequence[str] = ()) -> summary_pb2.Summary:
    """The experiment summary of ``runs``: every hyperparameter of every run (a discrete domain of the values
    seen; ``differs`` set when runs disagree) and every numeric metric, test metrics first."""
    values: dict[str, list[Any]] = {}
    for r in runs:
        for k, v in clean_hparams(r.hparams).items():
            values.setdefault(k, []).append(v)
    gates = {k: sorted({str(r.hparams.get("gate", "?")) for r in runs if k in clean_hparams(r.hparams)})
             for k in values}
    all_gates = sorted({str(r.hparams.get("gate", "?")) for r in runs})
    infos = []
    lead = [k for k in LEADING_HPARAMS if k in values]
    for name in lead + sorted(set(values) - set(lead)):
        vals = values[name]
        kinds = {_encode(v)[0] for v in vals}
        info = api_pb2.HParamInfo(name=name, display_name=name.removeprefix("train_"))
        if gates[name] != all_gates:
            info.description = "only in gate(s): " + ", ".join(gates[name])
        distinct = sorted(set(vals), key=lambda v: (isinstance(v, str), v))
        info.differs = len(distinct) > 1 or name in LEADING_HPARAMS
        if len(kinds) == 1:
            info.type = kinds.pop()
            info.domain_discrete.extend([_encode(v)[1] for v in distinct])
        runs_missing = len(runs) - len(vals)
        if runs_missing and info.description:
            info.description += f" ({runs_missing} run(s) without it)"
        infos.append(info)
    tags = {t for r in runs for t, v in r.metrics.items()
            if "/" in t and isinstance(v, (int, float)) and not isinstance(v, bool)}
    metric_infos = [api_pb2.MetricInfo(name=api_pb2.MetricName(group="", tag=t), display_name=t,
                                       description=describe(t, teachers) or "")
                    for t in metric_order(tags)]
    exp = api_pb2.Experiment(hparam_infos=infos, metric_infos=metric_infos, time_created_secs=time.time(),
                             description="metagate comparison: one session per run, grouped by gate spec "
                                         "(the seeds of a gate share a group)")
    return _summary(metadata.EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(experiment=exp))


def gate_spec(name: str, options: Mapping[str, Any], defaults: Mapping[str, Any] | None) -> str:
    """``meta:meta_param=net,meta_lr=0.003``: the gate name and its options that differ from the defaults."""
    if not defaults:
        return name
    diff = [f"{k}={v}" for k, v in sorted(options.items()) if k not in defaults or defaults[k] != v]
    return f"{name}:{','.join(diff)}" if diff else name


def gate_spec_of(gate: Any) -> str:
    """:func:`gate_spec` of a gate instance, against a default-built gate of its class (its options only: what a
    gate found at setup, e.g. ``meta_route``, is recorded in the hparams but is not part of the spec)."""
    config = getattr(gate, "config", None)
    if config is None:
        return gate.name
    return gate_spec(gate.name, option_values(config), option_values(type(config)()))


#: the root event file of a comparison ends with this (an earlier one is replaced, not added to)
ROOT_SUFFIX = ".metagate-comparison"


def write_comparison_summary(root: str | Path, runs: Sequence[RunRecord | tuple[Any, ...]],
                             teachers: Sequence[str] | None = None) -> Path:
    """Write the one HPARAMS experiment and the custom-scalars layout of a comparison into ``root``.

    :param root: the comparison's directory (the runs are below it; TensorBoard is pointed at it)
    :param runs: one :class:`RunRecord` (or tuple of its fields) per run
    :param teachers: teacher names for descriptions and chart titles (default: the first run's that has them)
    :return: the event file written
    """
    from torch.utils.tensorboard import SummaryWriter

    records = [r if isinstance(r, RunRecord) else RunRecord(*r) for r in runs]
    if not records:
        raise InputError(f"no runs to summarise under {root}")
    if teachers is None:
        teachers = next((list(r.teachers) for r in records if r.teachers), [])
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob(f"events.out.tfevents.*{ROOT_SUFFIX}"):
        old.unlink()  # TensorBoard reads every event file of a directory: one experiment only
    tags = {t for r in records for t in (r.tags or r.metrics)}
    writer = SummaryWriter(log_dir=str(root), filename_suffix=ROOT_SUFFIX)
    try:
        fw = writer._get_file_writer()
        fw.add_summary(experiment(records, teachers), 0)
        fw.add_summary(layout_summary(build_layout(tags, teachers)), 0)
    finally:
        writer.close()
    return next(root.glob(f"events.out.tfevents.*{ROOT_SUFFIX}"))
