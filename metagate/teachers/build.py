"""The one bank builder: any mix of teachers -> the bank the trainer reads (and one stats dict per teacher).

:func:`build_bank` is the only place a teacher bank is built from teachers. The command line, the gymnasium
environments and the compare reach it through :func:`load_teachers` (a run's options: the task's teachers trained
by the project, the planted adversarial one, ``--teacher-file`` files); the Python API calls it with the user's
teachers (:mod:`metagate.teachers.sources`). It picks the bank's kind from the task and the teachers: per-token
(:class:`~metagate.teachers.sequence.SeqTeacherBank`) for a sequence task -- or, for a task that asks for it
with ``info["sparse_bank"]`` (lm) and ``--topk``, one sparse top-k bank
(:class:`~metagate.teachers.sparse_seq.SeqSparseBank`) --, online
(:class:`~metagate.teachers.online.OnlineBank`) when a teacher runs in the step, else cached ``[N, K, C]``
(:class:`~metagate.teachers.bank.TeacherBank`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from metagate.calibration import calibrate_teachers, split_logits
from metagate.checks import check_topk
from metagate.data.task import Task, TeacherSpec
from metagate.errors import ConfigError, InputError
from metagate.features import teacher_reliability
from metagate.io import ensure_dir
from metagate.teachers.bank import TeacherBank, teacher_logits
from metagate.teachers.banks import bank_members, load_or_train_bank
from metagate.teachers.cache import cache_file, cache_lock, cached_logits, cached_token_logits, default_cache_dir
from metagate.teachers.calibration_cache import (
    Fit,
    bank_identity,
    cached_fit,
    calibration_file,
    calibration_fingerprint,
    teacher_identities,
)
from metagate.teachers.files import TeacherArrays, read_teacher_file, teacher_arrays, teacher_table, token_table
from metagate.teachers.online import OnlineBank
from metagate.teachers.pretrained import pretrained_stats
from metagate.teachers.sequence import SeqTeacherBank, token_index
from metagate.teachers.sources import OnlineTeacher, TeacherLike, freeze
from metagate.teachers.sparse_seq import SeqSparseBank, sparse_bank_file, sparse_seq_bank
from metagate.teachers.training import load_or_train_teachers, teacher_names
from metagate.trainer import resolve_device
from metagate.units import PAD_ID, is_sequence


class _Device(Protocol):
    device: str


class TeacherOptions(Protocol):
    """What :func:`load_teachers` reads of a run's options (a ``metagate.run.DistillConfig`` has them all; the
    package names no config class, so nothing here imports the run)."""

    teachers: int
    teacher_bank: str
    teacher_file: tuple[str, ...]
    adversarial_teacher: bool
    cache_dir: str | None
    rebuild_cache: bool
    retrain_teachers: bool
    train: _Device

    @property
    def topk(self) -> int | None: ...


def check_topk_option(task: Task, topk: int | None) -> None:
    """``--topk`` fits the task: a sequence task's ``1 <= k < V`` (checked before any teacher is trained).

    :raises ConfigError: top-k on a task with one unit per example, or ``k`` outside ``[1, V)``
    """
    if topk is None:
        return
    if not is_sequence(task):
        raise ConfigError(f"--topk is for sequence tasks (g2p); task {task.name!r} has one unit per example")
    check_topk(topk, task.num_classes)


def build_bank(
    task: Task,
    teachers: Sequence[tuple[str, TeacherLike]],
    *,
    unit_ids: Tensor | None = None,
    known_ids: Tensor | None = None,
    cache_dir: Path | None = None,
    device: torch.device | str = "cpu",
    rebuild: bool = False,
    topk: int | None = None,
    progress: bool = False,
    measure: bool = True,
    what: str = "the task",
) -> tuple[TeacherBank, list[dict[str, Any]]]:
    """The bank of ``teachers``' logits for the training units, in the given order.

    A :class:`~metagate.data.task.TeacherSpec` is trained by the project (once, cached); an ``nn.Module`` is
    frozen and its logits cached by fingerprint (:mod:`metagate.teachers.cache`); ``online(module)`` runs in the
    step; a file path or an ``[N, C]`` tensor is read and checked against the data (``[N, T, V]`` per token for
    a sequence task).

    :param teachers: ``(name, teacher)`` pairs (:func:`~metagate.teachers.sources.named_teachers`)
    :param unit_ids: the training units' ids as files key them (default ``0..N_train-1``)
    :param known_ids: ids of the data's other units (file rows for them are ignored)
    :param cache_dir: where module logits (and project-trained teachers) are cached; ``None``: no cache
    :param rebuild: recompute cached logits
    :param topk: sequence tasks: cache token logits in the top-``k`` form
    :param measure: give module teachers' test accuracy (``test_acc``) in their stats (one unit per example)
    :param what: who fixes the class count, for a file's error
    :return: the bank and one stats dict per teacher (``name``, ``kind``: trained | module | online | file |
        tensor, and ``test_acc`` where measured)
    """
    if not teachers:
        raise ConfigError("no teachers to build a teacher bank from")
    check_topk_option(task, topk)  # k >= V refused before any teacher runs
    seq = is_sequence(task)
    n, c = len(task.train), task.num_classes
    ids = torch.arange(n) if unit_ids is None else unit_ids
    mask = task.train.y != PAD_ID if seq else None
    fp = task.fingerprint()  # hashing the data is the costly part: once for every teacher
    specs = [t for _, t in teachers if isinstance(t, TeacherSpec)]
    trained: list[nn.Module] = []
    if specs:
        task.teacher_specs = specs
        trained, _, _ = load_or_train_teachers(task, len(specs), cache_dir, device=str(device), progress=progress)
    if seq and topk is not None and task.info.get("sparse_bank"):
        return _sparse_bank(task, teachers, trained, cache_dir, rebuild, topk)
    columns: list[Tensor | nn.Module] = []
    stats: list[dict[str, Any]] = []
    for name, t in teachers:
        module: nn.Module | None = None
        if isinstance(t, OnlineTeacher):
            if seq:
                raise ConfigError(f"teacher {name!r} is online, but online teachers are for tasks with one unit per "
                                  f"example; task {task.name!r} has token units")
            module, kind = freeze(t.module).to(device), "online"
            columns.append(module)
        else:
            if isinstance(t, TeacherSpec):
                module, kind = trained.pop(0), "trained"
            elif isinstance(t, nn.Module):
                module, kind = freeze(t), "module"
            if module is not None:
                if seq:
                    logits = cached_token_logits(module, name, task, cache_dir, device, rebuild, topk, fp)
                else:
                    logits = cached_logits(module, name, task, cache_dir, device, rebuild, fp)
                    if logits.shape[-1] != c:
                        raise InputError(f"teacher {name!r} outputs {logits.shape[-1]} classes but the task has {c}")
            else:
                if isinstance(t, (str, os.PathLike)):
                    arrays, kind = read_teacher_file(t), "file"
                else:
                    arrays, kind = teacher_arrays({"logits": t}, f"teacher tensor {name!r}"), "tensor"
                logits = _table(arrays, ids, mask, c, known_ids, what)
            columns.append(logits if seq else logits.float())
        st: dict[str, Any] = {"name": name, "kind": kind}
        if measure and module is not None and not seq:
            st["test_acc"] = teacher_test_acc(module, task, device)
        stats.append(st)
    names = [nm for nm, _ in teachers]
    if seq:
        assert mask is not None
        stacked = torch.stack([lg.to(torch.float16) for lg in columns], 1)  # type: ignore[union-attr]
        return SeqTeacherBank(stacked, token_index(mask), names), stats  # float16 in memory too
    if any(isinstance(col, nn.Module) for col in columns):
        return OnlineBank(columns, names, task.train.x, c), stats
    return TeacherBank(torch.stack(columns, 1), names), stats  # type: ignore[arg-type]


def _sparse_bank(task: Task, teachers: Sequence[tuple[str, TeacherLike]], trained: list[nn.Module],
                 cache_dir: Path | None, rebuild: bool, topk: int) -> tuple[TeacherBank, list[dict[str, Any]]]:
    """A language-modelling task's teachers as one sparse top-``topk`` bank of the training inputs (no
    ``[tokens, V]`` table; :mod:`metagate.teachers.sparse_seq`), cached under the task's key."""
    modules, stats = [], []
    for name, t in teachers:
        if isinstance(t, TeacherSpec):
            modules.append(trained.pop(0))
            stats.append({"name": name, "kind": "trained"})
        elif isinstance(t, nn.Module) and not isinstance(t, OnlineTeacher):
            modules.append(freeze(t))
            stats.append({"name": name, "kind": "module"})
        else:
            raise ConfigError(f"teacher {name!r}: task {task.name!r} keeps its teachers' top-{topk} in a sparse bank "
                              "scored from teacher modules; a logits file or an online teacher cannot go in it")
    names = [n for n, _ in teachers]
    path = cache_file(cache_dir, task, sparse_bank_file(names, topk))
    with cache_lock(path):
        if path is not None and rebuild and path.exists():
            path.unlink()  # --rebuild-cache: the cache is metagate's own file
        return sparse_seq_bank(modules, names, task.train.x, topk, path), stats


