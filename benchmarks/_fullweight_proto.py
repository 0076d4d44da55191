"""Prototypes for a snapshot-free full-weight ZO step, and the profile behind them (issue 15).

Nothing here is used by zotune; it is the measurement behind
``benchmarks/results/full_weight_profile.md``. Two commands:

    PYTHONPATH=src python benchmarks/_fullweight_proto.py profile --threads 1   # SmolLM2-135M fp32: where a step's time goes
    PYTHONPATH=src python benchmarks/_fullweight_proto.py drift --steps 1000    # |theta - theta_exact| after lr-0 steps

Schemes (all regenerate z from seeds; none keeps a copy of the weights):

* ``regen``: MeZO's in-place sequence  +eps z, eval, -2eps z, eval, +eps z, then the update
  -lr g z as a fourth pass (4 generations, 4 element-wise passes);
* ``fused``: the update folded into the restore: +eps z, eval L+, -2eps z, eval L-, then
  g = (L+ - L-)/2eps and one pass +(eps - lr g) z, which takes theta - eps z to
  theta - lr g z (3 generations, 3 passes);
* z per tensor (``chunk=0``: one ``randn`` of the tensor's shape, a tensor-sized temporary)
  or in flat chunks (``chunk=C``: a reusable C-element buffer; chunk k of a tensor is drawn
  from its own generator seeded by (tensor seed, k), so z does not depend on the order or
  size of processing beyond C itself);
* Gaussian (``normal_``), ``gaussian-table`` (16 random bits index a table of the 2^16
  N(0,1) bin-midpoint quantiles, rescaled to unit variance: a 65536-level discretized
  Gaussian from one cheap draw and one gather), or Rademacher (+-1: 64 random bits per int64 draw, 8 per byte;
  the sign of each byte here, so 8 bits per element);
* ``patched``: exact restore with no snapshot. Each pass regenerates z as ``fused`` does,
  and also runs the next pass's inverse on the value it writes; the few elements whose
  round trip RTN(RTN(theta + d z) - d z) != theta (a weight much smaller than eps|z|, or a
  binade crossed upwards) are saved as (flat index, value) and patched in by the restore.
  Bit-exact in float32 and bfloat16; the saved entries are ~1-2% of the weights at eps=1e-3;
* ``foreach``: the same passes through ``torch._foreach_add_`` over per-tensor z lists
  (needs every z of a group at once: memory-hungry, measured for speed only).

The engine's current step (snapshot, +eps z, theta - eps z = 2 snapshot - (theta + eps z),
restore by copy, update with regenerated z) is measured through ``zotune.ZOOptimizer``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from zotune.engine import QueryKey, gaussian_like, tensor_seed  # noqa: E402
from zotune.rounding import add_stochastic_, block_seed  # noqa: E402


# -- directions -------------------------------------------------------------------------------------
class Directions:
    """z for (tensor, step) from seeds, delivered whole or chunk by chunk into a reusable buffer."""

    def __init__(self, kind: str = "gaussian", chunk: int = 1 << 20):
        if kind not in ("gaussian", "rademacher", "gaussian-table"):
            raise ValueError(kind)
        if kind == "gaussian-table":  # N(0,1) quantiles at the 2^16 bin midpoints, rescaled to unit variance
            p = (torch.arange(1 << 16, dtype=torch.float64) + 0.5) / (1 << 16)
            t = math.sqrt(2) * torch.erfinv(2 * p - 1)
            self.table = (t / t.pow(2).mean().sqrt()).float()
        self.kind, self.chunk = kind, chunk
        self.gen = torch.Generator()
        self.buf = torch.empty(chunk or 0, dtype=torch.float32)
        self.bits = torch.empty(-(-(chunk or 0) // 8), dtype=torch.int64)
        self.bits4 = torch.empty(-(-(chunk or 0) // 4), dtype=torch.int64) if kind == "gaussian-table" else None

    def whole(self, like: torch.Tensor, seed: int) -> torch.Tensor:
        """z shaped like ``like`` (float32), one tensor-sized temporary."""
        self.gen.manual_seed(seed)
        if self.kind == "gaussian":
            return torch.randn(like.shape, generator=self.gen, dtype=torch.float32)
        n = like.numel()
        if self.kind == "gaussian-table":
            bits = torch.empty(-(-n // 4), dtype=torch.int64).random_(-(1 << 63), None, generator=self.gen)
            return self.table[bits.view(torch.uint16)[:n].to(torch.int32)].view(like.shape)
        bits = torch.empty(-(-n // 8), dtype=torch.int64).random_(-(1 << 63), None, generator=self.gen)
        return torch.sign(bits.view(torch.int8)[:n].bitwise_or(1)).to(torch.float32).view(like.shape)

    def chunk_of(self, seed: int, k: int, n: int) -> torch.Tensor:
        """Elements [k*C, k*C + n) of the flattened z (n <= C), in the shared buffer (overwritten next call)."""
        self.gen.manual_seed(block_seed(seed, k))
        if self.kind == "gaussian":
            return self.buf[:n].normal_(generator=self.gen)
        if self.kind == "gaussian-table":  # 16 random bits per element index the quantile table: one gather
            bits = self.bits4[: -(-n // 4)].random_(-(1 << 63), None, generator=self.gen)
            return torch.index_select(self.table, 0, bits.view(torch.uint16)[:n].to(torch.int32), out=self.buf[:n])
        bits = self.bits[: -(-n // 8)].random_(-(1 << 63), None, generator=self.gen)
        b = bits.view(torch.int8)[:n].bitwise_or_(1)  # odd, never 0: its sign is the byte's top bit
        return self.buf[:n].copy_(b).sign_()


def add_direction_(views, key_seeds: list[int], dirs: Directions, coef: float, rounding: str = "nearest",
                   sr_seed: int = 0) -> None:
    """theta += coef * z for every view (z regenerated); bf16 views round to nearest or stochastically."""
    for i, ((name, v), seed) in enumerate(zip(views, key_seeds)):
        if rounding == "stochastic" and v.dtype in (torch.bfloat16, torch.float16):
            C = dirs.chunk or v.numel()
            if dirs.chunk:
                upd = lambda a, b, s=seed, C=C: _chunks_between(dirs, s, C, a, b)
            else:
                z = dirs.whole(v, seed).reshape(-1)
                upd = lambda a, b, z=z: z[a:b]
            add_stochastic_(v, upd, block_seed(sr_seed, i), alpha=coef, chunk=max(C, 1 << 16))
            continue
        if not dirs.chunk:
            v.add_(dirs.whole(v, seed), alpha=coef)
            continue
        flat = v.view(-1)
        C = dirs.chunk
        for k, start in enumerate(range(0, flat.numel(), C)):
            stop = min(flat.numel(), start + C)
            flat[start:stop].add_(dirs.chunk_of(seed, k, stop - start), alpha=coef)


def _chunks_between(dirs: Directions, seed: int, C: int, a: int, b: int) -> torch.Tensor:
    """Flat z elements [a, b) built from the C-sized seeded chunks (a is a multiple of C here)."""
    parts = []
    for start in range(a, b, C):
        n = min(b, start + C) - start
        parts.append(dirs.chunk_of(seed, start // C, n).clone() if b - a > C else dirs.chunk_of(seed, start // C, n))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def seeds_for(views, seed: int, step: int) -> list[int]:
    key = QueryKey(seed, step, 0)
    return [tensor_seed(key, name) for name, _ in views]


@torch.no_grad()
def step_fused(views, loss, eps: float, lr: float, seed: int, step: int, dirs: Directions,
               rounding: str = "nearest") -> float:
    """+eps z, L+, -2eps z, L-, then +(eps - lr g) z: restore and update in one pass (3 generations)."""
    s = seeds_for(views, seed, step)
    add_direction_(views, s, dirs, eps, rounding, sr_seed=3 * step)
    lp = loss()
    add_direction_(views, s, dirs, -2 * eps, rounding, sr_seed=3 * step + 1)
    lm = loss()
    g = (lp - lm) / (2 * eps)
    add_direction_(views, s, dirs, eps - lr * g, rounding, sr_seed=3 * step + 2)
    return g


@torch.no_grad()
def step_regen(views, loss, eps: float, lr: float, seed: int, step: int, dirs: Directions) -> float:
    """MeZO's sequence: +eps z, L+, -2eps z, L-, +eps z, then -lr g z (4 generations)."""
    s = seeds_for(views, seed, step)
    add_direction_(views, s, dirs, eps)
    lp = loss()
    add_direction_(views, s, dirs, -2 * eps)
    lm = loss()
    add_direction_(views, s, dirs, eps)
    g = (lp - lm) / (2 * eps)
    if lr * g:
        add_direction_(views, s, dirs, -lr * g)
    return g


