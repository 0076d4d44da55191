"""Step cost of ZO methods: ZO step time / two plain forward passes, and peak memory.

Everything is measured in one run on the same batch, interleaving the plain
forward pairs and the ZO steps so machine noise hits both alike; the ratio is
what to quote, not the seconds. Peak memory is measured in fresh subprocesses
(one per mode), since a process's peak RSS never goes down: training peak /
inference peak, where inference = loading the model and scoring the batch.

    python benchmarks/step_cost.py                      # SmolLM2-135M: mezo-lora, ar1zo and mezo
    python benchmarks/step_cost.py --methods mezo-lora --repeats 5 --out benchmarks/results/step_cost.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from zotune.config import TrainConfig
from zotune.engine import ZOEngine
from zotune.evaluate import Scorer
from zotune.methods import get_method
from zotune.models import load_model
from zotune.optim import make_optimizer
from zotune.tasks import load_task
from zotune.train import batch_indices


def setup(model_name: str, method_name: str, batch_size: int):
    model, tok, _ = load_model(model_name)
    data = load_task("rotten-tomatoes")
    batch = [data.train[i] for i in batch_indices(len(data.train), batch_size, 0, 0)]
    if method_name == "inference":
        return Scorer(model, tok), batch, None
    cfg = TrainConfig(method=method_name)
    method = get_method(method_name)(cfg)
    model = method.prepare(model)
    engine = ZOEngine(method, make_optimizer(cfg.optimizer), eps=cfg.eps, seed=0)
    return Scorer(model, tok), batch, engine


def time_method(model_name: str, method_name: str, batch_size: int, repeats: int) -> dict:
    scorer, batch, engine = setup(model_name, method_name, batch_size)
    loss = lambda: scorer.loss(batch)
    loss()
    engine.step(loss, lr=1e-6)  # warm-up: first-call allocations, thread pools
    fwd2, steps = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        loss(), loss()
        fwd2.append(time.perf_counter() - t)
        t = time.perf_counter()
        engine.step(loss, lr=1e-6)
        steps.append(time.perf_counter() - t)
    two = statistics.median(fwd2)
    step = statistics.median(steps)
    return {"method": method_name, "two_forwards_s": two, "step_s": step, "ratio": step / two,
            "trainable_params": engine.method.num_trainable(), "repeats": repeats}


def peak_memory(model_name: str, mode: str, batch_size: int) -> float:
    """Peak memory (MiB) of a fresh process that runs ``mode`` (inference or a method) for 2 steps."""
    code = (
        "import sys, json; sys.path.insert(0, %r)\n"
        "from step_cost import setup\n"
        "from zotune.train import peak_memory_mb\n"
        "scorer, batch, engine = setup(%r, %r, %d)\n"
        "loss = lambda: scorer.loss(batch)\n"
        "for _ in range(2):\n"
        "    engine.step(loss, lr=1e-6) if engine else (loss(), loss())\n"
        "print(json.dumps(peak_memory_mb('cpu')))\n"
    ) % (str(Path(__file__).parent), model_name, mode, batch_size)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="mezo-lora,ar1zo,mezo")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default="benchmarks/results/step_cost.json")
    args = ap.parse_args()

    results = {"model": args.model, "batch_size": args.batch_size, "device": "cpu",
               "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
               "methods": []}
    inference_mb = peak_memory(args.model, "inference", args.batch_size)
    results["inference_peak_mb"] = inference_mb
    for name in args.methods.split(","):
        row = time_method(args.model, name, args.batch_size, args.repeats)
        row["train_peak_mb"] = peak_memory(args.model, name, args.batch_size)
        row["memory_ratio"] = row["train_peak_mb"] / inference_mb
        results["methods"].append(row)
        print(f"{name:10s} step/2fwd = {row['ratio']:.3f}   train/inference memory = {row['memory_ratio']:.3f}"
              f"   ({row['step_s']:.2f}s vs {row['two_forwards_s']:.2f}s; {row['train_peak_mb']:.0f} vs {inference_mb:.0f} MiB)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
