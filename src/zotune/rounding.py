"""Seeded stochastic rounding: write a float32 update into a bfloat16 / float16 tensor without losing it.

A full-weight ZO update is lr·g·z, often ~1e-6 per element, while bfloat16 has
8 significant bits: next to a weight of 0.05 its spacing (one ulp) is 2.4e-4, so
``w.add_(update)`` with round-to-nearest returns ``w`` unchanged and the run
never moves. Stochastic rounding (SR) rounds ``x = w + update`` (computed in
float32) up or down to one of its two neighbouring bf16 values with probability
proportional to the distance: with neighbours ``lo <= x <= hi``,

    P(hi) = (x - lo) / (hi - lo),   so   E[result] = x  exactly,

i.e. the update survives *in expectation* however small it is, and its
rounding noise (at most one ulp, zero mean) averages out over steps.

API
---
``add_stochastic_(target, update, seed, *, alpha=1.0, chunk=2**22) -> target``
    ``target ← SR(target + alpha·update)`` in place. ``update`` is a tensor with
    ``target.numel()`` elements (any float dtype, any shape), or a callable
    ``update(start, stop) -> tensor`` giving the flattened elements
    ``[start, stop)`` (so a caller can regenerate a direction chunk by chunk and
    never hold a full-size float32 copy of it). float32 / float64 targets get a
    plain ``add_`` (no rounding question, no random numbers drawn).
``stochastic_round(x, dtype, seed, *, chunk=2**22) -> tensor``
    A new ``dtype`` tensor holding SR(x); the same as ``add_stochastic_`` on zeros.

How (bfloat16: the classic bit trick)
-------------------------------------
bfloat16 is the upper 16 bits of float32. Add a uniform random integer
``r ∈ [0, 2^16)`` to the float32 bit pattern of x (read as int32) and clear the
low 16 bits. With ``L`` the low 16 bits of x, the upper half is incremented
(one bf16 ulp away from zero) exactly when ``L + r >= 2^16``, with probability
``L / 2^16``, which is the distance from x to the truncated value in units of
the ulp: SR with the exact probability, no float arithmetic. Because float32 is
sign-magnitude, the same integer addition works for negative x (rounding the
magnitude), across binade boundaries (the carry moves into the exponent: the
next value is the next binade's first one), for subnormals, and up to the
largest finite value, past which the carry gives ±inf. The result has zero
low bits, so writing it into the bf16 target is exact.

float16 has a different exponent width, so the bit trick does not apply; there
x is rounded to nearest, the neighbour on the other side of x is found with
``torch.nextafter``, and the neighbour is taken when a float32 uniform ``u``
satisfies ``u < p`` with ``p = distance / spacing`` (exact numerator and
denominator, one float32 division: a probability error below 2^-24).

Unbiasedness is with respect to ``x = fl32(target + alpha·update)``: the sum
itself is one float32 operation with round-to-nearest, so the expectation of
the result is x exactly (bf16), resp. within 2^-24 ulp (fp16).

Random numbers and replay
-------------------------
The flattened target is split into fixed blocks of ``BLOCK = 2^16`` elements;
block ``b`` draws its random bits from a private ``torch.Generator`` (on the
target's device) seeded with ``block_seed(seed, b)``, a 64-bit mix of (seed, b).
The bits an element sees are therefore a pure function of (seed, its flat
index): the same call replays bit-identically, and the result does not depend
on ``chunk`` (rounded up to a multiple of BLOCK), i.e. chunked == unchunked. No
global RNG is touched. Different devices use different generators (CPU
mt19937, CUDA Philox), so CPU and CUDA results differ bit-wise (both unbiased).

Memory: per chunk, one float32 copy of the chunk, the chunk's random bits and
(for a tensor ``update`` in another dtype) its float32 conversion. With the
default chunk of 2^22 elements that is ~40 MB, whatever the target's size
(SmolLM2-135M's 49152×576 embedding is 28M elements).

Non-finite values (bf16): ±inf stays ±inf (its low bits are zero, no carry). A
NaN produced by torch arithmetic (a quiet NaN, top mantissa bit set, e.g.
0xFFC00000 or 0x7FC00000) and any bf16 NaN already in ``target`` stays NaN. A
hand-made float32 NaN whose payload sits only in the low 16 bits (e.g.
0x7F800001) is not detected and can come out as ±inf, or as ±0 when its high
word is 0x7FFF/0xFFFF; torch never produces those, and checking for them would
cost a full extra pass. Finite values beyond the largest bf16 round to ±inf
with the trick's probability. float16: NaN stays NaN, ±inf stays ±inf, and
finite values outside float16's range round to nearest (±65504 or ±inf).
"""

