"""Tasks and data."""

from metagate.data import (
    g2p,  # noqa: F401  (registers the g2p task)
    lm,  # noqa: F401  (registers the lm task; transformers is imported when it is built)
)
from metagate.data.builtin import (
    TASKS,
    get_task,
    register_task,
    task_config,
    task_config_class,
    task_config_classes,
    task_names,
    task_option_owners,
)
from metagate.data.options import TaskConfig
from metagate.data.task import Batch, Split, Task, TeacherSpec, build_task, inject_noise

__all__ = ["TASKS", "get_task", "register_task", "task_config", "task_config_class", "task_config_classes",
           "task_names", "task_option_owners", "TaskConfig", "Batch", "Split", "Task", "TeacherSpec", "build_task",
           "inject_noise"]
