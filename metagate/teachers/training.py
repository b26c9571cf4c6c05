"""Teachers trained by the project through the shared loop (frozen afterwards) and cached.

Their checkpoints are ``teacher-<name>.pt`` in the teacher cache (:mod:`metagate.teachers.cache`, whose writer
rule they follow); their logits for the training units live in the teacher bank (:mod:`metagate.teachers.build`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn
from tqdm.auto import tqdm

from metagate.errors import ConfigError, StaleCacheError
from metagate.gates.fixed import CEGate
from metagate.io import atomic_save, safe_load
from metagate.models import PermutedTeacher
from metagate.teachers.cache import cache_file, cache_lock, check_replaceable, teacher_file
from metagate.trainer import TrainConfig, Trainer, seed_everything

if TYPE_CHECKING:  # pragma: no cover
    from metagate.data.task import Task, TeacherSpec


#: word-level test metrics kept with a sequence teacher's stats
SEQ_STATS = ("per", "wer", "ece", "sent_ece")


def train_teacher(task: Task, spec: TeacherSpec, seed: int = 0, device: str = "auto",
                  progress: bool = True, early_stopping: bool = True) -> tuple[nn.Module, dict[str, float]]:
    """Train one teacher on the (noisy) training split with the shared loop and the ``ce`` gate,
    keeping the epoch with the best accuracy on the clean ``select`` split (early stopping).

    :param early_stopping: ``False``: every epoch runs and the last one is kept (a teacher that fits the noisy
        labels; ``select_acc``/``epoch`` are then the last epoch's)
    """
    seed_everything(seed)
    model = spec.factory()
    cfg = TrainConfig(epochs=spec.epochs, batch_size=spec.batch_size, lr=spec.lr, optimizer="adam",
                      schedule="cosine", weight_decay=0.0, seed=seed, device=device, progress=progress,
                      eval_test_every_epoch=False)
    trainer = Trainer(task, model, CEGate(), None, cfg)
    best: dict[str, Any] = {"acc": -1.0}
    patience = 0
    bar = tqdm(total=cfg.epochs * trainer.steps_per_epoch, desc=f"teacher {spec.name}", unit="step", leave=False,
               disable=True if not progress else None, dynamic_ncols=True)
    while trainer.epoch < cfg.epochs:
        trainer.run_epoch(bar)
        acc = trainer.evaluate("select")["acc"]
        bar.set_postfix(select_acc=f"{acc:.3f}")
        if acc > best["acc"] or not early_stopping:
            best = {"acc": acc, "state": copy.deepcopy(model.state_dict()), "epoch": trainer.epoch}
            patience = 0
        else:
            patience += 1
            if patience >= 3:
                break
    bar.close()
    model.load_state_dict(best["state"])
    test = trainer.evaluate("test")
    stats = {"select_acc": best["acc"], "test_acc": test["acc"], "epoch": best["epoch"]}
    stats.update({f"test_{k}": test[k] for k in SEQ_STATS if k in test})  # sequence tasks: decoded words
    return model.cpu().eval(), stats


def _load_or_train(task: Task, spec: TeacherSpec, i: int, path: Path | None, fp: str, device: str, retrain: bool,
                   progress: bool, verbose: bool) -> tuple[nn.Module, dict[str, Any]]:
    model = spec.factory()
    if path is not None and path.exists() and not retrain:
        blob = safe_load(path, "teacher checkpoint")
        if not isinstance(blob, dict) or blob.get("task_fingerprint") != fp:
            got = blob.get("task_fingerprint") if isinstance(blob, dict) else None
            raise StaleCacheError(f"teacher checkpoint {path} was trained on other data (fingerprint "
                                  f"{got} vs {fp}); delete it or pass --retrain-teachers")
        missing = [k for k in ("state", "select_acc", "test_acc", "epoch") if k not in blob]
        if missing:
            raise StaleCacheError(f"teacher checkpoint {path} lacks {missing}; delete it or pass --retrain-teachers")
        try:
            model.load_state_dict(blob["state"])
        except (RuntimeError, TypeError, AttributeError) as e:
            raise StaleCacheError(f"teacher checkpoint {path} does not fit teacher {spec.name!r} ({e}); delete it "
                                  "or pass --retrain-teachers") from e
        return model, {k: blob[k] for k in ("select_acc", "test_acc", "epoch", *(f"test_{m}" for m in SEQ_STATS))
                       if k in blob}
    if verbose:
        print(f"training teacher {spec.name} on {task.key} ...", flush=True)
    if path is not None:
        check_replaceable(path, "task_fingerprint", "teacher checkpoint")  # before the training it would waste
    model, st = train_teacher(task, spec, seed=1000 + i, device=device, progress=progress)
    if path is not None:
        atomic_save({"state": model.state_dict(), "task_fingerprint": fp, **st}, path)
    return model, st


def teacher_names(task: Task, num_teachers: int, adversarial: bool = False) -> list[str]:
    """The names of the task's first ``num_teachers`` teachers (the planted one last: ``adv-<first>``), known
    before any is trained.

    :raises ConfigError: fewer than one teacher, ``adversarial`` without a real teacher to permute, or more
        teachers than the task defines
    """
    if num_teachers < 1:
        raise ConfigError(f"--teachers must be >= 1 for a gate that uses teachers, got {num_teachers}")
    n_real = num_teachers - 1 if adversarial else num_teachers
    if adversarial and n_real < 1:
        raise ConfigError("--adversarial-teacher needs --teachers >= 2 (one real teacher to permute)")
    specs = task.teacher_specs
    if n_real > len(specs):
        raise ConfigError(f"task {task.name!r} defines {len(specs)} teachers, {n_real} requested")
    names = [spec.name for spec in specs[:n_real]]
    return names + [f"adv-{names[0]}"] if adversarial else names


def load_or_train_teachers(
    task: Task,
    num_teachers: int,
    cache_dir: Path | None = None,
    adversarial: bool = False,
    device: str = "auto",
    retrain: bool = False,
    progress: bool = True,
    verbose: bool = False,
) -> tuple[list[nn.Module], list[str], list[dict[str, float]]]:
    """The task's first ``num_teachers`` teachers (trained once and cached).

    With ``adversarial`` the last teacher is the planted one: the first teacher with its class
    outputs cyclically permuted.

    :return: modules (frozen, eval mode), names, per-teacher stats (select/test accuracy)
    """
    want = teacher_names(task, num_teachers, adversarial)
    n_real = len(want) - adversarial
    fp = task.fingerprint()
    modules, names, stats = [], [], []
    for i, spec in enumerate(task.teacher_specs[:n_real]):
        path = cache_file(cache_dir, task, teacher_file(spec.name))
        # one process trains a teacher; another one waits for it here and then loads it from the cache
        with cache_lock(path):
            model, st = _load_or_train(task, spec, i, path, fp, device, retrain, progress, verbose)
        for p in model.parameters():
            p.requires_grad_(False)
        modules.append(model.eval())
        names.append(spec.name)
        stats.append(st)
    if adversarial:
        adv = PermutedTeacher(modules[0], task.num_classes).eval()
        modules.append(adv)
        names.append(want[-1])
        stats.append({"select_acc": float("nan"), "test_acc": float("nan"), "epoch": stats[0]["epoch"]})
    return modules, names, stats
