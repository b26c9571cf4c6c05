"""``metagate bench``: per-step time of the shared trainer vs a minimal hand-written KD step.

All variants run in one process, interleaved, on the same student architecture (same
initial weights), the same batches and the same cached teacher logits; we report the
median per-step time of each and its ratio to the hand-written step and to the trainer
with the ``fixed`` gate. Teacher logits are random tensors of the real shape: step time
does not depend on their values. On a sequence task (``g2p``) units are tokens: the reference is a
hand-written seq2seq KD step under teacher forcing over the batch's real tokens, on per-token teacher
logits (a :class:`~metagate.teachers.sequence.SeqTeacherBank`), and the default student is ``gru``. ``--gates`` adds learned gates, each given as
``name`` or ``name:option=value,...`` (options as in ``metagate distill --help``, e.g.
``meta:meta_backend=closed-form`` or ``reinforce:rl_episode=5``).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from metagate.data import Batch, Task, get_task
from metagate.errors import ConfigError
from metagate.gates.base import Gate
from metagate.loader import LoaderTrainer
from metagate.report import table
from metagate.teachers.bank import TeacherBank
from metagate.teachers.sequence import SeqTeacherBank, token_index
from metagate.trainer import TrainConfig, Trainer, resolve_device
from metagate.units import PAD_ID


def handwritten_kd_step(student: nn.Module, opt: torch.optim.Optimizer, bank_logits: Tensor,
                        alpha: float, tau: float) -> Callable[[Batch], None]:
    """The reference: plain PyTorch KD (CE + mean over teachers of tau²·KL) with SGD."""

    def step(b: Batch) -> None:
        s = student(b.x)
        t = bank_logits[b.ids]
        log_q = F.log_softmax(s / tau, -1)
        kd = sum(F.kl_div(log_q, F.log_softmax(t[:, k] / tau, -1), reduction="batchmean", log_target=True)
                 for k in range(t.shape[1])) / t.shape[1]
        loss = alpha * F.cross_entropy(s, b.y) + (1 - alpha) * tau**2 * kd
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def handwritten_seq_kd_step(student: nn.Module, opt: torch.optim.Optimizer, bank: SeqTeacherBank,
                            alpha: float, tau: float) -> Callable[[Batch], None]:
    """The sequence reference: plain PyTorch seq2seq KD under teacher forcing, per real (unpadded) target token:
    CE + mean over teachers of tau²·KL, each averaged over the batch's real tokens, with SGD."""

    def step(b: Batch) -> None:
        s = student(b.x)  # [B, T, V]
        v = s.shape[-1]
        mask = (b.y != PAD_ID).reshape(-1)
        s = s.reshape(-1, v)[mask]
        t = bank.lookup(b.ids)[mask]  # [tokens, K, V]
        log_q = F.log_softmax(s / tau, -1)
        kd = sum(F.kl_div(log_q, F.log_softmax(t[:, k] / tau, -1), reduction="batchmean", log_target=True)
                 for k in range(t.shape[1])) / t.shape[1]
        loss = alpha * F.cross_entropy(s, b.y.reshape(-1)[mask]) + (1 - alpha) * tau**2 * kd
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def time_steps(step: Callable[[Batch], None], batches: list[Batch], device: torch.device) -> float:
    """Mean seconds per step over ``batches``."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for b in batches:
        step(b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / len(batches)


def interleaved_medians(runs: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Median of each timing run over ``repeats`` interleaved rounds, the order rotated each round (a run right
    after a heavy one starts with colder caches; so none is always first or last).

    :param runs: name -> a callable that times one round and returns its seconds per step
    """
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(runs[name]())
    return {name: statistics.median(ts) for name, ts in times.items()}


