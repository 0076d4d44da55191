"""Run configuration as data: one dataclass, loadable from YAML, overridable from the CLI.

Every field's ``help`` is what ``zotune train --help`` prints, so the
documentation of a knob lives next to its default.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .engine import DIFFERENCES
from .errors import ZOError, require


def _f(default: Any, help: str, **kw) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Everything that defines a run. Defaults are the README's main job."""

    # what to train
    model: str = _f("smollm2-135m", "named offline model (see `zotune models`) or a local Hugging Face folder")
    task: str = _f("rotten-tomatoes", "task name (see `zotune tasks`) or a YAML task file (your own data)")
    data_dir: str = _f("", "folder with the benchmark data files; empty: $ZOTUNE_DATA, else ../shared/data")
    train_file: str = _f("", "your own training data: a .jsonl, .csv or .tsv file (replaces --task)")
    dev_file: str = _f("", "your own dev data (same format)")
    test_file: str = _f("", "your own test data (same format)")
    text_field: str = _f("text", "field (or column number, for files without header) holding the text")
    text_pair_field: str = _f("", "field holding a second text, {text_pair} in the template")
    label_field: str = _f("label", "field holding the label")
    template: str = _f("{text} It was", "prompt template for your own data")
    verbalizer: str = _f("0=terrible,1=great", "label=word pairs for your own data; the words are the candidates")
    method: str = _f("mezo-ln", "ZO method (see `zotune methods`)")
    # the ZO step
    steps: int = _f(200, "number of ZO steps")
    batch_size: int = _f(16, "training examples per step (both perturbations see the same batch)")
    lr: float = _f(1e-2, "learning rate, tuned for the default mezo-ln; on SmolLM2 we found ar1zo stable "
                         "at 1.5e-2 and mezo-lora at 3e-3 (full mezo needs ~1e-6)")
    eps: float = _f(1e-2, "perturbation size epsilon")
    queries: int = _f(1, "queries (directions) per step; each costs two forward passes (one with "
                         "--difference forward)")
    difference: str = _f("central", "finite difference: central ((L+ - L-)/2eps, 2q forward passes per step) | "
                                    "forward ((L+ - L0)/eps with L0 measured once per step: 1+q forward passes, "
                                    "bias O(eps) instead of O(eps^2)); agzo adds its unperturbed forward to either")
    optimizer: str = _f("sgd", "how estimates become updates: sgd | momentum | adam")
    weight_decay: float = _f(0.0, "weight decay (never on biases and norms)")
    momentum: float = _f(0.9, "momentum coefficient (optimizer=momentum)")
    betas: list = _f([0.9, 0.999], "Adam betas (optimizer=adam)")
    # LoRA-type methods
    lora_r: int = _f(8, "LoRA rank r")
    lora_alpha: float = _f(0.0, "LoRA alpha; 0 = the method's default: 16 for mezo-lora (MeZO's; scale 16/r), "
                                "2 for ar1zo (scale 2 at every rank, which is mezo-lora's 16/8 at r=8)")
    target_modules: list = _f([], "what to adapt; empty: the method's default. LoRA methods: module names "
                                  "(default per architecture, e.g. q_proj,v_proj); mezo: parameter-name "
                                  "substrings; mezo-ln: norm module names or 'all' (default: the final norm)")
    # AR1-ZO
    ar1_scaling: str = _f("topology", "AR1-ZO scale: topology (lora_alpha = alpha*r, scale alpha) | canonical (alpha/r) | rslora (alpha/sqrt r)")
    ar1_schedule: str = _f("cyclic", "AR1-ZO atom order: cyclic (k = step mod r) | random")
    ar1_per_layer: bool = _f(False, "AR1-ZO: each layer picks its own atom (seeded offset / independent draw)")
    # low-rank ZO baselines (methods/lozo.py, methods/subzero.py)
    lozo_rank: int = _f(2, "LOZO/LOZO-M: rank r of the perturbation U·Vᵀ of each 2-D weight")
    lozo_nu: int = _f(50, "LOZO/LOZO-M: V is redrawn every nu steps (U every step)")
    subzero_rank: int = _f(24, "SubZero: rank r of the orthonormal bases U, V of each 2-D tensor (capped at its smaller side)")
    subzero_T: int = _f(1000, "SubZero: the bases U, V are redrawn (QR of seeded Gaussians) every T steps")
    # AGZO (activation-subspace directions R·Aᵀ on the adapted layers' full weights)
    agzo_rank: int = _f(8, "AGZO: dimension k of each layer's activation basis A (recomputed every step)")
    agzo_power_iters: int = _f(2, "AGZO: power (subspace) iterations computing A from the step's activations")
    # ZO-Act (and any method that calibrates on data) and a quantized frozen base
    zoact_rank: int = _f(16, "ZO-Act: k, the number of top activation directions U per layer (trainable C is "
                             "d_out x k). Use it with --optimizer adam --lr 1e-3 (what we ran on SmolLM2/SST-2, untuned); "
                             "--queries 1 is cheapest, more queries (e.g. 4) lower the variance at 2 forwards each")
    calib_examples: int = _f(32, "calibration examples (seeded, from the training split) run once through the "
                                 "frozen model by methods that calibrate (zoact)")
    quantize: str = _f("none", "store the frozen base's linear layers quantized: none | int8 (torchao) | int4 "
                               "(bitsandbytes NF4, CPU or CUDA); weight-only, adapter methods only")
    # data and evaluation (MeZO's protocol: 1000 train / 500 dev / 1000 test)
    train_size: int = _f(1000, "training examples sampled from the train split (0 = all)")
    dev_size: int = _f(500, "dev examples sampled for evaluation and best-checkpoint selection (0 = all)")
    test_size: int = _f(0, "test examples evaluated at the end (0 = skip the test split)")
    eval_every: int = _f(0, "evaluate on dev every N steps and keep the best adapter (0 = only at the end)")
    eval_batch_size: int = _f(32, "batch size for evaluation")
    max_length: int = _f(256, "maximum prompt length in tokens (longer prompts keep their end)")
    # bookkeeping
    seed: int = _f(0, "run seed: data order, sampled splits and every direction derive from it")
    output_dir: str = _f("", "run directory; empty: runs/<task>-<method>-<time>")
    device: str = _f("auto", "cpu | cuda | auto")
    dtype: str = _f("auto", "the frozen base's dtype: auto (bfloat16 on a CUDA GPU with bf16 for LoRA-type "
                            "methods, whose trainable factors peft keeps in float32; float32 otherwise, and "
                            "always on CPU, where bf16 matmuls were 6-90x slower here) | float32 | bfloat16")
    threads: int = _f(0, "CPU threads for torch (0 = torch's default)")
    progress: bool = _f(True, "show progress bars")
    # distributed runs (torchrun) and guards
    parallel: str = _f("data", "under torchrun: data (each rank a slice of every batch) | query (each rank "
                               "its share of the queries); only scalars are exchanged")
    check_sync_every: int = _f(50, "under torchrun: compare a checksum of the trainable parameters across "
                                   "ranks every N steps and stop if they differ (0 = only at the end)")
    max_loss_ratio: float = _f(10.0, "stop when the mean loss of the last 10 steps exceeds this multiple of "
                                     "the first 10 steps' mean (0 = never)")
    # forward cost (the forward pass is the whole cost of a ZO step; see zotune.evaluate)
    scoring: str = _f("restricted", "restricted: logits only for the candidates / answer positions | full: the "
                                    "model's whole-vocabulary logits (reference; slower, same scores up to a constant)")
    share_prompt: bool = _f(True, "multi-token candidates: run the prompt once and the candidates on its KV cache")
    micro_batch_size: int = _f(0, "split each batch into length-sorted chunks of N examples: less padding, same "
                                  "mean loss (0 = one forward per batch). On CPU, 4 made SST-2 / RTE batches of 16 "
                                  "1.7x / 2.0x faster (1 thread); on GPU wide batches are usually better")
    compile: bool = _f(False, "torch.compile the model forward (opt-in: on CPU the first call took 16 min on a busy "
                              "machine and the forward was no faster afterwards)")

    def validate(self) -> "TrainConfig":
        """Fail before any work, with the name of the offending setting."""
        require(self.steps >= 0, f"steps must be >= 0, got {self.steps}")
        require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        require(math.isfinite(self.lr) and self.lr >= 0, f"lr must be >= 0, got {self.lr}")
        require(math.isfinite(self.eps) and self.eps > 0, f"eps must be > 0, got {self.eps}")
        require(self.queries >= 1, f"queries must be >= 1, got {self.queries}")
        require(self.difference in DIFFERENCES, f"unknown difference {self.difference!r}; choose one of: "
                                                f"{', '.join(DIFFERENCES)}")
        require(self.lora_r >= 1, f"lora_r (rank) must be > 0, got {self.lora_r}")
        require(self.lora_alpha >= 0, f"lora_alpha must be > 0 (or 0 for the method's default), got {self.lora_alpha}")
        require(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        require(self.eval_every >= 0, f"eval_every must be >= 0, got {self.eval_every}")
        require(self.device in ("auto", "cpu", "cuda"), f"device must be cpu, cuda or auto, got {self.device!r}")
        require(self.dtype in ("auto", "float32", "bfloat16"), f"dtype must be auto, float32 or bfloat16, "
                                                             f"got {self.dtype!r}")
        require(len(self.betas) == 2 and all(_is_number(b) and 0 <= float(b) < 1 for b in self.betas),
                f"betas must be two numbers in [0, 1), got {self.betas}")
        require(all(isinstance(t, str) and t.strip() for t in self.target_modules),
                f"target_modules must be names, got {self.target_modules}")
        require(0 <= self.seed < 2**63, f"seed must be in [0, 2^63), got {self.seed}")
        require(0 <= self.threads <= 4096, f"threads must be >= 0 (0 = torch's default), got {self.threads}")
        require(self.max_length >= 1, f"max_length must be >= 1, got {self.max_length}")
        require(self.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        for name in ("train_size", "dev_size", "test_size"):
            require(getattr(self, name) >= 0, f"{name} must be >= 0 (0 = all), got {getattr(self, name)}")
        require(math.isfinite(self.momentum), f"momentum must be a finite number, got {self.momentum}")
        require(self.parallel in ("data", "query"), f"parallel must be data or query, got {self.parallel!r}")
        require(self.check_sync_every >= 0, f"check_sync_every must be >= 0, got {self.check_sync_every}")
        require(math.isfinite(self.max_loss_ratio) and self.max_loss_ratio >= 0,
                f"max_loss_ratio must be >= 0 (0 disables it), got {self.max_loss_ratio}")
        require(self.zoact_rank >= 1, f"zoact_rank must be >= 1, got {self.zoact_rank}")
        require(self.calib_examples >= 1, f"calib_examples must be >= 1, got {self.calib_examples}")
        require(self.quantize in ("none", "int8", "int4"), f"quantize must be none, int8 or int4, got {self.quantize!r}")
        require(len(self.betas) == 2, f"betas must be two numbers, got {self.betas}")
        require(self.scoring in ("restricted", "full"), f"scoring must be restricted or full, got {self.scoring!r}")
        require(self.micro_batch_size >= 0, f"micro_batch_size must be >= 0, got {self.micro_batch_size}")
        from .methods import get_method
        from .optim import OPTIMIZERS
        from .tasks import TASKS

        get_method(self.method)
        require(self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
        if not self.train_file and not self.task.endswith((".yaml", ".yml")):
            require(self.task in TASKS, f"unknown task {self.task!r}; choose one of: {', '.join(sorted(TASKS))}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k if isinstance(k, str) and k.isidentifier() else repr(k) for k in set(data) - names)
        require(not unknown, f"{source}: unknown setting(s) {', '.join(unknown)}")
        cfg = cls()
        for f in dataclasses.fields(cls):
            if f.name in data:
                setattr(cfg, f.name, coerce(f, data[f.name], source))
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        path = Path(path)
        require(path.exists(), f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as exc:
            raise ZOError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except yaml.YAMLError as exc:
            raise ZOError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
        require(isinstance(data, dict), f"{path}: expected a mapping of settings at the top level")
        return cls.from_dict({k.replace("-", "_") if isinstance(k, str) else k: v for k, v in data.items()}, str(path))


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def coerce(f: dataclasses.Field, value: Any, source: str) -> Any:
    """Convert ``value`` to the type of field ``f``, or say which setting is wrong."""
    kind = type(f.default) if f.default is not dataclasses.MISSING else list
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            if value in (0, 1) and isinstance(value, (bool, int)):
                return bool(value)
            raise ValueError(value)
        if kind is list:
            if isinstance(value, str):
                return [v for v in (x.strip() for x in value.split(",")) if v]
            if not isinstance(value, (list, tuple)):
                raise ValueError(value)
            return list(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        if kind in (int, float) and isinstance(value, bool):
            raise ValueError(value)
        if kind is str and value is None:
            return ""  # `text_pair_field:` (an empty YAML value) means none
        if kind is str and not isinstance(value, (str, int, float)):
            raise ValueError(value)  # a list or mapping where text belongs
        return kind(value)
    except (TypeError, ValueError, OverflowError):
        raise ZOError(f"{source}: setting {f.name!r} expects {kind.__name__}, got {value!r}") from None
