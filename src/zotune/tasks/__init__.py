"""Tasks: data files -> :class:`Example` (prompt + candidates + gold index).

Registered tasks (``zotune tasks`` lists them): rotten-tomatoes and sst2
(:mod:`.sentiment`), sst2-glue (:mod:`.sentiment`), the SuperGLUE tasks with
MeZO's prompts (:mod:`.superglue`) and the LM-BFF k-shot suite
(:mod:`.lmbff`) and SQuAD v1.1 as generation (:mod:`.squad`). The user's own files load through :func:`load_user_files` and
:func:`load_task_file` (:mod:`.files`), which register nothing.
"""

from ..errors import ZOError
from .base import TASKS, Example, TaskData, hold_out, load_task, register_task
from . import sentiment, superglue, lmbff, squad  # noqa: F401  (registration side effects)
from .files import load_task_file, load_user_files
from .lmbff import lmbff_task

MIN_TRAIN_TO_CARVE = 10  # a user's training file without a dev file gives a fifth of itself (at most 500) as dev


def resolve_task(task: str, data_dir=None, train_file: str = "", dev_file: str = "", test_file: str = "",
                 **fields) -> TaskData:
    """The task a run asked for: its own files, a YAML task file, or a registered task by name.

    ``fields`` are :func:`load_user_files`' keyword arguments (text_field, template, ...).
    """
    if train_file or dev_file or test_file:
        data = load_user_files(train_file or None, dev_file or None, test_file or None, **fields)
    elif task.endswith((".yaml", ".yml")):
        data = load_task_file(task)
    else:
        return load_task(task, data_dir)
    if data.train and not data.dev and len(data.train) >= MIN_TRAIN_TO_CARVE:
        # no dev file: hold out a fixed part of the training file (the same split for every run)
        data.train, data.dev = hold_out(data.train, min(500, len(data.train) // 5))
        data.sources["dev"] = f"held out from the training data ({len(data.dev)} examples)"
    for split in ("train", "dev"):
        if not getattr(data, split):
            raise ZOError(f"task {data.name!r} has no {split} data (give --{split}-file"
                          + (f", or at least {MIN_TRAIN_TO_CARVE} training examples to hold a dev split out of"
                             if split == "dev" else "") + ")")
    return data


__all__ = ["resolve_task", "TASKS", "Example", "TaskData", "load_task", "register_task", "load_user_files", "load_task_file",
           "lmbff_task"]
