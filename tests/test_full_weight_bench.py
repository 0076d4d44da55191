"""benchmarks/full_weight.py's MeZO reference step (Algorithm 1) on a tiny module: no model download."""

import importlib.util
import random
from pathlib import Path

import torch

_spec = importlib.util.spec_from_file_location(
    "full_weight_bench", Path(__file__).resolve().parents[1] / "benchmarks" / "full_weight.py")
fw = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fw)


def test_mezo_reference_step_is_algorithm_1():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    params = [p for _, p in net.named_parameters()]
    for p in params:
        p.requires_grad_(False)
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    loss = lambda: float(torch.nn.functional.mse_loss(net(x), y))
    before = [p.clone() for p in params]
    eps, lr = 1e-3, 1e-2
    seed = random.Random(0).randint(0, 1_000_000_000 - 1)  # the step's seed, drawn as the step draws it
    torch.manual_seed(seed)
    zs = [torch.normal(mean=0, std=1, size=p.size(), dtype=p.dtype) for p in params]
    with torch.no_grad():
        for p, z in zip(params, zs):
            p.add_(z, alpha=eps)
        lp = loss()
        for p, z in zip(params, zs):
            p.add_(z, alpha=-2 * eps)
        lm = loss()
        for p, b in zip(params, before):
            p.copy_(b)
    g = (lp - lm) / (2 * eps)
    fw.mezo_reference_step(params, loss, eps, lr, random.Random(0))
    for p, b, z in zip(params, before, zs):
        assert torch.allclose(p, b - lr * g * z, atol=1e-6)  # +eps/-2eps/+eps drifts by float32 rounding only


def test_markdown_rows_with_errors():
    rows = [{"mode": "inference", "dtype": "float32", "forward_s": 1.0, "peak_mb": 900.0},
            {"mode": "mezo", "dtype": "bfloat16", "error": "ZOError: refused"}]
    md = fw.markdown(rows, {"model": "m", "batch_size": 16, "threads": 1, "torch": "x", "machine": "y",
                            "lr": 1e-6, "eps": 1e-3, "command": "cmd"})
    assert "ZOError: refused" in md and "| inference | float32 |" in md
