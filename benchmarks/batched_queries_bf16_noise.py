"""bf16 base: how far the sequential and the batched slopes are from the fp32 slope (same step, weights).

SmolLM2-135M, rotten-tomatoes batch of 16, micro-batch 4, q = 4, steps 0-2 (lr 0, so the
weights stay put), LoRA factors nudged off their init (B no longer zero). For each method:
the sequential and batched slopes over a float32 base and over a bfloat16 base, the RMS of
their differences, and whether the bf16 sequential step repeats bit-identically.

    PYTHONPATH=src python benchmarks/batched_queries_bf16_noise.py mezo-lora,ar1zo,zoact
"""
import json, math, sys, torch
torch.set_num_threads(1)
from zotune.models import load_model
from zotune.config import TrainConfig
from zotune.setup import build_engine
from zotune.evaluate import Scorer
from zotune.tasks.base import load_task
from zotune.calibration import calibration_batches
from zotune.methods import METHODS
from zotune.batched import step_batched
train = load_task("rotten-tomatoes").train
batch = train[:16]
STEPS, Q = [0, 1, 2], 4
out = {}
for method in sys.argv[1].split(","):
    gs = {}
    for dtype in (torch.float32, torch.bfloat16):
        model, tok, _ = load_model("smollm2-135m", dtype)
        cfg = TrainConfig.make(model="smollm2-135m", method=method, queries=Q, eps=1e-2).validate()
        cal = (lambda: calibration_batches(train, tok, 32, 0, 32)) if METHODS[method].needs_calibration else None
        model, engine = build_engine(cfg, model, calibration=cal)
        with torch.no_grad():  # trained-looking factors: B no longer zero
            g = torch.Generator().manual_seed(0)
            for p in engine.method.params.values():
                p.add_(torch.randn(p.shape, generator=g), alpha=0.01)
        sc = Scorer(model, tok, micro_batch_size=4)
        for s in STEPS:
            engine.step_count = s
            gs.setdefault(("seq", str(dtype)), []).extend(engine.step(lambda: sc.loss_tensor(batch), 0.0).grads)
            engine.step_count = s
            gs.setdefault(("bat", str(dtype)), []).extend(step_batched(engine, model, lambda c: sc.copy_losses(batch, c), 0.0).grads)
            if dtype == torch.bfloat16:
                engine.step_count = s
                gs.setdefault(("seq2", str(dtype)), []).extend(engine.step(lambda: sc.loss_tensor(batch), 0.0).grads)
    ref = gs[("seq", "torch.float32")]
    rms = lambda a, b: math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)) / len(a))
    res = {"fp32_seq_vs_bat_max": max(abs(x - y) for x, y in zip(ref, gs[("bat", "torch.float32")])),
           "rms_fp32_g": math.sqrt(sum(x * x for x in ref) / len(ref)),
           "bf16_seq_vs_fp32_rms": rms(gs[("seq", "torch.bfloat16")], ref),
           "bf16_bat_vs_fp32_rms": rms(gs[("bat", "torch.bfloat16")], ref),
           "bf16_seq_vs_bat_rms": rms(gs[("seq", "torch.bfloat16")], gs[("bat", "torch.bfloat16")]),
           "bf16_seq_repeat_identical": gs[("seq", "torch.bfloat16")] == gs[("seq2", "torch.bfloat16")],
           "g": {f"{k[0]}-{k[1].split('.')[-1]}": v for k, v in gs.items()}}
    out[method] = res
    print(method, {k: v for k, v in res.items() if k != "g"}, flush=True)
json.dump(out, open(sys.argv[2] if len(sys.argv) > 2 else "benchmarks/results/batched_queries_bf16_noise.json", "w"),
          indent=1)
