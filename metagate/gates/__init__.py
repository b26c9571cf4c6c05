"""Gates: how much each unit learns from the label and from each teacher."""

from metagate.gates import baselines as _baselines  # noqa: F401  (registers label-filter, best-teacher, conf-teachers, ca-mkd)
from metagate.gates import compose as _compose  # noqa: F401  (registers meta+policy, {hard,meta}+{temperature,ctkd})
from metagate.gates import fixed as _fixed  # noqa: F401  (registers fixed, ce)
from metagate.gates import hard as _hard  # noqa: F401  (registers hard)
from metagate.gates import meta as _meta  # noqa: F401  (registers meta)
from metagate.gates import oracle as _oracle  # noqa: F401  (registers oracle-filter, oracle-teachers)
from metagate.gates import policy as _policy  # noqa: F401  (registers policy, reinforce)
from metagate.gates import temperature as _temperature  # noqa: F401  (registers temperature, ctkd)
from metagate.gates import tuned as _tuned  # noqa: F401  (registers fixed-tuned)
from metagate.gates.base import Gate, GateConfig, GateContext, GateOutput, StepContext, UnitView
from metagate.gates.registry import GATES, gate_config, get_gate_class, option_owners, register

__all__ = ["Gate", "GateConfig", "GateContext", "GateOutput", "StepContext", "UnitView", "GATES", "gate_config",
           "get_gate_class", "option_owners", "register"]
