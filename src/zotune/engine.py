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
* **Restore is exact.** The queried values are snapshotted before the first
  perturbation and copied back afterwards, so a step with learning rate 0 leaves
  every weight bit-identical (MeZO's +eps, -2eps, +eps drifts in floating point).
  The snapshot costs the size of the queried tensors: tiny for LoRA atoms or
  coefficient matrices, one extra copy of the weights for full-parameter MeZO.
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


DIFFERENCES = ("central", "forward")  # (L+ - L-)/2eps with 2q forwards | (L+ - L0)/eps with 1+q


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


def gaussian_like(like: torch.Tensor, seed: int) -> torch.Tensor:
    """A standard-normal tensor shaped like ``like``, from a private generator."""
    gen = torch.Generator(device=like.device).manual_seed(seed)
    return torch.randn(like.shape, generator=gen, device=like.device, dtype=like.dtype)


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
                 reduce: Callable[[float], float] | None = None, difference: str = "central"):
        if eps <= 0:
            raise ZOError(f"eps must be > 0, got {eps}")
        if queries < 1:
            raise ZOError(f"queries must be >= 1, got {queries}")
        if difference not in DIFFERENCES:
            raise ZOError(f"unknown difference {difference!r}; choose one of: {', '.join(DIFFERENCES)}")
        self.method, self.optimizer = method, optimizer
        self.eps, self.queries, self.seed, self.difference = eps, queries, seed, difference
        self.reduce = reduce or (lambda x: x)
        self.step_count = 0
        self.forward_passes = 0

    def local_queries(self) -> range:
        """The queries this process evaluates: all of them, unless query-parallel."""
        return range(self.queries)

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
        snapshot = [v.detach().clone() for _, v in views]
        restore = lambda: [v.copy_(s) for (_, v), s in zip(views, snapshot)]
        results = []  # (query, g, loss at theta to first order)
        try:
            if not central and loss_0 is None:
                loss_0 = loss()  # forward differences: L(theta), shared by every query
            for q in self.local_queries():
                key = QueryKey(self.seed, step, q)
                for (name, v) in views:
                    v.add_(self.method.direction(name, v, key), alpha=self.eps)
                loss_plus = loss()
                if central:
                    for (_, v), s in zip(views, snapshot):  # theta - eps z = 2 theta - (theta + eps z)
                        v.mul_(-1).add_(s, alpha=2)
                    loss_minus = loss()
                    results.append((q, (loss_plus - loss_minus) / (2 * self.eps), (loss_plus + loss_minus) / 2))
                else:
                    results.append((q, (loss_plus - loss_0) / self.eps, loss_0))
                restore()
        except BaseException:  # a kill signal, a failing forward: never leave the weights perturbed
            restore()
            raise
        results = self.gather(results)  # checked after gathering, so every process stops alike
        if not all(math.isfinite(g) and math.isfinite(l) for _, g, l in results) or \
                (loss_0 is not None and not math.isfinite(loss_0)):
            raise FloatingPointError(f"non-finite loss at step {step}")
        grads = [g for _, g, _ in results]
        spent = self.apply(step, grads, lr, views)
        reported = loss_0 if loss_0 is not None else sum(l for *_, l in results) / len(results)
        return StepResult(step, reported, grads, spent, [QueryKey(self.seed, step, q) for q, _, _ in results])

    def apply(self, step: int, grads: list[float], lr: float, views=None) -> int:
        """The update of ``step`` from its slopes (one per query, in query order): shared by :meth:`step`
        and :meth:`replay`. Advances the counters; returns the forward passes the step cost."""
        views = self.method.views(step) if views is None else views
        keys = [QueryKey(self.seed, step, q) for q in range(len(grads))]
        self.optimizer.update(views, list(zip(keys, grads)), self.method, lr)
        spent = self.method.forward_cost(len(grads), self.difference)
        self.forward_passes += spent
        self.step_count = step + 1
        return spent

    def replay(self, rows: list[dict]) -> None:
        """Apply logged steps (``{"step", "g", "lr"}`` rows, in order) to the freshly prepared method."""
        require_replayable(self.method, rows)
        for row in rows:
            self.apply(row["step"], row["g"], row["lr"])


def require_replayable(method, rows: list[dict]) -> None:
    """Refuse to rebuild a method whose trajectory of scalars does not determine its tensors."""
    if rows and not method.replayable:
        raise ZOError(f"{method.name} runs cannot be replayed or resumed from their trajectory: "
                      f"{method.not_replayable}")