def parse_gate_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"meta:meta_backend=closed-form,meta_val_batch=64"`` -> ``("meta", {...})`` (values read as YAML
    scalars: data, never code). A text-only option of the gate keeps its text as written, so a one-value
    grid ``fixed-tuned:alpha_grid=0.5`` is ``"0.5"``, not the number 0.5."""
    from metagate.gates import GATES

    name, _, rest = spec.partition(":")
    name = name.strip()
    config = getattr(GATES.get(name), "config_class", None)
    text_only = config.text_option_names() if config is not None else set()
    opts: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--gates {spec!r}: options are key=value pairs separated by commas")
        key = key.strip().replace("-", "_")
        opts[key] = value.strip() if key in text_only else yaml.safe_load(value)
    return name, opts


def build_bench_gate(spec: str) -> Gate:
    from metagate.run import build_gate

    name, opts = parse_gate_spec(spec)
    return build_gate(name, opts)


def bench_student(task_name: str, arch: str | None, k: int, batch_size: int, steps: int, repeats: int,
                  device: torch.device, extra: dict[str, Callable] | None = None,
                  gates: tuple[str, ...] = ("fixed", "hard"), task_options: dict[str, Any] | None = None,
                  task: Task | None = None) -> dict[str, float]:
    """Median per-step seconds of each variant for one student architecture.

    :param arch: the student (``None``: the task's default)
    :param gates: gate specs run through the shared trainer (see :func:`parse_gate_spec`)
    :param task_options: keywords of the task's builder (e.g. ``subset`` for g2p)
    :param task: the task already built (``task_name`` and ``task_options`` are then not read)
    """
    task = task if task is not None else get_task(task_name, **(task_options or {}))
    torch.manual_seed(0)
    n, c = len(task.train), task.num_classes
    names = [f"t{j}" for j in range(k)]
    seq = task.train.y.ndim == 2  # token units: per-token teacher logits of the real training tokens
    if seq:
        real = task.train.y != PAD_ID
        bank: TeacherBank = SeqTeacherBank(torch.randn(int(real.sum()), k, c) * 3, token_index(real), names).to(device)
    else:
        bank = TeacherBank(torch.randn(n, k, c) * 3, names).to(device)
    init = task.make_student(arch)
    cfg = TrainConfig(epochs=1000, batch_size=batch_size, lr=0.01, device=str(device), progress=False)
    g = torch.Generator().manual_seed(0)
    x, y = task.train.x.to(device), task.train.y.to(device)
    batches = []
    for _ in range(steps):
        idx = torch.randint(0, n, (batch_size,), generator=g).to(device)
        batches.append(Batch(x[idx], y[idx], idx))
    variants: dict[str, Callable[[Batch], None]] = {}
    s0 = copy.deepcopy(init).to(device)
    opt = torch.optim.SGD(s0.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    variants["hand-written KD"] = handwritten_seq_kd_step(s0, opt, bank, 0.5, 4.0) if isinstance(bank, SeqTeacherBank) \
        else handwritten_kd_step(s0, opt, bank.logits, 0.5, 4.0)
    for spec in dict.fromkeys(("fixed", *gates)):  # the fixed gate is every ratio's second reference
        tr = Trainer(task, copy.deepcopy(init), build_bench_gate(spec), bank, cfg)
        variants[f"trainer + {spec}"] = tr.train_step
    for name, factory in (extra or {}).items():
        variants[name] = factory(task, copy.deepcopy(init), bank, cfg)
    for step in variants.values():  # warm-up
        for b in batches[:10]:
            step(b)
    return interleaved_medians({name: partial(time_steps, step, batches, device) for name, step in variants.items()},
                               repeats)


class ItemDataset(Dataset):
    """The split's tensors served item by item (what a user's map-style dataset costs the loader)."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]


def _stream(trainer: Trainer) -> Iterator[Batch]:
    """The trainer's own batches, epoch after epoch (a loader's iterator is made once per epoch, as in ``fit``)."""
    epoch = 0
    while True:
        yield from trainer.epoch_batches(epoch)
        epoch += 1


