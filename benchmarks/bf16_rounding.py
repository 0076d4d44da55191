"""Full-weight MeZO on a bfloat16 SmolLM2-135M: stochastic rounding trains like float32, round-to-nearest does not.

Why this exists (issue 15): a ZO update lr·g·z is about 1e-5 per weight, far below half an ulp of most bf16
weights (2^-8 of their magnitude), so ``add_`` rounds it away. zotune writes bf16 updates with seeded
stochastic rounding (``zotune.rounding``), unbiased in expectation. This runs three arms on the same batches
and the same directions:

* ``float32``: the reference;
* ``bf16-sr``: bfloat16 base, zotune's update (``--restore auto`` = the exact patch restore);
* ``bf16-nearest``: bfloat16 base, the update written with a plain ``add_`` (round to nearest), restored
  by snapshot so the comparison isolates the update's rounding.

and reports, for each, the loss on a fixed set of training examples before and after (the same examples for
every arm), the share of weights that changed, and the share of the float32 run's weight change the arm
reproduced along it (``kept`` = <d, d32> / <d32, d32>: 1 means the same update, 0 none of it).

    PYTHONPATH=src python benchmarks/bf16_rounding.py --steps 100 --lr 1e-5 --threads 1
    # -> benchmarks/results/bf16_rounding.{json,md}
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from statistics import mean

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from zotune.config import TrainConfig  # noqa: E402
from zotune.setup import batch_indices, load_data, setup  # noqa: E402

ARMS = ("float32", "bf16-sr", "bf16-nearest")


def run_arm(arm: str, args: argparse.Namespace, probe_idx: list[int]) -> tuple[dict, dict[str, torch.Tensor]]:
    dtype = "float32" if arm == "float32" else "bfloat16"
    cfg = TrainConfig.make(method="mezo", model=args.model, lr=args.lr, eps=args.eps, steps=args.steps,
                           batch_size=args.batch_size, dtype=dtype, threads=args.threads, seed=args.seed,
                           restore="snapshot" if arm == "bf16-nearest" else "auto", progress=False)
    data = load_data(cfg)
    s = setup(cfg, data)
    method, engine, scorer = s.method, s.engine, s.scorer
    if arm == "bf16-nearest":  # the update as a plain add_: rounded to nearest in bf16
        method.add_direction_ = lambda name, v, key, alpha, sr_seed=None: v.add_(
            method.direction(name, v, key), alpha=alpha)
    probe = [data.train[i] for i in probe_idx]
    before = {n: p.detach().float().clone() for n, p in method.params.items()}
    loss_before = scorer.loss(probe)
    losses, t0 = [], time.perf_counter()
    for step in range(args.steps):
        batch = [data.train[i] for i in batch_indices(len(data.train), cfg.batch_size, cfg.seed, step)]
        losses.append(engine.step(lambda: scorer.loss_tensor(batch), cfg.lr).loss)
        if (step + 1) % 10 == 0:
            print(f"{arm}: step {step + 1}, loss {mean(losses[-10:]):.4f}", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - t0
    loss_after = scorer.loss(probe)
    delta = {n: p.detach().float() - before[n] for n, p in method.params.items()}
    changed = sum(int((d != 0).sum()) for d in delta.values()) / sum(d.numel() for d in delta.values())
    row = {"arm": arm, "dtype": dtype, "restore": engine.restore_mode(method.views(0)), "steps": args.steps,
           "lr": args.lr, "eps": args.eps, "probe_loss_before": loss_before, "probe_loss_after": loss_after,
           "probe_loss_drop": loss_before - loss_after, "changed": changed,
           "train_loss_first10": mean(losses[:10]), "train_loss_last10": mean(losses[-10:]),
           "seconds": round(seconds, 1)}
    return row, delta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--probe", type=int, default=64, help="fixed training examples the before/after loss is on")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bf16_rounding"))
    args = ap.parse_args()
    probe_idx = list(range(args.probe))  # the first examples of the seeded training sample: the same for every arm
    rows, ref = [], None
    for arm in ARMS:
        row, delta = run_arm(arm, args, probe_idx)
        if ref is None:
            ref = delta
        dot = sum(float((delta[n].double() * ref[n].double()).sum()) for n in ref)
        norm = sum(float(ref[n].double().pow(2).sum()) for n in ref)
        row["kept"] = dot / norm
        rows.append(row)
        del delta
        print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    cmd = "PYTHONPATH=src python benchmarks/bf16_rounding.py " + " ".join(sys.argv[1:])
    lines = [f"# bf16 full-weight MeZO: stochastic rounding vs round-to-nearest ({args.model})", "",
             f"Command: `{cmd}`", "",
             f"mezo, {args.steps} steps, lr {args.lr:g}, eps {args.eps:g}, batch {args.batch_size}, seed {args.seed}, "
             f"{args.threads} thread(s); the same batches and directions in every arm. Probe loss: mean loss on "
             f"the first {args.probe} examples of the seeded training sample, before and after. kept: share of "
             "the float32 run's weight change reproduced along it (<d, d32>/<d32, d32>). changed: share of "
             "weights that moved.", "",
             "| arm | restore | probe loss before → after | drop | train loss first → last 10 steps | changed | kept |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['restore']} | {r['probe_loss_before']:.5f} → {r['probe_loss_after']:.5f} | "
                     f"{r['probe_loss_drop']:+.5f} | {r['train_loss_first10']:.4f} → {r['train_loss_last10']:.4f} | "
                     f"{r['changed']:.3f} | {r['kept']:.3f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
