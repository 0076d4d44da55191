"""What this machine offers a run: the device, the base's dtype (and why), threads, peak memory.

Precision follows the hardware: a bf16 base only where the trainable values
stay float32 (or are written without bias) and the device computes bf16
natively *and fast*. On a CPU, bf16 instructions are not enough: with AMX a
SmolLM2 forward is 3.4x faster in bf16, while a Xeon with avx512_bf16 but no
AMX ran it at 0.64x of fp32, and one with AVX-512 but no bf16 instructions (which
oneDNN emulates) at 0.35x (benchmarks/results/precision*.md). So on a CPU
``auto`` measures a small transformer block in both dtypes once per machine
(cached) and takes bf16 only where it wins. What was picked, and why, goes
into the run's summary.

Where a bf16 base is asked for on a CPU without bf16 instructions, its matmuls
run in fp32 and round to bf16 (:func:`bf16_matmuls_in_fp32`): native bf16
hardware multiplies bf16 values and accumulates in fp32 too, so the numbers are
the same up to summation order, at fp32's speed instead of torch's emulation
(a SmolLM2 forward 3.4x slower than fp32, benchmarks/results/bf16_matmul.md).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from . import atomic
from .errors import require
from .home import zotune_home

#: bf16 must beat fp32 by this factor on the probe block before ``auto`` takes it on a CPU
#: (below it, bf16's coarser evaluation would cost precision for no time saved).
BF16_MIN_SPEEDUP = 1.15


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    require(name != "cuda" or torch.cuda.is_available(), "device cuda requested but CUDA is not available")
    return name


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (avx512_bf16 or AMX), as torch's CPU-feature probe sees it.

    Why not oneDNN's ``_is_mkldnn_bf16_supported``: it says yes on any AVX-512 CPU, where oneDNN
    emulates bf16 (an Ice Lake Xeon without avx512_bf16 ran a SmolLM2 forward at 0.35x of fp32).
    """
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(callable(probe) for probe in probes):
        return any(bool(probe()) for probe in probes)
    try:  # an older torch without those probes
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


def cpu_info() -> tuple[str, set[str]]:
    """The CPU's model name and feature flags as /proc/cpuinfo lists them ("" and none where it cannot be read)."""
    name, flags = "", set()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    return name, flags


def cpu_name() -> str:
    """The CPU's model name and its bf16-relevant flags: what the bf16 measurement is cached under."""
    name, flags = cpu_info()
    isa = sorted(f for f in flags if f in {"avx512_bf16", "amx_bf16", "amx_tile", "avx512f", "avx2"})
    return f"{name or platform.processor() or platform.machine()} [{' '.join(isa)}]"


def machine_name(device: str) -> str:
    """What a run trained on: the GPU's name on CUDA, else the CPU's model and bf16-relevant flags.

    Why a run records it: a study that spans sessions runs on machines that differ (bf16 native on one,
    emulated on the next), and its results should say which runs came from where.
    """
    if device == "cuda" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA)"
    return cpu_name()


def measure_bf16_speedup(repeats: int = 3) -> float:
    """fp32 time / bf16 time of one forward of a 2-layer SmolLM2-shaped Llama (16 x 64 tokens, 1 thread).

    Why a whole block and not a matmul: on a CPU with avx512_bf16 but no AMX a bf16 matmul gains
    little over fp32, while norms, softmax and dtype conversions lose, and a real SmolLM2 forward
    there took 0.64x the speed of fp32 (benchmarks/results/precision_avx512bf16_no_amx.md); only the
    block as a whole predicts that. Timings are interleaved so a busy machine slows both alike.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=9,
                              num_key_value_heads=3, vocab_size=1024)
            models = {torch.float32: LlamaForCausalLM(cfg).eval()}
            models[torch.bfloat16] = LlamaForCausalLM(cfg).eval().to(torch.bfloat16)
            ids = torch.randint(0, cfg.vocab_size, (16, 64))
        times: dict[torch.dtype, list[float]] = {d: [] for d in models}
        with torch.no_grad():
            for i in range(repeats + 1):
                for dtype, model in models.items():
                    start = time.perf_counter()
                    model(ids)
                    if i:  # the first round warms up (oneDNN picks its kernels)
                        times[dtype].append(time.perf_counter() - start)
        return statistics.median(times[torch.float32]) / statistics.median(times[torch.bfloat16])
    finally:
        torch.set_num_threads(threads)


def cpu_bf16_speedup() -> float:
    """:func:`measure_bf16_speedup` for this machine, measured once and kept in ``$ZOTUNE_HOME/cpu_bf16.json``
    (keyed by CPU model, flags and torch version; delete the file to measure again)."""
    path = zotune_home() / "cpu_bf16.json"
    key = f"{cpu_name()} torch {torch.__version__}"
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if not isinstance(cache, dict):
        cache = {}
    if isinstance(cache.get(key), (int, float)):
        return float(cache[key])
    speedup = measure_bf16_speedup()
    cache[key] = round(speedup, 3)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path, json.dumps(cache, indent=2))
    except OSError:  # a read-only home: measure again next time
        pass
    return speedup


@dataclass(frozen=True)
class Precision:
    """The base weights' dtype and the reason it was chosen (printed in the run's summary)."""

    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def pick_dtype(name: str, device: str, method_cls, need_speedup: bool = True) -> Precision:
    """The base weights' dtype: bf16 only where the trainable values stay fp32 and the hardware is fast at it.

    ``need_speedup=False`` takes bf16 wherever the CPU has bf16 instructions, fast or not (the regime
    study's protocol: its subject is bf16's evaluation noise, not its speed).
    """
    if name == "auto":
        if not method_cls.bf16_base or getattr(method_cls, "trains_base_dtype", False):
            return Precision(torch.float32, f"auto: {method_cls.name} trains base weights or norms, whose "
                                            f"small updates bf16 would round away (--dtype bfloat16 writes "
                                            f"them with stochastic rounding where the method supports it)")
        if device == "cuda":
            if torch.cuda.is_bf16_supported():
                return Precision(torch.bfloat16, "auto: this CUDA GPU computes bf16")
            return Precision(torch.float32, "auto: this CUDA GPU has no bf16")
        if not cpu_has_native_bf16():
            return Precision(torch.float32, "auto: this CPU has no native bf16 (no avx512_bf16/AMX)")
        if not need_speedup:
            return Precision(torch.bfloat16, "auto: this CPU computes bf16 natively (avx512_bf16/AMX)")
        speedup = cpu_bf16_speedup()
        if speedup >= BF16_MIN_SPEEDUP:
            return Precision(torch.bfloat16, f"auto: this CPU computes bf16 natively and fast (a bf16 forward "
                                             f"measured {speedup:.2f}x as fast as fp32)")
        return Precision(torch.float32, f"auto: this CPU has bf16 instructions but a bf16 forward measured "
                                        f"{speedup:.2f}x the speed of fp32 (below {BF16_MIN_SPEEDUP}x), so fp32")
    require(name == "float32" or method_cls.bf16_base,
            f"--dtype bfloat16: method {method_cls.name!r} trains base weights or norms, whose ZO updates "
            f"(lr*g*z, often ~1e-6) vanish in bfloat16; use --dtype float32 or a LoRA-type method")
    return Precision(torch.bfloat16 if name == "bfloat16" else torch.float32, f"--dtype {name}")


def peak_memory_mb(device: str) -> float:
    """Peak memory of this process: GPU allocations on CUDA, resident set size on CPU."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


