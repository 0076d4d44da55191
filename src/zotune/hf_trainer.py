"""``ZOTrainer``: the transformers ``Trainer`` with zotune's zeroth-order step.

It overrides only what it must:

* ``create_optimizer`` returns a small stand-in optimizer that carries the
  learning rate the Trainer's scheduler sets (so ``learning_rate``,
  ``lr_scheduler_type`` and warmup apply to the ZO step unchanged) and whose
  ``state_dict`` is the ZO state (step, forward passes, seed, optimizer
  state), so every checkpoint's ``optimizer.pt`` holds it and
  ``resume_from_checkpoint`` restores it. Its ``step()`` does nothing: the update
  already happened in ``training_step``.
* ``training_step`` does one ZO step whose closure is ``self.compute_loss(model,
  inputs)``, under ``torch.no_grad`` and with the model in eval mode (dropout off,
  so θ+εz and θ−εz are evaluated on the same function), and returns the loss.
* ``log`` replaces ``grad_norm`` (there are no gradients) by ``zo_forward_passes``.

Everything else is the Trainer's own: datasets, collators, ``compute_loss`` /
``compute_loss_func``, evaluation, ``report_to`` logging, ``save_steps``
checkpoints (the model or the peft adapter is saved by the Trainer as usual).

Refused, with a ValueError at construction, because they would misbehave silently:
``gradient_accumulation_steps > 1`` (a ZO step already averages its batch; there
is no gradient to accumulate), ``fp16`` / ``bf16`` mixed precision (the loss
difference L+ − L− is far below half-precision resolution, and the fp16 grad
scaler finds no gradients to unscale), ``gradient_checkpointing`` (no backward
pass), DeepSpeed / FSDP (sharded parameters cannot be perturbed in place),
multi-process training (the ranks' losses would need an all-reduce before the
update), a user optimizer (``optimizers=``, ``optimizer_cls_and_kwargs``) and
``model_init``. Ignored: ``optim`` and the Adam settings (the update rule is
the ZO optimizer's ``optimizer=``), ``max_grad_norm`` (nothing to clip).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from .api import ZOOptimizer

__all__ = ["ZOTrainer"]

logger = logging.getLogger(__name__)


def answer_collator(tokenizer):
    """A causal-LM collator for zotune :class:`~zotune.tasks.Example` lists: prompt + gold answer,
    right-padded, with only the answer's tokens labelled (-100 elsewhere), as ``compute_loss`` expects."""
    def collate(examples) -> dict[str, torch.Tensor]:
        rows = []
        for e in examples:
            prompt = tokenizer(e.prompt).input_ids
            answer = tokenizer(e.candidates[e.label], add_special_tokens=False).input_ids
            rows.append((prompt + answer, [-100] * len(prompt) + answer))
        width = max(len(ids) for ids, _ in rows)
        pad = lambda xs, v: xs + [v] * (width - len(xs))
        return {"input_ids": torch.tensor([pad(ids, tokenizer.pad_token_id) for ids, _ in rows]),
                "attention_mask": torch.tensor([pad([1] * len(ids), 0) for ids, _ in rows]),
                "labels": torch.tensor([pad(labels, -100) for _, labels in rows])}
    return collate


class _ZOHandle(torch.optim.Optimizer):
    """What the Trainer sees as its optimizer: the ZO optimizer's lr and state, a no-op ``step``."""

    def __init__(self, zo: ZOOptimizer, lr: float):
        self.zo = zo
        super().__init__([torch.zeros(0)], {"lr": lr})
        self.param_groups = zo.param_groups  # the scheduler writes the lr where zo.step reads it
        for g in self.param_groups:
            g["lr"] = lr

    def step(self, closure=None):  # type: ignore[override]
        return None  # the ZO update was done in ZOTrainer.training_step

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return self.zo.state_dict(params=False)  # the Trainer saves the weights itself

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # type: ignore[override]
        self.zo.load_state_dict(state)


def _refuse(args: TrainingArguments, kwargs: dict[str, Any]) -> None:
    problems = []
    if args.gradient_accumulation_steps != 1:
        problems.append(f"gradient_accumulation_steps={args.gradient_accumulation_steps}: a ZO step has no gradient "
                        "to accumulate; use a larger per_device_train_batch_size (or queries=) instead")
    if args.fp16 or args.bf16:
        problems.append("fp16/bf16 mixed precision: the ZO loss difference L(θ+εz) − L(θ−εz) is below half-precision "
                        "resolution and the fp16 grad scaler has no gradients to unscale; train in fp32 "
                        "(load the model in bf16 yourself if you must, with a larger eps)")
    if args.gradient_checkpointing:
        problems.append("gradient_checkpointing: ZO runs no backward pass, there is nothing to checkpoint")
    if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
        problems.append("DeepSpeed/FSDP: sharded parameters cannot be perturbed in place")
    if args.world_size > 1:
        problems.append(f"world_size={args.world_size}: distributed ZO needs the ranks' losses all-reduced before "
                        "the update, which ZOTrainer does not do yet; run one process")
    optimizers = kwargs.get("optimizers") or (None, None)
    if any(o is not None for o in optimizers) or kwargs.get("optimizer_cls_and_kwargs") is not None:
        problems.append("a user optimizer or scheduler (optimizers=, optimizer_cls_and_kwargs=): ZOTrainer creates "
                        "its own; pass ZO settings with zo={...} and the lr schedule with TrainingArguments")
    if kwargs.get("model_init") is not None:
        problems.append("model_init: pass the model (ZOTrainer prepares it once for its ZO method)")
    if problems:
        raise ValueError("ZOTrainer does not support " + "; ".join(problems))


