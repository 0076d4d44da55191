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
    queries: int = _f(1, "queries (directions) per step; each costs two forward passes")
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
    threads: int = _f(0, "CPU threads for torch (0 = torch's default)")
    progress: bool = _f(True, "show progress bars")
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
        require(self.lora_r >= 1, f"lora_r (rank) must be > 0, got {self.lora_r}")
        require(self.lora_alpha >= 0, f"lora_alpha must be > 0 (or 0 for the method's default), got {self.lora_alpha}")
        require(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        require(self.eval_every >= 0, f"eval_every must be >= 0, got {self.eval_every}")
        require(self.device in ("auto", "cpu", "cuda"), f"device must be cpu, cuda or auto, got {self.device!r}")
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
        unknown = sorted(set(data) - names)
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
        except yaml.YAMLError as exc:
            raise ZOError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
        require(isinstance(data, dict), f"{path}: expected a mapping of settings at the top level")
        return cls.from_dict({k.replace("-", "_"): v for k, v in data.items()}, str(path))


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
            return bool(value)
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
        return kind(value)
    except (TypeError, ValueError):
        raise ZOError(f"{source}: setting {f.name!r} expects {kind.__name__}, got {value!r}") from None
