"""Options of the ``meta`` gate (one dataclass: the command line, YAML keys and HPARAMS come from it)."""

from __future__ import annotations

from dataclasses import dataclass

from metagate.errors import ConfigError
from metagate.gates.base import GateConfig
from metagate.gates.meta.schedule import AMAL_PRESET
from metagate.options import option

BACKENDS = ("func", "higher", "closed-form")
#: the meta learning rate when unset: plain SGD on the table rows (as AMAL), Adam on the net
DEFAULT_META_LR = {"table": 1500.0, "net": 1e-3}


@dataclass
class MetaConfig(GateConfig):
    """Bilevel per-unit weights over (label, teacher 1..K); see :class:`metagate.gates.meta.MetaGate`."""

    meta_param: str = option("table", "per-unit weight table (AMAL) or a net over unit features (Meta-Weight-Net)",
                             choices=("table", "net"))
    meta_backend: str | None = option(None, "hypergradient backend (unset: func; closed-form under "
                                            "--meta-schedule amal)", choices=BACKENDS)
    meta_columns: str = option("all", "learn every column; only the label/KD split (one shared teacher weight); "
                                      "or only the label weight, teachers held at --meta-init-teacher",
                               choices=("all", "split", "label"))
    meta_transform: str = option("clamp", "table: clamp to [1e-7, 2) as AMAL, 2*sigmoid, or softmax over columns",
                                 choices=("clamp", "sigmoid", "softmax"))
    meta_lookahead: str = option("all", "parameters of the virtual step: all, last (the head) or comma-separated "
                                        "name prefixes")
    meta_every: int = option(1, "steps between look-aheads")
    meta_lr: float | None = option(None, "meta learning rate (unset: 1500 for the table with plain SGD, as AMAL; "
                                         "1e-3 for the net with Adam)")
    meta_schedule: str = option("every", "a look-ahead every --meta-every steps, or AMAL's preset (full "
                                         "closed-form pass every 10 epochs from epoch 10, groups of 3 batches, "
                                         "5 iterations, lr 1500)", choices=("every", "amal"))
    meta_tau: float = option(4.0, "KD temperature (> 0)")
    meta_init_label: float | None = option(None, "initial label weight (unset: 0.5, fixed's alpha; AMAL's 0.1 "
                                                 "under the amal schedule)", shown="0.5")
    meta_init_teacher: float | None = option(None, "initial weight of each teacher column (unset: (1 - label) / K, "
                                                   "a row of total weight 1 as fixed's; AMAL's 0.9 under the amal "
                                                   "schedule: total 0.1 + 0.9 K)", shown="(1 - label) / K")
    meta_normalize: str = option("none", "none (AMAL); unit: rows sum to the initial row sum; column: per batch, "
                                         "each column's mean is held at its initial value",
                                 choices=("none", "unit", "column"))
    meta_val_batch: int = option(0, "validation batch size from the meta split (0: the training batch size; "
                                    "1000 under amal)")
    meta_hidden: int = option(32, "net: hidden width")
    meta_inner_iters: int | None = option(None, "updates per look-ahead (unset: 1; 5 under amal)")
    meta_fit: int = option(int(AMAL_PRESET["fit"]), "amal: mini-batches per group")
    meta_no_reuse: bool = option(False, "func: forward the training batch again instead of reusing the real "
                                        "forward")
    meta_product: str = option("forward", "func with batch norm: the look-ahead's Jacobian-vector product by "
                                          "forward-mode AD (exact) or a central difference (two plain forwards; "
                                          "~1%% error in float32)", choices=("forward", "difference"))

    def __post_init__(self) -> None:
        super().__post_init__()
        amal = self.meta_schedule == "amal"
        if amal and self.meta_backend not in (None, "closed-form"):
            raise ConfigError("--meta-schedule amal uses the closed-form backend (AMAL's look-ahead); "
                              f"drop --meta-backend {self.meta_backend}")
        if not self.meta_tau > 0:
            raise ConfigError(f"--meta-tau must be > 0, got {self.meta_tau}")
        if self.meta_lr is not None and not self.meta_lr > 0:
            raise ConfigError(f"--meta-lr must be > 0, got {self.meta_lr}")
        for name in ("meta_every", "meta_hidden", "meta_fit", "meta_inner_iters"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
        if self.meta_val_batch < 0:
            raise ConfigError(f"--meta-val-batch must be >= 0, got {self.meta_val_batch}")
        if self.backend == "closed-form" and self.meta_lookahead not in ("all", "last"):
            raise ConfigError("the closed-form backend always looks ahead over the last layer; "
                              "drop --meta-lookahead")

    # -- resolved values ("unset" decided by the schedule and the parameterisation) ----------------
    @property
    def init_label(self) -> float:
        """The initial label weight: 0.5 (fixed's alpha), or AMAL's 0.1 under its preset."""
        if self.meta_init_label is not None:
            return self.meta_init_label
        return 0.1 if self.meta_schedule == "amal" else 0.5

    def init_teacher(self, num_teachers: int) -> float:
        """The initial weight of each teacher column: ``(1 - label) / K`` (the row starts at fixed's, total 1),
        or AMAL's 0.9 under its preset (AMAL's rows start at ``0.1 + 0.9 K``, unnormalised)."""
        if self.meta_init_teacher is not None:
            return self.meta_init_teacher
        if self.meta_schedule == "amal":
            return 0.9
        return (1.0 - self.init_label) / max(num_teachers, 1)

    @property
    def backend(self) -> str:
        return self.meta_backend or ("closed-form" if self.meta_schedule == "amal" else "func")

    @property
    def lookahead(self) -> str:
        """The parameters of the virtual step: ``last`` (the head) under the closed-form backend."""
        return "last" if self.backend == "closed-form" else self.meta_lookahead

    @property
    def lr(self) -> float:
        if self.meta_lr is not None:
            return self.meta_lr
        return float(AMAL_PRESET["meta_lr"]) if self.meta_schedule == "amal" else DEFAULT_META_LR[self.meta_param]

    @property
    def inner_iters(self) -> int:
        if self.meta_inner_iters is not None:
            return self.meta_inner_iters
        return int(AMAL_PRESET["inner_iters"]) if self.meta_schedule == "amal" else 1
