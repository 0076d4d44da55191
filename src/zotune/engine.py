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
* **Restore: snapshot or regenerate** (``restore``, :data:`RESTORES`). ``snapshot``
  copies the queried values before the first perturbation and back afterwards,
  so a step with learning rate 0 leaves every weight bit-identical; it costs one
  copy of the queried tensors (tiny for adapters, one extra model for
  full-weight MeZO). ``regenerate`` runs MeZO's +eps, -2eps, +eps passes with
  the direction regenerated from its seed (chunk by chunk for Gaussian
  directions): no weight-sized copy, but each lr-0 step moves a float32 weight
  by a few ulps (zero-mean; docs/methods.md, "What is exact and what is not").
  ``auto`` takes the method's ``restore_default`` (regenerate for methods that
  train base weights) and falls back to snapshot where regeneration is unsafe:
  bfloat16/float16 views (the round trip drifts ~100x the updates) and
  query-parallel ranks (each rank would run other passes). With plain ZO-SGD
  (no weight decay) the last restore pass is fused into the update,
  +(eps - lr g/q) z. Replay re-runs the same passes (without forwards, fused
  alike), so replayed/resumed runs stay bit-identical.
* **A step's cost is the method's** (:meth:`Method.forward_cost`), counted here
  and nowhere else: replay, budgets and benchmarks read the same number.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .errors import ZOError
from .rounding import BLOCK, add_stochastic_, block_seed


DIFFERENCES = ("central", "forward")  # (L+ - L-)/2eps with 2q forwards | (L+ - L0)/eps with 1+q
RESTORES = ("auto", "snapshot", "regenerate")  # see the module docstring
LOW_PRECISION = (torch.bfloat16, torch.float16)
CHUNK = BLOCK  # elements per regeneration pass: a 256 KiB float32 buffer that stays in L2


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


