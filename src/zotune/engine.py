"""The zeroth-order step, shared by every method.

One step, for each of q queries:  seed -> perturb +eps -> loss -> perturb -eps
-> loss -> restore -> g = (L+ - L-) / (2 eps).  Then the optimizer turns the q
(seed, g) pairs into an update.  With ``difference="forward"`` the step first
measures L(theta) once and each query costs one forward: g = (L+ - L0) / eps,
1 + q forwards instead of 2q (cheaper for q > 1, but its bias is O(eps), not
O(eps^2)).  What is perturbed (``Method.views``) and along
which direction (``Method.direction``) is the method's business; everything
else lives here, once.

Two properties the rest of zotune relies on:

* **Directions come from seeds.** Each tensor's direction is drawn from its own
  generator seeded by (run seed, step, query, tensor name), so a direction never
  depends on parameter order, on which other tensors are trainable or on any
  global RNG, and any step can be replayed from its seed.
* **Restore: snapshot, regenerate or patch** (``restore``, :data:`RESTORES`). ``snapshot``
  copies the queried values before the first perturbation and back afterwards,
  so a step with learning rate 0 leaves every weight bit-identical; it costs one
  copy of the queried tensors (tiny for adapters, one extra model for
  full-weight MeZO). ``regenerate`` runs MeZO's +eps, -2eps, +eps passes with
  the direction regenerated from its seed (chunk by chunk for the default
  Gaussian or Rademacher directions): no weight-sized copy, but each lr-0 step
  moves a float32 weight by a few ulps (zero-mean; docs/methods.md, "What is
  exact and what is not"). ``patch`` is exact without a copy, in any dtype: each
  pass regenerates z chunk by chunk, moves theta0 to RTN(theta0 + d z) and checks
  on the spot whether the next pass's inverse RTN(RTN(theta0 + d z) - d z) gives
  theta0 back, bit for bit; the few elements where it does not (weights small
  next to eps|z|, or pushed into the next binade) are saved as (index, value)
  and written back by that inverse (:class:`PatchedRestore`). Since the check
  runs the very arithmetic of the inverse, the restore is exact by construction;
  the largest patch measured 1.1% (Gaussian z) and 1.7% (Rademacher z) of
  SmolLM2-135M's weights at eps 1e-3 in bfloat16, 4 bytes each.
  ``auto`` takes the method's ``restore_default`` (regenerate for methods that
  train base weights): float32 views regenerate (cheapest; drift far below an
  update), bfloat16/float16 views patch (a regeneration round trip there drifts
  ~100x the updates), query-parallel ranks snapshot (each rank would run other
  passes). With plain ZO-SGD (no weight decay) the last restore pass is fused
  into the update: +(eps - lr g/q) z under regenerate; under patch (one query)
  the exact restore and the update -lr g z share one pass, stochastically
  rounded into bfloat16/float16 with the bits a separate update would use
  (the same floats as restore-then-update). Replay re-runs the same passes
  (without forwards, fused alike), so replayed/resumed runs stay bit-identical.
* **A step's cost is the method's** (:meth:`Method.forward_cost`), counted here
  and nowhere else: replay, budgets and benchmarks read the same number.
"""

from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from .errors import ZOError
from .rounding import BLOCK, add_stochastic_, block_seed, round_into_


DIFFERENCES = ("central", "forward")  # (L+ - L-)/2eps with 2q forwards | (L+ - L0)/eps with 1+q
RESTORES = ("auto", "snapshot", "regenerate", "patch")  # see the module docstring
LOW_PRECISION = (torch.bfloat16, torch.float16)
CHUNK = BLOCK  # elements per regeneration pass: a 256 KiB float32 buffer that stays in L2
assert CHUNK <= 1 << 16  # Patch keeps chunk-local indices in 16 bits


@dataclass(frozen=True)
class QueryKey:
    """Everything a direction is a function of (besides the tensor's name)."""

    seed: int
    step: int
    query: int


