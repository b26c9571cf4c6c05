"""Run one grid cell (in the parent, a worker process or a Ray trial) and return its row.

A cell never trains a teacher: the parent trains and caches them before any cell starts
(:func:`prepare_teachers`), and a cell whose teacher files are missing fails instead of training its own
copy (two workers would otherwise train the same teacher at once).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from metagate.data.task import Task
from metagate.errors import CheckpointError
from metagate.io import atomic_write_text, safe_load
from metagate.metrics import confidence_bins
from metagate.run import DistillConfig, load_task, run_distill, task_key
from metagate.rundir import mark_run_dir
from metagate.teachers.banks import bank_members, member_file
from metagate.teachers.build import load_teachers
from metagate.teachers.cache import logits_file, teacher_file, token_logits_file
from metagate.teachers.sparse_seq import sparse_bank_file
from metagate.units import PAD_ID, is_sequence, train_unit_mask

#: bins of the saved weight histograms (weights and KD shares lie in [0, 1])
WEIGHT_BINS = 20


@functools.lru_cache(maxsize=8)
def _task(key: tuple[tuple[str, Any], ...]) -> Task:
    return load_task(DistillConfig(**{k: dict(v) if k == "task_options" else v for k, v in key}))


def task_of(cfg: DistillConfig) -> Task:
    """The cell's task, loaded once per process and data draw (keyed by every option that shapes the data)."""
    return _task(task_key(cfg))


