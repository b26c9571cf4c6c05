"""``metagate compare``'s side of the engine: gate specs and cells from the flags (``DistillConfig`` over a
built-in task), each seed's teachers trained once; :func:`~metagate.compare.engine.run_plan` does the rest."""

from __future__ import annotations

import argparse
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from metagate.compare.backends import map_processes
from metagate.compare.cell import prepare_teachers
from metagate.compare.engine import Plan, default_threads, run_plan
from metagate.compare.grid import Cell, build_grid
from metagate.compare.specs import GateSpec, parse_specs
from metagate.errors import ConfigError
from metagate.gates import get_gate_class, option_owners


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


def _title(args: argparse.Namespace, cells: list[Cell]) -> str:
    first = cells[0].config
    seeds = f"{len(args.seeds)} seeds" + (f" on data draw {first.data_seed}" if getattr(args, "same_data", False) else "")
    return (f"{first.task}, {first.noise:g} {first.noise_type} noise, {seeds}, "
            f"{first.train.epochs} epochs, student {first.student or 'default'}, {first.teachers} teachers")


def plan_of(args: argparse.Namespace) -> Plan:
    """The command line's compare as a :class:`~metagate.compare.engine.Plan`: every spec checked, the cells
    from ``DistillConfig`` over the flags and a built-in task."""
    specs: list[GateSpec] = parse_specs(list(args.gates), base_gate_options(args))
    check_shared_options(args, specs)
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {args.jobs}")
    threads = default_threads(args.jobs, args.threads)
    return Plan(specs=specs, seeds=list(args.seeds or []), out=Path(args.out),
                make_cells=lambda root: build_grid(args, specs, root, threads), teachers=_teachers_per_seed,
                title=lambda cells: _title(args, cells), jobs=args.jobs, threads=threads, backend=args.backend,
                ray_address=args.ray_address, interval=args.interval, bootstrap_samples=args.bootstrap_samples,
                overwrite=args.overwrite, progress=getattr(args, "progress", None) is not False)


def run_compare(args: argparse.Namespace) -> dict[str, Any]:
    """See :func:`metagate.compare.compare`; returns ``{"rows", "summary", "paths"}``."""
    return run_plan(plan_of(args))
