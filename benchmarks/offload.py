"""What an offloaded base costs: forward and ZO-step time, and peak memory, with part of the model on disk.

zotune places a model that does not fit with accelerate (``--device-map``,
``--max-memory``, ``--offload-folder``): modules beyond the budget go to CPU RAM,
then disk, and accelerate streams each onto the execution device for its forward.
This measures, on SmolLM2-135M (538 MB in fp32: a 113 MB embedding tied to the
head, 30 layers of 14 MB) with a rank-8 LoRA on q/v:

* ``in-memory``: the whole base in RAM (no placement), the reference;
* ``disk-half``: a CPU budget of the embedding plus half the layers: about half
  the layers on disk;
* ``disk-most``: a CPU budget of the embedding plus two layers: nearly all the
  layers on disk;
* ``*-cold``: the same budgets, with the checkpoint's pages dropped from the OS
  page cache (``posix_fadvise(DONTNEED)``) before every forward, so the offloaded
  layers are read from the disk device rather than from RAM the kernel kept;
* on a GPU (``--device cuda``) also ``cpu-half``: half the layers in CPU RAM,
  streamed to the GPU at every forward (the offload device is "cpu").

Each is run twice: with the malloc setting ``load_model`` applies when it offloads
(a fixed glibc mmap threshold, see ``zotune.models.fix_mmap_threshold``) and with
glibc's default (``ZOTUNE_MALLOPT=0``), whose heap fragments under the streamed
layers.

On a CPU-only machine "cpu" is the execution device itself, so offloading to
"cpu" is no offload and has no row. Times: every mode is loaded in one process
(per malloc setting) and timed round-robin (machine noise hits all alike); quote the ratios to
``in-memory``, not the seconds. Peak RSS: each mode in a fresh subprocess, which
loads, attaches the LoRA and runs one ZO step (two forwards), reading its own
high-water mark (VmHWM; ``ru_maxrss`` would also count the address space of this
process it was forked from).

    OMP_NUM_THREADS=1 python benchmarks/offload.py --data-dir ../shared/data   # writes benchmarks/results/offload.{json,md}
    python benchmarks/offload.py --modes in-memory,disk-half --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from zotune.adapters import attach_lora, lora_params
from zotune.evaluate import Scorer
from zotune.models import adapters_on_execution_device, load_model, offloaded_modules, prepare_named_model
from zotune.tasks import load_task

MODEL = "smollm2-135m"
MiB = 2**20


def budgets(folder: Path, device: str) -> dict[str, str | None]:
    """``--max-memory`` per mode, from the checkpoint's sizes: embedding + k layers on the CPU."""
    from safetensors import safe_open

    sizes: dict[str, int] = {}
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        for key in f.keys():
            t = f.get_slice(key)
            n = 1
            for d in t.get_shape():
                n *= d
            sizes[key] = n * 4  # fp32
    embed = sum(v for k, v in sizes.items() if "embed_tokens" in k or k == "model.norm.weight")
    n_layers = 1 + max(int(k.split(".")[2]) for k in sizes if k.startswith("model.layers."))
    layer = sum(v for k, v in sizes.items() if k.startswith("model.layers.0."))
    # accelerate keeps room on the CPU for the largest layer it may put back from disk: add one layer.
    half = f"{(embed + (n_layers // 2 + 1) * layer) / MiB:.0f}MiB"
    most = f"{(embed + 3 * layer) / MiB:.0f}MiB"
    if device == "cpu":
        return {"in-memory": None, "disk-half": f"cpu={half}", "disk-most": f"cpu={most}",
                "disk-half-cold": f"cpu={half}", "disk-most-cold": f"cpu={most}"}
    gpu_half = f"{(embed + n_layers // 2 * layer) / MiB:.0f}MiB"
    return {"in-memory": None, "cpu-half": f"0={gpu_half},cpu=64GiB",
            "disk-half": f"0={gpu_half},cpu={2 * layer / MiB:.0f}MiB",
            "disk-half-cold": f"0={gpu_half},cpu={2 * layer / MiB:.0f}MiB"}


