"""The one compare engine: a grid of cells into a locked compare output, run on a backend, summarised, written.

The command line (:mod:`metagate.compare.main`: cells from ``DistillConfig`` and a built-in task) and the Python
API (:mod:`metagate.compare.user`: cells over the user's prepared data, teachers and student) each build a
:class:`Plan`; :func:`run_plan` does the rest the same way for both: the output directory's marker, lock and
overwrite by swap (:class:`~metagate.rundir.RunDir` of kind ``compare``), teachers before any cell, options chosen
on ``select`` (``best-teacher``), resume of finished and partial cells, the serial / ``--jobs`` / Ray backends,
paired statistics, ``results.{json,csv,md}``, figures, the TensorBoard experiment and the printed tables.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from metagate.compare.backends import run_jobs, run_ray, run_serial, worker_pool
from metagate.compare.cell import finished_row
from metagate.compare.figures import write_figures
from metagate.compare.grid import Cell, cell_state, read_json
from metagate.compare.outputs import (
    cost_table,
    headline,
    language_table,
    results_table,
    sequence_table,
    write_outputs,
)
from metagate.compare.specs import GateSpec
from metagate.compare.summary import summarise
from metagate.errors import ConfigError
from metagate.gates import get_gate_class
from metagate.rundir import RunDir
from metagate.tb.hparams import RunRecord, write_comparison_summary

#: per seed, the stats of its teachers (trained and cached before any cell starts)
Teachers = Callable[[list[Cell], bool, "ProcessPoolExecutor | None"], dict[int, list[dict[str, Any]]]]


@dataclass
class Plan:
    """What one compare runs, as built by the command line or the Python API.

    :param specs: the gate specs (rows)
    :param seeds: the seeds (columns of the paired statistics)
    :param out: the compare output directory (new, empty or a marked compare output)
    :param make_cells: the grid with its run directories under the given root (``out``, or the hidden sibling an
        overwrite writes into)
    :param teachers: trains / loads the teachers of every seed before any cell; per seed their stats
    :param title: the tables' title, from the grid
    :param context: what each cell runs on besides its payload (``None``: a command-line cell; the API's
        :class:`~metagate.compare.user.UserRuns`), sent once to each worker process
    :param made_by: who made the outputs (``results.md``'s last line)
    :param option: the name of ``out`` in messages
    """

    specs: list[GateSpec]
    seeds: list[int]
    out: Path
    make_cells: Callable[[Path], list[Cell]]
    teachers: Teachers
    title: Callable[[list[Cell]], str]
    jobs: int = 1
    threads: int = 1
    backend: str = "local"
    ray_address: str | None = None
    interval: str = "t"
    bootstrap_samples: int = 10_000
    overwrite: bool = False
    progress: bool = True
    verbose: bool = True
    context: Any = None
    made_by: str = "`metagate compare`"
    option: str = "--out"

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"--seeds must be distinct, got {list(self.seeds)}")
        if self.jobs < 1:
            raise ConfigError(f"--jobs must be >= 1, got {self.jobs}")
        if self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}")
        if self.backend not in ("local", "ray"):
            raise ConfigError(f"backend must be 'local' or 'ray', got {self.backend!r}")
        if self.interval not in ("t", "bootstrap"):
            raise ConfigError(f"interval must be 't' or 'bootstrap', got {self.interval!r}")


def default_threads(jobs: int, threads: int) -> int:
    """Torch threads per cell: as given, else the CPU cores shared by the ``jobs`` cells running at once."""
    if threads < 0:
        raise ConfigError(f"--threads must be >= 0, got {threads}")
    return threads or max(1, (os.cpu_count() or 1) // max(1, jobs))


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}


def choose_on_select(cell: Cell, teacher_stats: list[dict[str, Any]]) -> Cell:
    """A gate that picks options from the teachers' ``select`` scores (``best-teacher``) gets them set, unless its
    spec set them; the choice is then part of the cell's config (and so of every output)."""
    choose = getattr(get_gate_class(cell.spec.gate), "choose", None)
    if choose is None:
        return cell
    try:
        proposal = choose(teacher_stats)
    except ConfigError as e:  # no score to choose by (teachers from files or tensors have no select accuracy)
        if cell.spec.options:
            return cell  # the spec chose; a missing choice is named when the gate is set up
        raise ConfigError(f"--gates {cell.spec.label!r}: {e}; set the choice in the spec "
                          f"({cell.spec.gate}:option=value)") from None
    chosen = {k: v for k, v in proposal.items() if cell.config.gate_options.get(k) is None}
    if not chosen:
        return cell
    cfg = replace(cell.config, gate_options={**cell.config.gate_options, **chosen})
    return replace(cell, config=cfg)


def write_experiment(out: Path, cells: list[Cell]) -> None:
    """One TensorBoard HPARAMS experiment and custom-scalars layout at ``out/runs`` (where TensorBoard is
    pointed) over every run of the grid, so the HPARAMS tab is complete whatever order it reads the runs in."""
    records = [RunRecord.load(c.run_dir) for c in cells if (c.run_dir / "hparams.json").is_file()]
    if records:
        write_comparison_summary(out / "runs", records)


def run_plan(plan: Plan) -> dict[str, Any]:
    """Run the grid of ``plan`` (resuming finished and partial cells), write every output, print the tables.

    The output directory is checked, marked and locked first (a second compare into it is refused, naming this
    process); with ``overwrite`` the new output is written beside it and swapped in only when it is complete.

    :return: ``{"rows", "summary", "paths"}``: one row per spec x seed in grid order, the summary
        (:func:`~metagate.compare.summary.summarise`), the written files
    """
    t_start = time.perf_counter()
    cells = plan.make_cells(plan.out)  # every cell's config checked before the output directory is touched
    with RunDir(plan.out, overwrite=plan.overwrite, option=plan.option, kind="compare") as rd:
        work = rd.work
        if work != plan.out:  # an overwrite: a fresh grid in the sibling that replaces the old output
            cells = plan.make_cells(work)
        local_jobs = plan.backend == "local" and plan.jobs > 1
        # one pool of workers for the teachers and the cells: they import torch and metagate once
        pool_args = (plan.jobs, plan.threads) if plan.context is None else (plan.jobs, plan.threads, plan.context)
        with worker_pool(*pool_args) if local_jobs else contextlib.nullcontext() as pool:
            result = _run_cells(plan, cells, work, pool, t_start)
        rd.commit()
    result["paths"] = {k: plan.out / p.relative_to(work) for k, p in result["paths"].items()}
    if plan.verbose:
        print(f"\nfiles in {plan.out}: {', '.join(sorted(p.name for p in result['paths'].values()))}   "
              f"(tensorboard --logdir {plan.out / 'runs'})")
        lines = headline(result["summary"])
        if lines:  # one line per learned gate: its paired difference to the best baseline, the headroom it took
            print(f"\n{lines}")
    return result


def _key(cell: Cell) -> tuple[str, int]:
    return cell.spec.label, cell.seed


def _run_cells(plan: Plan, cells: list[Cell], out: Path, pool: ProcessPoolExecutor | None,
               t_start: float) -> dict[str, Any]:
    from tqdm.auto import tqdm

    say = print if plan.verbose else (lambda *a, **k: None)
    teachers = plan.teachers(cells, plan.progress, pool)
    cells = [choose_on_select(c, teachers.get(c.seed, [])) for c in cells]
    states = {_key(c): cell_state(c) for c in cells}  # a mismatching old run fails here
    todo = [c for c in cells if states[_key(c)] != "done"]
    rows: dict[tuple[str, int], dict[str, Any]] = {
        _key(c): finished_row(c.run_dir) for c in cells if states[_key(c)] == "done"}
    partial = sum(states[_key(c)] == "partial" for c in todo)
    resumed = bool(rows) or partial > 0
    say(f"compare: {len(cells)} runs ({len(plan.specs)} gates x {len(plan.seeds)} seeds), {len(rows)} finished, "
        f"{partial} to continue from a checkpoint; backend {plan.backend}, jobs {plan.jobs}, "
        f"{plan.threads} torch thread(s) per run", flush=True)
    bar = tqdm(total=len(cells), initial=len(rows), desc="compare", unit="run", dynamic_ncols=True,
               disable=True if not plan.progress else None)

    def on_row(cell: Cell, row: dict[str, Any]) -> None:
        rows[_key(cell)] = row
        acc = row["metrics"].get("test/acc", row["metrics"].get("select/acc", float("nan")))
        bar.set_postfix_str(f"{cell.spec.label} seed {cell.seed}: acc {100 * acc:.2f}")
        bar.update(1)

    try:
        if plan.backend == "ray":
            run_ray(todo, on_row, plan.ray_address, cpus_per_cell=plan.threads, storage=out / "ray",
                    max_concurrent=plan.jobs if plan.jobs > 1 else 0, context=plan.context)
        elif pool is not None and len(todo) > 1:
            run_jobs(todo, on_row, pool)
        else:
            run_serial(todo, on_row, plan.context)
    except KeyboardInterrupt:
        bar.close()
        say(f"\ninterrupted: {len(rows)} of {len(cells)} runs finished; the same command continues the rest",
            flush=True)
        raise
    bar.close()
    final = plan.out.resolve()
    ordered = []
    for c in cells:  # the run directory where it stays (not the sibling an overwrite wrote it in)
        row = rows[_key(c)]
        logdir = str(final / c.run_dir.resolve().relative_to(out.resolve()))
        ordered.append({**row, "config": {**row["config"], "logdir": logdir}})
    baselines = {s.label: s.is_baseline for s in plan.specs}
    summary = summarise(ordered, baselines, plan.interval, plan.bootstrap_samples)
    title = plan.title(cells)
    elapsed = time.perf_counter() - t_start
    if resumed:  # the earlier invocations' time counts too (a resume that only rewrites outputs is not "4 s")
        old = (read_json(out / "results.json") or {}).get("run", {})
        elapsed += float(old.get("wall_seconds", 0.0)) if isinstance(old, dict) else 0.0
    info = {"machine": machine(), "backend": plan.backend, "jobs": plan.jobs, "threads": plan.threads,
            "wall_seconds": elapsed, "specs": [s.label for s in plan.specs], "seeds": list(plan.seeds)}
    extra_md = (f"Made by {plan.made_by} in {elapsed:.0f} s on {info['machine']['processor']}, "
                f"{info['machine']['cpus']} CPUs (backend {plan.backend}, jobs {plan.jobs}, {plan.threads} "
                "thread(s) per run).")
    paths = write_outputs(out, ordered, summary, teachers, title, {"run": info}, extra_md)
    paths.update(write_figures(out, ordered, summary))
    write_experiment(out, cells)
    say(f"\n{title} (mean ± std; Δ: paired over seeds, 95% {plan.interval} interval):\n")
    say(results_table(summary))
    sequences = sequence_table(summary)
    if sequences:
        say(f"\nsequences (PER/WER of greedy decodings):\n\n{sequences}")
    language = language_table(summary)
    if language:
        say(f"\nlanguage modelling (test perplexity, teacher forcing):\n\n{language}")
    say()
    say(cost_table(summary))
    return {"rows": ordered, "summary": summary, "paths": paths}
