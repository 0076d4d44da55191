"""Drift of the engine's restores: max |theta - theta_exact| after N lr-0 steps (issue 15).

Runs zotune's own ``ZOEngine.step`` (method ``mezo`` on a subset of SmolLM2-135M's tensors, the
loss stubbed: a constant, so g = 0 and only the restore touches the weights) for each restore:

* ``snapshot``: copy and copy back: must be exactly 0;
* ``regenerate`` in float32: +eps z, -2eps z, +eps z with z regenerated (block-seeded, chunked);
* ``regenerate`` in bfloat16: the same passes, called through the engine's one query body
  (``ZOEngine._query``; the engine itself refuses a bf16 regeneration restore; this shows why).

"ulps" are counted at max(|w|, eps), the magnitude at which theta +- eps z is rounded.

    PYTHONPATH=src python benchmarks/restore_drift.py --steps 1000   # -> benchmarks/results/restore_drift.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def ulp(t: torch.Tensor) -> torch.Tensor:
    return (torch.nextafter(t, torch.full_like(t, float("inf"))) - t).float()


def run(args, dtype: torch.dtype, restore: str) -> dict:
    from zotune.config import TrainConfig
    from zotune.engine import QueryKey, ZOEngine
    from zotune.methods import get_method
    from zotune.models import load_model
    from zotune.optim import ZOSGD

    model, _, _ = load_model(args.model)
    model = model.to(dtype)
    method = get_method("mezo")(TrainConfig.make(method="mezo", target_modules=args.subset.split(",")))
    method.prepare(model)
    exact = {n: p.detach().clone() for n, p in method.params.items()}
    engine = ZOEngine(method, ZOSGD(), eps=args.eps, seed=0, restore=restore if dtype == torch.float32 else "snapshot")
    t = time.process_time()
    for step in range(args.steps):
        if dtype != torch.float32 and restore == "regenerate":
            engine._query(method.views(step), QueryKey(0, step, 0), None)  # the passes, no forwards
            engine.step_count += 1
        else:
            engine.step(lambda: 0.0, 0.0)
    cpu = time.process_time() - t
    d = torch.cat([(p.detach().float() - exact[n].float()).flatten() for n, p in method.params.items()])
    w = torch.cat([exact[n].flatten() for n in exact])
    at = torch.maximum(w.abs(), torch.tensor(args.eps, dtype=w.dtype))
    ulps = d.abs() / ulp(at)
    big = w.abs().float() >= 0.01
    rel = d.abs()[big] / w.abs().float()[big]
    return {"dtype": str(dtype).removeprefix("torch."), "restore": restore, "steps": args.steps, "eps": args.eps,
            "params": w.numel(), "max_abs": d.abs().max().item(), "mean_abs": d.abs().mean().item(),
            "mean_ulps": ulps.mean().item(), "max_ulps": ulps.max().item(), "mean_rel": rel.mean().item(),
            "max_rel": rel.max().item(), "changed": (d != 0).float().mean().item(), "cpu_s": cpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--subset", default="layers.0.self_attn.,layers.0.input_layernorm")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/restore_drift.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for dtype, restore in [(torch.float32, "snapshot"), (torch.float32, "regenerate"),
                           (torch.bfloat16, "snapshot"), (torch.bfloat16, "regenerate")]:
        rows.append(run(args, dtype, restore))
        print(json.dumps(rows[-1]), flush=True)
    out = {"command": f"PYTHONPATH=src python benchmarks/restore_drift.py --steps {args.steps}",
           "model": args.model, "subset": args.subset, "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
