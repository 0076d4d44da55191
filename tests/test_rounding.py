"""Seeded stochastic rounding (zotune.rounding): unbiased, replayable, chunk-independent."""

import math

import pytest
import torch

from zotune.errors import ZOError
from zotune.rounding import BLOCK, add_stochastic_, block_seed, stochastic_round


def ulp(dtype, x: float) -> float:
    t = torch.tensor([x], dtype=dtype)
    return (torch.nextafter(t, torch.tensor([math.inf], dtype=dtype)) - t).double().item()


def assert_unbiased(results: torch.Tensor, exact: float, spacing: float, sigmas: float = 5.0):
    """Mean within `sigmas` standard errors of `exact` (each result is one of two values `spacing` apart)."""
    r = results.double().reshape(-1)
    lo = math.floor(exact / spacing) * spacing
    p = min(max((exact - lo) / spacing, 1e-12), 1 - 1e-12)
    se = spacing * math.sqrt(p * (1 - p) / r.numel())
    assert abs(r.mean().item() - exact) < sigmas * se + 1e-15, (r.mean().item(), exact, se)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("w,u", [(0.05, 1e-6), (-0.3, 3e-7), (1.0, -2e-6), (0.996, 3.0e-3), (3e-3, 1e-9)])
# (0.996, 3e-3): the sum sits just below 1.0, so its upper neighbour is the next binade's first value
def test_unbiased_over_seeds(dtype, w, u):
    """One element per seed, 4000 seeds: the mean is the exact float32 sum within a few standard errors."""
    target0 = torch.tensor([w], dtype=dtype)
    exact = (target0.float() + torch.tensor([u], dtype=torch.float32)).double().item()
    near = torch.tensor([exact]).to(dtype)
    other = torch.nextafter(near, torch.tensor([-math.inf if near.double().item() > exact else math.inf]).to(dtype))
    lo, hi = sorted([near.double().item(), other.double().item()])  # the two neighbours of the exact sum
    out = torch.empty(4000, dtype=torch.float64)
    for s in range(len(out)):
        t = target0.clone()
        add_stochastic_(t, torch.tensor([u]), seed=s)
        out[s] = t.double().item()
    assert set(out.tolist()) <= {lo, hi}
    assert_unbiased(out, exact, hi - lo)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_unbiased_over_elements_and_update_far_below_ulp(dtype):
    """2^20 copies of 0.05 plus 1e-6 (bf16's ulp there is 2.4e-4): round-to-nearest loses it, SR keeps it in mean."""
    n = 1 << 20
    w = torch.full((n,), 0.05, dtype=dtype)
    rtn = w.clone().add_(1e-6)
    assert torch.equal(rtn, w)  # round-to-nearest: the update vanishes
    sr = add_stochastic_(w.clone(), torch.full((n,), 1e-6), seed=7)
    exact = (w[:1].float() + 1e-6).double().item()
    assert_unbiased(sr, exact, ulp(dtype, 0.05))
    moved = (sr.double() - w.double()).mean().item()
    assert abs(moved - 1e-6) < 0.05e-6


def test_many_small_updates_accumulate_in_expectation():
    """100 steps of +1e-6 on bf16 0.05: round-to-nearest stays put, SR drifts to +1e-4 on average."""
    n = 1 << 16
    w_rtn = torch.full((n,), 0.05, dtype=torch.bfloat16)
    w_sr = w_rtn.clone()
    for step in range(100):
        w_rtn.add_(torch.full((n,), 1e-6))
        add_stochastic_(w_sr, torch.full((n,), 1e-6), seed=step)
    base = torch.tensor(0.05, dtype=torch.bfloat16).double().item()
    assert (w_rtn.double() == base).all()
    assert abs((w_sr.double().mean().item() - base) - 1e-4) < 0.1e-4


def test_bit_trick_probability_is_low_bits_over_2_16():
    """x with low 16 bits L rounds up with probability L / 2^16 (checked for a few L on 2^18 draws)."""
    n = 1 << 18
    base = torch.tensor([0.75], dtype=torch.float32).view(torch.int32).item()  # low 16 bits zero
    for low in (1, 0x1000, 0x8000, 0xC000, 0xFFFF):
        x = torch.tensor([base + low], dtype=torch.int32).view(torch.float32).expand(n).contiguous()
        r = stochastic_round(x, torch.bfloat16, seed=low)
        up = (r.float() > 0.75).double().mean().item()
        p = low / 65536
        assert abs(up - p) < 5 * math.sqrt(max(p * (1 - p), 1e-9) / n) + 1e-6, (low, up, p)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_replay_is_bit_identical(dtype):
    t0 = (torch.randn(300, 257) * 0.05).to(dtype)
    u = torch.randn(300, 257) * 1e-5
    a = add_stochastic_(t0.clone(), u, seed=123)
    b = add_stochastic_(t0.clone(), u, seed=123)
    c = add_stochastic_(t0.clone(), u, seed=124)
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    assert not torch.equal(a.view(torch.int16), c.view(torch.int16))


def test_global_rng_untouched_and_private_generator():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    add_stochastic_(torch.zeros(1000, dtype=torch.bfloat16), torch.randn(1000, generator=torch.Generator().manual_seed(1)), 5)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunked_equals_unchunked(dtype):
    n = 3 * BLOCK + 123
    t0 = (torch.randn(n) * 0.1).to(dtype)
    u = torch.randn(n) * 1e-4
    whole = add_stochastic_(t0.clone(), u, seed=9, chunk=1 << 30)
    for chunk in (1, BLOCK, 2 * BLOCK, 5000):  # rounded up to whole blocks
        part = add_stochastic_(t0.clone(), u, seed=9, chunk=chunk)
        assert torch.equal(part.view(torch.int16), whole.view(torch.int16)), chunk
    calls = []

    def gen(start, stop):  # the update delivered chunk by chunk
        calls.append((start, stop))
        return u[start:stop]

    lazy = add_stochastic_(t0.clone(), gen, seed=9, chunk=BLOCK)
    assert torch.equal(lazy.view(torch.int16), whole.view(torch.int16))
    assert calls == [(s, min(n, s + BLOCK)) for s in range(0, n, BLOCK)]


