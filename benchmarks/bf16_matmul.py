"""A bf16 base on a CPU without native bf16: torch's emulated matmuls against zotune's fp32 matmuls.

On such a CPU zotune computes a bf16 base's linear layers in fp32 and rounds their
outputs to bf16 (zotune.hardware.bf16_matmuls_in_fp32), as native bf16 hardware
accumulates in fp32. This measures what that buys and whether it keeps bf16's
numbers, with three builds of the same run (zotune.setup.setup, as `zotune train`
builds them) in one process:

- fp32: an fp32 base;
- bf16 torch: a bf16 base, matmuls left to torch (ZOTUNE_CPU_BF16_MATMUL=native);
- bf16 fp32-matmul: a bf16 base, matmuls in fp32 rounded to bf16 (the default).

Time: one forward of a batch, interleaved (fp32, torch, fp32-matmul, ...), from this
process's CPU seconds (one thread: the work itself, little moved by other
processes). Numbers: the loss of each of --steps batches, and the slope g of a ZO
step on each (lr 0, so the model never moves and every build sees the same
perturbation z). bf16's rounding moves g away from fp32's (the noise floor the
regime study is about); a change of summation order is a new draw of that noise,
so the two bf16 builds should differ from fp32 by about as much as each other,
not agree bit for bit.

    python benchmarks/bf16_matmul.py                       # ar1zo r=64 on rotten-tomatoes
    python benchmarks/bf16_matmul.py --method mezo-lora --steps 16

Writes benchmarks/results/bf16_matmul.json and bf16_matmul.md.
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
from zotune.hardware import CPU_BF16_MATMUL_ENV, cpu_has_native_bf16, cpu_name
from zotune.setup import batch_indices, load_data, setup

RESULTS = Path(__file__).resolve().parent / "results"
BUILDS = {"fp32": ("float32", "auto"), "bf16 torch": ("bfloat16", "native"),
          "bf16 fp32-matmul": ("bfloat16", "auto")}


def build(args, dtype: str, policy: str):
    os.environ[CPU_BF16_MATMUL_ENV] = policy  # read when the model loads
    cfg = TrainConfig.make(method=args.method, task=args.task, dtype=dtype, batch_size=args.batch_size,
                           lora_r=args.rank, train_size=200, dev_size=10, calib_examples=16, progress=False,
                           lr=0.0)
    data = load_data(cfg)
    batches = [[data.train[i] for i in batch_indices(len(data.train), cfg.batch_size, 0, s)]
               for s in range(args.steps)]
    return setup(cfg, data), batches


def rms(a: list[float], b: list[float] | None = None) -> float:
    """Root mean square of ``a`` (of ``a - b`` when ``b`` is given) over the batches."""
    b = b or [0.0] * len(a)
    return statistics.fmean((x - y) ** 2 for x, y in zip(a, b)) ** 0.5


PAIRS = {"bf16 torch vs fp32": ("bf16 torch", "fp32"), "bf16 fp32-matmul vs fp32": ("bf16 fp32-matmul", "fp32"),
         "bf16 fp32-matmul vs bf16 torch": ("bf16 fp32-matmul", "bf16 torch")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="ar1zo")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--task", default="rotten-tomatoes")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=16, help="batches whose loss and ZO slope are compared")
    p.add_argument("--repeats", type=int, default=5, help="timed forwards per build (after one warm-up)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS / "bf16_matmul.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    runs = {name: build(args, *spec) for name, spec in BUILDS.items()}
    os.environ.pop(CPU_BF16_MATMUL_ENV, None)

    cpu = {name: [] for name in runs}
    for i in range(args.repeats + 1):
        for name, (run, batches) in runs.items():
            start = time.process_time()
            run.scorer.loss(batches[0])
            if i:
                cpu[name].append(time.process_time() - start)
    losses, slopes = {}, {}
    for name, (run, batches) in runs.items():
        losses[name] = [run.scorer.loss(b) for b in batches]
        slopes[name] = [run.engine.step(lambda b=b: run.scorer.loss_tensor(b), 0.0).grads[0] for b in batches]

    forward = {name: statistics.median(v) for name, v in cpu.items()}
    row = {
        "forward_cpu_s": {k: round(v, 4) for k, v in forward.items()},
        "speedup_vs_bf16_torch": round(forward["bf16 torch"] / forward["bf16 fp32-matmul"], 2),
        "fp32_matmul_over_fp32": round(forward["bf16 fp32-matmul"] / forward["fp32"], 2),
        "loss": losses, "g": slopes,
        "loss_rms_diff": {k: rms(losses[a], losses[b]) for k, (a, b) in PAIRS.items()},
        "g_rms": rms(slopes["fp32"]),
        "g_rms_diff": {k: rms(slopes[a], slopes[b]) for k, (a, b) in PAIRS.items()},
    }
    meta = {"cpu": cpu_name(), "cpu_has_native_bf16": cpu_has_native_bf16(), "torch": torch.__version__,
            "load_average": os.getloadavg(), "command": "python benchmarks/bf16_matmul.py " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out")}
    out = Path(args.out)
    out.write_text(json.dumps({"meta": meta, **row}, indent=2) + "\n")
    d, g = row["loss_rms_diff"], row["g_rms_diff"]
    lines = [f"# A bf16 base on a CPU without native bf16: torch's matmuls vs fp32 matmuls ({args.method} "
             f"r={args.rank}, {args.task}, batch {args.batch_size})", "",
             f"`{meta['command']}`; CPU {meta['cpu']}, native bf16: {meta['cpu_has_native_bf16']}; torch "
             f"{meta['torch']}; load average at the end {', '.join(f'{x:.1f}' for x in meta['load_average'])} on "
             f"{os.cpu_count()} cores. Forward: median CPU seconds of {args.repeats} interleaved forwards (one "
             "thread); quote the ratios.", "",
             "| build | forward CPU s | vs fp32 |", "|---|---|---|"]
    lines += [f"| {k} | {v:.3f} | {v / forward['fp32']:.2f}x |" for k, v in forward.items()]
    lines += ["", f"bf16 with fp32 matmuls is **{row['speedup_vs_bf16_torch']:.2f}x** as fast as with torch's "
              f"emulated bf16 matmuls, at {row['fp32_matmul_over_fp32']:.2f}x fp32's forward time.", "",
              f"Numbers over {args.steps} batches (root mean square of the differences): a ZO step's slope g is "
              f"{row['g_rms']:.3f} in fp32; bf16 moves it by {g['bf16 torch vs fp32']:.3f} with torch's matmuls and "
              f"by {g['bf16 fp32-matmul vs fp32']:.3f} with fp32 matmuls (the bf16 noise each build adds), and the "
              f"two bf16 builds differ by {g['bf16 fp32-matmul vs bf16 torch']:.3f}. The loss: "
              f"{d['bf16 torch vs fp32']:.2e}, {d['bf16 fp32-matmul vs fp32']:.2e} and "
              f"{d['bf16 fp32-matmul vs bf16 torch']:.2e}.", "",
              "| batch | loss fp32 | loss bf16 torch | loss bf16 fp32-matmul | g fp32 | g bf16 torch | "
              "g bf16 fp32-matmul |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {i} | {losses['fp32'][i]:.4f} | {losses['bf16 torch'][i]:.4f} | "
              f"{losses['bf16 fp32-matmul'][i]:.4f} | {slopes['fp32'][i]:+.4f} | {slopes['bf16 torch'][i]:+.4f} | "
              f"{slopes['bf16 fp32-matmul'][i]:+.4f} |" for i in range(args.steps)]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