class ZOTrainer(Trainer):
    """A ``transformers.Trainer`` that trains with zeroth-order steps (two forward passes, no backward).

    Example::

        from transformers import TrainingArguments
        from zotune.hf_trainer import ZOTrainer

        args = TrainingArguments("out", max_steps=200, per_device_train_batch_size=16, learning_rate=1.5e-2,
                                 lr_scheduler_type="constant", save_steps=100, logging_steps=10, report_to=[])
        trainer = ZOTrainer(model, args, train_dataset=train, data_collator=collate,
                            zo={"method": "ar1zo", "eps": 1e-2, "lora_r": 8, "lora_alpha": 2})
        trainer.train()                       # or trainer.train(resume_from_checkpoint=True)
        trainer.model                         # the trained model (a peft model for LoRA-type methods)

    Args:
        model: the model to train; omit it when ``zo`` is a :class:`~zotune.ZOOptimizer`.
        args: the usual ``TrainingArguments``. ``learning_rate`` and its schedule drive
            the ZO step's lr; ``seed`` and ``weight_decay`` are the ZO run's unless
            ``zo`` sets them. See the module docstring for what is refused or ignored.
        zo: the ZO settings, either a dict of :class:`~zotune.ZOOptimizer` arguments
            (``method``, ``eps``, ``queries``, ``optimizer``, ``lora_r``, ...; default
            ``{"method": "params"}``: train what has ``requires_grad=True``, e.g. your
            own peft model's adapter), or a ready ``ZOOptimizer`` (then ``model`` is its ``opt.model``).
        *rest, **kwargs: the remaining ``Trainer`` arguments (``train_dataset``,
            ``data_collator``, ``eval_dataset``, ``compute_metrics``, ``callbacks``, ...).
    """

    def __init__(self, model: nn.Module | None = None, args: TrainingArguments | None = None, *rest: Any,
                 zo: ZOOptimizer | Mapping[str, Any] | None = None, **kwargs: Any):
        if rest:  # keep the Trainer's positional order without re-declaring its signature
            names = ["data_collator", "train_dataset", "eval_dataset", "processing_class", "model_init",
                     "compute_loss_func", "compute_metrics", "callbacks", "optimizers", "optimizer_cls_and_kwargs",
                     "preprocess_logits_for_metrics"]
            kwargs.update(zip(names, rest))
        if args is None:
            args = TrainingArguments(output_dir="trainer_output")
        _refuse(args, kwargs)
        if isinstance(zo, ZOOptimizer):
            if model is not None and model is not zo.model:
                raise ValueError("with zo=ZOOptimizer(...), pass model=opt.model (or no model): the optimizer "
                                 "owns the prepared model")
            if float(zo.param_groups[0]["lr"]) != float(args.learning_rate):
                logger.warning("ZOTrainer: the ZOOptimizer's lr %s is replaced by TrainingArguments.learning_rate %s "
                               "(and its schedule)", zo.param_groups[0]["lr"], args.learning_rate)
        else:
            if model is None:
                raise ValueError("ZOTrainer needs a model (or zo=ZOOptimizer(model, ...))")
            settings = dict(zo or {})
            if "lr" in settings:
                raise ValueError("set the learning rate with TrainingArguments(learning_rate=...), not in zo=")
            settings.setdefault("method", "params")
            settings.setdefault("seed", args.seed)
            settings.setdefault("weight_decay", args.weight_decay)
            zo = ZOOptimizer(model, lr=args.learning_rate, **settings)
        self.zo = zo
        super().__init__(model=zo.model, args=args, **kwargs)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The stand-in optimizer (see the module docstring); the ZO update lives in ``training_step``."""
        if self.optimizer is None:
            self.optimizer = _ZOHandle(self.zo, self.args.learning_rate)
        return self.optimizer

    def training_step(self, model: nn.Module, inputs: dict[str, torch.Tensor | Any],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        """One ZO step on ``inputs``: ``compute_loss`` twice per query, no backward; returns the loss (detached)."""
        model.eval()  # dropout off: both evaluations must see the same function
        inputs = self._prepare_inputs(inputs)

        def closure() -> float:
            with self.compute_loss_context_manager():
                # a shallow copy: compute_loss may pop "labels" (label smoothing, compute_loss_func)
                loss = self.compute_loss(model, dict(inputs), num_items_in_batch=num_items_in_batch)
            return float(loss.mean()) if isinstance(loss, torch.Tensor) else float(loss)

        with torch.no_grad():
            loss = self.zo.step(closure)
        return torch.tensor(loss, device=self.args.device)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The Trainer's log, with ``zo_forward_passes`` instead of a (meaningless) ``grad_norm``."""
        if "loss" in logs:
            logs.pop("grad_norm", None)
            logs["zo_forward_passes"] = self.zo.forward_passes
        super().log(logs, *args, **kwargs)