@torch.no_grad()
def step_foreach(views, loss, eps: float, lr: float, seed: int, step: int, group: int = 64) -> float:
    """The fused sequence with torch._foreach_add_ over groups of ``group`` tensors (z of a group held at once)."""
    s = seeds_for(views, seed, step)
    ts = [v for _, v in views]

    def apply(coef):
        for i in range(0, len(ts), group):
            zs = [gaussian_like(t, sd) for t, sd in zip(ts[i:i + group], s[i:i + group])]
            torch._foreach_add_(ts[i:i + group], zs, alpha=coef)

    apply(eps)
    lp = loss()
    apply(-2 * eps)
    lm = loss()
    g = (lp - lm) / (2 * eps)
    apply(eps - lr * g)
    return g


# -- exact restore without a snapshot: regenerate, verify, patch the few elements that do not invert ----
def _axpy(x: torch.Tensor, z: torch.Tensor, alpha: float) -> torch.Tensor:
    """RTN(x + alpha z) in x's dtype, computed in float32 (a bf16 x promotes) into a new tensor.

    Every move, check and restore goes through this one function with the same chunk lengths,
    so a check computes bit for bit what the later restore will compute.
    """
    y = torch.add(x, z, alpha=alpha)
    return y if y.dtype == x.dtype else y.to(x.dtype)


