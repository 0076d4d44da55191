"""A quantized frozen base: weight-only quantization of the linear layers before an adapter is attached.

Adapter methods never update the base weights, so they may be stored in 8 or
4 bits: forward-only training then needs about the memory of a quantized
inference. The adapter on top stays a standard peft LoRA adapter (fp32 factors);
it loads onto the full-precision base as well (its logits then differ by the
quantization error only).

- int8: torchao ``Int8WeightOnlyConfig``; peft wraps it in ``TorchaoLoraLinear``.
- int4: bitsandbytes NF4 (QLoRA's format: blocks of 64 weights, double-quantized
  scales) in ``bnb.nn.Linear4bit``; peft wraps it in its bnb ``Linear4bit`` LoRA
  layer. It runs on CPU (bitsandbytes' CPU backend dequantizes each block, then
  a bf16/fp32 matmul) and on CUDA. torchao 0.18's int4 weight-only path builds
  only on CUDA, and peft 0.21's torchao LoRA layer refuses int4 weights.

The output embedding (``lm_head``) stays in full precision: it is often tied to
the input embeddings, and the scorer reads rows of it directly.

``torchao`` and ``bitsandbytes`` are optional dependencies: ``pip install 'zotune[quant]'``.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .errors import ZOError

MODES = ("none", "int8", "int4")

#: bitsandbytes 4-bit settings (QLoRA's): NormalFloat4 codes, one absmax per 64 weights (32 where
#: rows are not a multiple of 64, see :func:`_blocksize`), absmaxes themselves stored in 8 bits
#: (``compress_statistics``): about 4.13 bits per weight.
INT4 = dict(quant_type="nf4", blocksize=64, compress_statistics=True)


def _torchao():
    """torchao's quantization API, or a clear error naming the extra to install (its import noise is
    filtered in ``zotune/__init__.py``)."""
    try:
        import torchao.quantization as tq
    except ImportError:
        raise ZOError("--quantize needs torchao: pip install 'zotune[quant]' (torchao==0.18.0)") from None
    return tq


def _bitsandbytes():
    """bitsandbytes, or a clear error naming the extra to install (its CPU backend's import warning
    about optional hub kernels is filtered in ``zotune/__init__.py``)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ZOError("--quantize int4 needs bitsandbytes: pip install 'zotune[quant]' (bitsandbytes==0.50.2)") from None
    return bnb


def _blocksize(in_features: int) -> int:
    """64 (QLoRA's), or 32 for rows that 64 does not divide: bitsandbytes 0.50.2's native CPU
    dequantization kernel decodes a block that straddles two rows wrongly (e.g. rows of 32 or 96
    with blocks of 64 came back with 30-40% relative error instead of NF4's ~9%)."""
    return 64 if in_features % 64 == 0 or in_features % 32 else 32


def _reference_dequantize(weight) -> torch.Tensor:
    """A bitsandbytes NF4 weight decoded in plain torch (fp32) from its codes and scales: what its
    kernels must return. Codes are packed two per byte, the first in the high nibble; a nested
    state stores each block's absmax as an 8-bit code times a per-256-blocks scale plus an offset."""
    st = weight.quant_state
    absmax = st.absmax.float()
    if st.nested:
        outer = st.state2.absmax.float().repeat_interleave(st.state2.blocksize)[: st.absmax.numel()]
        absmax = st.state2.code.float()[st.absmax.long()] * outer + st.offset.float()
    packed = weight.data.view(torch.uint8).reshape(-1)
    codes = torch.stack([packed >> 4, packed & 15], 1).reshape(-1)[: st.shape.numel()].long()
    scale = absmax.repeat_interleave(st.blocksize)[: codes.numel()]
    return (st.code.float()[codes] * scale).reshape(st.shape)


def _check_dequantization(bnb, q: nn.Module, name: str) -> None:
    """Stop unless bitsandbytes decodes ``q``'s weight as the plain-torch decoding of the same codes does
    (to the compute dtype's rounding), and ``q``'s forward multiplies by that weight."""
    st = q.weight.quant_state
    want = _reference_dequantize(q.weight).to(st.dtype)
    got = bnb.functional.dequantize_4bit(q.weight.data, st)
    fp32 = st.dtype == torch.float32
    rtol = 1e-5 if fp32 else 2.0 ** -6  # a rounding of the last bit of fp32 / bf16
    atol = 1e-6 * want.abs().max().item()
    what = f"{name} (shape {tuple(st.shape)}, blocks of {st.blocksize})"
    if not torch.allclose(got.float(), want.float(), rtol=rtol, atol=atol):
        err = ((got.float() - want.float()).norm() / want.float().norm()).item()
        raise RuntimeError(f"its 4-bit dequantization of {what} is off by {err:.0%} relative to the codes it stored")
    x = torch.randn(4, want.shape[1], generator=torch.Generator().manual_seed(0)).to(want)
    with torch.no_grad():
        out, ref = q(x).float(), nn.functional.linear(x, want, q.bias).float()
    err = ((out - ref).norm() / ref.norm()).item()
    if not err < (1e-4 if fp32 else 2e-2):  # matmuls of ~100s of terms in the compute dtype
        raise RuntimeError(f"its 4-bit forward of {what} is off by {err:.0%} from its dequantized weight")


