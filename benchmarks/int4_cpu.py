"""An int4 frozen base on CPU: bitsandbytes NF4 (``--quantize int4``) against the bf16 base, SmolLM2-135M.

ZO-Act's paper trains over an INT4 base; torchao 0.18's int4 weight-only path
needs CUDA, so zotune quantizes int4 with bitsandbytes (``zotune.quantize``).
This script measures, for a bf16 base with a LoRA adapter attached as zotune
attaches it (B = 0, so the adapted model is the base model):

- error: logits of the int4 (and, for reference, int8) base against the bf16
  base on SST-2 training prompts with their gold label word, per example
  relative Frobenius error over real tokens (max and mean), the top-1 next-token
  agreement, and the zotune Scorer's loss and predictions on the same examples;
- memory: tensor bytes of the model (``zotune.quantize.model_bytes``) and the
  peak RSS of a fresh process that loads the model, quantizes it, attaches the
  adapter and runs one scoring batch (one child process per mode);
- time: one full forward (all logits) and one Scorer loss (what a ZO step runs
  twice) on a batch, each model timed in interleaved rounds in this one process,
  1 thread; ratios of medians against bf16. ``int4-fused`` is bitsandbytes'
  own eval-mode CPU path (weights repacked for a fused kernel it fetches from
  the Hugging Face hub; without it a fallback): timed to show why zotune turns it off.
  ``int4-quanto`` (only where optimum-quanto is installed) is the alternative
  that was not chosen: optimum-quanto qint4 (group 128) under a peft LoRA.

    python benchmarks/int4_cpu.py --data-dir ../shared/data
    python benchmarks/int4_cpu.py --data-dir ../shared/data --examples 32 --repeats 9
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
MODES = ("bf16", "int8", "int4", "int4-fused", "int4-quanto")


def rss_mib() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MiB (Linux)."""
    current = 0.0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            current = int(line.split()[1]) / 1024
    return current, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def examples(data_dir: str, n: int):
    from zotune.tasks import resolve_task

    return resolve_task("sst2", Path(data_dir)).train[:n]


def build(mode: str, model_name: str):
    """(model with a LoRA adapter attached, tokenizer, base tensor bytes) for ``mode``."""
    from zotune.adapters import attach_lora
    from zotune.models import load_model
    from zotune.quantize import model_bytes, quantize_base

    model, tok, _ = load_model(model_name, dtype=torch.bfloat16)
    if mode == "int4-quanto":
        from optimum.quanto import freeze, qint4, quantize

        quantize(model, weights=qint4, exclude=["lm_head"])
        freeze(model)
        return attach_lora(model, 8, 16.0).eval(), tok, None  # peft wraps QLinear as a plain nn.Linear
    if mode != "bf16":
        quantize_base(model, mode.split("-")[0])
    if mode == "int4-fused":
        for m in model.modules():
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = True  # bitsandbytes' default on an avx512_bf16 CPU
    base = model_bytes(model)
    model = attach_lora(model, 8, 16.0).eval()  # zotune's default adapter; B = 0: the base function
    return model, tok, base


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), so RSS counts live memory."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def memory_child(mode: str, model_name: str, data_dir: str, n: int) -> dict:
    """Run in a fresh process: bytes and RSS of one mode. The build peak includes loading the bf16
    checkpoint (every mode loads it before quantizing); the scoring peak is the peak of a batch's
    Scorer loss over the built model (peak RSS reset after the build: what training then needs)."""
    torch.set_num_threads(1)
    import peft  # noqa: F401  (imports bitsandbytes and torchao where installed: every mode pays them)

    from zotune.evaluate import Scorer
    from zotune.quantize import model_bytes

    batch = examples(data_dir, n)
    release_freed_memory()
    imports, _ = rss_mib()
    model, tok, base = build(mode, model_name)
    _, build_peak = rss_mib()
    release_freed_memory()
    built, _ = rss_mib()
    Path("/proc/self/clear_refs").write_text("5")  # Linux: resets the peak RSS (VmHWM, ru_maxrss)
    with torch.no_grad():
        Scorer(model, tok).loss(batch)
    _, score_peak = rss_mib()
    return {"mode": mode, "base_tensor_bytes": base, "model_tensor_bytes": model_bytes(model),
            "rss_after_imports_mib": round(imports, 1), "peak_rss_build_mib": round(build_peak, 1),
            "rss_model_built_mib": round(built, 1), "peak_rss_scoring_mib": round(score_peak, 1),
            "model_rss_mib": round(built - imports, 1), "scoring_peak_over_imports_mib": round(score_peak - imports, 1)}


def quanto_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("optimum") is not None and importlib.util.find_spec("optimum.quanto") is not None


def token_logits(model, enc) -> torch.Tensor:
    with torch.no_grad():
        return model(**enc).logits.float()


