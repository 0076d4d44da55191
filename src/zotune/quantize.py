"""A quantized frozen base: torchao weight-only quantization of the linear layers before an adapter is attached.

Adapter methods never update the base weights, so they may be stored in 8 (or
4) bits: forward-only training then needs about the memory of a quantized
inference. peft wraps torchao-quantized linears in ``TorchaoLoraLinear``, so the
adapter on top is a standard LoRA adapter; it loads onto the full-precision
base as well (its logits then differ by the quantization error only).

The output embedding (``lm_head``) stays in full precision: it is often tied to
the input embeddings, and the scorer reads rows of it directly.

``torchao`` is an optional dependency: ``pip install 'zotune[quant]'``.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .errors import ZOError

MODES = ("none", "int8", "int4")


def _torchao():
    """torchao's quantization API, or a clear error naming the extra to install (its import noise is
    filtered in ``zotune/__init__.py``)."""
    try:
        import torchao.quantization as tq
    except ImportError:
        raise ZOError("--quantize needs torchao: pip install 'zotune[quant]' (torchao==0.18.0)") from None
    return tq


def quantizable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers that get quantized: every ``nn.Linear`` except the output embedding."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}


def quantize_base(model: nn.Module, mode: str) -> nn.Module:
    """Quantize ``model``'s linear layers in place (weight-only, ``mode`` int8 or int4); ``none`` does nothing.

    int8: per-output-channel symmetric int8 weights (torchao ``Int8WeightOnlyConfig``), any device.
    int4: grouped int4 (``Int4WeightOnlyConfig``, group 128); torchao 0.18 builds it only on CUDA
    (bfloat16 models) or with the ``mslk`` kernels, and peft 0.21 cannot wrap its plain int4
    tensor with LoRA: where it cannot be built we stop with the reason instead of silently
    training in full precision.
    """
    if mode not in MODES:
        raise ZOError(f"unknown quantization {mode!r}; choose one of: {', '.join(MODES)}")
    if mode == "none":
        return model
    tq = _torchao()
    linears = quantizable_linears(model)
    if not linears:
        raise ZOError(f"--quantize {mode}: the model has no nn.Linear layer to quantize "
                      f"(GPT-2's Conv1D layers are not supported)")
    chosen = set(map(id, linears.values()))
    if mode == "int8":
        config = tq.Int8WeightOnlyConfig()
    else:
        cuda = next(iter(linears.values())).weight.device.type == "cuda"
        config = tq.Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d" if cuda else "plain")
    first = next(iter(linears.values())).weight
    probe = nn.Linear(128, 128, bias=False, device=first.device, dtype=first.dtype)  # the backend, whatever the shapes
    try:
        tq.quantize_(probe, config)
        tq.quantize_(model, config, filter_fn=lambda m, fqn: id(m) in chosen)
    except (ImportError, NotImplementedError, AssertionError, RuntimeError, ValueError) as exc:
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ZOError(f"--quantize {mode} is not available here: torchao says {why!r}"
                      + ("; int4 weight-only needs CUDA with a bfloat16 model (or the mslk kernels), "
                         "use --quantize int8 on CPU" if mode == "int4" else "")) from None
    # peft warns that merging into a quantized base needs transformers' TorchAoConfig; zotune
    # never merges during training, and the saved adapter merges into the full-precision base.
    warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated without")
    from torchao.utils import TorchAOBaseTensor

    done = sum(isinstance(m.weight, TorchAOBaseTensor) for m in linears.values())
    if done == 0:
        raise ZOError(f"--quantize {mode}: torchao quantized none of the {len(linears)} linear layers "
                      f"(shapes incompatible with its group size?)")
    return model


def model_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers; a quantized tensor counts its inner storage
    (int8/int4 data plus scales), a tied weight counts once."""
    import sys

    base = sys.modules.get("torchao.utils")
    quantized = base.TorchAOBaseTensor if base is not None else ()

    def nbytes(t: torch.Tensor) -> int:
        if quantized and isinstance(t, quantized):
            names, _ = t.__tensor_flatten__()
            return sum(nbytes(getattr(t, n)) for n in names)
        return t.numel() * t.element_size()

    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(nbytes(t) for t in tensors.values())
