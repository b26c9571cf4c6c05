"""Helpers shared by the policy-gate evidence scripts (not part of the library)."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from metagate.diagnostics import kd_shares
from metagate.gates.base import Gate
from metagate.teachers.bank import TeacherBank
from metagate.trainer import TrainConfig, Trainer, seed_everything


def run_gate(task: Any, bank: TeacherBank, gate: Gate, seed: int, epochs: int, student: str | None = None,
             batch_size: int = 128) -> dict[str, float]:
    """One distillation run in memory; test metrics, the mean KD-internal weight of each teacher and the
    teacher-choice gain (``diag/teacher_choice_gain``)."""
    seed_everything(seed)
    tr = Trainer(task, task.make_student(student), gate, bank,
                 TrainConfig(epochs=epochs, batch_size=batch_size, seed=seed, device="cpu", progress=False,
                             eval_test_every_epoch=False))
    t0 = time.perf_counter()
    for _ in range(epochs):
        tr.run_epoch()
    out = {f"test_{k}": v for k, v in tr.evaluate("test").items()}
    for j, v in enumerate(kd_shares(tr.unit_weights).mean(0).tolist()):
        out[f"kd_w{j}"] = v
    out["seconds"] = time.perf_counter() - t0
    out["teacher_choice_gain"] = tr.weight_diagnostics().get("diag/teacher_choice_gain", float("nan"))
    return out


def single_teacher(bank: TeacherBank, j: int) -> TeacherBank:
    return TeacherBank(bank.logits[:, j : j + 1].contiguous(), [bank.names[j]])


def mean_std(xs: list[float]) -> str:
    """``mean ± std`` of the finite values (``-`` when there are none)."""
    xs = [x for x in xs if x == x]
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.4f}"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}"


def one_thread() -> None:
    torch.set_num_threads(1)
