"""The one shared student update loop (docs/design.md, "Data flow"): the step and the epoch loop.

Every gate plugs into :meth:`Trainer.train_step`; no gate has a loop of its own.
An outside driver (the gymnasium environment) calls ``train_step(batch, decision)``
with its own :class:`~metagate.gates.GateOutput`. What a run does around the epochs (TensorBoard, the
checkpoint, the final record) is a callback (:mod:`metagate.callbacks`); checkpoints are
:mod:`metagate.checkpoint`.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from metagate import checkpoint, units
from metagate.callbacks import BaseCallback, CallbackList, standard_callbacks
from metagate.checks import check_finite, nonfinite_inputs
from metagate.data.task import Batch, Split, Task
from metagate.diagnostics import gate_diagnostics
from metagate.errors import ConfigError, InputError
from metagate.gates.base import Gate, GateOutput, StepContext, UnitView
from metagate.gates.temperature.reversal import check_temperature
from metagate.logger import Logger
from metagate.losses import check_weights, closed_form_columns, reduce_weighted, unit_losses
from metagate.metrics import classification_metrics
from metagate.options import Options, option
from metagate.seq_metrics import sequence_metrics
from metagate.teachers.bank import TeacherBank


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested but CUDA is not available")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ConfigError(f"--device must be auto, cpu or cuda[:N], got {device!r}")
    return torch.device(device)


AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the student forward (``None``: fp32, no autocast)."""
    if precision not in AMP_DTYPES:
        raise ConfigError(f"--precision must be one of {', '.join(AMP_DTYPES)}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"--precision fp16 needs CUDA (its gradient scaler and fast fp16 kernels), but the device "
                          f"is {device}; on CPU use --precision bf16 or fp32")
    return AMP_DTYPES[precision]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block (e.g. loading or training teachers) without moving the python/numpy/torch random state."""
    py, npy, th = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(th)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@dataclass
class TrainConfig(Options):
    """Student optimisation settings (each field is also a ``distill`` flag and a YAML key)."""

    epochs: int = option(30, "passes over the training split (>= 1; a resume may raise it to extend a run)")
    batch_size: int = option(128, "units per step")
    lr: float = option(0.05, "peak learning rate")
    momentum: float = option(0.9, "SGD momentum, in [0, 1)")
    weight_decay: float = option(5e-4, "weight decay (>= 0)")
    optimizer: str = option("sgd", "student optimizer", choices=("sgd", "adam"))
    schedule: str = option("cosine", "learning-rate schedule: cosine (per step, to 0) or constant",
                           choices=("cosine", "constant"))
    seed: int = option(0, "training seed")
    device: str = option("auto", "auto | cpu | cuda[:N] (auto picks CUDA when present)")
    precision: str = option("fp32", "the student forward's precision: fp32, or autocast to bf16 (CPU or CUDA) or "
                            "fp16 (CUDA only, with a gradient scaler); the loss columns are always fp32",
                            choices=("fp32", "bf16", "fp16"))
    progress: bool = option(True, "show progress bars (--no-progress hides them)")
    eval_test_every_epoch: bool = option(True, "evaluate on test after every epoch (else only after the last)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.epochs < 1:
            raise ConfigError(f"--epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"--momentum must be in [0, 1), got {self.momentum}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"--seed must be in [0, 2**63), got {self.seed}")


@dataclass
class StepResult:
    """Detached outputs of one student update: ``loss`` scalar, ``losses [N, 1+K]``, ``weights [N, 1+K]``."""

    loss: Tensor
    losses: Tensor
    weights: Tensor



def _rows(real: Tensor | None, *tensors: Any) -> tuple[Any, ...]:
    """``tensors`` (``None``, floats and 0-dim tensors pass through) at rows ``real``; all of them when ``None``."""
    if real is None:
        return tensors
    return tuple(t[real] if torch.is_tensor(t) and t.ndim > 0 else t for t in tensors)

class Trainer:
    """Runs the step of docs/design.md ("Data flow of one step") for any gate.

    :param task: the task (splits are moved to ``device`` once)
    :param student: the student network
    :param gate: the gate deciding ``W``
    :param bank: cached teacher logits for the training units (``None`` for ``ce``)
    :param config: :class:`TrainConfig`
    :param logger: TensorBoard logger (or ``None``)
    :param run_dir: where checkpoints go (or ``None``)
    """

    def __init__(
        self,
        task: Task,
        student: nn.Module,
        gate: Gate,
        bank: TeacherBank | None,
        config: TrainConfig,
        logger: Logger | None = None,
        run_dir: str | Path | None = None,
        identity: dict[str, Any] | None = None,
    ) -> None:
        self.task, self.gate, self.config = task, gate, config
        self.device = resolve_device(config.device)
        self._amp = resolve_precision(config.precision, self.device)
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range
        self.scaler = torch.amp.GradScaler("cuda") if self._amp == torch.float16 else None
        self.student = student.to(self.device)
        self.logger = logger or Logger(None)
        self.run_dir = Path(run_dir) if run_dir else None
        self.identity = identity or {}
        if gate.uses_teachers and bank is None:
            raise ConfigError(f"gate {gate.name!r} needs teachers; pass --teachers K >= 1")
        self.bank = bank.to(self.device) if (bank is not None and gate.uses_teachers) else None
        if self.bank is not None:
            if self.bank.num_units != len(task.train):
                raise InputError(f"teacher bank covers {self.bank.num_units} units, training split has "
                                 f"{len(task.train)}")
            if self.bank.num_classes != task.num_classes:
                raise InputError(f"class-count mismatch: teachers output {self.bank.num_classes} classes, "
                                 f"task {task.name!r} has {task.num_classes}")
        with torch.no_grad():
            out = self.student(task.train.x[:2].to(self.device))
        if out.shape[-1] != task.num_classes:
            raise InputError(f"class-count mismatch: student outputs {out.shape[-1]} classes, "
                             f"task {task.name!r} has {task.num_classes}")
        self.train_x = task.train.x.to(self.device)
        self.train_y = task.train.y.to(self.device)
        self.corrupted = task.corrupted.reshape(-1).to(self.device)  # per unit (token for sequences)
        self._real_units = units.train_unit_mask(task)  # sequences: padding units are no units
        # each teacher's per-unit correctness against the clean labels: ground truth for diagnostics only
        self.teacher_right = None if self.bank is None else self.bank.unit_right(task.clean_train_labels)
        self._unit_classes = _real_unit_classes(task, self._real_units)
        params = list(self.student.parameters())
        if config.optimizer == "sgd":
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(
                params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
        else:
            self.optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
        self.steps_per_epoch = math.ceil(len(task.train) / config.batch_size)
        self.total_steps = max(1, self.steps_per_epoch * config.epochs)
        self.step, self.epoch = 0, 0
        k = self.num_teachers
        self._unit_weights = torch.zeros(units.num_units(task), 1 + k, device=self.device)
        self._pending_weights: list[tuple[Tensor, Tensor]] = []
        self._reset_stats()
        self.history: list[dict[str, float]] = []
        gate.setup(self)
        # a gate's temperature trained by the student's optimizer (CTKD): same lr schedule, momentum, decay
        extra = list(gate.student_parameters())
        if extra:
            self.optimizer.add_param_group({"params": extra})
        self._tau_graph = bool(extra)

    # -- the gate context (metagate.gates.base.GateContext) ---------------------------------------
    @property
    def meta(self) -> Split:
        """The clean split learned gates may train on (never ``select``)."""
        return self.task.meta

    @property
    def dtype(self) -> torch.dtype:
        return next(self.student.parameters()).dtype

    @property
    def num_train_units(self) -> int:
        """Training units: examples, or ``B_train * T`` token positions for sequences (padding included;
        :attr:`UnitView.unit_ids` indexes them)."""
        return units.num_units(self.task)

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def batch_size(self) -> int:
        return self.config.batch_size

    def set_total_steps(self, total_steps: int) -> None:
        """Run progress and the learning-rate schedule over ``total_steps`` instead of ``epochs`` epochs
        (an outside driver, e.g. the env, that trains in episodes of its own length)."""
        if total_steps < 1:
            raise ConfigError(f"total_steps must be >= 1, got {total_steps}")
        self.total_steps = int(total_steps)

    # -- properties ------------------------------------------------------------------------------
    @property
    def unit_weights(self) -> Tensor:
        """``[N_train, 1+K]`` the weights last used for each training unit."""
        if self._pending_weights:
            buf = self._unit_weights
            for ids, w in self._pending_weights:
                buf[ids] = w.to(buf.dtype)
            self._pending_weights.clear()
        return self._unit_weights

    @unit_weights.setter
    def unit_weights(self, value: Tensor) -> None:
        self._pending_weights.clear()
        self._unit_weights = value

    @property
    def num_teachers(self) -> int:
        return 0 if self.bank is None else self.bank.num_teachers

    @property
    def lr(self) -> float:
        """The student's current learning rate (the meta look-ahead's step size)."""
        return float(self.optimizer.param_groups[0]["lr"])

    @property
    def progress(self) -> float:
        return min(1.0, self.step / self.total_steps)

    def lr_at(self, step: int) -> float:
        """The learning rate the schedule gives step ``step`` (``train_step`` sets it before the update)."""
        if self.config.schedule == "constant":
            return self.config.lr
        return 0.5 * self.config.lr * (1 + math.cos(math.pi * min(step, self.total_steps) / self.total_steps))

    # -- the step --------------------------------------------------------------------------------
    def make_view(self, batch: Batch, student_logits: Tensor) -> UnitView:
        """The gate's view of ``batch`` (teacher logits looked up by unit id)."""
        bank, ids = self.bank, batch.ids
        n = student_logits.shape[0]
        mask = batch.mask.reshape(-1) if batch.mask is not None else _ones(n, student_logits.device)
        t = (lambda: bank.lookup(ids)) if bank is not None else None  # gathered only if a gate reads it
        seq_shape = (batch.y.shape[0], batch.y.shape[1]) if batch.y.ndim == 2 else (n, 1)
        view = UnitView(student_logits, t, batch.y.reshape(-1), mask, ids, seq_shape, self.progress,
                        num_teachers=self.num_teachers)
        if bank is not None:
            memo: dict[float, Tensor] = {}

            def teacher_log_probs(tau: float) -> Tensor:  # served from the bank's per-tau cache
                lp = memo.get(tau)
                if lp is None:
                    lp = memo[tau] = bank.unit_log_probs(tau, ids)
                return lp

            view.teacher_log_probs_fn = teacher_log_probs
            if bank.closed_form_kd:  # a sparse bank: KD columns and one token's probability from the top-k entries
                view.teacher_token_log_probs_fn = lambda tau, tokens: bank.unit_token_log_probs(ids, tokens, tau)
                view.teacher_kd_fn = lambda log_q, tau: bank.unit_kd(ids, log_q, tau)
                view.teacher_features_fn = lambda log_ps, labels: bank.unit_teacher_features(ids, log_ps, labels)
        return view

    def train_step(self, batch: Batch, decision: GateOutput | None = None,
                   logits: Tensor | None = None) -> StepResult:
        """One student update on ``batch``.

        :param batch: training units (ids index the training split)
        :param decision: weights chosen by an outside driver; ``None`` asks the gate
        :param logits: the student's train-mode logits of ``batch`` (with their graph) at the current
            parameters, when an outside driver already needed them (the env's observation); ``None``
            runs the forward here
        """
        student = self.student
        if not student.training:  # Module.train() walks every submodule: skip when already set
            student.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        if logits is None:
            if self._amp is None:
                logits = student(batch.x)
            else:
                with torch.autocast(self.device.type, dtype=self._amp):
                    logits = student(batch.x)
        if logits.dtype != torch.float32 and self._amp is not None:
            logits = logits.float()  # the loss columns in fp32
        batch, logits = units.token_units(batch, logits)  # sequences: [B, T, V] -> B*T token units + mask
        if self.bank is not None:
            self.bank.set_step(batch.x, batch.ids)  # online teachers run on the step's inputs
        view = self.make_view(batch, logits)
        ctx = StepContext(self, batch, view, self.step)
        if decision is None:
            self.gate.before_step(ctx)
            out = self.gate.decide(view)
        else:
            out = decision
        trusted = out.trusted
        w = out.weights.detach()  # the real step never sends gradient into the gate
        if w.shape != (view.num_units, 1 + self.num_teachers):
            raise InputError(f"gate weights have shape {tuple(w.shape)}, expected "
                             f"{(view.num_units, 1 + self.num_teachers)} (units, 1 + teachers)")
        if not trusted:
            try:
                check_weights(w)
            except InputError:  # weights that follow diverged student logits: name the divergence
                self._diagnose_nonfinite(batch, logits, view, w, out.tau)
        keep = self._tau_graph and decision is None  # the loss's gradient reaches the gate's student_parameters
        tau = out.tau.detach() if torch.is_tensor(out.tau) and not keep else out.tau
        # a sparse top-k bank gives the KD columns in closed form (no [n, K, V] rebuild) at a scalar tau
        closed = self.bank is not None and self.bank.closed_form_kd and not torch.is_tensor(tau)
        dense = self.bank is not None and not torch.is_tensor(tau) and not closed
        t_logp = view.teacher_log_probs(float(tau)) if dense else None
        s_logp = view.made_student_log_probs  # reuse the gate's log-softmax if it made one
        teacher_logits = None if (t_logp is not None or closed) else view.teacher_logits
        grad = out.logit_grad if decision is None else None
        if grad is not None and grad.shape != logits.shape:
            raise InputError(f"gate logit gradient has shape {tuple(grad.shape)}, expected {tuple(logits.shape)}")
        # sequences: loss columns of the real tokens only (padding has weight 0; in a g2p batch it is 2/3 of
        # the B*T units), put back at their positions as zeros for the reduction and the gate
        real = view.mask.nonzero().squeeze(1) if batch.mask is not None else None
        with torch.set_grad_enabled(grad is None):  # the gate's logit gradient makes the loss a value only
            # validated once: the data at load time, the weights above (the loss is checked for NaN below)
            picked = _rows(real, logits, teacher_logits, view.labels, tau, t_logp, s_logp, out.student_tau)
            if closed:
                bank = self.bank
                real_losses = closed_form_columns(picked[0], picked[2],
                                                  lambda log_q, t: bank.unit_kd(view.ids, log_q, t, real),
                                                  float(tau), picked[6], picked[5])
            else:
                real_losses = unit_losses(*picked[:6], validate=False, student_tau=picked[6])
            losses = real_losses if real is None else \
                real_losses.new_zeros(view.num_units, real_losses.shape[1]).index_copy(0, real, real_losses)
            loss = reduce_weighted(losses, w, None if batch.mask is None else view.mask, validate=False)
        if not math.isfinite(loss.item()):
            self._diagnose_nonfinite(batch, logits, view, w, out.tau)
        self.optimizer.zero_grad(set_to_none=True)
        scaler = self.scaler
        if scaler is None:
            if grad is None:
                loss.backward()
            else:
                logits.backward(grad.detach())
            self.optimizer.step()
        else:  # fp16: scaled backward; the step is skipped (and the scale lowered) when a gradient overflowed
            if grad is None:
                scaler.scale(loss).backward()
            else:
                logits.backward(scaler.scale(grad.detach()))
            scaler.step(self.optimizer)
            scaler.update()
        losses = losses.detach()
        ctx.output, ctx.losses = out, losses
        self.gate.after_step(ctx)
        # bookkeeping is deferred (no tensor ops per step): reduced when an epoch ends or someone reads it
        self._step_losses.append(real_losses.detach())  # the epoch's loss means are over real units
        if batch.ids is not None and w.shape[0] == batch.y.numel():
            self._pending_weights.append((units.unit_ids(batch), w))
        if len(self._step_losses) >= 1024:  # an outside driver may never end an epoch: stay bounded
            self._step_losses = [torch.cat(self._step_losses)]
            _ = self.unit_weights
        self.step += 1
        return StepResult(loss.detach(), losses, w)

    def _diagnose_nonfinite(self, batch: Batch, logits: Tensor, view: UnitView, w: Tensor,
                            tau: Tensor | float) -> None:
        """Name what made the loss NaN/inf (checked here, once, instead of on every step): the inputs (with their
        unit ids), the teachers, the student's divergence (non-finite logits from finite inputs: the last update,
        whose loss was finite, broke the student), the gate's weights or temperature, else an overflow."""
        bad = int((~torch.isfinite(logits.detach())).sum())
        found = f"student logits contain {bad} NaN/inf value(s): " if bad else ""
        cause = nonfinite_inputs("the batch's training inputs", batch.x, batch.ids)
        if cause is not None:
            raise InputError(found + cause)
        if view.teacher_logits is not None:
            check_finite("teacher logits", view.teacher_logits)
        where = (f"the first NaN/inf loss came in epoch {self.epoch + 1} of {self.config.epochs}, step {self.step} "
                 f"(learning rate {self.lr:g})")
        if bad:
            raise ConfigError(f"{found}{where}, with finite inputs and teachers: the student diverged; lower --lr "
                              f"(now {self.config.lr:g})")
        try:
            check_weights(w)
        except InputError as e:
            raise InputError(f"{e} in epoch {self.epoch + 1} of {self.config.epochs}, step {self.step} (learning rate "
                             f"{self.lr:g}), from finite student logits: the gate's own computation broke (a "
                             f"look-ahead gate steps with the learning rate: try a lower --lr, now "
                             f"{self.config.lr:g})") from None
        if torch.is_tensor(tau):
            check_temperature(self.gate.name, tau)
        raise ConfigError(f"{where}: the weighted loss overflowed although logits, teachers and weights are finite; "
                          f"lower --lr (now {self.config.lr:g})")

    # -- epochs ----------------------------------------------------------------------------------
    def epoch_batches(self, epoch: int) -> Iterator[Batch]:
        """The training batches of ``epoch`` in an order fixed by (seed, epoch)."""
        g = torch.Generator().manual_seed(1_000_003 * self.config.seed + epoch)
        order = torch.randperm(len(self.task.train), generator=g).to(self.device)
        bs = self.config.batch_size
        for i in range(0, order.numel(), bs):
            idx = order[i : i + bs]
            yield Batch(self.train_x.index_select(0, idx), self.train_y.index_select(0, idx), idx)

    def run_epoch(self, bar: Any = None) -> dict[str, float]:
        """Train one epoch; return the mean of each loss column and weight column."""
        self._reset_stats()
        for batch in self.epoch_batches(self.epoch):
            self.train_step(batch)
            if bar is not None:
                bar.update(1)
        self.epoch += 1
        k = self.num_teachers
        names = ["label"] + [f"teacher{j}" for j in range(k)]
        lw = (torch.cat(self._step_losses).mean(0).tolist() if self._step_losses else [float("nan")] * (1 + k))
        ww = self.real_unit_weights()[0].mean(0).tolist()  # every unit is visited once per epoch
        stats = {f"loss_{nm}": v for nm, v in zip(names, lw)}
        stats.update({f"weight_{nm}": v for nm, v in zip(names, ww)})
        stats["loss"] = float(sum(a * b for a, b in zip(lw, ww)))  # approximate weighted mean
        return stats

    def _reset_stats(self) -> None:
        self._step_losses: list[Tensor] = []

    @torch.no_grad()
    def predict(self, split: Split, batch_size: int = 2048) -> Tensor:
        """Student logits ``[N, C]`` on a split (eval mode, CPU result)."""
        self.student.eval()
        outs = [self.student(split.x[i : i + batch_size].to(self.device)).float().cpu()
                for i in range(0, len(split), batch_size)]
        return torch.cat(outs)

    def evaluate(self, split_name: str) -> dict[str, float]:
        """Accuracy, NLL, ECE, MCE, Brier on ``train|meta|select|test``."""
        split: Split = getattr(self.task, split_name)
        if units.is_sequence(self.task):
            return sequence_metrics(self.student, split, self.device)
        return classification_metrics(self.predict(split), split.y)

    def fit(self, callbacks: Sequence[BaseCallback] = ()) -> dict[str, float]:
        """Train to ``config.epochs`` (continuing from a loaded checkpoint); after each epoch the callbacks:
        TensorBoard and the checkpoint (:func:`~metagate.callbacks.standard_callbacks`), then ``callbacks``.

        :return: final metrics ``test/acc, test/nll, ...`` plus gate diagnostics (also handed to each
            callback's ``on_fit_end``)
        """
        from tqdm.auto import tqdm

        cbs = CallbackList([*standard_callbacks(self), *callbacks])
        cbs.init_callback(self)
        cbs.on_fit_start()

        remaining = (self.config.epochs - self.epoch) * self.steps_per_epoch
        bar = tqdm(total=remaining, desc=f"{self.gate.name}", unit="step", leave=False,
                   disable=True if not self.config.progress else None,  # None: auto-off when not a TTY
                   dynamic_ncols=True)
        try:
            while self.epoch < self.config.epochs:
                stats = self.run_epoch(bar)
                record = {f"train/{k}": v for k, v in stats.items()}
                record.update({f"select/{k}": v for k, v in self.evaluate("select").items()})
                if self.config.eval_test_every_epoch or self.epoch == self.config.epochs:
                    record.update({f"test/{k}": v for k, v in self.evaluate("test").items()})
                record.update(self.weight_diagnostics())
                self.history.append(record)
                bar.set_postfix(acc=f"{record.get('test/acc', float('nan')):.3f}")
                cbs.on_epoch_end(record)
        finally:
            bar.close()
        if self.history and "test/acc" in self.history[-1]:  # the last epoch already evaluated this state
            metrics = {k: v for k, v in self.history[-1].items() if not k.startswith("train/")}
        else:
            metrics = self.final_metrics()
        cbs.on_fit_end(metrics)
        return metrics

    def final_metrics(self) -> dict[str, float]:
        """Test and select metrics plus gate diagnostics of the current student."""
        out = {f"test/{k}": v for k, v in self.evaluate("test").items()}
        out.update({f"select/{k}": v for k, v in self.evaluate("select").items()})
        out.update(self.weight_diagnostics())
        return out

    def weight_diagnostics(self) -> dict[str, float]:
        """Gate diagnostics over the weights last used for every training unit."""
        if self.step == 0:
            return {}
        return {**gate_diagnostics(*self.real_unit_weights(), classes=self._unit_classes), **self.gate.diagnostics()}

    def real_unit_weights(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """Unit weights, corrupted flags and teacher correctness of the real (unpadded) training units."""
        w, c, r = self.unit_weights, self.corrupted, self.teacher_right
        keep = self._real_units
        if keep is None:
            return w, c, r
        keep = keep.to(w.device)
        return w[keep], c[keep], None if r is None else r.to(w.device)[keep]

    # -- checkpoints (metagate.checkpoint) -------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return checkpoint.state_dict(self)

    def save_checkpoint(self, path: str | Path) -> None:
        """Atomically write student, optimizer, gate, RNG states and counters."""
        checkpoint.save_checkpoint(self, path)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore a checkpoint (:func:`metagate.checkpoint.load_checkpoint`: every field checked)."""
        checkpoint.load_checkpoint(self, path)


def _real_unit_classes(task: Task, real: Tensor | None) -> dict[str, Tensor] | None:
    """The task's unit classes (``info["unit_classes"]``: ``name -> [N_train]`` or ``[N_train, L]`` bool, e.g. the lm
    task's frequent / rare / code / prose tokens) as masks over the real training units; ``None`` for a task
    without them."""
    classes = task.info.get("unit_classes")
    if not classes:
        return None
    flat = {}
    for name, flags in classes.items():
        if tuple(flags.shape) != tuple(task.train.y.shape):
            raise InputError(f"unit class {name!r} has shape {tuple(flags.shape)}, the training labels "
                             f"{tuple(task.train.y.shape)}")
        f = flags.reshape(-1).bool()
        flat[name] = f if real is None else f[real.to(f.device)]
    return flat


_ONES: dict[tuple[int, torch.device], Tensor] = {}


def _ones(n: int, device: torch.device) -> Tensor:
    key = (n, device)
    t = _ONES.get(key)
    if t is None:
        t = _ONES[key] = torch.ones(n, device=device)
    return t
