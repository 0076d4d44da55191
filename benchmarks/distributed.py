"""Throughput of distributed ZO: 1 process vs 2 torchrun ranks (CPU, gloo), in training examples per second.

Each configuration is a short ``zotune train`` run; throughput is measured from
the per-step wall clock in its metrics.jsonl (steps 2..N, so loading and the
zero-shot evaluation are excluded):  examples/s = batch_size x steps / seconds.

* data-parallel: 1 process (1 thread) vs 2 ranks (1 thread each) on the same batches;
* query-parallel with q = 2: 1 process vs 2 ranks (each rank one query on the full batch);
* a reference: 1 process with 2 threads (the same 2 cores, used by intra-op threading).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/distributed.py --model smollm2-135m --steps 12

Writes benchmarks/results/distributed.json. On a shared machine the numbers are
noisy: the load average is recorded next to them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(label: str, ranks: int, threads: int, extra: list[str], args, tmp: Path) -> dict:
    out = tmp / label
    train = ["train", "--model", args.model, "--task", args.task, "--steps", str(args.steps),
             "--batch-size", str(args.batch_size), "--train-size", "200", "--dev-size", "8",
             "--max-length", "64", "--method", args.method, "--lr", "1e-3", "--threads", str(threads),
             "--progress", "false", "--output-dir", str(out), *extra]
    if ranks == 1:
        cmd = [sys.executable, "-m", "zotune.cli", *train]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               "-m", "zotune.cli", *train]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    load_before = os.getloadavg()[0]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "loss" in r]
    seconds = steps[-1]["time_s"] - steps[0]["time_s"]
    examples = args.batch_size * (len(steps) - 1)
    row = {"label": label, "ranks": ranks, "threads_per_rank": threads, "steps_timed": len(steps) - 1,
           "seconds": round(seconds, 3), "examples_per_s": round(examples / seconds, 3),
           "comm_bytes_per_step": steps[-1].get("comm_bytes", 0), "load_avg_before": round(load_before, 2)}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="rotten-tomatoes")
    p.add_argument("--method", default="mezo-ln")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distributed.json"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = [
            run("1 process, 1 thread", 1, 1, [], args, tmp),
            run("2 ranks data-parallel, 1 thread each", 2, 1, ["--parallel", "data"], args, tmp),
            run("1 process, 2 threads", 1, 2, [], args, tmp),
            run("1 process, q=2, 1 thread", 1, 1, ["--queries", "2"], args, tmp),
            run("2 ranks query-parallel, q=2, 1 thread each", 2, 1, ["--queries", "2", "--parallel", "query"],
                args, tmp),
        ]
    speed = {r["label"]: r["examples_per_s"] for r in rows}
    result = {
        "what": "training throughput (examples/s) of zotune train, 1 process vs 2 torchrun ranks on CPU (gloo)",
        "command": " ".join(sys.argv),
        "model": args.model, "method": args.method, "task": args.task, "batch_size": args.batch_size,
        "steps": args.steps, "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "note": "shared, busy 2-core machine: expect noise of tens of percent between repeats",
        "runs": rows,
        "data_parallel_speedup": round(speed["2 ranks data-parallel, 1 thread each"] / speed["1 process, 1 thread"], 3),
        "query_parallel_speedup": round(speed["2 ranks query-parallel, q=2, 1 thread each"]
                                        / speed["1 process, q=2, 1 thread"], 3),
        "two_threads_speedup": round(speed["1 process, 2 threads"] / speed["1 process, 1 thread"], 3),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("data_parallel_speedup", "query_parallel_speedup",
                                             "two_threads_speedup")}))


if __name__ == "__main__":
    main()
