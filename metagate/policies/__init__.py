"""Gate policies: stable-baselines3 and plain torch (installed as metagate.policies).

The stable-baselines3 policy lives in :mod:`metagate.policies.sb3` (imported lazily, so using the
in-loop REINFORCE gate does not need stable-baselines3).
"""

from metagate.policies.core import (
    TeacherEncoder,
    TeacherGaussian,
    TeacherLogitHead,
    selection_weights,
    split_kd_share,
    teacher_probs,
)
from metagate.policies.reinforce import BernoulliSelection, ReinforceLearner, ReinforcePolicy

__all__ = ["TeacherEncoder", "TeacherGaussian", "TeacherLogitHead", "selection_weights", "split_kd_share",
           "teacher_probs", "BernoulliSelection", "ReinforceLearner", "ReinforcePolicy"]