class Patch:
    """The elements a restore would get wrong, saved exactly: per (tensor, chunk), local indices and values."""

    def __init__(self):
        self.entries_: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def add(self, i: int, k: int, idx: torch.Tensor, val: torch.Tensor) -> None:
        self.entries_[(i, k)] = (idx.to(torch.int32), val)

    def apply_(self, i: int, k: int, theta: torch.Tensor) -> None:
        hit = self.entries_.get((i, k))
        if hit is not None:
            theta[hit[0].long()] = hit[1]

    def entries(self) -> int:
        return sum(i.numel() for i, _ in self.entries_.values())

    def nbytes(self) -> int:
        return sum(i.numel() * 4 + v.numel() * v.element_size() for i, v in self.entries_.values())


@torch.no_grad()
def _move_and_record(views, seeds, dirs: Directions, delta: float, undo: float, patch_in: Patch | None,
                     back: float | None) -> Patch:
    """One pass: theta <- RTN(theta0 + delta z) where theta0 is the exact weight (recovered first when
    ``patch_in``: theta0 = RTN(theta + back z) patched), recording where RTN(new + undo z) != theta0."""
    out = Patch()
    C = dirs.chunk
    for i, ((_, v), seed) in enumerate(zip(views, seeds)):
        flat = v.view(-1)
        for k, a in enumerate(range(0, flat.numel(), C)):
            b = min(flat.numel(), a + C)
            z = dirs.chunk_of(seed, k, b - a)
            part = flat[a:b]
            if patch_in is None:
                theta0 = part  # read before it is overwritten below
            else:
                theta0 = _axpy(part, z, back)  # RTN(theta + back z), patched where that is not theta0
                patch_in.apply_(i, k, theta0)
            new = _axpy(theta0, z, delta)
            bad = (_axpy(new, z, undo) != theta0).nonzero().view(-1)
            if bad.numel():
                out.add(i, k, bad, theta0[bad].clone())
            part.copy_(new)
    return out