def test_shapes_alpha_and_noncontiguous():
    t0 = (torch.randn(64, 96) * 0.1).to(torch.bfloat16)
    u = torch.randn(64, 96) * 1e-3
    a = add_stochastic_(t0.clone(), u * -0.5, seed=3)
    b = add_stochastic_(t0.clone(), u, seed=3, alpha=-0.5)
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    # a transposed (non-contiguous) target: rounded in its own flattened (logical) order
    tt = t0.clone().T
    add_stochastic_(tt, u.T.contiguous(), seed=3)
    ref = add_stochastic_(t0.clone().T.contiguous(), u.T.contiguous(), seed=3)
    assert torch.equal(tt.contiguous().view(torch.int16), ref.view(torch.int16))


def test_float32_target_is_a_plain_add():
    t = torch.randn(1000)
    u = torch.randn(1000) * 1e-6
    expect = t.clone().add_(u, alpha=0.3)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    add_stochastic_(t, u, seed=11, alpha=0.3)
    assert torch.equal(t, expect)
    assert torch.equal(state, torch.get_rng_state())
    t2 = torch.randn(1000, dtype=torch.float64)
    e2 = t2 + u.double()
    assert torch.equal(add_stochastic_(t2, u, seed=1), e2)
    t3 = torch.randn(3 * BLOCK + 5)
    u3 = torch.randn(3 * BLOCK + 5)
    e3 = t3 + u3
    assert torch.equal(add_stochastic_(t3, lambda a, b: u3[a:b], seed=0, chunk=BLOCK), e3)


def test_results_are_neighbours_of_the_exact_sum():
    t0 = (torch.randn(50_000) * 0.2).to(torch.bfloat16)
    u = torch.randn(50_000) * 1e-3
    x = t0.float() + u
    r = add_stochastic_(t0.clone(), u, seed=0)
    down = x.view(torch.int32).bitwise_and(-65536).view(torch.float32).to(torch.bfloat16)  # truncation
    up = torch.nextafter(down, torch.where(x < 0, -math.inf, math.inf).to(torch.bfloat16))
    exact = down.float() == x
    assert ((r == down) | (r == up)).all()
    assert (r[exact] == down[exact]).all()  # representable sums are never moved


def test_non_finite():
    """bf16: ±inf stays ±inf; NaN from arithmetic and NaN targets stay NaN; past max -> maybe inf. fp16 likewise."""
    big = torch.finfo(torch.bfloat16).max
    t = torch.tensor([math.inf, -math.inf, math.nan, 1.0, 1.0, big, -big], dtype=torch.bfloat16)
    u = torch.tensor([1.0, 1.0, 0.0, math.nan, 0.0, 0.0, 0.0])
    u[4] = torch.tensor(0.0) * math.inf  # a NaN produced by arithmetic (0xFFC00000)
    r = add_stochastic_(t.clone(), u, seed=0)
    assert r[0] == math.inf and r[1] == -math.inf
    assert r[2].isnan() and r[3].isnan() and r[4].isnan()
    assert r[5] == big and r[6] == -big
    # float32 values just below float32's max sit past bf16's max: they round to bf16 max or to inf, never NaN
    x = torch.full((1000,), torch.finfo(torch.float32).max)
    s = stochastic_round(x, torch.bfloat16, seed=0)
    assert ((s == big) | (s == math.inf)).all() and (s == math.inf).any()
    h = torch.tensor([math.inf, -math.inf, math.nan, 65504.0, 70000.0], dtype=torch.float32)
    f = stochastic_round(h, torch.float16, seed=0)
    assert f[0] == math.inf and f[1] == -math.inf and f[2].isnan() and f[3] == 65504 and f[4] == math.inf


def test_subnormals_and_signs():
    tiny = torch.finfo(torch.bfloat16).smallest_normal
    x = torch.full((1 << 16,), tiny * 0.3)  # a bf16 subnormal region value
    r = stochastic_round(x, torch.bfloat16, seed=1)
    vals = sorted(set(r.double().tolist()))
    assert len(vals) == 2 and vals[0] < tiny * 0.3 < vals[1]
    assert_unbiased(r, x[0].double().item(), vals[1] - vals[0])
    neg = stochastic_round(-x, torch.bfloat16, seed=1)
    assert torch.equal(neg, -r)  # sign-magnitude: the same bits round the magnitude


def test_errors():
    with pytest.raises(ZOError):
        add_stochastic_(torch.zeros(4, dtype=torch.int32), torch.zeros(4), 0)
    with pytest.raises(ZOError):
        add_stochastic_(torch.zeros(4, dtype=torch.bfloat16), torch.zeros(5), 0)
    with pytest.raises(ZOError):
        add_stochastic_(torch.zeros(4, dtype=torch.bfloat16), lambda a, b: torch.zeros(1), 0)
    with pytest.raises(ZOError):
        add_stochastic_(torch.zeros(4, dtype=torch.bfloat16), torch.zeros(4), 0, chunk=0)
    assert block_seed(1, 2) != block_seed(2, 1) and 0 <= block_seed(2**62, 10**9) < 2**63