def _table(arrays: TeacherArrays, ids: Tensor, mask: Tensor | None, c: int, known_ids: Tensor | None,
           what: str) -> Tensor:
    """A file's (or tensor's) rows for the training units: ``[N_train, C]``, or ``[M, V]`` real tokens."""
    if mask is not None:
        return token_table(arrays, ids, mask, c, known_ids)
    return teacher_table(arrays, ids, c, known_ids, what)


def teacher_test_acc(module: nn.Module, task: Task, device: torch.device | str = "cpu") -> float:
    """A teacher's accuracy on the task's test split (one unit per example)."""
    return float((teacher_logits(module, task.test.x, device).argmax(-1) == task.test.y).float().mean())


def load_teachers(cfg: TeacherOptions, task: Task, progress: bool = True,
                  verbose: bool = False) -> tuple[TeacherBank, list[dict[str, Any]]]:
    """A run's teachers (``--teachers`` trained by the project once and cached, the planted adversarial one,
    ``--teacher-file`` files) and their bank; every option is checked before a teacher is trained.

    :return: the bank and one stats dict per teacher (trained: ``select_acc``, ``test_acc``, ``epoch``; the task's
        pretrained: ``kind``, ``select_acc``, ``test_acc``, measured once and cached
        (:mod:`metagate.teachers.pretrained`); file: ``kind``)
    """
    cache = ensure_dir(Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir(), "--cache-dir")
    device = resolve_device(cfg.train.device)
    files = parse_teacher_files(cfg.teacher_file)
    # a task's pretrained teachers (lm --lm-teacher smollm2): modules loaded by the task, after the trained ones
    pretrained: list[tuple[str, Any]] = list(task.info.get("pretrained_teachers", ()))
    if cfg.teachers == 0 and not files and not pretrained:
        raise ConfigError("--teachers 0 leaves no teacher for this gate; give --teachers K >= 1 or --teacher-file")
    named = cfg.teacher_bank != "default" and cfg.teachers > 0
    members = [m.name for m in bank_members(task, cfg.teacher_bank, cfg.teachers)] if named else []
    taken = set(members or (teacher_names(task, cfg.teachers, cfg.adversarial_teacher) if cfg.teachers else []))
    for name, _ in [*pretrained, *files]:
        if name in taken:
            raise ConfigError(f"--teacher-file: two teachers are named {name!r}; name it as NAME=PATH")
        taken.add(name)
    check_topk_option(task, cfg.topk)
    if named:  # a named bank (metagate.teachers.banks); like the task's teachers, one per task, not per run seed
        modules, names, stats = load_or_train_bank(task, cfg.teacher_bank, cfg.teachers, cache, 0, str(device),
                                                   cfg.retrain_teachers, progress, verbose)
    else:
        modules, names, stats = (load_or_train_teachers(task, cfg.teachers, cache, cfg.adversarial_teacher,
                                                        str(device), cfg.retrain_teachers, progress, verbose)
                                 if cfg.teachers else ([], [], []))
    for m, n, st in zip(modules, names, stats):
        if math.isnan(st.get("test_acc", 0.0)):
            st["test_acc"] = teacher_test_acc(m, task, device)
        st["name"] = n  # type: ignore[assignment]
    if pretrained:
        loaded = [(n, load()) for n, load in pretrained]
        modules, names = [*modules, *(m for _, m in loaded)], [*names, *(n for n, _ in loaded)]
        stats = [*stats, *({"name": n, "kind": "pretrained"} for n, _ in loaded)]
    rebuild = cfg.rebuild_cache or cfg.retrain_teachers
    bank, built = build_bank(task, [*zip(names, modules), *files], cache_dir=cache, device=device,
                             rebuild=rebuild, topk=cfg.topk, measure=False, what=f"task {task.name!r}")
    if pretrained:  # measured as the trained teachers are (select_acc, test_acc), once: cached beside the bank
        got = pretrained_stats(task, bank, [m for _, m in loaded], [n for n, _ in loaded], cache, device, rebuild)
        for st in stats[len(stats) - len(loaded):]:
            st.update(got[st["name"]])
    fit_teacher_temperatures(bank, task, modules, device, stats, cache, rebuild)
    return bank, [*stats, *built[len(modules):]]


