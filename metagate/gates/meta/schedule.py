"""When the meta gate updates its weights.

* ``every`` (Meta-Weight-Net / L2RW): a look-ahead on the current training batch every
  ``meta_every`` steps.
* ``amal``: AMAL's schedule (``KD/train_distill_noise.py`` + ``LearnMultiLambdaMeta.py`` of
  durgas16/AMAL): at the start of epochs ``start, start + period, ...`` (10, 20, ...), one
  full pass over the training set with the student frozen in eval mode; gradients of
  groups of ``fit`` mini-batches are summed, and each group gets ``inner_iters`` (5)
  closed-form updates of the table at meta learning rate 1500 on one validation batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from metagate.errors import ConfigError

#: AMAL's settings (preset of ``--meta-schedule amal``)
AMAL_PRESET = {"backend": "closed-form", "inner_iters": 5, "meta_lr": 1500.0, "fit": 3, "start": 10, "period": 10}


@dataclass
class MetaSchedule:
    """:param kind: ``every`` | ``amal``
    :param every: steps between per-step meta updates (``every``)
    :param start: first epoch with a full pass (``amal``)
    :param period: epochs between full passes (``amal``)
    """

    kind: str = "every"
    every: int = 1
    start: int = AMAL_PRESET["start"]  # type: ignore[assignment]
    period: int = AMAL_PRESET["period"]  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.kind not in ("every", "amal"):
            raise ConfigError(f"--meta-schedule must be every or amal, got {self.kind!r}")
        if self.every < 1:
            raise ConfigError(f"--meta-every must be >= 1, got {self.every}")
        if self.start < 0 or self.period < 1:
            raise ConfigError(f"amal schedule needs start >= 0 and period >= 1, got {self.start}, {self.period}")

    def per_step(self, step: int) -> bool:
        """A look-ahead on this step's batch?"""
        return self.kind == "every" and step % self.every == 0

    def full_pass(self, epoch: int, step_in_epoch: int) -> bool:
        """A full pass over the training set before this step (first step of an AMAL epoch)?"""
        return (self.kind == "amal" and step_in_epoch == 0 and epoch >= self.start
                and (epoch - self.start) % self.period == 0)
