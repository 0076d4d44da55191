"""A run is its trajectory: replay rebuilds the adapter, resume after SIGKILL is bit-exact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from zotune.cli import main


def adapter_tensors(folder):
    return load_file(next(folder.glob("*.safetensors")))


def args_for(tiny, out, steps=12, *extra):
    return ["train", "--model", str(tiny), "--task", "rotten-tomatoes", "--steps", str(steps), "--train-size", "64",
            "--dev-size", "8", "--batch-size", "4", "--eval-every", "4", "--lr", "0.05", "--progress", "false",
            "--dtype", "float32", "--threads", "1",  # the killed run is a subprocess, where conftest's pins do not
            # reach: its calibration (zoact's SVD) must see the same arithmetic as the in-process reference
            "--output-dir", str(out), *extra]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_replay_rebuilds_the_saved_adapter_bit_for_bit(tiny_llama, tmp_path, capsys, optimizer):
    out = tmp_path / "run"
    assert main(args_for(tiny_llama, out, 6, "--optimizer", optimizer, "--lr", "0.01" if optimizer == "adam" else "0.05")) == 0
    capsys.readouterr()
    assert main(["replay", str(out)]) == 0
    assert '"bit_identical": true' in capsys.readouterr().out


def test_resume_after_sigkill_mid_run_matches_an_uninterrupted_run(tiny_llama, tmp_path):
    reference = tmp_path / "reference"
    assert main(args_for(tiny_llama, reference)) == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "zotune.cli", *args_for(tiny_llama, killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trajectory = killed / "trajectory.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:  # kill it somewhere in the middle of training
        if trajectory.exists() and len(trajectory.read_text().splitlines()) >= 5:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(trajectory.read_text().splitlines())
    assert 5 <= done < 12, "the run must be killed mid-way"
    assert not (killed / "adapter").exists()

    assert main(["train", "--resume", str(killed), "--progress", "false"]) == 0
    a, b = adapter_tensors(reference / "adapter"), adapter_tensors(killed / "adapter")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (reference / "trajectory.jsonl").read_text() == (killed / "trajectory.jsonl").read_text()
    ref_best, res_best = adapter_tensors(reference / "best"), adapter_tensors(killed / "best")
    assert all(torch.equal(ref_best[k], res_best[k]) for k in ref_best)


def test_resume_refuses_changed_settings(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("steps: 3\n")
    assert main(["train", "--resume", str(tmp_path), "--lr", "1"]) == 2
    assert "only --steps and --progress may change" in capsys.readouterr().err
