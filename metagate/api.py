"""Bring your own student, teachers and data: the Python API (``metagate.distill``, ``metagate.compare_gates``).

::

    import metagate
    res = metagate.distill(student, ["forest.npy", pretrained_net], train=(x, y), val=(x_val, y_val),
                           test=(x_test, y_test), gate="meta", train_config={"epochs": 20})
    res.metrics["test/acc"], res.student

Data are ``(x, y)`` (or ``(x, y, ids)``) tensors / numpy arrays, or map-style torch ``Dataset`` s whose
items are ``(x, y)`` or ``(x, y, id)``. Tensors are the in-memory path: the trainer gathers batches from them
by index (the fast default of the built-in tasks). A training **Dataset** is not read into memory: its labels
(and ids) are read once (``dataset.targets`` when it has them), its inputs are read by id when a teacher or a
gate needs them (:class:`~metagate.data.inputs.DatasetInputs`), and the trainer's batches come from a
``DataLoader`` over it (``num_workers=``; its transform runs every epoch). A training dataset that marks its
transform random (``random_transform = True``) takes online teachers only (:func:`metagate.online`): cached
logits of inputs that change every epoch would be wrong. The ``meta``, ``select`` and ``test`` parts are read
into memory once (evaluation data: no augmentation; a random transform there is refused). Floating inputs
become float32, labels int64. Ids default to the position in the split; with explicit ids, the splits share
one id space (teacher files are keyed by it, and overlap between splits is found by it).

The clean ``meta`` (gates may learn on it) and ``select`` (model selection only) parts are given, or split
off ``val`` (stratified halves). A ``meta`` or ``select`` part that overlaps the training units is refused:
it would let gates learn on training data.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, IterableDataset, TensorDataset

from metagate.callbacks import BaseCallback
from metagate.checks import check_finite_inputs
from metagate.data.builtin import register_prepared
from metagate.data.inputs import DatasetInputs, as_tensor, check_item_shapes, scan_dataset
from metagate.data.task import Split, Task, stratified_split
from metagate.driver import drive
from metagate.errors import ConfigError, InputError
from metagate.gates import Gate, GateConfig, get_gate_class
from metagate.loader import LoaderTrainer
from metagate.logger import Logger
from metagate.modes import eval_mode
from metagate.run import build_gate
from metagate.teachers.bank import TeacherBank
from metagate.teachers.build import build_bank
from metagate.teachers.sources import TeacherLike, named_teachers, refuse_cached_with_random, teacher_classes
from metagate.trainer import TrainConfig, Trainer, resolve_device, seed_everything

#: what may stand for a split
DataLike = Union[Dataset, Sequence[Any]]
#: a student, or a zero-argument factory of one (called after seeding: its initialisation follows the seed)
StudentLike = Union[nn.Module, Callable[[], nn.Module]]


@dataclass
class UnitSplit:
    """A materialised split and its unit ids (``explicit``: the user gave them)."""

    split: Split
    ids: Tensor
    explicit: bool


def is_random(data: Any) -> bool:
    """The dataset marks its transform random (``random_transform = True``)."""
    return bool(getattr(data, "random_transform", False))


def as_split(data: DataLike, what: str, lazy: bool = False) -> UnitSplit:
    """``(x, y[, ids])`` arrays or a map-style ``Dataset`` of ``(x, y[, id])`` items as a split: in memory, or with
    ``lazy`` a Dataset's inputs read by id (:class:`~metagate.data.inputs.DatasetInputs`)."""
    if isinstance(data, IterableDataset):
        raise InputError(f"{what}: an IterableDataset cannot be read by unit id; give a map-style Dataset "
                         "(with __getitem__ and __len__) or (x, y) tensors")
    if is_random(data) and not lazy:
        raise InputError(f"{what}: the dataset marks its transform random (random_transform=True); {what} is "
                         "evaluation data, read into memory once, where a random augmentation would be frozen. Give "
                         f"{what} without the augmentation (only the training data may be random)")
    if isinstance(data, Mapping):
        keys = ", ".join(repr(k) for k in list(data)[:4])
        raise InputError(f"{what}: a mapping (keys {keys}) is not a split; give {what}=(x, y) or (x, y, ids) "
                         f"tensors/arrays, e.g. {what}=(d['x'], d['y']), or a map-style torch Dataset")
    if isinstance(data, (str, bytes, Path)):
        raise InputError(f"{what}: expected (x, y) tensors/arrays or a map-style torch Dataset, got the "
                         f"{type(data).__name__} {str(data)[:80]!r} (files are not read as data)")
    if lazy and isinstance(data, Dataset) and hasattr(data, "__getitem__"):
        y, ids = scan_dataset(data, what)
        return _checked(DatasetInputs(data, random=is_random(data), what=what), y, ids, what)
    if isinstance(data, (tuple, list)) and len(data) in (2, 3) and not isinstance(data, Dataset):
        names = ("inputs", "labels", "ids")
        parts = [as_tensor(p, f"{what} {names[j]}") for j, p in enumerate(data)]
    elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        items = [data[i] for i in range(len(data))]
        if not items:
            raise InputError(f"{what} is empty")
        arity = {len(it) if isinstance(it, (tuple, list)) else -1 for it in items}
        if arity - {2, 3} or len(arity) != 1:
            raise InputError(f"{what}: dataset items must all be (x, y) or (x, y, id) tuples, got lengths "
                             f"{sorted(arity)}")
        n_fields = arity.pop()
        inputs = [as_tensor(it[0], f"{what} item {i}'s input") for i, it in enumerate(items)]
        check_item_shapes([tuple(t.shape) for t in inputs], [it[2] for it in items] if n_fields == 3 else None,
                          what)
        parts = [torch.stack(inputs)]
        parts += [as_tensor([_scalar(it[j]) for it in items], f"{what} {('labels', 'ids')[j - 1]}")
                  for j in range(1, n_fields)]
    else:
        raise InputError(f"{what}: expected (x, y) tensors/arrays or a map-style torch Dataset, got "
                         f"{type(data).__name__}")
    x = parts[0].float() if parts[0].is_floating_point() else parts[0]
    return _checked(x, parts[1], parts[2] if len(parts) == 3 else None, what)


