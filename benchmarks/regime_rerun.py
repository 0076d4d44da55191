"""Re-run regime-study cells with one change and compare them with the study's own runs, paired by seed.

Most LoRA-family runs of the regime study's ZO-SGD arm on Rotten Tomatoes peaked early and then collapsed
below zero-shot dev accuracy at their picked lr (docs/benchmarks.md). This asks, one cell at a time, whether
a change to the protocol would have prevented it:

* ``--change calm-pick``: re-pick the cell's lr from its own finished probes, leaving out those whose |g| grew
  past ``--bound`` over the probe (``zotune.tune.pick(rows, max_g_growth)``, ``zotune tune --max-g-growth``);
* ``--change SETTING=VALUE``: keep the study's pick and change one train setting, e.g. ``lr_schedule=linear``
  (the lr decays to 0 over the run instead of staying constant).

Every other setting is the cell's (``zotune.regime.run_config``). Compared with the study's run of the same
seed: test accuracy (best-dev checkpoint, as the study reports it), final dev accuracy, and whether dev ended
below the untrained model's. With several ``--cells``, each later cell is also compared with the first, paired
by seed, under the change and in the study (a change may rescue one method more than another).

    python benchmarks/regime_rerun.py --study /work/regime --out /work/decay --cells mezo-lora-r64-fp32-sgd --change lr_schedule=linear
    python benchmarks/regime_rerun.py --study benchmarks/results/regime --out benchmarks/results/regime_calm_pick --change calm-pick --seeds 0 --report-only

Writes OUT/rerun.json and OUT/rerun.md (the run directories go under OUT/runs/). Resumable: a finished run is
read back, a killed one resumes from its trajectory. ``--study`` needs the cell's probes and the study's
results.json (benchmarks/results/regime holds both).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

from zotune import atomic, regime
from zotune.config import TrainConfig
from zotune.tune import pick, run_or_reuse, tie_width

BOUND = 1.4
CALM = "calm-pick"


def study_cells(study_out: Path, task: str) -> dict[str, regime.Cell]:
    p = regime.plan(regime.Study(tasks=(task,), ranks=(8, 64)), study_out, prepare=False)
    return {c.entry.label: c for c in p.cells}


def study_probes(cell: regime.Cell) -> tuple[list[dict], float]:
    """The cell's probe rows (tune.json), each with its |g| growth (read from the probe's own log where
    tune.json predates the field), and the dev tie the study's pick was made with (``zotune tune --dev-tie``
    over the probes' dev size), so that re-picking from the same rows reproduces it; a tune.json from before
    the tie picked on exact ties (0)."""
    record = json.loads((cell.tune_out / "tune.json").read_text())
    rows = [{**r, "g_growth": regime.probe_g_growth(cell, r)} for r in record["rows"]]
    return rows, tie_width(record.get("dev_tie", 0), record["probe_dev"])


def parse_change(change: str) -> dict:
    """``calm-pick`` -> {}; ``SETTING=VALUE`` -> {setting: value}, typed and checked as TrainConfig reads it."""
    if change == CALM:
        return {}
    key, sep, value = change.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or key not in {f.name for f in dataclasses.fields(TrainConfig)}:
        raise SystemExit(f"--change: expected {CALM} or SETTING=VALUE with a train setting, got {change!r}")
    cfg = TrainConfig.from_dict({key: value.strip()}, source="--change").validate()  # typed and checked
    return {key: getattr(cfg, key)}


def outcome(run_dir: Path) -> dict | None:
    path = run_dir / "summary.json"
    if not path.exists():
        return None
    s = json.loads(path.read_text())
    return {"test": s["test_after"], "dev_final": s["dev_after"], "dev_before": s["dev_before"],
            "ended_below_start": s["dev_after"] < s["dev_before"]}


def rerun(cell: regime.Cell, study_out: Path, out: Path, seeds: list[int], change: str, bound: float,
          train: bool) -> dict:
    """The cell's seeds with ``change`` (trained unless ``train`` is False), beside the study's runs."""
    rows, tie = study_probes(cell)
    picked = pick(rows, tie=tie)
    chosen = pick(rows, max_g_growth=bound, tie=tie) if change == CALM else picked
    setting = parse_change(change)
    ledger = {r["seed"]: r for r in regime.read_ledger(study_out)
              if r.get("entry") == cell.entry.label and r.get("task") == cell.task and r.get("status") == "ok"}
    runs = []
    for seed in seeds:
        run_dir = out / "runs" / cell.run_dir(seed).name
        if train and (setting or chosen["lr"] != picked["lr"]):
            cfg = regime.run_config(cell, seed, chosen["lr"])
            for key, value in setting.items():
                setattr(cfg, key, value)
            cfg.output_dir, cfg.threads, cfg.progress = str(run_dir), 1, False  # one core per process, as the study
            what, error = run_or_reuse(cfg)
            print(f"{cell.entry.label} seed {seed} at lr {chosen['lr']:g} ({change}): {what}"
                  + (f": {error}" if error else ""), flush=True)
        got, before = outcome(run_dir), ledger.get(seed)
        runs.append({"seed": seed, "variant": got, "picked": None if before is None else {
            "test": before["test"], "dev_final": before["dev_final"], "dev_before": before["dev_before"],
            "ended_below_start": before["dev_final"] < before["dev_before"]}})
    both = [r for r in runs if r["variant"] and r["picked"]]
    diff = {k: regime.paired_interval({r["seed"]: r["variant"][k] for r in both},
                                      {r["seed"]: r["picked"][k] for r in both}) for k in ("test", "dev_final")}
    probe = lambda r: {"lr": r["lr"], "g_growth": r["g_growth"], "probe_dev": r["dev_after"]}  # noqa: E731
    return {"entry": cell.entry.label, "task": cell.task, "change": change,
            "bound": bound if change == CALM else None, "picked": probe(picked),
            "variant": {**probe(chosen), "settings": setting}, "runs": runs, "variant_minus_picked": diff}


def between_variants(results: list[dict]) -> list[dict]:
    """Each later cell against the first, paired by seed, under the change and (for contrast) in the study.

    Why: a change such as a decaying lr can rescue one method more than another, so the comparison that
    matters is between the cells' variants, not only each variant against its own study run."""
    def by_seed(cell: dict, side: str, key: str) -> dict[int, float]:
        return {r["seed"]: r[side][key] for r in cell["runs"] if r[side]}

    if len(results) < 2:
        return []
    first = results[0]
    return [{"a": first["entry"], "b": other["entry"], "task": first["task"], "change": first["change"],
             **{f"{side}_{key}": regime.paired_interval(by_seed(first, side, key), by_seed(other, side, key))
                for side in ("variant", "picked") for key in ("test", "dev_final")}}
            for other in results[1:]]


