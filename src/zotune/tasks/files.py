"""The user's own data: JSONL, CSV or TSV files plus a template and a verbalizer.

Two entry points (nothing is registered; the CLI decides how to expose them):

``load_user_files(train, dev, test, text_field, label_field, text_pair_field=None,
template="{text} It was", verbalizer="0=terrible,1=great")``
    Reads up to three files (``None`` skips a split) into a :class:`TaskData`.

``load_task_file(path)``
    The same from a small YAML file::

        train: data/train.csv        # paths relative to the YAML file
        dev: data/dev.csv
        test: data/test.csv          # optional
        text_field: review           # default "text"
        label_field: stars           # default "label"
        text_pair_field: null        # optional second text, {text_pair} in the template
        template: "{text} It was"
        verbalizer: "1=terrible,5=great"   # or a mapping {1: terrible, 5: great}, or a list
        name: reviews                # optional; default: the YAML file's name

Formats, by file extension:

* ``.jsonl`` / ``.ndjson``: one JSON object per line (blank lines skipped);
  a field may be a dotted path into nested objects (``target.span1_text``).
  ``.json``: a JSON array of objects, or JSON lines.
* ``.csv``: comma-separated, standard quoting (``"a, b"`` is one field,
  ``""`` a literal quote, quoted fields may span lines).
* ``.tsv`` / ``.tab``: tab-separated, no quote processing (a tab always ends
  a field, quotes are text), as GLUE-style files need.

CSV/TSV files may have a header row or not: give column *names* for a file
with a header, column *numbers* (``"0"``, ``"1"``, ...) for one without.
Files are UTF-8; a byte-order mark (Excel's "CSV UTF-8") is dropped.

Template and verbalizer: the prompt is ``template`` with ``{text}`` (and
``{text_pair}``) filled in with the stripped field values. The verbalizer maps
each label value in the files to a word; labels are compared as text
(``1``, ``"1"`` and ``1.0`` are all ``"1"``; JSON ``true`` is ``"true"``).
The candidates are the words in verbalizer order, with a leading space unless
the template ends in whitespace (a newline, say); the gold index is the
position of the row's label in the verbalizer.

Every problem in the input raises :class:`ZOError` naming the file, line and
field: a missing field or column, an empty text, a label the verbalizer does
not know, an empty file, an unparsable JSON line, a file that is not UTF-8.
"""

from __future__ import annotations

import csv
import json
import string
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..errors import ZOError
from .base import Example, TaskData
from .readers import get_field, iter_jsonl, read_rows, read_text

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".tab": "tsv"}
DEFAULT_TEMPLATE = "{text} It was"
DEFAULT_VERBALIZER = "0=terrible,1=great"


