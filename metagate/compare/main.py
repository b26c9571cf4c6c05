"""The compare job end to end: check specs, build the grid, train teachers once, run the cells on a backend,
summarise, write files and figures, print the tables."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from metagate.compare.backends import map_processes, run_jobs, run_ray, run_serial, worker_pool
from metagate.compare.cell import finished_row, prepare_teachers
from metagate.compare.figures import write_figures
from metagate.compare.grid import Cell, build_grid, cell_state, read_json
from metagate.compare.outputs import cost_table, headline, results_table, sequence_table, write_outputs
from metagate.compare.specs import GateSpec, parse_specs
from metagate.compare.summary import summarise
from metagate.errors import ConfigError
from metagate.gates import get_gate_class, option_owners
from metagate.tb.hparams import RunRecord, write_comparison_summary


def base_gate_options(args: argparse.Namespace) -> dict[str, Any]:
    """The gate flags given on the compare's command line (every spec that takes one starts from it)."""
    from metagate.cli_args import gate_option_names

    return {k: getattr(args, k) for k in gate_option_names() if getattr(args, k, None) is not None}


def check_shared_options(args: argparse.Namespace, specs: list[GateSpec]) -> None:
    """Every gate flag given must be taken by at least one compared gate (else it is a typo or a mistake)."""
    takes = {s.gate: get_gate_class(s.gate).config_class.option_names() for s in specs}
    for name, owners in option_owners().items():
        if getattr(args, name, None) is not None and not any(name in t for t in takes.values()):
            raise ConfigError(f"option --{name.replace('_', '-')} is taken by {', '.join(owners)}, none of the "
                              f"compared gates ({', '.join(s.label for s in specs)})")


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}


def _teachers_per_seed(cells: list[Cell], progress: bool,
                       pool: ProcessPoolExecutor | None = None) -> dict[int, list[dict[str, Any]]]:
    """Train and cache each seed's teachers before any cell starts: in this process, or one seed per worker
    process of ``pool`` (each seed is its own data draw with its own cache files, so no two processes ever
    train or write the same teacher)."""
    first = {}
    for cell in cells:
        if cell.seed not in first and get_gate_class(cell.spec.gate).uses_teachers:
            first[cell.seed] = cell
    if pool is not None and len(first) > 1:
        stats = map_processes(prepare_teachers, [(c.config, False) for c in first.values()], pool)
        return dict(zip(first, stats))
    return {seed: prepare_teachers(c.config, progress) for seed, c in first.items()}


def choose_on_select(cell: Cell, teacher_stats: list[dict[str, Any]]) -> Cell:
    """A gate that picks options from the teachers' ``select`` scores (``best-teacher``) gets them set, unless its
    spec set them; the choice is then part of the cell's config (and so of every output)."""
    choose = getattr(get_gate_class(cell.spec.gate), "choose", None)
    if choose is None:
        return cell
    chosen = {k: v for k, v in choose(teacher_stats).items() if cell.config.gate_options.get(k) is None}
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


def run_compare(args: argparse.Namespace) -> dict[str, Any]:
    """See :func:`metagate.compare.compare`; returns ``{"rows", "summary", "paths"}``."""
    t_start = time.perf_counter()
    specs: list[GateSpec] = parse_specs(list(args.gates), base_gate_options(args))
    check_shared_options(args, specs)
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        raise ConfigError(f"--seeds must be distinct, got {args.seeds}")
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {args.jobs}")
    if args.threads < 0:
        raise ConfigError(f"--threads must be >= 0, got {args.threads}")
    out = Path(args.out)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    cells = build_grid(args, specs, out, threads)
    if args.overwrite:
        for c in cells:
            shutil.rmtree(c.run_dir, ignore_errors=True)
    progress = getattr(args, "progress", None) is not False
    # one pool of workers for the teachers and the cells: they import torch and metagate once
    local_jobs = args.backend == "local" and args.jobs > 1
    with worker_pool(args.jobs, threads) if local_jobs else contextlib.nullcontext() as pool:
        return _run_compare(args, specs, cells, out, threads, progress, pool, t_start)


