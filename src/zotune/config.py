"""Run configuration as data: one dataclass, loadable from YAML, overridable from the CLI.

Every field's ``help`` is what ``zotune train --help`` prints, so the
documentation of a knob lives next to its default.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .engine import DIFFERENCES, RESTORES
from .errors import ZOError, require
from .optim import LR_SCHEDULES
from .options import coerce, default_of, is_number, setting

#: short dtype names a config or flag may use; stored under the long name (config.yaml, summaries)
DTYPE_ALIASES = {"bf16": "bfloat16", "fp32": "float32"}


_f = setting


@dataclass
class TrainConfig:
    """Everything that defines a run. Defaults are the README's main job."""

    # what to train
    model: str = _f("smollm2-135m", "named offline model (see `zotune models`) or a local Hugging Face folder")
    task: str = _f("rotten-tomatoes", "task name (see `zotune tasks`) or a YAML task file (your own data)")
    data_dir: str = _f("", "folder with the benchmark data files; empty: $ZOTUNE_DATA, else ../shared/data "
                        "(rotten-tomatoes ships in a package and does not read it)")
    train_file: str = _f("", "your own training data: a .jsonl, .csv or .tsv file (replaces --task)")
    dev_file: str = _f("", "your own dev data (same format)")
    test_file: str = _f("", "your own test data (same format)")
    text_field: str = _f("text", "field (or column number, for files without header) holding the text")
    text_pair_field: str = _f("", "field holding a second text, {text_pair} in the template")
    label_field: str = _f("label", "field holding the label")
    template: str = _f("{text} It was", "prompt template for your own data")
    verbalizer: str = _f("0=terrible,1=great", "label=word pairs for your own data; the words are the candidates")
    method: str = _f("zoact", "ZO method (see `zotune methods`); the step settings you leave unset (lr, optimizer, "
                              "queries, steps) are the method's own, e.g. zoact: Adam, 2 queries, 100 steps")
    # the ZO step
    steps: int = _f(100, "number of ZO steps; unset: the method's own (400 forward passes: 100 for zoact's "
                         "2-query steps, 200 for others)")
    batch_size: int = _f(16, "training examples per step (both perturbations see the same batch)")
    lr: float = _f(2e-3, "learning rate; unset: the method's own (`zotune methods` lists them: 2e-3 for the "
                         "default zoact with Adam, 1.5e-2 ar1zo, 3e-3 mezo-lora, 1e-6 mezo), or auto: probe a "
                         "log grid on a dev split carved from train first (zotune tune)")
    lr_schedule: str = _f("constant", "lr over the run: constant (MeZO's) | linear (from lr down to 0 at the last "
                                      "step) | cosine (half a cosine from lr to 0); after the warmup, if any")
    warmup_steps: int = _f(0, "steps over which the lr first rises linearly from lr/N to lr")
    eps: float = _f(1e-2, "perturbation size epsilon")
    queries: int = _f(2, "queries (directions) per step; each costs two forward passes (one with "
                         "--difference forward); unset: the method's own (2 for zoact, 1 for the others)")
    difference: str = _f("central", "finite difference: central ((L+ - L-)/2eps, 2q forward passes per step) | "
                                    "forward ((L+ - L0)/eps with L0 measured once per step: 1+q forward passes, "
                                    "bias O(eps) instead of O(eps^2)); agzo adds its unperturbed forward to either")
    restore: str = _f("auto", "how a step restores the perturbed weights: auto (for methods that train base "
                              "weights: regenerate in float32, patch in bfloat16/float16; snapshot otherwise) | "
                              "snapshot (copy and copy back: a lr-0 step is bit-identical; one extra copy of the "
                              "queried weights) | regenerate (subtract the regenerated direction: no copy; a few "
                              "float32 ulps of drift per step) | patch (regenerate, and save the few elements whose "
                              "round trip would not be exact: a lr-0 step is bit-identical in any dtype, no "
                              "weight-sized copy). Replay/resume are bit-exact under all of them")
    optimizer: str = _f("adam", "how estimates become updates: sgd | momentum | adam; unset: the method's own "
                                "(adam for zoact, as its paper; sgd for the others, MeZO's memory)")
    batched_queries: str = _f("auto", "evaluate all perturbations of a step in one forward over copies of the batch, "
                                      "each copy with its own adapter (mezo-lora, ar1zo, zoact, subzero-lora): auto "
                                      "(on CPU with --micro-batch-size below the batch size, where it measured "
                                      "1.1-1.65x faster on SmolLM2-135M; off for whole-batch forwards, where it was "
                                      "slower, and on GPU, not measured) | on | off (the sequential loop)")
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
    # methods' own settings live in each method's file (an Options dataclass); here they are held by
    # their flat names (ar1_scaling: canonical), so flags, YAML and ZOOptimizer keywords spell them alike
    options: dict = _f({}, "the method's own settings by flat name (set them as --ar1-scaling, ar1_scaling: ...)",
                       internal=True)
    # methods that calibrate on data, and a quantized frozen base
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
    dtype: str = _f("auto", "the frozen base's dtype: auto (bfloat16 where the device computes bf16 natively and "
                            "fast: a CUDA GPU with bf16, or a CPU with avx512_bf16/AMX on which a bf16 block, timed "
                            "once per machine, beats fp32; for methods whose trainable values "
                            "stay float32 (peft keeps LoRA factors in float32); float32 otherwise. The run directory "
                            "records what auto picked and why) | float32 (fp32) | bfloat16 (bf16)")
    device_map: str = _f("", "place a model larger than one device with accelerate: auto | balanced | sequential "
                             "(empty: the whole model on --device). LoRA-type methods only: the base may be split "
                             "over GPUs, CPU and disk, the trainable factors stay on the execution device")
    max_memory: str = _f("", "per-device budget for --device-map, e.g. 'cpu=300MiB,disk=10GiB' or "
                             "'0=20GiB,cpu=64GiB' (implies --device-map auto)")
    offload_folder: str = _f("", "where weights beyond --max-memory go on disk (empty: a temporary folder)")
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
        require(self.lr_schedule in LR_SCHEDULES,
                f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        require(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        require(self.queries >= 1, f"queries must be >= 1, got {self.queries}")
        require(self.difference in DIFFERENCES, f"unknown difference {self.difference!r}; choose one of: "
                                                f"{', '.join(DIFFERENCES)}")
        require(self.restore in RESTORES, f"unknown restore {self.restore!r}; choose one of: {', '.join(RESTORES)}")
        require(self.lora_r >= 1, f"lora_r (rank) must be > 0, got {self.lora_r}")
        require(self.lora_alpha >= 0, f"lora_alpha must be > 0 (or 0 for the method's default), got {self.lora_alpha}")
        require(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        require(self.eval_every >= 0, f"eval_every must be >= 0, got {self.eval_every}")
        require(self.device in ("auto", "cpu", "cuda"), f"device must be cpu, cuda or auto, got {self.device!r}")
        require(self.dtype in ("auto", "float32", "bfloat16"),
                f"dtype must be auto, float32 (fp32) or bfloat16 (bf16), got {self.dtype!r}")
        require(len(self.betas) == 2 and all(is_number(b) and 0 <= float(b) < 1 for b in self.betas),
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
        require(self.calib_examples >= 1, f"calib_examples must be >= 1, got {self.calib_examples}")
        require(self.quantize in ("none", "int8", "int4"), f"quantize must be none, int8 or int4, got {self.quantize!r}")
        require(len(self.betas) == 2, f"betas must be two numbers, got {self.betas}")
        require(self.scoring in ("restricted", "full"), f"scoring must be restricted or full, got {self.scoring!r}")
        require(self.micro_batch_size >= 0, f"micro_batch_size must be >= 0, got {self.micro_batch_size}")
        from .methods import get_method, option_owners
        from .optim import OPTIMIZERS
        from .tasks import TASKS

        method = get_method(self.method)
        owners = option_owners()
        for key in sorted(set(self.options) - set(method.options_cls.settings())):
            raise ZOError(f"setting {key} applies to method {', '.join(owners.get(key, ['(none)']))}, "
                          f"not to {self.method!r}")
        method.options_cls.from_settings(self.options, f"method {self.method!r}")  # validates each value
        require(self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
        if not self.train_file and not self.task.endswith((".yaml", ".yml")):
            require(self.task in TASKS, f"unknown task {self.task!r}; choose one of: {', '.join(sorted(TASKS))}")
        return self

    def reads_data_dir(self) -> bool:
        """Whether ``data_dir`` can change this run's data: not with the user's own files, a YAML task file,
        or a task that ships in a package (rotten-tomatoes)."""
        from .tasks.base import PACKAGED

        return not (self.train_file or self.dev_file or self.test_file or self.task.endswith((".yaml", ".yml"))
                    or self.task in PACKAGED)

    def to_dict(self) -> dict:
        """Flat settings: the core fields, then the method's own options (its defaults filled in)."""
        from .methods import get_method

        data = dataclasses.asdict(self)
        options = data.pop("options")
        try:
            resolved = get_method(self.method).options_cls.from_settings(options).to_settings()
        except ZOError:  # an unknown method or a bad value: validate() says so; keep what was given
            resolved = {}
        return {**data, **resolved, **{k: v for k, v in options.items() if k not in resolved}}

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "TrainConfig":
        """Settings by flat name; a method's option goes to ``options`` (values of other methods' options
        that equal their defaults are dropped, so a config written by an older zotune still reads)."""
        from .methods import option_owners, get_method, METHODS

        names = {f.name for f in dataclasses.fields(cls)} - {"options"}
        owners = option_owners()
        unknown = sorted(k if isinstance(k, str) and k.isidentifier() else repr(k)
                         for k in set(data) - names - set(owners))
        require(not unknown, f"{source}: unknown setting(s) {', '.join(unknown)}")
        cfg = cls()
        for f in dataclasses.fields(cls):
            if f.name in data and f.name != "options":
                setattr(cfg, f.name, coerce(f, data[f.name], source))
        cfg.dtype = DTYPE_ALIASES.get(cfg.dtype, cfg.dtype)
        if cfg.method in METHODS:  # what the user left unset follows the method (zotune train --method mezo: lr 1e-6)
            for key, value in METHODS[cfg.method].run_defaults().items():
                if key not in data:
                    setattr(cfg, key, value)
        ours = set(get_method(cfg.method).options_cls.settings()) if cfg.method in METHODS else set()
        for key in sorted(set(data) & set(owners)):
            options_cls = METHODS[owners[key][0]].options_cls
            f = options_cls.settings()[key]
            value = coerce(f, data[key], source, key)
            if key in ours or value != default_of(f):
                cfg.options[key] = value
        return cfg

    @classmethod
    def make(cls, **settings: Any) -> "TrainConfig":
        """A config from keyword settings, method options included: ``TrainConfig.make(method="ar1zo",
        ar1_scaling="canonical")``."""
        return cls.from_dict(settings, source="TrainConfig.make")

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

