"""Your own tensors (e.g. a peft model you built yourself), along MeZO's Gaussian directions."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..errors import ZOError
from .base import Method, register

ParamsSpec = "Mapping[str, torch.Tensor] | Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | None"


@register
class ParamsMethod(Method):
    """Your own tensors, perturbed along MeZO's Gaussian directions (no adapter attached).

    ``params`` is a dict ``{name: tensor}``, an iterable of ``(name, tensor)``
    pairs (``model.named_parameters()``), an iterable of the model's own
    parameters (named after them), or None: every parameter with
    ``requires_grad=True``, which is what a peft model you built yourself
    marks as trainable. Names matter: each tensor's direction is seeded by its
    name, so they must be stable across runs. ``requires_grad`` flags are left
    as they are (the ZO step runs under ``torch.no_grad`` anyway).
    """

    name = "params"
    is_adapter = False
    bf16_base = trains_base_dtype = True  # bf16 on request: updates stochastically rounded (zotune.rounding)
    suggested_lr = 1e-3

    def __init__(self, cfg: Any, params: ParamsSpec = None):
        super().__init__(cfg)
        self._given = params

    def prepare(self, model: nn.Module) -> nn.Module:
        named = dict(model.named_parameters())
        given = self._given
        if given is None:
            self.params = {n: p for n, p in named.items() if p.requires_grad}
            if not self.params:
                raise ZOError("method 'params': the model has no parameter with requires_grad=True; "
                              "mark the tensors to train or pass params=[...]")
            return model
        if isinstance(given, Mapping):
            pairs = list(given.items())
        else:
            items = list(given)
            if all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in items):
                pairs = items
            else:
                by_id = {id(p): n for n, p in named.items()}
                pairs = []
                for i, t in enumerate(items):
                    if not isinstance(t, torch.Tensor):
                        raise ZOError(f"method 'params': item {i} of params is a {type(t).__name__}, not a tensor")
                    if id(t) not in by_id:
                        raise ZOError(f"method 'params': tensor {i} of params (shape {tuple(t.shape)}) is not a "
                                      "parameter of the model; pass a dict {name: tensor} to name it "
                                      "(its name seeds its directions)")
                    pairs.append((by_id[id(t)], t))
        self.params = {}
        for n, t in pairs:
            if n in self.params:
                raise ZOError(f"method 'params': tensor {n!r} given twice")
            if not t.is_floating_point():
                raise ZOError(f"method 'params': tensor {n!r} is {t.dtype}, not floating point")
            self.params[n] = t
        if not self.params:
            raise ZOError("method 'params': params is empty")
        return model
