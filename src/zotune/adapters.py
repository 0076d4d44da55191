"""Attaching upstream peft LoRA to any Hugging Face model.

zotune never implements LoRA itself: every adapter it trains is a peft
``LoraConfig`` adapter, so ``PeftModel.from_pretrained`` loads it and
``merge_and_unload`` deploys it anywhere peft runs.
"""

from __future__ import annotations

from torch import nn

from .errors import ZOError

#: MeZO's choice: the query and value projections of attention, per architecture.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
}


def leaf_linear_names(model: nn.Module) -> set[str]:
    """Last name component of every Linear-like leaf module (what peft can target)."""
    from transformers.pytorch_utils import Conv1D

    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


def target_modules(model: nn.Module, requested: list[str] | None = None) -> list[str]:
    """Target module names: ``requested`` if given (each must exist), else the architecture default."""
    available = leaf_linear_names(model)
    if requested:
        missing = [t for t in requested if t not in available]
        if missing:
            raise ZOError(
                f"unknown target module(s) {', '.join(missing)} for this model; "
                f"linear modules it has: {', '.join(sorted(available))}"
            )
        return list(requested)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    for candidates in (["q_proj", "v_proj"], ["query", "value"], ["c_attn"]):
        if all(c in available for c in candidates):
            return candidates
    raise ZOError(
        f"no default LoRA targets for model type {model_type!r}; pass --target-modules "
        f"(linear modules it has: {', '.join(sorted(available))})"
    )


def attach_lora(model: nn.Module, rank: int, alpha: float, targets: list[str] | None = None,
                init_lora_weights: bool | str = True, use_rslora: bool = False):
    """Wrap ``model`` in a peft LoRA model and return it (base frozen by peft)."""
    from peft import LoraConfig, get_peft_model

    if rank <= 0:
        raise ZOError(f"LoRA rank must be > 0, got {rank}")
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=target_modules(model, targets),
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=init_lora_weights,
        use_rslora=use_rslora,
        fan_in_fan_out=getattr(getattr(model, "config", None), "model_type", "") == "gpt2",
    )
    from .models import adapters_on_execution_device

    with adapters_on_execution_device(model):  # an offloaded base layer lives on "meta": keep factors real
        return get_peft_model(model, config)


def lora_params(peft_model: nn.Module) -> dict[str, nn.Parameter]:
    """The LoRA factors by name (``...lora_A.default.weight`` / ``...lora_B.default.weight``)."""
    params = {n: p for n, p in peft_model.named_parameters() if "lora_A" in n or "lora_B" in n}
    for p in params.values():
        p.requires_grad_(False)  # ZO builds no graph; peft had set True
    return params