#: fixed teacher temperatures scored beside tau = 1 and the fitted one (1.5: HKD's fixed temperature)
SCORED_TAUS = (1.5,)


def fit_teacher_temperatures(bank: TeacherBank, task: Task, modules: list[Any], device: Any,
                             stats: list[dict[str, Any]], cache_dir: Path | None = None,
                             rebuild: bool = False) -> None:
    """Temperature scaling of the run's teachers on the clean ``meta`` split: ``bank.calibration`` (a
    :class:`~metagate.calibration.TeacherCalibration`), ``bank.reliability`` and each trained teacher's stats
    (``tau``, ``meta_nll_tau1``, ``meta_ece_tau1``, ``meta_nll_tau1.5``, ..., ``meta_nll``, ``meta_ece`` at
    ``tau``). Teachers from logits files have no logits on ``meta``: they keep ``tau = 1``
    (``bank.calibration.calibrated``) and the ensemble is not refitted.

    :param cache_dir: the fit is read from / written to ``<cache_dir>/<task key>/calibration-<names>.json``
        under the teachers' and the ``meta`` split's fingerprint (:mod:`metagate.teachers.calibration_cache`);
        ``None``: fitted here, not cached
    :param rebuild: refit and replace the cached fit (``--rebuild-cache``)
    :raises StaleCacheError: the cached fit is for other teachers or another ``meta`` split, or is damaged
    """
    k_mod = len(modules)
    fit = partial(_fit_on_meta, bank, task, modules, device)
    if modules and cache_dir is not None:
        teachers, topk = bank_identity(bank, lambda: teacher_identities(modules, bank.num_teachers))
        fp = calibration_fingerprint(bank.names, teachers, task.meta.x, task.meta.y, SCORED_TAUS)
        path = cache_file(cache_dir, task, calibration_file(bank.names, topk))
        cal, reliability = cached_fit(path, fp, fit, rebuild)
    else:  # no module teacher: nothing to fit (every tau is 1)
        cal, reliability = fit()
    bank.calibration = cal
    if reliability is not None:
        bank.reliability = reliability
    for st, n, tau in zip(stats[:k_mod], cal.names, cal.taus):  # a file teacher's stats stay as they were
        st["tau"] = tau
        st.update({f"meta_{key}": v for key, v in cal.stats.get(n, {}).items()})


