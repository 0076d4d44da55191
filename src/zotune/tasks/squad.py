"""SQuAD v1.1 as a generation task, with MeZO's prompt.

Only the official *dev* set is available offline (``SOURCES.md``), in two
SQuAD-format halves of 24 articles each: ``SQuAD/dev-v1.1.json`` and
``SQuAD/test-v1.1.json`` (both are official dev data; the second is only
named "test"). The 48 articles are pooled and split **by article**, so no
passage is shared between splits: the titles are sorted, shuffled with a fixed
seed (0), and the first 32 articles are train, the next 8 dev, the last 8 test.
Every run sees the same split. Numbers are therefore *not* comparable with
MeZO's SQuAD (which trains on the official train set and tests on dev).

Prompt (MeZO's ``SQuADv2Template``, character for character; the title is the
dataset's, underscores included)::

    Title: {title}
    Context: {context}
    Question: {question}
    Answer:

and the training target is `` {first gold answer}\\n``. ``answers`` holds the
distinct gold texts (the first one first); the metric takes the best over them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..errors import ZOError
from .base import Example, TaskData, register_task
from .readers import read_text

FILES = ("dev-v1.1.json", "test-v1.1.json")
SPLIT_SEED = 0
N_TRAIN_ARTICLES, N_DEV_ARTICLES = 32, 8  # of 48; the remaining 8 are test


def squad_prompt(title: str, context: str, question: str) -> str:
    return f"Title: {title}\nContext: {context}\nQuestion: {question.strip()}\nAnswer:"


def read_articles(path: Path) -> list[dict]:
    """The ``data`` list of a SQuAD v1.1 file (articles with title and paragraphs)."""
    try:
        obj = json.loads(read_text(path, "SQuAD file"))
    except json.JSONDecodeError as e:
        raise ZOError(f"{path}:{e.lineno}: unparsable JSON ({e.msg})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("data"), list):
        raise ZOError(f"{path}: not a SQuAD file (expected an object with a 'data' list of articles)")
    return obj["data"]


def article_examples(article: dict, path: Path) -> list[Example]:
    """One example per question of an article; gold answers deduplicated in order."""
    title = article.get("title")
    if not isinstance(title, str) or not isinstance(article.get("paragraphs"), list):
        raise ZOError(f"{path}: an article lacks 'title' or 'paragraphs'")
    out = []
    for para in article["paragraphs"]:
        for qa in para.get("qas", []):
            answers = tuple(dict.fromkeys(a["text"].strip() for a in qa.get("answers", []) if a["text"].strip()))
            if not answers:
                raise ZOError(f"{path}: question {qa.get('id', '?')!r} has no answer")
            out.append(Example(squad_prompt(title, para["context"], qa["question"]), (), 0, answers))
    return out


def split_articles(titles: list[str], seed: int = SPLIT_SEED) -> dict[str, list[str]]:
    """Deterministic train/dev/test assignment of article titles (independent of file order)."""
    order = sorted(titles)
    random.Random(seed).shuffle(order)
    a, b = N_TRAIN_ARTICLES * len(order) // 48, (N_TRAIN_ARTICLES + N_DEV_ARTICLES) * len(order) // 48
    return {"train": order[:a], "dev": order[a:b], "test": order[b:]}


@register_task("squad", "SQuAD v1.1, extractive QA as generation (greedy decoding, F1/EM; MeZO's prompt, trained by "
                        "teacher forcing on the first gold answer). Only the official dev set exists offline "
                        "(SQuAD/dev-v1.1.json + test-v1.1.json, 48 articles): split by article, deterministically "
                        "(seeded shuffle of the sorted titles): 32 train, 8 dev, 8 test articles; not comparable "
                        "with MeZO's SQuAD numbers")
def squad(data_dir: Path | None = None) -> TaskData:
    from .sentiment import default_data_dir

    root = Path(data_dir or default_data_dir()) / "SQuAD"
    by_title: dict[str, list[Example]] = {}
    for name in FILES:
        for article in read_articles(root / name):
            examples = article_examples(article, root / name)
            if article["title"] in by_title:
                raise ZOError(f"{root / name}: article {article['title']!r} appears twice")
            by_title[article["title"]] = examples
    splits = split_articles(list(by_title))
    files = " + ".join(str(root / n) for n in FILES)
    return TaskData("squad", *([ex for t in splits[s] for ex in by_title[t]] for s in ("train", "dev", "test")),
                    sources={s: f"{files} ({len(splits[s])} articles)" for s in ("train", "dev", "test")})
