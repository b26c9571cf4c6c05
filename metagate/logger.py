"""TensorBoard logging with slash keys (``train/loss``): every scalar described, teachers named, HPARAMS as
session records (the experiment is written once per comparison, :mod:`metagate.tb.hparams`)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metagate.io import atomic_write_text
from metagate.tb import hparams as tb_hparams
from metagate.tb import summaries
from metagate.tb.custom_scalars import build_layout, layout_summary
from metagate.tb.tags import describe, is_duplicate, is_planted


class Logger:
    """Thin wrapper over ``SummaryWriter``; a no-op when ``logdir`` is None.

    :param logdir: the run's directory (event files go straight into it)
    """

    def __init__(self, logdir: str | os.PathLike | None) -> None:
        self.logdir = Path(logdir) if logdir else None
        self._writer: Any = None
        self._purge_step: int | None = None
        self._closed = False
        self.teachers: list[str] = []
        self.scalar_tags: set[str] = set()  # every scalar tag written (the layout names only these)
        self._last_step: dict[str, int] = {}
        if self.logdir is not None:
            self.logdir.mkdir(parents=True, exist_ok=True)

    @property
    def enabled(self) -> bool:
        return self.logdir is not None and not self._closed

    def purge_after(self, step: int) -> None:
        """Drop the points logged after ``step`` by an earlier, interrupted process (a resume re-runs those
        steps): TensorBoard's ``purge_step``. Call before the first write."""
        if self._writer is not None:
            raise RuntimeError("purge_after must be called before anything is logged")
        self._purge_step = int(step) + 1

    def _wait_for_a_later_second(self) -> None:
        """TensorBoard reads event files in name order, whose first key is the creation second: a resumed
        run's file (carrying the purge) must sort after the interrupted run's files."""
        assert self.logdir is not None
        stamps = [int(p.name.split(".")[3]) for p in self.logdir.glob("events.out.tfevents.*")
                  if p.name.split(".")[3].isdigit()]
        while stamps and time.time() < max(stamps) + 1:
            time.sleep(0.05)

    @property
    def writer(self) -> Any:
        """The ``SummaryWriter``, created on first use (``None`` when disabled)."""
        if self._writer is None and self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            if self._purge_step is not None:
                self._wait_for_a_later_second()
            self._writer = SummaryWriter(log_dir=str(self.logdir), purge_step=self._purge_step)
        return self._writer

    def _add(self, summary: Any, step: int) -> None:
        self.writer._get_file_writer().add_summary(summary, step)

    def set_teachers(self, names: Sequence[str]) -> None:
        """Name the teachers (tag descriptions and chart titles say ``teacher2 (adv-cnn16, ...)``); the first
        call also writes the index -> name table as the text summary ``teachers``."""
        if not self.enabled or list(names) == self.teachers and self.teachers:
            return
        self.teachers = list(names)
        rows = ["| index | tags | teacher | planted adversarial |", "|---|---|---|---|"]
        for k, n in enumerate(self.teachers):
            rows.append(f"| {k} | `*teacher{k}*` | {n} | {'**yes**' if is_planted(n) else 'no'} |")
        body = "\n".join(rows) if self.teachers else "no teachers (label only)"
        self._add(summaries.text("teachers", body, "which teacher each `teacher{k}` tag means"), 0)

    def scalar(self, tag: str, value: float, step: int, description: str | None = None) -> None:
        """Log ``value`` (NaN skipped; tags that repeat another tag's quantity are not written)."""
        if not self.enabled or value != value or is_duplicate(tag):
            return
        first = tag not in self.scalar_tags
        if first:
            description = description or describe(tag, self.teachers) or f"`{tag}` (no description registered in " \
                "metagate.tb.tags)"
            self.scalar_tags.add(tag)
        self._add(summaries.scalar(tag, float(value), description if first else None), step)
        self._last_step[tag] = step

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.scalar(f"{prefix}/{k}", v, step)

    def logged_at(self, tag: str) -> int | None:
        """The step of ``tag``'s last value, or None if it was never logged by this logger."""
        return self._last_step.get(tag)

    def histogram(self, tag: str, values: torch.Tensor | np.ndarray, step: int,
                  span: tuple[float, float] | None = None, description: str | None = None) -> None:
        """A histogram; a few distinct values (a constant weight) are drawn as exact spikes, and ``span``
        (e.g. ``(0, 1)`` for weights) fixes the axis so a constant sits where it belongs."""
        if self.enabled and len(values) > 0:
            v = values.detach().float().cpu().numpy() if torch.is_tensor(values) else np.asarray(values)
            self._add(summaries.histogram(tag, v, description, span), step)

    def text(self, tag: str, markdown: str, step: int, description: str | None = None) -> None:
        if self.enabled:
            self._add(summaries.text(tag, markdown, description), step)

    def figure(self, tag: str, fig: Any, step: int) -> None:
        if self.enabled:
            self.writer.add_figure(tag, fig, step, close=True)

    def session(self, hparams: Mapping[str, Any], group: str, metrics: Mapping[str, float]) -> None:
        """This run's HPARAMS session records (start with ``group`` = its gate spec, end), its custom-scalars
        layout, and ``hparams.json`` (the cleaned hyperparameters and final metrics a compare collects)."""
        if not self.enabled:
            return
        clean = tb_hparams.clean_hparams(hparams)
        self._add(tb_hparams.session_start(clean, group), 0)
        self._add(tb_hparams.session_end(), 0)
        self._add(layout_summary(build_layout(self.scalar_tags, self.teachers)), 0)
        keep = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v == v}
        assert self.logdir is not None
        atomic_write_text(self.logdir / "hparams.json", json.dumps(
            {"hparams": clean, "group": group, "teachers": self.teachers, "metrics": keep,
             "tags": sorted(self.scalar_tags)}, indent=2))

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._closed = True
