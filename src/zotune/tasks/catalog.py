"""What ``zotune tasks`` shows: every task's splits, their sizes and the file each comes from.

Each task is loaded (that is the only way to know its sizes); a task whose
files are absent shows its splits as ``missing`` with the reason, and an empty
split (MNLI/SNLI test, ReCoRD test) shows as ``missing`` too.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ZOError
from .base import TASKS

SPLITS = ("train", "dev", "test")

# Caveats about the offline data that a user should see before comparing numbers with papers.
NOTES = {
    "record": "ReCoRD: only a 32-example train file (FewGLUE) exists offline; no validation data, so no test split",
    "boolq": "BoolQ: only the 32-example FewGLUE train file exists offline; dev/test are halves of the validation set",
    "squad": "SQuAD: only the official dev set exists offline; dev split by article into train/dev/test "
             "(32/8/8 articles, fixed seed)",
    "lmbff-mnli": "MNLI: test_matched.tsv is missing offline (over the snapshot size limit)",
    "lmbff-snli": "SNLI: test.tsv is missing offline (over the snapshot size limit)",
    "sst2-glue": "SST-2 (GLUE): GLUE's phrase-level train set is missing; train is the sentence-level SST-2 train",
}


def task_table(data_dir: Path | None = None, names: list[str] | None = None) -> list[dict]:
    """One row per task: name, description, metric, note, and per split its size and source (or why missing)."""
    from ..metrics import metric_name

    rows = []
    for name in names or sorted(TASKS):
        loader, description = TASKS[name]
        row = {"task": name, "description": description, "note": NOTES.get(name, ""), "metric": None, "splits": {}}
        try:
            data = loader(data_dir)
        except (ZOError, OSError) as exc:
            row["splits"] = {s: {"size": 0, "source": f"missing ({exc})"} for s in SPLITS}
        else:
            row["metric"] = metric_name(data.dev or data.train)
            for s in SPLITS:
                examples = getattr(data, s)
                row["splits"][s] = {"size": len(examples),
                                    "source": data.sources.get(s, "?") if examples else "missing"}
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        lines.append(f"{r['task']}  [{r['metric'] or 'unavailable'}]  {r['description']}")
        for s, info in r["splits"].items():
            size = f"{info['size']:>6d}" if info["size"] else "     -"
            lines.append(f"    {s:5s} {size}  {info['source']}")
        if r["note"]:
            lines.append(f"    note: {r['note']}")
    return "\n".join(lines)
