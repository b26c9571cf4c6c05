"""``GatedKDTrainer``: a ``transformers.Trainer`` whose loss is metagate's one equation over the tokens of a
causal LM, the weights decided per token by a metagate gate.

Each step: the student's logits ``[B, T, V]`` and the teachers' (local models run online under
``no_grad``, or a :class:`~metagate.teachers.sparse.SparseBank` read by the batch's ``seq_id``) stay in place
and the labels are shifted (label ``t+1`` at position ``t``, ``-100`` at the last: the logits at ``t`` predict
the token at ``t + 1``); the gate sees the ``B * T`` positions as units (a
:class:`~metagate.gates.base.UnitView`, ``seq_shape = (B, T)``, ``mask`` = shifted label ``!= -100``) and
decides ``W [N, 1+K]`` and ``tau``; :func:`metagate.losses.token_loss` (``gated_kd``'s body) reduces, divided
by the Trainer's ``num_items_in_batch`` under gradient accumulation. Gate shares, per-teacher shares, token ECE and the
perplexity of the training tokens are added to the Trainer's own logs (so every ``report_to`` gets them).

Gates supported: ``ce``, ``fixed``, ``hard`` (token and sentence level, its per-step path), ``reinforce``
(per-token teacher weights from its policy, the reward the student's CE on ``meta_dataset``), ``policy`` (a
deployed teacher-weighting policy, e.g. a ``metagate train-policy`` zip; ``online`` fine-tunes it as
``reinforce``), ``meta`` with ``meta_param='net'`` (Meta-Weight-Net over per-token features; before each step
the gate's generic autograd look-ahead -- the real forward's logits reused, a virtual SGD step, the next-token
CE of a ``meta_dataset`` batch -- moves the net; the student's attention runs eager, the fused kernels having
no double backward), the temperature gates ``temperature`` (ITKD: a per-token temperature from a policy
learned by REINFORCE on ``meta_dataset``) and ``ctkd`` (one learned temperature, a parameter group of the
Trainer's optimizer through gradient reversal), and the rules ``label-filter``, ``conf-teachers``, ``ca-mkd``
and ``best-teacher`` (the gate's own ``table`` rule applied per batch, from the teachers' probabilities of
each position; a sparse teacher's gold-token probability comes from the bank; online teachers are named
``teacher0``, ``teacher1``... for ``best_teacher``). A gate that reads whole teacher distributions from a
sparse bank gets them rebuilt per batch (top-k, the gold token, the tail spread uniformly), never for the
whole bank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback

from metagate.errors import ConfigError, InputError
from metagate.gates import get_gate_class
from metagate.gates.base import Gate, GateOutput, StepContext, UnitView
from metagate.gates.baselines import _TableGate
from metagate.gates.hard import HardGate, hard_gate_from_reference
from metagate.gates.registry import gate_config
from metagate.losses import (
    IGNORE_INDEX,
    SparseTeacher,
    check_lm_inputs,
    sparse_log_prob_of,
    sparse_log_probs_at,
    token_loss,
)
from metagate.metrics import N_BINS
from metagate.teachers.sparse import SparseBank, forward_logits

__all__ = ["GatedKDTrainer", "causal_lm_collator", "vocab_size_of"]

#: gates that learn during the run from a held-out split (``meta_dataset``)
_LEARNED = ("reinforce", "meta", "temperature")
_SUPPORTED = ("ce", "fixed", "hard", "label-filter", "conf-teachers", "ca-mkd", "best-teacher", "ctkd", "policy",
              *_LEARNED)
#: gates with an ``after_step`` (an episode's reward, after the optimizer step)
_AFTER_STEP = ("reinforce", "temperature", "policy")


def vocab_size_of(model: nn.Module) -> int | None:
    """The output vocabulary of a causal LM (its output embedding's rows, else ``config.vocab_size``)."""
    get = getattr(model, "get_output_embeddings", None)
    emb = get() if callable(get) else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return int(emb.weight.shape[0])
    cfg = getattr(model, "config", None)
    return int(cfg.vocab_size) if cfg is not None and getattr(cfg, "vocab_size", None) else None


def causal_lm_collator(pad_token_id: int = 0):
    """A collator for items ``{"input_ids": [T_i], "seq_id"?: int}``: right padding, ``attention_mask``, and
    ``labels`` = the input ids with ``-100`` on padding (the model's shift happens in the loss)."""

    def collate(items: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
        seqs = [torch.as_tensor(it["input_ids"]).reshape(-1) for it in items]
        t = max(s.numel() for s in seqs)
        x = torch.full((len(seqs), t), pad_token_id, dtype=torch.long)
        m = torch.zeros(len(seqs), t, dtype=torch.long)
        for i, s in enumerate(seqs):
            x[i, : s.numel()], m[i, : s.numel()] = s, 1
        out = {"input_ids": x, "attention_mask": m, "labels": torch.where(m.bool(), x, torch.full_like(x, IGNORE_INDEX))}
        if "seq_id" in items[0]:
            out["seq_id"] = torch.tensor([int(it["seq_id"]) for it in items], dtype=torch.long)
        return out

    return collate


class _NextTokenLogits(nn.Module):
    """The student as a learned gate's validation reads it: input ids ``[M, T]`` -> next-token logits
    ``[M, T-1, 1+V]``, class ``c+1`` = token ``c`` and class 0 (metagate's ``PAD``) at ``-inf``, so that
    ``units.unit_ce`` (``ignore_index=PAD``) drops exactly the positions without a next token and its CE over
    the others is the model's own (a ``-inf`` logit adds nothing to the normaliser)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        logits = self.model(input_ids=x).logits[:, :-1].float()  # right padding: causal, real positions unchanged
        return F.pad(logits, (1, 0), value=float("-inf"))


class _MetaSplit:
    """The held-out sequences as a learned gate's ``meta`` split: ``x [M, T]`` right-padded ids, ``y [M, T-1]``
    the next token + 1 (0 where there is none), matching :class:`_NextTokenLogits`."""

    def __init__(self, items: Sequence[Any]) -> None:
        seqs = [torch.as_tensor(it["input_ids"] if isinstance(it, dict) else it).reshape(-1) for it in items]
        if not seqs or min(s.numel() for s in seqs) < 2:
            raise InputError("meta_dataset needs sequences of at least 2 tokens")
        t = max(s.numel() for s in seqs)
        self.x = torch.zeros(len(seqs), t, dtype=torch.long)
        self.y = torch.zeros(len(seqs), t - 1, dtype=torch.long)
        for i, s in enumerate(seqs):
            self.x[i, : s.numel()] = s
            self.y[i, : s.numel() - 1] = s[1:] + 1

    @classmethod
    def empty(cls) -> _MetaSplit:
        """No held-out text: what a gate that never learns during the run (a deployed ``policy``) is handed."""
        split = cls.__new__(cls)
        split.x, split.y = torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 1, dtype=torch.long)
        return split

    def __len__(self) -> int:
        return int(self.x.shape[0])


class _Batch(dict):
    """A step's inputs as the gates' ``StepContext.batch``: the Trainer's dict, and ``x`` (the input ids) where a
    gate forwards the batch's inputs again (the meta gate's look-ahead reuses the real forward's logits instead)."""

    @property
    def x(self) -> Tensor:
        return self["input_ids"]


class _Run:
    """The part of :class:`~metagate.gates.base.GateContext` the per-token gates read here."""

    def __init__(self, trainer: GatedKDTrainer, meta: _MetaSplit) -> None:
        self._t = trainer
        self.student = _NextTokenLogits(trainer.model)
        self.device = trainer.args.device
        self.bank = None  # teachers are per batch (online, or the sparse bank by sequence id)
        self.train_x = self.train_y = None
        self.corrupted = None  # no planted label noise in streamed text (diagnostics only)
        self.teacher_right = None
        self.meta = meta

    @property
    def dtype(self) -> torch.dtype:
        return next(self.student.parameters()).dtype

    @property
    def num_teachers(self) -> int:
        return self._t.num_teachers

    @property
    def seed(self) -> int:
        return int(self._t.args.seed)

    @property
    def step(self) -> int:
        return int(self._t.state.global_step)

    @property
    def progress(self) -> float:
        return self._t.progress

    @property
    def batch_size(self) -> int:
        return int(self._t.args.per_device_train_batch_size)

    @property
    def num_train_units(self) -> int:
        """Training sequences (the meta net reads unit features, not a per-unit table)."""
        data = self._t.train_dataset
        return len(data) if data is not None and hasattr(data, "__len__") else 0

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per pass over the training sequences (at least 1; :attr:`step` counts them too)."""
        args = self._t.args
        n = self.num_train_units
        b = self.batch_size * max(1, int(args.world_size)) * max(1, int(args.gradient_accumulation_steps))
        return max(1, math.ceil(n / b)) if n else max(1, self.total_steps)

    @property
    def total_steps(self) -> int:
        return int(self._t.state.max_steps or self._t.args.max_steps)

    @property
    def lr(self) -> float:
        opt = self._t.optimizer
        return float(opt.param_groups[0]["lr"]) if opt is not None else float(self._t.args.learning_rate)


class _AfterStep(TrainerCallback):
    """Hands the gate its ``after_step`` once per optimizer step (after the update: the reward sees it)."""

    def __init__(self, trainer: GatedKDTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        ctx = self.trainer._last_ctx
        if ctx is not None and self.trainer.gate.name in _AFTER_STEP:
            self.trainer.gate.after_step(ctx)
            self.trainer._last_ctx = None


class GatedKDTrainer(Trainer):
    """``transformers.Trainer`` with metagate's gated KD loss per token.

    :param teachers: local causal LMs run online (frozen, eval mode, moved to the student's device)
    :param sparse_bank: or a scored :class:`SparseBank` (items then carry ``seq_id``, the bank's sequence index)
    :param gate: a gate name (see the module docstring) or a :class:`~metagate.gates.base.Gate` of one of them
        (e.g. ``PolicyGate(module=...)``)
    :param gate_options: the gate's options (as for ``metagate distill``: ``alpha``, ``tau``, ``hard_level``...)
    :param meta_dataset: held-out sequences (items with ``input_ids``) a learned gate (``reinforce``, ``meta``)
        learns from: its reward, or its look-ahead's loss, is the student's next-token CE on them, never on the
        training text
    :raises InputError: a teacher's (or the bank's) vocabulary differs from the student's, naming both sizes
    """

    def __init__(self, *args: Any, teachers: Sequence[nn.Module] | None = None,
                 sparse_bank: SparseBank | None = None, gate: str | Gate = "fixed",
                 gate_options: dict[str, Any] | None = None, meta_dataset: Sequence[Any] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if teachers and sparse_bank is not None:
            raise ConfigError("give teachers (run online) or a sparse_bank, not both")
        self.online_teachers = [t.eval().requires_grad_(False).to(self.args.device) for t in (teachers or [])]
        self.sparse_bank = sparse_bank
        v = vocab_size_of(self.model)
        for j, t in enumerate(self.online_teachers):
            vt = vocab_size_of(t)
            if v is not None and vt is not None and vt != v:
                raise InputError(f"vocabulary mismatch: teacher {j} has V = {vt} tokens, the student V = {v} "
                                 "(distillation needs one tokenizer)")
        if sparse_bank is not None and v is not None and sparse_bank.vocab_size != v:
            raise InputError(f"vocabulary mismatch: the sparse bank was scored with V = {sparse_bank.vocab_size} "
                             f"tokens, the student has V = {v} (distillation needs one tokenizer)")
        self.gate = self._make_gate(gate, gate_options)
        if self.gate.uses_teachers and self.num_teachers == 0:
            raise ConfigError(f"gate {self.gate.name!r} needs teachers: pass teachers=[...] or sparse_bank=")
        learns = self.gate.name in _LEARNED or (self.gate.name == "policy" and self.gate.learn)  # type: ignore
        if learns and meta_dataset is None:
            raise ConfigError(f"gate {self.gate.name!r} learns from held-out text: pass meta_dataset=")
        if self.gate.name == "meta":
            _eager_attention(self.model)
        self._run = _Run(self, _MetaSplit.empty() if meta_dataset is None else _MetaSplit(meta_dataset))
        if isinstance(self.gate, _TableGate):  # its setup reads a whole bank; here: its rule per batch
            _table_setup(self.gate, self.teacher_names)
        else:
            self.gate.setup(self._run)
        if _world() > 1:  # one gate on every process (see _share_gate)
            _share_gate(self.gate)
        self._stats: dict[str, Tensor] = {}
        self._last_ctx: StepContext | None = None
        if self.gate.name in _AFTER_STEP:
            self.add_callback(_AfterStep(self))

    # -- setup -----------------------------------------------------------------------------------------
    def _make_gate(self, gate: str | Gate, options: dict[str, Any] | None) -> Gate:
        if isinstance(gate, Gate):
            if options:
                raise ConfigError("pass gate options with a gate name, not with a gate instance")
            g = gate
        else:
            if gate not in _SUPPORTED:
                raise ConfigError(f"GatedKDTrainer runs the gates {', '.join(_SUPPORTED)}; got {gate!r}")
            g = get_gate_class(gate)(gate_config(gate, options))
        if g.name not in _SUPPORTED:
            raise ConfigError(f"GatedKDTrainer runs the gates {', '.join(_SUPPORTED)}; got {g.name!r}")
        if g.name == "meta":
            _check_meta(g.config)
        if g.name == "ctkd" and g.config.ctkd_variant != "global":
            raise ConfigError("GatedKDTrainer runs ctkd's global temperature (ctkd_variant='global'); the instance "
                              "net reads a [V]-wide input per token")
        return g

    @property
    def num_teachers(self) -> int:
        return len(self.online_teachers) if self.sparse_bank is None else self.sparse_bank.num_teachers

    @property
    def teacher_names(self) -> list[str]:
        """The sparse bank's teacher names, or ``teacher0``, ``teacher1``... for online teachers (their order)."""
        if self.sparse_bank is not None:
            return list(self.sparse_bank.names)
        return [f"teacher{j}" for j in range(len(self.online_teachers))]

    def create_optimizer(self, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's optimizer, plus the gate's :meth:`~metagate.gates.base.Gate.student_parameters` (CTKD's
        temperature) as a group of their own with the optimizer's defaults (the student's learning rate and
        schedule; the loss keeps the gate's ``tau`` in its graph)."""
        opt = super().create_optimizer(*args, **kwargs)
        extra = self.gate.student_parameters()
        if extra and not any(p is q for g in opt.param_groups for p in g["params"] for q in extra):
            opt.add_param_group({"params": extra, "weight_decay": 0.0})
            if _world() > 1:  # outside the DDP module: average their gradients as DDP does the student's
                opt.register_step_pre_hook(_averaging_hook(extra))
        return opt

    @property
    def progress(self) -> float:
        return min(1.0, self.state.global_step / max(self.state.max_steps, 1))

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None and "seq_id" not in self._signature_columns:
            self._signature_columns.append("seq_id")  # the sparse bank's key; popped before the forward

    # -- the step --------------------------------------------------------------------------------------
    def _teachers(self, inputs: dict[str, Any], seq_id: Tensor | None) -> list[Tensor | SparseTeacher]:
        x, m = inputs["input_ids"], inputs.get("attention_mask")
        if self.sparse_bank is not None:
            if seq_id is None:
                raise InputError("a sparse bank needs each item's 'seq_id' (its sequence index in the bank)")
            return list(self.sparse_bank.teachers(seq_id, x, m))
        with torch.no_grad():
            return [forward_logits(t, x, m).float() for t in self.online_teachers]

    def _view(self, s: Tensor, teachers: list, labels: Tensor) -> UnitView:
        b, t, v = s.shape
        flat = labels.reshape(-1)
        mask = (flat != IGNORE_INDEX).to(s.dtype)
        safe = flat.clamp_min(0)  # gates gather labels: -100 positions read token 0, masked out

        def log_probs(tau: float) -> Tensor:  # [N, K, V], per batch only when a gate reads them
            cols = []
            for te in teachers:
                if torch.is_tensor(te):
                    cols.append(F.log_softmax(te.reshape(-1, v) / tau, -1))
                else:
                    cols.append(_rebuilt(te, v, tau, safe))
            return torch.stack(cols, 1)

        # no unit ids: every gate here decides from the batch itself (no per-unit tables over streamed text)
        view = UnitView(s.reshape(-1, v), (lambda: log_probs(1.0)), safe, mask, None, (b, t), self.progress,
                        num_teachers=len(teachers))
        view.teacher_log_probs_fn = log_probs
        return view

    def _decide(self, view: UnitView, teachers: list | None = None) -> GateOutput:
        gate = self.gate
        if isinstance(gate, HardGate) and gate.reference == "gold" and teachers is not None:
            return _hard_gold(gate, view, teachers)
        if not isinstance(gate, _TableGate):
            return gate.decide(view)
        w = gate.table(view.teacher_log_probs(1.0).exp(), view.labels)  # the gate's own rule, on this batch
        return GateOutput(w.to(view.student_logits.dtype), gate.tau, trusted=True)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Tensor | int | None = None) -> Tensor | tuple[Tensor, Any]:
        inputs = dict(inputs)
        seq_id = inputs.pop("seq_id", None)
        labels = inputs.pop("labels", None)
        if labels is None:
            m = inputs.get("attention_mask")
            x = inputs["input_ids"]
            labels = x if m is None else torch.where(m.bool(), x, torch.full_like(x, IGNORE_INDEX))
        outputs = model(**inputs)
        logits = getattr(outputs, "logits", None)
        if logits is None:
            logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        logits = logits.float()
        teachers = self._teachers(inputs, seq_id)
        # the causal shift on the labels (label t+1 at position t, -100 at the last): logits stay in place
        y = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], 1)
        view = self._view(logits, teachers, y)
        ctx = StepContext(self._run, _Batch(inputs), view, int(self.state.global_step))
        policy = getattr(self.gate, "policy", None)
        if model.training:
            self.gate.before_step(ctx)
            out = self._decide(view, teachers)
        elif isinstance(policy, nn.Module) and policy.training:  # evaluation: the policy's mode, no recording
            policy.eval()
            try:
                out = self._decide(view, teachers)
            finally:
                policy.train()
        else:
            out = self._decide(view, teachers)
        b, t = y.shape
        w = out.weights.detach().reshape(b, t, -1)
        tau = out.tau
        if torch.is_tensor(tau) and not self.gate.student_parameters():  # CTKD's tau keeps its graph
            tau = tau.detach()
        tau = tau.reshape(b, t) if torch.is_tensor(tau) and tau.ndim else tau
        tau = float(tau) if torch.is_tensor(tau) and tau.ndim == 0 and not tau.requires_grad else tau
        check_lm_inputs(logits, y, teachers, w)
        loss, cols, rows = token_loss(logits, teachers, y, w, tau=tau, shift=False,
                                      num_items_in_batch=num_items_in_batch, reduction="mean", alpha=0.5,
                                      student_tau=out.student_tau)
        if model.training:
            ctx.output, ctx.losses = out, cols.detach()
            self._last_ctx = ctx
            self._record(logits.detach().reshape(-1, logits.shape[-1]), y.reshape(-1), cols.detach(), rows,
                         w.reshape(-1, w.shape[-1]), tau)
        if (self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs
                and num_items_in_batch is not None):
            loss = loss * self.accelerator.num_processes  # as the base compute_loss: DDP averages the gradients
        return (loss, outputs) if return_outputs else loss

    # -- logging ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def _record(self, logits: Tensor, labels: Tensor, cols: Tensor, rows: Tensor, w: Tensor,
                tau: Tensor | float) -> None:
        """Accumulate the real tokens' gate weights, KD temperatures, NLL (the CE column) and calibration bins (the
        max probability from the max logit and the CE column's log-sum-exp: no second softmax over V)."""
        n = rows.numel()
        if not n:
            return
        if torch.is_tensor(tau):
            tau_sum = tau.detach().double().reshape(-1).index_select(0, rows).sum() if tau.ndim \
                else tau.detach().double() * n
        else:
            tau_sum = torch.tensor(float(tau) * n, dtype=torch.float64)
        wr = w.index_select(0, rows).double()
        nll = cols[:, 0].double()
        sel = logits.index_select(0, rows)
        top, pred = sel.max(-1)
        y = labels.index_select(0, rows)
        s_y = sel.gather(1, y.unsqueeze(1)).squeeze(1)
        conf = (top.double() - s_y.double() - nll).exp()  # max_c softmax = exp(max - lse), lse = CE + s_y
        idx = (conf * N_BINS).ceil().long().clamp(1, N_BINS) - 1  # (lo, hi] bins as metrics.calibration_bins
        bins = torch.zeros(3, N_BINS, dtype=torch.float64, device=conf.device)
        bins[0].index_add_(0, idx, torch.ones_like(conf))
        bins[1].index_add_(0, idx, conf)
        bins[2].index_add_(0, idx, (pred == y).double())
        kd = wr[:, 1:].sum(1, keepdim=True)
        add = {"tokens": torch.tensor(float(n), dtype=torch.float64), "nll": nll.sum(), "w": wr.sum(0),
               "teacher_share": (wr[:, 1:] / kd.clamp_min(1e-30)).sum(0) if wr.shape[1] > 1 else wr[:, :0].sum(0),
               "kd_tokens": (kd > 0).double().sum(), "bins": bins, "tau": tau_sum}
        for k, v in add.items():
            self._stats[k] = self._stats[k] + v.cpu() if k in self._stats else v.cpu()

    def _summed_stats(self) -> dict[str, Tensor]:
        """The accumulated sums, over every process under data parallelism (the Trainer logs on all of them at
        once; a process without tokens since the last log adds zeros)."""
        if _world() == 1:
            return self._stats
        k = self.num_teachers
        shapes = {"tokens": (), "nll": (), "w": (1 + k,), "teacher_share": (k,), "kd_tokens": (), "bins": (3, N_BINS),
                  "tau": ()}
        flat = torch.cat([self._stats.get(name, torch.zeros(shape, dtype=torch.float64)).reshape(-1)
                          for name, shape in shapes.items()]).to(self.args.device)
        torch.distributed.all_reduce(flat)
        out, i = {}, 0
        for name, shape in shapes.items():
            size = math.prod(shape)
            out[name] = flat[i : i + size].reshape(shape).cpu()
            i += size
        return out

    def gate_logs(self) -> dict[str, float]:
        """The means since the last log: ``gate/label_share``, ``gate/kd_share``, ``gate/teacher<k>_share``
        (each teacher's part of the KD weight, over the tokens with any), ``gate/tau_mean`` (the KD temperature
        over the real tokens), ``train/token_ece``, ``train/ppl``."""
        st = self._summed_stats()
        if not st or not float(st["tokens"]):
            return {}
        n = float(st["tokens"])
        w = (st["w"] / n).tolist()
        logs = {"gate/label_share": w[0], "gate/kd_share": float(sum(w[1:]))}
        kd_n = float(st["kd_tokens"])
        for j, v in enumerate(st["teacher_share"].tolist()):
            logs[f"gate/teacher{j}_share"] = v / kd_n if kd_n else 0.0
        count, s_conf, s_acc = st["bins"]
        logs["gate/tau_mean"] = float(st["tau"]) / n
        logs["train/token_ece"] = float((s_conf - s_acc).abs().sum() / n)
        logs["train/ppl"] = math.exp(float(st["nll"]) / n)
        return logs

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:  # a training log: add the gate's and the calibration's numbers, then start afresh
            logs = {**logs, **self.gate_logs()}
            self._stats = {}
        super().log(logs, *args, **kwargs)


