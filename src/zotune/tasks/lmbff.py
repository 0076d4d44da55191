"""The LM-BFF k-shot suite (Gao et al., 2021), as prompts for a causal LM.

Tasks ``lmbff-<task>`` for sst2, sst5, snli, mnli, trec, mr, cr, mpqa, subj read
LM-BFF's own k-shot files in place:
``<data_dir>/<TASK>/k-shot/<lm-bff-name>/16-<seed>/{train,dev,test}.{tsv,csv}``.
train and dev hold 16 examples per class; test is the task's full LM-BFF test
set (for SST-2 that is the GLUE SST-2 validation set, 872 sentences). The
MNLI and SNLI test files (``test_matched.tsv``, ``test.tsv``) are read when
present; the shared data lacks them, so there these tasks have no test split.

The seed (13, 21, 42, 87 or 100) picks the sample: 42 unless the environment
variable ``ZOTUNE_KSHOT_SEED`` says otherwise. :func:`lmbff_task` takes it as
an argument.

File formats are LM-BFF's: SST-2, SNLI and MNLI are GLUE TSVs with a header
(columns found by name, no quote processing); the others are CSVs without a
header, ``label,sentence``.

Templates. LM-BFF writes its templates for a masked LM; a causal LM can only
score what comes after the prompt, so each is turned into a prompt that ends
where the label word goes, keeping LM-BFF's verbalizer words:

* SST-2, SST-5, MR, CR, MPQA: ``*cls**sent_0*_It_was*mask*.`` becomes
  ``<sentence> It was`` -> `` terrible`` / `` great`` (SST-5: terrible, bad,
  okay, good, great), which is also MeZO's SST-2 prompt;
* Subj: ``<sentence> This is`` -> `` subjective`` / `` objective``;
* TREC: LM-BFF's ``*mask*:*+sent_0*`` puts the label before the question, so
  the prompt is ``Question: <question>\\nAnswer type:`` -> `` Description`` /
  `` Entity`` / `` Expression`` / `` Human`` / `` Location`` / `` Number``
  (our wording; the words are LM-BFF's);
* SNLI, MNLI: LM-BFF's ``<premise>? *mask*, <hypothesis>`` puts the hypothesis
  after the label word; we use MeZO's causal template for the same three-way
  Yes/No/Maybe verbalizer (its CB prompt): ``Suppose <premise> Can we infer
  that "<hypothesis>"? Yes, No, or Maybe?\\n`` -> ``No`` (contradiction) /
  ``Yes`` (entailment) / ``Maybe`` (neutral).

Candidates are ordered by label index (LM-BFF's label order), so
``candidates[label]`` is the gold answer.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import ZOError
from .base import Example, TaskData, register_task
from .readers import read_rows

SEEDS = (13, 21, 42, 87, 100)
DEFAULT_SEED = 42
SEED_ENV = "ZOTUNE_KSHOT_SEED"


def one_line(text: str) -> str:
    return " ".join(text.split())


@dataclass(frozen=True)
class KShotTask:
    """Where one LM-BFF task lives and how a row becomes an example."""

    folder: str  # relative to data_dir, up to the 16-<seed> folders
    files: dict[str, str]  # split -> file name
    header: tuple[str, ...] | None  # columns read by name (TSV), or None: CSV ``label,sentence``
    candidates: tuple[str, ...]  # by label index
    labels: tuple[str, ...]  # label values in the file, by label index
    prompt: Callable[..., str]
    description: str


def _sentence(suffix: str) -> Callable[..., str]:
    return lambda text: f"{one_line(text)} {suffix}"


def _nli(premise: str, hypothesis: str) -> str:
    return f'Suppose {one_line(premise)} Can we infer that "{one_line(hypothesis)}"? Yes, No, or Maybe?\n'


SENTIMENT = (" terrible", " great")
NLI_LABELS = ("contradiction", "entailment", "neutral")

KSHOT: dict[str, KShotTask] = {
    "sst2": KShotTask("SST-2/k-shot/SST-2", {"train": "train.tsv", "dev": "dev.tsv", "test": "test.tsv"},
                      ("sentence", "label"), SENTIMENT, ("0", "1"), _sentence("It was"),
                      "SST-2 binary sentiment; test = GLUE SST-2 validation (872)"),
    "sst5": KShotTask("SST-5/k-shot/sst-5", {"train": "train.csv", "dev": "dev.csv", "test": "test.csv"}, None,
                      (" terrible", " bad", " okay", " good", " great"), ("0", "1", "2", "3", "4"),
                      _sentence("It was"), "SST-5 five-way sentiment"),
    "mr": KShotTask("MR/k-shot/mr", {"train": "train.csv", "dev": "dev.csv", "test": "test.csv"}, None,
                    SENTIMENT, ("0", "1"), _sentence("It was"), "MR movie-review sentiment"),
    "cr": KShotTask("CR/k-shot/cr", {"train": "train.csv", "dev": "dev.csv", "test": "test.csv"}, None,
                    SENTIMENT, ("0", "1"), _sentence("It was"), "CR customer-review sentiment"),
    "mpqa": KShotTask("MPQA/k-shot/mpqa", {"train": "train.csv", "dev": "dev.csv", "test": "test.csv"}, None,
                      SENTIMENT, ("0", "1"), _sentence("It was"), "MPQA opinion polarity (short phrases)"),
    "subj": KShotTask("Subj/k-shot/subj", {"train": "train.csv", "dev": "dev.csv", "test": "test.csv"}, None,
                      (" subjective", " objective"), ("0", "1"), _sentence("This is"), "Subj subjectivity"),
    "trec": KShotTask("TREC/k-shot/trec", {"train": "train.csv", "dev": "dev.csv", "test": "test.csv"}, None,
                      (" Description", " Entity", " Expression", " Human", " Location", " Number"),
                      ("0", "1", "2", "3", "4", "5"), lambda text: f"Question: {one_line(text)}\nAnswer type:",
                      "TREC question type, 6 classes"),
    "snli": KShotTask("SNLI/k-shot/SNLI", {"train": "train.tsv", "dev": "dev.tsv", "test": "test.tsv"},
                      ("sentence1", "sentence2", "gold_label"), ("No", "Yes", "Maybe"), NLI_LABELS, _nli,
                      "SNLI 3-way entailment; test.tsv absent from the shared data, so no test split there"),
    "mnli": KShotTask("MNLI/k-shot/MNLI", {"train": "train.tsv", "dev": "dev_matched.tsv",
                                           "test": "test_matched.tsv"},
                      ("sentence1", "sentence2", "gold_label"), ("No", "Yes", "Maybe"), NLI_LABELS, _nli,
                      "MNLI 3-way entailment, matched dev; test_matched.tsv absent from the shared data, "
                      "so no test split there"),
}


def kshot_seed() -> int:
    """The k-shot seed: ``$ZOTUNE_KSHOT_SEED``, else 42."""
    raw = os.environ.get(SEED_ENV, "").strip()
    if not raw:
        return DEFAULT_SEED
    try:
        return int(raw)
    except ValueError:
        raise ZOError(f"{SEED_ENV} must be an integer seed ({', '.join(map(str, SEEDS))}), got {raw!r}") from None


def _read_split(path: Path, spec: KShotTask) -> list[Example]:
    rows = read_rows(path, "\t" if spec.header else ",",
                     csv.QUOTE_NONE if spec.header else csv.QUOTE_MINIMAL, what="LM-BFF file")
    if spec.header:
        if not rows:
            raise ZOError(f"{path}: empty file (no header)")
        (hline, head), rows = rows[0], rows[1:]
        head = [h.strip() for h in head]
        missing = [c for c in spec.header if c not in head]
        if missing:
            raise ZOError(f"{path}:{hline}: no column named {missing[0]!r} in the header")
        cols = [head.index(c) for c in spec.header]
        label_col, text_cols, label_name = cols[-1], cols[:-1], spec.header[-1]
    else:
        label_col, text_cols, label_name = 0, [1], "0"
    if not rows:
        raise ZOError(f"{path}: empty file (no examples)")
    out = []
    for lineno, row in rows:
        if len(row) <= max(label_col, *text_cols):
            raise ZOError(f"{path}:{lineno}: missing field (the row has {len(row)} columns)")
        label = row[label_col].strip()
        if label not in spec.labels:
            raise ZOError(f"{path}:{lineno}: field {label_name!r}: unknown label {label!r} "
                          f"(expected one of {', '.join(spec.labels)})")
        out.append(Example(spec.prompt(*(row[c] for c in text_cols)), spec.candidates, spec.labels.index(label)))
    return out


def lmbff_task(task: str, seed: int | None = None, data_dir: Path | None = None, k: int = 16) -> TaskData:
    """LM-BFF task ``task`` (``sst2``, ``lmbff-sst2``, ...) for k-shot sample ``16-<seed>``."""
    from .sentiment import default_data_dir

    key = task.removeprefix("lmbff-")
    if key not in KSHOT:
        raise ZOError(f"unknown LM-BFF task {task!r}; choose one of: {', '.join(KSHOT)}")
    spec = KSHOT[key]
    seed = kshot_seed() if seed is None else seed
    base = Path(data_dir or default_data_dir()) / spec.folder
    folder = base / f"{k}-{seed}"
    if not folder.is_dir():
        have = sorted(p.name for p in base.glob(f"{k}-*")) if base.is_dir() else []
        raise ZOError(f"LM-BFF folder not found: {folder}"
                      + (f" (available: {', '.join(have)})" if have else " (set --data-dir to the folder holding "
                         f"{spec.folder.split('/')[0]}/)"))
    paths = {split: folder / name for split, name in spec.files.items()}
    splits = {split: _read_split(p, spec) for split, p in paths.items() if split != "test" or p.exists()}
    return TaskData(f"lmbff-{key}", splits["train"], splits["dev"], splits.get("test", []),
                    sources={split: str(paths[split]) for split in splits})


def _loader(key: str) -> Callable[[Path | None], TaskData]:
    return lambda data_dir=None: lmbff_task(key, None, data_dir)


for _key, _spec in KSHOT.items():
    register_task(f"lmbff-{_key}", f"LM-BFF 16-shot {_spec.description} ({_spec.folder}/16-<seed>, "
                  f"seed ${SEED_ENV} or {DEFAULT_SEED})")(_loader(_key))
del _key, _spec