def setup(folder: Path, max_memory: str | None, device: str, rank: int):
    """(LoRA model, tokenizer) on ``folder``'s weights; LoRA seeded alike in every mode."""
    model, tok, _ = load_model(str(folder), torch.float32, device, max_memory=max_memory)
    torch.manual_seed(0)
    with adapters_on_execution_device(model):
        model = attach_lora(model, rank, 2 * rank, None)
    return model, tok


def zo_step(scorer: Scorer, params: dict, z: dict, batch, eps: float = 1e-3) -> float:
    """The two forwards of a ZO step at theta +- eps z (restored after); returns the projected slope."""
    with torch.no_grad():
        for n, p in params.items():
            p.add_(z[n], alpha=eps)
        plus = scorer.loss(batch)
        for n, p in params.items():
            p.add_(z[n], alpha=-2 * eps)
        minus = scorer.loss(batch)
        for n, p in params.items():
            p.add_(z[n], alpha=eps)
    return (plus - minus) / (2 * eps)


def drop_page_cache(path: Path) -> None:
    """Evict ``path``'s unmapped pages from the OS page cache (only this file; mapped pages stay)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def peak_rss_mb(folder: Path, max_memory: str | None, device: str, rank: int, batch_size: int,
                data_dir: str | None, cold: bool, env: dict | None = None) -> float:
    """Peak RSS (MiB) of a fresh process that loads the mode, attaches the LoRA and runs one ZO step."""
    code = (
        "import sys, json, re; sys.path.insert(0, %r)\n"
        "import torch; torch.set_num_threads(%d)\n"
        "from pathlib import Path\n"
        "from offload import setup, zo_step, batch_of, drop_page_cache\n"
        "from zotune.adapters import lora_params\n"
        "from zotune.evaluate import Scorer\n"
        "model, tok = setup(Path(%r), %r, %r, %d)\n"
        "params = lora_params(model); gen = torch.Generator().manual_seed(1)\n"
        "z = {n: torch.randn(p.shape, generator=gen).to(p.device) for n, p in sorted(params.items())}\n"
        "if %r: drop_page_cache(Path(%r) / 'model.safetensors')\n"
        "zo_step(Scorer(model, tok), params, z, batch_of(%d, %r))\n"
        "hwm = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read())\n"
        "print(json.dumps(int(hwm.group(1)) / 1024))\n"
    ) % (str(Path(__file__).parent), torch.get_num_threads(), str(folder), max_memory, device, rank,
         cold, str(folder), batch_size, data_dir)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}")
    return float(out.stdout.strip().splitlines()[-1])


def batch_of(batch_size: int, data_dir: str | None):
    """The first ``batch_size`` SST-2 training examples (the same batch in every mode)."""
    data = load_task("sst2", Path(data_dir) if data_dir else None)
    return data.train[:batch_size]


MALLOC = {"fixed": {}, "glibc-dynamic": {"ZOTUNE_MALLOPT": "0"}}  # fixed: what load_model sets when it offloads


def time_modes(plan: dict, folders: dict, args) -> dict:
    """Load every mode in this process and time them round-robin: {mode: {...medians, loss, slope}}."""
    batch = batch_of(args.batch_size, args.data_dir)
    models = {}
    for mode, max_memory in plan.items():
        t = time.perf_counter()
        model, tok = setup(Path(folders[mode]), max_memory, args.device, args.rank)
        off = offloaded_modules(model)
        models[mode] = {"scorer": Scorer(model, tok), "params": lora_params(model), "offloaded": off}
        print(f"  {mode:15s} max_memory={max_memory}: {sum(1 for n in off if '.layers.' in n)} layers offloaded "
              f"({', '.join(sorted(set(off.values()))) or 'none'}), loaded in {time.perf_counter() - t:.1f} s",
              file=sys.stderr, flush=True)
    gen = torch.Generator().manual_seed(1)
    first = next(iter(models.values()))["params"]
    z = {n: torch.randn(p.shape, generator=gen) for n, p in sorted(first.items())}
    sync = torch.cuda.synchronize if args.device != "cpu" else (lambda: None)
    fwd: dict[str, list[float]] = {m: [] for m in plan}
    step: dict[str, list[float]] = {m: [] for m in plan}
    out = {}
    for m, entry in models.items():  # warm-up, and the numbers every mode must agree on
        zm = entry["z"] = {n: z[n].to(p.device) for n, p in entry["params"].items()}
        out[m] = {"loss": entry["scorer"].loss(batch), "slope": zo_step(entry["scorer"], entry["params"], zm, batch)}
    for r in range(args.repeats):
        for m, entry in models.items():
            cold = m.endswith("-cold")
            if cold:
                drop_page_cache(Path(folders[m]) / "model.safetensors")
            t = time.perf_counter()
            entry["scorer"].loss(batch)
            sync()
            fwd[m].append(time.perf_counter() - t)
            if cold:
                drop_page_cache(Path(folders[m]) / "model.safetensors")
            t = time.perf_counter()
            zo_step(entry["scorer"], entry["params"], entry["z"], batch)  # (cold: its 2nd forward reads warm pages)
            sync()
            step[m].append(time.perf_counter() - t)
        print(f"  repeat {r + 1}/{args.repeats}: " + ", ".join(f"{m} {fwd[m][-1]:.2f}s" for m in plan),
              file=sys.stderr, flush=True)
    for m, entry in models.items():
        out[m].update(forward_s=statistics.median(fwd[m]), step_s=statistics.median(step[m]),
                      layers_offloaded=sum(1 for n in entry["offloaded"] if ".layers." in n),
                      offload_device="/".join(sorted(set(entry["offloaded"].values()))) or None)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--modes", default="", help="comma-separated subset of the modes (default: all)")
    ap.add_argument("--malloc", default=",".join(MALLOC), help="comma-separated subset of: " + ", ".join(MALLOC))
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-dir", default=None, help="folder holding SST-2/ (as zotune's --data-dir)")
    ap.add_argument("--work-dir", default=None, help="where the offloaded modes' checkpoint copies go (default: a temp dir)")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/offload.json")
    ap.add_argument("--timing-child", default=None, help=argparse.SUPPRESS)  # JSON {plan, folders}: time and print
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.timing_child:
        job = json.loads(args.timing_child)
        print(json.dumps(time_modes(job["plan"], job["folders"], args)))
        return

    source = prepare_named_model(MODEL)
    plan = budgets(source, args.device)
    if args.modes:
        plan = {m: plan[m] for m in args.modes.split(",")}

    # The in-memory model maps the original checkpoint; warm and cold offloaded modes read their
    # own copies, so that dropping the cold copy's pages touches no other mode.
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="zotune-offload-bench-"))
    folders = {}
    for mode in plan:
        if mode == "in-memory":
            folders[mode] = str(source)
            continue
        folder = work / ("cold" if mode.endswith("-cold") else "warm")
        if not (folder / "model.safetensors").exists():
            shutil.copytree(source, folder, dirs_exist_ok=True)
        folders[mode] = str(folder)

    rows = []
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    for malloc in args.malloc.split(","):
        env = {**os.environ, **MALLOC[malloc]}
        print(f"malloc {malloc}: timing {', '.join(plan)}", flush=True)
        job = json.dumps({"plan": plan, "folders": folders})
        res = subprocess.run([sys.executable, __file__, *passthrough, "--timing-child", job], env=env,
                             stdout=subprocess.PIPE, text=True)
        if res.returncode:
            raise RuntimeError(f"timing child failed (exit {res.returncode})")
        timing = json.loads(res.stdout.strip().splitlines()[-1])
        ref = timing["in-memory"]
        for m, t in timing.items():
            row = {"mode": m, "max_memory": plan[m], "malloc": malloc,
                   "layers_offloaded": t["layers_offloaded"], "offload_device": t["offload_device"],
                   "forward_over_in_memory": t["forward_s"] / ref["forward_s"],
                   "zo_step_over_in_memory": t["step_s"] / ref["step_s"],
                   "zo_step_over_two_forwards": t["step_s"] / (2 * t["forward_s"]),
                   "in_memory_forward_s": ref["forward_s"],
                   "loss_minus_in_memory": t["loss"] - ref["loss"],
                   "slope_minus_in_memory": t["slope"] - ref["slope"],
                   "peak_rss_mb": None}
            if not args.skip_memory:
                row["peak_rss_mb"] = peak_rss_mb(Path(folders[m]), plan[m], args.device, args.rank,
                                                 args.batch_size, args.data_dir, m.endswith("-cold"), env)
            rows.append(row)
            print(f"  {m:15s} forward x{row['forward_over_in_memory']:.2f}, ZO step x{row['zo_step_over_in_memory']:.2f}, "
                  f"peak RSS {row['peak_rss_mb'] or float('nan'):.0f} MiB", flush=True)
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)

    command = "OMP_NUM_THREADS=1 python benchmarks/offload.py " + " ".join(passthrough)
    meta = {"model": MODEL, "device": args.device, "batch_size": args.batch_size, "lora_rank": args.rank,
            "threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
            "machine": platform.machine(), "command": command.strip(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None, "cpus": os.cpu_count()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"# Offloaded base: cost of accelerate's placement ({meta['model']}, LoRA r={meta['lora_rank']}, "
        f"batch {meta['batch_size']}, {meta['device']}, {meta['threads']} thread(s), torch {meta['torch']})",
        "",
        f"    {meta['command']}",
        "",
        f"Times are medians of {meta['repeats']} round-robin repeats, all modes loaded in one process per malloc "
        "setting, as ratios to that process's in-memory model; peak RSS is from a fresh process per row (load, "
        "LoRA, one ZO step). Warm modes read the offloaded layers from the OS page cache; cold modes drop the "
        "checkpoint's pages before each timed forward (the second forward of a cold ZO step finds them cached). "
        "malloc `fixed`: what `load_model` sets when it offloads (glibc M_MMAP_THRESHOLD fixed at 128 KiB; process-wide, so the timing process runs its in-memory model under it too); "
        "`glibc-dynamic`: glibc's default (ZOTUNE_MALLOPT=0). The last column: loss and ZO slope minus the "
        "in-memory model's.",
        "",
        "| mode | --max-memory | malloc | layers offloaded | forward / in-memory | ZO step / in-memory | "
        "ZO step / two forwards | peak RSS MiB | loss, slope diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rss = f"{r['peak_rss_mb']:.0f}" if r["peak_rss_mb"] is not None else ""
        lines.append(
            f"| {r['mode']} | {r['max_memory'] or '(none)'} | {r['malloc']} | {r['layers_offloaded']}"
            f"{' to ' + r['offload_device'] if r['offload_device'] else ''} | {r['forward_over_in_memory']:.2f} | "
            f"{r['zo_step_over_in_memory']:.2f} | {r['zo_step_over_two_forwards']:.2f} | {rss} | "
            f"{r['loss_minus_in_memory']:+.0e}, {r['slope_minus_in_memory']:+.0e} |")
    ref = {r["malloc"]: r["in_memory_forward_s"] for r in rows}
    lines += ["", "In-memory forward, seconds (across processes, indicative only): "
              + ", ".join(f"{k} {v:.2f} s" for k, v in ref.items()) + "."]
    if meta.get("load_average"):
        lines += ["", f"Machine load at the end of the run (1/5/15-min load average on {meta.get('cpus')} CPUs): "
                  + "/".join(f"{x:.1f}" for x in meta["load_average"])
                  + ". On a shared, loaded machine the time ratios carry noise of the order of 10-20%; "
                  "the peak RSS numbers and the zero loss/slope differences do not depend on load."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
