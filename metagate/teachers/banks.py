"""Named teacher banks: settings where choosing a teacher per unit can pay off (issue 28), beside the task's default
bank (its first ``K`` teachers, each early-stopped on the clean ``select`` split).

* ``memoriser`` -- teacher 0 (the task's widest teacher architecture of the first ``K``) fits the noisy training
  labels: ``MEMORISER_EPOCHS`` times its usual epochs, no early stopping, the last epoch kept; the other ``K - 1``
  are early-stopped as usual. On a corrupted unit the memoriser repeats the wrong label confidently, the others
  mostly do not: confidence-based rules (``conf-teachers``, CA-MKD) favour the memoriser exactly where it is wrong.
* ``specialist`` -- teacher ``k`` is trained only on the units whose (noisy) label lies in class part ``k``
  (:func:`class_parts`: ``K`` contiguous, near-equal parts) and early-stopped on the ``select`` units of that part:
  good on its own classes, wrong elsewhere.
* ``capacity`` -- teachers of very different capacity on the same data (Yuan et al., AAAI 2021, Table 1: the
  stronger teacher is not always the better one for a small student): teacher 0 is an over-parameterised copy of
  the task's first teacher (:func:`widen`, one rule per architecture: a :class:`metagate.models.CNN` gets
  :data:`CAPACITY_WIDEN` times its channels and twice its hidden width, ``large-cnn64h256`` on digits; a
  :class:`metagate.seq_models.GRUSeq2Seq` gets :data:`CAPACITY_WIDEN_SEQ` times its embedding and GRU width, the
  same layers, direction and dropout, ``large-bigru256`` on g2p) trained to fit (``MEMORISER_EPOCHS`` times the
  usual epochs, no early stopping, the last epoch kept); the middle ``K - 2`` are the task's first teacher
  architectures, early-stopped; the last is the task's default student architecture trained as a teacher,
  early-stopped (a teacher of the student's own size). Tasks whose first teacher is one of those two classes built
  by ``functools.partial`` (digits, fashion, g2p).

Every member is trained from a fixed seed (``2000 + 100 * seed + k``), so a bank is reproducible from its seed; its
checkpoints are cached beside the default teachers' (``teacher-<bank>-<name>-s<seed>.pt``, the task's fingerprint
checked as for the default teachers). Used by :func:`metagate.teachers.build.load_teachers` (``--teacher-bank``).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metagate.data.task import Split, Task, TeacherSpec
from metagate.errors import ConfigError, StaleCacheError
from metagate.io import atomic_save, safe_load
from metagate.models import CNN
from metagate.seq_models import GRUSeq2Seq
from metagate.teachers.cache import cache_file, cache_lock, check_replaceable
from metagate.teachers.training import SEQ_STATS, train_teacher
from metagate.units import PAD_ID, is_sequence

#: the bank names ``--teacher-bank`` accepts
BANKS = ("default", "memoriser", "specialist", "capacity")

#: the memoriser's epochs, as a multiple of its architecture's usual epochs (also the capacity bank's large teacher)
MEMORISER_EPOCHS = 3

#: the capacity bank's large teacher from a first teacher CNN: this many times its channels (and twice its hidden width)
CAPACITY_WIDEN = 4

#: ... from a first teacher GRUSeq2Seq: this many times its embedding and GRU width (2 on g2p: bigru128 -> bigru256,
#: 3.9x the parameters; a wider GRU's 3x epochs would train several times longer)
CAPACITY_WIDEN_SEQ = 2


@dataclass(frozen=True)
class BankMember:
    """One teacher of a named bank.

    :param name: its name in the bank
    :param spec: architecture and optimiser (the task's :class:`~metagate.data.task.TeacherSpec`)
    :param early_stopping: keep the best ``select`` epoch (else the last)
    :param epochs: epochs to train
    :param classes: train (and select) only on units whose label lies in these classes; ``None``: all
    """

    name: str
    spec: TeacherSpec
    early_stopping: bool
    epochs: int
    classes: tuple[int, ...] | None = None


def class_parts(num_classes: int, k: int) -> list[tuple[int, ...]]:
    """``k`` contiguous, near-equal parts of ``0..num_classes-1`` (the first ones one larger)."""
    if not 1 <= k <= num_classes:
        raise ConfigError(f"a specialist bank needs 1 <= K <= {num_classes} classes, got K={k}")
    base, extra = divmod(num_classes, k)
    parts, start = [], 0
    for i in range(k):
        size = base + (i < extra)
        parts.append(tuple(range(start, start + size)))
        start += size
    return parts


def bank_members(task: Task, bank: str, k: int) -> list[BankMember]:
    """The members of the named ``bank`` with ``k`` teachers on ``task``.

    :raises ConfigError: an unknown bank, a sequence task for a bank other than ``capacity``, or a ``k`` the bank
        cannot have
    """
    if bank not in BANKS or bank == "default":
        raise ConfigError(f"unknown named teacher bank {bank!r}; named banks are {', '.join(BANKS[1:])}")
    if is_sequence(task) and bank != "capacity":
        raise ConfigError(f"--teacher-bank {bank} is for tasks with one unit per example; task {task.name!r} has "
                          "token units (its named bank is capacity)")
    specs = task.teacher_specs
    if k < 2:
        raise ConfigError(f"--teacher-bank {bank} needs --teachers >= 2, got {k}")
    if bank == "capacity":  # uses K - 2 of the task's architectures
        return capacity_members(task, k)
    if k > len(specs):
        raise ConfigError(f"task {task.name!r} defines {len(specs)} teacher architectures, --teachers {k} requested")
    if bank == "memoriser":
        widest = max(range(k), key=lambda i: sum(p.numel() for p in specs[i].factory().parameters()))
        others = [i for i in range(k) if i != widest]
        mem = specs[widest]
        return [BankMember(f"mem-{mem.name}", mem, False, MEMORISER_EPOCHS * mem.epochs),
                *(BankMember(f"es-{specs[i].name}", specs[i], True, specs[i].epochs) for i in others)]
    parts = class_parts(task.num_classes, k)
    return [BankMember(f"spec{i}-{specs[i].name}", specs[i], True, specs[i].epochs, part)
            for i, part in enumerate(parts)]


def _widen_cnn(args: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    wide, fc = CAPACITY_WIDEN * args["width"], 2 * args["hidden"]
    return f"cnn{wide}h{fc}", {**args, "width": wide, "hidden": fc}


def _widen_gru(args: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    emb, hidden = CAPACITY_WIDEN_SEQ * args["emb"], CAPACITY_WIDEN_SEQ * args["hidden"]
    layers = f"x{args['layers']}" if args["layers"] > 1 else ""
    return f"{'bi' if args['bidirectional'] else ''}gru{hidden}{layers}", {**args, "emb": emb, "hidden": hidden}


#: the capacity bank's widening rule per architecture (the class a teacher's ``partial`` builds): its keyword
#: arguments -> the large one's name and keyword arguments
WIDEN_RULES: dict[type, Callable[[dict[str, Any]], tuple[str, dict[str, Any]]]] = {
    CNN: _widen_cnn, GRUSeq2Seq: _widen_gru,
}


def _qualname(obj: Any) -> str:
    name = getattr(obj, "__qualname__", None)
    return f"{getattr(obj, '__module__', '?')}.{name}" if name else type(obj).__name__


def widen(task: Task, spec: TeacherSpec) -> TeacherSpec:
    """The over-parameterised copy of ``spec`` (its :data:`WIDEN_RULES` rule; the same optimiser and epochs).

    :raises ConfigError: ``spec`` is not built by ``functools.partial`` of a class with a rule (naming the
        teacher and what builds it)
    """
    f = spec.factory
    cls = f.func if isinstance(f, partial) else None
    rule = WIDEN_RULES.get(cls) if isinstance(cls, type) else None
    who = f"--teacher-bank capacity widens the task's first teacher; task {task.name!r}'s first teacher {spec.name!r}"
    if rule is None:
        known = " or a ".join(_qualname(c) for c in WIDEN_RULES)
        what = f"a partial of {_qualname(cls)}" if isinstance(f, partial) else f"built by {_qualname(f)}"
        raise ConfigError(f"{who} is not a {known} built by functools.partial ({what})")
    try:
        bound = inspect.signature(cls).bind(*f.args, **f.keywords)
    except TypeError as e:
        raise ConfigError(f"{who} has arguments that do not fit {_qualname(cls)} ({e})") from e
    bound.apply_defaults()
    name, args = rule(dict(bound.arguments))
    return dataclasses.replace(spec, name=name, factory=partial(cls, **args))


def capacity_members(task: Task, k: int) -> list[BankMember]:
    """The capacity bank's ``k`` members: a large copy of the first teacher that fits, ``k - 2`` of the task's
    teachers, a student-sized one (see the module's docstring).

    :raises ConfigError: too few teacher architectures, or a first teacher :func:`widen` has no rule for
    """
    specs = task.teacher_specs
    if k - 2 > len(specs):
        raise ConfigError(f"task {task.name!r} defines {len(specs)} teacher architectures; --teacher-bank capacity "
                          f"with --teachers {k} needs {k - 2} of them")
    first = specs[0]
    large = widen(task, first)
    arch = task.default_student
    small = dataclasses.replace(first, name=arch, factory=task.students[arch])
    return [BankMember(f"large-{large.name}", large, False, MEMORISER_EPOCHS * large.epochs),
            *(BankMember(f"mid-{s.name}", s, True, s.epochs) for s in specs[: k - 2]),
            BankMember(f"small-{small.name}", small, True, small.epochs)]


def member_task(task: Task, member: BankMember) -> Task:
    """The task a member trains on: its class part's training and ``select`` units (all of them without a part)."""
    if member.classes is None:
        return task
    part = torch.tensor(member.classes)
    keep = torch.isin(task.train.y, part)
    keep_sel = torch.isin(task.select.y, part)
    return dataclasses.replace(task, train=Split(task.train.x[keep], task.train.y[keep]),
                               select=Split(task.select.x[keep_sel], task.select.y[keep_sel]),
                               corrupted=task.corrupted[keep], clean_train_labels=task.clean_train_labels[keep])


def train_member(task: Task, member: BankMember, seed: int, device: str = "cpu",
                 progress: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Train one member (from ``seed``); its stats add ``train_fit`` (accuracy on its noisy training labels: its
    units, the real tokens under teacher forcing on a sequence task)."""
    sub = member_task(task, member)
    spec = dataclasses.replace(member.spec, epochs=member.epochs)
    model, stats = train_teacher(sub, spec, seed=seed, device=device, progress=progress,
                                 early_stopping=member.early_stopping)
    with torch.no_grad():
        right = model(sub.train.x).argmax(-1) == sub.train.y
    if is_sequence(sub):
        right = right[sub.train.y != PAD_ID]
    stats["train_fit"] = float(right.float().mean())
    return model, stats


def member_file(bank: str, name: str, seed: int = 0) -> str:
    """The cache file name of a named bank's member checkpoint."""
    return f"teacher-{bank}-{name}-s{seed}.pt"


def load_or_train_bank(task: Task, bank: str, k: int, cache_dir: Path | None = None, seed: int = 0,
                       device: str = "cpu", retrain: bool = False, progress: bool = False,
                       verbose: bool = False) -> tuple[list[nn.Module], list[str], list[dict[str, Any]]]:
    """The named bank's ``k`` teachers (trained once per seed and cached), frozen, in eval mode.

    :return: modules, names, per-teacher stats (``select_acc``, ``test_acc``, ``epoch``, ``train_fit``, ``bank``;
        a sequence task's ``test_per`` etc. as the default teachers')
    """
    fp = task.fingerprint()
    modules, names, stats = [], [], []
    for i, member in enumerate(bank_members(task, bank, k)):
        path = cache_file(cache_dir, task, member_file(bank, member.name, seed))
        with cache_lock(path):
            model, st = _load_or_train(task, member, 2000 + 100 * seed + i, path, fp, device, retrain, progress,
                                       verbose)
        for p in model.parameters():
            p.requires_grad_(False)
        modules.append(model.eval())
        names.append(member.name)
        stats.append({**st, "bank": bank})
    return modules, names, stats


_KEYS = ("select_acc", "test_acc", "epoch", "train_fit")


def _load_or_train(task: Task, member: BankMember, seed: int, path: Path | None, fp: str, device: str, retrain: bool,
                   progress: bool, verbose: bool) -> tuple[nn.Module, dict[str, Any]]:
    model = member.spec.factory()
    if path is not None and path.exists() and not retrain:
        blob = safe_load(path, "teacher checkpoint")
        if not isinstance(blob, dict) or blob.get("task_fingerprint") != fp or any(k not in blob for k in _KEYS):
            raise StaleCacheError(f"teacher checkpoint {path} was trained on other data or is incomplete; delete it "
                                  "or pass --retrain-teachers")
        try:
            model.load_state_dict(blob["state"])
        except (RuntimeError, TypeError, AttributeError) as e:
            raise StaleCacheError(f"teacher checkpoint {path} does not fit teacher {member.name!r} ({e}); delete it "
                                  "or pass --retrain-teachers") from e
        return model, {k: blob[k] for k in (*_KEYS, *(f"test_{m}" for m in SEQ_STATS)) if k in blob}
    if verbose:
        print(f"training teacher {member.name} of bank on {task.key} ...", flush=True)
    if path is not None:
        check_replaceable(path, "task_fingerprint", "teacher checkpoint")
    model, st = train_member(task, member, seed, device, progress)
    if path is not None:
        atomic_save({"state": model.state_dict(), "task_fingerprint": fp, **st}, path)
    return model, st
