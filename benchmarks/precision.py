"""fp32 vs bf16 base on this machine: forward time and ZO step cost, per method, in one process.

What `--dtype auto` decides (zotune.hardware.pick_dtype) rests on this: on a CPU
with native bf16 (avx512_bf16/AMX) a bf16 base should make a forward, and so a
ZO step, several times cheaper. Both runs of a method are built by
zotune.setup.setup exactly as `zotune train` builds them, and their timings are
interleaved (fp32, bf16, fp32, ...) so that a loaded machine slows both alike:
quote the ratios, not the seconds.

    python benchmarks/precision.py                      # mezo-lora, ar1zo, zoact on rotten-tomatoes
    python benchmarks/precision.py --methods mezo-lora --repeats 9 --threads 2

Writes benchmarks/results/precision.json (one row per method and dtype) and precision.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from zotune.config import TrainConfig
from zotune.hardware import cpu_has_native_bf16
from zotune.setup import batch_indices, load_data, setup

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="mezo-lora,ar1zo,zoact")
    p.add_argument("--task", default="rotten-tomatoes")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
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
        times = {d: {"forward": [], "step": []} for d in built}
        for _ in range(args.repeats + 1):  # the first round warms up and is dropped
            for dtype, (run, batch) in built.items():
                t = time.perf_counter()
                run.scorer.loss(batch)
                times[dtype]["forward"].append(time.perf_counter() - t)
                t = time.perf_counter()
                run.engine.step(lambda: run.scorer.loss_tensor(batch), run.cfg.lr)
                times[dtype]["step"].append(time.perf_counter() - t)
        for dtype, (run, _) in built.items():
            fwd = statistics.median(times[dtype]["forward"][1:])
            step = statistics.median(times[dtype]["step"][1:])
            per = run.method.forward_cost(run.cfg.queries, run.cfg.difference)
            rows.append({"method": method, "dtype": dtype, "forward_s": round(fwd, 4), "step_s": round(step, 4),
                         "forwards_per_step": per, "step_over_forwards": round(step / (per * fwd), 3)})
        f32, b16 = rows[-2], rows[-1]
        for row in (f32, b16):
            row["forward_speedup_vs_fp32"] = round(f32["forward_s"] / row["forward_s"], 2)
            row["step_speedup_vs_fp32"] = round(f32["step_s"] / row["step_s"], 2)
        print(json.dumps(b16))
    meta = {"cpu_has_native_bf16": cpu_has_native_bf16(), "threads": args.threads, "batch_size": args.batch_size,
            "task": args.task, "repeats": args.repeats, "torch": torch.__version__,
            "command": "python benchmarks/precision.py " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out")}
    out = Path(args.out)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"# fp32 vs bf16 base: forward time and ZO step cost ({args.task}, batch {args.batch_size})", "",
             f"`{meta['command']}`; CPU with native bf16: {meta['cpu_has_native_bf16']}; torch {torch.__version__}; "
             f"medians of {args.repeats} interleaved repeats in one process (ratios, not seconds, are the result).",
             "", "| method | dtype | forward s | step s | step / its forwards | forward speed-up | step speed-up |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['dtype']} | {r['forward_s']:.3f} | {r['step_s']:.3f} | "
              f"{r['step_over_forwards']:.2f} | {r['forward_speedup_vs_fp32']:.2f}x | {r['step_speedup_vs_fp32']:.2f}x |"
              for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"written to {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
