"""The snapshot-free prototypes in benchmarks/_fullweight_proto.py (issue 15): fused regen and patched-exact restore."""

import importlib.util
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location(
    "fullweight_proto", Path(__file__).resolve().parents[1] / "benchmarks" / "_fullweight_proto.py")
P = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(P)


def tensors(dtype):
    g = torch.Generator().manual_seed(0)
    base = [("w", torch.randn(300, 70, generator=g) * 0.05), ("tiny", torch.randn(1000, generator=g) * 1e-3),
            ("zeros", torch.zeros(5)), ("big", torch.randn(3000, generator=g) * 3)]
    return [(n, t.to(dtype)) for n, t in base]


def z_of(views, dirs, seed, step):
    C = dirs.chunk
    return [torch.cat([dirs.chunk_of(s, k, min(C, v.numel() - k * C)).clone() for k in range(-(-v.numel() // C))])
            .view(v.shape) for (_, v), s in zip(views, P.seeds_for(views, seed, step))]


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "gaussian-table"])
def test_fused_regen_lands_on_theta_minus_lr_g_z(kind):
    views = tensors(torch.float32)
    start = [v.clone() for _, v in views]
    dirs = P.Directions(kind, 1 << 10)
    losses = iter([1.0, 0.5])
    g = P.step_fused(views, lambda: next(losses), 1e-3, 1e-2, 0, 0, dirs)
    assert g == pytest.approx(250.0)
    for (_, v), s, z in zip(views, start, z_of(views, dirs, 0, 0)):
        assert torch.allclose(v, s - 1e-2 * g * z, atol=2e-6)


def test_chunked_z_does_not_depend_on_the_pass():
    views = tensors(torch.float32)
    d = P.Directions("gaussian", 1 << 10)
    assert all(torch.equal(a, b) for a, b in zip(z_of(views, d, 3, 7), z_of(views, d, 3, 7)))
    assert not torch.equal(z_of(views, d, 3, 7)[0], z_of(views, d, 3, 8)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patched_restore_is_bit_exact(dtype):
    views = tensors(dtype)
    start = [v.clone() for _, v in views]
    dirs, stats = P.Directions("gaussian", 1 << 12), {}
    for step in range(10):
        losses = iter([1.0, 0.5])
        P.step_patched(views, lambda: next(losses), 1e-2, 0.0, 0, step, dirs, stats=stats)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert all(torch.equal(v.view(bits), s.view(bits)) for (_, v), s in zip(views, start))
    assert 0 < stats["patch_entries"] < 0.5 * sum(v.numel() for _, v in views)


def test_regen_restore_drifts_in_bf16_but_not_much_in_fp32():
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        views = tensors(dtype)
        start = [v.clone() for _, v in views]
        dirs = P.Directions("gaussian", 1 << 12)
        for step in range(30):
            P.step_fused(views, lambda: 0.0, 1e-3, 0.0, 0, step, dirs)
        out[dtype] = max((v.double() - s.double()).abs().max().item() for (_, v), s in zip(views, start))
    assert out[torch.float32] < 1e-5 < out[torch.bfloat16]
