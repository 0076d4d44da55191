"""Turning (seed, g) pairs into updates: ZO-SGD, momentum, Adam.

An update receives the views the step queried, the q (key, g) pairs and the
method (which regenerates each direction z from its key).  The estimate is
ĝ = (1/q) Σ g_i z_i.  ZO-SGD never materializes ĝ: it adds each g_i z_i in
place, so full-parameter MeZO needs no gradient-sized buffer.  Momentum and Adam
keep state per queried view (keyed by the view's name), i.e. in the trainable
space of the method: a LoRA factor, an atom, a coefficient matrix. That is what
makes them affordable for the small query spaces and not for full-parameter MeZO.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .engine import LOW_PRECISION, QueryKey, add_update_, update_seed
from .errors import ZOError


class ZOSGD:
    """θ ← θ − lr·(ĝ + λθ), λ applied only where the method says (not bias/norm)."""

    def __init__(self, weight_decay: float = 0.0):
        self.weight_decay = weight_decay

    def _decay(self, name: str, v: torch.Tensor, method, lr: float) -> None:
        if self.weight_decay and method.decays(name):
            v.mul_(1 - lr * self.weight_decay)

    def fusable(self, lr: float) -> bool:
        """Whether :meth:`update` can take a pending restore pass (``pending``): plain ZO-SGD, no decay."""
        return type(self) is ZOSGD and not (self.weight_decay and lr)

    def update(self, views, estimates: Sequence[tuple[QueryKey, float]], method, lr: float,
               pending: tuple[QueryKey, float] | None = None) -> None:
        """``pending`` = (key, c): the engine deferred the restore pass +c·z(key) (regenerate restore);
        it is fused into this key's update term: one pass +(c − lr·g/q)·z instead of two."""
        q = len(estimates)
        for name, v in views:
            self._decay(name, v, method, lr)
            for key, g in estimates:
                alpha = self.coefficient(lr, g, q)
                if pending is not None and key == pending[0]:
                    alpha = pending[1] + alpha if alpha else pending[1]
                if alpha:
                    # bf16/fp16 weights: stochastic rounding seeded by (run seed, step, query, name)
                    method.add_direction_(name, v, key, alpha, update_seed(key, name))

    @staticmethod
    def coefficient(lr: float, g: float, q: int) -> float:
        """The coefficient of z(key) in plain ZO-SGD's update, -lr·g/q: one formula for :meth:`update` and for
        the engine's patched restore, which fuses it into its last pass (so both write the same floats).
        Exactly 0.0 for lr = 0 or g = 0 (no -0.0 sign flips)."""
        return -lr * g / q if lr * g != 0 else 0.0

    def estimate(self, name: str, v: torch.Tensor, estimates, method) -> torch.Tensor:
        """ĝ for one view: (1/q) Σ g_i z_i."""
        out = torch.zeros_like(v)
        for key, g in estimates:
            out.add_(method.direction(name, v, key), alpha=g / len(estimates))
        return out

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class ZOMomentum(ZOSGD):
    """Heavy-ball momentum on ĝ: m ← βm + ĝ; θ ← θ − lr·(m + λθ)."""

    def __init__(self, weight_decay: float = 0.0, momentum: float = 0.9):
        super().__init__(weight_decay)
        self.momentum = momentum
        self.buf: dict[str, torch.Tensor] = {}

    def update(self, views, estimates, method, lr: float) -> None:
        for name, v in views:
            ghat = self.estimate(name, v, estimates, method)
            m = self.buf.get(name)
            m = ghat if m is None else m.mul_(self.momentum).add_(ghat)
            self.buf[name] = m
            self._decay(name, v, method, lr)
            add_update_(v, m, -lr, update_seed(estimates[0][0], name))

    def state_dict(self) -> dict:
        return {"buf": {k: t.clone() for k, t in self.buf.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.buf = {k: t.clone() for k, t in state.get("buf", {}).items()}


class ZOAdam(ZOSGD):
    """Adam on ĝ with decoupled weight decay; state per queried view.

    Bias correction counts the updates each view received, so a view queried
    every r steps (an AR1 atom) is corrected by its own count, not the global step.
    """

    def __init__(self, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), adam_eps: float = 1e-8):
        super().__init__(weight_decay)
        self.betas, self.adam_eps = betas, adam_eps
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}
        self.t: dict[str, int] = {}

    def update(self, views, estimates, method, lr: float) -> None:
        b1, b2 = self.betas
        for name, p in views:
            ghat = self.estimate(name, p, estimates, method)
            m = self.m.setdefault(name, torch.zeros_like(p))
            v = self.v.setdefault(name, torch.zeros_like(p))
            t = self.t[name] = self.t.get(name, 0) + 1
            m.mul_(b1).add_(ghat, alpha=1 - b1)
            v.mul_(b2).addcmul_(ghat, ghat, value=1 - b2)
            denom = (v / (1 - b2 ** t)).sqrt_().add_(self.adam_eps)
            self._decay(name, p, method, lr)
            if p.dtype in LOW_PRECISION:  # bf16/fp16 base tensors: the update stochastically rounded
                add_update_(p, m / denom, -lr / (1 - b1 ** t), update_seed(estimates[0][0], name))
            else:
                p.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))

    def state_dict(self) -> dict:
        return {"m": {k: t.clone() for k, t in self.m.items()},
                "v": {k: t.clone() for k, t in self.v.items()}, "t": dict(self.t)}

    def load_state_dict(self, state: dict) -> None:
        self.m = {k: t.clone() for k, t in state.get("m", {}).items()}
        self.v = {k: t.clone() for k, t in state.get("v", {}).items()}
        self.t = dict(state.get("t", {}))


OPTIMIZERS = {"sgd": ZOSGD, "momentum": ZOMomentum, "adam": ZOAdam}


def make_optimizer(name: str, weight_decay: float = 0.0, momentum: float = 0.9,
                   betas: tuple[float, float] = (0.9, 0.999)):
    """Build a ZO optimizer by name ('sgd', 'momentum', 'adam')."""
    if name == "sgd":
        return ZOSGD(weight_decay)
    if name == "momentum":
        return ZOMomentum(weight_decay, momentum)
    if name == "adam":
        return ZOAdam(weight_decay, tuple(betas))
    raise ZOError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")


LR_SCHEDULES = ("constant", "linear", "cosine")


def lr_at(lr: float, step: int, steps: int, schedule: str = "constant", warmup_steps: int = 0) -> float:
    """The lr of step ``step`` (0-based) of a ``steps``-step run.

    Why a schedule at all: at a constant lr, ZO runs of the LoRA family often peak and then collapse
    (docs/benchmarks.md, regime study): the estimate's variance does not shrink as the loss does, so
    a step size that helps early overshoots late. linear and cosine decay to 0 at the end; a warmup
    rises from lr/warmup_steps to lr first. A pure function of the step: resume and replay are exact.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    t = (step - warmup_steps) / max(1, steps - warmup_steps)  # 0 at the first step after warmup, < 1 at the last
    if schedule == "linear":
        return lr * (1.0 - t)
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * t))
    raise ZOError(f"unknown lr schedule {schedule!r}; choose from: {', '.join(LR_SCHEDULES)}")