def _scalar(v: Any) -> Any:
    """A one-element tensor / array as its Python value (labels and ids of dataset items)."""
    if isinstance(v, Tensor) and v.numel() == 1 or isinstance(v, (np.ndarray, np.generic)) and v.size == 1:
        return v.item()
    return v


def _checked(x: Any, y: Tensor, ids: Tensor | None, what: str) -> UnitSplit:
    """Labels 1-D integers, one per input, ids unique."""
    if y.is_floating_point() or y.dtype == torch.bool or y.ndim != 1:
        if y.is_floating_point() and y.ndim == 1 and torch.equal(y, y.round()):
            y = y.long()  # integral float labels (numpy/pandas habit)
        else:
            raise InputError(f"{what}: labels must be a 1-D integer array of class ids, got {y.dtype} "
                             f"{tuple(y.shape)}")
    if x.shape[0] != y.shape[0]:
        raise InputError(f"{what} has {x.shape[0]} inputs but {y.shape[0]} labels")
    if len(y) == 0:
        raise InputError(f"{what} is empty")
    explicit = ids is not None
    ids = ids.long() if ids is not None else torch.arange(len(y))
    if explicit:
        if ids.shape != y.shape:
            raise InputError(f"{what} has {ids.shape[0]} ids for {y.shape[0]} units")
        srt = ids.sort().values
        dup = srt[1:][srt[1:] == srt[:-1]]
        if dup.numel():
            raise InputError(f"{what}: {dup.numel()} duplicate unit id(s), first {int(dup[0])}; ids must be unique")
    return UnitSplit(Split(x, y.long()), ids, explicit)


def check_label_range(part: UnitSplit, num_classes: int, what: str) -> None:
    """Every label in ``[0, C)``; the error names the first offending unit id."""
    bad = (part.split.y < 0) | (part.split.y >= num_classes)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise InputError(f"{what}: label {int(part.split.y[i])} of unit id {int(part.ids[i])} is outside the class "
                         f"range [0, {num_classes}) ({int(bad.sum())} such unit(s))")


