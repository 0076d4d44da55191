"""AGZO (arXiv 2601.17261): perturb each weight only inside its layer's activation subspace.

For a linear layer y = W x, the gradient is G = ∂L/∂W = Σ_tokens δ xᵀ: its rows
lie in the span of the layer's input activations x. Those activations are close
to low-rank, so a direction z = R·Aᵀ, with A ∈ R^{d_in×k} an orthonormal basis
of the top-k activation directions and R ∈ R^{d_out×k} Gaussian, captures most
of the gradient with a query dimension of d_out·k instead of d_out·d_in. In
expectation the estimate g·z is G·A·Aᵀ, the gradient projected onto span(A)
(no rescaling needed: E[R Rᵀ] over R's k columns gives A Aᵀ exactly).

What is trainable: the full weight W (not the bias) of every adapted layer, as
MeZO restricted to those layers. The layers are LoRA's default targets for the
architecture (``adapters.DEFAULT_TARGETS``, e.g. q_proj and v_proj, MeZO's LoRA
choice), or ``--target-modules``: the same layers mezo-lora adapts, so the two
compare on the same modules. Saved like ``mezo``: the full model.

Which forward provides the activations (the crux of an on-the-fly basis).
A must be computed *before* the step perturbs anything, from the step's own
batch at the current weights: the previous step's activations are stale (other
batch, other weights) and the +eps forward's activations would be needed to
build the +eps perturbation itself. So each step first runs one **unperturbed
forward** with hooks on the adapted layers; each hook turns its layer's input
activations (padding tokens excluded) into A by ``agzo_power_iters`` rounds of
subspace iteration (Y = Xᵀ X Ω, QR) started from a seeded Gaussian Ω, and keeps
only A (d_in×k), never X. That forward also yields L(θ), which makes the
one-sided estimate free:

* ``--difference central``: g = (L(θ+εz) − L(θ−εz)) / 2ε,
  **1 + 2q forward passes per step** (3 with q = 1);
* ``--difference forward``: g = (L(θ+εz) − L(θ)) / ε,
  **1 + q forward passes per step** (2 with q = 1, MeZO's cost).

Both are counted in ``forward_passes``. The step's reported loss is L(θ).

The shared engine runs that forward through :meth:`AGZO.begin_step`
(``unperturbed_forward = True``); the perturb/evaluate/restore loop is the
engine's, as for every method.

Reproducibility: R comes from the seed (run seed, step, query, layer) as every
zotune direction; Ω's start too. A, however, is a function of the batch and the
weights, which a trajectory of scalars does not hold, so agzo is declared not
``replayable``: ``zotune replay`` and ``zotune train --resume`` refuse it with a
ZOError. Resume through :class:`zotune.ZOOptimizer` ``state_dict()`` is exact:
it holds the weights and the optimizer state, and the next step recomputes A
from its own batch, so no basis needs saving.

Not ``distributable`` as is: each rank would compute A from its own shard, so
ranks would perturb along different directions (the bases would have to be
agreed on first, e.g. by all-reducing the activation products).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..adapters import target_modules
from ..engine import QueryKey, tensor_seed
from ..errors import ZOError
from ..options import Options, setting
from .base import Method, register


@dataclass
class AGZOOptions(Options):
    prefix = "agzo"
    rank: int = setting(8, "AGZO: dimension k of each layer's activation basis A (recomputed every step)")
    power_iters: int = setting(2, "AGZO: power (subspace) iterations computing A from the step's activations")

    def validate(self) -> None:
        self.check("agzo_rank", self.rank >= 1, ">= 1")
        self.check("agzo_power_iters", self.power_iters >= 1, ">= 1")


def activation_basis(x: torch.Tensor, k: int, iters: int, seed: int) -> torch.Tensor:
    """An orthonormal ``d_in × k`` basis of the top-k right singular directions of ``x`` (tokens × d_in).

    Subspace (block power) iteration on XᵀX, from a seeded Gaussian start; each
    round costs two thin products with X (O(N·d_in·k)), never a d_in × d_in matrix.
    """
    x = x.reshape(-1, x.shape[-1]).float()
    gen = torch.Generator(device=x.device).manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(x.shape[-1], k, generator=gen, device=x.device)).Q
    for _ in range(iters):
        basis = torch.linalg.qr(x.T @ (x @ basis)).Q
    return basis


def is_transposed(module: nn.Module) -> bool:
    """GPT-2's Conv1D stores its weight as d_in × d_out (nn.Linear: d_out × d_in)."""
    return type(module).__name__ == "Conv1D"


