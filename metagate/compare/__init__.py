"""``metagate compare``: gate specs x seeds on one task -- tables, paired intervals, files and figures.

Modules, one concept each: :mod:`~metagate.compare.specs` (``name:opt=val,...``),
:mod:`~metagate.compare.engine` (the one engine: output directory, teachers, resume, backends, outputs) fed by
:mod:`~metagate.compare.main` (the command line's cells) and :mod:`~metagate.compare.user` (``compare_gates``'),
:mod:`~metagate.compare.grid` (cells, run directories, resume state), :mod:`~metagate.compare.cell`
(one run and its row), :mod:`~metagate.compare.backends` (serial, ``--jobs``, Ray),
:mod:`~metagate.compare.stats` and :mod:`~metagate.compare.summary` (mean ± std, paired intervals, cost),
:mod:`~metagate.compare.outputs` (JSON, CSV, markdown), :mod:`~metagate.compare.figures` (PNG).
"""

from __future__ import annotations

import argparse

DEFAULT_GATES = ["ce", "fixed", "hard"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``metagate compare``'s options: the data and training of ``distill``, the compare's own, and every gate's
    options (each applies to the compared gates that take it; a spec's own options win)."""
    from metagate.cli_args import add_data_arguments, add_gate_arguments, add_train_arguments

    add_data_arguments(p)
    add_train_arguments(p)
    g = p.add_argument_group("compare")
    g.add_argument("--gates", nargs="+", default=DEFAULT_GATES,
                   help="gate specs NAME or NAME:option=value,... (e.g. meta:meta_param=net); each is one row, "
                        "its options over the flags below")
    g.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                   help="seeds; each is a training seed and its own data draw (split, noise, teachers)")
    g.add_argument("--same-data", action="store_true",
                   help="every seed reuses the --data-seed draw (split, noise, teachers): seeds then vary only "
                        "the training (one teacher set to train instead of one per seed)")
    g.add_argument("--out", "--logdir", dest="out", default="runs/compare",
                   help="output directory: results.{json,csv,md}, figures, runs/<gate>/seed<N>; new, empty or a "
                        "compare output (marked .metagate-compare), locked while the compare runs")
    g.add_argument("--jobs", type=int, default=1, help="cells run at once (worker processes, or Ray trials)")
    g.add_argument("--threads", type=int, default=0, help="torch threads per cell (0: CPU cores // --jobs)")
    g.add_argument("--backend", choices=["local", "ray"], default="local",
                   help="local: this process (--jobs 1) or worker processes; ray: Ray Tune trials")
    g.add_argument("--ray-address", default=None,
                   help="ray: 'auto' or HOST:PORT of a running cluster (default: start a local instance)")
    g.add_argument("--interval", choices=["t", "bootstrap"], default="t",
                   help="paired 95%% interval shown in the tables (the JSON holds both)")
    g.add_argument("--bootstrap-samples", type=int, default=10_000, help="bootstrap resamples of the seeds")
    g.add_argument("--overwrite", action="store_true", help="rerun every cell instead of resuming: the new output replaces the old one (a compare "
                                             "output only) when it is complete")
    g.add_argument("--config", default=None, help="YAML file of options (parsed as data; flags win)")
    add_gate_arguments(p)


def compare(args: argparse.Namespace) -> dict:
    """Run the grid (resuming finished and partial cells), write every output, print the tables."""
    from metagate.compare.main import run_compare

    return run_compare(args)


__all__ = ["add_arguments", "compare"]
