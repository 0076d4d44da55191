"""In-context learning: prepend N solved training examples to every prompt.

A demonstration is a training example rendered with the task's own template
and completed with its gold answer: ``prompt + candidates[label]`` for
classification, ``prompt + target`` (the first gold answer) for generation.
Demonstrations are joined by a blank line, MeZO's separator, and the query's
prompt follows the last one. The same N demonstrations, drawn once from the
train split with ``random.Random(seed)``, serve every evaluated example, so a
seed fixes the whole prompt set.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Sequence

from ..errors import ZOError
from .base import Example

SEPARATOR = "\n\n"


def demonstration(example: Example) -> str:
    """The example's prompt completed with its gold answer (no trailing newline)."""
    if example.answers:
        from ..generation import target_text

        text = example.prompt + target_text(example)
    else:
        text = example.prompt + example.candidates[example.label]
    return text.rstrip("\n")


def sample_demonstrations(pool: Sequence[Example], n: int, seed: int) -> list[Example]:
    if n < 0:
        raise ZOError(f"--icl must be >= 0, got {n}")
    if n > len(pool):
        raise ZOError(f"--icl {n}: the train split has only {len(pool)} examples")
    return random.Random(seed).sample(list(pool), n)


def with_demonstrations(examples: Sequence[Example], pool: Sequence[Example], n: int, seed: int = 0) -> list[Example]:
    """``examples`` with N seeded demonstrations from ``pool`` prepended to each prompt (0: unchanged)."""
    if n == 0:
        return list(examples)
    prefix = "".join(demonstration(d) + SEPARATOR for d in sample_demonstrations(pool, n, seed))
    return [replace(e, prompt=prefix + e.prompt) for e in examples]
