"""The grid of a compare: one cell per gate spec x seed, its run directory and whether it is finished.

Within a seed every cell shares one data draw (split, noise) and one set of cached teachers: the seed
is also the cell's ``data_seed``, so another seed is another draw of the data, not only another init
(``--same-data`` keeps one draw, ``--data-seed``, for every seed).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from metagate.compare.specs import GateSpec
from metagate.errors import ConfigError
from metagate.run import DistillConfig, upgrade_saved_config
from metagate.teachers.cache import default_cache_dir

#: config fields that may differ between a run and its resumption (they do not change the result)
VOLATILE = ("resume", "overwrite", "rebuild_cache", "retrain_teachers", "logdir")
VOLATILE_TRAIN = ("progress",)


@dataclass
class Cell:
    """One run of the grid.

    :param spec: the gate spec (the row)
    :param seed: training seed (and data seed unless ``--same-data``)
    :param config: the run's full configuration
    :param threads: torch intra-op threads while the cell runs
    """

    spec: GateSpec
    seed: int
    config: DistillConfig
    threads: int

    @property
    def run_dir(self) -> Path:
        return Path(self.config.logdir or "")

    def payload(self) -> dict[str, Any]:
        """Plain data for a worker process or a Ray trial (picklable, JSON-able)."""
        return {"label": self.spec.label, "gate": self.spec.gate, "options": dict(self.spec.options),
                "seed": self.seed, "config": asdict(self.config), "threads": self.threads}


def cell_config(args: argparse.Namespace, spec: GateSpec, seed: int, run_dir: Path) -> DistillConfig:
    """The full configuration of one cell: the compare's flags, the spec's options on top."""
    from metagate.cli_args import config_from_args

    cfg = config_from_args(args, gate=spec.gate, seed=seed, logdir=str(run_dir.resolve()), strict=False)
    same_data = getattr(args, "same_data", False)
    if cfg.teacher_file and len(getattr(args, "seeds", ()) or ()) > 1 and not same_data:
        raise ConfigError(f"--teacher-file with --seeds {' '.join(map(str, args.seeds))}: each seed is its own data "
                          "draw (--data-seed), but a teacher file's rows are the training units of one draw. Compare "
                          "one seed per file (--seeds S, the file made for --data-seed S), add --same-data (every "
                          "seed trains on the --data-seed draw), or use metagate.compare_gates with unit ids")
    train = replace(cfg.train, progress=False)  # one bar over the grid instead
    data_seed = cfg.data_seed if same_data else seed
    return replace(cfg, data_seed=data_seed, gate_options={**cfg.gate_options, **spec.options}, train=train,
                   cache_dir=str(Path(cfg.cache_dir or default_cache_dir()).resolve()),  # workers may run elsewhere
                   resume=False, overwrite=False)  # replace() validates the merged options again


def build_grid(args: argparse.Namespace, specs: list[GateSpec], out: Path, threads: int) -> list[Cell]:
    """Every spec x seed, specs outermost (the order of every output)."""
    return [Cell(s, seed, cell_config(args, s, seed, out / "runs" / s.slug / f"seed{seed}"), threads)
            for s in specs for seed in args.seeds]


def comparable(cfg: dict[str, Any]) -> dict[str, Any]:
    """A config dict without the fields that may change between a run and its resumption."""
    out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items() if k not in VOLATILE}  # as JSON
    out["train"] = {k: v for k, v in cfg["train"].items() if k not in VOLATILE_TRAIN}
    return out


def _defaults(cls: type) -> dict[str, Any]:
    return {f.name: f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
            for f in fields(cls) if f.default is not MISSING or f.default_factory is not MISSING}


def with_new_defaults(saved: dict[str, Any], current: DistillConfig) -> dict[str, Any]:
    """A saved config with the options metagate gained since it was written filled in, where the current run
    leaves them at their defaults (a run made before ``--precision`` existed is an fp32 run)."""
    now = asdict(current)
    out = upgrade_saved_config(saved)  # task options saved flat before they moved into task_options
    for k, v in _defaults(DistillConfig).items():
        if k not in out and k in now and now[k] == v:
            out[k] = now[k]
    if isinstance(out.get("train"), dict):
        train = dict(out["train"])
        for k, v in _defaults(type(current.train)).items():
            if k not in train and now["train"].get(k) == v:
                train[k] = now["train"][k]
        out["train"] = train
    return out


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def cell_state(cell: Cell) -> str:
    """``done`` (its ``metrics.json`` holds the compare row), ``partial`` (a checkpoint to continue) or ``new``.

    :raises ConfigError: the run directory holds a run made with other options
    """
    d = cell.run_dir
    saved = read_json(d / "cell.json")
    if saved is not None:
        saved = {**saved, "config": with_new_defaults(saved["config"], cell.config)}
    if saved is not None and comparable(saved["config"]) != comparable(asdict(cell.config)):
        a, b = comparable(saved["config"]), comparable(asdict(cell.config))
        diff = sorted({k for k in a.keys() | b.keys() if a.get(k) != b.get(k)})
        raise ConfigError(f"{d} holds a run of {cell.spec.label!r} seed {cell.seed} made with other options "
                          f"(differ: {', '.join(diff)}); use another --out or pass --overwrite")
    metrics = read_json(d / "metrics.json")
    if metrics is not None and "compare" in metrics:
        return "done"
    if (d / "checkpoint.pt").exists():
        return "partial"
    return "new"
