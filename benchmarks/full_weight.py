"""Full-weight ZO step: time and memory next to inference and next to MeZO's published step (issue 15).

One fresh subprocess per (mode, dtype), so each peak RSS (VmHWM) belongs to
that mode alone. Modes:

* ``inference``: forwards only, the memory reference (and forward timing);
* ``mezo-reference``: MeZO's step as published (Malladi et al. 2023, Algorithm 1,
  and the released trainer's ``zo_perturb_parameters`` / ``zo_update``): draw a
  step seed, reseed torch's global RNG with it before each pass and regenerate
  z parameter by parameter with ``torch.normal`` in the parameter's dtype;
  +eps, forward, -2eps, forward, +eps (in place, no snapshot), then reseed and
  regenerate z once more for the update theta <- theta - lr*g*z. The released
  code writes ``param.data = param.data + s*z*eps`` (out of place); this uses
  ``add_`` in place, i.e. the cheapest faithful version;
* ``mezo``, ``lozo``, ``subzero``, ``agzo``: zotune's full-weight methods through
  ``zotune.ZOOptimizer`` with ``restore=--restore`` (default ``auto``: regeneration
  restore in float32, the exact patch restore in bfloat16); ``mezo-snapshot``: mezo with
  ``restore="snapshot"`` (the exact restore, the engine's only one before issue 15);
  ``mezo-rademacher``: mezo with ``mezo_direction="rademacher"`` (+-1 directions, cheaper to generate);
  ``mezo-lora``: the adapter reference.

Each child: load the model in the dtype, one 16-example rotten-tomatoes batch
(the step-0 batch of seed 0), one warm-up forward and step, then ``--steps``
rounds of (forward, forward, step), interleaved so machine noise hits both alike.

* ``step_over_two_forwards`` = median step time / (2 x median forward time), same process;
* ``peak_over_inference`` = the process's peak RSS / the ``inference`` process's, same dtype;
  the peak (VmHWM) is restarted once the model and data are loaded (``/proc/self/clear_refs``,
  after ``malloc_trim``), so it is the peak of the run (optimizer setup, forwards, steps), not of
  loading; ``load_peak_mb`` keeps the loading peak;
* ``step_over_two_forwards_cpu``: the same ratio in process CPU time (``time.process_time``),
  which a machine shared with other jobs disturbs much less than wall time (with
  ``--threads 1`` CPU time is the step's own compute);
* ``forwards_per_step``: what the step spends (agzo: 3, its unperturbed forward included),
  ``step_over_its_forwards`` = step time / (forwards_per_step x forward time);
* ``changed_fraction``: share of sampled trainable elements (<= 1024 per tensor, a few
  MB at most) whose value changed over the warm-up and timed steps: ~1 in float32,
  ~0 where bf16 round-to-nearest swallows the update lr*g*z.

A zotune mode that refuses bf16 (a ZOError) or fails is written as a row with
``"error"`` and no ratios, not a crash.

    PYTHONPATH=src python benchmarks/full_weight.py --threads 2          # writes benchmarks/results/full_weight.{json,md}
    PYTHONPATH=src python benchmarks/full_weight.py --modes inference,mezo --dtypes bfloat16 --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

MODES = ("inference", "mezo-reference", "mezo", "mezo-rademacher", "mezo-snapshot", "lozo", "subzero", "agzo", "mezo-lora")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TASK = "rotten-tomatoes"


def peak_rss_mb() -> float:
    """This process's high-water mark of resident memory (VmHWM), MiB."""
    hwm = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    if hwm:
        return int(hwm.group(1)) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Return freed heap to the OS (malloc_trim) and restart VmHWM from the current RSS (Linux >= 4.0).

    Called after the model is loaded, so a peak measures the run (forwards, steps), not the loading
    (a bf16 load passes through float32 tensors that would otherwise set every mode's peak alike).
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def mezo_reference_step(params: list[torch.Tensor], loss, eps: float, lr: float, rng: random.Random) -> float:
    """MeZO's Algorithm 1 as released: global-RNG reseeding, torch.normal per parameter, +eps/-2eps/+eps in place."""
    seed = rng.randint(0, 1_000_000_000 - 1)  # np.random.randint(1000000000) in the released trainer

    def perturb(scale: float) -> None:
        torch.manual_seed(seed)
        for p in params:
            z = torch.normal(mean=0, std=1, size=p.size(), device=p.device, dtype=p.dtype)
            p.add_(z, alpha=scale * eps)

    with torch.no_grad():
        perturb(1)
        loss_plus = loss()
        perturb(-2)
        loss_minus = loss()
        perturb(1)
        g = (loss_plus - loss_minus) / (2 * eps)
        torch.manual_seed(seed)
        for p in params:
            z = torch.normal(mean=0, std=1, size=p.size(), device=p.device, dtype=p.dtype)
            p.add_(z, alpha=-lr * g)
    return (loss_plus + loss_minus) / 2


def sample(tensors: list[torch.Tensor], per_tensor: int = 1024) -> list[torch.Tensor]:
    return [t.detach().reshape(-1)[:: max(1, t.numel() // per_tensor)][:per_tensor].clone() for t in tensors]


def child(args) -> dict:
    """Run one mode in this process and return its row (printed as JSON by the caller)."""
    torch.set_num_threads(args.threads)
    from zotune.evaluate import Scorer
    from zotune.models import load_model
    from zotune.tasks import load_task
    from zotune.train import batch_indices

    row = {"mode": args.child, "dtype": args.dtype, "threads": torch.get_num_threads()}
    model, tok, _ = load_model(args.model, dtype=DTYPES[args.dtype])
    data = load_task(TASK)
    batch = [data.train[i] for i in batch_indices(len(data.train), args.batch_size, 0, 0)]
    row["load_peak_mb"] = peak_rss_mb()
    row["peak_reset_after_load"] = reset_peak_rss()
    step, trainable = None, []
    try:
        if args.child == "mezo-reference":
            params = [p for _, p in model.named_parameters()]  # tied weights once, as in MeZO's trainer
            for p in params:
                p.requires_grad_(False)
            rng = random.Random(0)
            trainable = params
            step = lambda loss: mezo_reference_step(params, loss, args.eps, args.lr, rng)
            row["forwards_per_step"] = 2
        elif args.child != "inference":
            import zotune

            method = args.child.removesuffix("-snapshot").removesuffix("-rademacher")
            restore = "snapshot" if args.child.endswith("-snapshot") else args.restore
            extra = {"mezo_direction": "rademacher"} if args.child == "mezo-rademacher" else {}
            opt = zotune.ZOOptimizer(model, method=method, lr=args.lr, eps=args.eps, seed=0, restore=restore, **extra)
            row["restore"] = opt.engine.restore_mode(opt.method.views(0))
            model = opt.model
            trainable = list(opt.method.params.values())
            step = lambda loss: opt.step(loss)
            row["optimizer"] = repr(opt)
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        row["peak_mb"] = peak_rss_mb()
        return row
    row["trainable_params"] = sum(t.numel() for t in trainable)
    scorer = Scorer(model, tok)
    loss = lambda: scorer.loss(batch)
    before = sample(trainable)
    fwd, steps, fwd_cpu, steps_cpu = [], [], [], []
    try:
        loss()
        if step:
            step(loss)  # warm-up: first-call allocations, thread pools, caches
            if args.child != "mezo-reference":
                row["forwards_per_step"] = opt.last.forward_passes
        for _ in range(args.steps):
            for _ in range(2):
                t, c = time.perf_counter(), time.process_time()
                loss()
                fwd.append(time.perf_counter() - t)
                fwd_cpu.append(time.process_time() - c)
            if step:
                t, c = time.perf_counter(), time.process_time()
                step(loss)
                steps.append(time.perf_counter() - t)
                steps_cpu.append(time.process_time() - c)
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        traceback.print_exc(limit=3)
    row["peak_mb"] = peak_rss_mb()
    if step and args.child != "mezo-reference" and opt.engine.patch_stats:
        row["patch_peak_mb"] = opt.engine.patch_stats["peak_bytes"] / 2**20
        row["patch_peak_entries_per_param"] = opt.engine.patch_stats["peak_entries"] / max(1, row["trainable_params"])
    if fwd:
        row["forward_s"] = statistics.median(fwd)
        row["forward_cpu_s"] = statistics.median(fwd_cpu)
    if steps and "error" not in row:
        row["step_s"] = statistics.median(steps)
        row["step_over_two_forwards"] = row["step_s"] / (2 * row["forward_s"])
        row["step_over_its_forwards"] = row["step_s"] / (row["forwards_per_step"] * row["forward_s"])
        row["step_cpu_s"] = statistics.median(steps_cpu)
        row["step_over_two_forwards_cpu"] = row["step_cpu_s"] / (2 * row["forward_cpu_s"])
        after = sample(trainable)
        changed = sum(int((a != b).sum()) for a, b in zip(after, before))
        row["changed_fraction"] = changed / max(1, sum(b.numel() for b in before))
    return row


def run_child(args, mode: str, dtype: str) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--dtype", dtype, "--model", args.model,
           "--steps", str(args.steps), "--threads", str(args.threads), "--batch-size", str(args.batch_size),
           "--lr", str(args.lr), "--eps", str(args.eps), "--restore", args.restore]
    t = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
    if out.returncode or not lines:
        tail = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"
        return {"mode": mode, "dtype": dtype, "error": f"child failed: {tail}"}
    row = json.loads(lines[-1])
    row["wall_s"] = time.time() - t
    row["command"] = command()
    return row


def command() -> str:
    return "PYTHONPATH=src python benchmarks/full_weight.py " + " ".join(sys.argv[1:])


def markdown(rows: list[dict], meta: dict) -> str:
    f = lambda v, p=3: "" if v is None else (f"{v:.{p}f}" if isinstance(v, float) else str(v))
    lines = [f"# Full-weight ZO step vs inference ({meta['model']}, batch {meta['batch_size']}, "
             f"{meta['threads']} thread(s), torch {meta['torch']}, {meta['machine']})", "",
             "Command(s): " + ", ".join(f"`{c}`" for c in dict.fromkeys(r.get("command", meta["command"]) for r in rows)),
             "",
             "Peaks are of the run: VmHWM restarted after loading the model and data. step / 2 fwd = median step time / (2 x median forward time), both measured in the mode's own "
             "process (interleaved); peak / inference = that process's peak RSS (VmHWM) / the inference "
             "process's, same dtype. fwd/step: forward passes one step spends; step / its fwds = step time / "
             "(that many forwards). changed: share of sampled trainable elements changed by the warm-up and "
             f"timed steps (lr {meta['lr']}, eps {meta['eps']}).", "",
             "step / 2 fwd (cpu) is the same ratio in process CPU time, less disturbed by other jobs on a shared "
             "machine. restore: what the engine did (auto: regenerate for float32 base weights, patch for bf16 ones, "
             "snapshot for adapters); patch MiB: the largest patch the patch restore held; bf16 updates of base weights are stochastically rounded, and `changed` says how many "
             "sampled weights moved. Reading and profile: "
             "`benchmarks/results/full_weight_profile.md`.", "",
             "| mode | dtype | restore | step / 2 fwd | step / 2 fwd (cpu) | peak / inference | step s | forward s | peak MiB | "
             "patch MiB | fwd/step | step / its fwds | changed | trainable | error |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['dtype']} | {r.get('restore', '')} | {f(r.get('step_over_two_forwards'))} | "
                     f"{f(r.get('step_over_two_forwards_cpu'))} | "
                     f"{f(r.get('peak_over_inference'))} | {f(r.get('step_s'), 2)} | {f(r.get('forward_s'), 2)} | "
                     f"{f(r.get('peak_mb'), 0)} | {f(r.get('patch_peak_mb'), 1)} | {f(r.get('forwards_per_step'))} | "
                     f"{f(r.get('step_over_its_forwards'))} | {f(r.get('changed_fraction'), 4)} | "
                     f"{r.get('trainable_params', '') and format(r['trainable_params'], ',')} | {r.get('error', '')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated from {', '.join(MODES)}")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (each with two timed forwards)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--restore", default="auto", help="the zotune modes' restore: auto | snapshot | regenerate | patch")
    ap.add_argument("--out", default="benchmarks/results/full_weight.json")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        ap.error(f"unknown modes {sorted(unknown)}")
    if "inference" not in modes:
        modes.insert(0, "inference")  # peak_over_inference needs it
    rows = []
    for dtype in args.dtypes.split(","):
        inference = None
        for mode in ["inference"] + [m for m in modes if m != "inference"]:
            row = run_child(args, mode, dtype)
            if mode == "inference":
                inference = row.get("peak_mb")
            elif inference and row.get("peak_mb") and "error" not in row:
                row["peak_over_inference"] = row["peak_mb"] / inference
            rows.append(row)
            print(json.dumps({k: row.get(k) for k in ("mode", "dtype", "step_over_two_forwards",
                                                      "step_over_two_forwards_cpu", "peak_over_inference",
                                                      "step_s", "forward_s", "peak_mb", "changed_fraction", "error")}),
                  flush=True)
    meta = {"model": args.model, "batch_size": args.batch_size, "threads": args.threads, "torch": torch.__version__,
            "machine": platform.machine(), "lr": args.lr, "eps": args.eps, "steps": args.steps,
            "command": command()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(out.read_text()) if out.exists() else []
    keep = [r for r in existing if (r.get("mode"), r.get("dtype")) not in {(r2["mode"], r2["dtype"]) for r2 in rows}]
    out.write_text(json.dumps(keep + rows, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(keep + rows, meta))
    print(f"written to {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
