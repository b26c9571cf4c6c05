"""The Python API's side of the compare engine: cells over the user's own prepared data, teachers and student.

:func:`metagate.compare_gates` prepares the data and the teacher bank once (:func:`metagate.api.prepare`) and
builds a :class:`~metagate.compare.engine.Plan` here: the same gate specs, grid, cell records, resume, backends,
summary, files and figures as ``metagate compare``; only the one run of a cell differs (the API's
``run_prepared`` on the user's data instead of ``run_distill`` on a built-in task). Every cell's config is a
``DistillConfig`` (task: the prepared task's name, the gate and its options, the training config with the
cell's seed), so the rows, the CSV columns and the resume check are the command line's.

With ``jobs > 1`` the prepared data, the bank and the student go to each worker process once (pickled), so
the student must be a module-level factory (or a picklable module): checked before anything runs.
"""

from __future__ import annotations

import copy
import pickle
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metagate.callbacks import EpochFn
from metagate.compare.cell import EpochTimer, artefacts, bank_fingerprint, make_row, start_cell
from metagate.compare.engine import Plan, default_threads
from metagate.compare.grid import Cell
from metagate.compare.specs import GateSpec, parse_specs
from metagate.data.builtin import register_prepared
from metagate.errors import ConfigError
from metagate.gates import get_gate_class
from metagate.run import DistillConfig
from metagate.trainer import TrainConfig


@dataclass
class UserRuns:
    """A compare's context on the user's data (sent once to each worker process).

    :param prepared: the API's ``Prepared`` (task, bank, teacher stats)
    :param student: an ``nn.Module`` (each run starts from a deep copy) or a zero-argument factory
    :param run: the API's one-run function, ``metagate.api.run_prepared``
    """

    prepared: Any
    student: Any
    run: Callable[..., Any]

    def __setstate__(self, state: dict[str, Any]) -> None:  # in a worker process: configs name the task
        self.__dict__.update(state)
        register_prepared(self.prepared.task)

    def make_student(self) -> Callable[[], nn.Module]:
        student = self.student
        return (lambda: copy.deepcopy(student)) if isinstance(student, nn.Module) else student

    def run_one(self, cfg: DistillConfig, payload: dict[str, Any]) -> dict[str, Any]:
        """One run of a cell on the prepared data (continued from its checkpoint when there is one, as the
        command line's cells are); its row."""
        prep = self.prepared
        start_epoch = start_cell(cfg.run_dir, payload)
        timer = EpochTimer(start_epoch)
        res = self.run(prep, self.make_student(), cfg.gate, dict(cfg.gate_options), cfg.train, logdir=cfg.run_dir,
                       resume=(cfg.run_dir / "checkpoint.pt").exists(), callbacks=[EpochFn(timer)])
        bank = prep.bank if get_gate_class(cfg.gate).uses_teachers else None
        teachers: dict[str, Any] = {"names": [], "fingerprint": "", "stats": []}
        if bank is not None:
            teachers = {"names": list(bank.names), "fingerprint": bank_fingerprint(bank),
                        "stats": [dict(s) for s in prep.teacher_stats]}
        trainer = res.trainer
        figures = artefacts(res.student, trainer.unit_weights, int(trainer.step), prep.task, teachers["names"])
        return make_row(cfg, payload, prep.task, dict(res.metrics), teachers, timer.timing(), figures)


def describe(student: Any) -> str:
    if isinstance(student, nn.Module):
        return f"the student module ({type(student).__name__} instance)"
    name = getattr(student, "__qualname__", None) or type(student).__name__
    return f"the student factory {getattr(student, '__module__', '?')}.{name}"


def check_sendable(student: Any, prepared: Any, jobs: int, backend: str) -> None:
    """Worker processes (``jobs > 1``) and Ray trials receive the student and the prepared data pickled: refuse
    what cannot be sent (a lambda, a local function, a function typed into an interactive session, an
    unpicklable module) before anything runs.

    :raises ConfigError: naming the student (or the data) and why
    """
    if jobs <= 1 and backend == "local":
        return
    where = f"jobs={jobs}" if backend == "local" else "backend='ray'"
    how = ("define the factory as a top-level function (or a functools.partial of a class) in an importable "
           "module, or pass jobs=1")
    what = describe(student)
    qual = getattr(student, "__qualname__", "")
    if not isinstance(student, nn.Module) and ("<lambda>" in qual or "<locals>" in qual):
        kind = "a lambda" if "<lambda>" in qual else "a local function"
        raise ConfigError(f"{where} runs the cells in worker processes, which must import the student: {what} is "
                          f"{kind}, which cannot be sent to them; {how}")
    module = getattr(student, "__module__", None)
    if module == "__main__" and not getattr(sys.modules.get("__main__"), "__file__", None):
        raise ConfigError(f"{where} runs the cells in worker processes, which must import the student: {what} is "
                          f"defined in an interactive session, which they cannot import; {how}")
    try:
        pickle.dumps(student)
    except Exception as e:  # noqa: BLE001 - any pickling failure is the user's object, named here
        raise ConfigError(f"{where} runs the cells in worker processes: {what} cannot be pickled to send it to "
                          f"them ({type(e).__name__}: {e}); {how}") from None
    try:
        pickle.dumps(prepared)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{where} runs the cells in worker processes: the prepared data and teachers cannot be "
                          f"pickled to send them ({type(e).__name__}: {e}); pass jobs=1") from None


