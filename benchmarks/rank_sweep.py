"""Rank sweep: MeZO-LoRA vs atomwise-canonical vs AR1-ZO at equal forward-pass budgets.

Every (configuration, rank, seed) trains with the same steps, batch and eps, so
the same number of forward passes; the table reports final and best dev
accuracy, the last training loss and the forward passes, and the plot dev
accuracy against forward passes. With one shared lr this is methods.md's
"rank sweep with a shared lr"; pass ``--lr-<config>`` to give a configuration
its own (tuned) lr.

    python benchmarks/rank_sweep.py                         # SST-2, SmolLM2-135M, r in 1,4,16,64 (hours on CPU)
    python benchmarks/rank_sweep.py --ranks 1,4 --steps 50 --dev-size 200
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

from zotune.config import TrainConfig
from zotune.errors import ZOError
from zotune.train import Summary, train

# name -> TrainConfig settings that define the query topology and scaling
CONFIGS: dict[str, dict] = {
    "mezo-lora": {"method": "mezo-lora"},  # full-adapter query, alpha/r
    "atom-canonical": {"method": "ar1zo", "ar1_scaling": "canonical"},  # one atom, alpha/r
    "ar1zo": {"method": "ar1zo", "ar1_scaling": "topology"},  # one atom, alpha
}


def grid(args) -> list[tuple[str, int, int]]:
    """(config, rank, seed) in run order: rank-major, high ranks first, so a cut-short sweep
    still compares the configurations where they differ; at r=1 the three are the same
    query (one atom is the whole adapter, and alpha/r = alpha), so r=1 runs only once."""
    ranks = sorted((int(r) for r in args.ranks.split(",")), key=lambda r: (r == 1, -r))
    names = args.configs.split(",")
    return [(name, rank, int(seed)) for rank in ranks for name in (names if rank > 1 else names[:1])
            for seed in args.seeds.split(",")]


def run_sweep(args) -> list[dict]:
    """Train every grid point; a finished run (summary.json) is read back and a killed one resumed."""
    rows = []
    out = Path(args.out)
    for name, rank, seed in grid(args):
        lr = getattr(args, f"lr_{name.replace('-', '_')}") or args.lr
        run_dir = out / "runs" / f"{name}-r{rank}-s{seed}"
        cfg = TrainConfig.make(model=args.model, task=args.task, data_dir=args.data_dir, lora_r=rank,
                          lora_alpha=args.alpha, lr=lr, eps=args.eps, steps=args.steps,
                          batch_size=args.batch_size, train_size=args.train_size, dev_size=args.dev_size,
                          eval_every=args.eval_every, seed=seed, output_dir=str(run_dir),
                          threads=args.threads, progress=False, **CONFIGS[name])
        try:
            if (run_dir / "summary.json").exists():
                s = Summary(**json.loads((run_dir / "summary.json").read_text()))
            else:
                s = train(cfg, resume=run_dir if (run_dir / "trajectory.jsonl").exists() else None)
        except ZOError as exc:  # a diverged run is a result, not a crash of the sweep
            print(f"{name:15s} r={rank:<3d} seed={seed} FAILED: {exc}", flush=True)
            rows.append({"config": name, "rank": rank, "seed": seed, "lr": lr, "dev_before": float("nan"),
                         "dev_final": float("nan"), "dev_best": float("nan"), "train_loss_last": float("nan"),
                         "forward_passes": 0, "wall_s": 0.0, "curve": [], "error": str(exc)})
            continue
        curve = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        rows.append({"config": name, "rank": rank, "seed": seed, "lr": lr, "dev_before": s.dev_before,
                     "dev_final": s.dev_after, "dev_best": s.dev_best, "train_loss_last": s.train_loss_last,
                     "forward_passes": s.forward_passes, "wall_s": s.wall_s,
                     "curve": [(r["forward_passes"], r["dev_acc"]) for r in curve if "dev_acc" in r]})
        print(f"{name:15s} r={rank:<3d} seed={seed} dev {s.dev_before:.3f} -> {s.dev_after:.3f} "
              f"(best {s.dev_best:.3f}) loss {s.train_loss_last:.4f} fwd {s.forward_passes}", flush=True)
        write_outputs(rows, out, args.title)  # partial results survive a cut-short sweep
    return rows


def write_outputs(rows: list[dict], out: Path, title: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "rank_sweep.json").write_text(json.dumps(rows, indent=2))
    flat = [{k: v for k, v in r.items() if k != "curve"} for r in rows]
    with open(out / "rank_sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in flat for k in r)))
        w.writeheader()
        w.writerows(flat)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["config"], r["rank"]), []).append(r)

    def stat(rs, key):
        xs = [r[key] for r in rs]
        return f"{statistics.mean(xs):.3f}" + (f" ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else "")

    lines = [f"# {title}", "", "| config | r | lr | dev before | dev final | dev best | train loss (last 10) | "
             "forward passes | seeds |", "|---|---|---|---|---|---|---|---|---|"]
    for (name, rank), rs in groups.items():
        lines.append(f"| {name} | {rank} | {rs[0]['lr']:g} | {stat(rs, 'dev_before')} | {stat(rs, 'dev_final')} | "
                     f"{stat(rs, 'dev_best')} | {stat(rs, 'train_loss_last')} | {rs[0]['forward_passes']} | "
                     f"{len(rs)} |")
    (out / "rank_sweep.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys(r["config"] for r in rows))
    fig, axes = plt.subplots(1, len(configs), figsize=(5 * len(configs), 4), squeeze=False, sharey=True)
    for ax, name in zip(axes[0], configs):
        for (cfg, rank), rs in groups.items():
            if cfg == name and rs[0]["curve"]:
                xs = [x for x, _ in rs[0]["curve"]]
                ys = [statistics.mean(r["curve"][i][1] for r in rs) for i in range(len(xs))]
                ax.plot(xs, ys, "o-", label=f"r={rank}")
        ax.set_title(name)
        ax.set_xlabel("forward passes")
        ax.legend()
    axes[0][0].set_ylabel("dev accuracy")
    fig.tight_layout()
    fig.savefig(out / "rank_sweep.png", dpi=110)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--data-dir", default="")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--ranks", default="1,4,16,64")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--train-size", type=int, default=1000)
    ap.add_argument("--dev-size", type=int, default=500)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--alpha", type=float, default=2.0, help="alpha: scale alpha/r (canonical) or alpha (ar1zo)")
    ap.add_argument("--lr", type=float, default=1.5e-2, help="shared lr")
    for name in CONFIGS:
        ap.add_argument(f"--lr-{name}", type=float, default=None, help=f"lr for {name} (default: --lr)")
    ap.add_argument("--eps", type=float, default=1e-2)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--out", default="benchmarks/results/rank_sweep")
    args = ap.parse_args(argv)
    args.title = (f"Rank sweep: {args.task}, {args.model}, {args.steps} steps x batch {args.batch_size}, "
                  f"eps {args.eps}, alpha {args.alpha}")
    rows = run_sweep(args)
    write_outputs(rows, Path(args.out), args.title)
    print(f"written to {args.out}/rank_sweep.{{md,csv,json,png}}")


if __name__ == "__main__":
    main()