def _fit_on_meta(bank: TeacherBank, task: Task, modules: list[Any], device: Any) -> Fit:
    """The fit of :func:`fit_teacher_temperatures` (the module teachers' logits on ``meta``), and the
    reliability table when every teacher has logits on ``meta`` and the bank is not a sparse top-k one (else
    ``None``)."""
    k_mod, k = len(modules), bank.num_teachers
    y = task.meta.y
    if is_sequence(task):
        y = y[y != PAD_ID]  # the real tokens, in the order split_logits returns them
    lg = split_logits(modules, task.meta, device)[0] if modules else torch.zeros(len(y), 0, bank.num_classes)
    if k_mod < k:  # file teachers: zero logits stand in (never fitted, never scored)
        lg = torch.cat([lg, torch.zeros(len(y), k - k_mod, lg.shape[-1])], dim=1)
    fitted = [i < k_mod for i in range(k)]
    cal = calibrate_teachers(lg, y, list(bank.names), extra_taus=SCORED_TAUS, calibrated=fitted)
    # every teacher seen on meta: its held-out reliability per prediction (per real token on sequences; a sparse
    # top-k bank serves no full rows to read the features from per batch)
    reliability = teacher_reliability(lg, y) if k_mod == k and not isinstance(bank, SeqSparseBank) else None
    return cal, reliability


