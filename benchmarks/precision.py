"""fp32 vs bf16 base on this machine: forward time and ZO step cost, per method, in one process.

What `--dtype auto` decides (zotune.hardware.pick_dtype) rests on this: on a CPU
with native bf16 (avx512_bf16/AMX) a bf16 base should make a forward, and so a
ZO step, several times cheaper. Both runs of a method are built by
zotune.setup.setup exactly as `zotune train` builds them, and their timings are
interleaved (fp32, bf16, fp32, ...) so that a loaded machine slows both alike,
and timed twice: wall seconds and this process's CPU seconds (with one thread,
CPU seconds measure the work itself and barely move when other processes share
the cores). Quote the ratios, not the seconds.

    python benchmarks/precision.py                      # mezo-lora, ar1zo, zoact on rotten-tomatoes
    python benchmarks/precision.py --methods mezo-lora --repeats 9 --threads 2

Writes benchmarks/results/precision.json (one row per method and dtype) and precision.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from zotune.config import TrainConfig
from zotune.hardware import cpu_has_native_bf16, cpu_name
from zotune.setup import batch_indices, load_data, setup

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="mezo-lora,ar1zo,zoact")
    p.add_argument("--task", default="rotten-tomatoes")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS / "precision.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for method in args.methods.split(","):
        built = {}
        for dtype in ("float32", "bfloat16"):
            cfg = TrainConfig.make(method=method, task=args.task, dtype=dtype, batch_size=args.batch_size,
                                   train_size=200, dev_size=10, calib_examples=16, progress=False,
                                   **({"optimizer": "adam"} if method == "zoact" else {}))
            data = load_data(cfg)
            built[dtype] = (setup(cfg, data), [data.train[i] for i in batch_indices(len(data.train),
                                                                                       cfg.batch_size, 0, 0)])
        times = {d: {k: [] for k in ("forward", "step", "forward_cpu", "step_cpu")} for d in built}

        def timed(dtype: str, what: str, fn) -> None:
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            times[dtype][what].append(time.perf_counter() - wall)
            times[dtype][what + "_cpu"].append(time.process_time() - cpu)

        for _ in range(args.repeats + 1):  # the first round warms up and is dropped
            for dtype, (run, batch) in built.items():
                timed(dtype, "forward", lambda: run.scorer.loss(batch))
                timed(dtype, "step", lambda: run.engine.step(lambda: run.scorer.loss_tensor(batch), run.cfg.lr))
        for dtype, (run, _) in built.items():
            med = {k: statistics.median(v[1:]) for k, v in times[dtype].items()}
            per = run.method.forward_cost(run.cfg.queries, run.cfg.difference)
            rows.append({"method": method, "dtype": dtype, "forward_s": round(med["forward"], 4),
                         "step_s": round(med["step"], 4), "forward_cpu_s": round(med["forward_cpu"], 4),
                         "step_cpu_s": round(med["step_cpu"], 4), "forwards_per_step": per,
                         "step_over_forwards": round(med["step_cpu"] / (per * med["forward_cpu"]), 3)})
        f32, b16 = rows[-2], rows[-1]
        for row in (f32, b16):
            row["forward_speedup_vs_fp32"] = round(f32["forward_cpu_s"] / row["forward_cpu_s"], 2)
            row["step_speedup_vs_fp32"] = round(f32["step_cpu_s"] / row["step_cpu_s"], 2)
            row["wall_forward_speedup_vs_fp32"] = round(f32["forward_s"] / row["forward_s"], 2)
        print(json.dumps(b16))
    meta = {"cpu": cpu_name(), "cpu_has_native_bf16": cpu_has_native_bf16(), "threads": args.threads,
            "batch_size": args.batch_size,
            "load_average": os.getloadavg(), "timing": "speed-ups and step/forwards from CPU seconds; wall seconds beside",
            "task": args.task, "repeats": args.repeats, "torch": torch.__version__,
            "command": "python benchmarks/precision.py " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out")}
    out = Path(args.out)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"# fp32 vs bf16 base: forward time and ZO step cost ({args.task}, batch {args.batch_size})", "",
             f"`{meta['command']}`; CPU {meta['cpu']}, native bf16: {meta['cpu_has_native_bf16']}; "
             f"torch {torch.__version__}; "
             f"medians of {args.repeats} interleaved repeats in one process; load average at the end "
             f"{', '.join(f'{x:.1f}' for x in meta['load_average'])} on {os.cpu_count()} cores. Speed-ups and "
             "step / its forwards are from the process's CPU seconds (one thread: the work itself); wall seconds "
             "beside, for reference.", "",
             "| method | dtype | forward CPU s | step CPU s | step / its forwards | forward speed-up | step speed-up | "
             "forward wall s | wall forward speed-up |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['dtype']} | {r['forward_cpu_s']:.3f} | {r['step_cpu_s']:.3f} | "
              f"{r['step_over_forwards']:.2f} | {r['forward_speedup_vs_fp32']:.2f}x | {r['step_speedup_vs_fp32']:.2f}x | "
              f"{r['forward_s']:.3f} | {r['wall_forward_speedup_vs_fp32']:.2f}x |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"written to {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
