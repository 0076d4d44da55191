"""MeZO (Malladi et al., NeurIPS 2023): every base weight is trainable.

The direction is a fresh Gaussian over all parameters, regenerated from its
seed rather than stored. Weight decay skips biases and norms (``Method.decays``).
The restore (``restore_default = "regenerate"``) is MeZO's in-place
+eps/-2eps/+eps with z regenerated chunk by chunk: no copy of the model, a few
float32 ulps of drift per step; ``--restore snapshot`` or ``--restore patch``
restores exactly (one extra copy of the model, resp. a patch of the ~2% of
elements whose round trip is inexact). bfloat16 weights get the patch restore,
and their updates are stochastically rounded (docs/methods.md, "What is exact
and what is not").

``--mezo-direction rademacher`` draws z from +-1 (equally likely) instead of
N(0, 1): the same first and second moments (E[z] = 0, E[z z^T] = I), so the
central difference estimates the same gradient, but generating z is ~3x
cheaper than ``normal_``, which dominates a full-weight step on CPU
(benchmarks/results/full_weight_profile.md). The Gaussian stays the default:
it is MeZO's published estimator and every recorded trajectory uses it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..engine import DIRECTIONS
from ..errors import ZOError
from ..options import Options, setting
from .base import Method, register


@dataclass
class MeZOOptions(Options):
    prefix = "mezo"
    direction: str = setting("gaussian", "mezo: distribution of the direction z: gaussian (MeZO's) | rademacher "
                                         "(+-1, same mean and covariance; ~3x cheaper to generate, which "
                                         "measured a faster full-weight step on CPU)")

    def validate(self) -> None:
        self.check("mezo_direction", self.direction in DIRECTIONS, f"one of {', '.join(DIRECTIONS)}")


@register
class MeZO(Method):
    name = "mezo"
    is_adapter = False
    bf16_base = trains_base_dtype = True  # bf16 on request: updates stochastically rounded (zotune.rounding)
    restore_default = "regenerate"  # no weight-sized snapshot: regenerate in float32, patch in bf16 (engine)
    suggested_lr = 1e-6  # MeZO's range for full-parameter runs (guessed for SmolLM2-135M)
    options_cls = MeZOOptions

    @property
    def distribution(self) -> str:
        """``--mezo-direction``: the distribution of z (subclasses with their own options keep Gaussian)."""
        return getattr(self.options, "direction", "gaussian")

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