def parse_teacher_files(specs: tuple[str, ...]) -> list[tuple[str, Path]]:
    """``NAME=PATH`` or ``PATH`` (named by the file's stem) -> ``(name, path)`` pairs."""
    out = []
    for spec in specs:
        name, eq, path = spec.partition("=")
        if not eq:
            name, path = Path(spec).stem, spec
        if not name or not path:
            raise ConfigError(f"--teacher-file {spec!r}: expected NAME=PATH or PATH")
        out.append((name, Path(path)))
    return out


def calibrated_bank(bank: TeacherBank) -> TeacherBank:
    """A bank of the same teachers with each teacher's logits divided by its fitted ``tau_k`` (read at
    temperature 1, they are the calibrated teachers); the fit travels along as ``.calibration``.

    Sequence banks stored top-k (log-probabilities of the k most likely tokens and the rest's mass) are scaled
    the same way: exact for the kept tokens' ratios, the rest's mass is tempered as one class.
    """
    cal = bank.calibration
    if cal is None:
        raise ConfigError("calibrated teachers need a temperature fit on the meta split (the run's teachers "
                          "get one in run.load_teachers; an online bank has none)")
    if bank.online:
        raise ConfigError("online teachers cannot be calibrated here (their logits are computed per step)")
    out: TeacherBank
    if isinstance(bank, SeqSparseBank):  # no table to divide: the rows are rebuilt at tau * tau_k
        out = SeqSparseBank(bank.sparse, bank.token_index, list(cal.taus))
        out.calibration, out.calibrated = cal, True
        return out
    t = torch.tensor(cal.taus, dtype=torch.float32, device=bank.logits.device).view(1, -1, 1)
    if isinstance(bank, SeqTeacherBank):
        scaled = bank.logits[:-1].float() / t
        if scaled.abs().max() < torch.finfo(bank.logits.dtype).max:  # float16 storage kept unless it would overflow
            scaled = scaled.to(bank.logits.dtype)
        out = SeqTeacherBank(scaled, bank.token_index, bank.names)
    else:
        out = TeacherBank(bank.logits / t, list(bank.names))
    out.calibration = cal
    out.calibrated = True
    out.reliability = bank.reliability  # predictions are unchanged by a temperature
    return out