def _world() -> int:
    """Processes of the run (1 without ``torch.distributed``)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _averaging_hook(params: list[Tensor]) -> Any:
    """An optimizer step pre-hook averaging ``params``' gradients over the processes (each computed its own)."""

    def hook(optimizer: Any, args: Any, kwargs: Any) -> None:
        world = _world()
        for p in params:
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad.div_(world)

    return hook


def _share_gate(gate: Gate) -> None:
    """Under data parallelism, one gate on every process: its parameters (and CTKD's temperature) start from
    process 0's, and the optimizer of its own updates (the meta net's Adam, REINFORCE's) averages their
    gradients over the processes before each step -- each process computes its part from its own shard of the
    batch (the look-ahead, the REINFORCE scores), as DDP does for the student."""
    params = list(gate.parameters()) + list(gate.student_parameters())
    with torch.no_grad():
        for p in params:
            torch.distributed.broadcast(p.data, src=0)
    learner = getattr(gate, "learner", None)
    opt = getattr(learner, "optimizer", None)
    if isinstance(opt, torch.optim.Optimizer):
        opt.register_step_pre_hook(_averaging_hook([p for g in opt.param_groups for p in g["params"]]))


def _table_setup(gate: _TableGate, names: list[str]) -> None:
    """What a rule gate's :meth:`~metagate.gates.baselines._TableGate.setup` sets besides its whole-bank table:
    its label weight, temperature and (``best-teacher``) the chosen teacher's index among ``names``; its
    :meth:`table` then runs per batch on the batch's teacher probabilities."""
    gate.alpha = gate.config.label_weight  # type: ignore[attr-defined]
    gate.tau = gate.config.temperature  # type: ignore[attr-defined]
    if gate.name == "best-teacher":
        name = gate.config.best_teacher  # type: ignore[attr-defined]
        if name not in names:
            raise ConfigError(f"best_teacher {name!r} is not one of the teachers ({', '.join(names)}); online "
                              "teachers are named teacher0, teacher1... in their order")
        gate._index = names.index(name)  # type: ignore[attr-defined]


