"""Forward hooks that keep the activations of the student's real training forward, for look-aheads that reuse
them instead of running a forward of their own (the hand-written linear look-ahead, the hand-written ``J v``)."""

from __future__ import annotations

import math
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
    the given logits, or a view of them (a sequence model's ``[B, T, C]`` flattened to token units), else ``None``
    (a later forward, or a paused capture, replaced some). The logits themselves are never held: a weak reference to
    the output's root tensor (its base, when it is a view) and its place in it identify them (a view keeps its base
    alive, so the flattened rows still point at the output's). Capture can be
    paused (:attr:`active`) around forwards that must not overwrite it, e.g. a look-ahead's own.

    :param mods: the modules to hook, in forward order
    :param extra: what else to keep per module, from its output (default: nothing)
    """

    def __init__(self, mods: Sequence[nn.Module], extra: ExtraFn | None = None) -> None:
        self.mods = list(mods)
        self.active = True
        self._forwards = 0
        self._kept = [Kept(-1, torch.empty(0), None, False)] * len(self.mods)
        self._out_ref: Callable[[], Tensor | None] | None = None
        #: the output's address, shape, strides and contiguity (what identifies it, and views of its rows, in its root)
        self._out: tuple[int, tuple[int, ...], tuple[int, ...], bool] = (0, (), (), False)
        self._handles: list[RemovableHandle] = [m.register_forward_hook(self._hook(i, extra))
                                                for i, m in enumerate(self.mods)]

    def remove(self) -> None:
        """Detach the hooks."""
        for h in self._handles:
            h.remove()

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
            if last:  # the output's root tensor (a view's base) and where in it the output lies
                self._out_ref = weakref.ref(_root(output))
                self._out = (output.data_ptr(), tuple(output.shape), output.stride(), output.is_contiguous())

        return hook

    def kept_for(self, logits: Tensor) -> list[Kept] | None:
        """Per module, what was kept from the forward that made ``logits``; ``None`` when not all of it is.

        :param logits: ``[N, C]`` the real forward's logits (the last module's output), or a sequence model's
            ``[B, T, C]`` output flattened to token units ``[B*T, C]`` (a view of it)
        """
        out = self._out_ref() if self._out_ref is not None else None
        kept = list(self._kept)  # later forwards replace entries, never the tensors kept here
        ptr, shape, stride, contiguous = self._out
        same_rows = (tuple(logits.shape), logits.stride()) == (shape, stride) or (
            contiguous and logits.is_contiguous() and logits.numel() == math.prod(shape) and logits.shape[-1] == shape[-1])
        made = out is not None and _root(logits) is out and logits.data_ptr() == ptr and same_rows
        if not made or any(k.forward != kept[-1].forward for k in kept):
            return None
        return kept


def _root(t: Tensor) -> Tensor:
    """The tensor that owns ``t``'s memory as autograd sees it (``t`` itself unless it is a view)."""
    return t._base if t._base is not None else t
