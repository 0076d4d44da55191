"""Batched queries: a ZO step's perturbations in one forward over copies of the batch, vs the sequential loop.

For each dtype of the frozen base, method, micro-batch size and number of
queries q (central differences), this times, in one process and interleaved:

* one unperturbed forward of the batch (``scorer.loss_tensor(batch)``),
* a sequential step (``engine.step``: 2q forwards, one after the other),
* a batched step (``zotune.batched.step_batched``: one forward over 2q copies),

and reports ``step_over_one_forward`` = median step time / median forward time
(the sequential step is ~2q by construction; the batched step's ratio is what
batching buys), in CPU seconds of this single-threaded process (steadier than
wall time on a shared, oversubscribed machine; the wall-time ratio is kept too,
``step_over_one_forward_wall``). It also checks the batched slopes against the sequential ones at
the same step and weights (lr 0, same step number): ``max_abs_dg``.

    python benchmarks/batched_queries.py                      # SmolLM2-135M, what the .md reports
    python benchmarks/batched_queries.py --repeats 2 --methods ar1zo --dtypes float32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from zotune.batched import step_batched
from zotune.calibration import calibration_batches
from zotune.config import TrainConfig
from zotune.evaluate import Scorer
from zotune.methods import METHODS
from zotune.models import load_model
from zotune.setup import build_engine
from zotune.tasks.base import load_task

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): on a shared, oversubscribed machine the CPU time of a
    single-threaded process is the steadier measure of its own work."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def bench_method(method: str, dtype: str, args, train) -> list[dict]:
    model, tok, _ = load_model(args.model, DTYPES[dtype])
    cfg = TrainConfig.make(model=args.model, method=method, lr=args.lr, eps=1e-2, seed=0, queries=1).validate()
    calibration = (lambda: calibration_batches(train, tok, cfg.calib_examples, 0, cfg.eval_batch_size)) \
        if METHODS[method].needs_calibration else None
    model, engine = build_engine(cfg, model, calibration=calibration)
    batch = train[: args.batch_size]
    rows = []
    for micro in (int(m) for m in args.micro.split(",")):
        scorer = Scorer(model, tok, micro_batch_size=micro)
        for q in (int(x) for x in args.queries.split(",")):
            engine.queries = q
            # the slopes of both paths at the same step and weights (lr 0 leaves every weight as it was)
            step0 = engine.step_count
            seq_g = engine.step(lambda: scorer.loss_tensor(batch), 0.0).grads
            engine.step_count = step0
            bat_g = step_batched(engine, model, lambda c: scorer.copy_losses(batch, c), 0.0).grads
            dg = max(abs(a - b) for a, b in zip(seq_g, bat_g))
            times = {k: ([], []) for k in ("forward", "sequential", "batched")}  # (wall, cpu) seconds
            for rep in range(args.repeats + 1):  # the first round warms up and is dropped
                t = {"forward": timed(lambda: scorer.loss_tensor(batch)),
                     "sequential": timed(lambda: engine.step(lambda: scorer.loss_tensor(batch), args.lr)),
                     "batched": timed(lambda: step_batched(engine, model, lambda c: scorer.copy_losses(batch, c),
                                                           args.lr))}
                if rep:
                    for k, (wall, cpu) in t.items():
                        times[k][0].append(wall)
                        times[k][1].append(cpu)
            fwd, fwd_cpu = (statistics.median(x) for x in times["forward"])
            for mode in ("sequential", "batched"):
                step_s, step_cpu = (statistics.median(x) for x in times[mode])
                rows.append({"method": method, "dtype": dtype, "queries": q, "mode": mode, "micro_batch": micro,
                             "step_over_one_forward": round(step_cpu / fwd_cpu, 3),
                             "step_over_one_forward_wall": round(step_s / fwd, 3),
                             "step_cpu_s": round(step_cpu, 4), "forward_cpu_s": round(fwd_cpu, 4),
                             "step_s": round(step_s, 4), "forward_s": round(fwd, 4),
                             "forwards_per_step": METHODS[method].forward_cost(q, "central"),
                             "max_abs_dg": dg, "g_sequential": seq_g, "g_batched": bat_g,
                             "repeats": args.repeats})
                print(f"{dtype:8s} {method:10s} micro {micro} q {q} {mode:10s} step/forward cpu "
                      f"{step_cpu / fwd_cpu:6.2f} wall {step_s / fwd:6.2f}  (step {step_cpu:.3f} s cpu, "
                      f"{step_s:.3f} s wall; forward {fwd_cpu:.3f} s cpu, {fwd:.3f} s wall; max|dg| {dg:.2e})",
                      flush=True)
    return rows


def write_md(rows: list[dict], args, path: Path, command: str) -> None:
    lines = [f"# Batched queries: one forward over 2q copies vs 2q forwards ({args.model}, batch {args.batch_size}, "
             f"rotten-tomatoes, {args.threads} thread, torch {torch.__version__}, {platform.machine()})", "",
             "Command:", "", f"    {command}", "",
             "`step / forward` = median CPU time of one ZO step (central differences, q queries: 2q forward "
             "passes' worth) / median CPU time of one unperturbed forward of the same batch, interleaved in one "
             f"single-threaded process, {args.repeats} timed repeats after one warm-up (CPU time of the process, "
             "because the machine is shared and oversubscribed; wall-time ratios in parentheses). `speed-up` = "
             "sequential / batched step CPU time. "
             "`max |dg|` = largest difference between the sequential and the batched slope at the same step and "
             "weights.", "",
             "| dtype | method | micro-batch | q | forward s (cpu) | sequential step / forward | batched step / forward "
             "| speed-up | max \\|dg\\| |", "|---|---|---|---|---|---|---|---|---|"]
    keyed = {(r["dtype"], r["method"], r["micro_batch"], r["queries"], r["mode"]): r for r in rows}
    for (dt, m, mb, q, mode), r in keyed.items():
        if mode != "sequential":
            continue
        b = keyed[(dt, m, mb, q, "batched")]
        lines.append(f"| {dt} | {m} | {mb} | {q} | {r['forward_cpu_s']:.2f} | {r['step_over_one_forward']:.2f} "
                     f"({r['step_over_one_forward_wall']:.2f}) | {b['step_over_one_forward']:.2f} "
                     f"({b['step_over_one_forward_wall']:.2f}) | {r['step_cpu_s'] / b['step_cpu_s']:.2f}x "
                     f"({r['step_s'] / b['step_s']:.2f}x) | {r['max_abs_dg']:.1e} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="mezo-lora,ar1zo,zoact")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--micro", default="0,4", help="micro-batch sizes (0 = one forward per batch)")
    ap.add_argument("--queries", default="1,4")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/batched_queries.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    train = load_task("rotten-tomatoes").train
    rows = []
    for dtype in args.dtypes.split(","):
        for method in args.methods.split(","):
            rows += bench_method(method, dtype, args, train)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1) + "\n")
    command = "PYTHONPATH=src python benchmarks/batched_queries.py " + " ".join(argv or [])
    write_md(rows, args, out.with_suffix(".md"), command.strip())


if __name__ == "__main__":
    main(__import__("sys").argv[1:])
