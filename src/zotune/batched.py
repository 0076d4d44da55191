"""All perturbations of a step in one forward, for adapter methods (``batched_queries``).

For a peft LoRA layer y = W x + s·B·A·x, the +ε and −ε evaluations of a step
(and its q queries) differ only in the adapter factors. So instead of 2q
forwards over the batch (:meth:`ZOEngine.step`), one forward runs over the
batch repeated c times (copy-major: rows ``[j·n, (j+1)·n)`` are copy j), and
each copy's rows see their own factors:

* central differences: c = 2q copies, (+ε z_i, −ε z_i) for each query i;
* forward differences: c = 1 + q copies, the unperturbed one first.

During that forward every LoRA layer the step queries has peft's own LoRA term
switched off (``disable_adapters``) and a forward hook adds the per-copy term
s·B_j(A_j x_j) with batched matmuls: O(c·r·(d_in + d_out)) per token and no
weight-sized copy. A factor the step does not query (ZO-Act's A = Uᵀ) is shared
by every copy and applied once to the whole stacked input.

The copies' factors are built from the method's own :meth:`Method.views` and
:meth:`Method.direction` with the very float operations the sequential loop
applies to the live tensors (``v + ε z``, then ``2 s − (s + ε z)``), so copy j's
factors are bit-identical to what the sequential step would have in place; the
trainable tensors are never touched while the losses are measured. The slopes
are the sequential step's arithmetic, g = (L+ − L−)/2ε or (L+ − L0)/ε, and the
update goes through :meth:`ZOEngine.apply`, so replaying the logged g rebuilds
the tensors bit for bit, exactly as for a sequential run.

The losses themselves match the sequential ones to float tolerance, not
bitwise: the batched matmuls (bmm over copies) and the larger base matmuls may
sum in another order than the sequential forwards (see
``tests/test_batched_queries.py`` for the measured gaps).

Which methods can do this is declared, not guessed: ``Method.batchable``.
What ``batched_queries: auto`` picks is :func:`use_batched`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .engine import QueryKey, StepResult, ZOEngine
from .errors import ZOError, require

MODES = ("auto", "on", "off")

#: Copy losses of a batch: ``loss_per_copy(c)`` is a ``[c]`` tensor, the mean loss of each copy of the
#: batch repeated c times (copy-major), e.g. ``lambda c: scorer.copy_losses(batch, c)``.
CopyLosses = Callable[[int], torch.Tensor]


def supports(engine) -> bool:
    """Whether ``engine`` can take batched steps: a ZO engine whose method declares ``batchable``."""
    method = getattr(engine, "method", None)
    return isinstance(engine, ZOEngine) and bool(getattr(method, "batchable", False)) \
        and not method.unperturbed_forward


def use_batched(mode: str, engine, device: str = "cpu", micro_batch_size: int = 0, batch_size: int = 0,
                model: nn.Module | None = None) -> bool:
    """What the ``batched_queries`` setting means for this run.

    ``off``: the sequential loop. ``on``: batched steps (a ZOError for a method that cannot).
    ``auto``: batched where it was measured faster (``benchmarks/results/batched_queries.md``,
    SmolLM2-135M on a 1-thread CPU): on CPU when the batch is micro-batched
    (0 < ``micro_batch_size`` < ``batch_size``), where one forward over 2q copies of a
    micro-batch beat 2q forwards by 1.13-1.28x (fp32) and 1.27-1.65x (bf16) for q = 1 and 4.
    Not with whole-batch forwards (``micro_batch_size`` 0): there the copies' larger
    activations cost more than batching saves (fp32 0.85-1.02x; bf16 0.78-1.09x). Not on
    GPU, where it was not measured. ``model`` (when given) must hold only LoRA layers whose
    forward this module reproduces (:func:`unsupported_layers`).
    """
    require(mode in MODES, f"batched_queries must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "off":
        return False
    odd = unsupported_layers(model) if model is not None else []
    if mode == "on":
        require(supports(engine), f"batched_queries on: method {engine.method.name!r} cannot evaluate its "
                                  f"perturbations in one forward (it is not a batchable adapter method); "
                                  f"use batched_queries auto or off")
        require(not odd, f"batched_queries on: LoRA layer {odd[0] if odd else ''} is of a kind whose forward "
                         f"zotune.batched does not reproduce; use batched_queries auto or off")
        return True
    micro_batched = micro_batch_size > 0 and (not batch_size or micro_batch_size < batch_size)
    return supports(engine) and not odd and str(device).startswith("cpu") and micro_batched


# -- the LoRA layers and the copies' factors ------------------------------------------------------
def _lora_classes() -> dict[type, bool]:
    """peft's LoRA linear layer classes this module reproduces -> whether peft casts the LoRA term to the
    base's dtype before adding it (bitsandbytes layers: ``result + (B(A x)·s).to(dtype)``) rather than after
    (``lora.Linear``, torchao included: ``(result + B(A x)·s).to(dtype)``)."""
    from peft.tuners.lora import bnb
    from peft.tuners.lora.layer import Linear

    classes = {Linear: False}
    for name in ("Linear8bitLt", "Linear4bit"):  # defined only where bitsandbytes imports
        if hasattr(bnb, name):
            classes[getattr(bnb, name)] = True
    return classes


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """peft's LoRA linear layers of ``model``: ``lora.Linear`` (over Linear, Conv1D, torchao int8) and the
    bitsandbytes ones (``--quantize int4``)."""
    classes = tuple(_lora_classes())
    return [m for m in model.modules() if isinstance(m, classes)]


def unsupported_layers(model: nn.Module) -> list[str]:
    """Names of peft LoRA layers whose forward :mod:`zotune.batched` does not reproduce (none for zotune's
    own adapters): a batched step over such a model is refused."""
    from peft.tuners.lora import LoraLayer

    classes = tuple(_lora_classes())
    return [n for n, m in model.named_modules() if isinstance(m, LoraLayer) and not isinstance(m, classes)]


class Factor:
    """One LoRA weight (a layer's A or B) with its c per-copy values, made on first use."""

    def __init__(self, layer: nn.Module, which: str, weight: torch.Tensor):
        self.layer, self.which, self.weight = layer, which, weight
        self.copies: torch.Tensor | None = None  # [c, *weight.shape]

    def stack(self, c: int) -> torch.Tensor:
        if self.copies is None:
            w = self.weight.detach()
            require(w.is_contiguous(), f"batched queries: a non-contiguous LoRA {self.which} weight")
            self.copies = w.unsqueeze(0).repeat(c, *([1] * w.dim())).contiguous()
        return self.copies

    def view_in(self, copy: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The part of ``copy`` (one copy of the weight) that ``v`` is of the live weight."""
        offset = v.storage_offset() - self.weight.storage_offset()
        return copy.as_strided(v.shape, v.stride(), copy.storage_offset() + offset)


def factor_index(model: nn.Module) -> dict[int, Factor]:
    """Storage address of every LoRA weight -> its :class:`Factor` (peft's single active adapter)."""
    index = {}
    for layer in lora_layers(model):
        require(not layer.merged, "batched queries: the LoRA adapter is merged into the base weights")
        require(not layer.disable_adapters, "batched queries: the adapters are disabled")
        names = [a for a in layer.active_adapters if a in layer.lora_A]
        require(len(names) == 1, f"batched queries need one active LoRA adapter per layer, found {names}")
        name = names[0]
        require(name not in getattr(layer, "lora_variant", {}), "batched queries: a LoRA variant (DoRA, ...) "
                                                                "has its own forward")
        require(isinstance(layer.lora_dropout[name], nn.Identity), "batched queries: LoRA dropout is on")
        for which, module in (("A", layer.lora_A[name]), ("B", layer.lora_B[name])):
            w = module.weight
            index[w.untyped_storage().data_ptr()] = Factor(layer, which, w)
    return index


def copy_factors(engine: ZOEngine, model: nn.Module, step: int, views, queries: list[int]) -> list[Factor]:
    """The factors of every copy, built as the sequential loop builds them in place.

    Copy order: central: (+z_i, −z_i) for each query i in ``queries``; forward: the
    unperturbed copy, then +z_i per query. Returns the factors some view touches.
    """
    method, eps = engine.method, engine.eps
    central = engine.difference == "central"
    c = 2 * len(queries) if central else 1 + len(queries)
    index = factor_index(model)
    touched: dict[int, Factor] = {}
    for name, v in views:
        factor = index.get(v.untyped_storage().data_ptr())
        if factor is None:
            raise ZOError(f"batched queries: {method.name}'s view {name!r} is not a LoRA factor of the model")
        touched[id(factor)] = factor
        stack = factor.stack(c)
        for i, q in enumerate(queries):
            z = method.direction(name, v, QueryKey(engine.seed, step, q))
            plus = factor.view_in(stack[2 * i if central else 1 + i], v)
            plus.add_(z, alpha=eps)  # as ZOEngine.step: v.add_(z, alpha=eps)
            if central:  # as ZOEngine.step: v.mul_(-1).add_(snapshot, alpha=2)
                factor.view_in(stack[2 * i + 1], v).copy_(plus).mul_(-1).add_(v, alpha=2)
    return list(touched.values())


@contextmanager
def copies_forward(factors: list[Factor], copies: int):
    """While inside, each queried LoRA layer adds s·B_j(A_j x_j) for the rows x_j of copy j (copy-major)."""
    by_layer: dict[int, dict[str, Factor]] = {}
    for f in factors:
        by_layer.setdefault(id(f.layer), {})[f.which] = f
    handles, layers = [], []
    try:
        for parts in by_layer.values():
            layer = next(iter(parts.values())).layer
            handles.append(layer.register_forward_hook(_copy_hook(layer, parts, copies)))
            layer._disable_adapters = True  # peft's forward is then base_layer(x) alone
            layers.append(layer)
        yield
    finally:
        for layer in layers:
            layer._disable_adapters = False
        for h in handles:
            h.remove()


def _copy_hook(layer: nn.Module, parts: dict[str, Factor], c: int):
    name = [a for a in layer.active_adapters if a in layer.lora_A][0]
    a_live, b_live = layer.lora_A[name].weight, layer.lora_B[name].weight
    a_copies = parts["A"].copies if "A" in parts else None  # [c, r, d_in]
    b_copies = parts["B"].copies if "B" in parts else None  # [c, d_out, r]
    scaling = layer.scaling[name]
    cast_first = isinstance(layer, tuple(cls for cls, first in _lora_classes().items() if first))

    def hook(module, args, result):
        x = args[0]
        rows = x.shape[0]
        if rows % c:
            raise ZOError(f"batched queries: a forward of {rows} rows is not {c} copies of a batch")
        convert = not (cast_first and torch.is_autocast_enabled())  # bnb layers skip both casts under autocast
        if convert:
            x = layer._cast_input_dtype(x, a_live.dtype)
        if a_copies is None:  # shared A (ZO-Act's Uᵀ): once over all copies, as peft applies it
            h = F.linear(x, a_live).reshape(c, -1, a_live.shape[0])
        else:
            h = torch.bmm(x.reshape(c, -1, x.shape[-1]), a_copies.transpose(1, 2))
        if b_copies is None:
            delta = F.linear(h, b_live)
        else:
            delta = torch.bmm(h, b_copies.transpose(1, 2))
        delta = delta.reshape(*result.shape[:-1], -1).mul_(scaling)
        if cast_first:  # as peft's bnb layers: result + (lora_B(lora_A(x)) * scaling).to(result's dtype)
            return result + (delta.to(result.dtype) if convert else delta)
        # as peft's lora.Linear: (result + lora_B(lora_A(x)) * scaling).to(result's dtype), in place if it can be
        return result.add_(delta) if result.dtype == delta.dtype else (result + delta).to(result.dtype)

    return hook


# -- the step -------------------------------------------------------------------------------------
@torch.no_grad()
def step_batched(engine: ZOEngine, model: nn.Module, loss_per_copy: CopyLosses, lr: float) -> StepResult:
    """One ZO step of ``engine`` with every perturbed loss from one forward over c copies of the batch.

    Same slopes (to float tolerance), same update path (:meth:`ZOEngine.apply`), same
    forward-pass count (:meth:`Method.forward_cost`) and the same distributed hooks
    (``reduce`` per copy loss, ``local_queries``, ``gather``) as :meth:`ZOEngine.step`.
    """
    require(supports(engine), f"method {getattr(engine.method, 'name', '?')!r} cannot take batched steps")
    step = engine.step_count
    central = engine.difference == "central"
    views = engine.method.views(step)
    queries = list(engine.local_queries())
    c = 2 * len(queries) if central else 1 + len(queries)
    factors = copy_factors(engine, model, step, views, queries)
    with copies_forward(factors, c):
        out = loss_per_copy(c)
    out = out.detach().reshape(-1)
    require(out.numel() == c, f"batched queries: loss_per_copy({c}) gave {out.numel()} losses")
    losses = [float(engine.reduce(float(v))) for v in out.tolist()]
    results, loss_0 = [], None  # (query, g, loss at theta to first order), as ZOEngine.step
    if central:
        for i, q in enumerate(queries):
            loss_plus, loss_minus = losses[2 * i], losses[2 * i + 1]
            results.append((q, (loss_plus - loss_minus) / (2 * engine.eps), (loss_plus + loss_minus) / 2))
    else:
        loss_0 = losses[0]
        for i, q in enumerate(queries):
            results.append((q, (losses[1 + i] - loss_0) / engine.eps, loss_0))
    results = engine.gather(results)
    if not all(math.isfinite(g) and math.isfinite(l) for _, g, l in results) or \
            (loss_0 is not None and not math.isfinite(loss_0)):
        raise FloatingPointError(f"non-finite loss at step {step}")
    grads = [g for _, g, _ in results]
    spent = engine.apply(step, grads, lr, views)
    reported = loss_0 if loss_0 is not None else sum(l for *_, l in results) / len(results)
    return StepResult(step, reported, grads, spent, [QueryKey(engine.seed, step, q) for q, _, _ in results])