def _interval(iv: dict) -> str:
    """The study's own interval text (regime._ci), with the number of pairs where there is an interval."""
    return regime._ci(iv) + (f" (n {iv['n']})" if iv["n"] > 1 else "")


def _f(x, fmt=".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:{fmt}}"


def describe_change(c: dict) -> str:
    if c["change"] == CALM:
        return f"calm pick (bound {c['bound']:g}): lr {c['variant']['lr']:g} " \
               f"({_f(c['variant']['g_growth'], '.2f')}x, {_f(c['variant']['probe_dev'])})"
    return ", ".join(f"{k}={v}" for k, v in c["variant"]["settings"].items()) + " at the study's pick"


def markdown(results: list[dict]) -> str:
    lines = ["# Regime cells re-run with one change (benchmarks/regime_rerun.py)", "",
             "'picked' is the regime study's own run at its lr pick (the probe's |g| growth and carved-dev "
             "accuracy in brackets), 'variant' the same seed re-run with the change: a calm pick re-picks the lr "
             "leaving out probes whose |g| grew past the bound (`zotune tune --max-g-growth`); a setting keeps "
             "the study's pick and changes that setting only.", "",
             "| entry | task | lr picked (growth, probe dev) | change | seed | test picked → variant | "
             "dev final picked → variant | ended below start picked / variant |",
             "|---|---|---|---|---|---|---|---|"]
    for c in results:
        for r in c["runs"]:
            p, k = r["picked"] or {}, r["variant"] or {}
            lines.append(
                f"| {c['entry']} | {c['task']} | {c['picked']['lr']:g} ({_f(c['picked']['g_growth'], '.2f')}x, "
                f"{_f(c['picked']['probe_dev'])}) | {describe_change(c)} | {r['seed']} | "
                f"{_f(p.get('test'))} → {_f(k.get('test'))} | {_f(p.get('dev_final'))} → {_f(k.get('dev_final'))} | "
                f"{p.get('ended_below_start', '-')} / {k.get('ended_below_start', '-')} |")
    # The summaries follow the whole table: a paragraph between rows would end the table there, and the
    # later cells' rows would render as plain text.
    lines.append("")
    for c in results:
        for key, iv in c["variant_minus_picked"].items():
            if iv["n"]:
                span = f" [{iv['lo']:+.3f}, {iv['hi']:+.3f}]" if iv["n"] > 1 else ""
                lines.append(f"- {c['entry']} ({c['change']}): variant − picked, {key}: {iv['mean']:+.3f}{span} "
                             f"over {iv['n']} seed{'s' * (iv['n'] > 1)}")
    pairs = between_variants(results)
    if pairs:
        lines += ["", "Between cells, paired by seed (a − b): with the change, and the study's own runs for contrast.", "",
                  "| a − b | task | change | test, with the change | dev final, with the change | test, study | "
                  "dev final, study |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {p['a']} − {p['b']} | {p['task']} | {p['change']} | {_interval(p['variant_test'])} | "
                  f"{_interval(p['variant_dev_final'])} | {_interval(p['picked_test'])} | "
                  f"{_interval(p['picked_dev_final'])} |" for p in pairs]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", type=Path, required=True, help="the regime study's --out (probes, results.json)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--task", default="rotten-tomatoes")
    ap.add_argument("--cells", default="mezo-lora-r64-bf16-sgd", help="comma list of the study's entry labels")
    ap.add_argument("--change", required=True, help=f"{CALM} | SETTING=VALUE (e.g. lr_schedule=linear)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--bound", type=float, default=BOUND, help=f"|g| growth bound of {CALM}")
    ap.add_argument("--report-only", action="store_true", help="read back what OUT holds; train nothing")
    args = ap.parse_args()
    cells = study_cells(args.study, args.task)
    results = []
    for label in args.cells.split(","):
        if label not in cells:
            raise SystemExit(f"--cells: no entry {label!r} in the regime study; it has {', '.join(sorted(cells))}")
        results.append(rerun(cells[label], args.study, args.out, [int(s) for s in args.seeds.split(",")],
                             args.change, args.bound, train=not args.report_only))
    args.out.mkdir(parents=True, exist_ok=True)
    atomic.write_text(args.out / "rerun.json", json.dumps({"cells": results, "between": between_variants(results)}, indent=2))
    report = markdown(results)
    atomic.write_text(args.out / "rerun.md", report)
    print(report)


if __name__ == "__main__":
    main()
