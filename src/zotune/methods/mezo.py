"""MeZO (Malladi et al., NeurIPS 2023): every base weight is trainable.

The direction is a fresh Gaussian over all parameters, regenerated from its
seed rather than stored. Weight decay skips biases and norms (``Method.decays``).
Exact restore snapshots the weights once per step: one extra copy of the model,
which is the price of bit-exactness over MeZO's in-place +eps/-2eps/+eps.
"""

from __future__ import annotations

from torch import nn

from .base import Method, register


@register
class MeZO(Method):
    name = "mezo"
    is_adapter = False

    def prepare(self, model: nn.Module) -> nn.Module:
        self.params = {}
        for n, p in model.named_parameters():  # tied weights appear once
            p.requires_grad_(False)  # ZO needs no autograd graph
            self.params[n] = p
        return model