#: ``ZOTUNE_CPU_BF16_MATMUL``: ``auto`` (fp32 matmuls for a bf16 base on a CPU without native bf16) or
#: ``native`` (leave them to torch, which emulates bf16 there; for measuring the difference)
CPU_BF16_MATMUL_ENV = "ZOTUNE_CPU_BF16_MATMUL"


def cpu_bf16_matmul_policy() -> str:
    policy = os.environ.get(CPU_BF16_MATMUL_ENV, "auto")
    require(policy in ("auto", "native"), f"{CPU_BF16_MATMUL_ENV}={policy!r}: expected 'auto' or 'native'")
    return policy


def fp32_matmuls_for_bf16(dtype: torch.dtype, device: str) -> bool:
    """Whether a bf16 base on ``device`` gets its matmuls in fp32 (:func:`bf16_matmuls_in_fp32`): on a CPU
    without native bf16, unless ``ZOTUNE_CPU_BF16_MATMUL=native``."""
    return (dtype == torch.bfloat16 and device == "cpu" and cpu_bf16_matmul_policy() == "auto"
            and not cpu_has_native_bf16())


class _LinearInFp32(TorchFunctionMode):
    """``F.linear`` on bf16 operands computed in fp32 and rounded to bf16: the products of bf16 values are
    exact in fp32, and native bf16 hardware (AMX, avx512_bf16, tensor cores) accumulates them in fp32 too.
    A quantized weight (torchao's int8, a tensor subclass) is left to its own kernel."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            names = ("input", "weight", "bias")
            x, w, b = (*args, *(kwargs.get(n) for n in names[len(args):]))[:3]
            plain = type(w) in (torch.Tensor, nn.Parameter)  # a quantized weight keeps its own kernel
            if plain and x.dtype == w.dtype == torch.bfloat16 and x.device.type == "cpu":
                return F.linear(x.float(), w.float(), None if b is None else b.float()).to(torch.bfloat16)
        return func(*args, **kwargs)


def bf16_matmuls_in_fp32(model: nn.Module) -> None:
    """Make every bf16 ``nn.Linear`` of ``model`` compute its matmul in fp32 and round the result to bf16.

    Why: on a CPU without bf16 instructions torch emulates a bf16 matmul at under a third of fp32's speed,
    while the base's weights and activations can stay bf16 (its memory and its rounding, the noise a
    ZO estimate sees) with only the multiply-accumulate in fp32, as native bf16 hardware does it. Why
    hooks on each layer rather than one mode around the run: the mode then covers exactly the base's
    linear layers, wherever they are called from (peft's LoRA wraps them; its own factors stay fp32).
    The closing hook runs even when the forward raises, so the mode never outlives its layer.
    """
    mode = _LinearInFp32()

    def enter(*_) -> None:  # a pre-hook's return value would replace the layer's input
        mode.__enter__()

    def leave(*_) -> None:
        mode.__exit__(None, None, None)

    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight.dtype == torch.bfloat16:
            module.register_forward_pre_hook(enter)
            module.register_forward_hook(leave, always_call=True)
    model._zotune_matmuls_in_fp32 = True


def matmuls_in_fp32(model: nn.Module) -> bool:
    """Whether :func:`bf16_matmuls_in_fp32` hooked ``model``: what a run records, read from the model itself
    so the record cannot drift from the decision :func:`zotune.models.load_model` made."""
    return getattr(model, "_zotune_matmuls_in_fp32", False)