def label_key(value: Any) -> str:
    """A label value as text, for matching against the verbalizer."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    return text.lower() if text.lower() in ("true", "false") else text


def parse_verbalizer(spec: str | Mapping[Any, Any] | Sequence[str]) -> tuple[list[str], list[str]]:
    """``"0=terrible,1=great"`` (or a mapping, or a list of words for labels 0, 1, ...) -> (labels, words)."""
    if isinstance(spec, str):
        pairs = []
        for item in spec.split(","):
            label, eq, word = item.partition("=")
            if not eq or not label.strip() or not word.strip():
                raise ZOError(f"verbalizer entry {item.strip()!r} is not label=word (in {spec!r})")
            pairs.append((label.strip(), word))
    elif isinstance(spec, Mapping):
        pairs = list(spec.items())
    elif isinstance(spec, Sequence):
        pairs = list(enumerate(spec))
    else:
        raise ZOError(f"verbalizer must be 'label=word,...', a mapping or a list, got {type(spec).__name__}")
    labels, words = [], []
    for label, word in pairs:
        key, word = label_key(label), str(word).strip()
        if not word:
            raise ZOError(f"verbalizer: label {key!r} has an empty word")
        if key in labels:
            raise ZOError(f"verbalizer: label {key!r} appears twice")
        labels.append(key)
        words.append(word)
    if len(labels) < 2:
        raise ZOError(f"verbalizer needs at least two labels, got {spec!r}")
    return labels, words


def check_template(template: str, text_pair_field: str | None) -> None:
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        raise ZOError(f"template {template!r}: {e} (write {{{{ and }}}} for literal braces)") from None
    unknown = names - {"text", "text_pair"}
    if unknown:
        raise ZOError(f"template {template!r}: unknown placeholder {{{sorted(unknown)[0]}}}; "
                      "use {text} and {text_pair}")
    if "text" not in names:
        raise ZOError(f"template {template!r} has no {{text}} placeholder")
    if ("text_pair" in names) != (text_pair_field is not None):
        raise ZOError(f"template {template!r}: {{text_pair}} needs text_pair_field, and text_pair_field needs "
                      "{text_pair} in the template")


class _Spec:
    """What to read from each record and how to turn it into an example."""

    def __init__(self, text_field: str, label_field: str, text_pair_field: str | None, template: str,
                 verbalizer: str | Mapping | Sequence):
        for what, field in (("text_field", text_field), ("label_field", label_field)):
            if not isinstance(field, (str, int)) or not str(field).strip():
                raise ZOError(f"{what} must be a field name or column number, got {field!r}")
        self.text, self.label = str(text_field).strip(), str(label_field).strip()
        self.pair = None if text_pair_field is None else str(text_pair_field).strip()
        if not isinstance(template, str):
            raise ZOError(f"template must be text, got {template!r}")
        check_template(template, self.pair)
        self.template = template
        self.labels, words = parse_verbalizer(verbalizer)
        sep = "" if template[-1:].isspace() else " "
        self.candidates = tuple(sep + w for w in words)

    @property
    def fields(self) -> list[str]:
        return [self.text, self.label] + ([self.pair] if self.pair else [])

    def example(self, values: dict[str, Any], path: Path, lineno: int, hint: str = "") -> Example:
        texts = {}
        for key, field in (("text", self.text), ("text_pair", self.pair)):
            if field is None:
                continue
            value = values[field]
            if isinstance(value, (dict, list)):
                raise ZOError(f"{path}:{lineno}: field {field!r} is not text (got a JSON {type(value).__name__})")
            texts[key] = str(value).strip()
            if not texts[key]:
                raise ZOError(f"{path}:{lineno}: field {field!r} is empty")
        label = label_key(values[self.label])
        if label not in self.labels:
            raise ZOError(f"{path}:{lineno}: field {self.label!r}: unknown label {label!r}; the verbalizer "
                          f"knows {', '.join(self.labels)}{hint}")
        return Example(self.template.format(**texts), self.candidates, self.labels.index(label))


def _json_records(path: Path) -> Iterable[tuple[int, dict]]:
    if path.suffix.lower() == ".json" and read_text(path).lstrip().startswith("["):
        try:
            data = json.loads(read_text(path))
        except json.JSONDecodeError as e:
            raise ZOError(f"{path}:{e.lineno}: unparsable JSON ({e.msg} at column {e.colno})") from None
        if not data:
            raise ZOError(f"{path}: empty file (no examples)")
        for i, obj in enumerate(data):
            if not isinstance(obj, dict):
                raise ZOError(f"{path}: item {i}: expected a JSON object, got {type(obj).__name__}")
            yield 0, obj  # a pretty-printed array has no meaningful line per record
        return
    yield from iter_jsonl(path)


def _read_json(path: Path, spec: _Spec) -> list[Example]:
    out = []
    for lineno, obj in _json_records(path):
        where = f"item {len(out)}" if lineno == 0 else lineno
        values = {f: get_field(obj, f, path, where) for f in spec.fields}  # type: ignore[arg-type]
        out.append(spec.example(values, path, where))  # type: ignore[arg-type]
    return out


def _read_table(path: Path, spec: _Spec, delimiter: str) -> list[Example]:
    by_number = [f.isdigit() for f in spec.fields]
    if any(by_number) and not all(by_number):
        raise ZOError(f"{path}: give all fields as column names (file with a header) or all as column numbers "
                      f"(file without one), not a mix: {', '.join(spec.fields)}")
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    rows = read_rows(path, delimiter, quoting)
    if all(by_number):
        columns = {f: int(f) for f in spec.fields}
        hint = " (is line 1 a header? then give column names instead of numbers)"
    else:
        if not rows:
            raise ZOError(f"{path}: empty file (no header, no examples)")
        (hline, header), rows = rows[0], rows[1:]
        header = [h.strip() for h in header]
        columns = {}
        for f in spec.fields:
            if f not in header:
                raise ZOError(f"{path}:{hline}: missing field {f!r}: no column of that name in the header "
                              f"({', '.join(header)}); for a file without a header give column numbers (0, 1, ...)")
            columns[f] = header.index(f)
        hint = ""
    if not rows:
        raise ZOError(f"{path}: empty file (no examples{' after the header' if not all(by_number) else ''})")
    out = []
    for lineno, row in rows:
        values = {}
        for f, col in columns.items():
            if col >= len(row):
                raise ZOError(f"{path}:{lineno}: missing field {f!r} (the row has {len(row)} columns)")
            values[f] = row[col]
        out.append(spec.example(values, path, lineno, hint if lineno == rows[0][0] else ""))
    return out


def _read_file(path: Path, spec: _Spec) -> list[Example]:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ZOError(f"{path}: cannot tell the format from the extension {path.suffix or '(none)'!r}; "
                      f"use one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise ZOError(f"data file not found: {path}")
    if fmt in ("jsonl", "json"):
        return _read_json(path, spec)
    return _read_table(path, spec, "," if fmt == "csv" else "\t")


def load_user_files(train: str | Path | None, dev: str | Path | None = None, test: str | Path | None = None,
                    text_field: str = "text", label_field: str = "label", text_pair_field: str | None = None,
                    template: str = DEFAULT_TEMPLATE, verbalizer: str | Mapping | Sequence = DEFAULT_VERBALIZER,
                    name: str = "user-files") -> TaskData:
    """Read the user's train/dev/test files (any may be None) into a :class:`TaskData`."""
    spec = _Spec(text_field, label_field, text_pair_field, template, verbalizer)
    files = {split: Path(p) for split, p in (("train", train), ("dev", dev), ("test", test)) if p is not None}
    if not files:
        raise ZOError("no data files given (train, dev and test are all missing)")
    splits = {split: _read_file(path, spec) for split, path in files.items()}
    return TaskData(name, splits.get("train", []), splits.get("dev", []), splits.get("test", []),
                    sources={split: str(path) for split, path in files.items()})