def _check_meta(config: Any) -> None:
    """The meta gate as it runs per token here: Meta-Weight-Net (``meta_param='net'``, weights from per-token
    features), its generic autograd look-ahead reusing the real forward (``func`` backend, every step)."""
    if config.meta_param != "net":
        raise ConfigError(f"GatedKDTrainer runs the meta gate with meta_param='net' (weights from per-token "
                          f"features); got meta_param={config.meta_param!r} (a per-unit table needs unit ids "
                          "that tokens of streamed text do not have)")
    if config.backend != "func" or config.meta_schedule != "every":
        raise ConfigError(f"GatedKDTrainer runs the meta gate's func look-ahead every step; got meta_backend="
                          f"{config.backend!r}, meta_schedule={config.meta_schedule!r} (AMAL's closed form needs "
                          "metagate's feature protocol)")
    if config.meta_no_reuse:
        raise ConfigError("GatedKDTrainer's meta look-ahead reuses the real forward's logits; drop meta_no_reuse")


def _eager_attention(model: nn.Module) -> None:
    """Run the student's attention in eager mode: the meta look-ahead differentiates the real forward twice,
    and the fused sdpa / flash kernels have no double backward (the values are the same)."""
    cfg = getattr(model, "config", None)
    impl = getattr(cfg, "_attn_implementation", None)
    if impl in (None, "eager"):
        return
    setter = getattr(model, "set_attn_implementation", None)
    if not callable(setter):
        raise ConfigError(f"the meta gate's look-ahead needs a double backward through attention, which "
                          f"attn_implementation={impl!r} lacks; load the student with attn_implementation='eager'")
    setter("eager")


