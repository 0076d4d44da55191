"""Reading data files, with errors that name the file, the line and the field.

The task loaders (SuperGLUE, LM-BFF, the user's own files) share these readers.
Every failure is a :class:`ZOError` whose message starts with ``path:line:``.
Files are read as UTF-8; a byte-order mark at the start is dropped.
"""

from __future__ import annotations

import csv
import io
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..errors import ZOError


def read_text(path: Path, what: str = "data file") -> str:
    """The file's text (UTF-8, BOM dropped); ZOError if missing or not UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise ZOError(f"{what} not found: {path}")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ZOError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def iter_jsonl(path: Path, what: str = "data file") -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line of a JSON-lines file."""
    path = Path(path)
    seen = False
    for lineno, line in enumerate(read_text(path, what).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ZOError(f"{path}:{lineno}: unparsable JSON line ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise ZOError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        seen = True
        yield lineno, obj
    if not seen:
        raise ZOError(f"{path}: empty file (no examples)")


@contextmanager
def _long_fields():
    """Allow CSV fields longer than the csv module's 128 KiB default (long passages)."""
    old = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)
    try:
        yield
    finally:
        csv.field_size_limit(old)


def read_rows(path: Path, delimiter: str, quoting: int = csv.QUOTE_MINIMAL,
              what: str = "data file") -> list[tuple[int, list[str]]]:
    """``(line number, cells)`` for each non-empty row of a CSV/TSV file.

    The line number is where the row starts (a quoted field may span lines).
    ``quoting=csv.QUOTE_NONE`` splits on the delimiter only, as GLUE-style TSV
    files need (their text holds unbalanced quotes). Otherwise quoting is
    strict: a quote left open, or text right after a closing quote, is an error
    at the line where the row starts rather than a silently merged row.
    """
    path = Path(path)
    text = read_text(path, what)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting,
                        quotechar='"' if quoting != csv.QUOTE_NONE else None, strict=True)
    rows, start = [], 1
    with _long_fields():
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                raise ZOError(f"{path}:{start}: malformed {'TSV' if delimiter == chr(9) else 'CSV'} ({e})") from None
            if row and any(cell.strip() for cell in row):
                rows.append((start, row))
            start = reader.line_num + 1
    return rows


def get_field(obj: dict, field: str, path: Path, lineno: int) -> Any:
    """``obj[field]``, or a dotted path into nested objects (``target.span1_text``)."""
    if field in obj:
        value = obj[field]
    else:
        value = obj
        for part in field.split("."):
            if not isinstance(value, dict) or part not in value:
                raise ZOError(f"{path}:{lineno}: missing field {field!r}")
            value = value[part]
    if value is None:
        raise ZOError(f"{path}:{lineno}: missing field {field!r} (null)")
    return value


def get_text(obj: dict, field: str, path: Path, lineno: int, allow_empty: bool = False) -> str:
    """A text field, stripped, non-empty unless ``allow_empty`` (numbers are turned into text)."""
    value = get_field(obj, field, path, lineno)
    if isinstance(value, (dict, list)):
        raise ZOError(f"{path}:{lineno}: field {field!r} is not text (got a JSON {type(value).__name__})")
    text = str(value).strip()
    if not text and not allow_empty:
        raise ZOError(f"{path}:{lineno}: field {field!r} is empty")
    return text
