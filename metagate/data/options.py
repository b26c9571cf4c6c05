"""The options a task takes, written once as a config dataclass per task (as a gate's ``config_class``).

Every task has a :class:`TaskConfig` subclass: its fields are the task's own options (g2p's ``subset``,
fashion's ``data_dir``, ...), from which the command line's flags and the YAML keys are generated
(:mod:`metagate.cli_args`) and which :func:`metagate.run.load_task` hands to the task's builder. The options
every task shares (``noise``, ``noise_type``, ``data_seed``, ``val_fraction``) stay options of the run
(:class:`metagate.run.DistillConfig`). A built-in task declares its config with
``register_task(name, config=...)``; a plugin task's builder declares it as its ``config_class`` attribute
(:mod:`metagate.data.plugins`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from metagate.options import Options, option_values

if TYPE_CHECKING:
    from metagate.data.task import Task


@dataclass
class TaskConfig(Options):
    """A task without options of its own (the base of every task's config)."""

    #: teachers trained when ``--teachers`` is not given (:class:`metagate.run.DistillConfig`); a task that
    #: defines fewer teacher architectures sets its own count
    default_teachers: ClassVar[int] = 3

    def builder_kwargs(self) -> dict[str, Any]:
        """The keywords the task's builder gets from these options (default: every option by its name)."""
        return option_values(self)

    def check_task(self, task: Task) -> None:
        """Checks that need the built task (e.g. a size against its vocabulary); run before any teacher work."""
