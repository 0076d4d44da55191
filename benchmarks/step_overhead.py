"""What a ZO step costs besides its forward passes: perturb, restore and update, per method and rank.

The step-cost benchmark (`step_cost.py`) divides a whole step by two forward
passes; on a CPU the forwards dominate so much that the few-percent differences
between methods drown in run-to-run noise. Here the loss function is free
(a constant), so what is timed is exactly the work the method adds: drawing
directions, the ±εz passes, the exact restore and the optimizer update. That is
where AR1-ZO's O(d_out + d_in) per layer and step shows against MeZO-LoRA's
O(r·(d_out + d_in)).

    python benchmarks/step_overhead.py                       # SmolLM2-135M, r in 8,64
    python benchmarks/step_overhead.py --ranks 1,8,64 --repeats 30
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from zotune.config import TrainConfig
from zotune.models import load_model
from zotune.setup import build_engine


def overhead_ms(method: str, rank: int, model_name: str, repeats: int) -> dict:
    """Median wall time (ms) of one ZO step whose loss costs nothing, and what the step touched."""
    cfg = TrainConfig(model=model_name, method=method, lora_r=rank, lr=1e-3, eps=1e-2)
    model, _, _ = load_model(model_name)
    model, engine = build_engine(cfg, model)
    queried = sum(v.numel() for _, v in engine.method.views(0))
    times = []
    for _ in range(repeats + 2):
        t = time.perf_counter()
        engine.step(lambda: 0.0, cfg.lr)
        times.append((time.perf_counter() - t) * 1e3)
    return {"method": method, "rank": rank, "median_ms": statistics.median(times[2:]),
            "queried_numbers": queried, "trainable": engine.method.num_trainable()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="mezo-lora,ar1zo")
    ap.add_argument("--ranks", default="8,64")
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/step_overhead.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for rank in (int(r) for r in args.ranks.split(",")):
        for method in args.methods.split(","):
            row = overhead_ms(method, rank, args.model, args.repeats)
            rows.append(row)
            print(f"{method:10s} r={rank:<3d} overhead {row['median_ms']:8.2f} ms/step  "
                  f"queried {row['queried_numbers']:>9,} of {row['trainable']:>10,} trainable", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "threads": args.threads, "repeats": args.repeats,
                                          "rows": rows}, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
