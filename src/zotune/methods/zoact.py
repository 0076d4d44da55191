"""ZO-Act: ZO over C in W + C·Uᵀ, with U the top-k activation directions of each layer (one-shot calibration).

Before training, a few calibration examples run once through the frozen model;
each adapted linear layer keeps U ∈ R^{d_in×k}, the top-k right singular
vectors of its input activations X (``zotune.calibration``; our reading of the
paper: plain SVD of the uncentred token activations). The layer becomes
W + C·Uᵀ with C ∈ R^{d_out×k} zero-initialized: only C is trainable, so a query
has d_out·k dimensions instead of d_out·d_in, and its bias is small because a
weight gradient δ·xᵀ has its row space mostly in span(U). C is small, so a
real optimizer state fits: ``--optimizer adam`` keeps Adam's moments in C's
space.

This is a peft LoRA layer with A = Uᵀ (frozen, not queried), B = C and scale 1
(``lora_alpha = r = k``): the saved adapter is a standard PEFT LoRA adapter, U
included, that ``PeftModel.from_pretrained`` loads and ``merge_and_unload``
merges. U is part of the run (``calibration.safetensors`` in the run
directory, ``method_state`` in :class:`zotune.ZOOptimizer`'s state), so resume
and replay reuse it instead of recomputing it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

from ..adapters import attach_lora, lora_params, target_modules
from ..calibration import CalibrationReport, activation_bases
from ..errors import ZOError
from ..options import Options, setting
from .base import Method, register


@dataclass
class ZOActOptions(Options):
    prefix = "zoact"
    rank: int = setting(16, "ZO-Act: k, the number of top activation directions U per layer (trainable C is "
                            "d_out x k). zoact steps with Adam and 2 queries unless --optimizer/--queries say "
                            "otherwise; more queries lower the variance at 2 forwards each")

    def validate(self) -> None:
        self.check("zoact_rank", self.rank >= 1, ">= 1")


@register
class ZOAct(Method):
    name = "zoact"
    bf16_base = True
    batchable = True  # its views are LoRA factors: zotune.batched
    needs_calibration = True
    options_cls = ZOActOptions
    # Adam with 2 queries per step, as the ZO-Act paper steps; lr probed for the default job (rotten-tomatoes,
    # SmolLM2-135M, bf16 base): benchmarks/results/main_job/tune_session5/README.md and main_job/README.md
    suggested_lr = 2e-3
    suggested_lr_tuned = True
    default_optimizer = "adam"
    default_queries = 2

    def __init__(self, cfg):
        super().__init__(cfg)
        self.report: CalibrationReport | None = None
        self.lora_A: dict[str, nn.Parameter] = {}

    def _targets(self, model: nn.Module) -> dict[str, nn.Module]:
        """The linear layers peft will adapt, by their name in the un-wrapped model."""
        from transformers.pytorch_utils import Conv1D

        names = set(target_modules(model, self.cfg.target_modules or None))
        return {n: m for n, m in model.named_modules()
                if n.rsplit(".", 1)[-1] in names and isinstance(m, (nn.Linear, Conv1D))}

    def calibrate(self, model: nn.Module, batches: list) -> None:
        k = self.options.rank
        bases, self.report = activation_bases(model, self._targets(model), batches, k, progress=self.cfg.progress)
        self.calibration = bases  # name -> U [d_in, k]
        if self.cfg.progress:
            print(f"zotune: {self.report.text()}", file=sys.stderr)

    def prepare(self, model: nn.Module) -> nn.Module:
        if not self.calibration:
            raise ZOError("zoact: no activation basis; calibrate first (zotune train does; "
                          "ZOOptimizer needs calibration=...)")
        targets = self._targets(model)
        missing = sorted(set(targets) - set(self.calibration))
        if missing:
            raise ZOError(f"zoact: no activation basis for layer {missing[0]} (calibrated for other layers?)")
        k = self.options.rank
        for name, u in self.calibration.items():
            if u.shape[1] != k:
                raise ZOError(f"zoact: basis of {name} has rank {u.shape[1]}, zoact_rank is {k}")
        by_module = {id(m): n for n, m in targets.items()}
        model = attach_lora(model, k, float(k), list({n.rsplit(".", 1)[-1] for n in targets}))  # scale k/k = 1
        from peft.tuners.lora import LoraLayer

        self.lora_A = {}
        for m in model.modules():
            if isinstance(m, LoraLayer):
                name = by_module[id(m.get_base_layer())]
                a = m.lora_A["default"].weight  # [k, d_in]
                with torch.no_grad():
                    a.copy_(self.calibration[name].T.to(a.dtype))
                a.requires_grad_(False)
                self.lora_A[name] = a
                assert m.scaling["default"] == 1.0
        # C = lora_B (zero-init by peft) is all that is trainable and queried; A = Uᵀ stays frozen.
        self.params = {n: p for n, p in lora_params(model).items() if "lora_B" in n}
        return model

    def state_dict(self) -> dict:
        return {"calibration": {n: u.clone() for n, u in self.calibration.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Take a saved basis; after :meth:`prepare`, also write it into the adapter's A = Uᵀ."""
        saved = state.get("calibration")
        if not saved:
            return
        self.calibration = {n: u.clone() for n, u in saved.items()}
        with torch.no_grad():
            for name, a in self.lora_A.items():
                a.copy_(self.calibration[name].T.to(a.dtype))