from __future__ import annotations

from typing import Callable, Union

import torch

from .errors import ZOError

__all__ = ["add_stochastic_", "stochastic_round", "round_into_", "block_seed", "BLOCK", "DEFAULT_CHUNK"]

BLOCK = 1 << 16  # elements per random-number block: the granularity of seeding, hence of chunking
DEFAULT_CHUNK = 1 << 22  # elements per pass: a float32 chunk is 16 MiB
_MASK64 = (1 << 64) - 1

Update = Union[torch.Tensor, Callable[[int, int], torch.Tensor]]


def block_seed(seed: int, block: int) -> int:
    """The seed of block ``block``'s generator: splitmix64 of (seed, block), 63 bits."""
    z = (int(seed) * 0xD1B54A32D192ED03 + (block + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def _chunk_size(chunk: int) -> int:
    if chunk < 1:
        raise ZOError(f"chunk must be >= 1, got {chunk}")
    return -(-chunk // BLOCK) * BLOCK  # a whole number of blocks


def _update_chunk(update: Update, flat_update: torch.Tensor | None, start: int, stop: int) -> torch.Tensor:
    if flat_update is not None:
        return flat_update[start:stop]
    u = update(start, stop)
    if u.numel() != stop - start:
        raise ZOError(f"update({start}, {stop}) gave {u.numel()} elements, expected {stop - start}")
    return u.reshape(-1)


def _random_u16(gen: torch.Generator, seed: int, start: int, n: int, device) -> torch.Tensor:
    """Uniform 16-bit integers in [0, 2^16) as int32 for flat elements [start, start+n) (start % BLOCK == 0)."""
    blocks = -(-n // BLOCK)
    bits = torch.empty(blocks * BLOCK // 4, dtype=torch.int64, device=device)  # 4 x 16 bits per draw
    first = start // BLOCK
    for b in range(blocks):
        gen.manual_seed(block_seed(seed, first + b))
        bits[b * BLOCK // 4:(b + 1) * BLOCK // 4].random_(-(1 << 63), None, generator=gen)  # all 64 bits
    if bits.device.type == "cpu":
        return bits.view(torch.uint16)[:n].to(torch.int32)
    return bits.view(torch.int16)[:n].to(torch.int32).bitwise_and_(0xFFFF)  # same values; uint16 ops are CPU-first


def _random_uniform(gen: torch.Generator, seed: int, start: int, n: int, device) -> torch.Tensor:
    """float32 uniforms in [0, 1) for flat elements [start, start+n) (start % BLOCK == 0)."""
    blocks = -(-n // BLOCK)
    u = torch.empty(blocks * BLOCK, dtype=torch.float32, device=device)
    first = start // BLOCK
    for b in range(blocks):
        gen.manual_seed(block_seed(seed, first + b))
        u[b * BLOCK:(b + 1) * BLOCK].uniform_(0.0, 1.0, generator=gen)
    return u[:n]


def _round_bf16_(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """In place on float32 ``x``: add the random low bits ``r`` and truncate to bf16 (low 16 bits cleared)."""
    xi = x.view(torch.int32)
    xi.add_(r)
    xi.bitwise_and_(-65536)  # 0xFFFF0000
    return x


def _round_fp16(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """SR of float32 ``x`` to float16 with uniforms ``u`` (generic neighbour rule)."""
    near = x.to(torch.float16)
    nearf = near.float()
    toward = torch.where(nearf > x, float("-inf"), float("inf")).to(torch.float16)
    other = torch.nextafter(near, toward)
    p = (x - nearf).abs_().div_((other.float() - nearf).abs_())  # NaN for NaN/inf x: never taken
    return torch.where(u < p, other, near)


def add_stochastic_(target: torch.Tensor, update: Update, seed: int, *, alpha: float = 1.0,
                    chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """``target ← SR(target + alpha·update)`` in place; returns ``target``.

    ``target``: bfloat16 or float16 (stochastic rounding), or float32/float64
    (a plain ``add_``: no rounding question, no random numbers).
    ``update``: a tensor with ``target.numel()`` elements (any float dtype; it is
    read in flattened order), or a callable ``update(start, stop)`` returning the
    flattened elements ``[start, stop)``, called once per chunk in order.
    ``seed``: the random bits of flat element i are a function of (seed, i) only:
    same seed, same result, whatever ``chunk``.
    ``chunk``: elements per pass (rounded up to a multiple of ``BLOCK``); bounds
    the float32 temporaries to about 10 bytes per chunk element.
    """
    if not target.is_floating_point():
        raise ZOError(f"add_stochastic_ needs a floating-point target, got {target.dtype}")
    n = target.numel()
    flat_update = None
    if isinstance(update, torch.Tensor):
        if update.numel() != n:
            raise ZOError(f"update has {update.numel()} elements, target {n}")
        flat_update = update.reshape(-1)
    elif not callable(update):
        raise ZOError(f"update must be a tensor or a callable (start, stop) -> tensor, got {type(update).__name__}")
    if not target.is_contiguous():  # weights are contiguous; a strided view costs one copy
        work = target.contiguous()
        add_stochastic_(work, update, seed, alpha=alpha, chunk=chunk)
        return target.copy_(work)
    flat = target.view(-1)
    step = _chunk_size(chunk)
    if target.dtype in (torch.float32, torch.float64):
        if flat_update is not None:
            flat.add_(flat_update.to(target.dtype), alpha=alpha)
        else:
            for start in range(0, n, step):
                stop = min(n, start + step)
                flat[start:stop].add_(_update_chunk(update, None, start, stop).to(target.dtype), alpha=alpha)
        return target
    if target.dtype not in (torch.bfloat16, torch.float16):
        raise ZOError(f"stochastic rounding supports bfloat16 and float16 targets, got {target.dtype}")
    gen = torch.Generator(device=target.device)
    for start in range(0, n, step):
        stop = min(n, start + step)
        part = flat[start:stop]
        x = part.to(torch.float32)  # a fresh float32 copy of the chunk (exact)
        x.add_(_update_chunk(update, flat_update, start, stop).to(torch.float32), alpha=alpha)
        round_into_(part, x, seed, start, gen)
    return target


def round_into_(part: torch.Tensor, x: torch.Tensor, seed: int, start: int,
                gen: torch.Generator | None = None) -> torch.Tensor:
    """``part ← SR(x)``: the rounding step of :func:`add_stochastic_` for one chunk, on its own.

    ``part`` is a bfloat16/float16 slice that starts at flat element ``start`` (a multiple of ``BLOCK``)
    of the tensor whose bits ``seed`` draws; ``x`` the float32 values (overwritten). Exposed so a caller
    that computes ``x`` itself (the engine's patched restore fuses restore and update in one pass) rounds
    with exactly the random bits :func:`add_stochastic_` would use: the two give identical results.
    """
    if start % BLOCK:
        raise ZOError(f"round_into_: start {start} is not a multiple of BLOCK ({BLOCK})")
    gen = torch.Generator(device=part.device) if gen is None else gen
    if part.dtype == torch.bfloat16:
        return part.copy_(_round_bf16_(x, _random_u16(gen, seed, start, x.numel(), part.device)))
    if part.dtype == torch.float16:
        return part.copy_(_round_fp16(x, _random_uniform(gen, seed, start, x.numel(), part.device)))
    raise ZOError(f"round_into_ rounds into bfloat16 or float16, got {part.dtype}")


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, seed: int, *, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """A new ``dtype`` tensor holding SR(x) (``x`` read as float32); 0 + x is exact, so this is SR(x) itself."""
    out = torch.zeros(x.shape, dtype=dtype, device=x.device)
    return add_stochastic_(out, x, seed, chunk=chunk)