@torch.no_grad()
def _restore_and_update(views, seeds, dirs: Directions, back: float, patch_in: Patch, lr_g: float,
                        rounding: str, sr_seed: int) -> None:
    C = dirs.chunk
    for i, ((_, v), seed) in enumerate(zip(views, seeds)):
        flat = v.view(-1)
        for k, a in enumerate(range(0, flat.numel(), C)):
            b = min(flat.numel(), a + C)
            z = dirs.chunk_of(seed, k, b - a)
            part = flat[a:b]
            theta0 = _axpy(part, z, back)
            patch_in.apply_(i, k, theta0)
            if lr_g:
                if v.dtype in (torch.float32, torch.float64) or rounding == "nearest":
                    theta0 = _axpy(theta0, z, -lr_g)
                else:
                    add_stochastic_(theta0, z, block_seed(block_seed(sr_seed, i), k), alpha=-lr_g)
            part.copy_(theta0)


@torch.no_grad()
def step_patched(views, loss, eps: float, lr: float, seed: int, step: int, dirs: Directions,
                 rounding: str = "stochastic", stats: dict | None = None) -> float:
    """Exact restore, no snapshot: 3 regenerations of z, like ``step_fused``.

    pass 1: theta+ = RTN(theta + eps z); save (i, theta_i) where RTN(theta+ - eps z) != theta.
    pass 2: theta = RTN(theta+ - eps z), patched; theta- = RTN(theta - eps z); save where
            RTN(theta- + eps z) != theta.
    pass 3: theta = RTN(theta- + eps z), patched (exact); then the update theta - lr g z
            (bf16/fp16: stochastic rounding by default).
    The check in each pass runs the very arithmetic the next pass will run, so the restore is
    bit-exact by construction; only the elements whose round trip fails are stored (a few %).
    """
    s = seeds_for(views, seed, step)
    p_plus = _move_and_record(views, s, dirs, eps, -eps, None, None)
    lp = loss()
    p_minus = _move_and_record(views, s, dirs, -eps, eps, p_plus, -eps)
    if stats is not None:
        stats["patch_entries"] = max(stats.get("patch_entries", 0), p_plus.entries() + p_minus.entries())
        stats["patch_bytes"] = max(stats.get("patch_bytes", 0), p_plus.nbytes() + p_minus.nbytes())
    del p_plus
    lm = loss()
    g = (lp - lm) / (2 * eps)
    _restore_and_update(views, s, dirs, eps, p_minus, lr * g, rounding, sr_seed=step)
    return g


# -- exact-restore option for bf16 (integer domain) -------------------------------------------------
def _to_ordered(bits: torch.Tensor) -> torch.Tensor:
    """bf16 bit patterns (int16) -> int32 keys ordered like the values (sign-magnitude -> two's complement)."""
    b = bits.to(torch.int32)
    return torch.where(b < 0, -(b & 0x7FFF), b)


def _from_ordered(keys: torch.Tensor) -> torch.Tensor:
    return torch.where(keys < 0, (-keys) | -32768, keys).to(torch.int16)  # -0 never produced: keys<0 only


@torch.no_grad()
def add_ulps_(v: torch.Tensor, k: torch.Tensor) -> None:
    """v (bf16) moved by k ulps along the value order: exactly invertible (add -k), no rounding."""
    keys = _to_ordered(v.view(torch.int16)).add_(k)
    v.view(torch.int16).copy_(_from_ordered(keys))


