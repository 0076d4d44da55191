"""Tasks: data files -> :class:`Example` (prompt + candidates + gold index).

Registered tasks (``zotune tasks`` lists them): rotten-tomatoes and sst2
(:mod:`.sentiment`), sst2-glue (:mod:`.sentiment`), the SuperGLUE tasks with
MeZO's prompts (:mod:`.superglue`) and the LM-BFF k-shot suite
(:mod:`.lmbff`). The user's own files load through :func:`load_user_files` and
:func:`load_task_file` (:mod:`.files`), which register nothing.
"""

from .base import TASKS, Example, TaskData, load_task, register_task
from . import sentiment, superglue, lmbff  # noqa: F401  (registration side effects)
from .files import load_task_file, load_user_files
from .lmbff import lmbff_task

__all__ = ["TASKS", "Example", "TaskData", "load_task", "register_task", "load_user_files", "load_task_file",
           "lmbff_task"]
