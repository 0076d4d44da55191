"""`zotune tune` (lr probes on a dev split carved out of the training data), curves.png, `zotune report`.

All on the quick preset's tiny random llama and synthetic task (zotune.bench), where mezo-lora at lr 0.03
learns within a few dozen forward passes, 3e-4 does not move, and 1e30 diverges at once.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from zotune.bench import synthetic_task, tiny_random_model
from zotune.cli import main
from zotune.config import TrainConfig
from zotune.errors import ZOError

LEARNS, STILL, DIVERGES = 0.03, 0.0003, 1e30


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    data = synthetic_task(root / "data")
    broken = root / "data" / "broken_dev.jsonl"
    broken.write_text('{"text": "this dev file is never read", "label": \n')  # any read of it fails
    return {"root": root, "model": tiny_random_model(root / "model"), "train": data["train_file"],
            "dev": data["dev_file"], "broken": str(broken)}


def flags(world, dev: str) -> list[str]:
    return ["--model", str(world["model"]), "--method", "mezo-lora", "--train-file", world["train"],
            "--dev-file", dev, "--batch-size", "8", "--max-length", "32", "--train-size", "64", "--dev-size", "32",
            "--dtype", "float32", "--threads", "1", "--progress", "false"]


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def tune_argv(world, out: Path) -> list[str]:
    return ["tune", *flags(world, world["broken"]), "--grid", f"{STILL},{LEARNS},{DIVERGES}",
            "--probe-forwards", "40", "--probe-dev", "32", "--out", str(out)]


@pytest.fixture(scope="module")
def tuned(world):
    """One tune over a grid with an lr that learns, one that does not move and one that diverges, its dev file
    unreadable, with every data file read recorded."""
    import zotune.tasks.files as files

    reads = []
    real = files._read_file
    out = world["root"] / "tune"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(files, "_read_file", lambda path, spec: reads.append(Path(path)) or real(path, spec))
        code, stdout, stderr = run(*tune_argv(world, out))
    assert code == 0, stderr
    return {"out": out, "stdout": stdout, "stderr": stderr, "reads": reads,
            "record": json.loads((out / "tune.json").read_text())}


def test_tune_picks_the_lr_that_learns(tuned):
    record = tuned["record"]
    rows = {r["lr"]: r for r in record["rows"]}
    assert sorted(rows) == [STILL, LEARNS, DIVERGES]
    assert record["pick"]["lr"] == LEARNS
    assert rows[DIVERGES]["status"] == "failed" and "non-finite loss" in rows[DIVERGES]["error"]
    assert rows[STILL]["status"] == rows[LEARNS]["status"] == "ok"
    assert rows[LEARNS]["dev_after"] > rows[LEARNS]["dev_before"]  # it learned on the held-out split ...
    assert rows[LEARNS]["dev_after"] > rows[STILL]["dev_after"]  # ... and beat the lr that barely moves
    # 40 forward passes for each finished probe (20 steps of 2), one step for the diverged one
    assert [rows[lr]["forward_passes"] for lr in (STILL, LEARNS)] == [40, 40]
    assert record["total_forward_passes"] == sum(r["forward_passes"] for r in record["rows"])
    assert record["probe_dev"] == 32 and record["steps_per_probe"] == 20

    printed = tuned["stdout"]
    table = printed.splitlines()
    assert "lr" in table[0] and "eps" in table[0] and "before -> after" in table[0] and "status" in table[0]
    [picked] = [line for line in table if "<- pick" in line]
    assert picked.split()[0] == "0.03" and " ok " in picked
    assert any(line.split()[:1] == ["1e+30"] and "failed" in line for line in table)
    assert f"cost: {record['total_forward_passes']} forward passes of training in 3 probes" in printed
    assert "pick: lr 0.03" in printed


def test_tune_never_reads_the_dev_file(tuned, world):
    # the run's dev file is not even valid JSON, and the only data file opened is the training file
    assert tuned["reads"] and set(tuned["reads"]) == {Path(world["train"])}
    for probe in (tuned["out"] / "probes").iterdir():  # each probe evaluated on the 32 held-out examples
        assert yaml.safe_load((probe / "config.yaml").read_text())["dev_size"] == 32
        assert (probe / "config.yaml").exists() and (probe / "curves.png").exists()


def test_the_probe_dev_split_is_carved_out_of_the_training_split(world):
    from zotune.tasks import load_user_files
    from zotune.tune import carve

    cfg = TrainConfig.make(train_file=world["train"], dev_file=world["broken"], train_size=0, seed=3)
    whole = load_user_files(world["train"]).train
    data = carve(cfg, probe_dev=40, dev_fraction=0.5)
    assert len(data.dev) == 40 and len(data.train) == len(whole) - 40 and data.test == []
    assert not {id(x) for x in data.dev} & {id(x) for x in data.train}  # held out: never trained on
    assert sorted(map(repr, data.dev + data.train)) == sorted(map(repr, whole))  # all from the training file
    assert carve(cfg, probe_dev=40).dev == data.dev  # a function of the seed: every probe and rerun alike
    assert len(carve(cfg, probe_dev=1000, dev_fraction=0.1).dev) == len(whole) // 10  # the fraction caps it
    with pytest.raises(ZOError, match="too few"):
        carve(cfg, probe_dev=len(whole), dev_fraction=0)


def test_rerunning_skips_finished_probes_and_resumes_a_killed_one(tuned, world):
    out = tuned["out"]
    killed = out / "probes" / "lr0.03_eps0.01"
    (killed / "summary.json").unlink()  # as if killed after its last step
    stamps = {p: p.stat().st_mtime_ns for p in (out / "probes").glob("*/summary.json")}
    code, stdout, stderr = run(*tune_argv(world, out))
    assert code == 0
    assert stderr.count(": done before:") == 1 and stderr.count(": failed before:") == 1
    assert stderr.count(": resumed:") == 1 and ": trained:" not in stderr
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # finished probes were not retrained
    record = json.loads((out / "tune.json").read_text())
    assert [(r["lr"], r["dev_after"]) for r in record["rows"] if r["status"] == "ok"] == \
        [(r["lr"], r["dev_after"]) for r in tuned["record"]["rows"] if r["status"] == "ok"]  # resumed exactly
    assert record["pick"]["lr"] == LEARNS
    # the same --out with other settings is refused, naming the setting
    code, _, stderr = run(*tune_argv(world, out), "--batch-size", "4")
    assert code == 2 and "batch_size=8, this tune wants 4" in stderr


def test_a_killed_run_that_saved_no_state_is_told_to_start_over(world, tmp_path):
    """agzo's trajectory cannot rebuild its tensors, so a killed agzo run resumes from the state.pt of its
    last dev evaluation; one killed before any has none and trains again from step 0. The caller is told
    which, not promised a resume that cannot happen."""
    from zotune.rundir import RunDir
    from zotune.tune import run_or_reuse

    out = tmp_path / "agzo"
    assert main(["train", *flags(world, world["dev"]), "--method", "agzo", "--steps", "3", "--lr", "1e-3",
                 "--output-dir", str(out)]) == 0
    (out / "summary.json").unlink()  # a finished run keeps no state.pt: now it reads as killed before saving one
    told = []
    assert run_or_reuse(RunDir.open(out).config(), starting=told.append) == ("resumed", "")
    assert told == ["3 of 3 steps were logged but no state was saved: training again from step 0"]
    assert (out / "summary.json").exists() and not (out / "state.pt").exists()


def test_g_growth_is_the_last_quarters_mean_slope_over_the_firsts():
    from zotune.tune import g_growth

    steps = [{"g": [1.0, -1.0]}] * 4 + [{"g": [5.0]}] * 4 + [{"g": [-2.0, 2.0]}] * 4  # 12 steps: quarters of 3
    assert g_growth(steps) == pytest.approx(2.0)
    assert math.isnan(g_growth(steps[:7]))  # too few steps to split into quarters
    assert math.isnan(g_growth([{"loss": 1.0}] * 12))  # no slopes logged (first-order)


def test_max_g_growth_leaves_steep_probes_out_of_the_pick():
    from zotune.tune import pick

    def row(lr, dev, growth):
        return {"lr": lr, "eps": 1e-2, "status": "ok", "dev_after": dev, "train_loss_last": 1.0, "g_growth": growth}

    rows = [row(1e-3, 0.70, 0.9), row(3e-3, 0.78, 3.0), row(1e-2, 0.60, float("nan"))]
    assert pick(rows)["lr"] == 3e-3  # by default the best dev, steep or not
    assert pick(rows, max_g_growth=1.4)["lr"] == 1e-3  # its |g| tripled: the next best dev that stayed calm
    assert pick(rows, max_g_growth=5.0)["lr"] == 3e-3
    assert pick([rows[1]], max_g_growth=1.4)["lr"] == 3e-3  # every probe steep: the bound cannot pick, dev does


def test_loss_ratio_is_the_last_ten_steps_mean_loss_over_the_first_tens():
    from zotune.tune import loss_ratio

    steps = [{"loss": 2.0}] * 10 + [{"loss": 9.0}] * 5 + [{"loss": 3.0}] * 10
    assert loss_ratio(steps) == pytest.approx(1.5)  # 3.0 / 2.0: the loss rose
    assert loss_ratio(steps + [{"loss": float("nan")}]) == pytest.approx(1.5)  # a non-finite loss is skipped
    assert math.isnan(loss_ratio(steps[:19]))  # fewer than 20 losses: the windows would overlap


def test_a_probe_whose_training_loss_rose_is_not_picked_on_a_lucky_dev_score():
    from zotune.tune import pick

    def row(lr, dev, ratio):
        return {"lr": lr, "eps": 1e-2, "status": "ok", "dev_after": dev, "train_loss_last": 1.0,
                "g_growth": 1.0, "loss_ratio": ratio}

    # the regime study's SST-2 MeZO-LoRA r=64 bf16 probes: the best dev went to an lr whose loss went 1.07 -> 1.92
    rows = [row(2.4e-3, 0.540, 0.89), row(8e-3, 0.495, 1.03), row(2.4e-2, 0.570, 1.79), row(7.2e-2, 0.48, 2.2)]
    assert pick(rows)["lr"] == 2.4e-3  # the best dev among the probes whose loss fell
    assert pick(rows, allow_rising_loss=True)["lr"] == 2.4e-2  # the rule off: the best dev, rising or not
    assert pick(rows[1:])["lr"] == 2.4e-2  # every probe's loss rose: the rule steps aside and dev decides
    assert pick([{**r, "loss_ratio": float("nan")} for r in rows])["lr"] == 2.4e-2  # unknown counts as not rising
    old = [{k: v for k, v in r.items() if k != "loss_ratio"} for r in rows]  # rows of a tune.json before the rule
    assert pick(old)["lr"] == 2.4e-2


def test_a_dev_score_one_example_from_the_best_is_a_tie_that_the_lower_loss_breaks():
    from zotune.tune import eligible, pick

    def row(lr, dev, loss):
        return {"lr": lr, "eps": 1e-3, "status": "ok", "dev_after": dev, "train_loss_last": loss,
                "g_growth": 1.0, "loss_ratio": 0.9}

    # the regime study's CR SubZero probes (200 dev examples): the grid's top lr was one answer short
    rows = [row(1e-6, 0.565, 1.215), row(3.3e-6, 0.570, 1.209), row(1e-5, 0.570, 1.193), row(3e-5, 0.570, 1.145),
            row(1e-4, 0.565, 0.989)]
    assert pick(rows)["lr"] == 3e-5  # exact ties: the lowest loss among the three 0.570s
    assert pick(rows, tie=1 / 200)["lr"] == 1e-4  # one example's worth: the loss that moved decides
    assert pick(rows + [row(3e-4, 0.600, 1.3)], tie=1 / 200)["lr"] == 3e-4  # a clear dev lead still wins
    assert len(eligible(rows)) == 5 and pick([], tie=1 / 200) is None


def test_a_pick_made_by_the_one_example_tie_is_explained_and_recorded(world, tmp_path, monkeypatch):
    import zotune.tune as tune_module

    scores = {STILL: (0.5, 1.20), LEARNS: (0.5 - 1 / 32, 0.90), DIVERGES: (0.5, 1.10)}  # (dev of 32, loss)

    def row(probe, what, error):
        dev, loss = scores[probe.lr]
        return {"lr": probe.lr, "eps": probe.eps, "status": "ok", "dev_before": 0.5, "dev_after": dev,
                "train_loss_last": loss, "g_growth": 1.0, "loss_ratio": 0.9, "metric": "accuracy", "steps": 20,
                "forward_passes": 40, "run_dir": str(probe.path), "error": "", "this_call": False}

    monkeypatch.setattr(tune_module, "run_or_reuse", lambda cfg, data=None: ("done before", ""))
    monkeypatch.setattr(tune_module, "probe_row", row)
    out = tmp_path / "tie"
    code, stdout, stderr = run(*tune_argv(world, out))
    assert code == 0, stderr
    assert json.loads((out / "tune.json").read_text())["pick"]["lr"] == LEARNS  # one answer short, loss far lower
    assert "within 1 example of the best (0.500), a tie" in stdout
    code, stdout, _ = run(*tune_argv(world, out), "--dev-tie", "0")
    record = json.loads((out / "tune.json").read_text())
    assert record["pick"]["lr"] == DIVERGES and record["dev_tie"] == 0 and "a tie" not in stdout  # exact ties
    assert run(*tune_argv(world, out), "--dev-tie", "-1")[0] != 0


def test_rerunning_with_max_g_growth_repicks_from_the_finished_probes(tuned, world):
    rows = {r["lr"]: r for r in tuned["record"]["rows"] if r["status"] == "ok"}
    assert all(r["g_growth"] > 0 for r in rows.values())  # 20 steps each: a growth for every finished probe
    assert all(math.isfinite(r["loss_ratio"]) for r in rows.values())  # ... and a loss ratio
    steep, calm = sorted(rows, key=lambda lr: rows[lr]["g_growth"], reverse=True)
    bound = (rows[steep]["g_growth"] + rows[calm]["g_growth"]) / 2
    stamps = {p: p.stat().st_mtime_ns for p in (tuned["out"] / "probes").glob("*/summary.json")}
    code, stdout, stderr = run(*tune_argv(world, tuned["out"]), "--max-g-growth", f"{bound}")
    assert code == 0, stderr
    assert ": trained:" not in stderr and all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    record = json.loads((tuned["out"] / "tune.json").read_text())
    assert record["pick"]["lr"] == calm and record["max_g_growth"] == pytest.approx(bound)
    assert f"left out (|g| grew past {bound:g}x): lr {steep:g}" in stdout
    assert "|g| growth" in stdout.splitlines()[0] and "(steep)" in stdout
    code, stdout, _ = run(*tune_argv(world, tuned["out"]))  # without the bound: the best dev again
    assert json.loads((tuned["out"] / "tune.json").read_text())["pick"]["lr"] == LEARNS


def test_tune_train_runs_the_full_run_at_the_pick(world):
    out = world["root"] / "tune-train"
    code, stdout, stderr = run("tune", *flags(world, world["dev"]), "--grid", f"{LEARNS},{DIVERGES}",
                               "--probe-forwards", "16", "--probe-dev", "32", "--steps", "6", "--eval-every", "3",
                               "--out", str(out), "--train")
    assert code == 0, stderr
    run_dir = out / "run"
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["lr"] == LEARNS and config["steps"] == 6 and config["eval_every"] == 3
    assert config["dev_file"] == world["dev"] and config["train_size"] == 64  # the user's run, not a probe's
    for name in ("metrics.jsonl", "trajectory.jsonl", "summary.json", "adapter", "best", "curves.png"):
        assert (run_dir / name).exists(), name
    assert "forward passes    12 in 6 steps" in stdout and str(run_dir / "adapter") in stdout
    assert json.loads((out / "tune.json").read_text())["train_run"] == str(run_dir)

    # the run's curves are redrawn when it is resumed (here: extended)
    before = (run_dir / "curves.png").stat().st_mtime_ns
    assert run("train", "--resume", str(run_dir), "--steps", "8", "--progress", "false")[0] == 0
    assert (run_dir / "curves.png").stat().st_mtime_ns > before
    assert_png(run_dir / "curves.png")

    # rerunning skips the probes and the finished run, and prints its summary again
    code, stdout, stderr = run("tune", *flags(world, world["dev"]), "--grid", f"{LEARNS},{DIVERGES}",
                               "--probe-forwards", "16", "--probe-dev", "32", "--steps", "8", "--eval-every", "3",
                               "--out", str(out), "--train")
    assert code == 0 and ": trained:" not in stderr and "forward passes    16 in 8 steps" in stdout


def test_train_lr_auto_tunes_first(world, monkeypatch):
    import zotune.tune

    monkeypatch.setattr(zotune.tune, "PROBE_FORWARDS", 8)  # tune's default budget, shrunk for the test
    monkeypatch.chdir(world["root"])
    code, stdout, stderr = run("train", *flags(world, world["dev"]), "--lr", "auto", "--steps", "4")
    assert code == 0, stderr
    out = world["root"] / "runs" / "tune-synthetic_train-mezo-lora"
    record = json.loads((out / "tune.json").read_text())
    assert record["grid"] == zotune.tune.default_grid(3e-3) == [3e-4, 1e-3, 3e-3, 9e-3, 3e-2]  # mezo-lora's 3e-3
    assert record["steps_per_probe"] == 4 and record["train_run"] == "runs/tune-synthetic_train-mezo-lora/run"
    assert yaml.safe_load((out / "run" / "config.yaml").read_text())["lr"] == record["pick"]["lr"]
    assert "forward passes    8 in 4 steps" in stdout


def test_the_default_grid_is_centred_on_the_given_lr_else_the_methods(world, monkeypatch, tmp_path):
    import zotune.tune
    from zotune.tune import TuneResult

    calls = []
    monkeypatch.setattr(zotune.tune, "tune", lambda cfg, **kw: calls.append(kw) or TuneResult([], None, "", tmp_path))
    config = tmp_path / "run.yaml"
    config.write_text("lr: 0.5\n")
    for argv in (["tune", "--lr", "0.03"], ["tune", "--config", str(config)], ["tune"],
                 ["train", "--lr", "auto"], ["train", "--config", str(config), "--lr", "auto"]):
        run(*argv, *flags(world, world["broken"]))  # the fake tune picks nothing: exit 2, after the call
    assert [c["center"] for c in calls] == [0.03, 0.5, None, None, None]  # None: the method's suggested lr
    assert [c["train_after"] for c in calls] == [False, False, False, True, True]


def assert_png(path: Path) -> None:
    from matplotlib.image import imread

    image = imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4) and image.shape[0] > 200 and image.shape[1] > 400


def test_every_run_directory_has_a_readable_curves_png(tuned):
    probes = sorted((tuned["out"] / "probes").iterdir())
    assert len(probes) == 3
    for probe in probes:  # the diverged probe's too: its curves are how one sees the divergence
        assert_png(probe / "curves.png")


def test_report_prints_one_row_per_run_and_writes_the_png(tuned, tmp_path):
    probes = sorted((tuned["out"] / "probes").iterdir())
    killed = tmp_path / "killed"
    shutil.copytree(probes[0], killed)
    (killed / "summary.json").unlink()  # a killed run reads back from its logs
    image = tmp_path / "cmp" / "report.png"
    code, stdout, _ = run("report", *map(str, probes), str(killed), "--out", str(image))
    assert code == 0
    lines = stdout.splitlines()
    assert lines[0].split()[:3] == ["run", "status", "method"] and "dev before -> after (best)" in lines[0]
    for name in [p.name for p in probes] + ["killed"]:
        assert sum(line.split()[:1] == [name] for line in lines) == 1, name
    status = {line.split()[0]: line.split()[1] for line in lines[2:6]}
    assert status == {"lr0.0003_eps0.01": "finished", "lr0.03_eps0.01": "finished", "lr1e+30_eps0.01": "failed",
                      "killed": "unfinished"}
    row = next(line for line in lines if line.startswith("lr0.03_eps0.01"))
    assert "mezo-lora" in row and "synthetic_train.jsonl" in row and " 0.03 " in row and " 40 " in row
    assert "float32" in row
    assert any("lr1e+30_eps0.01: failed: non-finite loss" in line for line in lines)
    assert_png(image)


def test_report_of_a_folder_that_is_not_a_run_fails_in_one_line(tuned, tmp_path, capsys):
    for bad in (tuned["out"], tmp_path / "missing"):  # a tune's folder holds runs but is none itself
        assert main(["report", str(tuned["out"] / "probes" / "lr0.03_eps0.01"), str(bad)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert str(bad) in err and ("not a run directory" in err or "no such run directory" in err)


def test_bad_grids_fail_in_one_line(world, capsys):
    from zotune.tune import parse_floats

    assert parse_floats("3e-3, 1e-3,1e-3", "--grid") == [1e-3, 3e-3]
    for argv, message in [(["--grid", "1e-3,fast"], "--grid expects comma-separated numbers, got 'fast'"),
                          (["--grid", "-1"], "--grid: -1 is not a number >= 0"),
                          (["--eps-grid", "1e-3", "--method", "fo-lora"], "method 'fo-lora' takes no eps"),
                          (["--probe-dev", "0", "--dev-fraction", "0"], "the carved dev split would be empty")]:
        assert main(["tune", *flags(world, world["broken"]), *argv, "--out", str(world["root"] / "bad")]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


def test_an_eps_grid_probes_every_lr_at_every_eps(world, tmp_path):
    from zotune.tune import carve, plan

    cfg = TrainConfig.make(model=str(world["model"]), method="mezo-lora", train_file=world["train"], queries=2)
    probes = plan(cfg, [1e-3, 1e-2], [1e-3, 1e-2], 40, tmp_path, carve(cfg, 32))
    assert [(p.lr, p.eps, p.path.name, p.cfg.steps) for p in probes] == [
        (1e-3, 1e-3, "lr0.001_eps0.001", 10), (1e-2, 1e-3, "lr0.01_eps0.001", 10),
        (1e-3, 1e-2, "lr0.001_eps0.01", 10), (1e-2, 1e-2, "lr0.01_eps0.01", 10)]  # 40 forwards, 4 per step
    assert {(p.cfg.eval_every, p.cfg.test_size, p.cfg.dev_size) for p in probes} == {(0, 0, 32)}