TASK_FILE_KEYS = ("train", "dev", "test", "text_field", "label_field", "text_pair_field", "template", "verbalizer",
                  "name")


def load_task_file(path: str | Path, splits: tuple[str, ...] = ("train", "dev", "test")) -> TaskData:
    """Read a YAML task file (keys as :func:`load_user_files`' arguments; paths relative to the file).

    Only the files of ``splits`` are read (``zotune tune`` reads the train file alone).
    """
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(read_text(path, "task file"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ZOError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(raw, dict):
        raise ZOError(f"{path}: expected a mapping of settings ({', '.join(TASK_FILE_KEYS)})")
    conf = {str(k).replace("-", "_"): v for k, v in raw.items()}
    unknown = sorted(set(conf) - set(TASK_FILE_KEYS))
    if unknown:
        raise ZOError(f"{path}: unknown key {unknown[0]!r}; the keys are {', '.join(TASK_FILE_KEYS)}")
    for split in ("train", "dev", "test"):
        if conf.get(split) is not None:
            if not isinstance(conf[split], str):
                raise ZOError(f"{path}: {split} must be a file path, got {conf[split]!r}")
            conf[split] = (path.parent / conf[split]).resolve() if not Path(conf[split]).is_absolute() \
                else Path(conf[split])
    conf.setdefault("name", path.stem)
    conf = {k: v for k, v in conf.items() if k not in ("train", "dev", "test") or k in splits}
    return load_user_files(**{"train": None, **conf})
