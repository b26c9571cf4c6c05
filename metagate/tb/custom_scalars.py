"""The custom-scalars layout: the charts that compare gates side by side, built from the tags that exist.

Every run writes the layout of its own tags and a compare writes the layout of all its runs' tags; TensorBoard
merges categories by title and drops identical charts, so a chart's content depends only on its own tag family
(one regex per chart), never on which other tags a run has.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np
from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import metadata as cs_metadata
from tensorboard.util import tensor_util

from metagate.metrics import MCE_MIN_COUNT
from metagate.tb.tags import teacher_label

#: (category, chart title, tag regex); ``{k}`` charts repeat per teacher, ``{teacher}`` names it
_CHARTS: list[tuple[str, str, str]] = [
    ("compare: test", "test accuracy", r"^test/acc$"),
    ("compare: test", "test NLL", r"^test/nll$"),
    ("compare: test", "test ECE", r"^test/ece$"),
    ("compare: test", f"test MCE over bins with >= {MCE_MIN_COUNT} units", rf"^test/mce_min{MCE_MIN_COUNT}$"),
    ("compare: label weight on clean vs corrupted units", "label weight, clean vs corrupted units",
     r"^diag/w_label_(clean|corrupted)$"),
    ("compare: label weight on clean vs corrupted units", "teacher share, clean vs corrupted units",
     r"^diag/teacher_share_(clean|corrupted)$"),
    ("compare: label weight on clean vs corrupted units", "AUROC of the teacher share for corrupted labels",
     r"^diag/auroc_teacher_share$"),
    ("compare: teachers", "KD weight on right teachers vs an equal split",
     r"^diag/kd_on_right_teachers(_equal)?$"),
    ("compare: teachers", "{teacher}: share of its unit's KD weight where right / wrong",
     r"^diag/kd_share_teacher{k}_(right|wrong)$"),
    ("compare: teachers", "{teacher}: mean absolute weight", r"^gate/mean_w_teacher{k}$"),
    ("compare: teachers", "{teacher}: share of its token's KD weight by token class (lm)",
     r"^gate/share_(?:frequent|rare|code|prose)_t{k}$"),
    ("compare: learned temperature", "learned temperatures", r"^temperature/"),
]


def chart_specs(tags: Iterable[str], teachers: Sequence[str] = ()) -> list[tuple[str, str, str]]:
    """``(category, title, regex)`` of every chart whose regex matches at least one of ``tags``."""
    tags = list(tags)
    out = []
    for category, title, rx in _CHARTS:
        if "{k}" in rx:
            ks = sorted({int(m.group(1)) for t in tags
                         if (m := re.match(rx.replace("{k}", r"(\d+)"), t))})
            out += [(category, title.format(teacher=teacher_label(k, teachers)), rx.replace("{k}", str(k)))
                    for k in ks]
        elif any(re.search(rx, t) for t in tags):
            out.append((category, title, rx))
    return out


def build_layout(tags: Iterable[str], teachers: Sequence[str] = ()) -> layout_pb2.Layout:
    """The layout of the charts :func:`chart_specs` keeps, categories in the table's order."""
    layout = layout_pb2.Layout()
    by_title: dict[str, layout_pb2.Category] = {}
    for category, title, rx in chart_specs(tags, teachers):
        cat = by_title.get(category)
        if cat is None:
            cat = by_title[category] = layout.category.add(title=category)
        cat.chart.add(title=title, multiline=layout_pb2.MultilineChartContent(tag=[rx]))
    return layout


def layout_summary(layout: layout_pb2.Layout) -> summary_pb2.Summary:
    """The summary TensorBoard's custom-scalars plugin reads the layout from."""
    tensor = tensor_util.make_tensor_proto(np.array(layout.SerializeToString(), dtype=object))
    value = summary_pb2.Summary.Value(tag=cs_metadata.CONFIG_SUMMARY_TAG,
                                      metadata=cs_metadata.create_summary_metadata(), tensor=tensor)
    return summary_pb2.Summary(value=[value])
