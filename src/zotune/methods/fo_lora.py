"""First-order LoRA: backprop + AdamW over the same peft LoRA factors as mezo-lora.

The quality and memory reference every ZO result is read against: same
targets, rank and alpha as ``mezo-lora`` (default r=8, alpha=16 on the
architecture's q/v projections), same recipe, data order and evaluation; only
the step differs. It needs the autograd graph that ZO avoids, so its peak
memory is the number ZO's "memory equals inference" is measured against.

Counting: one forward plus one backward is reported as **3 forward-equivalents**
(a backward costs about two forwards: gradients with respect to activations
and to weights), in ``forward_passes`` and in ``StepResult.forward_passes``, so
"forward passes" budgets compare ZO and first-order runs on a common scale.

The loss function must return a differentiable tensor (the recipe passes
``Scorer.loss_tensor``; ``Scorer.loss`` returns a float under ``no_grad``).
AdamW's lr is the recipe's ``--lr`` (LoRA's usual range is 1e-4..1e-3, far
below the ZO defaults), its decay ``--weight-decay``, its betas ``--betas``.

Resume: a first-order run is not determined by its trajectory of scalars (the
update depends on full gradients), so ``zotune train --resume`` and
``zotune replay`` refuse it with a ZOError; rerun it from scratch (it is the
short reference run). Through :class:`zotune.ZOOptimizer`, ``state_dict()``
holds the adapter and the AdamW state and resumes exactly.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ..engine import StepResult, require_replayable
from ..errors import ZOError
from .base import register
from .lora import MeZOLoRA

#: Forward-equivalents of one forward + backward step.
FO_STEP_COST = 3


@register
class FOLoRA(MeZOLoRA):
    name = "fo-lora"
    suggested_lr = 1e-3  # AdamW, probed on SST-2 / SmolLM2-135M
    suggested_lr_tuned = True
    replayable = False
    not_replayable = ("a backprop update depends on full gradients, not on logged scalars; start the run again "
                      "(ZOOptimizer.state_dict() resumes exactly)")
    distributable = False
    batchable = False  # a first-order step, no perturbations

    def prepare(self, model: nn.Module) -> nn.Module:
        model = super().prepare(model)  # peft LoRA, frozen base; lora_params turned grads off
        for p in self.params.values():
            p.requires_grad_(True)
        return model

    @classmethod
    def forward_cost(cls, queries: int, difference: str) -> int:
        return FO_STEP_COST  # one forward + one backward, whatever the ZO settings say

    def build_engine(self, cfg) -> "FOEngine":
        return FOEngine(self, cfg.weight_decay, tuple(float(b) for b in cfg.betas), cfg.seed)


class FOEngine:
    """Backprop + ``torch.optim.AdamW`` behind the recipe's engine interface.

    ``step(loss_fn, lr) -> StepResult``, ``replay(rows)``, ``step_count``,
    ``forward_passes`` and ``optimizer`` (with ``state_dict``/``load_state_dict``)
    as :class:`ZOEngine`.
    """

    def __init__(self, method: FOLoRA, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 seed: int = 0):
        self.method = method
        self.optimizer = torch.optim.AdamW(list(method.params.values()), lr=0.0, betas=betas,
                                           weight_decay=weight_decay)
        self.seed = seed
        self.step_count = 0
        self.forward_passes = 0

    def step(self, loss_fn: Callable[[], torch.Tensor], lr: float) -> StepResult:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = loss_fn()
            if not (isinstance(loss, torch.Tensor) and loss.requires_grad):
                raise ZOError("fo-lora needs a loss function returning a differentiable tensor "
                              "(Scorer.loss_tensor, not Scorer.loss, which returns a float under no_grad)")
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"non-finite loss {value} at step {self.step_count}")
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # gradients are not kept between steps
        self.forward_passes += FO_STEP_COST
        self.step_count += 1
        return StepResult(self.step_count - 1, value, [], FO_STEP_COST, [])

    def replay(self, rows: list[dict]) -> None:
        require_replayable(self.method, rows)  # fo-lora is not replayable: this refuses any logged step
