"""MeZO-LN: MeZO over the normalization gains only (peft LN-tuning), the smallest useful query space.

LayerNorm/RMSNorm gains are ~0.03% of a transformer's weights (35k of SmolLM2's
135M), yet rescaling features at every layer moves a prompt's candidate scores
a long way. ZO's noise grows with the query dimension, so this space learns in
tens of steps where a LoRA space needs hundreds: on SmolLM2-135M it is the
default job's method, the one that shows a real gain within minutes on a CPU.
The adapter is upstream peft's LN-tuning adapter (a trained copy of each norm),
so ``PeftModel.from_pretrained`` loads it and ``merge_and_unload`` merges it.
"""

from __future__ import annotations

import warnings

from torch import nn

from ..errors import ZOError
from .base import Method, register


def norm_module_names(model: nn.Module) -> list[str]:
    """Last name component of every normalization module (LayerNorm, RMSNorm, ...)."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and "Norm" in type(m).__name__})


@register
class MeZOLN(Method):
    name = "mezo-ln"

    def prepare(self, model: nn.Module) -> nn.Module:
        from peft import LNTuningConfig, get_peft_model

        available = norm_module_names(model)
        targets = list(self.cfg.target_modules) if self.cfg.target_modules else available
        missing = [t for t in targets if t not in available]
        if not targets or missing:
            raise ZOError(f"no normalization module named {', '.join(missing) or '(any)'}; "
                          f"norm modules of this model: {', '.join(available) or 'none'}")
        with warnings.catch_warnings():  # peft flags RMSNorm as untested; tests/test_methods.py checks the round trip
            warnings.filterwarnings("ignore", message="Unsupported layer type")
            model = get_peft_model(model, LNTuningConfig(target_modules=targets))
        self.params = {n: p for n, p in model.named_parameters() if "ln_tuning_layers" in n}
        for p in self.params.values():
            p.requires_grad_(False)  # ZO builds no graph
        return model

    def decays(self, name: str) -> bool:
        return False  # decaying a gain towards 0 would switch the layer off
