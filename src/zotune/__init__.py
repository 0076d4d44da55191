"""zotune: forward-only (zeroth-order) fine-tuning of transformer language models.

From your own code::

    opt = zotune.ZOOptimizer(model, method="ar1zo", lr=1.5e-2, eps=1e-2, lora_r=8, lora_alpha=2)
    loss = opt.step(lambda: loss_fn(opt.model, batch))   # two forward passes, no backward

``help(zotune.ZOOptimizer)`` teaches the API; ``zotune.hf_trainer.ZOTrainer``
plugs the same step into a transformers ``Trainer``. Both are imported on first
use, so ``import zotune`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["ZOOptimizer", "ZOTrainer", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from .api import ZOOptimizer
    from .hf_trainer import ZOTrainer

_LAZY = {"ZOOptimizer": "api", "ZOTrainer": "hf_trainer"}


def _quiet_torchao_import() -> None:
    """Drop the warnings torchao's and bitsandbytes' imports log about optional kernels (they are the
    ``quant`` extra, and peft imports both whenever they are installed): five lines of noise in every
    run otherwise. bitsandbytes' is about a fused CPU kernel it fetches from the Hugging Face hub,
    which zotune does not use (``zotune.quantize``)."""
    import logging

    noise = ("Failed to load", "is an Enum subclass and is now natively supported")
    for name in ("torchao", "torch.utils._pytree", "bitsandbytes.backends.cpu.ops"):
        logging.getLogger(name).addFilter(lambda record: not any(n in record.getMessage() for n in noise))


_quiet_torchao_import()


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