def compare(args) -> dict:
    from zotune.evaluate import Scorer

    batch = examples(args.data_dir, args.examples)
    modes = [m for m in MODES if m != "int4-quanto" or quanto_installed()]
    models = {m: build(m, args.model) for m in modes}
    tok = models["bf16"][1]
    texts = [e.prompt + e.candidates[e.label] for e in batch]
    enc = tok(texts, return_tensors="pt", padding=True)
    mask = enc["attention_mask"].bool()
    scorers = {m: Scorer(models[m][0], tok) for m in modes}

    ref = token_logits(models["bf16"][0], enc)
    with torch.no_grad():
        ref_lp = scorers["bf16"].candidate_logprobs(batch)
    error = {}
    for m in modes:
        out = token_logits(models[m][0], enc)
        per_example = [((out[i][mask[i]] - ref[i][mask[i]]).norm() / ref[i][mask[i]].norm()).item()
                       for i in range(len(batch))]
        with torch.no_grad():
            lp = scorers[m].candidate_logprobs(batch)
        labels = torch.tensor([e.label for e in batch])
        error[m] = {
            "logits_rel_err_max": max(per_example),
            "logits_rel_err_mean": statistics.fmean(per_example),
            "logits_max_abs_err_over_max_abs": ((out - ref)[mask].abs().max() / ref[mask].abs().max()).item(),
            "top1_next_token_agreement": (out.argmax(-1) == ref.argmax(-1))[mask].float().mean().item(),
            "scorer_loss": torch.nn.functional.nll_loss(lp, labels).item(),
            "scorer_accuracy": (lp.argmax(-1) == labels).float().mean().item(),
            "prediction_agreement_with_bf16": (lp.argmax(-1) == ref_lp.argmax(-1)).float().mean().item(),
        }
    bf16_loss = error["bf16"]["scorer_loss"]
    for m in modes:
        error[m]["scorer_loss_rel_diff"] = abs(error[m]["scorer_loss"] - bf16_loss) / bf16_loss

    times: dict[str, dict[str, list[float]]] = {m: {"forward": [], "scorer_loss": []} for m in modes}
    for m in modes:  # warm-up (int4-fused repacks its weights on its first eval forward)
        token_logits(models[m][0], enc)
    for _ in range(args.repeats):
        for m in modes:
            t = time.perf_counter()
            token_logits(models[m][0], enc)
            times[m]["forward"].append(time.perf_counter() - t)
            t = time.perf_counter()
            with torch.no_grad():
                scorers[m].loss(batch)
            times[m]["scorer_loss"].append(time.perf_counter() - t)
    timing = {m: {k: {"median_s": statistics.median(v), "min_s": min(v),
                      "ratio_to_bf16": statistics.median(v) / statistics.median(times["bf16"][k])}
                  for k, v in times[m].items()} for m in modes}
    return {"batch_shape": list(enc["input_ids"].shape), "error": error, "time": timing}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default="../shared/data", help="folder holding SST-2/")
    parser.add_argument("--examples", type=int, default=16, help="SST-2 training examples (one batch)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (each times every mode)")
    parser.add_argument("--out", default=str(RESULTS / "int4_cpu.json"))
    parser.add_argument("--memory-child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.model, args.data_dir, args.examples)))
        return

    torch.set_num_threads(1)
    memory = {}
    for mode in ("bf16", "int8", "int4"):
        cmd = [sys.executable, __file__, "--memory-child", mode, "--model", args.model,
               "--data-dir", args.data_dir, "--examples", str(args.examples)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        memory[mode] = json.loads(out.strip().splitlines()[-1])
        print(f"memory {mode}: {memory[mode]}", flush=True)
    result = compare(args)
    import bitsandbytes
    import peft
    import torchao
    import transformers

    report = {
        "model": args.model, "dtype": "bfloat16", "threads": torch.get_num_threads(),
        "examples": args.examples, "repeats": args.repeats,
        "int4": "bitsandbytes NF4, blocks of 64, double-quantized absmax (zotune.quantize.INT4); "
                "lm_head/embeddings stay bf16",
        "int8": "torchao Int8WeightOnlyConfig (per-channel)",
        "int4-quanto": "optimum-quanto qint4 (group 128), not shipped" if quanto_installed() else "not installed",
        "versions": {"torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__,
                     "torchao": torchao.__version__, "peft": peft.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "cpu": platform.processor() or platform.machine(),
        "memory": memory, **result,
    }
    report["memory"]["int4_over_bf16"] = {
        k: memory["int4"][k] / memory["bf16"][k]
        for k in ("base_tensor_bytes", "model_rss_mib", "scoring_peak_over_imports_mib", "peak_rss_scoring_mib",
                  "peak_rss_build_mib")}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("error", "time")}, indent=1))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
