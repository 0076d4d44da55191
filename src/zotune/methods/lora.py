"""MeZO-LoRA: one Gaussian direction over all LoRA factors A and B at once.

The query dimension is r·(d_out + d_in) per adapted layer and grows with the
rank: that growth is what AR1-ZO (``ar1.py``) removes.
"""

from __future__ import annotations

from torch import nn

from ..adapters import attach_lora, lora_params
from .base import Method, register


@register
class MeZOLoRA(Method):
    name = "mezo-lora"
    bf16_base = True
    batchable = True  # its views are LoRA factors: zotune.batched
    suggested_lr = 3e-3  # probed on SST-2 / SmolLM2-135M (r=8, alpha=16, SGD)
    suggested_lr_tuned = True
    default_alpha = 16.0  # MeZO's LoRA setting (r=8, alpha=16)

    def prepare(self, model: nn.Module) -> nn.Module:
        cfg = self.cfg
        model = attach_lora(model, cfg.lora_r, cfg.lora_alpha or self.default_alpha, cfg.target_modules or None)
        self.params = lora_params(model)
        return model