def _hash(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def teacher_files(cfg: DistillConfig, task: Task) -> list[Path]:
    """The cache files a run of ``cfg`` reads its teachers from."""
    root = Path(cfg.cache_dir or "") / task.key
    if cfg.teacher_bank != "default" and cfg.teachers:  # a named bank (metagate.teachers.banks), seed 0
        logit_names = [m.name for m in bank_members(task, cfg.teacher_bank, cfg.teachers)]
        files = [root / member_file(cfg.teacher_bank, n) for n in logit_names]
    else:
        n_real = cfg.teachers - 1 if cfg.adversarial_teacher else cfg.teachers
        names = [s.name for s in task.teacher_specs[:n_real]]
        files = [root / teacher_file(n) for n in names]
        logit_names = names + ([f"adv-{names[0]}"] if cfg.adversarial_teacher and names else [])
    if is_sequence(task) and cfg.topk is not None and task.info.get("sparse_bank"):  # one sparse top-k bank
        pretrained = [n for n, _ in task.info.get("pretrained_teachers", ())]
        return files + [root / sparse_bank_file([*logit_names, *pretrained], cfg.topk)]
    if is_sequence(task):  # per-token logits, full or top-k
        return files + [root / token_logits_file(n, cfg.topk) for n in logit_names]
    return files + [root / logits_file(n) for n in logit_names]


def prepare_teachers(cfg: DistillConfig, progress: bool = True) -> list[dict[str, Any]]:
    """Train (once) and cache the teachers of ``cfg``'s data draw and their logits; return their stats."""
    task = task_of(cfg)
    _, stats = load_teachers(cfg, task, progress=progress, verbose=progress)
    return [dict(s) for s in stats]


def _weight_histograms(unit_weights: torch.Tensor, corrupted: torch.Tensor, names: list[str]) -> dict[str, Any]:
    """Histograms of the weights last used for each training unit: label weight and teacher share on
    corrupted vs clean units, and each teacher's share of its unit's KD weight (by teacher name)."""
    from metagate.diagnostics import kd_shares, teacher_share

    w = unit_weights.double()
    edges = torch.linspace(0, 1, WEIGHT_BINS + 1, dtype=torch.float64)

    def hist(v: torch.Tensor) -> list[int]:
        idx = torch.bucketize(v.clamp(0, 1), edges[1:-1], right=False)
        return torch.bincount(idx, minlength=WEIGHT_BINS).tolist()

    c = corrupted.bool()
    share = teacher_share(w)
    out: dict[str, Any] = {"edges": edges.tolist(), "label_corrupted": hist(w[c, 0]), "label_clean": hist(w[~c, 0]),
                           "share_corrupted": hist(share[c]), "share_clean": hist(share[~c])}
    kd = kd_shares(w)[w[:, 1:].sum(1) > 0]  # units trained on their label alone have no KD share
    out["kd_share"] = {n: hist(kd[:, j]) for j, n in enumerate(names)}
    return out


def artefacts(student: torch.nn.Module, unit_weights: torch.Tensor, step: int, task: Task,
              teacher_names: list[str]) -> dict[str, Any]:
    """Reliability bins of the final ``student`` on test and the histograms of the last ``unit_weights``."""
    student.eval()
    # per unit only the top-label confidence and correctness, a batch at a time (an LM's [tokens, V] would not fit)
    step_n = 2048 if task.num_classes <= 4096 else 8
    conf, correct = [], []
    with torch.no_grad():
        for i in range(0, len(task.test), step_n):
            lg, y = student(task.test.x[i : i + step_n]), task.test.y[i : i + step_n]
            if is_sequence(task):  # token units (teacher forcing on test): the real tokens only
                keep = y != PAD_ID
                lg, y = lg[keep], y[keep]
            c, pred = torch.softmax(lg.double(), -1).max(-1)
            conf.append(c)
            correct.append(pred == y)
    corrupted, uw = task.corrupted, unit_weights.detach().cpu()
    if is_sequence(task):
        real = train_unit_mask(task)
        uw, corrupted = uw[real], corrupted.reshape(-1)[real]
    b = confidence_bins(torch.cat(conf), torch.cat(correct))
    out: dict[str, Any] = {"calibration": {k: b[k].tolist() for k in ("count", "confidence", "accuracy")}}
    if uw.shape[1] > 1 and step > 0:
        out["weights"] = _weight_histograms(uw, corrupted, teacher_names)
    return out


def _artefacts(cfg: DistillConfig, task: Task, teacher_names: list[str]) -> dict[str, Any]:
    """:func:`artefacts` of a command-line run, from its final checkpoint."""
    state = safe_load(cfg.run_dir / "checkpoint.pt")
    student = task.make_student(cfg.student)
    student.load_state_dict(state["student"])
    return artefacts(student, state["unit_weights"], int(state["step"]), task, teacher_names)


#: one run of a cell: ``(config, payload) -> row`` (the command line's :func:`run_one`, or the Python API's)
RunOne = Callable[[DistillConfig, dict[str, Any]], dict[str, Any]]


def run_cell(payload: dict[str, Any], context: Any = None) -> dict[str, Any]:
    """Run (or continue) one cell from its :meth:`~metagate.compare.grid.Cell.payload`; return its row.

    The row -- metrics, timing, fingerprints of the data draw and teachers, the full config, figure data --
    is also written into the run's ``metrics.json`` under ``"compare"``: the mark of a finished cell. A gate
    tuned on ``select`` (``fixed-tuned``) runs its grid first (:func:`run_tuned`).

    :param context: ``None``: a command-line cell (a built-in task, :func:`run_one`); else the Python API's
        :class:`~metagate.compare.user.UserRuns` (the user's prepared data, teachers and student)
    """
    from metagate.gates import get_gate_class

    cfg = DistillConfig(**{**payload["config"], "train": dict(payload["config"]["train"])})
    one: RunOne = run_one if context is None else context.run_one
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(payload["threads"])))
    try:
        if getattr(get_gate_class(cfg.gate), "tuned_on_select", False):
            return run_tuned(cfg, payload, one)
        return one(cfg, payload)
    finally:
        torch.set_num_threads(threads)


