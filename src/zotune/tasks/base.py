"""Examples, task splits and the registry of named tasks.

A task turns data files into :class:`Example` objects: a prompt and the
candidate continuations to score, with the index of the gold one. Everything
downstream (training loss, accuracy) only sees examples, so a new task is a
loader function, nothing more.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import ZOError


@dataclass(frozen=True)
class Example:
    """A prompt, its candidate continuations, and the gold candidate's index."""

    prompt: str
    candidates: tuple[str, ...]
    label: int


@dataclass
class TaskData:
    """The splits of one task, with where each came from (shown by ``zotune tasks``)."""

    name: str
    train: list[Example]
    dev: list[Example]
    test: list[Example] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)

    def subsample(self, seed: int, train: int | None, dev: int | None, test: int | None) -> "TaskData":
        """MeZO's protocol: a seeded sample of each split (None or 0 keeps it whole)."""
        def take(xs: list[Example], n: int | None, salt: int) -> list[Example]:
            if not n or n >= len(xs):
                return list(xs)
            return random.Random(seed * 1000 + salt).sample(xs, n)

        return TaskData(self.name, take(self.train, train, 1), take(self.dev, dev, 2),
                        take(self.test, test, 3), dict(self.sources))


TaskLoader = Callable[[Path | None], TaskData]
TASKS: dict[str, tuple[TaskLoader, str]] = {}


def register_task(name: str, description: str):
    """Decorator: register ``fn(data_dir) -> TaskData`` under ``name``."""
    def wrap(fn: TaskLoader) -> TaskLoader:
        TASKS[name] = (fn, description)
        return fn
    return wrap


def load_task(name: str, data_dir: Path | None = None) -> TaskData:
    if name not in TASKS:
        raise ZOError(f"unknown task {name!r}; choose one of: {', '.join(sorted(TASKS))}")
    data = TASKS[name][0](data_dir)
    for split in ("train", "dev"):
        if not getattr(data, split):
            raise ZOError(f"task {name!r} has an empty {split} split")
    return data