def _row_keys(split: Split, chunk: int = 1024) -> list[bytes]:
    keys, y = [], split.y.numpy()
    for a in range(0, len(split), chunk):  # in chunks: a dataset's inputs are read by id
        xa = split.x[a : a + chunk].cpu()
        x = np.ascontiguousarray(xa.reshape(xa.shape[0], -1).numpy())
        keys += [x[i].tobytes() + y[a + i].tobytes() for i in range(x.shape[0])]
    return keys


def check_disjoint(train: UnitSplit, part: UnitSplit, what: str) -> None:
    """Refuse a clean part that shares units with train: by id when both carry ids, else by identical
    (input, label) rows."""
    if train.explicit and part.explicit:
        shared = part.ids[torch.isin(part.ids, train.ids)]
        if shared.numel():
            raise InputError(f"{what} shares {shared.numel()} unit(s) with train (first id {int(shared[0])}): "
                             "refused, a gate would learn on training data")
        return
    keys = set(_row_keys(train.split))
    hits = [i for i, k in enumerate(_row_keys(part.split)) if k in keys]
    if hits:
        raise InputError(f"{what} has {len(hits)} of its {len(part.split)} units identical to training units "
                         f"(input and label; first: {what} unit {hits[0]}): refused, a gate would learn on "
                         "training data. If these are genuine duplicates, give ids: (x, y, ids)")


def probe_student(student: StudentLike) -> nn.Module:
    """The student, or a probe instance of a factory (made without moving the random state: the real one is
    made after seeding).

    :raises ConfigError: neither an ``nn.Module`` nor a zero-argument callable returning one
    """
    if isinstance(student, nn.Module):
        return student
    if not callable(student):
        raise ConfigError(f"student must be an nn.Module or a zero-argument factory of one, got "
                          f"{type(student).__name__}")
    with torch.random.fork_rng(devices=[]):
        try:
            model = student()
        except TypeError as e:
            raise ConfigError(f"student: calling the factory {getattr(student, '__name__', student)!r} with no "
                              f"arguments failed: {e}") from e
    if not isinstance(model, nn.Module):
        raise ConfigError(f"student: the factory {getattr(student, '__name__', student)!r} returned a "
                          f"{type(model).__name__}, not an nn.Module (give the module, or a function returning one)")
    return model


def _output_size(model: nn.Module, x: Tensor, device: torch.device) -> int:
    with torch.no_grad(), eval_mode(model):
        return int(model.to(device)(x[:2].to(device)).shape[-1])


@dataclass
class Prepared:
    """Data and teachers of a :func:`distill` / :func:`compare_gates` call, built once."""

    task: Task
    bank: TeacherBank | None
    teacher_stats: list[dict[str, Any]]
    has_test: bool
    ids: dict[str, Tensor] = field(default_factory=dict)
    #: the training Dataset the trainer's DataLoader iterates (``None``: the in-memory path) and its workers
    dataset: Dataset | None = None
    num_workers: int = 0