def _run_compare(args: argparse.Namespace, specs: list[GateSpec], cells: list[Cell], out: Path, threads: int,
                 progress: bool, pool: ProcessPoolExecutor | None, t_start: float) -> dict[str, Any]:
    from tqdm.auto import tqdm

    teachers = _teachers_per_seed(cells, progress, pool)
    cells = [choose_on_select(c, teachers.get(c.seed, [])) for c in cells]
    states = {(c.spec.label, c.seed): cell_state(c) for c in cells}  # a mismatching old run fails here
    todo = [c for c in cells if states[(c.spec.label, c.seed)] != "done"]
    rows: dict[tuple[str, int], dict[str, Any]] = {
        (c.spec.label, c.seed): finished_row(c.run_dir) for c in cells if states[(c.spec.label, c.seed)] == "done"}
    partial = sum(states[(c.spec.label, c.seed)] == "partial" for c in todo)
    resumed = bool(rows) or partial > 0
    print(f"compare: {len(cells)} runs ({len(specs)} gates x {len(args.seeds)} seeds), {len(rows)} finished, "
          f"{partial} to continue from a checkpoint; backend {args.backend}, jobs {args.jobs}, "
          f"{threads} torch thread(s) per run", flush=True)
    bar = tqdm(total=len(cells), initial=len(rows), desc="compare", unit="run", dynamic_ncols=True,
               disable=True if not progress else None)

    def on_row(cell: Cell, row: dict[str, Any]) -> None:
        rows[(cell.spec.label, cell.seed)] = row
        bar.set_postfix_str(f"{cell.spec.label} seed {cell.seed}: acc {100 * row['metrics']['test/acc']:.2f}")
        bar.update(1)

    try:
        if args.backend == "ray":
            run_ray(todo, on_row, args.ray_address, cpus_per_cell=threads, storage=out / "ray",
                    max_concurrent=args.jobs if args.jobs > 1 else 0)
        elif pool is not None and len(todo) > 1:
            run_jobs(todo, on_row, pool)
        else:
            run_serial(todo, on_row)
    except KeyboardInterrupt:
        bar.close()
        print(f"\ninterrupted: {len(rows)} of {len(cells)} runs finished; the same command continues the rest",
              flush=True)
        raise
    bar.close()
    ordered = [rows[(c.spec.label, c.seed)] for c in cells]
    baselines = {s.label: s.is_baseline for s in specs}
    summary = summarise(ordered, baselines, args.interval, args.bootstrap_samples)
    first = cells[0].config
    seeds = f"{len(args.seeds)} seeds" + (f" on data draw {first.data_seed}" if getattr(args, "same_data", False) else "")
    title = (f"{first.task}, {first.noise:g} {first.noise_type} noise, {seeds}, "
             f"{first.train.epochs} epochs, student {first.student or 'default'}, {first.teachers} teachers")
    elapsed = time.perf_counter() - t_start
    if resumed:  # the earlier invocations' time counts too (a resume that only rewrites outputs is not "4 s")
        old = (read_json(out / "results.json") or {}).get("run", {})
        elapsed += float(old.get("wall_seconds", 0.0)) if isinstance(old, dict) else 0.0
    info = {"machine": machine(), "backend": args.backend, "jobs": args.jobs, "threads": threads,
            "wall_seconds": elapsed, "specs": [s.label for s in specs], "seeds": list(args.seeds)}
    extra_md = (f"Made by `metagate compare` in {elapsed:.0f} s on {info['machine']['processor']}, "
                f"{info['machine']['cpus']} CPUs (backend {args.backend}, jobs {args.jobs}, {threads} thread(s) "
                "per run).")
    paths = write_outputs(out, ordered, summary, teachers, title, {"run": info}, extra_md)
    paths.update(write_figures(out, ordered, summary))
    write_experiment(out, cells)
    print(f"\n{title} (mean ± std; Δ: paired over seeds, 95% {args.interval} interval):\n")
    print(results_table(summary))
    sequences = sequence_table(summary)
    if sequences:
        print(f"\nsequences (PER/WER of greedy decodings):\n\n{sequences}")
    print()
    print(cost_table(summary))
    print(f"\nfiles in {out}: {', '.join(sorted(p.name for p in paths.values()))}   "
          f"(tensorboard --logdir {out / 'runs'})")
    lines = headline(summary)
    if lines:
        print(f"\n{lines}")
    return {"rows": ordered, "summary": summary, "paths": paths}