def _rebuilt(te: SparseTeacher, vocab: int, tau: float, labels: Tensor) -> Tensor:
    """``[N, V]`` a sparse teacher's log-probabilities at ``tau`` for a gate: top-k, the tail uniform, and
    the gold token's own (tempered) log-probability where the bank has it."""
    lp = sparse_log_probs_at(te, vocab, tau).reshape(-1, vocab)
    if te.gold_logprob is None:
        return lp
    gold = sparse_log_prob_of(te, vocab, labels, tau, gold=True).to(lp.dtype)
    return lp.scatter(1, labels.unsqueeze(1), gold.unsqueeze(1))


def _gold_log_probs(view: UnitView, teachers: list, tau: float) -> tuple[Tensor, Tensor]:
    """``(student [N], teachers [N, K])`` log-probabilities of each position's gold token -- the student at
    temperature 1, the teachers at ``tau`` -- by one log-sum-exp per row instead of ``[N, K, V]`` tables
    (a sparse teacher: its gold log-probability and the normaliser of its uniform-tail rebuild, as
    :func:`_rebuilt` has them)."""
    s, y = view.student_logits.detach(), view.labels
    v = s.shape[-1]
    ls = s.gather(1, y.unsqueeze(1)).squeeze(1) - torch.logsumexp(s, -1)
    cols = []
    for te in teachers:
        if torch.is_tensor(te):
            t = te.reshape(-1, v).float() / tau
            cols.append(t.gather(1, y.unsqueeze(1)).squeeze(1) - torch.logsumexp(t, -1))
        else:
            cols.append(sparse_log_prob_of(te, v, y, tau, gold=True).float())
    return ls, torch.stack(cols, 1)


def _hard_gold(gate: HardGate, view: UnitView, teachers: list) -> GateOutput:
    """The ``hard`` gate's decision with gold references from the gold tokens' log-probabilities only: its own
    rule (:func:`~metagate.gates.hard.hard_gate_from_reference`: it reads nothing else), then its weights
    ``(1 - g, g/K, ...)`` (E3)."""
    b, t = view.seq_shape
    ls, lt = _gold_log_probs(view, teachers, gate.teacher_tau)
    k = lt.shape[1]
    log_pt = lt.exp().mean(1).clamp_min(1e-30).log()  # the ensemble's q_tau of the gold token
    g = hard_gate_from_reference(ls.reshape(b, t), log_pt.reshape(b, t), view.mask.reshape(b, t),
                                 gate.level).reshape(-1, 1).to(view.student_logits.dtype)
    w = torch.cat([1.0 - g, g.expand(-1, k) / k], dim=1)
    return GateOutput(w, gate.teacher_tau, trusted=True, student_tau=gate.student_tau)
