"""SuperGLUE with MeZO's prompts: boolq, cb, copa, multirc, rte, wic, wsc, record.

Files are the SuperGLUE jsonl releases, read in place from
``<data_dir>/<TASK>/{train,val}.jsonl`` (``data_dir`` defaults to
``default_data_dir()``: ``$ZOTUNE_DATA`` or ``../shared/data``).

Prompts and verbalizers are those of MeZO's ``large_models/templates.py``
(princeton-nlp/MeZO), character for character; the candidate is the text
MeZO's ``verbalize`` appends to the prompt (so no leading space after a newline,
see :class:`~zotune.tasks.base.Example`).

Splits follow MeZO's protocol, which samples its *test* examples from the
SuperGLUE validation set (the test labels are not public) and its *dev*
examples from the training set, disjoint from the training sample:

* ``test`` = the whole validation file;
* ``dev`` = a fixed, seeded hold-out of the training file (100 examples for
  CB, COPA and WSC, 500 for the others; whole passages for MultiRC);
* ``train`` = the rest of the training file.

Two tasks lack files for that (see ``SOURCES.md``): BoolQ has only the
FewGLUE 32-example train subset, so its dev is a seeded 500 of the
validation set and its test the other 2,770; ReCoRD has only the FewGLUE 32
(no validation data at all), so its dev is a seeded 8 of them, its train the
other 24, and it has no test split: ReCoRD numbers from it are a smoke test,
not comparable with MeZO's.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable, Iterable

from ..errors import ZOError
from .base import Example, TaskData, hold_out, register_task
from .readers import get_field, get_text, iter_jsonl

HOLDOUT_SEED = 0  # fixed: every run sees the same train/dev split

Builder = Callable[[dict, Path, int], Iterable[Example]]


def _root(data_dir: Path | None, folder: str) -> Path:
    from .sentiment import default_data_dir

    return Path(data_dir or default_data_dir()) / folder


def _read(path: Path, build: Builder) -> list[Example]:
    return [ex for lineno, rec in iter_jsonl(path, "SuperGLUE file") for ex in build(rec, path, lineno)]


def _label(rec: dict, path: Path, lineno: int, mapping: dict) -> int:
    value = get_field(rec, "label", path, lineno)
    if isinstance(value, bool) or not isinstance(value, (int, str)) or value not in mapping:
        raise ZOError(f"{path}:{lineno}: field 'label': unknown label {value!r} (expected one of "
                      f"{', '.join(map(repr, mapping))})")
    return mapping[value]


BOOL = {False: 0, True: 1}


def _bool_label(rec: dict, path: Path, lineno: int) -> int:
    value = get_field(rec, "label", path, lineno)
    if not isinstance(value, bool):
        raise ZOError(f"{path}:{lineno}: field 'label': unknown label {value!r} (expected true or false)")
    return BOOL[value]


# -- one builder per task: record -> Example(s), MeZO's template ---------------------------------

YES_NO = ("Yes", "No")
NO_YES = ("No", "Yes")


def boolq_example(rec: dict, path: Path, lineno: int) -> Iterable[Example]:
    """BoolQTemplateV3 (MeZO's default for BoolQ): ``{passage} {Question?}\\n`` -> Yes / No."""
    passage = get_text(rec, "passage", path, lineno)
    question = get_text(rec, "question", path, lineno)
    if not question.endswith("?"):
        question += "?"
    question = question[0].upper() + question[1:]
    yield Example(f"{passage} {question}\n", YES_NO, 1 - _bool_label(rec, path, lineno))


CB_LABELS = {"entailment": 0, "contradiction": 1, "neutral": 2}


def cb_example(rec: dict, path: Path, lineno: int) -> Iterable[Example]:
    premise = get_text(rec, "premise", path, lineno)
    hypothesis = get_text(rec, "hypothesis", path, lineno)
    yield Example(f'Suppose {premise} Can we infer that "{hypothesis}"? Yes, No, or Maybe?\n',
                  ("Yes", "No", "Maybe"), _label(rec, path, lineno, CB_LABELS))


def copa_choice(choice: str) -> str:
    """MeZO's "correct" capitalization: lower-case the first word unless it is "I"."""
    words = choice.split(" ")
    if words[0] != "I":
        words[0] = words[0].lower()
    return " ".join(words)


def copa_example(rec: dict, path: Path, lineno: int) -> Iterable[Example]:
    """``<premise without its final period> because|so`` -> `` <choice>`` (whole sentences)."""
    premise = get_text(rec, "premise", path, lineno)
    if premise.endswith("."):
        premise = premise[:-1]
    question = get_field(rec, "question", path, lineno)
    if question not in ("cause", "effect"):
        raise ZOError(f"{path}:{lineno}: field 'question': expected 'cause' or 'effect', got {question!r}")
    conj = " because" if question == "cause" else " so"
    choices = tuple(" " + copa_choice(get_text(rec, f"choice{i}", path, lineno)) for i in (1, 2))
    yield Example(premise + conj, choices, _label(rec, path, lineno, {0: 0, 1: 1}))


def multirc_examples(rec: dict, path: Path, lineno: int) -> Iterable[Example]:
    """One example per answer option (how SuperGLUE scores MultiRC): is this answer correct?"""
    paragraph = get_text(rec, "passage.text", path, lineno)
    questions = get_field(rec, "passage.questions", path, lineno)
    for q in questions:
        question = get_text(q, "question", path, lineno)
        for a in get_field(q, "answers", path, lineno):
            answer = get_text(a, "text", path, lineno, allow_empty=True)  # a few options are empty strings
            yield Example(f'{paragraph}\nQuestion: {question}\nI found this answer "{answer}". '
                          f"Is that correct? Yes or No?\n", NO_YES, _label(a, path, lineno, {0: 0, 1: 1}))


RTE_LABELS = {"entailment": 0, "not_entailment": 1}


def rte_example(rec: dict, path: Path, lineno: int) -> Iterable[Example]:
    premise = get_text(rec, "premise", path, lineno)
    hypothesis = get_text(rec, "hypothesis", path, lineno)
    yield Example(f'{premise}\nDoes this mean that "{hypothesis}" is true? Yes or No?\n',
                  YES_NO, _label(rec, path, lineno, RTE_LABELS))


def wic_example(rec: dict, path: Path, lineno: int) -> Iterable[Example]:
    word = get_text(rec, "word", path, lineno)
    s1 = get_text(rec, "sentence1", path, lineno)
    s2 = get_text(rec, "sentence2", path, lineno)
    yield Example(f'Does the word "{word}" have the same meaning in these two sentences? Yes, No?\n{s1}\n{s2}\n',
                  NO_YES, _bool_label(rec, path, lineno))


def wsc_example(rec: dict, path: Path, lineno: int) -> Iterable[Example]:
    text = get_text(rec, "text", path, lineno)
    span1 = get_text(rec, "target.span1_text", path, lineno)
    span2 = get_text(rec, "target.span2_text", path, lineno)
    yield Example(f'{text}\nIn the previous sentence, does the pronoun "{span2.lower()}" refer to {span1}? '
                  f"Yes or No?\n", NO_YES, _bool_label(rec, path, lineno))


def record_examples(rec: dict, path: Path, lineno: int) -> Iterable[Example]:
    """ReCoRDTemplateGPT3: ``<passage, highlights as "- ">\\n-`` -> `` <query with the entity filled in>``.

    Candidates are the passage's distinct entity strings (first-mention order),
    so their number varies from example to example.
    """
    text = get_text(rec, "passage.text", path, lineno)
    entities: list[str] = []
    for span in get_field(rec, "passage.entities", path, lineno):
        ent = text[span["start"]: span["end"] + 1]  # SuperGLUE spans are inclusive
        if ent not in entities:
            entities.append(ent)
    prompt = text.replace("@highlight\n", "- ") + "\n-"
    for qa in get_field(rec, "qas", path, lineno):
        query = get_text(qa, "query", path, lineno)
        answers = {a["text"] for a in get_field(qa, "answers", path, lineno)}
        gold = [i for i, e in enumerate(entities) if e in answers]
        if not gold:
            raise ZOError(f"{path}:{lineno}: field 'qas.answers': no answer {sorted(answers)} among the entities")
        yield Example(prompt, tuple(" " + query.replace("@placeholder", e) for e in entities), gold[0])


# -- registration ----------------------------------------------------------------------------------

def _multirc_holdout(path: Path, n_options: int) -> tuple[list[Example], list[Example]]:
    """Hold out whole passages (so dev questions never share a passage with train) until n options."""
    passages = [list(multirc_examples(rec, path, lineno)) for lineno, rec in iter_jsonl(path, "SuperGLUE file")]
    order = list(range(len(passages)))
    random.Random(HOLDOUT_SEED).shuffle(order)
    held, count = set(), 0
    for i in order:
        if count >= n_options:
            break
        held.add(i)
        count += len(passages[i])
    train = [ex for i, p in enumerate(passages) if i not in held for ex in p]
    dev = [ex for i, p in enumerate(passages) if i in held for ex in p]
    return train, dev


def _standard(name: str, folder: str, build: Builder, n_dev: int) -> Callable[[Path | None], TaskData]:
    def load(data_dir: Path | None = None) -> TaskData:
        root = _root(data_dir, folder)
        train_file, val_file = root / "train.jsonl", root / "val.jsonl"
        if name == "multirc":
            train, dev = _multirc_holdout(train_file, n_dev)
        else:
            train, dev = hold_out(_read(train_file, build), n_dev, HOLDOUT_SEED)
        return TaskData(name, train, dev, _read(val_file, build),
                        sources={"train": str(train_file), "dev": f"{train_file} (seeded hold-out)",
                                 "test": str(val_file)})
    return load


_SPLITS = "train = train.jsonl minus a seeded dev hold-out of {n}; test = val.jsonl ({v})"
for _name, _folder, _build, _n, _what in [
    ("cb", "CB", cb_example, 100, "CommitmentBank, 3-way entailment (Yes/No/Maybe)"),
    ("copa", "COPA", copa_example, 100, "COPA, choose the cause/effect (two sentence candidates)"),
    ("multirc", "MultiRC", multirc_examples, 500, "MultiRC, is this answer correct? one example per answer option"),
    ("rte", "RTE", rte_example, 500, "RTE, entailment (Yes/No)"),
    ("wic", "WiC", wic_example, 500, "WiC, same word sense in two sentences? (Yes/No)"),
    ("wsc", "WSC", wsc_example, 100, "WSC, does the pronoun refer to this noun? (Yes/No)"),
]:
    register_task(_name, f"SuperGLUE {_what}. {_folder}/: "
                  + _SPLITS.format(n=f"{_n} answer options (whole passages)" if _name == "multirc" else _n,
                                   v="SuperGLUE validation, what MeZO reports"))(
        _standard(_name, _folder, _build, _n))
del _name, _folder, _build, _n, _what


@register_task("boolq", "SuperGLUE BoolQ, yes/no questions on a passage. Only the FewGLUE 32-example train subset is "
                        "available (BoolQ/fewglue/train.jsonl): train = those 32; dev = a seeded 500 of "
                        "BoolQ/val.jsonl; test = the other 2,770 of val (not the full official val set)")
def boolq(data_dir: Path | None = None) -> TaskData:
    root = _root(data_dir, "BoolQ")
    train_file, val_file = root / "fewglue" / "train.jsonl", root / "val.jsonl"
    test, dev = hold_out(_read(val_file, boolq_example), 500, HOLDOUT_SEED)
    return TaskData("boolq", _read(train_file, boolq_example), dev, test,
                    sources={"train": str(train_file), "dev": f"{val_file} (seeded 500)",
                             "test": f"{val_file} (the rest)"})


@register_task("record", "SuperGLUE ReCoRD, fill in the entity (one candidate per passage entity, their number "
                         "varies). Only the FewGLUE 32-example subset exists here and no validation data: "
                         "train = 24 of ReCoRD/fewglue/train.jsonl, dev = the other 8 (seeded), no test; "
                         "a smoke test, not comparable with MeZO's ReCoRD")
def record(data_dir: Path | None = None) -> TaskData:
    path = _root(data_dir, "ReCoRD") / "fewglue" / "train.jsonl"
    train, dev = hold_out(_read(path, record_examples), 8, HOLDOUT_SEED)
    return TaskData("record", train, dev, [], sources={"train": str(path), "dev": f"{path} (seeded 8)"})
