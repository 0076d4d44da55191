"""MeZO (Malladi et al., NeurIPS 2023): every base weight is trainable.

The direction is a fresh Gaussian over all parameters, regenerated from its
seed rather than stored. Weight decay skips biases and norms (``Method.decays``).
The restore (``restore_default = "regenerate"``) is MeZO's in-place
+eps/-2eps/+eps with z regenerated chunk by chunk: no copy of the model, a few
float32 ulps of drift per step; ``--restore snapshot`` restores exactly at the
cost of one extra copy. bfloat16 weights always get the snapshot, and their
updates are stochastically rounded (docs/methods.md, "What is exact and what is not").
"""

from __future__ import annotations

from torch import nn

from ..errors import ZOError
from .base import Method, register


@register
class MeZO(Method):
    name = "mezo"
    is_adapter = False
    bf16_base = trains_base_dtype = True  # bf16 on request: updates stochastically rounded (zotune.rounding)
    restore_default = "regenerate"  # no weight-sized snapshot in float32 (engine: restore)
    suggested_lr = 1e-6  # MeZO's range for full-parameter runs (guessed for SmolLM2-135M)

    def prepare(self, model: nn.Module) -> nn.Module:
        """All weights, or with ``--target-modules`` only those whose name contains one of them.

        A subset such as ``norm`` (LayerNorm/RMSNorm tuning) is a much smaller
        query space, which ZO explores in far fewer steps.
        """
        targets = self.cfg.target_modules if self.cfg is not None else []
        self.params = {}
        for n, p in model.named_parameters():  # tied weights appear once
            p.requires_grad_(False)  # ZO needs no autograd graph
            if not targets or any(t in n for t in targets):
                self.params[n] = p
        if not self.params:
            raise ZOError(f"no parameter name contains any of {', '.join(targets)}")
        return model
