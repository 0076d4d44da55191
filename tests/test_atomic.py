"""State files are replaced whole: a reader sees the old text or the new, never a torn file."""

import os

import pytest

from zotune import atomic


def test_write_text_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "tune.json"
    atomic.write_text(path, "old")
    atomic.write_text(path, "new ✓")
    assert path.read_text(encoding="utf-8") == "new ✓"
    assert os.listdir(tmp_path) == ["tune.json"]


def test_a_failed_write_keeps_the_old_file_and_cleans_up(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    atomic.write_text(path, "finished rows")

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", full_disk)
    with pytest.raises(OSError, match="No space"):
        atomic.write_text(path, "half")
    assert path.read_text() == "finished rows"
    assert os.listdir(tmp_path) == ["results.json"]