def _linear4bit(bnb, linear: nn.Linear) -> nn.Module:
    """``linear`` as a bitsandbytes NF4 layer on its own device, computing in its own dtype."""
    w = linear.weight
    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=w.dtype, quant_type=INT4["quant_type"], device="meta")
    settings = {**INT4, "blocksize": _blocksize(linear.in_features)}
    q.weight = bnb.nn.Params4bit(w.detach(), requires_grad=False, module=q, **settings)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    q = q.to(w.device)  # quantizes: Params4bit packs on its first move to a real device
    # On CPUs with avx512_bf16, eval-mode forwards would repack the weight for a fused kernel that
    # bitsandbytes fetches from the Hugging Face hub (``kernels``); its fallback without it was
    # 3.2-4.0x slower than dequantize + matmul on SmolLM2-135M (benchmarks/results/int4_cpu.md),
    # and the repacking needs d_out % 32 == 0 and d_in >= the block size. Dequantize + matmul it
    # is, in train and eval mode alike (and the same numbers in both).
    q.support_avx512bf16_for_cpu = False
    return q


def _quantize_int4(model: nn.Module, linears: dict[str, nn.Linear]) -> None:
    """Replace ``linears`` in ``model`` by bitsandbytes NF4 layers (the backend probed first on a small
    layer; the dequantization checked once per shape)."""
    bnb = _bitsandbytes()
    first = next(iter(linears.values())).weight
    probe = nn.Linear(64, 64, bias=False, device=first.device, dtype=first.dtype)
    checked: set[tuple] = set()
    try:
        out = _linear4bit(bnb, probe)(torch.ones(1, 64, device=first.device, dtype=first.dtype))
        if not torch.isfinite(out).all():
            raise RuntimeError("the probe layer's output is not finite")
        for name, linear in linears.items():
            parent, _, child = name.rpartition(".")
            q = _linear4bit(bnb, linear)
            key = (tuple(linear.weight.shape), linear.weight.dtype, q.weight.quant_state.blocksize)
            if key not in checked:
                _check_dequantization(bnb, q, name)
                checked.add(key)
            setattr(model.get_submodule(parent), child, q)
    except (ImportError, NotImplementedError, AssertionError, RuntimeError, ValueError, TypeError) as exc:
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ZOError(f"--quantize int4 is not available here: bitsandbytes says {why!r} "
                      f"({first.device.type}, {str(first.dtype).removeprefix('torch.')}); "
                      f"use --quantize int8") from None
    # peft dispatches its bnb LoRA layer (peft.tuners.lora.bnb.Linear4bit) only to models flagged
    # like this (transformers sets it when it loads a model in 4 bits).
    model.is_loaded_in_4bit = True


def quantizable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers that get quantized: every ``nn.Linear`` except the output embedding."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}


def quantize_base(model: nn.Module, mode: str) -> nn.Module:
    """Quantize ``model``'s linear layers in place (weight-only, ``mode`` int8 or int4); ``none`` does nothing.

    int8: per-output-channel symmetric int8 weights (torchao ``Int8WeightOnlyConfig``), any device.
    int4: bitsandbytes NF4, blocks of 64, double-quantized scales (:data:`INT4`), CPU or CUDA, in the
    model's dtype (bfloat16 or float32). Where the backend cannot run we stop with the reason
    instead of silently training in full precision.
    """
    if mode not in MODES:
        raise ZOError(f"unknown quantization {mode!r}; choose one of: {', '.join(MODES)}")
    if mode == "none":
        return model
    tq = _torchao() if mode == "int8" else _bitsandbytes()  # the missing extra first, whatever the model
    linears = quantizable_linears(model)
    if not linears:
        raise ZOError(f"--quantize {mode}: the model has no nn.Linear layer to quantize "
                      f"(GPT-2's Conv1D layers are not supported)")
    if mode == "int4":
        _quantize_int4(model, linears)
        return model
    chosen = set(map(id, linears.values()))
    config = tq.Int8WeightOnlyConfig()
    first = next(iter(linears.values())).weight
    probe = nn.Linear(128, 128, bias=False, device=first.device, dtype=first.dtype)  # the backend, whatever the shapes
    try:
        tq.quantize_(probe, config)
        tq.quantize_(model, config, filter_fn=lambda m, fqn: id(m) in chosen)
    except (ImportError, NotImplementedError, AssertionError, RuntimeError, ValueError) as exc:
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ZOError(f"--quantize {mode} is not available here: torchao says {why!r}") from None
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
    (int8/int4 data plus scales; bitsandbytes' quantization state: absmaxes, codebooks), a tensor
    shared by several modules (a tied weight, a common codebook) counts once."""
    import sys

    base = sys.modules.get("torchao.utils")
    quantized = base.TorchAOBaseTensor if base is not None else ()

    def leaves(t: torch.Tensor):
        if quantized and isinstance(t, quantized):
            names, _ = t.__tensor_flatten__()
            for n in names:
                yield from leaves(getattr(t, n))
            return
        yield t
        state = getattr(t, "quant_state", None)  # bitsandbytes Params4bit
        while state is not None:
            yield from (v for v in (state.absmax, state.code, state.offset) if isinstance(v, torch.Tensor))
            state = state.state2 if state.nested else None

    tensors = {id(leaf): leaf for t in [*model.parameters(), *model.buffers()] for leaf in leaves(t)}
    return sum(t.numel() * t.element_size() for t in tensors.values())
