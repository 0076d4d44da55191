"""LOZO (Chen et al., ICLR 2025): low-rank U·Vᵀ perturbations of every 2-D weight; LOZO-M adds factor momentum.

The trainable tensors are MeZO's (all parameters, or those whose name contains
one of ``--target-modules``). For a 2-D weight of shape m×n the direction is

    z = U·Vᵀ / √r,   U ∈ R^{m×r} fresh every step (and query),
                     V ∈ R^{n×r} redrawn every ν steps (``--lozo-nu``),

with r = ``--lozo-rank``; 1-D tensors (biases, norms) get a plain Gaussian.

**Normalization.** The paper perturbs by ε·U·Vᵀ and estimates the gradient as
c·U·Vᵀ/r, with c = (L+ − L−)/(2ε), which is unbiased (E[⟨G, UVᵀ⟩ UVᵀ] = r·G).
zotune's engine uses one direction for both the perturbation and the update, so
we fold the 1/r into the direction as 1/√r twice: the slope along z is
g = c/√r and the SGD update g·z = c·U·Vᵀ/r is exactly the paper's estimator.
The only difference is that the perturbation radius is ε/√r times ‖UVᵀ‖; in
exchange E‖z‖² = m·n, the same as MeZO's Gaussian, so ε and lr mean the same
thing as for ``mezo`` (the public LOZO code drops the 1/r: its lr is ours / r).

**Seeds.** A direction is a pure function of (name, QueryKey): U from (run
seed, step, query, name), V from (run seed, ⌊step/ν⌋, name), i.e.
``tensor_seed(QueryKey(seed, epoch, 0), name, "lozo-V")``. The optimizer
regenerates exactly the U and V of the perturbation, including on steps where V
is redrawn (the public code draws a different U for the update on those steps,
because it pulls U and the new V from one global RNG stream in a different
order; a test here checks the update against −lr·g·UVᵀ/√r recomputed from seeds).

**LOZO-M** keeps momentum in the m×r factor space. With V fixed over an epoch
every estimate is (coefficients)·Vᵀ, so the momentum is N·Vᵀ/√r with
N ← β·N + (1−β)·(1/q)·Σ_i g_i·U_i (the paper's EMA form, N₀ = 0), and the update
is θ ← θ − lr·N·Vᵀ/√r. When V changes to V', the paper carries the buffer over
by projection, N ← N·(Vᵀ V')/n (V'ᵀV' ≈ n·I for Gaussian V', so this is the
least-squares fit of the old momentum in the new subspace). 1-D tensors keep a
full-size EMA buffer. β is ``--momentum``. The buffer is a deterministic
function of the trajectory, so replay-based resume rebuilds it exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..engine import QueryKey, add_update_, gaussian_like, tensor_seed, update_seed
from ..errors import ZOError
from ..optim import ZOSGD
from ..options import Options, setting
from .base import LowRankChunks, register
from .mezo import MeZO


@dataclass
class LOZOOptions(Options):
    prefix = "lozo"
    rank: int = setting(2, "LOZO/LOZO-M: rank r of the perturbation U·Vᵀ of each 2-D weight")
    nu: int = setting(50, "LOZO/LOZO-M: V is redrawn every nu steps (U every step)")

    def validate(self) -> None:
        self.check("lozo_rank", self.rank >= 1, ">= 1")
        self.check("lozo_nu", self.nu >= 1, ">= 1")


def gaussian(shape: tuple[int, ...], seed: int, like: torch.Tensor) -> torch.Tensor:
    """A float32 standard-normal tensor on ``like``'s device from a private generator.

    Factors are drawn (and multiplied) in float32 whatever the weight's dtype, so
    a bf16 run queries the same subspaces as an fp32 one.
    """
    gen = torch.Generator(device=like.device).manual_seed(seed)
    return torch.randn(shape, generator=gen, device=like.device, dtype=torch.float32)


@register
class LOZO(MeZO):
    """LOZO (Chen et al., ICLR 2025): U·Vᵀ/√r per weight matrix, U fresh each step, V redrawn every ν steps."""

    name = "lozo"
    options_cls = LOZOOptions
    suggested_lr = 5e-5  # probed on SST-2 / SmolLM2-135M at eps 1e-3 (benchmarks/results/sst2_smollm2)
    suggested_lr_tuned = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self._v_cache: dict[str, tuple[int, int, torch.Tensor]] = {}  # name -> (seed, epoch, V)

    @property
    def rank(self) -> int:
        return self.options.rank

    def epoch(self, step: int) -> int:
        """Index of the V-epoch containing ``step``: V is fixed for ν consecutive steps."""
        return step // self.options.nu

    def v_factor(self, name: str, like: torch.Tensor, epoch: int, seed: int) -> torch.Tensor:
        """V ∈ R^{n×r} of ``name`` for ``epoch`` (cached for the current epoch; same values either way)."""
        cached = self._v_cache.get(name)
        if cached is not None and cached[0] == seed and cached[1] == epoch:
            return cached[2]
        v = gaussian((like.shape[1], self.rank), tensor_seed(QueryKey(seed, epoch, 0), name, "lozo-V"), like)
        self._v_cache[name] = (seed, epoch, v)
        return v

    def u_factor(self, name: str, like: torch.Tensor, key: QueryKey) -> torch.Tensor:
        """U ∈ R^{m×r} of ``name`` for one query: fresh every step and query."""
        return gaussian((like.shape[0], self.rank), tensor_seed(key, name, "lozo-U"), like)

    def factors(self, name: str, like: torch.Tensor, key: QueryKey) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """U·Vᵀ/√r for a matrix (built a band of rows at a time by the weight passes: Method.factors)."""
        if like.dim() != 2:
            return None
        return self.u_factor(name, like, key), self.v_factor(name, like, self.epoch(key.step), key.seed), \
            1 / math.sqrt(self.rank)

    def direction(self, name: str, like: torch.Tensor, key: QueryKey) -> torch.Tensor:
        if like.dim() != 2:
            return gaussian_like(like, tensor_seed(key, name))
        return LowRankChunks(*self.factors(name, like, key)).whole(like.shape).to(like.dtype)


class LowRankMomentum(ZOSGD):
    """LOZO-M's update: EMA momentum on U-coefficients (m×r per 2-D weight), projected when V changes."""

    def __init__(self, momentum: float = 0.9, weight_decay: float = 0.0):
        super().__init__(weight_decay)
        if not 0 <= momentum < 1:
            raise ZOError(f"momentum must be in [0, 1) for lozo-m, got {momentum}")
        self.beta = momentum
        self.buf: dict[str, torch.Tensor] = {}  # 2-D: the factor N (m×r, float32); 1-D: a full buffer
        self.epoch: dict[str, int] = {}  # V-epoch the factor N refers to

    def update(self, views, estimates, method: LOZO, lr: float) -> None:
        q = len(estimates)
        step, seed = estimates[0][0].step, estimates[0][0].seed
        for name, p in views:
            if p.dim() == 2:
                k = method.epoch(step)
                coeff = torch.zeros(p.shape[0], method.rank, dtype=torch.float32, device=p.device)
                for key, g in estimates:
                    coeff.add_(method.u_factor(name, p, key), alpha=g / q)
                n = self.buf.get(name)
                if n is None:
                    n = torch.zeros_like(coeff)
                elif self.epoch[name] != k:  # carry the momentum into the new subspace: N·(Vᵀ V')/n
                    v_old = method.v_factor(name, p, self.epoch[name], seed)
                    v_new = method.v_factor(name, p, k, seed)
                    n = n @ (v_old.T @ v_new).div_(p.shape[1])
                n.mul_(self.beta).add_(coeff, alpha=1 - self.beta)
                self.buf[name], self.epoch[name] = n, k
                delta = (n @ method.v_factor(name, p, k, seed).T).mul_(1 / math.sqrt(method.rank))
            else:
                ghat = self.estimate(name, p, estimates, method)
                m = self.buf.get(name)
                m = torch.zeros_like(ghat) if m is None else m
                delta = m.mul_(self.beta).add_(ghat, alpha=1 - self.beta)
                self.buf[name] = m
            self._decay(name, p, method, lr)
            if lr != 0:  # lr = 0 leaves the weights bit-identical (the buffer still advances)
                add_update_(p, delta, -lr, update_seed(estimates[0][0], name))  # bf16: stochastic rounding

    def state_dict(self) -> dict:
        return {"buf": {k: t.clone() for k, t in self.buf.items()}, "epoch": dict(self.epoch)}

    def load_state_dict(self, state: dict) -> None:
        self.buf = {k: t.clone() for k, t in state.get("buf", {}).items()}
        self.epoch = dict(state.get("epoch", {}))


@register
class LOZOM(LOZO):
    """LOZO-M: LOZO's directions with momentum kept as an m×r factor per matrix, projected when V changes."""

    name = "lozo-m"
    suggested_lr_tuned = False

    def make_optimizer(self, cfg) -> LowRankMomentum:
        """LOZO-M owns its update rule (momentum in factor space); ``--momentum`` is its β."""
        if cfg.optimizer not in ("sgd", "momentum"):
            raise ZOError(f"lozo-m has its own momentum update; --optimizer {cfg.optimizer} does not apply "
                          f"(leave it at sgd, set β with --momentum)")
        return LowRankMomentum(cfg.momentum, cfg.weight_decay)
