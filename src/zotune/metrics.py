"""The metric a split is scored with: accuracy, or SQuAD F1 (with exact match) for generation.

:func:`score_split` is what the recipe, ``zotune eval`` and the benchmarks call:
classification and multiple choice keep :meth:`Scorer.accuracy` (the best
candidate is the gold one); generation examples (those with ``answers``) are
decoded greedily and scored with the official SQuAD v1.1 definitions, written
here from the definitions (not copied):

* normalize a text: lower-case, drop ASCII punctuation, drop the articles
  *a*, *an*, *the* (as whole words), collapse whitespace;
* exact match: the normalized prediction equals the normalized gold answer;
* F1: over the bags of normalized words, ``2PR/(P+R)``; 0 when no word is shared;
* with several gold answers, the best score over them; the split's value is
  the mean over questions.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .errors import ZOError
from .tasks import Example

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalization, in its order: lower case, punctuation, articles, whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    shared = sum((Counter(pred) & Counter(ref)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(pred), shared / len(ref)
    return 2 * precision * recall / (precision + recall)


def best_over_golds(metric: Callable[[str, str], float], prediction: str, golds: Sequence[str]) -> float:
    if not golds:
        raise ZOError("a question has no gold answer")
    return max(metric(prediction, g) for g in golds)


def squad_scores(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean EM and F1 (fractions in [0, 1]) of ``predictions`` against their gold answer lists."""
    if len(predictions) != len(golds) or not golds:
        raise ZOError(f"{len(predictions)} predictions for {len(golds)} questions")
    n = len(golds)
    return {"f1": sum(best_over_golds(f1, p, g) for p, g in zip(predictions, golds)) / n,
            "em": sum(best_over_golds(exact_match, p, g) for p, g in zip(predictions, golds)) / n}


def is_generation(examples: Sequence[Example]) -> bool:
    """True for generation examples (gold ``answers``, no candidates); a mixed split is an error."""
    kinds = {bool(e.answers) for e in examples}
    if len(kinds) > 1:
        raise ZOError("a split mixes generation and classification examples")
    return kinds == {True}


def metric_name(examples: Sequence[Example]) -> str:
    return "f1" if is_generation(examples) else "accuracy"


@dataclass
class Score:
    """A split's score: ``value`` is the metric named ``metric``; ``extra`` holds the others (EM)."""

    metric: str
    value: float
    n: int
    extra: dict[str, float] = field(default_factory=dict)
    predictions: list[str] = field(default_factory=list)


def score_split(scorer, examples: Sequence[Example], batch_size: int = 32, progress: bool = False,
                desc: str = "eval", max_new_tokens: int | None = None) -> Score:
    """Score ``examples`` with their task's metric (accuracy, or SQuAD F1 with EM in ``extra``)."""
    if not examples:
        raise ZOError("cannot evaluate on an empty split")
    if not is_generation(examples):
        return Score("accuracy", scorer.accuracy(examples, batch_size, progress=progress, desc=desc), len(examples))
    from .generation import MAX_NEW_TOKENS, greedy_generate

    if progress:
        import sys
        print(f"zotune: {desc}: generating answers for {len(examples)} questions", file=sys.stderr)
    preds = greedy_generate(scorer.model, scorer.tok, [e.prompt for e in examples],
                            max_new_tokens or MAX_NEW_TOKENS, scorer.max_length, batch_size)
    scores = squad_scores(preds, [e.answers for e in examples])
    return Score("f1", scores["f1"], len(examples), {"em": scores["em"]}, preds)
