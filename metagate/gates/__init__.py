"""Gates: how much each unit learns from the label and from each teacher."""

from metagate.gates import fixed as _fixed  # noqa: F401  (registers fixed, ce)
from metagate.gates import hard as _hard  # noqa: F401  (registers hard)
from metagate.gates import meta as _meta  # noqa: F401  (registers meta)
from metagate.gates import policy as _policy  # noqa: F401  (registers policy, reinforce)
from metagate.gates.base import Gate, GateOutput, StepContext, UnitView
from metagate.gates.registry import GATES, get_gate_class, register

__all__ = ["Gate", "GateOutput", "StepContext", "UnitView", "GATES", "get_gate_class", "register"]
