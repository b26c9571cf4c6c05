"""Forward hooks that keep the activations of the student's real training forward, for look-aheads that reuse
them instead of running a forward of their own (the hand-written linear look-ahead, the hand-written ``J v``)."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

#: what a hook keeps besides a module's input: ``(module, output) -> tensor or None``
ExtraFn = Callable[[nn.Module, Tensor], Tensor | None]


class Kept(NamedTuple):
    """What one module's hook kept from one forward."""

    forward: int  #: which forward (counted by the first hooked module)
    input: Tensor  #: the module's input, detached
    extra: Tensor | None  #: what the ``extra`` function returned
    training: bool  #: the module's mode in that forward


class ForwardCapture:
    """Forward hooks on ``mods`` (in forward order; the last one's output is the logits) that keep each one's input
    from the latest forward run in grad mode -- a training step's; evaluation's large batches are not held.

    :meth:`kept_for` hands the kept activations out only when every one of them comes from the forward that made
    the given logits, or their rows flattened to token units (else a later forward, or a paused capture, replaced
    some). Capture can be paused (:attr:`active`) around forwards that must not overwrite it, e.g. a look-ahead's
    own.

    :param mods: the modules to hook, in forward order
    :param extra: what else to keep per module, from its output (default: nothing)
    """

    def __init__(self, mods: Sequence[nn.Module], extra: ExtraFn | None = None) -> None:
        self.mods = list(mods)
        self.active = True
        self._forwards = 0
        self._kept = [Kept(-1, torch.empty(0), None, False)] * len(self.mods)
        self._out_ref: Callable[[], Tensor | None] | None = None
        self._flat: _Flat | None = None
        self._handles: list[RemovableHandle] = [m.register_forward_hook(self._hook(i, extra))
                                                for i, m in enumerate(self.mods)]

    def remove(self) -> None:
        """Detach the hooks."""
        for h in self._handles:
            h.remove()
        self._flat = None  # the held output

    def _hook(self, i: int, extra: ExtraFn | None) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], None]:
        last = i == len(self.mods) - 1
        kept = self._kept

        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if not self.active or not torch.is_grad_enabled():
                return
            if i == 0:
                self._forwards += 1
            kept[i] = Kept(self._forwards, inputs[0].detach(), None if extra is None else extra(module, output),
                           module.training)
            if last:
                self._out_ref = weakref.ref(output)
                self._flat = _Flat.of(output)

        return hook

    def kept_for(self, logits: Tensor) -> list[Kept] | None:
        """Per module, what was kept from the forward that made ``logits``; ``None`` when not all of it is.

        :param logits: ``[N, C]`` the real forward's logits (the last module's output), or a sequence model's
            ``[B, T, C]`` output flattened to token units ``[B*T, C]`` (a view of it)
        """
        out = self._out_ref() if self._out_ref is not None else None
        kept = list(self._kept)  # later forwards replace entries, never the tensors kept here
        made = out is logits or (self._flat is not None and self._flat.holds(logits))
        if not made or any(k.forward != kept[-1].forward for k in kept):
            return None
        return kept


class _Flat(NamedTuple):
    """A ``[..., C]`` output (a sequence model's ``[B, T, C]``) as its ``[N, C]`` rows: the trainer flattens it to
    token units and drops the original, so identity cannot be checked. Its memory is held instead (one batch's
    logits, until the next forward): while it is, a contiguous ``[N, C]`` tensor starting at its address can only
    be the flattened output."""

    storage: torch.UntypedStorage
    ptr: int
    shape: tuple[int, int]

    @staticmethod
    def of(output: Tensor) -> _Flat | None:
        if output.dim() <= 2 or not output.is_contiguous():
            return None
        return _Flat(output.untyped_storage(), output.data_ptr(), (output.numel() // output.shape[-1], output.shape[-1]))

    def holds(self, logits: Tensor) -> bool:
        """Whether ``logits`` are the output's rows (the same memory, shape and layout)."""
        return logits.data_ptr() == self.ptr and tuple(logits.shape) == self.shape and logits.is_contiguous() \
            and logits.untyped_storage().data_ptr() == self.storage.data_ptr()