def run_tuned(cfg: DistillConfig, payload: dict[str, Any], one: RunOne) -> dict[str, Any]:
    """Every grid point of a ``fixed-tuned`` cell as a ``fixed`` run in ``<out>/tuning/<spec>/seed<k>/`` (each
    resumable on its own; outside ``<out>/runs``, so TensorBoard's compare charts show the compared rows, not
    every grid point), the one with the best ``select`` accuracy (ties: lower ``select`` NLL) is the cell's row,
    its TensorBoard events copied into the cell; the grid, each point's select scores and the choice are written
    into the row under ``"tuning"``."""
    from dataclasses import replace

    gcfg = cfg.gate_config()
    points = gcfg.grid(cfg.train.lr)  # type: ignore[attr-defined]
    scored = []
    t0 = time.perf_counter()
    grid_dir = cfg.run_dir.parents[2] / "tuning" / cfg.run_dir.parent.name / cfg.run_dir.name  # out/runs/spec/seedK
    for p in points:
        name = f"alpha{p['alpha']:g}-tau{p['tau']:g}-lr{p['lr']:g}"
        sub = replace(cfg, gate="fixed", gate_options={"alpha": p["alpha"], "tau": p["tau"]},
                      train=replace(cfg.train, lr=p["lr"]), logdir=str(grid_dir / name))
        done = read_metrics_row(sub.run_dir)
        row = done if done is not None else one(sub, {**payload, "label": f"{payload['label']}/{name}",
                                                          "gate": "fixed", "config": asdict(sub)})
        scored.append((row["metrics"]["select/acc"], -row["metrics"]["select/nll"], len(scored), p, row))
    best = max(scored, key=lambda t: t[:3])
    chosen = grid_dir / f"alpha{best[3]['alpha']:g}-tau{best[3]['tau']:g}-lr{best[3]['lr']:g}"
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    for old in cfg.run_dir.glob("events.out.tfevents.*"):  # an earlier choice's copy (this cell's own files)
        old.unlink()
    for ev in chosen.glob("events.out.tfevents.*"):
        shutil.copy2(ev, cfg.run_dir / ev.name)
    row = dict(best[4])
    row.update(label=payload["label"], gate=payload["gate"], options=payload["options"], config=payload["config"])
    row["tuning"] = {"criterion": "select/acc, ties: lower select/nll", "chosen": best[3],
                     "grid": [{**p, "select/acc": a, "select/nll": -nll} for a, nll, _, p, _ in scored],
                     "seconds": time.perf_counter() - t0}
    atomic_write_text(cfg.run_dir / "metrics.json", json.dumps({**row["metrics"], "compare": row}, indent=2))
    return row


def read_metrics_row(run_dir: Path) -> dict[str, Any] | None:
    """The row of a finished run, or ``None``."""
    try:
        blob = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return blob.get("compare") if isinstance(blob, dict) else None


def start_cell(run_dir: Path, payload: dict[str, Any], resumable: bool = True) -> int:
    """Make ``run_dir`` ready for a cell's run: the epoch its checkpoint continues from (0: a new run; a
    directory without a checkpoint, or one that cannot be ``resumable``, holds nothing to keep: the cell's run
    directories lie inside the locked compare output), marked and holding the cell record ``cell.json``."""
    ckpt = run_dir / "checkpoint.pt"
    start_epoch = 0
    if ckpt.exists() and resumable:
        start_epoch = int(safe_load(ckpt).get("epoch", 0))
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
    mark_run_dir(run_dir)  # the cell record goes in first: run_distill accepts marked directories only
    atomic_write_text(run_dir / "cell.json", json.dumps(payload, indent=2))
    return start_epoch


class EpochTimer:
    """The ``on_epoch_end`` hook that times a cell's run: wall time, epochs trained and the time per epoch
    between epoch ends (training, evaluation, checkpoint: no set-up, no first-epoch warm-up; one epoch alone
    is timed from the start of the run)."""

    def __init__(self, start_epoch: int = 0) -> None:
        self.start_epoch, self.t0, self.ends = start_epoch, time.perf_counter(), []  # type: list[float]

    def __call__(self, *_: Any) -> None:
        self.ends.append(time.perf_counter())

    def timing(self) -> dict[str, Any]:
        ends, t0, epochs = self.ends, self.t0, len(self.ends)
        per_epoch = ((ends[-1] - ends[0]) / (epochs - 1) if epochs > 1 else
                     (ends[0] - t0) if epochs else float("nan"))
        return {"seconds": time.perf_counter() - t0, "epochs_trained": epochs, "per_epoch": per_epoch,
                "resumed_from_epoch": self.start_epoch}