def prepare(
    student: StudentLike,
    teachers: Sequence[TeacherLike] | Mapping[str, TeacherLike] | None,
    train: DataLike,
    *,
    meta: DataLike | None = None,
    select: DataLike | None = None,
    val: DataLike | None = None,
    test: DataLike | None = None,
    num_classes: int | None = None,
    teacher_names: Sequence[str] | None = None,
    corrupted: Tensor | None = None,
    clean_labels: Tensor | None = None,
    name: str = "user",
    cache_dir: str | Path | None = None,
    rebuild_cache: bool = False,
    device: str = "auto",
    val_seed: int = 0,
    num_workers: int | None = None,
) -> Prepared:
    """Read and check the data, build the teacher bank (the first half of :func:`distill`).

    :param num_workers: the training DataLoader's workers (a training Dataset always takes the loader path;
        with tensors, a number given here builds a loader over them too)
    """
    dev = resolve_device(device)
    if num_workers is not None and num_workers < 0:
        raise ConfigError(f"num_workers must be >= 0, got {num_workers}")
    model = probe_student(student)  # before any data work: a wrong student fails fast
    lazy = isinstance(train, Dataset) and not isinstance(train, (tuple, list))
    parts = {"train": as_split(train, "train", lazy=lazy)}
    if meta is None or select is None:
        if val is None:
            raise ConfigError("give meta= and select= (clean validation parts), or val= to split them from")
        if meta is not None or select is not None:
            raise ConfigError("give both meta= and select=, or neither (val= is then halved into them)")
        v = as_split(val, "val")
        if len(v.split) < 2:
            raise InputError(f"val has {len(v.split)} unit(s); meta and select need one each")
        mi, si = stratified_split(v.split.y, 0.5, torch.Generator().manual_seed(val_seed))
        for nm, idx in (("meta", mi), ("select", si)):
            parts[nm] = UnitSplit(Split(v.split.x[idx], v.split.y[idx]), v.ids[idx], v.explicit)
    else:
        if val is not None:
            raise ConfigError("val= is split into meta and select; do not give all three")
        parts["meta"], parts["select"] = as_split(meta, "meta"), as_split(select, "select")
    if test is not None:
        parts["test"] = as_split(test, "test")
    tr = parts["train"]
    for nm, part in parts.items():  # before any teacher or the student reads them: the cause, by unit id
        check_finite_inputs(f"{nm} inputs", part.split.x, part.ids)
    pairs = named_teachers(teachers or [], teacher_names)
    if is_random(train):
        refuse_cached_with_random(pairs)
    # the class count: given, else the teachers', else the student's; everyone must agree
    c_student = _output_size(model, tr.split.x, dev)
    c = num_classes
    for tname, t in pairs:
        ct = teacher_classes(t, tr.split.x, dev)
        if ct is None:
            continue
        if ct != c_student:
            raise InputError(f"the student outputs {c_student} classes but teacher {tname!r} outputs {ct}")
        if c is not None and ct != c:
            raise InputError(f"teacher {tname!r} outputs {ct} classes but num_classes is {c}")
        c = ct
    if c is not None and c_student != c:
        raise InputError(f"the student outputs {c_student} classes but num_classes is {c}")
    c = c_student
    for nm, part in parts.items():
        check_label_range(part, c, nm)
        if nm in ("meta", "select"):
            check_disjoint(tr, part, nm)
    n = len(tr.split)
    if corrupted is not None and tuple(corrupted.shape) != (n,):
        raise InputError(f"corrupted has shape {tuple(corrupted.shape)}, expected [{n}] (one flag per training unit)")
    if clean_labels is not None and tuple(clean_labels.shape) != (n,):
        raise InputError(f"clean_labels has shape {tuple(clean_labels.shape)}, expected [{n}]")
    has_test = "test" in parts
    task = Task(
        name=name, num_classes=c, train=tr.split, meta=parts["meta"].split, select=parts["select"].split,
        test=parts["test"].split if has_test else parts["select"].split,
        corrupted=(torch.zeros(n, dtype=torch.bool) if corrupted is None else corrupted.bool().cpu()),
        clean_train_labels=(tr.split.y.clone() if clean_labels is None else clean_labels.long().cpu()),
        students={}, teacher_specs=[], default_student="user", info={"api": True},
    )
    task = dataclasses.replace(task, name=f"{name}-{task.fingerprint()[:8]}")  # the cache key follows the data
    register_prepared(task)  # configs (a compare's cells) may name it
    bank, stats = None, []
    if pairs:
        known = [p.ids for nm, p in parts.items() if nm != "train" and p.explicit]
        bank, stats = build_bank(task, pairs, unit_ids=tr.ids, known_ids=torch.cat(known) if known else None,
                                 cache_dir=None if cache_dir is None else Path(cache_dir), device=dev,
                                 rebuild=rebuild_cache)
    dataset: Dataset | None = train if lazy else None  # type: ignore[assignment]
    if dataset is None and num_workers is not None:
        dataset = TensorDataset(task.train.x, task.train.y)
    return Prepared(task, bank, stats, has_test, {k: p.ids for k, p in parts.items()}, dataset, num_workers or 0)


