"""Tasks: data files -> :class:`Example` (prompt + candidates + gold index)."""

from .base import TASKS, Example, TaskData, load_task, register_task
from . import sentiment  # noqa: F401  (registration side effects)

__all__ = ["TASKS", "Example", "TaskData", "load_task", "register_task"]
