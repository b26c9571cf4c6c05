"""``python tests/fault_runner.py POINT N distill ...``: run ``metagate distill ...`` and SIGKILL this
process at a chosen point, as a crash or ``kill -9`` would (the subject of ``test_faults.py``).

POINT: ``step`` (before the N-th training step), ``ckpt-mid`` (halfway through writing the N-th
checkpoint), ``ckpt-after`` (right after the N-th checkpoint), ``final`` (after training, before the
final metrics are written), ``none`` (run to the end).
"""

from __future__ import annotations

import io as _io
import os
import signal
import sys

import torch

from metagate import callbacks, checkpoint, io, trainer
from metagate.cli import main


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(point: str, n: int) -> None:
    calls = {"step": 0, "ckpt": 0}
    train_step, atomic_save = trainer.Trainer.train_step, checkpoint.atomic_save

    def step(self, *a, **kw):
        calls["step"] += 1
        if point == "step" and calls["step"] == n:
            _die()
        return train_step(self, *a, **kw)

    def save(obj, path):
        calls["ckpt"] += 1
        if point == "ckpt-mid" and calls["ckpt"] == n:
            buf = _io.BytesIO()
            torch.save(obj, buf)
            data = buf.getvalue()

            def half_then_die(f):
                f.write(data[: len(data) // 2])
                f.flush()
                _die()

            io._atomic_write(path, half_then_die)
        atomic_save(obj, path)
        if point == "ckpt-after" and calls["ckpt"] == n:
            _die()

    def log_final(self, *a, **kw):
        _die()

    trainer.Trainer.train_step = step
    checkpoint.atomic_save = save
    if point == "final":
        callbacks.FinalRecord.on_fit_end = log_final


if __name__ == "__main__":
    torch.set_num_threads(1)
    _arm(sys.argv[1], int(sys.argv[2]))
    sys.exit(main(sys.argv[3:]))