@dataclass
class DistillResult:
    """What :func:`distill` returns.

    :param metrics: final metrics (``test/acc``, ``test/nll``, ``test/ece`` ..., ``select/*``, gate diagnostics);
        without a test set only ``select/*``
    :param student: the trained student (eval mode)
    :param teachers: one dict per teacher (``name``, ``kind``: trained | module | file | tensor)
    :param history: one record per epoch
    :param trainer: the :class:`~metagate.trainer.Trainer` (its ``unit_weights``, ``bank`` ...)
    """

    metrics: dict[str, float]
    student: nn.Module
    teachers: list[dict[str, Any]]
    history: list[dict[str, float]]
    trainer: Trainer


def _make_gate(gate: str | Gate, gate_config: GateConfig | Mapping[str, Any] | None) -> Gate:
    if isinstance(gate, Gate):
        if gate_config is not None:
            raise ConfigError("gate_config= is for a gate given by name; this gate is already built")
        return gate
    if isinstance(gate_config, GateConfig):
        return get_gate_class(gate)(gate_config)
    return build_gate(gate, dict(gate_config or {}))


def _train_config(train_config: TrainConfig | Mapping[str, Any] | None) -> TrainConfig:
    if isinstance(train_config, TrainConfig):
        return train_config
    return TrainConfig.from_options(dict(train_config or {}), what="train_config")  # type: ignore[return-value]


def run_prepared(prep: Prepared, student: StudentLike, gate: str | Gate = "meta",
                 gate_config: GateConfig | Mapping[str, Any] | None = None,
                 train_config: TrainConfig | Mapping[str, Any] | None = None,
                 logdir: str | Path | None = None, overwrite: bool = False, resume: bool = False,
                 callbacks: Sequence[BaseCallback] = ()) -> DistillResult:
    """Train a student on prepared data and teachers (the second half of :func:`distill`) through the one run
    driver (:func:`metagate.driver.drive`, as ``metagate distill``): training batches from a ``DataLoader`` over
    ``prep.dataset`` (:class:`~metagate.loader.LoaderTrainer`), else from the in-memory split."""
    cfg = _train_config(train_config)
    if resume and overwrite:
        raise ConfigError("resume=True and overwrite=True exclude each other")
    model: nn.Module | None = None
    gate_name = gate.name if isinstance(gate, Gate) else gate

    def build(work: Path | None) -> Trainer:
        nonlocal model
        seed_everything(cfg.seed)  # a gate built here by name starts from the seed (its policy or net is random)
        g = _make_gate(gate, gate_config)
        if g.uses_teachers and prep.bank is None:
            raise ConfigError(f"gate {g.name!r} needs teachers; pass teachers=[...] (or use gate='ce')")
        model = student if isinstance(student, nn.Module) else student()
        if not isinstance(model, nn.Module):
            raise ConfigError(f"student must be an nn.Module or a factory of one, got {type(model).__name__}")
        identity = {"task": prep.task.key, "gate": g.name, "student": type(model).__name__,
                    "teachers": ",".join(prep.bank.names) if prep.bank else ""}
        args = (prep.task, model, g, prep.bank, cfg, Logger(work), work, identity)
        return Trainer(*args) if prep.dataset is None else LoaderTrainer(*args, dataset=prep.dataset,
                                                                         num_workers=prep.num_workers)

    def shown(metrics: dict[str, float]) -> dict[str, float]:
        return metrics if prep.has_test else {k: v for k, v in metrics.items() if not k.startswith("test/")}

    early = {"task": prep.task.key, "gate": gate_name,
             "teachers": ",".join(prep.bank.names) if prep.bank else ""}
    done = drive(build, cfg, run_dir=logdir, resume=resume, overwrite=overwrite, identity=early,
                 hparams=lambda tr: {"gate": tr.gate.name, **tr.gate.hparams()},
                 summary=lambda m: {**shown(m), "teachers": prep.teacher_stats}, callbacks=callbacks, api=True)
    assert model is not None
    return DistillResult(shown(done.metrics), model.eval(), prep.teacher_stats, done.trainer.history, done.trainer)


