"""MeZO-LN: MeZO over the normalization gains only (peft LN-tuning), the smallest useful query space.

By default only the final norm before the LM head is trained (576 gains on
SmolLM2-135M): rescaling the last features re-weights what the verbalizer
rows read, a linear re-weighting of the model's own features. ZO's noise grows
with the query dimension, so this tiny space learns steadily within a few
hundred steps on a CPU, where LoRA spaces (~50k-500k per query) need thousands;
it is the default job's method. ``--target-modules all`` trains every norm
(35k gains on SmolLM2), or name the norm modules.
The adapter is upstream peft's LN-tuning adapter (a trained copy of each norm),
so ``PeftModel.from_pretrained`` loads it and ``merge_and_unload`` merges it.
"""

from __future__ import annotations

import warnings

from torch import nn

from ..errors import ZOError
from .base import Method, register


FINAL_NORM_NAMES = ("norm", "final_layer_norm", "ln_f", "final_norm")  # Llama/Qwen, OPT, GPT-2, others


def norm_module_names(model: nn.Module) -> list[str]:
    """Last name component of every normalization module (LayerNorm, RMSNorm, ...)."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and "Norm" in type(m).__name__})


def final_norm_name(model: nn.Module) -> str:
    """The norm right before the LM head: by its usual names, else the last norm registered."""
    available = norm_module_names(model)
    for name in FINAL_NORM_NAMES:
        if name in available:
            return name
    norms = [n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and "Norm" in type(m).__name__]
    if not norms:
        raise ZOError("this model has no normalization module for mezo-ln")
    return norms[-1]


@register
class MeZOLN(Method):
    bf16_base = trains_base_dtype = True  # bf16 on request: updates stochastically rounded (zotune.rounding)
    name = "mezo-ln"
    suggested_lr = 1e-2  # tuned for the default job (Rotten Tomatoes, SmolLM2-135M)
    suggested_lr_tuned = True

    def prepare(self, model: nn.Module) -> nn.Module:
        from peft import LNTuningConfig, get_peft_model

        available = norm_module_names(model)
        requested = list(self.cfg.target_modules)
        targets = available if requested == ["all"] else requested or [final_norm_name(model)]
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
