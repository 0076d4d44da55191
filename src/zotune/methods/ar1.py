"""AR1-ZO: query one rank-1 LoRA atom (b_k, a_k) per layer per step, scaled by γ = α·r.

LoRA's ΔW = s·B·A = s·Σ_k b_k a_kᵀ is a sum of r atoms. Perturbing all of A and
B at once (MeZO-LoRA) makes the query dimension r·(d_out + d_in); perturbing one
atom keeps it d_out + d_in whatever r is. But the loss sees an atom through the
scale s, so with canonical s = α/r the finite-difference signal of an atom
shrinks as 1/r and drowns in the evaluation noise at high rank. Topology-aware
scaling sets peft's ``lora_alpha = γ = α·r``, so s = γ/r = α for every r.

Our reading of the paper (configurable, checked by ``zotune snr``): atoms
alternate cyclically, k = t mod r (``--ar1-schedule random`` draws k per step);
``--ar1-per-layer`` gives each layer its own k (a seeded offset for cyclic).
The stored adapter is a plain peft LoRA adapter of rank r with lora_alpha = γ.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import nn

from ..adapters import attach_lora, lora_params
from ..engine import tensor_seed, QueryKey
from ..errors import ZOError
from ..options import Options, setting
from .base import Method, register

SCALINGS = ("topology", "canonical", "rslora")
SCHEDULES = ("cyclic", "random")


@dataclass
class AR1Options(Options):
    prefix = "ar1"
    scaling: str = setting("topology", "AR1-ZO scale: topology (lora_alpha = alpha*r, scale alpha) | canonical "
                                       "(alpha/r) | rslora (alpha/sqrt r)")
    schedule: str = setting("cyclic", "AR1-ZO atom order: cyclic (k = step mod r) | random")
    per_layer: bool = setting(False, "AR1-ZO: each layer picks its own atom (seeded offset / independent draw)")

    def validate(self) -> None:
        self.check("ar1_scaling", self.scaling in SCALINGS, f"one of {', '.join(SCALINGS)}")
        self.check("ar1_schedule", self.schedule in SCHEDULES, f"one of {', '.join(SCHEDULES)}")


def lora_alpha_for(scaling: str, alpha: float, r: int) -> tuple[float, bool]:
    """(peft lora_alpha, use_rslora) giving effective scale α (topology), α/r (canonical), α/√r (rslora)."""
    if scaling == "topology":
        return alpha * r, False
    if scaling == "canonical":
        return alpha, False
    if scaling == "rslora":
        return alpha, True
    raise ZOError(f"unknown AR1 scaling {scaling!r}; choose one of: {', '.join(SCALINGS)}")


@register
class AR1ZO(Method):
    name = "ar1zo"
    bf16_base = True
    batchable = True  # its views are LoRA factors: zotune.batched
    options_cls = AR1Options
    suggested_lr = 1.5e-2  # probed on SST-2 / SmolLM2-135M (r=8, SGD)
    suggested_lr_tuned = True
    default_alpha = 2.0  # scale 2 at every rank: MeZO-LoRA's 16/8 at r=8, so lrs transfer at r=8

    def prepare(self, model: nn.Module) -> nn.Module:
        cfg = self.cfg
        self.rank = cfg.lora_r
        gamma, rslora = lora_alpha_for(self.options.scaling, cfg.lora_alpha or self.default_alpha, self.rank)
        model = attach_lora(model, self.rank, gamma, cfg.target_modules or None, use_rslora=rslora)
        self.params = lora_params(model)
        # Pair each layer's A (r x d_in) with its B (d_out x r): one atom = (row k of A, column k of B).
        self.layers = [(n, n.replace("lora_A", "lora_B")) for n in self.params if "lora_A" in n]
        self.offsets = [random.Random(tensor_seed(QueryKey(cfg.seed, 0, 0), a)).randrange(self.rank)
                        for a, _ in self.layers]
        return model

    def atom(self, step: int, layer: int) -> int:
        """Index k of the atom queried at ``step`` in layer number ``layer``."""
        if self.options.schedule == "cyclic":
            return (step + (self.offsets[layer] if self.options.per_layer else 0)) % self.rank
        salt = self.layers[layer][0] if self.options.per_layer else ""
        return random.Random(tensor_seed(QueryKey(self.cfg.seed, step, 0), "atom", salt)).randrange(self.rank)

    def views(self, step: int) -> list[tuple[str, torch.Tensor]]:
        out = []
        for i, (a_name, b_name) in enumerate(self.layers):
            k = self.atom(step, i)
            out.append((f"{a_name}[{k}]", self.params[a_name].data[k]))  # a_k: a row of A
            out.append((f"{b_name}[:,{k}]", self.params[b_name].data[:, k]))  # b_k: a column of B
        return out

    def effective_scale(self, model: nn.Module) -> float:
        """peft's scaling s of the adapted layers (the same for all of them)."""
        from peft.tuners.lora import LoraLayer

        scales = {m.scaling["default"] for m in model.modules() if isinstance(m, LoraLayer)}
        assert len(scales) == 1, scales
        return scales.pop()
