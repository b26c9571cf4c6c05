"""metagate: learned gates for knowledge distillation."""

from metagate.api import compare_gates, distill
from metagate.gates import GATES, Gate, GateOutput, StepContext, UnitView
from metagate.losses import reduce_weighted, unit_losses
from metagate.teacher_sources import online
from metagate.trainer import TrainConfig, Trainer

__version__ = "0.1.0"
__all__ = ["GATES", "Gate", "GateOutput", "StepContext", "UnitView", "Trainer", "TrainConfig", "unit_losses",
           "reduce_weighted", "distill", "compare_gates", "online", "__version__"]

import metagate.envs  # noqa: E402,F401  (registers metagate/TeacherWeighting-v0 with gymnasium)
