"""benchmarks/zero_shot.py: the zero-shot table, on the tiny model with 4 examples of 2 tasks."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import SHARED_DATA

needs_data = pytest.mark.skipif(not (SHARED_DATA / "CB").exists(), reason="../shared/data not present")
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "zero_shot.py"


def load_script():
    spec = importlib.util.spec_from_file_location("zero_shot", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table_covers_every_classification_task_and_no_generation_task():
    from zotune.tasks import TASKS

    tasks = load_script().classification_tasks()
    assert set(tasks) == set(TASKS) - {"squad"} and len(tasks) == len(set(tasks))
    assert tasks[:3] == ["sst2-glue", "rte", "cb"]


@needs_data
def test_zero_shot_table_on_the_tiny_model(tiny_llama, tmp_path):
    zs = load_script()
    code = zs.main(["--model", str(tiny_llama), "--tasks", "cb,record,squad,nope-missing", "--n", "4",
                    "--data-dir", str(SHARED_DATA), "--out", str(tmp_path), "--max-length", "64"])
    assert code == 0
    result = json.loads((tmp_path / "zero_shot.json").read_text())
    rows = {r["task"]: r for r in result["rows"]}
    assert set(rows) == {"cb", "record"}
    assert rows["cb"]["split"] == "test" and rows["record"]["split"] == "dev"  # ReCoRD has no test split offline
    assert all(r["n"] == 4 and r["metric"] == "accuracy" and 0.0 <= r["value"] <= 1.0 for r in rows.values())
    assert result["seed"] == 0 and result["n_max"] == 4 and result["threads"] == 1 and result["pending"] == []
    assert "unknown task" in result["failed"]["nope-missing"]  # reported, not scored
    assert "generation task" in result["failed"]["squad"]
    md = (tmp_path / "zero_shot.md").read_text()
    assert "| task | metric | value | majority class | n | split | seconds |" in md
    assert f"| cb | accuracy | {rows['cb']['value']:.3f} | {rows['cb']['majority']:.3f} | 4 | test |" in md
    assert 0.5 <= rows["cb"]["majority"] <= 1.0  # 4 examples, 3 classes: at least 2 share a label
