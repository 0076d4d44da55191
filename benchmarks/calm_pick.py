"""Would leaving steep probes out of the lr pick have prevented the regime study's late collapses?

In the regime study's ZO-SGD arm on Rotten Tomatoes, 14 of the 15 full runs whose picked lr probe had grown
its |g| by 1.4x or more over its quarter budget ended below zero-shot dev accuracy (docs/benchmarks.md). This
re-picks such a cell's lr from its own finished probes with ``zotune.tune.pick(rows, max_g_growth)``, runs the
study's seeds at that lr with every other setting of the cell (``zotune.regime.run_config``), and compares them
with the study's runs at the original pick, paired by seed: test accuracy (best-dev checkpoint, as the study
reports it), final dev accuracy, and whether dev ended below the untrained model's.

    python benchmarks/calm_pick.py --study /work/regime --out /work/calm --cells mezo-lora-r64-bf16-sgd --seeds 0
    python benchmarks/calm_pick.py --study benchmarks/results/regime --out benchmarks/results/regime_calm_pick --seeds 0 --report-only

Writes OUT/calm_pick.json and OUT/calm_pick.md (the run directories go under OUT/runs/). Resumable: a finished
run is read back, a killed one resumes from its trajectory. ``--study`` needs the cell's probes and the
study's results.json (benchmarks/results/regime holds both).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from zotune import atomic, regime
from zotune.report import read_run
from zotune.tune import g_growth, pick, run_or_reuse

BOUND = 1.4


def study_cells(study_out: Path, task: str) -> dict[str, regime.Cell]:
    p = regime.plan(regime.Study(tasks=(task,), ranks=(8, 64)), study_out, prepare=False)
    return {c.entry.label: c for c in p.cells}


def probe_rows(cell: regime.Cell) -> list[dict]:
    """The cell's probe rows (tune.json), each with its |g| growth read from the probe's own log."""
    rows = json.loads((cell.tune_out / "tune.json").read_text())["rows"]
    for r in rows:
        probe = cell.tune_out / "probes" / Path(r["run_dir"]).name
        r["g_growth"] = g_growth(read_run(probe).steps) if probe.is_dir() else float("nan")
    return rows


def outcome(run_dir: Path) -> dict | None:
    path = run_dir / "summary.json"
    if not path.exists():
        return None
    s = json.loads(path.read_text())
    return {"test": s["test_after"], "dev_final": s["dev_after"], "dev_before": s["dev_before"],
            "ended_below_start": s["dev_after"] < s["dev_before"]}


def compare(cell: regime.Cell, study_out: Path, out: Path, seeds: list[int], bound: float, train: bool) -> dict:
    rows = probe_rows(cell)
    picked, calm = pick(rows), pick(rows, max_g_growth=bound)
    ledger = {r["seed"]: r for r in regime.read_ledger(study_out)
              if r.get("entry") == cell.entry.label and r.get("task") == cell.task and r.get("status") == "ok"}
    runs = []
    for seed in seeds:
        run_dir = out / "runs" / cell.run_dir(seed).name
        if train and calm["lr"] != picked["lr"]:
            cfg = regime.run_config(cell, seed, calm["lr"])
            cfg.output_dir, cfg.threads, cfg.progress = str(run_dir), 1, False  # one core per process, as the study
            what, error = run_or_reuse(cfg)
            print(f"{cell.entry.label} seed {seed} at lr {calm['lr']:g}: {what}" + (f": {error}" if error else ""),
                  flush=True)
        got, before = outcome(run_dir), ledger.get(seed)
        runs.append({"seed": seed, "calm": got, "picked": None if before is None else {
            "test": before["test"], "dev_final": before["dev_final"], "dev_before": before["dev_before"],
            "ended_below_start": before["dev_final"] < before["dev_before"]}})
    both = [r for r in runs if r["calm"] and r["picked"]]
    diff = {k: regime.paired_interval({r["seed"]: r["calm"][k] for r in both},
                                      {r["seed"]: r["picked"][k] for r in both}) for k in ("test", "dev_final")}
    return {"entry": cell.entry.label, "task": cell.task, "bound": bound,
            "picked": {"lr": picked["lr"], "g_growth": picked["g_growth"], "probe_dev": picked["dev_after"]},
            "calm": {"lr": calm["lr"], "g_growth": calm["g_growth"], "probe_dev": calm["dev_after"]},
            "runs": runs, "calm_minus_picked": diff}


def _f(x, fmt=".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:{fmt}}"


def markdown(results: list[dict]) -> str:
    lines = ["# The lr pick without steep probes (benchmarks/calm_pick.py)", "",
             "Each cell's lr re-picked from its own regime-study probes, leaving out those whose |g| grew past the "
             "bound over the probe (`zotune tune --max-g-growth`), then run at the study's settings; 'picked' is "
             "the study's own run at the original pick, the same seed.", "",
             "| entry | task | bound | lr picked (growth, probe dev) | lr calm (growth, probe dev) | seed | "
             "test picked → calm | dev final picked → calm | ended below start picked / calm |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in results:
        for r in c["runs"]:
            p, k = r["picked"] or {}, r["calm"] or {}
            lines.append(
                f"| {c['entry']} | {c['task']} | {c['bound']:g} | {c['picked']['lr']:g} "
                f"({_f(c['picked']['g_growth'], '.2f')}x, {_f(c['picked']['probe_dev'])}) | {c['calm']['lr']:g} "
                f"({_f(c['calm']['g_growth'], '.2f')}x, {_f(c['calm']['probe_dev'])}) | {r['seed']} | "
                f"{_f(p.get('test'))} → {_f(k.get('test'))} | {_f(p.get('dev_final'))} → {_f(k.get('dev_final'))} | "
                f"{p.get('ended_below_start', '-')} / {k.get('ended_below_start', '-')} |")
        for key, iv in c["calm_minus_picked"].items():
            if iv["n"]:
                span = f" [{iv['lo']:+.3f}, {iv['hi']:+.3f}]" if iv["n"] > 1 else ""
                lines.append(f"\n{c['entry']}: calm − picked, {key}: {iv['mean']:+.3f}{span} over {iv['n']} "
                             f"seed{'s' * (iv['n'] > 1)}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", type=Path, required=True, help="the regime study's --out (probes, results.json)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--task", default="rotten-tomatoes")
    ap.add_argument("--cells", default="mezo-lora-r64-bf16-sgd", help="comma list of the study's entry labels")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--bound", type=float, default=BOUND)
    ap.add_argument("--report-only", action="store_true", help="read back what OUT holds; train nothing")
    args = ap.parse_args()
    cells = study_cells(args.study, args.task)
    results = []
    for label in args.cells.split(","):
        if label not in cells:
            raise SystemExit(f"--cells: no entry {label!r} in the regime study; it has {', '.join(sorted(cells))}")
        results.append(compare(cells[label], args.study, args.out, [int(s) for s in args.seeds.split(",")],
                               args.bound, train=not args.report_only))
    args.out.mkdir(parents=True, exist_ok=True)
    atomic.write_text(args.out / "calm_pick.json", json.dumps({"cells": results}, indent=2))
    atomic.write_text(args.out / "calm_pick.md", markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
