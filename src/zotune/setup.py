"""One setup for every entry point: a config becomes (model, tokenizer, method, engine, scorer).

``zotune train``, ``zotune replay``, ``zotune bench``, :class:`zotune.ZOOptimizer`
and the diagnostics all build a run here, so they build the *same* run:
the same device and dtype, the same quantized base, the same calibration,
the same seeded adapter. The order matters and is written once:

    load model (device, dtype) -> quantize the frozen base -> calibrate (methods
    that look at data once) -> prepare (seeded adapter init) -> engine -> scorer
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .calibration import Calibration, calibration_batches, resolve_batches
from .config import TrainConfig
from .errors import require
from .evaluate import Scorer
from .hardware import Precision, matmuls_in_fp32, pick_device, pick_dtype
from .methods import Method, get_method, prepare_seeded
from .models import load_model, placement_for
from .quantize import quantize_base
from .tasks import TaskData, resolve_task


def load_data(cfg: TrainConfig) -> TaskData:
    """The run's data: the user's files, a YAML task file, or a named task; sampled as the run samples it."""
    data = resolve_task(cfg.task, Path(cfg.data_dir) if cfg.data_dir else None, cfg.train_file, cfg.dev_file,
                        cfg.test_file, text_field=cfg.text_field, label_field=cfg.label_field,
                        text_pair_field=cfg.text_pair_field or None, template=cfg.template,
                        verbalizer=cfg.verbalizer)
    data = data.subsample(cfg.seed, cfg.train_size, cfg.dev_size, cfg.test_size)
    if not cfg.test_size:
        data.test = []
    return data


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The examples of ``step``: epochs of seeded permutations, a pure function of (seed, step).

    Being a function of the step (not of a running RNG) is what makes resume
    and replay trivial: no sampler state to save.
    """
    per_epoch = max(1, n // batch_size)
    epoch, pos = divmod(step, per_epoch)
    perm = list(range(n))
    random.Random(seed * 7919 + epoch).shuffle(perm)
    return perm[pos * batch_size : (pos + 1) * batch_size]


def calibration_source(cfg: TrainConfig, data: TaskData | None, tok) -> Calibration:
    """The calibration data of a run, built only if the method asks: ``cfg.calib_examples`` seeded training
    prompts (the run's data is loaded for it if the caller has none)."""
    def batches() -> list:
        train = (data if data is not None else load_data(cfg)).train
        return calibration_batches(train, tok, cfg.calib_examples, cfg.seed, cfg.eval_batch_size, cfg.max_length)
    return batches


def build_engine(cfg: TrainConfig, model: nn.Module, method: Method | None = None,
                 calibration: Calibration | None = None):
    """Prepare a loaded ``model`` for ``cfg``'s method and build its engine; returns ``(model, engine)``.

    The part of :func:`setup` that a caller with its own model (:class:`zotune.ZOOptimizer`)
    uses: quantize the frozen base (``cfg.quantize``), calibrate (methods with
    ``needs_calibration``, unless the method already holds a saved calibration;
    ``calibration`` is a list of batches or a callable giving them), then prepare
    with the run seed (the adapter's init is part of the run). The method is ``engine.method``.
    """
    method = method or get_method(cfg.method)(cfg)
    if cfg.quantize != "none":
        require(method.is_adapter, f"--quantize {cfg.quantize}: method {cfg.method!r} trains the base weights, "
                                   f"which cannot be stored quantized; use an adapter method")
        quantize_base(model, cfg.quantize)
    if method.needs_calibration and not method.calibration:
        method.calibrate(model, resolve_batches(calibration))
    model = prepare_seeded(method, model, cfg.seed)
    return model, method.build_engine(cfg)


@dataclass
class Setup:
    """A run's working parts, exactly as its config describes them."""

    cfg: TrainConfig
    model: nn.Module
    tokenizer: Any
    method: Method
    engine: Any  # ZOEngine, or a method's own (first-order LoRA)
    scorer: Scorer
    device: str
    precision: Precision
    data: TaskData | None  # what the caller passed (replay and benchmarks may pass none)


def setup(cfg: TrainConfig, data: TaskData | None = None, calibration: dict[str, torch.Tensor] | None = None,
          cluster=None) -> Setup:
    """Build the run ``cfg`` describes.

    ``data``: the run's data if already loaded (else it is loaded only if calibration needs it);
    ``calibration``: a saved calibration (a run directory's) to reuse instead of
    recomputing it; ``cluster``: a :class:`zotune.distributed.Cluster` whose hooks
    the engine gets (torchrun).
    """
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    method_cls = get_method(cfg.method)
    precision = pick_dtype(cfg.dtype, device, method_cls)
    placed = placement_for(device, cfg.device_map or None, cfg.max_memory or None, cfg.offload_folder or None)
    require(placed is None or method_cls.is_adapter,
            f"--device-map/--max-memory: method {cfg.method!r} updates base weights, which accelerate keeps off the "
            f"device (on disk or another device) between forwards; use an adapter method (mezo-lora, ar1zo, zoact, "
            f"subzero-lora)")
    model, tok, kind = load_model(cfg.model, precision.dtype, device, device_map=cfg.device_map or None,
                                  max_memory=cfg.max_memory or None, offload_folder=cfg.offload_folder or None)
    require(kind == "causal", f"model {cfg.model!r} is an encoder; prompt-based training needs a causal LM for now")
    if matmuls_in_fp32(model):
        precision = Precision(precision.dtype, f"{precision.reason}; matmuls in fp32, rounded to bf16, since this "
                                               f"CPU has no native bf16 (ZOTUNE_CPU_BF16_MATMUL=native: torch's)")
    method = method_cls(cfg)
    if calibration:
        method.calibration = calibration  # the run's own basis, bit for bit (never recomputed on resume)
    model, engine = build_engine(cfg, model, method, calibration_source(cfg, data, tok))
    if cluster is not None:
        engine = cluster.wrap(engine)
    return Setup(cfg, model, tok, method, engine, run_scorer(cfg, model, tok), device, precision, data)


def run_scorer(cfg: TrainConfig, model: nn.Module, tok) -> Scorer:
    """The scorer a run of ``cfg`` evaluates and trains with; a measurement beside the runs (the regime
    study's zero-shot) takes it from here, so it scores exactly as the runs do."""
    return Scorer(model, tok, cfg.max_length, scoring=cfg.scoring, share_prompt=cfg.share_prompt,
                  micro_batch_size=cfg.micro_batch_size, compile=cfg.compile)
