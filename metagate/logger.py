"""TensorBoard logging with slash keys (``train/loss``), HPARAMS in the run's own directory."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metagate.io import atomic_write_text


class Logger:
    """Thin wrapper over ``SummaryWriter``; a no-op when ``logdir`` is None.

    :param logdir: the run's directory (event files go straight into it)
    """

    def __init__(self, logdir: str | os.PathLike | None) -> None:
        self.logdir = Path(logdir) if logdir else None
        self._writer: Any = None
        self._purge_step: int | None = None
        self._closed = False
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

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.enabled and value == value:  # skip NaN
            self.writer.add_scalar(tag, float(value), step)

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.scalar(f"{prefix}/{k}", v, step)

    def histogram(self, tag: str, values: torch.Tensor | np.ndarray, step: int) -> None:
        if self.enabled and len(values) > 0:
            v = values.detach().float().cpu().numpy() if torch.is_tensor(values) else np.asarray(values)
            self.writer.add_histogram(tag, v, step)

    def figure(self, tag: str, fig: Any, step: int) -> None:
        if self.enabled:
            self.writer.add_figure(tag, fig, step, close=True)

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        """Write an HPARAMS entry into this run's directory (not a timestamped subfolder)."""
        if not self.enabled:
            return
        from torch.utils.tensorboard.summary import hparams as hp_summary

        clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        exp, ssi, sei = hp_summary(clean, {f"hparam/{k}": v for k, v in metrics.items()})
        fw = self.writer._get_file_writer()
        for s in (exp, ssi, sei):
            fw.add_summary(s)
        for k, v in metrics.items():
            self.scalar(f"hparam/{k}", v, 0)
        assert self.logdir is not None
        atomic_write_text(self.logdir / "hparams.json", json.dumps({"hparams": clean, "metrics": metrics}, indent=2))

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._closed = True