def rademacher_chunk(seed: int, numel: int, start: int, stop: int, device, out: torch.Tensor | None = None,
                     gen: torch.Generator | None = None) -> torch.Tensor:
    """Flat elements ``[start, stop)`` of the float32 Rademacher (+1/-1, equally likely) tensor of ``numel`` elements.

    Seeded block by block exactly like :func:`gaussian_chunk` (block ``k`` from ``block_seed(seed, k)``), so
    chunks never change the values. Why Rademacher: a Gaussian costs ~2.5 ns per element in ``normal_``,
    the dominant cost of a full-weight step (benchmarks/results/full_weight_profile.md); here one 64-bit
    draw gives 8 elements (the sign bit of each byte) and the conversion is one element-wise pass (~0.85 ns).
    The only temporary is the random bits of the chunk (one byte per element).
    """
    n = stop - start
    out = torch.empty(n, dtype=torch.float32, device=device) if out is None else out[:n]
    gen = torch.Generator(device=device) if gen is None else gen
    bits = torch.empty(-(-n // 8), dtype=torch.int64, device=device)
    for k in range(start // BLOCK, -(-stop // BLOCK)):
        lo, hi = k * BLOCK, min(numel, (k + 1) * BLOCK)
        gen.manual_seed(block_seed(seed, k))
        at = (lo - start) // 8  # lo - start is a multiple of BLOCK, hence of 8
        bits[at:at + -(-(hi - lo) // 8)].random_(-(1 << 63), None, generator=gen)  # all 64 bits
    b = bits.view(torch.int8)[:n].bitwise_or_(1)  # odd, never 0: its sign is the byte's top bit
    return out.copy_(b).sign_()


DIRECTIONS = {"gaussian": gaussian_chunk, "rademacher": rademacher_chunk}  # distribution -> block-seeded chunk


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
                          chunk: int = CHUNK, distribution: str = "gaussian") -> torch.Tensor:
    """``v += alpha * direction_like(v, seed, distribution)`` chunk by chunk: no temporary beyond one chunk.

    With ``sr_seed`` and a bfloat16/float16 ``v`` the sum is stochastically rounded
    (:func:`~zotune.rounding.add_stochastic_`, seeded by ``sr_seed``); otherwise it is rounded
    to nearest like ``add_``, with z rounded to ``v``'s dtype first (as ``direction_like`` gives it).
    """
    make = direction_chunk(distribution)
    n = v.numel()
    gen = torch.Generator(device=v.device)
    if sr_seed is not None and v.dtype in LOW_PRECISION:
        return add_stochastic_(v, lambda a, b: make(seed, n, a, b, v.device, gen=gen), sr_seed,
                               alpha=alpha, chunk=16 * BLOCK)
    if not v.is_contiguous():
        return v.add_(direction_like(v, seed, distribution), alpha=alpha)
    flat, chunk = v.view(-1), -(-chunk // BLOCK) * BLOCK
    buf = torch.empty(min(n, chunk), dtype=torch.float32, device=v.device)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        z = make(seed, n, start, stop, v.device, out=buf, gen=gen)
        flat[start:stop].add_(z if v.dtype == torch.float32 else z.to(v.dtype), alpha=alpha)
    return v


def add_update_(v: torch.Tensor, update: torch.Tensor, alpha: float, sr_seed: int | None = None) -> torch.Tensor:
    """``v += alpha * update``: stochastically rounded (seeded by ``sr_seed``) into a bfloat16/float16 ``v``."""
    if sr_seed is not None and v.dtype in LOW_PRECISION:
        return add_stochastic_(v, update, sr_seed, alpha=alpha)
    return v.add_(update.to(v.dtype), alpha=alpha)


def update_seed(key: QueryKey, name: str) -> int:
    """The stochastic-rounding seed of the update written into ``name`` for (run seed, step, query)."""
    return tensor_seed(key, name, "sr-update")


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

    def local_queries(self) -> range:
        """The queries this process evaluates: all of them, unless query-parallel."""
        return range(self.queries)

    def restore_mode(self, views) -> str:
        """How this step restores the queried ``views``: ``snapshot`` or ``regenerate`` (``auto`` resolved)."""
        low = any(v.dtype in LOW_PRECISION for _, v in views)
        parallel = list(self.local_queries()) != list(range(self.queries))
        if self.restore == "auto":
            default = getattr(self.method, "restore_default", "snapshot")
            return "regenerate" if default == "regenerate" and not low and not parallel else "snapshot"
        if self.restore == "regenerate" and low:
            raise ZOError("restore regenerate: bfloat16/float16 weights drift ~100x the updates under a "
                          "regeneration restore; use --restore snapshot (or auto)")
        if self.restore == "regenerate" and parallel:
            raise ZOError("restore regenerate: query-parallel ranks would run different weight passes and "
                          "drift apart; use --restore snapshot (or auto)")
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
        snapshot = [v.detach().clone() for _, v in views] if self.restore_mode(views) == "snapshot" else None
        results = []  # (query, g, loss at theta to first order)
        if not central and loss_0 is None:
            loss_0 = loss()  # forward differences: L(theta), shared by every query
        local, pending = list(self.local_queries()), None
        fuse = snapshot is None and self._fused(lr)  # the last restore pass goes into the update
        for q in local:
            key = QueryKey(self.seed, step, q)
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
            if pending:  # the deferred restore pass, alone
                for name, v in views:
                    self.method.add_direction_(name, v, pending[0], pending[1])
            raise
        grads = [g for _, g, _ in results]
        spent = self.apply(step, grads, lr, views, pending=pending)
        reported = loss_0 if loss_0 is not None else sum(l for *_, l in results) / len(results)
        return StepResult(step, reported, grads, spent, [QueryKey(self.seed, step, q) for q, _, _ in results])

    def apply(self, step: int, grads: list[float], lr: float, views=None, passes: bool = False,
              pending: tuple[QueryKey, float] | None = None) -> int:
        """The update of ``step`` from its slopes (one per query, in query order): shared by :meth:`step`
        and :meth:`replay`. Advances the counters; returns the forward passes the step cost.

        ``passes``: first re-run the step's weight passes (``regenerate`` restore; replay), so the
        weights see the same float operations as in the step, without the forwards. ``pending``:
        (key, coefficient) of a restore pass the step deferred, fused by ZO-SGD into its update."""
        views = self.method.views(step) if views is None else views
        if passes and self.restore_mode(views) == "regenerate":
            fuse, n = self._fused(lr), len(grads)
            for q in range(n):
                key = QueryKey(self.seed, step, q)
                left = self._query(views, key, None, defer=fuse and q == n - 1)[2]
                pending = (key, left) if left is not None else None
        keys = [QueryKey(self.seed, step, q) for q in range(len(grads))]
        if pending:
            self.optimizer.update(views, list(zip(keys, grads)), self.method, lr, pending=pending)
        else:
            self.optimizer.update(views, list(zip(keys, grads)), self.method, lr)
        spent = self.method.forward_cost(len(grads), self.difference)
        self.forward_passes += spent
        self.step_count = step + 1
        return spent

    def replay(self, rows: list[dict]) -> None:
        """Apply logged steps (``{"step", "g", "lr"}`` rows, in order) to the freshly prepared method."""
        require_replayable(self.method, rows)
        for row in rows:
            self.apply(row["step"], row["g"], row["lr"], passes=True)


def require_replayable(method, rows: list[dict]) -> None:
    """Refuse to rebuild a method whose trajectory of scalars does not determine its tensors."""
    if rows and not method.replayable:
        raise ZOError(f"{method.name} runs cannot be replayed or resumed from their trajectory: "
                      f"{method.not_replayable}")
