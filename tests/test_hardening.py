"""Hardened inputs and guards.

Property-based (hypothesis): whatever a config file or a data file holds -- random
YAML mappings, wrong types, unknown keys, huge or negative numbers, random bytes,
truncated JSONL/CSV, wrong-typed fields, oversized lines, empty files -- ``zotune
train`` either rejects it with exit code 2 and one line naming the problem (no
traceback, no run directory), or accepts it and reaches model loading, which is
where these tests stop: every input is validated before the model loads.

Guards: an exploding or NaN loss stops the run naming the step and the batch,
leaving a run directory that ``zotune replay`` and ``--resume`` accept; a disk
without room for the run, or an unwritable run directory, is reported before
training starts.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
from collections import namedtuple
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import zotune.evaluate
import zotune.setup
from zotune.cli import main, setting_fields

PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
FIELDS = list(setting_fields())  # TrainConfig fields and every method's options


class ReachedModelLoading(Exception):
    """Raised in place of loading the model: every check on the inputs has passed."""


@pytest.fixture(autouse=True)
def stop_at_model_loading(request, monkeypatch):
    if "guards" not in request.node.name:
        def fake_load(*args, **kwargs):
            raise ReachedModelLoading
        monkeypatch.setattr(zotune.setup, "load_model", fake_load)


def run_train(*args: str) -> tuple[int | None, str, Path]:
    """``zotune train ARGS`` in-process: (exit code or None if it reached model loading, stderr, run dir)."""
    out = Path(tempfile.mkdtemp()) / "run"
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(["train", *args, "--output-dir", str(out), "--progress", "false"])
    except ReachedModelLoading:
        code = None
    finally:
        torch.set_num_threads(1)  # a config may set threads; keep the test process on one
    exists = out.exists()
    shutil.rmtree(out.parent)
    assert not exists, "a rejected (or not yet started) run must leave no run directory"
    return code, err.getvalue(), out


def assert_rejected_in_one_line_or_accepted(code: int | None, stderr: str) -> None:
    event("accepted: reached model loading" if code is None else "rejected: exit code 2")
    if code is None:
        return  # valid input: it reached model loading
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("zotune: error: "), stderr
    assert "Traceback" not in stderr


# -- configs --------------------------------------------------------------------------------
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**30, 10**30), st.integers(-5, 5),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["sgd", "adam", "mezo", "ar1zo", "cpu", "cuda", "data", "query", "1e400", "-1", "0"]),
)
values = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=5), scalars, max_size=2))
keys = st.one_of(st.sampled_from(FIELDS), st.sampled_from([f.replace("_", "-") for f in FIELDS]),
                 st.text(max_size=12), st.integers(), st.none())
configs = st.dictionaries(keys, values, max_size=6)


@PROPERTY
@given(configs)
def test_any_yaml_mapping_of_settings_is_rejected_in_one_line_or_accepted(mapping):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.yaml"
        path.write_text(yaml.safe_dump(mapping, allow_unicode=True))
        code, stderr, _ = run_train("--config", str(path))
    assert_rejected_in_one_line_or_accepted(code, stderr)


@PROPERTY
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_any_config_file_bytes_are_rejected_in_one_line_or_accepted(raw):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.yaml"
        path.write_bytes(raw)
        code, stderr, _ = run_train("--config", str(path))
    assert_rejected_in_one_line_or_accepted(code, stderr)


@PROPERTY
@given(st.sampled_from(FIELDS), st.one_of(st.text(max_size=12), st.integers(-10**30, 10**30).map(str),
                                          st.floats().map(str)))
def test_any_command_line_value_is_rejected_in_one_line_or_accepted(name, value):
    code, stderr, _ = run_train(f"--{name.replace('_', '-')}={value}", "--task", "no-such-task")
    assert code == 2  # the task is unknown, so at least that is reported
    assert_rejected_in_one_line_or_accepted(code, stderr)


@pytest.mark.parametrize("setting,message", [
    ("lr: 1e400", "lr must be >= 0"),  # YAML reads 1e400 as a string; float() overflows to inf
    ("{1: 2}", "unknown setting(s) 1"),
    ("threads: -1", "threads must be >= 0"),
    ("seed: 100000000000000000000000", "seed must be"),
    ("betas: [a, b]", "betas must be two numbers"),
    ("max_length: 0", "max_length must be >= 1"),
    ("parallel: model", "parallel must be data or query"),
    ("max_loss_ratio: -1", "max_loss_ratio must be >= 0"),
    ("check_sync_every: -5", "check_sync_every must be >= 0"),
    ("steps: 1e400", "setting 'steps' expects int"),
])
def test_known_bad_settings_name_the_setting(tmp_path, setting, message):
    path = tmp_path / "run.yaml"
    path.write_text(setting + "\n")
    code, stderr, _ = run_train("--config", str(path))
    assert code == 2 and message in stderr, stderr


# -- data files -----------------------------------------------------------------------------
field_values = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(), st.text(max_size=30),
                         st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                              max_size=1))
records = st.lists(st.fixed_dictionaries({"text": field_values, "label": field_values}), max_size=8)


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def csv_text(rows) -> bytes:
    import csv

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["text", "label"])
    for r in rows:
        writer.writerow([r["text"], r["label"]])
    return buf.getvalue().encode()


good = [{"text": "a good film", "label": 1}, {"text": "a dull film", "label": 0}]
data_files = st.one_of(
    st.tuples(st.sampled_from([".jsonl", ".csv", ".tsv", ".json"]), st.binary(max_size=300)),  # random bytes
    st.tuples(st.just(".jsonl"), records.map(jsonl)),  # wrong-typed fields
    st.tuples(st.just(".csv"), records.map(csv_text)),
    st.tuples(st.sampled_from([".jsonl", ".csv"]), st.just(b"")),  # empty files
    st.tuples(st.just(".jsonl"), st.integers(0, len(jsonl(good * 3))).map(lambda n: jsonl(good * 3)[:n])),  # truncated
    st.tuples(st.just(".csv"), st.integers(0, len(csv_text(good * 3))).map(lambda n: csv_text(good * 3)[:n])),
    st.tuples(st.sampled_from([".jsonl", ".csv"]), st.integers(1, 300_000).map(  # oversized lines
        lambda n: jsonl([{"text": "x" * n, "label": 1}, *good]))),
)


@PROPERTY
@given(data_files)
def test_any_training_file_is_rejected_in_one_line_or_accepted(file):
    suffix, raw = file
    with tempfile.TemporaryDirectory() as tmp:
        train, dev = Path(tmp) / f"train{suffix}", Path(tmp) / "dev.jsonl"
        train.write_bytes(raw)
        dev.write_bytes(jsonl(good))
        code, stderr, _ = run_train("--train-file", str(train), "--dev-file", str(dev))
    assert_rejected_in_one_line_or_accepted(code, stderr)
    if code == 2:
        assert str(train) in stderr or "train" in stderr, stderr  # the message names the file


# -- guards (these load the tiny model) -----------------------------------------------------
def guard_args(tiny, out, steps=20):
    return ["train", "--model", str(tiny), "--task", "rotten-tomatoes", "--steps", str(steps), "--train-size", "32",
            "--dev-size", "4", "--batch-size", "2", "--method", "mezo-ln", "--lr", "0.01", "--progress", "false",
            "--output-dir", str(out)]


def errors(capsys) -> list[str]:
    """The error lines printed (the model loader's progress bars are not errors)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("zotune: error")]


def fake_losses(monkeypatch, values):
    """Make the training loss follow ``values`` (one per forward pass), then stay at the last one."""
    calls = []

    def loss(self, batch):
        calls.append(len(batch))
        return torch.tensor(values[min(len(calls), len(values)) - 1])
    monkeypatch.setattr(zotune.evaluate.Scorer, "loss_tensor", loss)  # what the recipe's steps call


def test_guards_an_exploding_loss_stops_the_run_at_a_step_that_replay_and_resume_accept(tiny_llama, tmp_path, capsys,
                                                                                       monkeypatch):
    out = tmp_path / "run"
    fake_losses(monkeypatch, [1.0] * 20 + [100.0])  # 10 steps at 1.0, then 100
    assert main(guard_args(tiny_llama, out)) == 2
    err = errors(capsys)
    assert len(err) == 1 and "loss exploded at step 10" in err[0] and "batch indices [" in err[0], err
    assert len((out / "trajectory.jsonl").read_text().splitlines()) == 11  # steps 0..10, all logged
    monkeypatch.undo()
    assert main(["replay", str(out)]) == 0
    assert '"steps": 11' in capsys.readouterr().out
    # the logged prefix is a consistent run: finishing it as an 11-step run gives replay's adapter
    assert main(["train", "--resume", str(out), "--steps", "11", "--progress", "false"]) == 0
    assert main(["replay", str(out)]) == 0
    assert '"bit_identical": true' in capsys.readouterr().out


def test_guards_a_nan_loss_names_the_step_and_batch_and_keeps_the_steps_before(tiny_llama, tmp_path, capsys,
                                                                              monkeypatch):
    out = tmp_path / "run"
    fake_losses(monkeypatch, [1.0] * 6 + [float("nan")])  # step 3's first forward pass
    assert main(guard_args(tiny_llama, out)) == 2
    err = errors(capsys)
    assert len(err) == 1 and "non-finite loss at step 3 on batch indices [" in err[0], err
    assert len((out / "trajectory.jsonl").read_text().splitlines()) == 3
    monkeypatch.undo()
    assert main(["train", "--resume", str(out), "--progress", "false"]) == 0  # and it can go on


def test_guards_a_full_disk_or_unwritable_folder_is_reported_before_training(tiny_llama, tmp_path, capsys,
                                                                            monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "run"
    assert main(guard_args(tiny_llama, out)) == 2
    assert "not enough disk space for the run in" in capsys.readouterr().err
    assert not out.exists()
    monkeypatch.undo()
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(guard_args(tiny_llama, blocker / "run")) == 2
    assert "is not writable" in capsys.readouterr().err
