"""zotune from your own code: :class:`ZOOptimizer`, a torch.optim-style zeroth-order optimizer.

The CLI's recipe (``zotune train``) is one way to drive the ZO engine; this
module is the other: you own the model, the data and the loop, zotune owns the
step. ``ZOOptimizer`` builds exactly what ``zotune train`` builds for the same
settings (a :class:`~zotune.config.TrainConfig`, the method's ``prepare``, the
optimizer and a :class:`~zotune.engine.ZOEngine`), so the same config and seed
give bit-identical adapters either way.

For a peft model you built yourself, method ``"params"`` (:mod:`zotune.methods.params`)
perturbs tensors *you* choose, with no adapter attached by zotune.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .calibration import Calibration
from .config import TrainConfig
from .engine import StepResult, ZOEngine, engine_state, load_engine_state
from .errors import ZOError
from .methods import get_method
from .methods.params import ParamsMethod, ParamsSpec
from .setup import build_engine

__all__ = ["ZOOptimizer", "ParamsMethod"]

Closure = Callable[[], "float | torch.Tensor"]


def _config(method: str, lr: float | None, eps: float | None, queries: int | None, optimizer: str | None, seed: int,
            settings: dict[str, Any]) -> TrainConfig:
    """The TrainConfig ``zotune train`` would resolve for these settings (its defaults where None)."""
    eps = TrainConfig().eps if eps is None else eps
    if "rank" in settings:  # the spelling; TrainConfig calls it lora_r
        if "lora_r" in settings:
            raise ZOError("give the LoRA rank once: rank= or lora_r=, not both")
        settings["lora_r"] = settings.pop("rank")
    from .methods import option_owners

    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"options"}
    unknown = sorted(set(settings) - fields - set(option_owners()))
    if unknown:
        raise ZOError(f"unknown setting(s) {', '.join(unknown)}; ZOOptimizer takes TrainConfig fields "
                      f"(see `zotune train --help`), e.g. lora_r, lora_alpha, target_modules, weight_decay")
    given = dict(method=method, eps=eps, seed=seed, **settings)
    for name, value in (("lr", lr), ("queries", queries), ("optimizer", optimizer)):
        if value is not None:  # else the method's own (its suggested lr, ...), as `zotune train` leaves them
            given[name] = value
    return TrainConfig.from_dict(given, source="ZOOptimizer").validate()


class ZOOptimizer(torch.optim.Optimizer):
    """A zeroth-order optimizer with the torch.optim interface: ``loss = opt.step(closure)``.

    Each step evaluates ``closure()`` twice per query, at θ+εz and θ−εz, along a
    direction z drawn from (seed, step, query, tensor name), restores θ (exactly,
    or for float32 full-weight methods by subtracting the regenerated z, or for
    bf16 ones exactly without a copy by the patch restore: ``restore=``)
    and moves it by the measured slope. No backward pass: the closure may
    compute any objective, differentiable or not (accuracy, a reward), as long
    as it returns a scalar (float or one-element tensor) that is *lower when
    better*, and sees the same data in both calls.

    Example (SmolLM2 with AR1-ZO on the default task)::

        import torch, zotune
        from zotune.models import load_model
        from zotune.evaluate import Scorer
        from zotune.tasks import load_task

        model, tok, _ = load_model("smollm2-135m")
        opt = zotune.ZOOptimizer(model, method="ar1zo", lr=1.5e-2, eps=1e-2, lora_r=8, lora_alpha=2)
        model = opt.model                       # LoRA-type methods wrap the model with peft
        scorer = Scorer(model, tok)
        train = load_task("rotten-tomatoes").train[:512]
        for step in range(100):
            batch = train[step * 16 % 512:][:16]
            loss = opt.step(lambda: scorer.loss(batch))   # two forward passes, no backward

    Your own model, your own loss::

        net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        x, y = torch.randn(256, 8), torch.randn(256, 1)
        opt = zotune.ZOOptimizer(net, method="mezo", lr=1e-2, eps=1e-3)
        loss = opt.step(lambda: torch.nn.functional.mse_loss(net(x), y))

    A peft model you built yourself (zotune attaches nothing, it trains the
    tensors with ``requires_grad=True``, or the ones you pass as ``params``)::

        peft_model = peft.get_peft_model(base, peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
        opt = zotune.ZOOptimizer(peft_model, method="params", lr=1e-3, eps=1e-2)

    ZO-Act (C in W + C·Uᵀ, U from one calibration pass), Adam in C's space, an int8 base::

        from zotune.calibration import calibration_batches
        calib = calibration_batches(train, tok, n=32, seed=0)
        opt = zotune.ZOOptimizer(model, method="zoact", optimizer="adam", lr=1e-3, queries=4,
                                 zoact_rank=16, quantize="int8", calibration=calib)

    A non-differentiable objective::

        opt.step(lambda: 1.0 - accuracy(model, batch))

    In a transformers ``Trainer``: :class:`zotune.hf_trainer.ZOTrainer`.

    Learning-rate schedules: ``opt.param_groups[0]["lr"]`` is the lr of the next
    step, so any ``torch.optim.lr_scheduler`` works with ``opt``.

    Args:
        model: the module to train (a transformers model, a peft model, any ``nn.Module``).
        method: a registered method (``zotune methods``): ``"mezo"`` (every
            parameter), ``"mezo-lora"`` (attach peft LoRA, perturb all of A and B),
            ``"ar1zo"`` (attach LoRA, perturb one rank-1 atom per layer per step), or
            ``"params"`` (your own tensors, see ``params``).
        lr: learning rate; None takes the method's own, as ``zotune train`` does
            (``zotune methods``: zoact 2e-3, ar1zo 1.5e-2, mezo-lora 3e-3, full mezo 1e-6).
        eps: perturbation size ε; None takes ``zotune train``'s default.
        queries: directions per step; each costs two forward passes. None: the method's own
            (2 for zoact, 1 for the others).
        optimizer: how the slopes become updates: ``"sgd"``, ``"momentum"`` or ``"adam"``
            (their state lives in the queried space). None: the method's own (Adam for zoact).
        seed: the run seed; every direction, and the LoRA initialisation of the
            LoRA-type methods, derive from it.
        params: only for ``method="params"``: a dict ``{name: tensor}``, an iterable
            of ``(name, tensor)`` pairs or of the model's parameters; None means every
            parameter with ``requires_grad=True``.
        calibration: for methods that look at data once before training (``"zoact"``):
            a list of batches, each a dict of model keyword arguments with ``input_ids``
            and ``attention_mask`` (padding is masked out), or a callable returning
            them; :func:`zotune.calibration.calibration_batches` builds them from
            examples and a tokenizer. The result is part of ``state_dict()``, so a
            resumed optimizer uses the saved basis whatever calibration it was built with.
        **settings: any other :class:`~zotune.config.TrainConfig` field, as in
            ``zotune train --help``: ``lora_r`` (alias ``rank``), ``lora_alpha``,
            ``target_modules``, ``ar1_scaling``, ``ar1_schedule``, ``zoact_rank``, ``quantize``
            (``"int8"`` / ``"int4"``: the frozen base stored quantized, needs torchao / bitsandbytes), ``weight_decay``,
            ``momentum``, ``betas``, ...

    Attributes:
        model: the model to use from now on (a peft wrapper for LoRA-type methods).
        method: the :class:`~zotune.methods.Method`; ``method.params`` are the trainable tensors.
        config: the resolved :class:`~zotune.config.TrainConfig`.
        last: the :class:`~zotune.engine.StepResult` of the last step (losses, slopes g, keys).
        forward_passes: closure evaluations so far.
        step_count: steps taken so far.

    ``state_dict()`` / ``load_state_dict()`` capture everything needed to resume
    exactly: step, forward passes, seed, lr, the trainable tensors' values, the
    optimizer's and the method's state.
    """

    def __init__(self, model: nn.Module, method: str, *, lr: float | None = None, eps: float | None = None,
                 queries: int | None = None, optimizer: str | None = None, seed: int = 0, params: ParamsSpec = None,
                 calibration: Calibration | None = None, **settings: Any):
        if not isinstance(model, nn.Module):
            raise ZOError(f"ZOOptimizer needs the model (an nn.Module), got {type(model).__name__}; "
                          "unlike torch.optim it chooses the trainable tensors itself (method=...)")
        if params is not None and method != "params":
            raise ZOError(f"params= selects tensors for method='params'; method {method!r} chooses its own")
        for key in ("lr_schedule", "warmup_steps"):
            if key in settings:  # zotune train's schedule; here the lr is param_groups[0]["lr"], as in torch.optim
                raise ZOError(f"{key}=: ZOOptimizer is a torch.optim.Optimizer, so its lr is scheduled by "
                              f"torch.optim.lr_scheduler (e.g. LinearLR(opt, 1.0, 0.0, total_iters=steps)), "
                              f"which writes the param_groups[0]['lr'] each step reads")
        self.config = cfg = _config(method, lr, eps, queries, optimizer, seed, dict(settings))
        cls = get_method(method)
        self.method = cls(cfg, params=params) if cls is ParamsMethod else cls(cfg)
        self.model, self.engine = build_engine(cfg, model, self.method, calibration)
        self.last: StepResult | None = None
        super().__init__(list(self.method.params.values()), {"lr": cfg.lr})

    # -- the step ------------------------------------------------------------------------
    def step(self, closure: Closure | None = None) -> float:  # type: ignore[override]
        """One step of the method; returns the loss measured *before* the update.

        For ZO methods ``closure`` is called 2·queries times under ``torch.no_grad``
        and the loss is the mean of (L(θ+εz) + L(θ−εz))/2 over queries, the loss at
        θ to first order. Methods with their own step say otherwise in their
        docstring (``agzo``: one extra unperturbed call that also gives L(θ);
        ``fo-lora``: one call with autograd on, which must return a tensor).
        ``self.last.forward_passes`` counts what the step spent.
        """
        if closure is None:
            raise ZOError("ZOOptimizer.step needs a closure returning the loss: opt.step(lambda: loss_fn(batch)); "
                          "a zeroth-order step evaluates it twice per query, at θ+εz and θ−εz")
        lr = float(self.param_groups[0]["lr"])
        if not (math.isfinite(lr) and lr >= 0):
            raise ZOError(f"lr must be >= 0, got {lr}")
        self.last = self.engine.step(closure, lr)
        return self.last.loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do (ZO builds no gradients); kept so torch-style loops run unchanged."""

    @property
    def forward_passes(self) -> int:
        return self.engine.forward_passes

    @property
    def step_count(self) -> int:
        return self.engine.step_count

    @property
    def seed(self) -> int:
        return self.engine.seed

    def num_trainable(self) -> int:
        return self.method.num_trainable()

    def save(self, path: str | Path) -> None:
        """Write what was trained, as ``zotune train`` does: a PEFT adapter folder for LoRA-type methods,
        ``save_pretrained`` for other Hugging Face models, else ``params.safetensors`` (the trainable tensors)."""
        path = Path(path)
        if hasattr(self.model, "save_pretrained"):
            self.method.save(self.model, path)
            return
        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        save_file({n: p.detach().contiguous() for n, p in self.method.params.items()}, str(path / "params.safetensors"))

    # -- resume --------------------------------------------------------------------------
    def state_dict(self, params: bool = True) -> dict[str, Any]:  # type: ignore[override]
        """Everything needed to resume exactly; ``params=False`` leaves out the trainable values
        (for when the model is saved elsewhere, as a Trainer checkpoint does)."""
        return {"method": self.config.method, "eps": self.config.eps, "queries": self.config.queries,
                "lr": [float(g["lr"]) for g in self.param_groups], **engine_state(self.engine, params)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # type: ignore[override]
        """Restore a :meth:`state_dict`: the next step is the one the saved optimizer would have taken."""
        if state.get("method") != self.config.method:
            raise ZOError(f"state is for method {state.get('method')!r}, this optimizer runs {self.config.method!r}")
        if int(state["seed"]) != self.engine.seed:  # say how to build the matching optimizer
            raise ZOError(f"state was saved with seed {state['seed']}; build the optimizer with "
                          f"seed={state['seed']} (this one has seed={self.engine.seed})")
        load_engine_state(self.engine, state)
        self.config.eps = float(state.get("eps", self.config.eps))
        self.config.queries = int(state.get("queries", self.config.queries))
        if isinstance(self.engine, ZOEngine):
            self.engine.eps, self.engine.queries = self.config.eps, self.config.queries
        for g, lr in zip(self.param_groups, state.get("lr", [])):
            g["lr"] = lr

    def __repr__(self) -> str:
        return (f"ZOOptimizer(method={self.config.method!r}, lr={self.param_groups[0]['lr']}, eps={self.config.eps}, "
                f"queries={self.config.queries}, optimizer={self.config.optimizer!r}, seed={self.engine.seed}, "
                f"trainable={self.num_trainable():,}, step={self.engine.step_count})")
