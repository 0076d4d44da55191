"""Forward and step cost: what a ZO step costs next to its physical limit, two forward passes.

One run reports, on the same model and machine:

* forward time per example for each scoring mode: restricted (logits only for
  the candidates / answer positions) vs full (whole-vocabulary logits) on SST-2,
  and on COPA (multi-token candidates) with and without the shared prompt KV
  cache;
* padding: the share of padded token slots in training batches (one forward
  vs length-sorted micro-batches) and in evaluation batches (arrival order,
  sorted by characters, sorted by tokens) on SST-2, RTE, BoolQ and COPA, and
  the forward time of a long-prompt batch with and without micro-batches;
* ZO step time / two plain forward passes for every registered method (a
  method that fails to set up or step is skipped with its error);
* peak memory: training / inference, and inference with full logits;
* with ``--compile``: torch.compile's warm-up and steady-state forward time.

Timed things are interleaved round-robin so that machine noise hits all of
them alike: quote the ratios, measured within one run, not the seconds. Peak
memory is measured in fresh subprocesses (a process's peak RSS never goes down).

    OMP_NUM_THREADS=1 python benchmarks/step_cost.py --threads 1     # writes benchmarks/results/forward_cost.{json,md}
    python benchmarks/step_cost.py --methods mezo-lora,ar1zo --skip-forward --repeats 5
    python benchmarks/step_cost.py --compile --skip-forward --skip-steps --out benchmarks/results/forward_cost_compile.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from zotune.config import TrainConfig
from zotune.evaluate import Scorer, length_sorted_chunks, padding_fraction
from zotune.methods import METHODS
from zotune.models import load_model
from zotune.tasks import load_task
from zotune.setup import batch_indices, build_engine

TASK = "sst2"


def setup(model_name: str, method_name: str, batch_size: int, task: str = TASK, scoring: str = "restricted"):
    """(scorer, training batch of step 0, engine or None for ``inference``)."""
    model, tok, _ = load_model(model_name)
    data = load_task(task)
    batch = [data.train[i] for i in batch_indices(len(data.train), batch_size, 0, 0)]
    if method_name == "inference":
        return Scorer(model, tok, scoring=scoring), batch, None
    model, engine = build_engine(TrainConfig(method=method_name), model)
    return Scorer(model, tok, scoring=scoring), batch, engine


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each callable, timed round-robin ``repeats`` times after one warm-up call each."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


# -- forward cost per scoring mode ---------------------------------------------------------------
@torch.no_grad()
def forward_cost(model, tok, batch_size: int, repeats: int) -> dict:
    out = {}
    modes = {
        "sst2": {"restricted": dict(scoring="restricted"), "full": dict(scoring="full")},
        "copa": {"restricted+kv": dict(scoring="restricted", share_prompt=True),
                 "restricted": dict(scoring="restricted", share_prompt=False),
                 "full+kv": dict(scoring="full", share_prompt=True),
                 "full": dict(scoring="full", share_prompt=False)},
    }
    for task, settings in modes.items():
        data = load_task(task)
        batch = [data.train[i] for i in batch_indices(len(data.train), batch_size, 0, 0)]
        scorers = {k: Scorer(model, tok, **kw) for k, kw in settings.items()}
        ref = next(iter(scorers.values())).candidate_logprobs(batch)
        max_diff = max(float((s.candidate_logprobs(batch) - ref).abs().max()) for s in scorers.values())
        secs = interleaved({k: (lambda s=s: s.loss(batch)) for k, s in scorers.items()}, repeats)
        base = secs[next(iter(secs))]
        out[task] = {
            "batch_size": len(batch),
            "modes": {k: {"forward_s": v, "ms_per_example": 1000 * v / len(batch), "time_vs_first": v / base}
                      for k, v in secs.items()},
            "max_abs_diff_candidate_logprobs": max_diff,
        }
        print(f"forward {task}: " + ", ".join(f"{k} {1000 * v / len(batch):.1f} ms/ex" for k, v in secs.items())
              + f"   (max |d logprob| {max_diff:.1e})", flush=True)
    return out


# -- padding ------------------------------------------------------------------------------------
def padding_report(model, tok, batch_size: int, eval_batch_size: int, repeats: int) -> dict:
    """Padding fractions per task, and the forward time of long-prompt batches with micro-batches."""
    scorer = Scorer(model, tok)
    out = {}
    for task in ("sst2", "rte", "boolq", "copa"):
        data = load_task(task)
        train = data.train[:1000]
        lengths = [scorer.length(e) for e in train]
        steps = [batch_indices(len(train), batch_size, 0, s) for s in range(50)]

        def train_pad(micro: int) -> float:
            chunks = [[b[i] for i in c] for b in steps
                      for c in (length_sorted_chunks([lengths[i] for i in b], micro) if micro else [range(len(b))])]
            return padding_fraction(lengths, chunks)

        dev = data.dev[:500]
        dlen = [scorer.length(e) for e in dev]
        arrival = [list(range(i, min(i + eval_batch_size, len(dev)))) for i in range(0, len(dev), eval_batch_size)]
        by_chars = sorted(range(len(dev)), key=lambda i: len(dev[i].prompt))  # the previous sort key
        by_chars = [by_chars[i : i + eval_batch_size] for i in range(0, len(dev), eval_batch_size)]
        out[task] = {
            "mean_tokens": statistics.mean(lengths), "max_tokens": max(lengths),
            "train_one_forward": train_pad(0), "train_micro_8": train_pad(8), "train_micro_4": train_pad(4),
            "eval_arrival": padding_fraction(dlen, arrival), "eval_sorted_chars": padding_fraction(dlen, by_chars),
            "eval_sorted_tokens": padding_fraction(dlen, length_sorted_chunks(dlen, eval_batch_size)),
        }
        print(f"padding {task}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in out[task].items()), flush=True)
    timing = {}
    with torch.no_grad():
        for task, micros in (("sst2", (0, 4)), ("rte", (0, 4))):  # BoolQ: padding shares only (a forward is minutes on a busy CPU)
            data = load_task(task)
            batch = [data.train[i] for i in batch_indices(len(data.train), batch_size, 0, 0)]
            scorers = {m: Scorer(model, tok, micro_batch_size=m) for m in micros}
            losses = {m: s.loss(batch) for m, s in scorers.items()}
            secs = interleaved({m: (lambda s=s: s.loss(batch)) for m, s in scorers.items()}, repeats)
            timing[task] = {f"micro_{m}": {"forward_s": v, "time_vs_one_forward": v / secs[0]} for m, v in secs.items()}
            timing[task]["max_abs_loss_diff"] = max(abs(v - losses[0]) for v in losses.values())
            print(f"micro-batches {task}: " + ", ".join(f"{m}: {v:.2f}s" for m, v in secs.items()), flush=True)
    out["micro_batch_forward_time"] = timing
    return out


# -- torch.compile --------------------------------------------------------------------------------
@torch.no_grad()
def compile_cost(model, tok, batch_size: int, repeats: int) -> dict:
    data = load_task(TASK)
    batches = [[data.train[i] for i in batch_indices(len(data.train), batch_size, 0, s)] for s in range(4)]
    eager, compiled = Scorer(model, tok), Scorer(model, tok, compile=True)
    warm = []
    for b in batches[:3]:  # first call compiles; new widths may recompile (dynamic shapes)
        t = time.perf_counter()
        compiled.loss(b)
        warm.append(time.perf_counter() - t)
    secs = interleaved({"eager": lambda: eager.loss(batches[3]), "compiled": lambda: compiled.loss(batches[3])},
                       repeats)
    diff = abs(eager.loss(batches[0]) - compiled.loss(batches[0]))
    print(f"compile: warm-up calls {[round(w, 1) for w in warm]} s; eager {secs['eager']:.2f}s, "
          f"compiled {secs['compiled']:.2f}s; |d loss| {diff:.1e}", flush=True)
    return {"warmup_calls_s": warm, "eager_forward_s": secs["eager"], "compiled_forward_s": secs["compiled"],
            "compiled_vs_eager": secs["compiled"] / secs["eager"], "abs_loss_diff": diff}


# -- ZO step / two forwards ------------------------------------------------------------------------
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


def peak_memory(model_name: str, mode: str, batch_size: int, scoring: str = "restricted") -> float:
    """Peak memory (MiB) of a fresh process that runs ``mode`` for one step (inference: two forwards).

    The child reads its own high-water mark (VmHWM): ``ru_maxrss`` survives exec on Linux, so
    a child of this (large) process would report at least this process's peak.
    """
    code = (
        "import sys, json; sys.path.insert(0, %r)\n"
        "import torch; torch.set_num_threads(%d)\n"
        "from step_cost import setup\n"
        "from zotune.hardware import peak_memory_mb\n"
        "scorer, batch, engine = setup(%r, %r, %d, scoring=%r)\n"
        "loss = lambda: scorer.loss(batch)\n"
        "engine.step(loss, lr=1e-6) if engine else (loss(), loss())\n"
        "import re; hwm = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read())\n"
        "print(json.dumps(int(hwm.group(1)) / 1024 if hwm else peak_memory_mb('cpu')))\n"
    ) % (str(Path(__file__).parent), torch.get_num_threads(), model_name, mode, batch_size, scoring)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}")
    return float(out.stdout.strip().splitlines()[-1])


def step_costs(args) -> tuple[list, list, dict]:
    inference = {"restricted": peak_memory(args.model, "inference", args.batch_size),
                 "full": peak_memory(args.model, "inference", args.batch_size, scoring="full")}
    print(f"inference peak memory: restricted {inference['restricted']:.0f} MiB, full logits {inference['full']:.0f} MiB",
          flush=True)
    names = args.methods.split(",") if args.methods else sorted(METHODS)
    rows, skipped = [], []
    for name in names:
        try:
            row = {"method": name, "train_peak_mb": peak_memory(args.model, name, args.batch_size)}
            if not args.memory_only:
                row.update(time_method(args.model, name, args.batch_size, args.repeats))
        except Exception as exc:  # a method that needs special setup (calibration data, gradients, ...)
            note = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            skipped.append({"method": name, "error": note})
            print(f"{name:12s} skipped: {note}", flush=True)
            traceback.print_exc(limit=2)
            continue
        row["memory_ratio"] = row["train_peak_mb"] / inference["restricted"]
        rows.append(row)
        if args.memory_only:
            print(f"{name:12s} train/inference memory = {row['memory_ratio']:.3f} ({row['train_peak_mb']:.0f} MiB)")
            continue
        print(f"{name:12s} step/2fwd = {row['ratio']:.3f}   train/inference memory = {row['memory_ratio']:.3f}"
              f"   ({row['step_s']:.2f}s vs {row['two_forwards_s']:.2f}s; {row['train_peak_mb']:.0f} MiB)", flush=True)
    return rows, skipped, inference


# -- report -------------------------------------------------------------------------------------------
def markdown(r: dict) -> str:
    lines = [f"# Forward and step cost ({r['model']}, batch {r['batch_size']}, {r['threads']} thread(s), "
             f"torch {r['torch']}, {r['machine']})", "",
             "All ratios are measured within this one run (timed things interleaved); the seconds are "
             "machine- and load-dependent.", ""]
    if "forward" in r:
        lines += ["## Forward time per example by scoring mode", "",
                  "| task | mode | ms / example | time vs first row |", "|---|---|---|---|"]
        for task, f in r["forward"].items():
            for mode, m in f["modes"].items():
                lines.append(f"| {task} | {mode} | {m['ms_per_example']:.1f} | {m['time_vs_first']:.2f} |")
        lines += ["", "Modes: restricted = output embedding only at the scored positions (single-token "
                  "verbalizers: only the candidates' rows); full = the model's whole-vocabulary logits; "
                  "+kv = multi-token candidates scored on the prompt's shared KV cache. Largest difference in "
                  "candidate log-probs between modes: " + ", ".join(
                      f"{t} {f['max_abs_diff_candidate_logprobs']:.1e}" for t, f in r["forward"].items()), ""]
    if "padding" in r:
        lines += ["## Padding (share of padded token slots)", "",
                  "| task | mean / max tokens | train: one forward | micro 8 | micro 4 | eval: arrival | "
                  "sorted by chars | sorted by tokens |", "|---|---|---|---|---|---|---|---|"]
        for task, p in r["padding"].items():
            if task == "micro_batch_forward_time":
                continue
            lines.append(f"| {task} | {p['mean_tokens']:.0f} / {p['max_tokens']} | {p['train_one_forward']:.3f} | "
                         f"{p['train_micro_8']:.3f} | {p['train_micro_4']:.3f} | {p['eval_arrival']:.3f} | "
                         f"{p['eval_sorted_chars']:.3f} | {p['eval_sorted_tokens']:.3f} |")
        lines += ["", "Training: 50 steps' batches; micro N = the batch cut into length-sorted chunks of N. "
                  "Evaluation: up to 500 dev examples in batches of 32.", "",
                  "| task | micro-batch | forward s | time vs one forward |", "|---|---|---|---|"]
        for task, t in r["padding"]["micro_batch_forward_time"].items():
            for k, v in t.items():
                if k.startswith("micro_"):
                    lines.append(f"| {task} | {k[6:] if k != 'micro_0' else 'none'} | {v['forward_s']:.2f} | "
                                 f"{v['time_vs_one_forward']:.2f} |")
        lines.append("")
    if "compile" in r:
        c = r["compile"]
        lines += ["## torch.compile", "", f"Warm-up calls: {', '.join(f'{w:.1f}' for w in c['warmup_calls_s'])} s; "
                  f"steady forward eager {c['eager_forward_s']:.2f} s vs compiled {c['compiled_forward_s']:.2f} s "
                  f"(ratio {c['compiled_vs_eager']:.2f}); |loss difference| {c['abs_loss_diff']:.1e}.", ""]
    if "compile_error" in r:
        lines += ["## torch.compile", "", f"Failed: {r['compile_error']}", ""]
    if "methods" in r:
        inf = r["inference_peak_mb"]
        lines += ["## ZO step / two forward passes, and memory", "",
                  f"Inference peak memory: {inf['restricted']:.0f} MiB (restricted scoring), {inf['full']:.0f} MiB "
                  f"(full logits).", "",
                  "| method | step / two forwards | step s | two forwards s | train peak MiB | train / inference memory "
                  "| trainable params |", "|---|---|---|---|---|---|---|"]
        for m in r["methods"]:
            if "ratio" not in m:
                lines.append(f"| {m['method']} | | | | {m['train_peak_mb']:.0f} | {m['memory_ratio']:.3f} | |")
                continue
            mem = (f"{m['train_peak_mb']:.0f} | {m['memory_ratio']:.3f}" if "train_peak_mb" in m else "(see note) | ")
            lines.append(f"| {m['method']} | {m['ratio']:.3f} | {m['step_s']:.2f} | {m['two_forwards_s']:.2f} | "
                         f"{mem} | {m['trainable_params']:,} |")
        if r.get("note"):
            lines.append(f"\nNote: {r['note']}")
        for s in r.get("skipped", []):
            lines.append(f"\nSkipped {s['method']}: {s['error']}")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="", help="comma-separated; default: every registered method")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eval-batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile (slow warm-up on CPU)")
    ap.add_argument("--skip-forward", action="store_true", help="only the step / memory part")
    ap.add_argument("--skip-steps", action="store_true", help="only the forward / padding part")
    ap.add_argument("--memory-only", action="store_true", help="step part: peak memory only, no timing")
    ap.add_argument("--out", default="benchmarks/results/forward_cost.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    results = {"model": args.model, "batch_size": args.batch_size, "device": "cpu",
               "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
               "repeats": args.repeats}
    if not args.skip_forward:
        model, tok, _ = load_model(args.model)
        results["forward"] = forward_cost(model, tok, args.batch_size, args.repeats)
        results["padding"] = padding_report(model, tok, args.batch_size, args.eval_batch_size, max(2, args.repeats // 2))
        del model
    if args.compile:
        model, tok, _ = load_model(args.model)
        try:
            results["compile"] = compile_cost(model, tok, args.batch_size, args.repeats)
        except Exception as exc:
            results["compile_error"] = f"{type(exc).__name__}: {exc}"[:500]
            print("compile failed:", results["compile_error"], flush=True)
        del model
    if not args.skip_steps:
        results["methods"], results["skipped"], results["inference_peak_mb"] = step_costs(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text(markdown(results))
    print(f"written to {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