def _time_stream(trainer: Trainer, stream: Iterator[Batch], steps: int, device: torch.device) -> float:
    """Mean seconds per step: the batch from the trainer's batch source, then its step."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(next(stream))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def bench_loader(task_name: str, arch: str, k: int, batch_size: int, steps: int, repeats: int,
                 device: torch.device, gates: tuple[str, ...] = ("fixed",)) -> dict[str, float]:
    """Median per-step seconds, batches included, of the in-memory path and the DataLoader path
    (``num_workers=0``: over the split's tensors, gathered per batch, and over an item-by-item dataset) for the
    same gate, student, initial weights and teacher logits, interleaved in one process."""
    task = get_task(task_name)
    torch.manual_seed(0)
    n, c = len(task.train), task.num_classes
    bank = TeacherBank(torch.randn(n, k, c) * 3, [f"t{j}" for j in range(k)]).to(device)
    init = task.make_student(arch)
    cfg = TrainConfig(epochs=1000, batch_size=batch_size, lr=0.01, device=str(device), progress=False)
    sources: dict[str, Callable[[Gate], Trainer]] = {
        "in-memory": lambda g: Trainer(task, copy.deepcopy(init), g, bank, cfg),
        "loader (tensors)": lambda g: LoaderTrainer(task, copy.deepcopy(init), g, bank, cfg,
                                                    dataset=TensorDataset(task.train.x, task.train.y)),
        "loader (items)": lambda g: LoaderTrainer(task, copy.deepcopy(init), g, bank, cfg,
                                                  dataset=ItemDataset(task.train.x, task.train.y)),
    }
    runs: dict[str, Callable[[], float]] = {}
    for spec in gates:
        for src, make in sources.items():
            tr = make(build_bench_gate(spec))
            stream = _stream(tr)
            for _ in range(min(10, steps)):  # warm-up
                tr.train_step(next(stream))
            runs[f"{src} + {spec}"] = partial(_time_stream, tr, stream, steps, device)
    return interleaved_medians(runs, repeats)


def bench_loader_report(args: argparse.Namespace, device: torch.device) -> dict[str, dict[str, float]]:
    """``metagate bench --loader``: the loader path's step time against the in-memory path's, per gate."""
    results, rows = {}, []
    for arch in args.students:
        res = bench_loader(args.task, arch, args.teachers, args.batch_size, args.steps, args.repeats, device,
                           tuple(args.gates))
        results[arch] = res
        for spec in args.gates:
            ref = res[f"in-memory + {spec}"]
            for src in ("in-memory", "loader (tensors)", "loader (items)"):
                t = res[f"{src} + {spec}"]
                rows.append([arch, spec, src, f"{t * 1e3:.3f}", f"{t / ref:.3f}x"])
    print(f"task {args.task}, K={args.teachers}, batch {args.batch_size}, {args.steps} steps x {args.repeats} "
          f"repeats (median, batches included), num_workers=0, device {device}, torch threads "
          f"{torch.get_num_threads()}")
    print(table(["student", "gate", "batches from", "ms/step", "ratio to in-memory"], rows))
    return results


#: the students benched by default, per task (any other task: its own default student)
DEFAULT_STUDENTS = {"digits": ["mlp", "cnn"], "fashion": ["mlp", "cnn"], "g2p": ["gru"]}


def bench_task_options(args: argparse.Namespace) -> dict[str, Any]:
    """The task options given on the command line (e.g. ``--lm-documents``), checked against ``--task``'s."""
    from metagate.cli_args import task_option_names
    from metagate.data.builtin import task_config

    opts = {n: getattr(args, n) for n in sorted(task_option_names()) if getattr(args, n, None) is not None}
    task_config(args.task, opts)  # an option of another task -> ConfigError naming it
    return opts


def bench(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    from metagate.data.builtin import task_config

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    opts = bench_task_options(args)
    if getattr(args, "teachers", None) is None:  # unset: as many as the task trains by default (lm: 2)
        args.teachers = task_config(args.task, opts).default_teachers
    task = None
    if not args.students and args.task not in DEFAULT_STUDENTS:  # e.g. lm: its own default student (gpt2)
        task = get_task(args.task, **opts)
    students = args.students or DEFAULT_STUDENTS.get(args.task) or [task.default_student]  # type: ignore[union-attr]
    args.students = students
    if getattr(args, "loader", False):
        return bench_loader_report(args, device)
    results = {}
    rows = []
    for arch in students:
        res = bench_student(args.task, arch, args.teachers, args.batch_size, args.steps, args.repeats, device,
                            gates=tuple(args.gates), task_options=opts, task=task)
        results[arch] = res
        ref, fixed = res["hand-written KD"], res["trainer + fixed"]
        for name, t in res.items():
            rows.append([arch, name, f"{t * 1e3:.3f}", f"{t / ref:.3f}x", f"{t / fixed:.3f}x"])
    print(f"task {args.task}, K={args.teachers}, batch {args.batch_size}, {args.steps} steps x {args.repeats} "
          f"repeats (median), device {device}, torch threads {torch.get_num_threads()}")
    print(table(["student", "variant", "ms/step", "ratio to hand-written", "ratio to trainer + fixed"], rows))
    return results
