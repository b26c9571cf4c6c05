"""Summary protos built without TensorFlow: scalars with descriptions, histograms that show constants, text."""

from __future__ import annotations

import numpy as np
from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.histogram import metadata as histogram_metadata
from tensorboard.plugins.histogram.summary_v2 import histogram_pb
from tensorboard.plugins.text.summary_v2 import text_pb
from tensorboard.util import tensor_util

#: at most this many distinct values are drawn as exact spikes (constant, or 0/1 hard-gate weights)
MAX_SPIKES = 8
BUCKETS = 30


def scalar(tag: str, value: float, description: str | None = None) -> summary_pb2.Summary:
    """A scalar summary; ``description`` (markdown) goes into the metadata TensorBoard shows on hover.

    The description only needs to be written with a tag's first value: TensorBoard keeps the first metadata.
    """
    v = summary_pb2.Summary.Value(tag=tag, simple_value=float(value))
    if description is not None:
        v.metadata.plugin_data.plugin_name = "scalars"
        v.metadata.summary_description = description
    return summary_pb2.Summary(value=[v])


def histogram_buckets(values: np.ndarray, span: tuple[float, float] | None = None) -> np.ndarray:
    """``[B, 3]`` (left, right, count) buckets of ``values``.

    Few distinct values become zero-width buckets at those values (TensorBoard draws a spike there, and the
    Distributions tab a line, instead of a band one bucket wide); with ``span`` empty buckets stretch the axis
    over it (weights: ``(0, 1)``), so a constant 0.5 shows as a spike half-way along a 0-1 axis.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    distinct, counts = np.unique(v, return_counts=True)
    if len(distinct) > MAX_SPIKES:
        lo, hi = (min(span[0], v.min()), max(span[1], v.max())) if span else (v.min(), v.max())
        c, edges = np.histogram(v, bins=BUCKETS, range=(lo, hi))
        return np.stack([edges[:-1], edges[1:], c.astype(np.float64)], 1)
    rows = []
    lo = min(span[0], distinct[0]) if span else distinct[0]
    hi = max(span[1], distinct[-1]) if span else distinct[-1]
    left = lo
    for x, n in zip(distinct, counts):
        if x > left:
            rows.append((left, x, 0.0))
        rows.append((x, x, float(n)))
        left = x
    if hi > left:
        rows.append((left, hi, 0.0))
    return np.asarray(rows, dtype=np.float64)


def histogram(tag: str, values: np.ndarray, description: str | None = None,
              span: tuple[float, float] | None = None) -> summary_pb2.Summary:
    """A histogram summary (TensorBoard's tensor form) of :func:`histogram_buckets`."""
    if len(values) == 0:
        return histogram_pb(tag, np.zeros(0), description=description)
    md = histogram_metadata.create_summary_metadata(display_name=tag, description=description or "")
    tensor = tensor_util.make_tensor_proto(histogram_buckets(values, span), dtype=np.float64)
    return summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, metadata=md, tensor=tensor)])


def text(tag: str, markdown: str, description: str | None = None) -> summary_pb2.Summary:
    """A text summary (markdown, tables included)."""
    return text_pb(tag, markdown, description=description)
