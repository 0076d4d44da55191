"""A run is its trajectory: replay rebuilds the adapter, resume after SIGKILL is bit-exact."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from zotune.cli import main
from zotune.rundir import RunDir
from zotune.train import best_eval


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


@pytest.mark.parametrize("schedule,copied", [((), True), (("--lr-schedule", "cosine", "--warmup-steps", "3"), False)],
                         ids=["constant-lr-copied-without-tensors", "cosine-with-warmup"])
def test_resume_after_sigkill_mid_run_matches_an_uninterrupted_run(tiny_llama, tmp_path, monkeypatch, capsys,
                                                                   schedule, copied):
    """``copied``: the killed run's folder lost its best-dev checkpoint (``best/``), as a copy without
    tensors does; resume rebuilds it from the trajectory at the best evaluation's step on its way. The
    replay says what it does before it starts (a full-weight method's takes minutes)."""
    reference = tmp_path / "reference"
    assert main(args_for(tiny_llama, reference, 12, *schedule)) == 0

    killed = tmp_path / "killed"
    done = kill_mid_run(args_for(tiny_llama, killed, 12, *schedule), killed, steps=12)
    rebuilt = []
    if copied:
        shutil.rmtree(killed / "best")
        metrics = map(json.loads, (killed / "metrics.jsonl").read_text().splitlines())
        best_step = best_eval({r["step"]: r["dev_acc"] for r in metrics if "dev_acc" in r and r["step"] < done})[1]
        assert best_step >= 4
        save = RunDir.save

        def keep_first_best(self, method, model, name="adapter"):
            path = save(self, method, model, name)
            if name == "best" and not rebuilt:
                rebuilt.append(adapter_tensors(path))
            return path

        monkeypatch.setattr(RunDir, "save", keep_first_best)

    capsys.readouterr()
    assert main(["train", "--resume", str(killed), "--progress", "true"]) == 0  # true: it says what it does
    said = capsys.readouterr().err
    assert f"replaying the {done} logged steps of {killed}" in said and f"at step {done} of 12" in said
    assert said.index("replaying the") < said.index("resuming")
    assert_same_run(reference, killed)
    if copied:  # at a constant lr the first steps of the 12-step run are a run of best_step steps
        assert main(args_for(tiny_llama, tmp_path / "short", best_step)) == 0
        expected = adapter_tensors(tmp_path / "short" / "adapter")
        assert rebuilt and all(torch.equal(rebuilt[0][k], expected[k]) for k in expected)


def kill_mid_run(args: list[str], out, steps: int, after: int = 5, wait_for: str = "") -> int:
    """Start ``zotune ARGS`` in a subprocess and SIGKILL it once ``after`` steps are logged (and the file
    ``wait_for`` exists in the run directory); returns the steps it had logged."""
    proc = subprocess.Popen([sys.executable, "-m", "zotune.cli", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trajectory = out / "trajectory.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:  # kill it somewhere in the middle of training
        if trajectory.exists() and len(trajectory.read_text().splitlines()) >= after and \
                (not wait_for or (out / wait_for).exists()):
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(trajectory.read_text().splitlines())
    assert after <= done < steps, "the run must be killed mid-way"
    assert not (out / "adapter").exists()
    return done


def assert_same_run(reference, resumed) -> None:
    """Final and best tensors bit for bit, and the same logged steps."""
    a, b = adapter_tensors(reference / "adapter"), adapter_tensors(resumed / "adapter")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (reference / "trajectory.jsonl").read_text() == (resumed / "trajectory.jsonl").read_text()
    ref_best, res_best = adapter_tensors(reference / "best"), adapter_tensors(resumed / "best")
    assert all(torch.equal(ref_best[k], res_best[k]) for k in ref_best)


@pytest.mark.parametrize("method", ["agzo", "fo-lora"])
def test_a_method_its_trajectory_cannot_rebuild_resumes_from_its_last_evaluation_bit_for_bit(
        tiny_llama, tmp_path, method):
    """agzo's directions depend on each step's activations and fo-lora's updates on backprop, so their
    trajectory is no checkpoint: they save state.pt at each dev evaluation (every 4 steps here), resume
    from it and run the steps logged after it again. Without a state.pt the run starts again."""
    settings = ("--method", method, "--lr", "1e-3", *(("--optimizer", "adam") if method == "agzo" else ()))
    reference = tmp_path / "reference"
    assert main(args_for(tiny_llama, reference, 10, *settings)) == 0
    assert not (reference / "state.pt").exists(), "a finished run keeps no resume point"

    killed = tmp_path / "killed"
    done = kill_mid_run(args_for(tiny_llama, killed, 10, *settings), killed, steps=10, after=6, wait_for="state.pt")
    state = torch.load(killed / "state.pt", weights_only=True)
    # the kill lands after 6 logged steps, but a fast run may have passed step 8's evaluation by then
    assert state["step"] in (4, 8) and state["step"] <= done and state["params"], \
        "the state of the last evaluation before the kill"
    fresh = tmp_path / "no-state"
    shutil.copytree(killed, fresh)
    (fresh / "state.pt").unlink()

    for run in (killed, fresh):
        assert main(["train", "--resume", str(run), "--progress", "false"]) == 0
        assert_same_run(reference, run)
        assert not (run / "state.pt").exists()
        evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "dev_acc" in r]
        assert [r["step"] for r in evals] == [0, 4, 8, 10], "each evaluation once, in order"


def test_resume_refuses_changed_settings(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("steps: 3\n")
    assert main(["train", "--resume", str(tmp_path), "--lr", "1"]) == 2
    assert "only --steps and --progress may change" in capsys.readouterr().err


def test_an_lr_schedule_is_a_function_of_the_step_logged_with_each_step_and_replayed(tiny_llama, tmp_path, capsys):
    """linear and cosine decay from lr to 0 over the run, after an optional linear warmup; each step's lr is in
    its trajectory line, so replay rebuilds the adapter bit for bit, and a resume may not change the run's
    length (the steps taken had the lrs of that length)."""
    from zotune.optim import lr_at

    assert [lr_at(1.0, s, 4, "constant") for s in range(4)] == [1.0] * 4
    assert [lr_at(1.0, s, 4, "linear") for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert lr_at(1.0, 0, 10, "cosine") == 1.0 and lr_at(1.0, 5, 10, "cosine") == pytest.approx(0.5)
    assert [lr_at(1.0, s, 10, "linear", warmup_steps=4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(1.0, 4, 10, "linear", warmup_steps=4) == 1.0 and 0 < lr_at(1.0, 9, 10, "linear", 4) < 0.2

    out = tmp_path / "run"
    assert main(args_for(tiny_llama, out, 6, "--lr-schedule", "linear", "--warmup-steps", "2")) == 0
    lrs = [json.loads(line)["lr"] for line in (out / "trajectory.jsonl").read_text().splitlines()]
    assert lrs == [lr_at(0.05, s, 6, "linear", 2) for s in range(6)] and lrs[1] == lrs[2] == 0.05 > lrs[3] > lrs[5] > 0
    capsys.readouterr()
    assert main(["replay", str(out)]) == 0
    assert '"bit_identical": true' in capsys.readouterr().out
    assert main(["train", "--resume", str(out), "--steps", "8", "--progress", "false"]) == 2
    assert "--steps cannot change on resume under lr_schedule linear" in capsys.readouterr().err
    assert main(["train", "--lr-schedule", "step", "--steps", "1"]) == 2
    assert "lr_schedule must be one of constant, linear, cosine, got 'step'" in capsys.readouterr().err
