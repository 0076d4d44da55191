"""What this machine offers a run: the device, the base's dtype (and why), threads, peak memory.

Precision follows the hardware: a bf16 base only where the trainable values
stay float32 (or are written without bias) and the device computes bf16
natively. What was picked, and why, goes into the run's summary.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

import torch

from .errors import require


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    require(name != "cuda" or torch.cuda.is_available(), "device cuda requested but CUDA is not available")
    return name


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (avx512_bf16 or AMX), as torch's oneDNN sees it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


@dataclass(frozen=True)
class Precision:
    """The base weights' dtype and the reason it was chosen (printed in the run's summary)."""

    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def pick_dtype(name: str, device: str, method_cls) -> Precision:
    """The base weights' dtype: bf16 only where the trainable values stay fp32 and the hardware is fast at it."""
    if name == "auto":
        if not method_cls.bf16_base or getattr(method_cls, "trains_base_dtype", False):
            return Precision(torch.float32, f"auto: {method_cls.name} trains base weights or norms, whose "
                                            f"small updates bf16 would round away (--dtype bfloat16 writes "
                                            f"them with stochastic rounding where the method supports it)")
        if device == "cuda":
            if torch.cuda.is_bf16_supported():
                return Precision(torch.bfloat16, "auto: this CUDA GPU computes bf16")
            return Precision(torch.float32, "auto: this CUDA GPU has no bf16")
        if cpu_has_native_bf16():
            return Precision(torch.bfloat16, "auto: this CPU computes bf16 natively (avx512_bf16/AMX)")
        return Precision(torch.float32, "auto: this CPU has no native bf16 (no avx512_bf16/AMX)")
    require(name == "float32" or method_cls.bf16_base,
            f"--dtype bfloat16: method {method_cls.name!r} trains base weights or norms, whose ZO updates "
            f"(lr*g*z, often ~1e-6) vanish in bfloat16; use --dtype float32 or a LoRA-type method")
    return Precision(torch.bfloat16 if name == "bfloat16" else torch.float32, f"--dtype {name}")


def peak_memory_mb(device: str) -> float:
    """Peak memory of this process: GPU allocations on CUDA, resident set size on CPU."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