def _cell_config(prep: Any, student_name: str, spec: GateSpec, seed: int, train: TrainConfig,
                 base: Mapping[str, Any], run_dir: Path) -> DistillConfig:
    k = len(prep.bank.names) if prep.bank is not None else 0
    return DistillConfig(task=prep.task.name, teachers=k, student=student_name, gate=spec.gate,
                         gate_options={**base, **spec.options}, train=replace(train, seed=seed, progress=False),
                         logdir=str(run_dir.resolve()))


def user_plan(prep: Any, student: Any, run: Callable[..., Any], gates: Sequence[str], seeds: Sequence[int],
              train: TrainConfig, out: Path, gate_options: Mapping[str, Mapping[str, Any]] | None = None,
              jobs: int = 1, threads: int = 0, backend: str = "local", ray_address: str | None = None,
              interval: str = "t", bootstrap_samples: int = 10_000, overwrite: bool = False,
              verbose: bool = True) -> Plan:
    """The :class:`~metagate.compare.engine.Plan` of :func:`metagate.compare_gates`.

    :param gate_options: per gate name, options under every spec of that gate (a spec's own options win)
    """
    gate_options = dict(gate_options or {})
    gates = [gates] if isinstance(gates, str) else list(gates)  # one spec, not its characters
    if isinstance(seeds, int) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"seeds must be a list of integers, got {seeds!r}")
    specs = parse_specs(gates)
    for s in specs:  # the per-gate options, checked with the spec's own on top
        if s.gate in gate_options:
            try:
                DistillConfig(gate=s.gate, gate_options={**gate_options[s.gate], **s.options})
            except ConfigError as e:
                raise ConfigError(f"gate_options[{s.gate!r}]: {e}") from None
    unknown = sorted(set(gate_options) - {s.gate for s in specs})
    if unknown:
        raise ConfigError(f"gate_options names {', '.join(map(repr, unknown))}, none of the compared gates "
                          f"({', '.join(s.label for s in specs)})")
    if prep.bank is None:
        needs = [s.label for s in specs if get_gate_class(s.gate).uses_teachers]
        if needs:
            raise ConfigError(f"gate(s) {', '.join(needs)} need teachers; pass teachers=[...] (or compare gates "
                              "without teachers, e.g. 'ce')")
    seeds = list(seeds)
    # in this process (jobs=1) the user's own torch.set_num_threads stands unless threads= says otherwise
    threads = (threads or torch.get_num_threads()) if jobs == 1 and backend == "local" else default_threads(jobs, threads)
    check_sendable(student, prep, jobs, backend)
    student_name = type(student).__name__ if isinstance(student, nn.Module) else \
        getattr(student, "__qualname__", None) or getattr(getattr(student, "func", None), "__qualname__", "user")

    def make_cells(root: Path) -> list[Cell]:
        return [Cell(s, seed, _cell_config(prep, student_name, s, seed, train, gate_options.get(s.gate, {}),
                                           root / "runs" / s.slug / f"seed{seed}"), threads)
                for s in specs for seed in seeds]

    def teachers(cells: list[Cell], progress: bool, pool: Any) -> dict[int, list[dict[str, Any]]]:
        if prep.bank is None or not any(get_gate_class(c.spec.gate).uses_teachers for c in cells):
            return {}
        return {seed: [dict(s) for s in prep.teacher_stats] for seed in seeds}

    def title(cells: list[Cell]) -> str:
        cfg = cells[0].config
        k = len(prep.bank.names) if prep.bank is not None else 0
        return (f"{prep.task.name} (your data: {len(prep.task.train)} training units), {len(seeds)} seeds, "
                f"{cfg.train.epochs} epochs, student {student_name}, {k} teachers")

    return Plan(specs=specs, seeds=seeds, out=out, make_cells=make_cells, teachers=teachers, title=title,
                jobs=jobs, threads=threads, backend=backend, ray_address=ray_address, interval=interval,
                bootstrap_samples=bootstrap_samples, overwrite=overwrite, progress=verbose, verbose=verbose,
                context=UserRuns(prep, student, run), made_by="`metagate.compare_gates`")