@register
class AGZO(Method):
    name = "agzo"
    is_adapter = False
    bf16_base = trains_base_dtype = True  # bf16 on request: updates stochastically rounded (zotune.rounding)
    restore_default = "regenerate"  # no weight-sized snapshot in float32 (engine: restore)
    options_cls = AGZOOptions
    suggested_lr = 1e-3  # probed on SST-2 / SmolLM2-135M at eps 1e-3 (benchmarks/results/sst2_smollm2)
    suggested_lr_tuned = True
    unperturbed_forward = True
    replayable = False
    not_replayable = ("each direction depends on the activations of that step's batch, which the trajectory does "
                      "not hold; start the run again (ZOOptimizer.state_dict() resumes exactly)")
    distributable = False

    def prepare(self, model: nn.Module) -> nn.Module:
        cfg = self.cfg
        from transformers.pytorch_utils import Conv1D

        wanted = set(target_modules(model, cfg.target_modules or None))
        self.layers: dict[str, nn.Module] = {}  # parameter name of W -> its module
        for n, m in model.named_modules():
            if isinstance(m, (nn.Linear, Conv1D)) and n.rsplit(".", 1)[-1] in wanted:
                self.layers[f"{n}.weight"] = m
        for p in model.parameters():
            p.requires_grad_(False)  # ZO builds no graph
        if not self.layers:
            raise ZOError(f"agzo: no linear layer named {', '.join(sorted(wanted))}")
        self.params = {n: m.weight for n, m in self.layers.items()}
        self.rank = min(self.options.rank, *(self.d_in(m) for m in self.layers.values()))
        # The attention mask of the current forward, so padding tokens stay out of A.
        hf = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.backbone = getattr(hf, getattr(hf, "base_model_prefix", ""), None)
        self.bases: dict[str, torch.Tensor] = {}
        return model

    @staticmethod
    def d_in(module: nn.Module) -> int:
        return module.weight.shape[0] if is_transposed(module) else module.weight.shape[1]

    # -- the basis --------------------------------------------------------------------
    def capture(self, key: QueryKey) -> "Capture":
        """A context in which one forward computes every layer's basis A (stored in ``self.bases``)."""
        return Capture(self, key)

    def direction(self, name: str, like: torch.Tensor, key: QueryKey) -> torch.Tensor:
        """z = R·Aᵀ (Conv1D: its transpose), R Gaussian from (seed, step, query, layer)."""
        basis = self.bases.get(name)
        if basis is None:
            raise ZOError("agzo: no activation basis for this step; its directions exist only after "
                          "the step's unperturbed forward (begin_step)")
        d_out = like.shape[1] if is_transposed(self.layers[name]) else like.shape[0]
        gen = torch.Generator(device=basis.device).manual_seed(tensor_seed(key, name))
        r = torch.randn(d_out, basis.shape[1], generator=gen, device=basis.device)
        z = r @ basis.T
        return (z.T if is_transposed(self.layers[name]) else z).to(like.dtype)

    def begin_step(self, key: QueryKey, evaluate) -> float:
        """The step's unperturbed forward: every layer's basis A from its inputs, and L(θ) for free."""
        with self.capture(key):
            return evaluate()


class Capture:
    """Forward hooks that collect each adapted layer's inputs during one loss evaluation, then its basis A.

    The inputs are gathered over every call of the layer inside the context (the
    micro-batches of ``--micro-batch-size``, or a weight applied twice) and the
    basis is computed once on exit, so A spans what the weight saw in the loss:
    padding excluded, no matter how the batch was split.
    """

    def __init__(self, method: AGZO, key: QueryKey):
        self.method, self.key, self.handles, self.mask = method, key, [], None
        self.inputs: dict[str, list[torch.Tensor]] = {}

    def __enter__(self) -> "Capture":
        m = self.method
        m.bases = {}
        if m.backbone is not None:
            self.handles.append(m.backbone.register_forward_pre_hook(self._mask_hook, with_kwargs=True))
        for name, module in m.layers.items():
            self.handles.append(module.register_forward_hook(self._layer_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        if exc[0] is not None:
            return
        m = self.method
        missing = [n for n in m.layers if n not in self.inputs]
        if missing:
            raise ZOError(f"agzo: the loss did not run through adapted layer {missing[0]}")
        for name, chunks in self.inputs.items():
            m.bases[name] = activation_basis(torch.cat(chunks), m.rank, m.options.power_iters,
                                             tensor_seed(self.key, name, "agzo-basis"))
        self.inputs = {}

    def _mask_hook(self, module, args, kwargs):
        self.mask = kwargs.get("attention_mask")

    def _layer_hook(self, name: str) -> Callable:
        def hook(module, inputs, output):
            x = inputs[0]
            if self.mask is not None and self.mask.dim() == 2 and tuple(self.mask.shape) == tuple(x.shape[:2]):
                x = x[self.mask.bool()]  # real tokens only: padding never reaches the loss
            self.inputs.setdefault(name, []).append(x.reshape(-1, x.shape[-1]).detach())
        return hook
