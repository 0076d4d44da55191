"""The protocol every ZO method implements, and the registry the CLI reads.

A method answers the first two of zotune's three questions:

* what is trainable: :meth:`Method.prepare` turns a frozen model into one with
  the method's trainable tensors (base weights, LoRA factors, coefficients);
* which directions are queried: :meth:`Method.views` names the tensors (or
  slices of them) perturbed at a step, and :meth:`Method.direction` draws the
  direction for one of them from a :class:`~zotune.engine.QueryKey`.

The third (how estimates become updates) belongs to :mod:`zotune.optim`, and
the perturb/evaluate/restore loop to :mod:`zotune.engine`. Adding a method is
adding one file that subclasses :class:`Method` and calls :func:`register`:
its settings are an :class:`~zotune.options.Options` dataclass in the same file
(``options_cls``), and what it can do is declared as class attributes
(``replayable``, ``distributable``, ``unperturbed_forward``, ...), so nothing
outside the file guesses at it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ..engine import (CHUNK, LOW_PRECISION, QueryKey, ZOEngine, add_chunks_, add_direction_chunks_, direction_chunk,
                      direction_like, tensor_seed)
from ..errors import ZOError
from ..options import NoOptions, Options

METHODS: dict[str, type["Method"]] = {}


def register(cls: type["Method"]) -> type["Method"]:
    """Class decorator: make a method available under its ``name``.

    Its options' flat names must not clash with another method's options of a
    different class (methods that share options share the class, e.g. lozo/lozo-m).
    """
    if not cls.name or not isinstance(cls.suggested_lr, float):
        raise TypeError(f"{cls.__name__}: a registered method needs a name and a float suggested_lr")
    for other in METHODS.values():
        clash = set(cls.options_cls.settings()) & set(other.options_cls.settings())
        if clash and other.options_cls is not cls.options_cls:
            raise TypeError(f"{cls.__name__}: option(s) {sorted(clash)} already belong to method {other.name!r}")
    METHODS[cls.name] = cls
    return cls


def option_owners() -> dict[str, list[str]]:
    """Flat option name -> the registered methods that take it (for flags, YAML and error messages)."""
    owners: dict[str, list[str]] = {}
    for name, cls in sorted(METHODS.items()):
        for flat in cls.options_cls.settings():
            owners.setdefault(flat, []).append(name)
    return owners


def get_method(name: str) -> type["Method"]:
    if name not in METHODS:
        raise ZOError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name]


class LowRankChunks:
    """Flat elements ``[a, b)`` of a low-rank direction z = scale · L·Rᵀ (L m×r, R n×r, float32).

    Why: building the whole m×n product is a weight-sized temporary (108 MiB in float32 for SmolLM2's
    embedding), which put LOZO and SubZero at 1.14-1.33x the memory of inference. Here z is computed in
    fixed bands of rows (about :data:`~zotune.engine.CHUNK` elements each) and each band is sliced for
    the caller, so the values never depend on how a pass chunks the tensor, and at most one band is held.
    """

    def __init__(self, left: torch.Tensor, right: torch.Tensor, scale: float, band: int = CHUNK):
        self.left, self.right, self.scale = left, right, scale
        self.cols = right.shape[0]
        self.rows = max(1, band // self.cols)  # rows per band
        self.numel = left.shape[0] * self.cols
        self._cached: tuple[int, torch.Tensor | None] = (-1, None)

    def band(self, k: int) -> torch.Tensor:
        """Band ``k`` (rows ``k*rows`` to ``(k+1)*rows``), flat, float32; the last one is kept."""
        if self._cached[0] != k:
            r0 = k * self.rows
            self._cached = (k, (self.left[r0:r0 + self.rows] @ self.right.T).mul_(self.scale).view(-1))
        return self._cached[1]

    def __call__(self, a: int, b: int) -> torch.Tensor:
        per, parts, pos = self.rows * self.cols, [], a
        while pos < b:
            k = pos // per
            z = self.band(k)
            stop = min(b, k * per + z.numel())
            parts.append(z[pos - k * per:stop - k * per])
            pos = stop
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def whole(self, shape: torch.Size) -> torch.Tensor:
        return self(0, self.numel).view(shape)


NO_DECAY_MARKERS = ("bias", "norm", "ln_", "layernorm", "LayerNorm")


class Method:
    """Base class: Gaussian directions over whole trainable tensors (MeZO's rule).

    Subclasses set ``name`` and implement :meth:`prepare`; most override nothing
    else. ``cfg`` is the run's :class:`~zotune.config.TrainConfig`; the method's
    own settings are ``self.options`` (an instance of ``options_cls``).
    """

    name: ClassVar[str] = ""
    #: The method's own settings (a dataclass in its file); flags/YAML keys are ``<prefix>_<field>``.
    options_cls: ClassVar[type[Options]] = NoOptions
    #: The lr to start from when none is given for this method (``zotune bench --methods NAME``);
    #: ``suggested_lr_tuned`` says whether it was picked by a probe (on SmolLM2-135M) or guessed.
    suggested_lr: ClassVar[float] = 1e-3
    suggested_lr_tuned: ClassVar[bool] = False
    #: The step settings a run takes when the user leaves them unset (:meth:`run_defaults`): ZO-SGD with
    #: one query keeps MeZO's memory (Adam adds two copies of the trainable tensors, which matters for
    #: full-weight methods); a method whose paper steps differently says so here.
    default_optimizer: ClassVar[str] = "sgd"
    default_queries: ClassVar[int] = 1
    #: Forward passes of a run left at its defaults (steps = this / forwards per step): every method's
    #: no-flag run costs the same, so a comparison at defaults is at matched budget.
    default_forwards: ClassVar[int] = 400
    #: Whether the run's trajectory of scalars (step, g, lr) rebuilds the trained tensors: then
    #: ``--resume`` and ``zotune replay`` work. False for directions that depend on data or for
    #: first-order steps; ``not_replayable`` then says why.
    replayable: ClassVar[bool] = True
    not_replayable: ClassVar[str] = ""
    #: Whether ranks under torchrun can run this method exchanging scalars only.
    distributable: ClassVar[bool] = True
    #: Whether each step starts with one unperturbed, counted forward (:meth:`begin_step`).
    unperturbed_forward: ClassVar[bool] = False
    #: True when the trainable tensors are an adapter saved in PEFT format.
    is_adapter: ClassVar[bool] = True
    #: True when :meth:`prepare` needs :meth:`calibrate` first (a query space chosen from data).
    needs_calibration: ClassVar[bool] = False
    #: True when the trainable values are peft LoRA factors: peft keeps them in float32 over a
    #: bfloat16 base, so the base may be bf16 (``--dtype``). Methods that train base weights or
    #: norms set it with ``trains_base_dtype``: an update of lr·g·z ~ 1e-6 would vanish in bf16's
    #: 8-bit mantissa under round-to-nearest, so the optimizers write it with seeded stochastic rounding.
    bf16_base: ClassVar[bool] = False
    #: True when every perturbation of a step can be evaluated in one forward over copies of the batch
    #: (:mod:`zotune.batched`, ``batched_queries``): each view is (part of) a peft LoRA factor, so the
    #: copies differ only in their adapter factors. Never with ``unperturbed_forward``.
    batchable: ClassVar[bool] = False
    #: True when the trainable values are the base's own tensors (weights, norms), written in the base's
    #: dtype: a bfloat16 base is then allowed on request (``--dtype bfloat16``; updates stochastically
    #: rounded, zotune.rounding) but never picked by ``--dtype auto``.
    trains_base_dtype: ClassVar[bool] = False
    #: How the engine restores the queried tensors under ``--restore auto``: ``snapshot`` (copy them
    #: and back: exact, costs one copy of the query space, tiny for adapters) or ``regenerate``
    #: (subtract the regenerated direction: no copy, a few ulps of drift per float32 step). Methods
    #: that train base weights declare ``regenerate``; their bf16/fp16 weights get the exact ``patch``
    #: restore instead (engine docstring), strided views a snapshot.
    restore_default: ClassVar[str] = "snapshot"

    def __init__(self, cfg: Any):
        self.cfg = cfg
        settings = getattr(cfg, "options", None) or {}
        self.options = self.options_cls.from_settings(settings, f"method {self.name!r}")
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

    def begin_step(self, key: QueryKey, evaluate) -> float | None:
        """Called by the engine before anything is perturbed; ``evaluate()`` is one counted forward.

        A method with ``unperturbed_forward`` runs it here (e.g. to compute the
        step's directions from activations) and returns L(θ); others return None.
        """
        return None

    @property
    def distribution(self) -> str:
        """The distribution of the default direction: ``gaussian`` (MeZO's), or what the method's options pick
        (``--mezo-direction rademacher``). Only read where :meth:`direction` is not overridden."""
        return "gaussian"

    def direction(self, name: str, like: torch.Tensor, key: QueryKey) -> torch.Tensor:
        """The direction z for one view; must be a pure function of (name, key)."""
        return direction_like(like, tensor_seed(key, name), self.distribution)

    def factors(self, name: str, like: torch.Tensor, key: QueryKey) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(L, R, scale) when the direction of this 2-D view is scale · L·Rᵀ (float32 factors), else None.

        A method with low-rank directions (LOZO, SubZero) declares them here; every weight pass then builds
        z a band of rows at a time (:class:`LowRankChunks`) instead of as a weight-sized temporary, and its
        :meth:`direction` should return ``LowRankChunks(*factors).whole(...)`` so all paths see one z.
        """
        return None

    def add_direction_(self, name: str, v: torch.Tensor, key: QueryKey, alpha: float,
                       sr_seed: int | None = None) -> None:
        """``v += alpha * direction(name, v, key)``: every weight pass of the engine and of ZO-SGD.

        The default direction (Gaussian, or :attr:`distribution`) is regenerated chunk by chunk (no tensor-sized temporary);
        an overridden :meth:`direction` is drawn whole. With ``sr_seed``, a bfloat16/float16 ``v``
        gets the sum stochastically rounded (an update); without, rounded to nearest (the +/-eps passes).
        """
        if type(self).direction is Method.direction:
            add_direction_chunks_(v, tensor_seed(key, name), alpha, sr_seed, distribution=self.distribution)
            return
        low = self.factors(name, v, key) if v.dim() == 2 and v.is_contiguous() else None
        if low is not None:
            add_chunks_(v, LowRankChunks(*low), alpha, sr_seed)
            return
        z = self.direction(name, v, key)
        if sr_seed is not None and v.dtype in LOW_PRECISION:
            from ..rounding import add_stochastic_

            add_stochastic_(v, z, sr_seed, alpha=alpha)
        else:
            v.add_(z, alpha=alpha)

    def direction_chunks(self, name: str, v: torch.Tensor, key: QueryKey) -> Callable[[int, int], torch.Tensor]:
        """``chunk(start, stop)``: flat elements ``[start, stop)`` of :meth:`direction` (starts multiples of
        ``BLOCK``), for the engine's patched restore, which walks each view chunk by chunk.

        The default direction is regenerated per chunk into one reused buffer (float32, as
        :meth:`add_direction_` adds it); an overridden :meth:`direction` is drawn whole once per call and sliced.
        A returned chunk is valid until the next call.
        """
        if type(self).direction is Method.direction:
            make, seed, n = direction_chunk(self.distribution), tensor_seed(key, name), v.numel()
            gen = torch.Generator(device=v.device)
            buf = torch.empty(min(n, CHUNK), dtype=torch.float32, device=v.device)
            return lambda a, b: make(seed, n, a, b, v.device, out=buf, gen=gen)
        low = self.factors(name, v, key) if v.dim() == 2 and v.is_contiguous() else None
        if low is not None:
            return LowRankChunks(*low)
        z = self.direction(name, v, key).reshape(-1)
        return lambda a, b: z[a:b]

    def decays(self, name: str) -> bool:
        """Whether weight decay applies (MeZO: not to biases and norms)."""
        return not any(m in name for m in NO_DECAY_MARKERS)

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def save(self, model: nn.Module, path: Path) -> None:
        """Write what was trained: a PEFT adapter folder, or the full model for base-weight methods."""
        model.save_pretrained(path)

    def make_optimizer(self, cfg: Any):
        """How this method's slopes become updates: the configured ZO-SGD, momentum or Adam.

        Override it for a method with its own update rule (LOZO-M's momentum in factor space).
        """
        from ..optim import make_optimizer

        return make_optimizer(cfg.optimizer, cfg.weight_decay, cfg.momentum, tuple(float(b) for b in cfg.betas))

    def build_engine(self, cfg: Any) -> ZOEngine:
        """The engine that runs this method's steps: the shared :class:`ZOEngine`.

        Only a method with no ZO step at all (first-order LoRA) overrides it.
        """
        return ZOEngine(self, self.make_optimizer(cfg), cfg.eps, cfg.queries, cfg.seed, difference=cfg.difference,
                        restore=getattr(cfg, "restore", "auto"))

    @classmethod
    def forward_cost(cls, queries: int, difference: str) -> int:
        """Forward-pass equivalents one step costs: the one place this is computed.

        The engine counts it, replay recounts it, the budget logic and the bench's
        step-cost ratio divide by it. A ZO step spends two forward passes per
        query (central differences) or one per query plus the shared L(θ)
        (forward differences); an ``unperturbed_forward`` adds one to central
        differences (with forward differences it *is* the L(θ)). A method whose
        step is not built of such forwards overrides this (first-order LoRA: 3).
        """
        if difference == "central":
            return 2 * queries + (1 if cls.unperturbed_forward else 0)
        return 1 + queries

    @classmethod
    def run_defaults(cls) -> dict[str, Any]:
        """The lr, optimizer, queries and steps of a run that leaves them unset (TrainConfig.from_dict):
        the method's own, so ``zotune train --method mezo`` runs at MeZO's lr, not at the default method's."""
        steps = max(1, cls.default_forwards // cls.forward_cost(cls.default_queries, "central"))
        return {"lr": cls.suggested_lr, "optimizer": cls.default_optimizer, "queries": cls.default_queries,
                "steps": steps}

    @classmethod
    def forwards_per_step(cls, cfg: Any) -> int:
        """:meth:`forward_cost` for a run's config."""
        return cls.forward_cost(cfg.queries, cfg.difference)

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
