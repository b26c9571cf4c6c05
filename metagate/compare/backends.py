"""Where the cells of a compare run: in this process, in ``--jobs N`` worker processes, or as Ray Tune trials.

Every backend runs the same :func:`~metagate.compare.cell.run_cell` on the same payloads (same seeds,
same thread count per cell), so per-run metrics do not depend on the backend. Teachers are already
cached when a backend starts (:func:`~metagate.compare.cell.prepare_teachers` runs first). A compare of the
Python API has a ``context`` (the user's prepared data, teachers and student): it goes to each worker process
once, when the worker starts, and to each Ray trial with its payload.
"""

from __future__ import annotations

import json
import multiprocessing as mp
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from metagate.compare.cell import run_cell
from metagate.compare.grid import Cell
from metagate.errors import ConfigError

OnRow = Callable[[Cell, dict[str, Any]], None]


def run_serial(cells: list[Cell], on_row: OnRow, context: Any = None) -> None:
    """One cell after the other in this process."""
    for cell in cells:
        on_row(cell, run_cell(cell.payload(), context))


#: the compare's context in a worker process (set once by the pool's initializer)
_CONTEXT: Any = None


def _init_worker(threads: int, context: Any = None) -> None:
    import torch

    global _CONTEXT
    torch.set_num_threads(max(1, threads))  # before the first op: bounded intra-op threads per worker
    _CONTEXT = context


def _run_in_worker(payload: dict[str, Any]) -> dict[str, Any]:
    return run_cell(payload, _CONTEXT)


def worker_pool(jobs: int, threads: int, context: Any = None) -> ProcessPoolExecutor:
    """``jobs`` spawned worker processes (no forked torch thread pools or open files), each with ``threads``
    torch threads and the compare's ``context``; one pool serves a compare's teacher preparation and its cells
    (workers import once)."""
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    return ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                               initargs=(threads, context))


def _longest_first(cells: list[Cell]) -> list[Cell]:
    """Learned gates first: they take the longest, and the short rule cells fill the workers' last gaps."""
    return sorted(cells, key=lambda c: c.spec.is_baseline)


def run_jobs(cells: list[Cell], on_row: OnRow, pool: ProcessPoolExecutor) -> None:
    """Cells in the worker processes of ``pool`` (a :func:`worker_pool`), longest first.

    At most the pool's ``jobs`` cells are in flight; on an interrupt the queued ones are cancelled and the
    running ones end with their workers (their checkpoints let the next compare continue them).
    """
    pending = {pool.submit(_run_in_worker, c.payload()): c for c in _longest_first(cells)}
    try:
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                cell = pending.pop(fut)
                on_row(cell, fut.result())
    except BaseException:
        for fut in pending:
            fut.cancel()
        raise


def map_processes(fn: Callable[..., Any], arg_tuples: list[tuple], pool: ProcessPoolExecutor) -> list[Any]:
    """``[fn(*args) for args in arg_tuples]`` in the worker processes of ``pool``, in order."""
    return list(pool.map(fn, *zip(*arg_tuples)))


def _ray_trial(config: dict[str, Any]) -> None:
    """A Ray Tune trial: one cell; its row goes back through ``tune.report`` (as JSON text, so nested
    figure data survive Tune's flattening of metrics)."""
    from ray import tune

    row = run_cell(config["cell"], config.get("context"))
    tune.report({"test_acc": float(row["metrics"].get("test/acc", float("nan"))), "row_json": json.dumps(row)})


def run_ray(cells: list[Cell], on_row: OnRow, address: str | None = None, cpus_per_cell: int = 1,
            storage: Path | None = None, max_concurrent: int = 0, context: Any = None) -> None:
    """Cells as Ray Tune trials: ``ray.tune.Tuner`` over a grid of payloads, ``tune.with_resources`` per cell.

    :param address: ``None`` starts (or joins an already started) local Ray instance; ``auto`` or
        ``HOST:PORT`` joins a cluster (every node must see the run directories and the teacher cache,
        e.g. on a shared file system)
    :param storage: where Tune keeps its own trial records
    :param context: the Python API's :class:`~metagate.compare.user.UserRuns`, given to every trial
    """
    try:
        import ray
        from ray import tune
    except ImportError as e:
        raise ConfigError("--backend ray needs the ray extra: pip install 'metagate[ray]'") from e
    if not cells:
        return
    started = False
    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
        started = True
    try:
        by_key = {(c.spec.label, c.seed): c for c in cells}
        trainable = tune.with_resources(_ray_trial, {"cpu": cpus_per_cell})
        space: dict[str, Any] = {"cell": tune.grid_search([c.payload() for c in cells])}
        if context is not None:
            space["context"] = context
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=max_concurrent or None),
            run_config=tune.RunConfig(name="metagate-compare", verbose=0,
                                      storage_path=str(storage.resolve()) if storage else None),
        )
        results = tuner.fit()
        errors = [r.error for r in results if r.error is not None]
        if errors:
            raise errors[0]
        for r in results:
            row = json.loads(r.metrics["row_json"])
            on_row(by_key[(row["label"], row["seed"])], row)
    finally:
        if started:
            ray.shutdown()