def tensor_seed(key: QueryKey, name: str, salt: str = "") -> int:
    """A 63-bit seed from (run seed, step, query, name): stable across runs and machines."""
    text = f"{key.seed}|{key.step}|{key.query}|{name}|{salt}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def gaussian_chunk(seed: int, numel: int, start: int, stop: int, device, out: torch.Tensor | None = None,
                   gen: torch.Generator | None = None) -> torch.Tensor:
    """Flat elements ``[start, stop)`` of the float32 standard-normal tensor of ``numel`` elements for ``seed``.

    The tensor is drawn in blocks of :data:`~zotune.rounding.BLOCK` elements, block ``k`` from its own
    generator seeded by ``block_seed(seed, k)``, so any block-aligned chunk (``start`` a multiple of BLOCK,
    ``stop`` one or ``numel``) is regenerated on its own, and the values never depend on the chunking.
    """
    n = stop - start
    out = torch.empty(n, dtype=torch.float32, device=device) if out is None else out[:n]
    gen = torch.Generator(device=device) if gen is None else gen
    for k in range(start // BLOCK, -(-stop // BLOCK)):
        lo, hi = k * BLOCK, min(numel, (k + 1) * BLOCK)
        gen.manual_seed(block_seed(seed, k))
        out[lo - start:hi - start].normal_(generator=gen)
    return out


_PLANES = torch.arange(7, -1, -1, dtype=torch.int8).view(1, 8, 1)  # plane j: bit j of each byte moved to the sign


def _signs_(bytes_: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """``planes[b, j, i]`` = +1 where bit ``j`` of ``bytes_[b, i]`` is 0, else -1 (int8): three int8 passes."""
    torch.bitwise_left_shift(bytes_.unsqueeze(1), _PLANES.to(bytes_.device), out=planes)  # bit j -> bit 7
    return planes.bitwise_right_shift_(7).bitwise_or_(1)  # arithmetic shift: 0 or -1; | 1: +1 or -1


def rademacher_chunk(seed: int, numel: int, start: int, stop: int, device, out: torch.Tensor | None = None,
                     gen: torch.Generator | None = None) -> torch.Tensor:
    """Flat elements ``[start, stop)`` of the float32 Rademacher (+1/-1, equally likely) tensor of ``numel`` elements.

    Seeded block by block exactly like :func:`gaussian_chunk` (block ``k`` from ``block_seed(seed, k)``), so
    chunks never change the values. Why Rademacher: a Gaussian costs ~2.5 ns per element in ``normal_``,
    the dominant cost of a full-weight step (benchmarks/results/full_weight_profile.md); here each element
    takes one random bit (64 per draw) and the unpacking is three vectorised int8 passes and a conversion.

    Layout: a block of L elements draws ``ceil(L / 64)`` 64-bit words, read as ``m = 8 * ceil(L / 64)``
    bytes; element ``j * m + i`` of the block is +1 where bit ``j`` of byte ``i`` is 0, else -1 (bit planes,
    so every unpacking step is a contiguous operation). Temporaries: two bytes per element of the chunk.
    """
    n = stop - start
    out = torch.empty(n, dtype=torch.float32, device=device) if out is None else out[:n]
    gen = torch.Generator(device=device) if gen is None else gen
    first, last = start // BLOCK, -(-stop // BLOCK)
    words = BLOCK // 64  # 64-bit draws per full block
    bits = torch.empty((last - first) * words, dtype=torch.int64, device=device)
    for k in range(first, last):
        gen.manual_seed(block_seed(seed, k))
        size = min(numel, (k + 1) * BLOCK) - k * BLOCK
        at = (k - first) * words
        bits[at:at + -(-size // 64)].random_(-(1 << 63), None, generator=gen)  # all 64 bits
    full = (last - first) if stop - (last - 1) * BLOCK == BLOCK else last - first - 1  # leading full blocks
    if full:
        planes = torch.empty((full, 8, words * 8), dtype=torch.int8, device=device)
        out[:full * BLOCK].copy_(_signs_(bits[:full * words].view(torch.int8).view(full, -1), planes).view(-1))
    if full < last - first:  # the tensor's last, partial block: its own byte count m
        size = stop - (last - 1) * BLOCK
        m = 8 * -(-size // 64)
        planes = torch.empty((1, 8, m), dtype=torch.int8, device=device)
        tail = bits[full * words:full * words + m // 8].view(torch.int8).view(1, -1)
        out[full * BLOCK:].copy_(_signs_(tail, planes).view(-1)[:size])
    return out


DIRECTIONS = {"gaussian": gaussian_chunk, "rademacher": rademacher_chunk}  # distribution -> block-seeded chunk

#: Elements per chunk of a regeneration pass: Gaussian chunks measured fastest at one block (``normal_``'s
#: buffer stays in L2); Rademacher's unpacking is several small vectorised ops per call, so its fixed cost
#: per chunk matters: four blocks generated faster (0.68 vs 0.75 ns per element on SmolLM2-135M's weights,
#: 1 thread, a shared machine); whole add passes measured the same within noise (1.5 vs 1.4 ns).
PASS_CHUNK = {"gaussian": CHUNK, "rademacher": 4 * BLOCK}


def direction_chunk(distribution: str) -> Callable[..., torch.Tensor]:
    """The chunk generator of a direction distribution (``gaussian``, ``rademacher``)."""
    if distribution not in DIRECTIONS:
        raise ZOError(f"unknown direction distribution {distribution!r}; choose one of: {', '.join(DIRECTIONS)}")
    return DIRECTIONS[distribution]


def gaussian_like(like: torch.Tensor, seed: int) -> torch.Tensor:
    """A standard-normal tensor shaped like ``like`` (in its dtype): :func:`gaussian_chunk` over all of it."""
    return direction_like(like, seed, "gaussian")


def direction_like(like: torch.Tensor, seed: int, distribution: str = "gaussian") -> torch.Tensor:
    """A direction of ``distribution`` shaped like ``like`` (in its dtype): its chunk generator over all of it."""
    n = like.numel()
    return direction_chunk(distribution)(seed, n, 0, n, like.device).view(like.shape).to(like.dtype)


def add_gaussian_(v: torch.Tensor, seed: int, alpha: float, sr_seed: int | None = None,
                  chunk: int = CHUNK) -> torch.Tensor:
    """``v += alpha * gaussian_like(v, seed)`` chunk by chunk: :func:`add_direction_chunks_` for Gaussians."""
    return add_direction_chunks_(v, seed, alpha, sr_seed, chunk, "gaussian")


def add_direction_chunks_(v: torch.Tensor, seed: int, alpha: float, sr_seed: int | None = None,
                          chunk: int | None = None, distribution: str = "gaussian") -> torch.Tensor:
    """``v += alpha * direction_like(v, seed, distribution)`` chunk by chunk: no temporary beyond one chunk.

    With ``sr_seed`` and a bfloat16/float16 ``v`` the sum is stochastically rounded
    (:func:`~zotune.rounding.add_stochastic_`, seeded by ``sr_seed``); otherwise it is rounded
    to nearest like ``add_``, with z rounded to ``v``'s dtype first (as ``direction_like`` gives it).
    ``chunk`` (default :data:`PASS_CHUNK` of the distribution) changes the speed, never the values.
    """
    make = direction_chunk(distribution)
    n = v.numel()
    if not v.is_contiguous() and not (sr_seed is not None and v.dtype in LOW_PRECISION):
        return v.add_(direction_like(v, seed, distribution), alpha=alpha)
    gen = torch.Generator(device=v.device)
    chunk = -(-(PASS_CHUNK[distribution] if chunk is None else chunk) // BLOCK) * BLOCK
    buf = torch.empty(min(n, chunk), dtype=torch.float32, device=v.device)  # reused by the round-to-nearest passes
    return add_chunks_(v, lambda a, b: make(seed, n, a, b, v.device, out=buf if b - a <= buf.numel() else None,
                                            gen=gen), alpha, sr_seed, chunk)


def add_chunks_(v: torch.Tensor, z_of: Callable[[int, int], torch.Tensor], alpha: float,
                sr_seed: int | None = None, chunk: int = CHUNK) -> torch.Tensor:
    """``v += alpha * z`` where ``z_of(a, b)`` gives flat elements ``[a, b)`` of z (float32): every chunked
    weight pass (regenerated directions, low-rank bands) goes through this one loop.

    With ``sr_seed`` and a bfloat16/float16 ``v`` the sum is stochastically rounded (seeded by ``sr_seed``,
    in passes of 16 blocks); otherwise ``v`` (contiguous) gets z rounded to its dtype and added, ``chunk``
    elements at a time.
    """
    if sr_seed is not None and v.dtype in LOW_PRECISION:
        return add_stochastic_(v, z_of, sr_seed, alpha=alpha, chunk=16 * BLOCK)
    flat, n = v.view(-1), v.numel()
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        z = z_of(start, stop)
        flat[start:stop].add_(z if z.dtype == v.dtype else z.to(v.dtype), alpha=alpha)
    return v


def add_update_(v: torch.Tensor, update: torch.Tensor, alpha: float, sr_seed: int | None = None) -> torch.Tensor:
    """``v += alpha * update``: stochastically rounded (seeded by ``sr_seed``) into a bfloat16/float16 ``v``."""
    if sr_seed is not None and v.dtype in LOW_PRECISION:
        return add_stochastic_(v, update, sr_seed, alpha=alpha)
    return v.add_(update.to(v.dtype), alpha=alpha)


def update_seed(key: QueryKey, name: str) -> int:
    """The stochastic-rounding seed of the update written into ``name`` for (run seed, step, query)."""
    return tensor_seed(key, name, "sr-update")


_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
         torch.float64: torch.int64}


def _axpy(x: torch.Tensor, z: torch.Tensor, alpha: float) -> torch.Tensor:
    """RTN(x + alpha z) in ``x``'s dtype, into a new tensor, with z rounded to that dtype first (as the
    regenerate passes add it). Every move, check and restore of the patched restore goes through this one
    function on the same chunks, so a check computes bit for bit what the later inverse will compute."""
    return torch.add(x, z if z.dtype == x.dtype else z.to(x.dtype), alpha=alpha)


def _differ(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Flat indices where ``x`` and ``y`` (same shape and dtype) differ bit for bit (so -0.0 vs +0.0 and NaN
    payloads count): int64. Why not ``(x != y).nonzero()``: torch's bool kernels and ``nonzero`` cost ~1.4 ns
    per element on CPU, a third of a patched pass; an integer subtraction (zero where the bits agree) read
    as 64-bit words finds the few differing words at a quarter of the elements' count."""
    ints = _BITS[x.dtype]
    d = x.view(ints) - y.view(ints)
    per = 8 // d.element_size()
    if d.numel() % per:  # a tensor's ragged last chunk: the plain way
        return d.nonzero().view(-1)
    words = d.view(torch.int64).nonzero().view(-1)
    if not words.numel():
        return words
    cand = (words.unsqueeze(1) * per + torch.arange(per, device=d.device)).view(-1)
    return cand[d[cand] != 0]


class Patch:
    """The elements whose round trip a patched restore would get wrong, saved exactly.

    Keyed by (view index, chunk start): the chunk-local indices and the exact values. A chunk has at most
    2^16 elements, so an index is kept in 16 bits (int16, read back modulo 2^16): 4 bytes per bfloat16
    entry. Only the failing elements are kept: a weight much smaller than eps|z|, or one whose perturbed
    value crossed a binade upwards (a coarser grid: half of those round trips fail).
    """

    def __init__(self) -> None:
        self.entries: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.numel = self.nbytes = 0  # kept as entries come and go (a sum per chunk would be quadratic)

    def record(self, i: int, start: int, idx: torch.Tensor, values: torch.Tensor) -> None:
        self.entries[(i, start)] = (idx.to(torch.int16), values)  # wraps above 2^15; undone in apply_
        self.numel += idx.numel()
        self.nbytes += idx.numel() * (2 + values.element_size())

    def apply_(self, i: int, start: int, theta: torch.Tensor) -> None:
        """Patch chunk (i, start) of ``theta`` and forget it: a move frees the old patch as it builds the new
        one, so the two together never hold much more than the larger of them."""
        hit = self.entries.pop((i, start), None)
        if hit is not None:
            theta[hit[0].long().bitwise_and_(0xFFFF)] = hit[1]
            self.numel -= hit[0].numel()
            self.nbytes -= hit[0].numel() * (2 + hit[1].element_size())


class PatchedRestore:
    """The weight passes of one query under the ``patch`` restore: exact, with no weight-sized copy.

    The weights are at ``theta0 + offset * z`` rounded, and ``patch`` holds the elements where
    ``RTN(current - offset * z)`` is not ``theta0``. :meth:`move` goes to another offset (0: restore),
    recording the new patch; each chunk's check runs the very arithmetic the next move will run, so the
    restore returns ``theta0`` bit for bit in any dtype. :meth:`finish` restores, optionally with plain
    ZO-SGD's update fused into the same pass (stochastically rounded into bfloat16/float16 exactly as
    :meth:`Method.add_direction_` with the same ``sr_seed`` would: one formula, the same random bits).
    """

    def __init__(self, engine: "ZOEngine", views, key: QueryKey):
        self.engine, self.views, self.key = engine, views, key
        self.offset, self.patch = 0.0, Patch()

    def move(self, to: float, update: float = 0.0) -> None:
        """Weights to ``theta0 + to * z`` (rounded); with ``to == 0`` and ``update``, to SR(theta0 + update * z)."""
        method, cur, new_patch = self.engine.method, self.offset, Patch()
        gen, stats = None, self.engine.patch_stats
        for i, (name, v) in enumerate(self.views):
            flat, n = v.view(-1), v.numel()
            z_of = method.direction_chunks(name, v, self.key)
            for a in range(0, n, CHUNK):
                b = min(n, a + CHUNK)
                z, part = z_of(a, b), flat[a:b]
                zv = z if z.dtype == v.dtype else z.to(v.dtype)  # z as the passes add it, converted once
                if cur:
                    theta0 = _axpy(part, zv, -cur)
                    self.patch.apply_(i, a, theta0)
                else:
                    theta0 = part  # exact already; read before it is overwritten
                if to:
                    moved = _axpy(theta0, zv, to)
                    bad = _differ(_axpy(moved, zv, -to), theta0)  # where the next pass's inverse would miss
                    if bad.numel():
                        new_patch.record(i, a, bad, theta0[bad])  # indexing copies
                    part.copy_(moved)
                elif update and v.dtype in LOW_PRECISION:
                    x = theta0.to(torch.float32)
                    x.add_(z.to(torch.float32), alpha=update)
                    gen = torch.Generator(device=v.device) if gen is None else gen
                    round_into_(part, x, update_seed(self.key, name), a, gen)
                elif update:  # float32: the add of add_direction_ (theta0 is ``part`` itself when cur == 0)
                    theta0.add_(zv, alpha=update)
                    if cur:
                        part.copy_(theta0)
                elif cur:
                    part.copy_(theta0)
                held = new_patch.nbytes + self.patch.nbytes  # the old patch shrinks as the new one grows
                if held > stats.get("peak_bytes", 0):
                    stats["peak_bytes"], stats["peak_entries"] = held, new_patch.numel + self.patch.numel
        self.offset, self.patch = to, new_patch

    def finish(self, update: float = 0.0) -> None:
        """The restore pass (``update``: plain ZO-SGD's coefficient of z, fused into it)."""
        self.move(0.0, update)


@dataclass
class StepResult:
    """What one ZO step saw: losses at +eps/-eps per query and their slopes g."""

    step: int
    loss: float  # mean of (L+ + L-)/2 over queries: the loss at theta, to first order
    grads: list[float]
    forward_passes: int
    keys: list[QueryKey] = field(default_factory=list)


class ZOEngine:
    """Runs ZO steps for one method and one optimizer.

    :meth:`step` is the one perturb/evaluate/restore loop of zotune; a method
    that needs an unperturbed forward first (AGZO's activation bases) gets it
    through :meth:`Method.begin_step`, not through a copy of the loop.
    :meth:`replay` re-applies logged steps through the same update path
    (:meth:`apply`), so a replayed run does the same float operations.

    Three hooks let :mod:`zotune.distributed` spread a step over processes while
    only scalars cross the wire; on one process they do nothing:

    * ``reduce`` maps a local loss to the global one (data-parallel: the mean
      over every rank's shard of the batch);
    * :meth:`local_queries` names the queries this process evaluates;
    * :meth:`gather` turns this process's (query, g, loss) triples into every
      process's, in query order (query-parallel).
    """

    def __init__(self, method, optimizer, eps: float, queries: int = 1, seed: int = 0,
                 reduce: Callable[[float], float] | None = None, difference: str = "central",
                 restore: str = "auto"):
        if eps <= 0:
            raise ZOError(f"eps must be > 0, got {eps}")
        if queries < 1:
            raise ZOError(f"queries must be >= 1, got {queries}")
        if difference not in DIFFERENCES:
            raise ZOError(f"unknown difference {difference!r}; choose one of: {', '.join(DIFFERENCES)}")
        if restore not in RESTORES:
            raise ZOError(f"unknown restore {restore!r}; choose one of: {', '.join(RESTORES)}")
        self.restore = restore
        self.method, self.optimizer = method, optimizer
        self.eps, self.queries, self.seed, self.difference = eps, queries, seed, difference
        self.reduce = reduce or (lambda x: x)
        self.step_count = 0
        self.forward_passes = 0
        #: ``patch`` restore: the largest patch held at once (elements, bytes) since this engine was built.
        self.patch_stats: dict[str, int] = {}

    def local_queries(self) -> range:
        """The queries this process evaluates: all of them, unless query-parallel."""
        return range(self.queries)

    def restore_mode(self, views) -> str:
        """How this step restores the queried ``views``: ``snapshot``, ``regenerate`` or ``patch`` (``auto``
        resolved: see the module docstring)."""
        low = any(v.dtype in LOW_PRECISION for _, v in views)
        parallel = list(self.local_queries()) != list(range(self.queries))
        flat = all(v.is_contiguous() for _, v in views)
        if self.restore == "auto":
            if getattr(self.method, "restore_default", "snapshot") != "regenerate" or parallel:
                return "snapshot"
            return "regenerate" if not low else "patch" if flat else "snapshot"
        if self.restore in ("regenerate", "patch") and parallel:
            raise ZOError(f"restore {self.restore}: query-parallel ranks would run different weight passes and "
                          "drift apart; use --restore snapshot (or auto)")
        if self.restore == "regenerate" and low:
            raise ZOError("restore regenerate: bfloat16/float16 weights drift ~100x the updates under a "
                          "regeneration restore; use --restore patch (exact, no copy), snapshot or auto")
        if self.restore == "patch" and not flat:
            raise ZOError("restore patch walks each queried tensor as one flat block; this method queries "
                          "strided views: use --restore snapshot (or auto)")
        return self.restore

    def _query(self, views, key: QueryKey, snapshot: list[torch.Tensor] | None,
               loss: Callable[[], float] | None = None, defer: bool = False):
        """One query's weight passes, with its forwards between them: (L+, L-, left) (L- None for forward
        differences). ``snapshot`` None: regenerate (+eps z, -2eps z, +eps z, z from its seed); else
        reflect and copy back. ``loss`` None: the passes only (replay: the same float operations).
        ``defer`` (regenerate): skip the last pass and return its coefficient ``left`` (+eps, or -eps for
        forward differences), for ZO-SGD to fuse it with the update (+(eps - lr g) z, one pass less)."""
        applied = [0.0] * len(views)  # regenerate: each view's current offset along z

        def shift(alpha: float) -> None:
            for i, (name, v) in enumerate(views):
                self.method.add_direction_(name, v, key, alpha)
                applied[i] += alpha

        def restore() -> None:
            if snapshot is not None:
                for (_, v), s in zip(views, snapshot):
                    v.copy_(s)
            else:
                for (name, v), a in zip(views, applied):
                    if a:
                        self.method.add_direction_(name, v, key, -a)

        plus = minus = None
        try:
            shift(self.eps)
            plus = loss() if loss else None
            if self.difference == "central":
                if snapshot is None:
                    shift(-2 * self.eps)
                else:
                    for (_, v), s in zip(views, snapshot):  # theta - eps z = 2 theta - (theta + eps z)
                        v.mul_(-1).add_(s, alpha=2)
                minus = loss() if loss else None
        except BaseException:  # a kill signal, a failing forward: never leave the weights perturbed
            restore()
            raise
        if defer and snapshot is None:
            return plus, minus, -applied[0]
        restore()
        return plus, minus, None

    def _query_patched(self, views, key: QueryKey, loss: Callable[[], float] | None = None, defer: bool = False):
        """:meth:`_query` for the ``patch`` restore: (L+, L-, pending). The same +eps, -eps offsets, through
        :class:`PatchedRestore`, and an exact restore; ``defer``: return the :class:`PatchedRestore` instead of
        restoring, for :meth:`apply` to fuse plain ZO-SGD's update into the restore pass."""
        passes = PatchedRestore(self, views, key)
        plus = minus = None
        try:
            passes.move(self.eps)
            plus = loss() if loss else None
            if self.difference == "central":
                passes.move(-self.eps)
                minus = loss() if loss else None
        except BaseException:  # a kill signal, a failing forward: never leave the weights perturbed
            passes.finish()
            raise
        if defer:
            return plus, minus, passes
        passes.finish()
        return plus, minus, None

    def _fused(self, lr: float) -> bool:
        """Whether the optimizer takes the last query's restore pass fused into its update (plain ZO-SGD)."""
        fusable = getattr(self.optimizer, "fusable", None)
        return bool(fusable and fusable(lr))

    def gather(self, results: list[tuple[int, float, float]]) -> list[tuple[int, float, float]]:
        """Every process's (query, g, loss) triples in query order: on one process, its own."""
        return results

    @torch.no_grad()
    def step(self, loss_fn: Callable[[], float | torch.Tensor], lr: float) -> StepResult:
        step = self.step_count
        loss = lambda: float(self.reduce(float(loss_fn())))
        central = self.difference == "central"
        loss_0 = self.method.begin_step(QueryKey(self.seed, step, 0), loss)  # AGZO: bases + L(theta)
        views = self.method.views(step)  # [(name, tensor or view)] queried this step
        mode = self.restore_mode(views)
        snapshot = [v.detach().clone() for _, v in views] if mode == "snapshot" else None
        results = []  # (query, g, loss at theta to first order)
        if not central and loss_0 is None:
            loss_0 = loss()  # forward differences: L(theta), shared by every query
        local, pending = list(self.local_queries()), None
        fuse = self._fuses(mode, lr)  # the last restore pass goes into the update
        for q in local:
            key = QueryKey(self.seed, step, q)
            if mode == "patch":
                loss_plus, loss_minus, pending = self._query_patched(views, key, loss, defer=fuse)
            else:
                loss_plus, loss_minus, left = self._query(views, key, snapshot, loss, defer=fuse and q == local[-1])
                pending = (key, left) if left is not None else None
            if central:
                results.append((q, (loss_plus - loss_minus) / (2 * self.eps), (loss_plus + loss_minus) / 2))
            else:
                results.append((q, (loss_plus - loss_0) / self.eps, loss_0))
        del snapshot
        try:
            results = self.gather(results)  # checked after gathering, so every process stops alike
            if not all(math.isfinite(g) and math.isfinite(l) for _, g, l in results) or \
                    (loss_0 is not None and not math.isfinite(loss_0)):
                raise FloatingPointError(f"non-finite loss at step {step}")
        except BaseException:
            if isinstance(pending, PatchedRestore):
                pending.finish()
            elif pending:  # the deferred restore pass, alone
                for name, v in views:
                    self.method.add_direction_(name, v, pending[0], pending[1])
            raise
        grads = [g for _, g, _ in results]
        spent = self.apply(step, grads, lr, views, pending=pending)
        reported = loss_0 if loss_0 is not None else sum(l for *_, l in results) / len(results)
        return StepResult(step, reported, grads, spent, [QueryKey(self.seed, step, q) for q, _, _ in results])

    def _fuses(self, mode: str, lr: float) -> bool:
        """Whether a step under ``mode`` defers its last restore pass into the update. ``patch``: only with a
        single query, since its restore must run before any other update touches the weights (so the fused
        pass is the whole update); ``regenerate``: the last query's; ``snapshot``: never."""
        if mode == "patch":
            return self.queries == 1 and self._fused(lr)
        return mode == "regenerate" and self._fused(lr)

    def apply(self, step: int, grads: list[float], lr: float, views=None, passes: bool = False,
              pending: "tuple[QueryKey, float] | PatchedRestore | None" = None) -> int:
        """The update of ``step`` from its slopes (one per query, in query order): shared by :meth:`step`
        and :meth:`replay`. Advances the counters; returns the forward passes the step cost.

        ``passes``: first re-run the step's weight passes (``regenerate`` restore; replay), so the
        weights see the same float operations as in the step, without the forwards. ``pending``:
        (key, coefficient) of a restore pass the step deferred, fused by ZO-SGD into its update."""
        views = self.method.views(step) if views is None else views
        mode = self.restore_mode(views) if passes else None
        if mode in ("regenerate", "patch"):
            fuse, n = self._fuses(mode, lr), len(grads)
            for q in range(n):
                key = QueryKey(self.seed, step, q)
                if mode == "patch":
                    pending = self._query_patched(views, key, None, defer=fuse)[2]
                else:
                    left = self._query(views, key, None, defer=fuse and q == n - 1)[2]
                    pending = (key, left) if left is not None else None
        keys = [QueryKey(self.seed, step, q) for q in range(len(grads))]
        if isinstance(pending, PatchedRestore):  # one query, plain ZO-SGD: the update is the restore's pass
            pending.finish(self.optimizer.coefficient(lr, grads[0], 1))
        elif pending:
            self.optimizer.update(views, list(zip(keys, grads)), self.method, lr, pending=pending)
        else:
            self.optimizer.update(views, list(zip(keys, grads)), self.method, lr)
        spent = self.method.forward_cost(len(grads), self.difference)
        self.forward_passes += spent
        self.step_count = step + 1
        return spent

    def replay(self, rows: list[dict], on_step: Callable[[], object] | None = None) -> None:
        """Apply logged steps (``{"step", "g", "lr"}`` rows, in order) to the freshly prepared method;
        ``on_step`` after each (a progress bar: a full-weight method's replay regenerates every step's
        perturbation of every weight, minutes for a few hundred steps)."""
        require_replayable(self.method, rows)
        for row in rows:
            self.apply(row["step"], row["g"], row["lr"], passes=True)
            if on_step is not None:
                on_step()


def require_replayable(method, rows: list[dict]) -> None:
    """Refuse to rebuild a method whose trajectory of scalars does not determine its tensors."""
    if rows and not method.replayable:
        raise ZOError(f"{method.name} runs cannot be replayed or resumed from their trajectory: "
                      f"{method.not_replayable}")


def engine_state(engine, params: bool = True) -> dict:
    """What continues an engine exactly without its trajectory: the step, the forward passes, the
    seed, the optimizer's and the method's state and (``params``) the trainable tensors' values.

    The one resume path of the methods a trajectory cannot rebuild (``replayable = False``):
    ``zotune train`` keeps it in the run directory (``RunDir.save_state``), ``ZOOptimizer.state_dict``
    hands it to the caller. ``engine``: a :class:`ZOEngine` or any engine with the same attributes.
    """
    state = {"step": engine.step_count, "forward_passes": engine.forward_passes, "seed": engine.seed,
             # a copy: torch's optimizers (fo-lora's AdamW) hand out their live moment tensors, which the
             # next step would change under a state the caller meant to keep
             "optimizer": copy.deepcopy(engine.optimizer.state_dict()),
             "method_state": engine.method.state_dict()}
    if params:
        state["params"] = {n: p.detach().clone() for n, p in engine.method.params.items()}
    return state


def load_engine_state(engine, state: Mapping, where: str = "state") -> None:
    """Set an engine built from the same config back to an :func:`engine_state` (``where`` names it in errors)."""
    if int(state["seed"]) != engine.seed:  # the seed also shaped prepare() (AR1's atom offsets, ...)
        raise ZOError(f"{where} was saved with seed {state['seed']}; this run has seed {engine.seed}")
    if "params" in state:
        saved, ours = state["params"], engine.method.params
        if set(saved) != set(ours):
            missing, extra = sorted(set(ours) - set(saved)), sorted(set(saved) - set(ours))
            raise ZOError(f"{where}: trainable tensors differ: missing {missing[:3]}, unexpected {extra[:3]}")
        with torch.no_grad():
            for n, p in ours.items():
                if saved[n].shape != p.shape:
                    raise ZOError(f"{where}: {n} has shape {tuple(saved[n].shape)}, the model's {tuple(p.shape)}")
                p.copy_(saved[n])
    engine.step_count = int(state["step"])
    engine.forward_passes = int(state["forward_passes"])
    engine.optimizer.load_state_dict(copy.deepcopy(state.get("optimizer", {})))
    engine.method.load_state_dict(state.get("method_state", {}))
