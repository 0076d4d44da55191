"""Pick each method's learning rate by a short probe before a comparison (methods.md: "tune the lr per method").

Every (entry, lr) pair of the grid is one ``zotune bench`` run of the preset's entry at that lr, with a small
forward-pass budget and one seed, written to ``OUT/<entry>-<lr>/`` (so a killed probe resumes and a finished one
is skipped). The table ranks the lrs of each entry by final dev accuracy, then by the mean training loss of the
last 10 steps, and names the pick.

    python benchmarks/lr_probe.py --grid lozo=1e-6,1e-5 subzero=1e-5,5e-5 --budget 80
    python benchmarks/lr_probe.py --grid zoact=1e-3,5e-3,2e-2 --out runs/probe --table-only

It is a probe, not a tuning study: one seed, a few dozen steps, 200 dev examples (about +-3.5 points), so it
catches lrs that do not move or that diverge; close calls between neighbouring lrs are noise.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from zotune.bench import PRESETS, run_bench, select


def parse_grid(items: list[str]) -> list[tuple[str, str]]:
    """(entry, lr as typed): the folder is named after the text (lozo-1e-6), the run gets float(text)."""
    pairs = []
    for item in items:
        label, _, lrs = item.partition("=")
        if not lrs:
            raise SystemExit(f"--grid wants ENTRY=LR,LR,...; got {item!r}")
        for lr in lrs.split(","):
            float(lr)  # a typo fails here, before any run
            pairs.append((label, lr))
    return pairs


def probe_dir(out: Path, label: str, lr: str) -> Path:
    return out / f"{label}-{lr}"


def table(out: Path, pairs: list[tuple[str, str]]) -> tuple[str, dict]:
    rows: dict[str, list[dict]] = {}
    for label, lr in pairs:
        path = probe_dir(out, label, lr) / "results.json"
        if not path.exists():
            continue
        r = json.loads(path.read_text())["runs"][0]
        rows.setdefault(label, []).append(r)
    lines = ["| entry | lr | steps | dev before | dev curve (every eval) | dev final | train loss (last 10) | status |",
             "|---|---|---|---|---|---|---|---|"]
    picks = {}
    for label, runs in rows.items():
        ok = [r for r in runs if r["status"] == "ok"]
        if ok:
            best = max(ok, key=lambda r: (r["dev_final"], -r["train_loss_last"]))
            picks[label] = best["lr"]
        for r in sorted(runs, key=lambda r: r["lr"]):
            curve = " ".join(f"{a:.3f}" for _, a in r.get("curve", []))
            loss = r["train_loss_last"]
            mark = " **pick**" if picks.get(label) == r["lr"] else ""
            lines.append(f"| {label} | {r['lr']:g}{mark} | {r['steps']} | {r['dev_before']:.3f} | {curve} | "
                         f"{r['dev_final']:.3f} | {'-' if math.isnan(loss) else f'{loss:.3f}'} | "
                         f"{r['status']}{': ' + r['error'][:80] if r['error'] else ''} |")
    return "\n".join(lines) + "\n", picks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", nargs="+", required=True, help="ENTRY=LR,LR,... (entries of --preset)")
    parser.add_argument("--preset", default="sst2-smollm2")
    parser.add_argument("--budget", type=int, default=80, help="forward passes per probe")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/probe")
    parser.add_argument("--table-only", action="store_true", help="only summarise the probes already run")
    args = parser.parse_args()

    out, pairs = Path(args.out), parse_grid(args.grid)
    if not args.table_only:
        for label, lr in pairs:
            preset = select(PRESETS[args.preset], methods=[label], seeds=[args.seed], budget=args.budget, lr=float(lr),
                            settings={"threads": args.threads})
            run_bench(preset, probe_dir(out, label, lr))
    text, picks = table(out, pairs)
    header = (f"# Learning-rate probe: preset `{args.preset}`, {args.budget} forward passes, seed {args.seed}\n\n"
              f"`python benchmarks/lr_probe.py --grid {' '.join(args.grid)} --budget {args.budget}`\n\n")
    (out / "lr_probe.md").write_text(header + text)
    (out / "lr_probe.json").write_text(json.dumps(picks, indent=2) + "\n")
    print(header + text + f"\npicks: {picks}")


if __name__ == "__main__":
    main()
