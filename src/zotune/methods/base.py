"""The protocol every ZO method implements, and the registry the CLI reads.

A method answers the first two of zotune's three questions:

* what is trainable: :meth:`Method.prepare` turns a frozen model into one with
  the method's trainable tensors (base weights, LoRA factors, coefficients);
* which directions are queried: :meth:`Method.views` names the tensors (or
  slices of them) perturbed at a step, and :meth:`Method.direction` draws the
  direction for one of them from a :class:`~zotune.engine.QueryKey`.

The third (how estimates become updates) belongs to :mod:`zotune.optim`, and
the perturb/evaluate/restore loop to :mod:`zotune.engine`. Adding a method is
adding one file that subclasses :class:`Method` and calls :func:`register`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..engine import QueryKey, ZOEngine, gaussian_like, tensor_seed
from ..errors import ZOError

METHODS: dict[str, type["Method"]] = {}


def register(cls: type["Method"]) -> type["Method"]:
    """Class decorator: make a method available under its ``name``."""
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type["Method"]:
    if name not in METHODS:
        raise ZOError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name]


NO_DECAY_MARKERS = ("bias", "norm", "ln_", "layernorm", "LayerNorm")


class Method:
    """Base class: Gaussian directions over whole trainable tensors (MeZO's rule).

    Subclasses set ``name`` and implement :meth:`prepare`; most override nothing
    else. ``cfg`` is the run's :class:`~zotune.config.TrainConfig`.
    """

    name: ClassVar[str] = ""
    #: True when the trainable tensors are an adapter saved in PEFT format.
    is_adapter: ClassVar[bool] = True
    #: True when :meth:`prepare` needs :meth:`calibrate` first (a query space chosen from data).
    needs_calibration: ClassVar[bool] = False
    #: True when the trainable values are peft LoRA factors: peft keeps them in float32 over a
    #: bfloat16 base, so the base may be bf16 (``--dtype``). Methods that train base weights or
    #: norms leave it False: an update of lr·g·z ~ 1e-6 vanishes in bf16's 8-bit mantissa.
    bf16_base: ClassVar[bool] = False

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.params: dict[str, nn.Parameter] = {}
        #: What calibration computed (flat name -> tensor). A run directory keeps it
        #: (``calibration.safetensors``) and resume/replay set it back instead of recalibrating.
        self.calibration: dict[str, torch.Tensor] = {}

    def calibrate(self, model: nn.Module, batches: list) -> None:
        """Look at data once before :meth:`prepare` (only called when ``needs_calibration``).

        ``batches`` are dicts of model keyword arguments (``input_ids``,
        ``attention_mask``; see :mod:`zotune.calibration`); fill ``self.calibration``.
        """

    def prepare(self, model: nn.Module) -> nn.Module:
        """Freeze the base, add/choose trainable tensors, fill ``self.params``; return the model."""
        raise NotImplementedError

    def views(self, step: int) -> list[tuple[str, torch.Tensor]]:
        """The (name, tensor-or-view) pairs perturbed at ``step``. Default: all trainable tensors."""
        return [(n, p.data) for n, p in self.params.items()]

    def direction(self, name: str, like: torch.Tensor, key: QueryKey) -> torch.Tensor:
        """The direction z for one view; must be a pure function of (name, key)."""
        return gaussian_like(like, tensor_seed(key, name))

    def decays(self, name: str) -> bool:
        """Whether weight decay applies (MeZO: not to biases and norms)."""
        return not any(m in name for m in NO_DECAY_MARKERS)

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def save(self, model: nn.Module, path: Path) -> None:
        """Write what was trained: a PEFT adapter folder, or the full model for base-weight methods."""
        model.save_pretrained(path)

    def build_engine(self, cfg: Any) -> ZOEngine:
        """The engine that runs this method's steps: a :class:`ZOEngine` with the configured optimizer.

        Override it for a method with its own update rule (e.g. momentum kept in a
        factor space) or with no ZO step at all (first-order LoRA): the recipe only
        needs an object with ``step(loss_fn, lr) -> StepResult``, ``step_count``
        and ``forward_passes``.
        """
        from ..optim import make_optimizer

        optimizer = make_optimizer(cfg.optimizer, cfg.weight_decay, cfg.momentum, tuple(float(b) for b in cfg.betas))
        return ZOEngine(self, optimizer, cfg.eps, cfg.queries, cfg.seed, difference=cfg.difference)

    @classmethod
    def forwards_per_step(cls, cfg: Any) -> int:
        """Forward-pass equivalents one step costs, the unit budgets are compared in (``zotune bench``).

        A ZO step spends two forward passes per query (central differences) or
        one per query plus the shared L(θ) (forward differences). A method whose
        step is not built of such forwards overrides this: first-order LoRA
        counts its forward + backward as 3 forward passes.
        """
        return 2 * cfg.queries if cfg.difference == "central" else 1 + cfg.queries

    def state_dict(self) -> dict:
        """Method state needed to resume exactly (schedules, bases, ...); none by default."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def prepare_seeded(method: Method, model: nn.Module, seed: int) -> nn.Module:
    """``method.prepare(model)`` with torch's global RNG seeded by ``seed`` (peft draws LoRA's A from it).

    The initial adapter is then a function of the run seed, and the caller's
    global RNG is left as it was.
    """
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        torch.manual_seed(seed)
        return method.prepare(model)