# -- measurement helpers ------------------------------------------------------------------------------
def rss_mb(field: str = "VmRSS") -> float:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024


def reset_peak() -> float:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    Path("/proc/self/clear_refs").write_text("5")
    return rss_mb()


def timed(fn, reps: int) -> tuple[float, float, float]:
    """(median wall seconds, median process CPU seconds, extra peak MiB over the RSS before the first call)."""
    base = reset_peak()
    ts, cs = [], []
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        fn()
        ts.append(time.perf_counter() - t)
        cs.append(time.process_time() - c)
    return statistics.median(ts), statistics.median(cs), rss_mb("VmHWM") - base


def profile(args) -> dict:
    torch.set_num_threads(args.threads)
    import zotune
    from zotune.evaluate import Scorer
    from zotune.models import load_model
    from zotune.tasks import load_task
    from zotune.train import batch_indices

    model, tok, _ = load_model(args.model)
    data = load_task("rotten-tomatoes")
    batch = [data.train[i] for i in batch_indices(len(data.train), 16, 0, 0)]
    scorer = Scorer(model, tok)
    opt = zotune.ZOOptimizer(model, method="mezo", lr=1e-6, eps=1e-3, seed=0)
    views = [(n, p.data) for n, p in opt.method.params.items()]
    numel = sum(v.numel() for _, v in views)
    biggest = max(views, key=lambda x: x[1].numel())
    out = {"model": args.model, "threads": torch.get_num_threads(), "tensors": len(views), "params": numel,
           "largest": [biggest[0], list(biggest[1].shape)], "torch": torch.__version__, "reps": args.reps}
    loss = lambda: scorer.loss(batch)
    flip = [0]

    def zero() -> float:  # no forward; alternating 0 / 1e-9 so g != 0 and the update pass runs (lr*g ~ 5e-13)
        flip[0] ^= 1
        return 1e-9 * flip[0]
    loss()
    r = {}

    def record(name, fn, reps=args.reps):
        sec, cpu, extra = timed(fn, reps)
        r[name] = {"s": sec, "cpu_s": cpu, "ns_per_weight_cpu": cpu / numel * 1e9, "extra_peak_mb": extra}
        print(f"{name:52s} {sec:8.3f} s  cpu {cpu:8.3f} s  {cpu / numel * 1e9:6.2f} ns/weight  +{extra:7.1f} MiB",
              flush=True)

    record("forward", loss, max(3, args.reps))
    # -- the components, each a full pass over all 134.5M weights ----------------------------------
    seeds = seeds_for(views, 0, 0)
    record("python/seed overhead: tensor_seed+Generator x tensors",
           lambda: [torch.Generator().manual_seed(tensor_seed(QueryKey(0, 0, 0), n)) for n, _ in views])
    record("gaussian gen, per tensor (engine's gaussian_like)", lambda: [gaussian_like(v, s) for (_, v), s in zip(views, seeds)])
    for C in (1 << 16, 1 << 20, 1 << 22):
        d = Directions("gaussian", C)
        record(f"gaussian gen, chunks of 2^{int(math.log2(C))}",
               lambda d=d, C=C: [d.chunk_of(s, k, min(C, v.numel() - k * C)) for (_, v), s in zip(views, seeds)
                                 for k in range(-(-v.numel() // C))])
    dr = Directions("rademacher", 1 << 20)
    dt = Directions("gaussian-table", 1 << 20)
    record("gaussian-table gen, chunks of 2^20",
           lambda: [dt.chunk_of(s, k, min(1 << 20, v.numel() - k * (1 << 20))) for (_, v), s in zip(views, seeds)
                    for k in range(-(-v.numel() // (1 << 20)))])
    record("rademacher gen, chunks of 2^20",
           lambda: [dr.chunk_of(s, k, min(1 << 20, v.numel() - k * (1 << 20))) for (_, v), s in zip(views, seeds)
                    for k in range(-(-v.numel() // (1 << 20)))])
    buf = torch.randn(1 << 20)

    def add_pass():
        for _, v in views:
            f = v.view(-1)
            for a in range(0, f.numel(), 1 << 20):
                b = min(f.numel(), a + (1 << 20))
                f[a:b].add_(buf[: b - a], alpha=1e-12)
    record("element-wise add pass (chunked, no generation)", add_pass)
    bf = [v.to(torch.bfloat16) for _, v in views]  # a bf16 copy of the weights: the cost of writing updates into bf16

    def bf16_pass(sr: bool):
        for i, t in enumerate(bf):
            f = t.view(-1)
            for a in range(0, f.numel(), 1 << 20):
                b = min(f.numel(), a + (1 << 20))
                if sr:
                    add_stochastic_(f[a:b], buf[: b - a], block_seed(i, a), alpha=1e-6, chunk=1 << 20)
                else:
                    f[a:b].add_(buf[: b - a], alpha=1e-6)
    record("bf16 weights: round-to-nearest add pass", lambda: bf16_pass(False))
    record("bf16 weights: stochastic-rounding add pass (rounding.py)", lambda: bf16_pass(True))
    del bf
    record("snapshot clone pass (engine)", lambda: [v.clone() for _, v in views], 1)
    snap = [v.clone() for _, v in views]
    record("restore copy_ pass (engine)", lambda: [v.copy_(s) for (_, v), s in zip(views, snap)])
    record("mul_(-1).add_(snapshot, 2) pass (engine's -eps)", lambda: [v.mul_(-1).add_(s, alpha=2) for (_, v), s in zip(views, snap)])
    for (_, v), s in zip(views, snap):
        v.copy_(s)
    del snap
    # -- the non-forward part of whole steps (loss = constant): what a step adds to two forwards ----------
    k = [0]

    def nxt():
        k[0] += 1
        return k[0]
    record("engine step overhead (ZOOptimizer mezo, no forwards)", lambda: opt.step(zero))
    for name, dirs in [("fused gaussian per-tensor", Directions("gaussian", 0)),
                       ("fused gaussian chunk 2^16", Directions("gaussian", 1 << 16)),
                       ("fused gaussian chunk 2^20", Directions("gaussian", 1 << 20)),
                       ("fused gaussian chunk 2^22", Directions("gaussian", 1 << 22)),
                       ("fused gaussian-table chunk 2^20", Directions("gaussian-table", 1 << 20)),
                       ("fused rademacher chunk 2^20", Directions("rademacher", 1 << 20))]:
        record(f"{name} (no forwards)", lambda dirs=dirs: step_fused(views, zero, 1e-3, 1e-6, 0, nxt(), dirs))
    pstats: dict = {}
    for name, dirs in [("patched-exact gaussian chunk 2^16", Directions("gaussian", 1 << 16)),
                       ("patched-exact gaussian chunk 2^20", Directions("gaussian", 1 << 20)),
                       ("patched-exact rademacher chunk 2^16", Directions("rademacher", 1 << 16))]:
        record(f"{name} (no forwards)", lambda dirs=dirs: step_patched(views, zero, 1e-3, 1e-6, 0, nxt(), dirs,
                                                                          stats=pstats))
    r["patch"] = {"max_entries": pstats["patch_entries"], "max_bytes": pstats["patch_bytes"],
                  "entries_per_param": pstats["patch_entries"] / numel}
    print(f"patch: {pstats['patch_entries']:,} entries ({pstats['patch_entries'] / numel:.4f} per weight), "
          f"{pstats['patch_bytes'] / 2**20:.1f} MiB", flush=True)
    record("regen (MeZO 4-pass) gaussian chunk 2^20 (no forwards)",
           lambda: step_regen(views, zero, 1e-3, 1e-6, 0, nxt(), Directions("gaussian", 1 << 20)))
    record("fused gaussian, foreach groups of 64 (no forwards)", lambda: step_foreach(views, zero, 1e-3, 1e-6, 0, nxt()))
    small = [(n, v) for n, v in views if v.dim() == 1]
    record(f"1-D tensors only ({len(small)}): per-tensor loop, fused",
           lambda: step_fused(small, zero, 1e-3, 1e-6, 0, nxt(), Directions("gaussian", 0)))
    record(f"1-D tensors only ({len(small)}): foreach, fused", lambda: step_foreach(small, zero, 1e-3, 1e-6, 0, nxt(), 1000))
    # -- whole steps with their forwards, interleaved with two plain forwards ---------------------------
    d20, t20, r20 = (Directions(k, 1 << 20) for k in ("gaussian", "gaussian-table", "rademacher"))
    p16, pt16 = Directions("gaussian", 1 << 16), Directions("gaussian-table", 1 << 16)
    grads = []
    full = {"two forwards": lambda: (loss(), loss()),
            "engine step (ZOOptimizer mezo)": lambda: grads.extend(opt.step(loss) and opt.last.grads),
            "fused gaussian chunk 2^20 step": lambda: grads.append(step_fused(views, loss, 1e-3, 1e-6, 0, nxt(), d20)),
            "fused gaussian-table chunk 2^20 step": lambda: step_fused(views, loss, 1e-3, 1e-6, 0, nxt(), t20),
            "fused rademacher chunk 2^20 step": lambda: step_fused(views, loss, 1e-3, 1e-6, 0, nxt(), r20),
            "patched-exact gaussian chunk 2^16 step": lambda: step_patched(views, loss, 1e-3, 1e-6, 0, nxt(), p16),
            "patched-exact gaussian-table chunk 2^16 step": lambda: step_patched(views, loss, 1e-3, 1e-6, 0, nxt(), pt16)}
    samples = {n: [] for n in full}
    cpu_samples = {n: [] for n in full}
    peaks = {}
    for n, fn in full.items():  # warm + per-scheme peak
        base = reset_peak()
        fn()
        peaks[n] = rss_mb("VmHWM") - base
    for _ in range(args.full_reps):
        for n, fn in full.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            samples[n].append(time.perf_counter() - t)
            cpu_samples[n].append(time.process_time() - c)
    two = statistics.median(samples["two forwards"])
    two_cpu = statistics.median(cpu_samples["two forwards"])
    for n in full:
        med, cpu = statistics.median(samples[n]), statistics.median(cpu_samples[n])
        r[f"full: {n}"] = {"s": med, "over_two_forwards": med / two, "cpu_s": cpu, "over_two_forwards_cpu": cpu / two_cpu,
                           "extra_peak_mb": peaks[n]}
        print(f"full: {n:44s} {med:8.3f} s  x{med / two:.3f} of two forwards; cpu {cpu:8.3f} s x{cpu / two_cpu:.3f}"
              f"  +{peaks[n]:.1f} MiB", flush=True)
    out["results"] = r
    out["steady_rss_mb"] = rss_mb()
    out["g_samples"] = grads  # the measured slopes: lr*|g| is the size of a real update, for the drift comparison
    return out


def drift(args) -> dict:
    """max |theta - theta_exact| after lr-0 steps of regeneration-restore, on a subset of SmolLM2's tensors.

    No forwards are run (the restore's drift does not depend on the losses): each step is the fused
    sequence +eps z, -2eps z, +(eps - 0) z. ulps are counted at max(|w|, eps), the magnitude at which
    the perturbed value is rounded (a weight of exactly 0 would otherwise have a subnormal ulp).
    """
    torch.set_num_threads(args.threads)
    from zotune.models import load_model

    model, _, _ = load_model(args.model)
    sub = [(n, p.data.clone()) for n, p in model.named_parameters() if any(s in n for s in args.subset.split(","))]
    del model
    out = {"subset": args.subset, "tensors": [n for n, _ in sub], "params": sum(t.numel() for _, t in sub),
           "steps": args.steps, "eps": args.eps, "rows": []}
    print(f"subset: {len(sub)} tensors, {out['params']:,} params", flush=True)
    zero = lambda: 0.0
    configs = [("float32", "gaussian", "nearest"), ("float32", "rademacher", "nearest"),
               ("bfloat16", "gaussian", "nearest"), ("bfloat16", "gaussian", "stochastic"),
               ("bfloat16", "rademacher", "nearest"), ("bfloat16", "ulps", "exact"),
               ("float32", "gaussian", "patched"), ("bfloat16", "gaussian", "patched")]
    for dtype_name, kind, rounding in configs:
        dtype = getattr(torch, dtype_name)
        views = [(n, t.to(dtype).clone()) for n, t in sub]
        exact = [v.clone() for _, v in views]
        t0 = time.perf_counter()
        if kind == "ulps":  # integer-domain perturbation: +k, -2k, +k ulps with k ~ round(N(0,1)*eps/ulp-scale)
            gen = torch.Generator()
            for step in range(args.steps):
                for (name, v), sd in zip(views, seeds_for(views, 0, step)):
                    gen.manual_seed(sd)
                    k = torch.randn(v.shape, generator=gen).mul_(4).round_().to(torch.int32)
                    for c in (1, -2, 1):
                        add_ulps_(v, c * k)
        elif rounding == "patched":
            dirs, st = Directions(kind, 1 << 16), {}
            for step in range(args.steps):
                step_patched(views, zero, args.eps, 0.0, 0, step, dirs, stats=st)
        else:
            dirs = Directions(kind, 1 << 20)
            for step in range(args.steps):
                step_fused(views, zero, args.eps, 0.0, 0, step, dirs, rounding)
        sec = time.perf_counter() - t0
        diffs = torch.cat([(v.double() - e.double()).reshape(-1) for (_, v), e in zip(views, exact)])
        w = torch.cat([e.double().reshape(-1) for e in exact])
        # the spacing at max(|w|, eps): the scale at which the perturbed value theta +- eps z is rounded
        scale = w.abs().clamp(min=args.eps).to(dtype)
        spacing = (torch.nextafter(scale, torch.full_like(scale, math.inf)).double() - scale.double())
        big = w.abs() >= 1e-2
        rel = diffs[big].abs() / w[big].abs()
        row = {"dtype": dtype_name, "direction": kind, "rounding": rounding,
               "max_abs": diffs.abs().max().item(), "mean_abs": diffs.abs().mean().item(),
               "mean_signed": diffs.mean().item(),
               "mean_signed_z": (diffs.mean() / (diffs.std() / math.sqrt(diffs.numel()) + 1e-300)).item(),
               "max_ulps": (diffs.abs() / spacing).max().item(), "mean_ulps": (diffs.abs() / spacing).mean().item(),
               "max_rel_w_ge_0.01": rel.max().item(), "mean_rel_w_ge_0.01": rel.mean().item(),
               "changed_fraction": (diffs != 0).double().mean().item(),
               "rms_weight": w.pow(2).mean().sqrt().item(), "max_abs_weight": w.abs().max().item(),
               "seconds": sec}
        if rounding == "patched":
            row["patch_max_entries_per_param"] = st["patch_entries"] / out["params"]
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["profile", "drift"])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each component timing (median)")
    ap.add_argument("--full-reps", type=int, default=3, help="interleaved rounds of whole steps with forwards")
    ap.add_argument("--steps", type=int, default=1000, help="drift: lr-0 steps")
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--subset", default="layers.0.", help="drift: comma-separated substrings of tensor names")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    res = profile(args) if args.what == "profile" else drift(args)
    out = Path(args.out or f"benchmarks/results/full_weight_{args.what}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