def distill(
    student: StudentLike,
    teachers: Sequence[TeacherLike] | Mapping[str, TeacherLike] | None,
    train: DataLike,
    *,
    meta: DataLike | None = None,
    select: DataLike | None = None,
    val: DataLike | None = None,
    test: DataLike | None = None,
    gate: str | Gate = "meta",
    gate_config: GateConfig | Mapping[str, Any] | None = None,
    train_config: TrainConfig | Mapping[str, Any] | None = None,
    callbacks: Sequence[BaseCallback] = (),
    **options: Any,
) -> DistillResult:
    """Distil ``teachers`` into ``student`` on your own data with one gate; return metrics and the student.

    :param student: an ``nn.Module`` (trained in place) or a zero-argument factory (called after seeding).
        Any module works: the meta gate's fast routes know the built-in students, others take its generic
        autograd route. Its output size must match the teachers'.
    :param teachers: a list (or ``{name: teacher}``) of ``nn.Module`` (frozen, eval mode, logits cached by
        fingerprint when ``cache_dir`` is given), logits files (``.npy/.npz/.pt/.safetensors``, full or top-k,
        see :mod:`metagate.teachers.files`), ``[N_train, C]`` tensors (row i = training unit i), or
        :class:`~metagate.data.task.TeacherSpec` (trained here); ``None``/``[]`` for ``gate="ce"``
    :param train: ``(x, y)`` / ``(x, y, ids)`` tensors (in memory) or a map-style Dataset of ``(x, y[, id])``
        items (batches from a DataLoader over it; module docstring)
    :param meta: clean part gates may learn from; :param select: clean part for model selection;
        give both, or ``val`` to split them off (stratified halves)
    :param test: the test set (without it the metrics are ``select/*`` only)
    :param gate: ``ce | fixed | hard | meta | reinforce | ...`` or a built :class:`~metagate.gates.Gate`
    :param gate_config: the gate's config, or a mapping of its options (``{"alpha": 0.3}``)
    :param train_config: :class:`~metagate.trainer.TrainConfig` or a mapping of its fields
    :param options: ``num_classes``, ``teacher_names``, ``corrupted`` / ``clean_labels`` (training units'
        corrupted-label mask and clean labels, for diagnostics only), ``name``, ``cache_dir``,
        ``rebuild_cache``, ``val_seed``, ``num_workers`` (the training DataLoader's workers; given with tensors, a
        loader over them) (see :func:`prepare`); ``logdir`` (TensorBoard events, checkpoints and ``metrics.json``
        in a run directory, as ``metagate distill --logdir``: a new, empty or marked one, locked while running;
        default: nothing written), ``overwrite`` (replace a metagate run there, swapped in only when the new run
        finished), ``resume`` (continue the run there from its checkpoint, to the result of an uninterrupted run)
    :param callbacks: epoch-end callbacks (:class:`metagate.BaseCallback`), called after the run's own
    :raises InputError: student vs teacher output sizes, labels out of range, duplicate ids, bad teacher
        files, ``meta``/``select`` overlapping ``train``
    """
    run_opts: dict[str, Any] = {k: options.pop(k) for k in ("logdir", "overwrite", "resume") if k in options}
    cfg = _train_config(train_config)
    prep = prepare(student, teachers, train, meta=meta, select=select, val=val, test=test, device=cfg.device,
                   **options)
    return run_prepared(prep, student, gate, gate_config, cfg, callbacks=callbacks, **run_opts)


@dataclass
class CompareResult(Mapping):
    """What :func:`compare_gates` returns: a mapping gate label -> per-seed metrics (in seed order), and the
    whole compare.

    :param metrics: spec label (``"fixed"``, ``"fixed:alpha=0.3"``) -> one metrics dict per seed
    :param rows: every cell's row (metrics, timing, fingerprints, config, figure data), as in ``results.json``
    :param summary: means ± std, paired intervals against ``fixed`` and the best baseline, cost
        (:func:`metagate.compare.summary.summarise`)
    :param paths: the files written (``json``, ``csv``, ``md`` and the figures); empty without ``out=``
    :param out: the compare output directory (``None``: a temporary one, removed)
    """

    metrics: dict[str, list[dict[str, float]]]
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    paths: dict[str, Path]
    out: Path | None

    def __getitem__(self, label: str) -> list[dict[str, float]]:
        return self.metrics[label]

    def __iter__(self) -> Iterator[str]:
        return iter(self.metrics)

    def __len__(self) -> int:
        return len(self.metrics)