def bank_fingerprint(bank: Any) -> str:
    """A hash of a bank's cached logits (an online bank's module columns have none: their names; a sparse bank
    has its own fingerprint)."""
    sparse = getattr(bank, "sparse", None)
    if sparse is not None:
        return str(sparse.fingerprint)
    logits = getattr(bank, "logits", None)
    if isinstance(logits, torch.Tensor):
        return _hash(logits)
    return hashlib.sha256(",".join(bank.names).encode()).hexdigest()[:16]


def make_row(cfg: DistillConfig, payload: dict[str, Any], task: Task, result: dict[str, Any],
             teachers: dict[str, Any], timing: dict[str, Any], figures: dict[str, Any]) -> dict[str, Any]:
    """A cell's row, also written into its ``metrics.json`` under ``"compare"`` (the mark of a finished cell).

    :param result: the run's final metrics (a ``"teachers"`` entry is dropped from the row's metrics)
    :param teachers: ``names``, ``fingerprint`` and ``stats`` of the bank (empty for a gate without teachers)
    :param timing: ``seconds``, ``epochs_trained``, ``per_epoch``, ``resumed_from_epoch``
    :param figures: :func:`artefacts`
    """
    metrics = {k: v for k, v in result.items() if k != "teachers"}
    row: dict[str, Any] = {
        "label": payload["label"], "gate": payload["gate"], "seed": payload["seed"],
        "options": payload["options"], "metrics": metrics,
        "time": {"seconds": timing["seconds"], "epochs_trained": timing["epochs_trained"],
                 "per_epoch": timing["per_epoch"],
                 "steps_per_epoch": math.ceil(len(task.train) / cfg.train.batch_size),
                 "threads": torch.get_num_threads(), "resumed_from_epoch": timing["resumed_from_epoch"]},
        "fingerprints": {"data": task.fingerprint(), "noise": _hash(task.corrupted.to(torch.uint8)),
                         "split": _hash(task.meta.x, task.meta.y, task.select.x, task.select.y),
                         "teachers": teachers["fingerprint"]},
        "teachers": [{**s, "name": n} for s, n in zip(teachers["stats"], teachers["names"])],
        "config": payload["config"],
    }
    row.update(figures)
    atomic_write_text(cfg.run_dir / "metrics.json", json.dumps({**result, "compare": row}, indent=2))
    return row


def run_one(cfg: DistillConfig, payload: dict[str, Any]) -> dict[str, Any]:
    """One distillation run of a command-line cell (continued from its checkpoint when there is one); its row."""
    run_dir = cfg.run_dir
    task = task_of(cfg)
    from metagate.gates import get_gate_class

    teachers: dict[str, Any] = {"names": [], "fingerprint": "", "stats": []}
    if get_gate_class(cfg.gate).uses_teachers:
        missing = [str(p) for p in teacher_files(cfg, task) if not p.exists()]
        if missing:
            raise CheckpointError(f"teacher cache incomplete for {payload['label']} seed {payload['seed']}: "
                                  f"{missing[0]} is missing (the compare trains teachers before any run)")
        bank, stats = load_teachers(cfg, task, progress=False)
        teachers = {"names": bank.names, "fingerprint": bank_fingerprint(bank), "stats": stats}
    start_epoch = start_cell(run_dir, payload)
    cfg.resume = (run_dir / "checkpoint.pt").exists()
    timer = EpochTimer(start_epoch)
    # run_distill builds the gate after seeding: a gate built here would start from whatever random state
    # the cells before it in this process left (a worker's cells differ from the serial order)
    result = run_distill(cfg, task=task, on_epoch_end=timer)
    return make_row(cfg, payload, task, result, teachers, timer.timing(), _artefacts(cfg, task, teachers["names"]))


def finished_row(run_dir: Path) -> dict[str, Any]:
    """The row a finished cell wrote."""
    return json.loads((run_dir / "metrics.json").read_text())["compare"]
