"""SubZero (Yu et al., ICCV 2025): U·Z·Vᵀ in per-tensor random orthonormal subspaces (weights or LoRA).

For every trainable 2-D tensor of shape m×n, column-orthonormal bases
U ∈ R^{m×r} and V ∈ R^{n×r} (the Q factors of seeded Gaussian matrices) are
drawn once per T steps (``--subzero-T``), and each query perturbs along

    z = √(mn)/r · U·Z·Vᵀ,   Z ∈ R^{r×r} a fresh standard Gaussian.

Because UᵀU = VᵀV = I, ‖U Z Vᵀ‖_F = ‖Z‖_F, so E‖z‖² = m·n: the same size as
MeZO's Gaussian over the tensor, hence the same meaning of ε and lr. z has rank
r (almost surely). 1-D tensors get a plain Gaussian. Update: ZO-SGD g·z (or
any zotune optimizer).

r is ``--subzero-rank`` (24 and T = 1000 as in the authors' example command),
capped per tensor at min(m, n): a LoRA factor of rank 8 has an 8-dimensional
side, and its "subspace" is then that whole side. The paper's reshaping of very
non-square matrices into near-square ones is not implemented.

Seeds: the bases come from (run seed, ⌊step/T⌋, name) and Z from (run seed,
step, query, name), so directions stay pure functions of (name, QueryKey) and
replay works. The QR is done once per (tensor, refresh epoch) and cached.

``subzero`` trains MeZO's tensors (all parameters or ``--target-modules``
substrings); ``subzero-lora`` trains peft LoRA factors, as ``mezo-lora`` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..engine import QueryKey, gaussian_like, tensor_seed
from ..options import Options, setting
from .base import LowRankChunks, register
from .lora import MeZOLoRA
from .lozo import gaussian
from .mezo import MeZO


@dataclass
class SubZeroOptions(Options):
    prefix = "subzero"
    rank: int = setting(24, "SubZero: rank r of the orthonormal bases U, V of each 2-D tensor (capped at its "
                            "smaller side)")
    T: int = setting(1000, "SubZero: the bases U, V are redrawn (QR of seeded Gaussians) every T steps")

    def validate(self) -> None:
        self.check("subzero_rank", self.rank >= 1, ">= 1")
        self.check("subzero_T", self.T >= 1, ">= 1")


class SubspaceDirections:
    """SubZero's direction rule, mixed into a method that chooses the trainable tensors."""

    options_cls = SubZeroOptions

    def rank_of(self, like: torch.Tensor) -> int:
        return min(self.options.rank, like.shape[0], like.shape[1])

    def epoch(self, step: int) -> int:
        return step // self.options.T

    def bases(self, name: str, like: torch.Tensor, epoch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Orthonormal (U, V) of ``name`` for a refresh epoch: QR of seeded Gaussians, cached per epoch."""
        cache = self.__dict__.setdefault("_bases", {})  # name -> (seed, epoch, U, V): the current epoch's
        cached = cache.get(name)
        if cached is not None and cached[:2] == (seed, epoch):
            return cached[2], cached[3]
        r, key = self.rank_of(like), QueryKey(seed, epoch, 0)
        u = torch.linalg.qr(gaussian((like.shape[0], r), tensor_seed(key, name, "subzero-U"), like)).Q
        v = torch.linalg.qr(gaussian((like.shape[1], r), tensor_seed(key, name, "subzero-V"), like)).Q
        cache[name] = (seed, epoch, u, v)
        return u, v

    def factors(self, name: str, like: torch.Tensor, key: QueryKey) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """√(mn)/r·(U·Z)·Vᵀ for a matrix (built a band of rows at a time by the weight passes: Method.factors)."""
        if like.dim() != 2:
            return None
        u, v = self.bases(name, like, self.epoch(key.step), key.seed)
        r = u.shape[1]
        z = gaussian((r, r), tensor_seed(key, name, "subzero-Z"), like)
        return u @ z, v, math.sqrt(like.shape[0] * like.shape[1]) / r

    def direction(self, name: str, like: torch.Tensor, key: QueryKey) -> torch.Tensor:
        if like.dim() != 2:
            return gaussian_like(like, tensor_seed(key, name))
        return LowRankChunks(*self.factors(name, like, key)).whole(like.shape).to(like.dtype)


@register
class SubZero(SubspaceDirections, MeZO):
    """SubZero (Yu et al., ICCV 2025): √(mn)/r·U·Z·Vᵀ per base weight, orthonormal U, V redrawn every T steps."""

    name = "subzero"
    suggested_lr = 5e-5  # probed on SST-2 / SmolLM2-135M at eps 1e-3 (benchmarks/results/sst2_smollm2)
    suggested_lr_tuned = True


@register
class SubZeroLoRA(SubspaceDirections, MeZOLoRA):
    """SubZero's subspace directions on peft LoRA factors (rank capped at each factor's smaller side)."""

    name = "subzero-lora"
    suggested_lr = 3e-3  # mezo-lora's probed lr (same factors, same expected direction norm)
    suggested_lr_tuned = False
