"""Tasks and data."""

from metagate.data import g2p  # noqa: F401  (registers the g2p task)
from metagate.data.builtin import TASKS, get_task, register_task, task_names
from metagate.data.task import Batch, Split, Task, TeacherSpec, build_task, inject_noise

__all__ = ["TASKS", "get_task", "register_task", "task_names", "Batch", "Split", "Task", "TeacherSpec", "build_task",
           "inject_noise"]