def compare_gates(
    student: StudentLike,
    teachers: Sequence[TeacherLike] | Mapping[str, TeacherLike] | None,
    train: DataLike,
    gates: Sequence[str] = ("ce", "fixed", "hard", "meta"),
    seeds: Sequence[int] = (0, 1, 2),
    *,
    gate_options: Mapping[str, Mapping[str, Any]] | None = None,
    train_config: TrainConfig | Mapping[str, Any] | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    jobs: int = 1,
    threads: int = 0,
    backend: str = "local",
    ray_address: str | None = None,
    interval: str = "t",
    bootstrap_samples: int = 10_000,
    verbose: bool = True,
    **data: Any,
) -> CompareResult:
    """``metagate compare`` on your own student, teachers and data: the same engine
    (:func:`metagate.compare.engine.run_plan`) -- gate specs, tuned and rule baselines, paired intervals,
    ``results.{json,csv,md}`` and figures, resume, ``jobs`` worker processes or Ray.

    The data and the teacher bank are prepared once (:func:`prepare`); every gate spec x seed is one run of
    :func:`run_prepared` in ``out/runs/<spec>/seed<N>``. A second call with the same arguments reuses the finished
    runs (a run with other options in ``out`` is an error; ``overwrite=True`` replaces the whole output once the
    new one is complete). ``out`` must be new, empty or a compare output; it is locked while the compare runs.

    :param student: a factory (called after seeding each run) or a module (deep-copied: every run starts from
        the same weights). With ``jobs > 1`` it is sent to worker processes: a top-level function or class of an
        importable module (not a lambda or a local function), or a picklable module
    :param gates: gate specs ``NAME`` or ``NAME:option=value,...`` (``fixed:alpha=0.3``, ``fixed-tuned``,
        ``label-filter``, ``best-teacher:best_teacher=NAME``, ``conf-teachers`` ...); each is one row
    :param seeds: training seeds (the data are yours: every seed trains on the same data and teachers)
    :param gate_options: per gate name, options under every spec of that gate (``{"fixed": {"alpha": 0.5}}``)
    :param out: the compare output directory (``None``: a temporary directory, removed after the call)
    :param jobs: cells run at once in worker processes; :param threads: torch threads per cell (0: CPU cores
        // jobs); :param backend: ``local`` or ``ray`` (``ray_address``)
    :param interval: the paired interval shown (``t`` or ``bootstrap``; the JSON holds both)
    :param verbose: print progress and the engine's tables (results with paired intervals, cost)
    :param data: ``meta``, ``select``, ``val``, ``test`` and the other options of :func:`distill`
    :return: a :class:`CompareResult`: ``result["fixed"]`` is the per-seed metrics of spec ``fixed``;
        ``result.summary``, ``result.rows`` and ``result.paths`` the rest
    """
    import tempfile

    # imported when used, as the command line does: the engine's writers load TensorBoard's (about a second)
    from metagate.compare.engine import run_plan
    from metagate.compare.user import user_plan

    base = _train_config(train_config)
    prep = prepare(student, teachers, train, device=base.device, **data)
    with tempfile.TemporaryDirectory(prefix="metagate-compare-") if out is None else contextlib.nullcontext() as tmp:
        where = Path(tmp) / "compare" if out is None else Path(out)
        plan = user_plan(prep, student, run_prepared, gates, seeds, base, where, gate_options, jobs=jobs,
                         threads=threads, backend=backend, ray_address=ray_address, interval=interval,
                         bootstrap_samples=bootstrap_samples, overwrite=overwrite, verbose=verbose)
        res = run_plan(plan)
    metrics: dict[str, list[dict[str, float]]] = {}
    for row in res["rows"]:
        metrics.setdefault(row["label"], []).append(row["metrics"])
    return CompareResult(metrics, res["rows"], res["summary"], res["paths"] if out is not None else {},
                         None if out is None else Path(out))
