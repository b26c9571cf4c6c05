"""metagate: learned gates for knowledge distillation."""

from metagate.api import compare_gates, distill
from metagate.callbacks import BaseCallback, CallbackList
from metagate.gates import GATES, Gate, GateOutput, StepContext, UnitView
from metagate.losses import reduce_weighted, unit_losses
from metagate.teachers.sources import online
from metagate.trainer import TrainConfig, Trainer

__version__ = "0.1.0"
__all__ = ["GATES", "Gate", "GateOutput", "StepContext", "UnitView", "Trainer", "TrainConfig", "unit_losses",
           "reduce_weighted", "distill", "compare_gates", "online", "BaseCallback", "CallbackList", "__version__"]

from metagate.envs.registration import install as _install_envs  # noqa: E402

_install_envs()  # metagate/TeacherWeighting-v0 and InstanceTemperature-v0, without importing gymnasium now
