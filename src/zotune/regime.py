"""``zotune bench --preset regime``: the seeds' claims, tested where they apply (issue 16).

Two claims, each in two optimizer arms (ZO-SGD for every method, then Adam for
every method), on SST-2 and two more tasks where SmolLM2-135M is above chance:

* **AR1-ZO** (``ar1``): one rank-1 atom per step with topology scaling (scale α
  at every r) keeps high-rank LoRA trainable where MeZO-LoRA (all of A and B,
  canonical α/r) and the canonical atom (one atom, α/r) degrade. Run: ar1zo,
  mezo-lora and atom-canonical at r = 8 and r = 64 on the run's base (bf16
  where the CPU computes it natively), and the same three at r = 64 in fp32
  (the contrast: the claim says the canonical atom's signal drowns in the bf16
  floor). All three have scale 2 at r = 8 (α 16/8, α 16/8, α 2); at r = 64 the
  canonical two have 0.25 and ar1zo keeps 2.
* **ZO-Act** (``zoact``): ZO over C in W + C·Uᵀ (one-shot activation basis)
  beats AGZO, MeZO-LoRA, LOZO and SubZero at matched forward passes, and an int8
  base costs it nothing. Run: zoact (base dtype), zoact on an int8 base, agzo,
  mezo-lora (r = 8), lozo, subzero. AGZO, LOZO and SubZero train base weights,
  so their base is fp32 whatever the CPU (``--dtype auto`` keeps trained base
  weights in fp32; bf16 would need stochastically rounded updates, a
  different optimizer arithmetic from the other entries). On a bf16 base,
  zoact and mezo-lora (r = 8) run in fp32 as well (the contrast: every entry
  in fp32, so a gap to the three full-weight baselines is not the base's
  precision); on an fp32 base the contrast is the comparison itself.

Per (entry, task): the lr is picked by :func:`zotune.tune.tune` (probes on a dev
split carved out of the training split, never the dev or test files) over the
entry's log grid (5 values, x1/10 .. x10 around a centre; a pick at the grid's
edge extends it by x3 that way, at most twice), at a quarter of the run's
budget; then 3 seeds train at the pick with the full budget (1,000 forward
passes, 2,000 on SST-2; steps rounded up, so AGZO's 3-forward steps spend
1,002 / 2,001) and are tested on a held-out split of 500 (the best-dev
checkpoint, MeZO's protocol). Every run and probe is an ordinary run directory:
a re-run skips what is finished, resumes what was killed (exactly: replayable
methods from their trajectory, AGZO from its last dev evaluation) and never
retries a diverged probe.

Output folder::

    tune/<entry>__<task>/          zotune tune's probes and tune.json (the grid, every probe, the pick)
    runs/<entry>__<task>__s<seed>/  the full runs
    diagnostics/<task>/            grad_cosine.{json,csv,png}: cos(ĝ_n, ∇) against n and r, bf16 noise floor
    zero_shot.json                 the untrained base's accuracy on each seed's test split, per dtype
    results.json, results.csv      one row per run (bench's format + claim, arm, rank, dtype, |g| summary)
    tables.md                      per claim and arm: mean ± std over seeds, paired differences with 95% intervals
    g_summary.md                   per-step |g| (early, late) against the bf16 noise floor, and bf16 against fp32
    verdicts.md                    holds / does not hold / cannot tell, by the rule written at its top
    curves_<claim>_<arm>.png       dev accuracy against forward passes, one panel per task
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import atomic, bench
from .config import DTYPE_ALIASES, TrainConfig
from .diagnostics.grad_cosine import QUERY_CONFIGS
from .errors import ZOError, require
from .rundir import read_summary
from .tasks.base import sample_size
from .tune import PROBE_DEV, abs_slopes, g_growth

# ------------------------------------------------------------------------------------------ the protocol

TASKS = ("sst2", "rotten-tomatoes", "cr")
#: where each task's zero-shot row is in benchmarks/results/zero_shot.json
ZERO_SHOT_NAME = {"cr": "lmbff-cr"}
SEEDS = (0, 1, 2)
ARMS = ("sgd", "adam")
ARM_NAMES = {"sgd": "ZO-SGD", "adam": "Adam"}
RANKS = (8, 64)
CONTRAST_RANK = 64  # the fp32 contrast of the AR1 claim
BUDGETS = {"sst2": 2000}  # forward passes per run; others DEFAULT_BUDGET
DEFAULT_BUDGET = 1000
PROBE_FRACTION = 0.25  # each lr probe spends this share of the run's budget
EVALS = 4  # dev evaluations during a run (plus zero-shot and final)
EXTEND_FACTOR = 3.0
MAX_EXTEND = 2
INT8_MARGIN = 0.02  # "an int8 base costs nothing": no worse than 2 points (non-inferiority)
LEVEL = 0.95
SETTINGS = dict(model="smollm2-135m", batch_size=16, train_size=1000, dev_size=500, test_size=500,
                micro_batch_size=4, queries=1)  # one query per step for every method, zoact included

#: Re-splits: a task whose only big file is its test set. CR's LM-BFF test file (2,000 reviews) becomes
#: 1,200 train / 300 dev / 500 test (seeded); its k-shot train/dev (32 each) are too small for 1,000 examples.
RESPLITS = {"cr": ("lmbff-cr", "test", (("train", 1200), ("dev", 300), ("test", 500)))}
RESPLIT_SEED = 20260116

#: lr grid centres per arm (the grid is x1/10 .. x10 around them, extended at an edge pick). At r = 8 from
#: the SmolLM2 probes (bench.SMOLLM_ENTRIES); other values are starting guesses the probes correct.
LR_CENTRES = {
    "sgd": {"mezo-lora": 3e-3, "ar1zo": 1.5e-2, "atom-canonical": 1.5e-2, "zoact": 3e-3, "agzo": 1e-3,
            "lozo": 5e-5, "subzero": 5e-5},
    "adam": {"mezo-lora": 1e-3, "ar1zo": 1e-3, "atom-canonical": 1e-3, "zoact": 5e-3, "agzo": 1e-5,
             "lozo": 1e-5, "subzero": 1e-5},
}
#: ... times (r/8)^p at rank r. ZO-SGD is stable up to lr ~ 1/(L d): the canonical atom has L ~ s^2 ~ r^-2 at a
#: fixed d (p = 2), MeZO-LoRA L ~ r^-2 and d ~ r (p = 1). Adam moves each coordinate by ~lr, so a scale s ~ 1/r
#: needs lr ~ r (p = 1). ar1zo's scale does not change with r (p = 0).
RANK_POWER = {("sgd", "atom-canonical"): 2, ("sgd", "mezo-lora"): 1, ("adam", "atom-canonical"): 1,
              ("adam", "mezo-lora"): 1}


@dataclass(frozen=True)
class Variant:
    """A query configuration at one rank and precision (``base``: the run's dtype auto; ``fp32``: forced)."""

    config: str  # a key of grad_cosine.QUERY_CONFIGS
    rank: int | None = None
    precision: str = "base"
    quantize: str = "none"

    @property
    def name(self) -> str:
        return self.config + (f"-{self.quantize}" if self.quantize != "none" else "")


@dataclass(frozen=True)
class Claim:
    name: str
    title: str
    method: str  # the claim's method (a Variant name)
    baselines: tuple[str, ...]
    statement: str


CLAIMS = {
    "ar1": Claim("ar1", "AR1-ZO: topology-scaled atom queries at high rank", "ar1zo", ("mezo-lora", "atom-canonical"),
                 "at r = 64 on the run's base, ar1zo reaches a higher test accuracy than MeZO-LoRA and than the "
                 "canonical atom, each at its own tuned lr and the same forward passes"),
    "zoact": Claim("zoact", "ZO-Act: one-shot activation subspaces", "zoact", ("agzo", "mezo-lora", "lozo", "subzero"),
                   "zoact reaches a higher test accuracy than AGZO, MeZO-LoRA, LOZO and SubZero at matched forward "
                   "passes with the same optimizer; on an int8 base it is no worse than on its own base "
                   f"(by more than {INT8_MARGIN:.0%})"),
}


def claim_variants(claim: str, ranks: tuple[int, ...] = RANKS, contrast_rank: int = CONTRAST_RANK) -> list[Variant]:
    if claim == "ar1":
        trio = ("ar1zo", "mezo-lora", "atom-canonical")
        return [Variant(c, r) for c in trio for r in ranks] + [Variant(c, contrast_rank, "fp32") for c in trio]
    if claim == "zoact":
        return [Variant("zoact"), Variant("zoact", quantize="int8"), Variant("agzo"), Variant("mezo-lora", 8),
                Variant("lozo"), Variant("subzero"), Variant("zoact", precision="fp32"),
                Variant("mezo-lora", 8, "fp32")]
    raise ZOError(f"unknown claim {claim!r}; choose from: {', '.join(CLAIMS)}")


def lr_centre(config: str, arm: str, rank: int | None) -> float:
    scale = (rank / 8) ** RANK_POWER.get((arm, config), 0) if rank else 1.0
    return float(f"{LR_CENTRES[arm][config] * scale:.2g}")


@dataclass
class Study:
    """The regime study's settings; the defaults are issue 16's protocol."""

    tasks: tuple[str, ...] = TASKS
    seeds: tuple[int, ...] = SEEDS
    # the lr probes and the diagnostics run at this seed whichever seeds train, so that processes sharing
    # the seeds of one --out (--seeds 0,1 here, --seeds 2 there) read one pick instead of each probing its own
    probe_seed: int = SEEDS[0]
    arms: tuple[str, ...] = ARMS
    claims: tuple[str, ...] = tuple(CLAIMS)
    ranks: tuple[int, ...] = RANKS
    contrast_rank: int = CONTRAST_RANK
    methods: tuple[str, ...] | None = None  # keep only these variant names (ar1zo, zoact-int8, ...)
    budget: int | None = None  # one budget for every task instead of BUDGETS
    probe_fraction: float = PROBE_FRACTION
    probe_dev: int = PROBE_DEV  # the dev split carved out of the training split for the lr probes
    evals: int = EVALS
    max_extend: int = MAX_EXTEND
    settings: dict = field(default_factory=lambda: dict(SETTINGS))
    diagnostics: bool = True
    diag_ns: tuple[int, ...] = (1, 4, 16, 64)
    diag_points: tuple[str, ...] = ("init", "warm")
    shard: tuple[int, int] = (0, 1)  # (k, n): this process does every n-th (entry, task) from the k-th
    base_dtype: str = "auto"  # the base of the "base" cells: auto (bf16 where native) | bfloat16 | float32
    dtypes: tuple[str, ...] | None = None  # run only the cells of these dtypes (bfloat16, float32)

    def budget_for(self, task: str) -> int:
        return self.budget or BUDGETS.get(task, DEFAULT_BUDGET)

    def dev_for(self, task: str) -> int:
        """Dev examples a run of ``task`` evaluates: ``dev_size``, or fewer where a re-split's dev part is smaller."""
        dev = int(self.settings.get("dev_size", 500))
        part = dict(RESPLITS[task][2]).get("dev") if task in RESPLITS else None
        if part is None:
            return dev
        return sample_size(dev, part)  # dev_size 0 means all: the re-split's whole dev part


# -------------------------------------------------------------------------------------------- the data

def resplit_task(task: str, folder: Path, data_dir: str = "", write: bool = True) -> dict:
    """User files re-splitting a named task's big split (``RESPLITS``); returns the settings that use them.

    Each example's prompt becomes the text (template ``{text}``) and its candidates the verbalizer, so the
    prompts are exactly the named task's. Rewritten identically on every call.
    """
    source, split, parts = RESPLITS[task]
    paths = {name: folder / f"{task}_{name}.jsonl" for name, _ in parts}
    if write:
        from .tasks import load_task

        examples = list(getattr(load_task(source, Path(data_dir) if data_dir else None), split))
        need = sum(n for _, n in parts)
        require(len(examples) >= need, f"{source} {split}: {len(examples)} examples, the re-split needs {need}")
        cands = examples[0].candidates
        require(all(e.candidates == cands for e in examples) and all(c.startswith(" ") for c in cands),
                f"{source}: a re-split needs the same one-word candidates for every example")
        random.Random(RESPLIT_SEED).shuffle(examples)
        folder.mkdir(parents=True, exist_ok=True)
        start = 0
        for name, n in parts:
            text = "".join(json.dumps({"text": e.prompt, "label": e.label}) + "\n" for e in examples[start:start + n])
            atomic.write_text(paths[name], text)
            start += n
        verbalizer = ",".join(f"{i}={c.strip()}" for i, c in enumerate(cands))
    else:
        verbalizer = "0=terrible,1=great"
    return {"train_file": str(paths["train"]), "dev_file": str(paths["dev"]), "test_file": str(paths["test"]),
            "template": "{text}", "verbalizer": verbalizer, "text_field": "text", "label_field": "label"}


def task_settings(task: str, out: Path, data_dir: str = "", write: bool = True) -> dict:
    if task == "synthetic":
        return bench.synthetic_task(out / "data", write=write, n_test=64)
    if task in RESPLITS:
        return resplit_task(task, out / "data", data_dir, write)
    return {"task": task}


# -------------------------------------------------------------------------------------------- the plan

@dataclass
class Entry:
    """One trained configuration: a variant in an arm, with its resolved dtype and the claims it serves."""

    label: str
    variant: Variant
    arm: str
    dtype: str  # resolved: bfloat16 | float32
    roles: tuple[str, ...]  # precisions it stands for: base, fp32 (both where the base is fp32)
    claims: tuple[str, ...]
    settings: dict  # TrainConfig settings of the entry (method, rank, alpha, eps, optimizer, dtype, quantize)
    grid: tuple[float, ...]


@dataclass
class Cell:
    """An entry on one task: its lr probes, then its seeds."""

    entry: Entry
    task: str
    budget: int
    probe_forwards: int
    base: TrainConfig  # the full run at the first seed, lr = the grid's centre until the pick
    tune_out: Path
    runs_out: Path  # runs/<entry>__<task>: the seeds' run directories are this + __s<seed>
    recorded: dict[int, dict] = field(default_factory=dict)  # seed -> its finished row in results.json
    twin: str = ""  # the label of an earlier entry whose runs this cell's are, bit for bit (see ``run_key``)

    def run_dir(self, seed: int) -> Path:
        return self.runs_out.with_name(f"{self.runs_out.name}__s{seed}")

    def finished(self, seed: int) -> bool:
        """Whether ``seed`` trained to its end: its row is in results.json, or its folder holds summary.json.

        Why both: a study stopped between a run's end and the write of results.json (it is written when
        the whole call ends) leaves the row "pending" while the folder says done, and the next call
        skips that run; what a resume costs must count it as done too."""
        return seed in self.recorded or read_summary(self.run_dir(seed)) is not None

    def kept_row(self, seed: int, lr: float) -> dict | None:
        """The finished row results.json holds for ``seed`` at ``lr`` when its run directory is absent.

        Why: run directories hold adapters and calibration tensors that are not committed, so a
        fresh checkout of ``benchmarks/results/regime`` has the rows of finished runs but not always
        their folders; those runs count as done instead of being trained again.
        """
        row = self.recorded.get(seed)
        if row is None or self.run_dir(seed).exists() or row.get("lr") != lr:  # a folder here speaks for itself
            return None
        return {**row, "kept_from": "results.json"}


@dataclass
class Plan:
    study: Study
    out: Path
    entries: list[Entry]
    cells: list[Cell]
    notes: list[str]  # about the study: written into its tables and results.json
    base: str = "float32"  # the base dtype of the "base" cells (pinned in OUT)
    here: list[str] = field(default_factory=list)  # about this machine only: printed, never written

    def other_rows(self) -> list[dict]:
        """The rows of results.json outside this plan (other cells, or other seeds of its cells), read when
        results.json is written, not when the plan was made: two narrower runs sharing one --out (a method
        or a seed per core) then keep each other's finished rows instead of the ones that were there when
        each of them started."""
        planned = {(c.entry.label, c.task, seed) for c in self.cells for seed in self.study.seeds}
        return [r for r in read_ledger(self.out) if (r.get("entry"), r.get("task"), r.get("seed")) not in planned]


def read_ledger(out: Path) -> list[dict]:
    """The run rows of the study's results.json in ``out`` (empty when there is none yet)."""
    path = out / "results.json"
    if not path.exists():
        return []
    try:
        return list(json.loads(path.read_text()).get("runs", []))
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ZOError(f"{path}: not a regime results file ({exc}); move it away to start afresh") from None


def resolve_dtype(variant: Variant, base: str) -> str:
    """A variant's dtype in a study whose base is ``base`` (bfloat16 | float32): fp32 for the contrast and
    for methods that train base weights (bf16 would round their updates away), ``base`` otherwise."""
    from .methods import get_method

    cls = get_method(QUERY_CONFIGS[variant.config][0]["method"])
    if variant.precision == "fp32" or not cls.bf16_base or getattr(cls, "trains_base_dtype", False):
        return "float32"
    return base


DTYPE_NAMES = {**DTYPE_ALIASES, "bfloat16": "bfloat16", "float32": "float32"}
BASE_PIN = "base_dtype.json"
ZERO_SHOT = "zero_shot.json"


def dtype_name(word: str, what: str = "--dtypes") -> str:
    require(word in DTYPE_NAMES, f"{what}: unknown dtype {word!r}; choose from bf16, fp32")
    return DTYPE_NAMES[word]


def pinned_base(out: Path) -> tuple[str, str] | None:
    """The base dtype a study in ``out`` already ran on, and where that was read: its pin file, else its folders.

    Why pinned: the protocol's base is bf16 where the CPU computes it natively, and a study spans many
    sessions on machines that differ (a Xeon with avx512_bf16, an EPYC without). Re-resolving on each
    would turn a resumed study's bf16 cells into fp32 ones and drop the runs already made.
    """
    path = out / BASE_PIN
    if path.exists():
        try:
            return dtype_name(str(json.loads(path.read_text())["base_dtype"]), str(path)), f"pinned in {path}"
        except (ValueError, KeyError, TypeError) as exc:
            raise ZOError(f"{path}: not a base-dtype pin ({exc}); expected {{\"base_dtype\": \"bfloat16\"}}") from None
    names = [d.name for sub in ("tune", "runs") if (out / sub).is_dir() for d in (out / sub).iterdir()]
    if any("-bf16-" in n for n in names):
        return "bfloat16", "the study's bf16 folders (tune/, runs/)"  # no path: the study moves between machines
    if any(r.get("rank") and "base" in r.get("roles", ()) for r in read_ledger(out)):
        return "float32", "the study's fp32 base runs (results.json)"
    return None


def study_base(study: Study, out: Path, device: str) -> tuple[str, str]:
    """The study's base dtype and why: ``--base-dtype``, else its pin in ``out``, else this machine's auto."""
    from .hardware import pick_dtype
    from .methods import get_method

    pinned = pinned_base(out)
    if study.base_dtype != "auto":
        want = dtype_name(study.base_dtype, "--base-dtype")
        require(pinned is None or pinned[0] == want,
                f"--base-dtype {study.base_dtype}: the study in {out} ran on a {pinned and pinned[0]} base "
                f"({pinned and pinned[1]}); resume it without --base-dtype, or give a new --out")
        return want, f"--base-dtype {study.base_dtype}"
    if pinned:
        return pinned
    chosen = pick_dtype("auto", device, get_method("mezo-lora"), need_speedup=False)
    return chosen.name, chosen.reason


def entry_label(v: Variant, dtype: str, arm: str) -> str:
    return f"{v.name}" + (f"-r{v.rank}" if v.rank else "") + f"-{'bf16' if dtype == 'bfloat16' else 'fp32'}-{arm}"


def plan_entries(study: Study, base: str = "float32") -> tuple[list[Entry], list[str]]:
    from .tune import default_grid

    notes = []
    entries: dict[str, Entry] = {}
    known = {v.name for c in CLAIMS for v in claim_variants(c)}
    unknown = sorted(set(study.methods or ()) - known)
    require(not unknown, f"unknown regime method {unknown[0] if unknown else ''!r}; choose from: "
                         f"{', '.join(sorted(known))}")
    for claim in study.claims:
        require(claim in CLAIMS, f"unknown claim {claim!r}; choose from: {', '.join(CLAIMS)}")
        for arm in study.arms:
            require(arm in ARMS, f"unknown arm {arm!r}; choose from: {', '.join(ARMS)}")
            for v in claim_variants(claim, study.ranks, study.contrast_rank):
                if study.methods and v.name not in study.methods:
                    continue
                dtype = resolve_dtype(v, base)
                if study.dtypes and dtype not in study.dtypes:
                    continue
                label = entry_label(v, dtype, arm)
                if label in entries:
                    e = entries[label]
                    e.roles = tuple(dict.fromkeys((*e.roles, v.precision)))
                    e.claims = tuple(dict.fromkeys((*e.claims, claim)))
                    continue
                own = QUERY_CONFIGS[v.config][0]
                settings = {**own, "optimizer": arm, "dtype": dtype, "quantize": v.quantize,
                            **({"lora_r": v.rank} if v.rank else {})}
                entries[label] = Entry(label, v, arm, dtype, (v.precision,), (claim,), settings,
                                       tuple(default_grid(lr_centre(v.config, arm, v.rank))))
    if any(set(e.roles) == {"base", "fp32"} for e in entries.values()):
        notes.append("this machine has no native bf16 (or the device lacks it): the base ran in fp32, so the "
                     "fp32 contrasts are the base comparisons themselves")
    if any(e.variant.precision == "base" and e.dtype == "float32" and e.variant.config in ("agzo", "lozo", "subzero")
           for e in entries.values()):
        notes.append("agzo, lozo and subzero train base weights, so their base is fp32 (--dtype auto keeps trained "
                     "base weights in fp32)")
    return list(entries.values()), notes


def run_key(cfg: TrainConfig, grid: tuple[float, ...]) -> str:
    """What makes two cells train the same runs: the config with AR1's scaling resolved to the adapter it
    builds, and the lr grid.

    Why: at r = 8 the canonical atom (α/r, α 16) and ar1zo (α·r/r, α 2) build the same PEFT adapter
    (lora_alpha 16, scale 2), so their probes and runs are bit-identical (seen in session 11: every probe's
    losses equal). The second cell then reads the first one's folders instead of training them again.
    """
    from .methods.ar1 import lora_alpha_for

    d = cfg.to_dict()
    d.pop("output_dir", None)
    if d.get("method") == "ar1zo":
        d["lora_alpha"], d["use_rslora"] = lora_alpha_for(d.pop("ar1_scaling"), d["lora_alpha"], d["lora_r"])
    return json.dumps([d, list(grid)], sort_keys=True, default=str)


def steps_for(budget: int, cfg: TrainConfig) -> int:
    """Steps that spend at least ``budget`` forward passes (rounded up: agzo's 3 per step give 1,002 of 1,000)."""
    return math.ceil(budget / bench.forwards_per_step(cfg))


def plan(study: Study, out: Path, prepare: bool = True) -> Plan:
    """Every entry on every task with its validated config; fails before anything trains."""
    from .hardware import pick_device

    device = pick_device(str(study.settings.get("device", "auto")))
    base, why = study_base(study, out, device)
    entries, notes = plan_entries(study, base)
    require(bool(entries), "the study has no entries (check --methods, --claims, --arms, --dtypes)")
    require(bool(study.seeds), "the study has no seeds")
    require(0 < study.probe_fraction <= 1, f"probe fraction must be in (0, 1], got {study.probe_fraction}")
    common = dict(study.settings)
    if common.get("model") == "tiny-random":
        common["model"] = str(bench.tiny_random_model(out / "tiny-random") if prepare else out / "tiny-random")
    ledger = read_ledger(out)
    cells = []
    seen: dict[str, Cell] = {}
    selected = {e.label: e for e in entries}
    # twins are looked for among every entry, so a narrower run (--methods) still reads an unselected twin
    every = plan_entries(dataclasses.replace(study, methods=None, dtypes=None), base)[0] \
        if study.methods or study.dtypes else entries
    for task in study.tasks:
        data = task_settings(task, out, str(common.get("data_dir", "")), write=prepare)
        budget = study.budget_for(task)
        for entry in every:
            entry = selected.get(entry.label, entry)
            label = bench.task_label(task)
            settings = {**common, **data, **entry.settings, "lr": entry.grid[len(entry.grid) // 2],
                        "seed": study.probe_seed, "progress": False}
            cfg = TrainConfig.from_dict(settings, source=f"regime entry {entry.label!r}")
            try:
                cfg.validate()
            except ZOError as exc:
                raise ZOError(f"regime entry {entry.label!r} on {task}: {exc}") from None
            per = bench.forwards_per_step(cfg)
            cfg.steps = steps_for(budget, cfg)
            cfg.eval_every = max(1, budget // (study.evals + 1) // per) if study.evals else 0
            probe = max(per, int(budget * study.probe_fraction))
            name = f"{bench.safe_name(entry.label)}__{bench.safe_name(label)}"
            recorded = {r["seed"]: r for r in ledger
                        if r.get("entry") == entry.label and r.get("task") == label and r.get("status") == "ok"}
            cell = Cell(entry, label, budget, probe, cfg, out / "tune" / name, out / "runs" / name, recorded)
            twin = seen.setdefault(run_key(cfg, entry.grid), cell)
            if twin is not cell:  # the same runs as an earlier entry's: read its folders, train nothing twice
                cell.base, cell.tune_out, cell.runs_out, cell.twin = twin.base, twin.tune_out, twin.runs_out, \
                    twin.entry.label
            if entry.label in selected:
                cells.append(cell)
    here = []
    if base == "bfloat16" and device == "cpu" and any(e.dtype == "bfloat16" for e in entries):
        from .hardware import cpu_bf16_matmul_policy, cpu_has_native_bf16

        if not cpu_has_native_bf16():
            how = ("with fp32 matmuls rounded to bf16, as native bf16 hardware accumulates (near fp32's speed; "
                   "their runs record this machine)" if cpu_bf16_matmul_policy() == "auto" else
                   "emulated by torch (ZOTUNE_CPU_BF16_MATMUL=native), several times slower than fp32")
            here.append(f"this CPU has no native bf16 (no avx512_bf16/AMX), but the study's base is bf16 ({why}): "
                        f"its bf16 cells run here {how}; --dtypes fp32 runs only the fp32 cells")
    if prepare and not (out / BASE_PIN).exists():
        out.mkdir(parents=True, exist_ok=True)
        atomic.write_text(out / BASE_PIN, json.dumps({"base_dtype": base, "why": why}, indent=1) + "\n")
    return Plan(study, out, entries, cells, notes, base, here)


def run_config(cell: Cell, seed: int, lr: float) -> TrainConfig:
    """The full run of ``cell`` at ``seed`` and ``lr`` (steps and evaluation points as planned)."""
    return TrainConfig.from_dict({**cell.base.to_dict(), "lr": lr, "seed": seed,
                                  "output_dir": str(cell.run_dir(seed))}, source="regime run")


# ------------------------------------------------------------------------------------------- the cost

SECONDS_BF16 = 0.43  # one 16-example SmolLM2-135M forward, bf16 base, quiet machine (issue 16)
FP32_FACTOR = 2.1  # fp32 / bf16 forward time, measured on this CPU (1.44 s vs 3.07 s under load)
FULL_WEIGHT_STEP = 1.9  # a full-weight ZO step / its forwards (benchmarks/results/step_cost.json, mezo)
DIAG_DIRECTIONS_FACTOR = 2  # each direction: two forwards


def tuned(cell: Cell) -> bool:
    """Whether the cell's lr probes are done (tune.json is written once every probe of the grid has run)."""
    return (cell.tune_out / "tune.json").exists()


def cost(p: Plan, seconds_bf16: float = SECONDS_BF16, fp32_factor: float = FP32_FACTOR, left: bool = False) -> dict:
    """Forward passes (16-example equivalents) and hours on this CPU, by part; lr-grid extensions not included
    (at most ``max_extend`` more probes per cell).

    With ``left``, only what ``p.out`` does not hold yet: seeds not finished (see :meth:`Cell.finished`) and
    cells without tune.json (a run or grid in progress counts whole), so a study that spans sessions can
    say what a resume still costs."""
    s, bs = p.study, int(p.study.settings.get("batch_size", 16))
    test = int(s.settings.get("test_size", 500))
    parts = {"train": 0.0, "probes": 0.0, "evaluation": 0.0}
    seconds = 0.0
    runs = grids = 0
    for c in p.cells:
        if c.twin:  # its runs are its twin's
            continue
        unit = seconds_bf16 * (fp32_factor if c.entry.dtype == "float32" else 1.0)
        overhead = FULL_WEIGHT_STEP if c.entry.variant.config in ("lozo", "subzero") else 1.0
        per = bench.forwards_per_step(c.base)
        seeds = len([x for x in s.seeds if not c.finished(x)]) if left else len(s.seeds)
        grid = 0 if left and tuned(c) else len(c.entry.grid)
        runs, grids = runs + seeds, grids + grid
        train = seeds * c.base.steps * per
        probes = grid * (c.probe_forwards // per) * per
        evals = seeds * ((s.evals + 2) * s.dev_for(c.task) + test) / bs + grid * 2 * s.probe_dev / bs
        parts["train"] += train
        parts["probes"] += probes
        parts["evaluation"] += evals
        seconds += (train + probes) * unit * overhead + evals * unit
    # zero-shot: one test split per (task, base dtype, seed), the baseline each run is read against
    have = {(r["task"], r["dtype"], r["seed"]) for r in zero_shot_rows(p)} if left else set()
    for task, dtype in {(c.task, c.entry.dtype) for c in p.cells if zero_shot_cell(c)}:
        n = len([x for x in s.seeds if (task, dtype, x) not in have]) * test / bs
        parts["evaluation"] += n
        seconds += n * seconds_bf16 * (fp32_factor if dtype == "float32" else 1.0)
    diag = 0.0
    if s.diagnostics:
        configs = {(e.variant.config, e.variant.rank, e.dtype) for e in p.entries if e.variant.quantize == "none"}
        for task in s.tasks:
            if left and (p.out / "diagnostics" / bench.safe_name(task) / "grad_cosine.json").exists():
                continue
            for config, rank, dtype in configs:
                points = len(s.diag_points) if QUERY_CONFIGS[config][0]["method"] in ("mezo-lora", "ar1zo", "zoact") \
                    else 1
                evals = 1 + (dtype == "bfloat16")
                diag += points * (evals * DIAG_DIRECTIONS_FACTOR * max(s.diag_ns) + 3)
        seconds += diag * seconds_bf16 * fp32_factor
    parts["diagnostics"] = diag
    total = sum(parts.values())
    return {"forward_passes": {k: round(v) for k, v in parts.items()}, "total_forward_passes": round(total),
            "hours": seconds / 3600, "seconds_per_forward_bf16": seconds_bf16, "fp32_factor": fp32_factor,
            "runs": runs, "probes": grids}


PACE_LATEST = 6  # measured pace: the most recent runs and probes per dtype


def measured_pace(p: Plan, latest: int = PACE_LATEST) -> dict[str, float]:
    """Seconds per 16-example training forward that the study's own runs took, by base dtype.

    Why: the planned hours use one reference machine's pace (SECONDS_BF16, an AMX CPU), and the
    same study ran about 4x slower in bf16 on a Xeon with avx512_bf16 but no AMX, where bf16 is also
    slower than fp32. What a resume still costs is better told by the pace of the runs in ``p.out``.
    Per dtype: the median over the ``latest`` most recently written runs and lr probes of their
    median step time / forwards per step (:func:`zotune.bench.step_seconds`, which skips evaluations
    and resumes). Full-weight steps (lozo, subzero) are left out: they cost more than their forwards.
    A study spans machines: where finished runs of a dtype recorded this machine (summary.json
    ``machine``), only those count for it.
    """
    from .hardware import machine_name, pick_device

    here = machine_name(pick_device(str(p.study.settings.get("device", "auto"))))  # the device plan() resolved
    found: dict[str, list[tuple[bool, float, float]]] = {}
    for c in p.cells:
        if c.twin or c.entry.variant.config in ("lozo", "subzero"):
            continue
        per = bench.forwards_per_step(c.base)
        dirs = [c.run_dir(seed) for seed in p.study.seeds]
        dirs += sorted((c.tune_out / "probes").glob("*")) if (c.tune_out / "probes").is_dir() else []
        for d in dirs:
            metrics = d / "metrics.jsonl"
            step = bench.step_seconds(metrics, c.base.eval_every) if metrics.exists() else None
            if step:
                mine = (read_summary(d) or {}).get("machine") == here
                found.setdefault(c.entry.dtype, []).append((mine, metrics.stat().st_mtime, step / per))
    pace = {}
    for dtype, v in found.items():
        use = [x for x in v if x[0]] or v
        pace[dtype] = statistics.median(x for _, _, x in sorted(use)[-latest:])
    return pace


def hours(h: float) -> str:
    return f"{h:.0f} hours" if round(h) != 1 else "1 hour"


def describe(p: Plan) -> str:
    s = p.study
    lines = [f"regime study: claims {', '.join(s.claims)}; arms {', '.join(s.arms)}; tasks {', '.join(s.tasks)}; "
             f"seeds {','.join(map(str, s.seeds))}; model {s.settings.get('model')}, batch "
             f"{s.settings.get('batch_size')}, train {s.settings.get('train_size')}, "
             f"test {s.settings.get('test_size')}",
             f"{'entry':34s} {'claims':10s} {'task':16s} {'budget':>6s} {'steps':>5s} {'probe':>5s}  lr grid"]
    for c in p.cells:
        lines.append(f"{c.entry.label:34s} {','.join(c.entry.claims):10s} {c.task:16s} {c.budget:6d} "
                     f"{c.base.steps:5d} {c.probe_forwards:5d}  {' '.join(f'{x:g}' for x in c.entry.grid)}"
                     + (f"  (= {c.twin}: the same runs)" if c.twin else ""))
    k = cost(p)
    twins = sum(bool(c.twin) for c in p.cells)
    f = k["forward_passes"]
    lines += [f"{len(p.cells)} cells x {len(s.seeds)} seeds"
              + (f" ({twins} of them the same runs as another's, trained once)" if twins else "")
              + f" = {k['runs']} runs, {k['probes']} probes "
              f"(+ up to {s.max_extend} per cell where a pick is at the grid's edge)",
              f"cost: {k['total_forward_passes']:,} forward passes of 16 examples (training {f['train']:,}, probes "
              f"{f['probes']:,}, evaluation {f['evaluation']:,}, diagnostics {f['diagnostics']:,}); about "
              f"{hours(k['hours'])} on one thread at {k['seconds_per_forward_bf16']} s per bf16 forward "
              f"(fp32 x{k['fp32_factor']})"]
    rest = cost(p, left=True)
    if rest["total_forward_passes"] < k["total_forward_passes"]:
        picked = sum(tuned(c) for c in p.cells)
        lines.append(f"done in {p.out}: {k['runs'] - rest['runs']} of {k['runs']} runs, lrs picked for {picked} of "
                     f"{len(p.cells)} cells; left: {rest['total_forward_passes']:,} forward passes, about "
                     f"{hours(rest['hours'])} at the same pace (a run or lr grid in progress counts whole)")
        pace = measured_pace(p)
        if pace:
            bf16 = pace.get("bfloat16", pace.get("float32", 0) / FP32_FACTOR)
            fp32 = pace.get("float32", bf16 * FP32_FACTOR)
            here = cost(p, seconds_bf16=bf16, fp32_factor=fp32 / bf16, left=True)
            lines.append(f"at the pace of the latest runs in {p.out} ("
                         + ", ".join(f"{'bf16' if d == 'bfloat16' else 'fp32'} {pace[d]:.2f} s"
                                     for d in sorted(pace)) + " per training forward, from their step times): "
                         f"left about {hours(here['hours'])}")
    lines += [f"note: {n}" for n in p.notes]
    lines += [f"on this machine: {n}" for n in p.here]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- running it

def pick_lr(cell: Cell, max_extend: int, say, probe_dev: int = PROBE_DEV) -> tuple[dict | None, list[float], Path]:
    """zotune tune over the cell's grid; a pick at an edge extends the grid that way (x3), at most ``max_extend``."""
    from .tune import tune

    grid = list(cell.entry.grid)
    for attempt in range(max_extend + 1):
        result = tune(TrainConfig.from_dict(cell.base.to_dict(), source="regime probe"), grid=grid,
                      probe_forwards=cell.probe_forwards, probe_dev=probe_dev, out=cell.tune_out, say=say)
        chosen = result.pick
        if chosen is None or attempt == max_extend or len(grid) < 2:
            break
        if chosen["lr"] == grid[-1]:
            grid.append(float(f"{grid[-1] * EXTEND_FACTOR:.2g}"))
        elif chosen["lr"] == grid[0]:
            grid.insert(0, float(f"{grid[0] / EXTEND_FACTOR:.2g}"))
        else:
            break
    return chosen, grid, cell.tune_out / "tune.json"


def g_summary(run_dir: Path) -> dict:
    """|g| per step (mean over the step's queries): median over all steps, the first and the last 10%."""
    path = run_dir / "metrics.jsonl"
    steps = [json.loads(x) for x in path.read_text().splitlines() if '"loss"' in x] if path.exists() else []
    gs = abs_slopes(steps)
    if not gs:
        return {"g_abs_median": float("nan"), "g_abs_early": float("nan"), "g_abs_late": float("nan")}
    k = max(1, len(gs) // 10)
    return {"g_abs_median": statistics.median(gs), "g_abs_early": statistics.median(gs[:k]),
            "g_abs_late": statistics.median(gs[-k:])}


def cell_rows(cell: Cell, seeds, chosen: dict | None, grid: list[float], tune_json: Path | None,
              errors: dict[int, str]) -> list[dict]:
    """The cell's result rows (bench's row format + the study's fields), read back from the run directories."""
    rows = []
    lr = chosen["lr"] if chosen else float("nan")
    growth = probe_g_growth(cell, chosen)
    for seed in seeds:
        kept = cell.kept_row(seed, lr) if chosen else None
        if kept:
            rows.append({**kept, "lr_pick_g_growth": growth})
            continue
        cfg = run_config(cell, seed, lr if chosen else cell.base.lr)
        run = bench.Run(bench.Entry(cell.entry.label, cell.entry.settings, lr, chosen is not None,
                                    str(tune_json or "")), cell.task, seed, cfg, Path(cfg.output_dir))
        summary = read_summary(run.run_dir) or {}
        failed = run.run_dir / "failed.json"
        error = errors.get(seed) or (json.loads(failed.read_text()).get("error", "") if failed.exists() else "")
        if not chosen:
            error = error or "no lr pick: every probe failed"
        elif not summary and not error:
            error = "not run yet"
        r = bench.row(run, summary, error, None)
        e = cell.entry
        r.update({"method": e.variant.name, "entry": e.label, "config": e.variant.config, "claim": ",".join(e.claims),
                  "claims": list(e.claims), "arm": e.arm, "rank": e.variant.rank or 0,
                  "dtype": summary.get("dtype", e.dtype), "machine": summary.get("machine", ""),
                  "roles": list(e.roles), "quantize": e.variant.quantize,
                  "lr": lr, "lr_grid": grid, "lr_pick_dev": chosen["dev_after"] if chosen else float("nan"),
                  "lr_pick_g_growth": growth,
                  "lr_at_edge": bool(chosen) and len(grid) > 1 and lr in (min(grid), max(grid)),
                  "probe_forwards": cell.probe_forwards, "tune": str(tune_json or ""), "budget": cell.budget,
                  "same_runs_as": cell.twin,
                  **g_summary(run.run_dir)})
        if error == "not run yet":
            r["status"] = "pending"
        r["curve"] = bench.dev_curve(run)
        rows.append(r)
    return rows


def probe_g_growth(cell: Cell, probe: dict | None) -> float:
    """A probe row's |g| growth (:func:`zotune.tune.g_growth`): its tune.json field, else read from its metrics.

    Why in the tables (for the picked probe): in the ZO-SGD arm on Rotten Tomatoes, picks whose |g| had
    grown 1.4x or more during their probe foretold full runs that collapsed below zero-shot
    (docs/benchmarks.md); the column lets a reader check that sign on every cell. The probe's folder is
    looked for under this cell's tune folder, since tune.json's run_dir may be another machine's path.
    NaN where the folder is not here.
    """
    if not probe:
        return float("nan")
    if math.isfinite(probe.get("g_growth", float("nan"))):
        return probe["g_growth"]
    from .report import read_run

    path = cell.tune_out / "probes" / Path(str(probe.get("run_dir", ""))).name
    return g_growth(read_run(path).steps) if probe.get("run_dir") and (path / "metrics.jsonl").exists() \
        else float("nan")


def run_cell(cell: Cell, study: Study, retry_failed: bool, say) -> list[dict]:
    from .tune import run_or_reuse

    chosen, grid, tune_json = pick_lr(cell, study.max_extend, say, study.probe_dev)
    errors = {}
    if chosen is None:
        say(f"{cell.entry.label} {cell.task}: every lr probe failed; no runs")
        return cell_rows(cell, study.seeds, None, grid, tune_json, errors)
    for seed in study.seeds:
        if cell.kept_row(seed, chosen["lr"]):
            say(f"{cell.entry.label} {cell.task} seed {seed}: finished (its row is in results.json, its run "
                f"directory is not here)")
            continue
        cfg = run_config(cell, seed, chosen["lr"])
        path = Path(cfg.output_dir)
        if retry_failed and (path / "failed.json").exists():
            import shutil

            shutil.rmtree(path)
        what, error = run_or_reuse(cfg, starting=lambda msg: say(
            f"{cell.entry.label} {cell.task} seed {seed} (lr {chosen['lr']:g}): {msg}"))
        errors[seed] = error
        say(f"{cell.entry.label} {cell.task} seed {seed} (lr {chosen['lr']:g}): {what}"
            + (f": {error}" if error else ""))
    return cell_rows(cell, study.seeds, chosen, grid, tune_json, errors)


def read_cell(cell: Cell, study: Study) -> list[dict]:
    """A cell's rows from what is on disk, without training (another shard's cell, or a dry report)."""
    tune_json = cell.tune_out / "tune.json"
    record = json.loads(tune_json.read_text()) if tune_json.exists() else None
    chosen = record.get("pick") if record else None
    grid = record["grid"] if record else list(cell.entry.grid)
    rows = cell_rows(cell, study.seeds, chosen, grid, tune_json if record else None, {})
    if record is None:
        for r in rows:
            r["status"], r["error"] = "pending", "lr not picked yet"
    return rows


def diagnostics(p: Plan, task: str, say) -> list[dict]:
    """grad_cosine on ``task`` for the study's query configurations (cached in diagnostics/<task>/)."""
    from .diagnostics import grad_cosine as gc

    folder = p.out / "diagnostics" / bench.safe_name(task)
    entries = [e for e in p.entries if e.variant.quantize == "none"]
    configs = tuple(dict.fromkeys(e.variant.config for e in entries))
    ranks = tuple(sorted({e.variant.rank for e in entries if e.variant.rank})) or p.study.ranks
    base_bf16 = any(e.dtype == "bfloat16" for e in entries)
    dtypes = ("float32", "bfloat16") if base_bf16 else ("float32",)
    cell = next(c for c in p.cells if c.task == bench.task_label(task))
    keep = ("model", "task", "data_dir", "train_file", "dev_file", "template", "verbalizer", "text_field",
            "label_field", "max_length", "micro_batch_size", "train_size", "device", "threads", "calib_examples")
    settings = {k: v for k, v in cell.base.to_dict().items() if k in keep}
    params = {"configs": configs, "ranks": ranks, "ns": p.study.diag_ns, "points": p.study.diag_points,
              "dtypes": dtypes, "batch_size": int(p.study.settings.get("batch_size", 16)), "seed": p.study.probe_seed}
    path = folder / "grad_cosine.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("params") == json.loads(json.dumps(params)):
            return saved["rows"]
    cfg = gc.CosineConfig(settings=settings, **params)
    rows = gc.measure(cfg, progress=False, say=say)
    gc.write_outputs(rows, folder, f"gradient cosine on {task}")
    saved = json.loads(path.read_text())
    saved["params"] = params
    atomic.write_text(path, json.dumps(saved, indent=2))
    return rows


def run_study(study: Study, out: Path, retry_failed: bool = False, say=print) -> dict:
    """Run (or resume) the study and write every output; returns {"rows", "diagnostics", "plan"}."""
    p = plan(study, out)
    out.mkdir(parents=True, exist_ok=True)
    k, n = study.shard
    require(0 <= k < n, f"shard {k}/{n}: k must be in [0, n)")
    say(describe(p))
    diag: dict[str, list[dict]] = {}
    rows_by_cell: dict[int, list[dict]] = {}
    for t_index, task in enumerate(study.tasks):
        if t_index % n != k:
            continue
        try:
            zero_shot(p, task, say)
        except Exception as exc:  # a reference point, like the diagnostics: never at the runs' cost
            say(f"zero-shot evaluation on {task} failed ({type(exc).__name__}: {exc}); the runs go on")
        if study.diagnostics:
            try:
                diag[bench.task_label(task)] = diagnostics(p, task, say)
            except Exception as exc:  # a side measurement: it must not cost the training runs
                import traceback

                traceback.print_exc()
                say(f"diagnostics on {task} failed ({type(exc).__name__}: {exc}); the runs go on")
    for i, cell in enumerate(p.cells):
        if i % n != k:
            continue
        if cell.twin:  # read from the twin's folders when the tables are written, never trained here
            say(f"{cell.entry.label} {cell.task}: the same runs as {cell.twin} (bit for bit); read from its folders")
            continue
        t = time.time()
        rows_by_cell[i] = run_cell(cell, study, retry_failed, say)
        say(f"[cell {i + 1}/{len(p.cells)}] {cell.entry.label} on {cell.task}: {time.time() - t:.0f} s")
        write_all(p, collect(p, rows_by_cell), read_diagnostics(p, diag))
    rows = collect(p, rows_by_cell)
    write_all(p, rows, read_diagnostics(p, diag))
    return {"rows": rows, "diagnostics": read_diagnostics(p, diag), "plan": p}


def zero_shot_cell(c: Cell) -> bool:
    """Whether a cell's base is one zero-shot measures (an unquantized bf16 or fp32 one)."""
    return c.entry.variant.quantize == "none" and c.entry.dtype in ("bfloat16", "float32")


def zero_shot_rows(p: Plan) -> list[dict]:
    """The rows of ``p.out``'s zero_shot.json: task, dtype, seed, test, n_test (none before the first)."""
    path = p.out / ZERO_SHOT
    return json.loads(path.read_text()) if path.exists() else []


def zero_shot(p: Plan, task: str, say) -> list[dict]:
    """The untrained base's accuracy on each seed's own test split, per base dtype (cached in zero_shot.json).

    Why: every seed samples its own 500 test examples, and their zero-shot accuracy differs by a few
    points (0.554 and 0.576 on two seeds of Rotten Tomatoes), so "did the run move" is read against
    the same seed's split, paired, not against one dev number. One evaluation per (dtype, seed)."""
    import torch

    from .hardware import pick_device
    from .metrics import score_split
    from .models import load_model
    from .setup import load_data, run_scorer

    label = bench.task_label(task)
    path = p.out / ZERO_SHOT
    saved = zero_shot_rows(p)
    have = {(r["task"], r["dtype"], r["seed"]) for r in saved}
    cells = {c.entry.dtype: c for c in p.cells if c.task == label and zero_shot_cell(c)}
    for dtype, cell in sorted(cells.items()):
        todo = [s for s in p.study.seeds if (label, dtype, s) not in have]
        if not todo:
            continue
        cfg = run_config(cell, todo[0], cell.base.lr)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        model, tok, _ = load_model(cfg.model, getattr(torch, dtype), pick_device(cfg.device))
        scorer = run_scorer(cfg, model, tok)
        for seed in todo:
            data = load_data(run_config(cell, seed, cell.base.lr))
            acc = score_split(scorer, data.test, cfg.eval_batch_size).value
            saved.append({"task": label, "dtype": dtype, "seed": seed, "test": acc, "n_test": len(data.test)})
            say(f"zero-shot {label} ({dtype}) seed {seed}: test {acc:.3f} on {len(data.test)} examples")
            atomic.write_text(path, json.dumps(saved, indent=2))
        del model, scorer
    return [r for r in saved if r["task"] == label]


def read_zero_shot(p: Plan) -> dict[tuple[str, str], dict[int, float]]:
    """{(task, dtype): {seed: zero-shot test accuracy}} from zero_shot.json (empty where not measured)."""
    out: dict[tuple[str, str], dict[int, float]] = {}
    for r in zero_shot_rows(p):
        out.setdefault((r["task"], r["dtype"]), {})[r["seed"]] = r["test"]
    return out


def report(study: Study, out: Path) -> list[dict]:
    """Rewrite every output of ``study`` from what is on disk in ``out``, training nothing; returns the rows.

    Why: narrower runs (``--methods``, ``--claims``) sharing one ``--out`` each write the tables of their
    own selection; this writes the whole selection's tables, comparisons and verdicts from all of them."""
    p = plan(study, out, prepare=False)
    rows = collect(p, {})
    write_all(p, rows, read_diagnostics(p, {}))
    return rows


def collect(p: Plan, done: dict[int, list[dict]]) -> list[dict]:
    rows = []
    for i, cell in enumerate(p.cells):
        rows += done[i] if i in done else read_cell(cell, p.study)
    return rows


def read_diagnostics(p: Plan, have: dict[str, list[dict]]) -> dict[str, list[dict]]:
    out = dict(have)
    for task in p.study.tasks:
        label = bench.task_label(task)
        path = p.out / "diagnostics" / bench.safe_name(task) / "grad_cosine.json"
        if label not in out and path.exists():
            out[label] = json.loads(path.read_text())["rows"]
    return out


# --------------------------------------------------------------------------------------------- statistics

def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1, a - 1
    c, d = 1.0, 1 - qab * x / qap
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1 + aa * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1 - front * _betacf(b, a, 1 - x) / b


def t_cdf(t: float, df: float) -> float:
    tail = 0.5 * betainc(df / 2, 0.5, df / (df + t * t))
    return 1 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom (bisection on the cdf)."""
    require(0 < p < 1 and df > 0, f"t_quantile needs 0 < p < 1 and df > 0, got {p}, {df}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def paired_interval(a: dict | list, b: dict | list, level: float = LEVEL) -> dict:
    """Mean of the paired differences a − b with its two-sided t-interval.

    ``a`` and ``b`` are {seed: value} (or lists, paired by position); pairs with a NaN on either side are
    dropped. Fewer than two pairs: no interval (lo, hi NaN).
    """
    if not isinstance(a, dict):
        a, b = dict(enumerate(a)), dict(enumerate(b))
    diffs = [a[k] - b[k] for k in a if k in b and a[k] == a[k] and b[k] == b[k]]
    n = len(diffs)
    nan = float("nan")
    if n == 0:
        return {"n": 0, "mean": nan, "sd": nan, "lo": nan, "hi": nan, "diffs": []}
    mean = statistics.mean(diffs)
    if n < 2:
        return {"n": 1, "mean": mean, "sd": nan, "lo": nan, "hi": nan, "diffs": diffs}
    sd = statistics.stdev(diffs)
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "lo": mean - half, "hi": mean + half, "diffs": diffs}


HOLDS, FAILS, UNSURE = "holds", "does not hold", "cannot tell at this budget"
SAME = "the same runs (one adapter): nothing to compare"
NOT_RUN = "not run yet"  # no finished pair: no evidence either way (not "cannot tell", which is a result)
RULE_BETTER = ("the claim's method minus the baseline, paired by seed (same training sample, batch order and test "
               "sample), 95% t-interval: **holds** if the interval lies above 0, **does not hold** if it lies "
               "below 0, **cannot tell at this budget** if it contains 0 (or one pair finished); **not run yet** "
               "where no pair has finished")
RULE_NO_WORSE = (f"int8 base minus the method's own base, paired by seed, 95% t-interval: **holds** (no worse) if "
                 f"its lower end is above −{INT8_MARGIN:g}, **does not hold** if the whole interval is below 0 "
                 f"(and reaches below −{INT8_MARGIN:g}), else **cannot tell at this budget**")
RULE_TASKS = ("over tasks: **holds** if it holds on more than half of the tasks and fails on none, **does not "
              "hold** if it fails on more than half and holds on none, **mixed** if it holds on some and fails on "
              "others, else **cannot tell at this budget**")


def verdict(iv: dict, kind: str = "better", margin: float = INT8_MARGIN) -> str:
    lo, hi = iv["lo"], iv["hi"]
    if not iv.get("n", 1):
        return NOT_RUN
    if not (lo == lo and hi == hi):
        return UNSURE
    if kind == "better":
        return HOLDS if lo > 0 else FAILS if hi < 0 else UNSURE
    return HOLDS if lo > -margin else FAILS if hi < 0 else UNSURE


def overall(verdicts: list[str]) -> str:
    for only in (NOT_RUN, SAME):
        if verdicts and all(v == only for v in verdicts):
            return only
    held, failed = verdicts.count(HOLDS), verdicts.count(FAILS)
    if held > len(verdicts) / 2 and not failed:
        return HOLDS
    if failed > len(verdicts) / 2 and not held:
        return FAILS
    if held and failed:
        return "mixed"
    return UNSURE


# ------------------------------------------------------------------------------------------- comparisons

@dataclass
class Comparison:
    claim: str
    arm: str
    task: str
    a: str  # entry label
    b: str
    what: str  # "ar1zo − mezo-lora at r=64, bf16"
    kind: str  # better | no worse | contrast
    primary: bool
    group: str  # what the over-tasks verdict aggregates (e.g. "vs mezo-lora")
    interval: dict = field(default_factory=dict)
    verdict: str = ""


def _find(entries: list[Entry], name: str, rank: int | None, role: str, arm: str) -> Entry | None:
    return next((e for e in entries if e.variant.name == name and e.variant.rank == rank and role in e.roles
                 and e.arm == arm), None)


def _find_fp32(entries: list[Entry], name: str, rank: int | None, arm: str) -> Entry | None:
    """The entry of ``name`` that trains in fp32: its fp32 contrast, or its base where that is fp32 already."""
    e = _find(entries, name, rank, "fp32", arm) or _find(entries, name, rank, "base", arm)
    return e if e is not None and e.dtype == "float32" else None


def scores_by_seed(rows: list[dict], entry: str, task: str) -> dict[int, float]:
    return {r["seed"]: r["test"] for r in rows if r["entry"] == entry and r["task"] == task and r["status"] == "ok"}


def gaps(rows: list[dict], a: Entry, b: Entry, task: str) -> dict[int, float]:
    """Test accuracy of ``a`` minus ``b`` per seed where both finished."""
    sa, sb = scores_by_seed(rows, a.label, task), scores_by_seed(rows, b.label, task)
    return {seed: v - sb[seed] for seed, v in sa.items() if seed in sb}


def comparisons(p: Plan, rows: list[dict]) -> list[Comparison]:
    out = []
    tasks = [bench.task_label(t) for t in p.study.tasks]
    es = p.entries
    dt = lambda e: "bf16" if e.dtype == "bfloat16" else "fp32"  # noqa: E731
    folders = {(c.entry.label, c.task): c.runs_out for c in p.cells}  # twins share theirs
    for claim_name in p.study.claims:
        claim = CLAIMS[claim_name]
        for arm in p.study.arms:
            specs = []  # (a, b, what, kind, primary, group)
            if claim_name == "ar1":
                top = max(p.study.ranks)
                for rank in p.study.ranks:
                    a = _find(es, "ar1zo", rank, "base", arm)
                    for base in claim.baselines:
                        b = _find(es, base, rank, "base", arm)
                        if a and b:
                            specs.append((a, b, f"ar1zo − {base} at r={rank}, {dt(a)}", "better", rank == top,
                                          f"vs {base}"))
                a64 = _find(es, "ar1zo", p.study.contrast_rank, "fp32", arm)
                for base in claim.baselines:
                    b64 = _find(es, base, p.study.contrast_rank, "fp32", arm)
                    if a64 and b64 and "base" not in a64.roles:
                        specs.append((a64, b64, f"ar1zo − {base} at r={p.study.contrast_rank}, fp32 (contrast)",
                                      "better", False, f"vs {base}, fp32"))
                for name in ("ar1zo", *claim.baselines):
                    lo_r, hi_r = min(p.study.ranks), max(p.study.ranks)
                    a, b = _find(es, name, hi_r, "base", arm), _find(es, name, lo_r, "base", arm)
                    if a and b and lo_r != hi_r:
                        specs.append((a, b, f"{name}: r={hi_r} − r={lo_r} (rank effect)", "contrast", False,
                                      f"{name} rank effect"))
            else:
                a = _find(es, "zoact", None, "base", arm)
                for base in claim.baselines:
                    b = _find(es, base, 8 if base == "mezo-lora" else None, "base", arm)
                    if a and b:
                        specs.append((a, b, f"zoact ({dt(a)}) − {base} ({dt(b)})", "better", True, f"vs {base}"))
                af = _find(es, "zoact", None, "fp32", arm)
                for base in claim.baselines:
                    bf = _find_fp32(es, base, 8 if base == "mezo-lora" else None, arm)
                    if af and bf and "base" not in af.roles:
                        specs.append((af, bf, f"zoact − {base}, both fp32 (contrast)", "better", False,
                                      f"vs {base}, fp32"))
                q = _find(es, "zoact-int8", None, "base", arm)
                if a and q:
                    specs.append((q, a, f"zoact on int8 − zoact on {dt(a)}", "no worse", True, "int8 base"))
            for a, b, what, kind, primary, group in specs:
                for task in tasks:
                    c = Comparison(claim_name, arm, task, a.label, b.label, what, kind, primary, group)
                    c.interval = paired_interval(scores_by_seed(rows, a.label, task),
                                                 scores_by_seed(rows, b.label, task))
                    c.verdict = verdict(c.interval, kind) if kind != "contrast" else ""
                    if folders.get((a.label, task), a) == folders.get((b.label, task), b):
                        c.verdict = SAME
                    out.append(c)
            if claim_name == "ar1":  # the bf16 gap minus the fp32 gap at the contrast rank, paired by seed
                r = p.study.contrast_rank
                for base in claim.baselines:
                    ab, bb = _find(es, "ar1zo", r, "base", arm), _find(es, base, r, "base", arm)
                    af, bf = _find(es, "ar1zo", r, "fp32", arm), _find(es, base, r, "fp32", arm)
                    if not (ab and bb and af and bf) or ab is af:
                        continue
                    for task in tasks:
                        c = Comparison(claim_name, arm, task, ab.label, af.label,
                                       f"(ar1zo − {base}) in bf16 − the same in fp32, r={r}", "contrast", False,
                                       f"bf16 gap vs fp32 gap ({base})")
                        c.interval = paired_interval(gaps(rows, ab, bb, task), gaps(rows, af, bf, task))
                        out.append(c)
    return out


# ---------------------------------------------------------------------------------------------- outputs

def _num(x: float, fmt: str = ".3f") -> str:
    return "-" if x is None or x != x else f"{x:{fmt}}"


def _ms(xs: list[float]) -> str:
    xs = [x for x in xs if x == x]
    if not xs:
        return "-"
    return f"{statistics.mean(xs):.3f}" + (f" ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else "")


def _ci(iv: dict) -> str:
    if iv["n"] == 0:
        return "-"
    if iv["n"] < 2:
        return f"{iv['mean']:+.3f} (1 pair)"
    return f"{iv['mean']:+.3f} [{iv['lo']:+.3f}, {iv['hi']:+.3f}]"


def header(p: Plan) -> str:
    s = p.study
    budgets = ", ".join(f"{bench.task_label(t)} {s.budget_for(t)}" for t in s.tasks)
    usual = int(s.settings.get("dev_size", 500))
    dev = f"{usual}" + "".join(f" ({bench.task_label(t)} {n})" for t in s.tasks if (n := s.dev_for(t)) != usual)
    return (f"zotune bench `regime`: model {s.settings.get('model')}, batch {s.settings.get('batch_size')}, train "
            f"{s.settings.get('train_size')}, dev {dev}, test {s.settings.get('test_size')} "
            f"(held out), seeds {','.join(map(str, s.seeds))}; forward passes per run: {budgets}; lr per entry and "
            f"task picked by zotune tune on a dev split carved from the training split "
            f"({s.probe_fraction:g} of the budget per probe)")


def tables(p: Plan, rows: list[dict], comps: list[Comparison],
           zs: dict[tuple[str, str], dict[int, float]] | None = None) -> str:
    zs = zs or {}
    lines = ["# Regime study: tables", "", header(p), "",
             "Test = accuracy on the held-out test split of the best-dev checkpoint; mean ± std over seeds (runs "
             "that failed left out). Each seed samples its own test split; − zero-shot = test minus the untrained "
             "base's accuracy on the same seed's split in the run's dtype (the unquantized base for int8 runs), "
             "mean over seeds. Differences are paired by seed; the interval is the 95% t-interval of the "
             "mean paired difference. lr grid: the values zotune tune probed (→ the pick; '(edge)': still at the "
             "grid's edge after extending it, so a better lr may lie beyond). pick's |g| growth: mean |g| over the "
             "last quarter of the picked probe's steps / over its first quarter (1.4x or more foretold a "
             "collapse in the ZO-SGD arm on Rotten Tomatoes). ended below start: seeds whose final "
             "dev accuracy is below the untrained model's (where a run that diverged after its best-dev checkpoint "
             "ends, its test still taken from that checkpoint).", ""]
    lines += [f"- {n}" for n in p.notes]
    machines = Counter(r.get("machine") or "not recorded (runs before the field)" for r in rows if r["status"] == "ok")
    if machines:
        lines.append("- finished runs by machine: " + "; ".join(f"{m}: {n}" for m, n in sorted(machines.items())))
    if zs:
        lines += ["", "Zero-shot (no training) on each seed's test split:", "", "| task | dtype | seeds | test |",
                  "|---|---|---|---|"]
        lines += [f"| {task} | {dtype} | {len(by)} | {_ms(list(by.values()))} |" for (task, dtype), by in zs.items()]
    for claim_name in p.study.claims:
        claim = CLAIMS[claim_name]
        lines += ["", f"## {claim.title}", "", f"Claim tested: {claim.statement}.", ""]
        for arm in p.study.arms:
            sel = [r for r in rows if claim_name in r["claims"] and r["arm"] == arm]
            lines += [f"### {ARM_NAMES[arm]} arm", "",
                      "| task | method | r | dtype | lr grid → pick | pick's \\|g\\| growth | ok/seeds | dev final "
                      "| ended below start | test | − zero-shot |", "|---|---|---|---|---|---|---|---|---|---|---|"]
            groups: dict[tuple, list[dict]] = {}
            for r in sel:
                groups.setdefault((r["task"], r["entry"]), []).append(r)
            for (task, _), rs in groups.items():
                r0 = rs[0]
                ok = [r for r in rs if r["status"] == "ok"]
                pick = f"**{r0['lr']:g}**" + (" (edge)" if r0["lr_at_edge"] else "") if r0["lr"] == r0["lr"] else \
                    "not picked yet" if r0.get("error") == "lr not picked yet" else "none (every probe failed)"
                grid = f"{min(r0['lr_grid']):g}..{max(r0['lr_grid']):g} ({len(r0['lr_grid'])}) → {pick}"
                base = zs.get((task, r0["dtype"]), {})
                gains = [r["test"] - base[r["seed"]] for r in ok if r["seed"] in base and r["test"] == r["test"]]
                gain = f"{statistics.mean(gains):+.3f}" if gains else "-"
                below = sum(r["dev_final"] < r["dev_before"] for r in ok)
                growth = r0.get("lr_pick_g_growth", float("nan"))
                lines.append(f"| {task} | {r0['method']} | {r0['rank'] or '-'} | {r0['dtype']} | {grid} | "
                             f"{f'{growth:.2f}x' if math.isfinite(growth) else '-'} | "
                             f"{len(ok)}/{len(rs)} | {_ms([r['dev_final'] for r in ok])} | "
                             f"{f'{below}/{len(ok)}' if ok else '-'} | "
                             f"{_ms([r['test'] for r in ok])} | {gain} |")
            cs = [c for c in comps if c.claim == claim_name and c.arm == arm]
            if cs:
                lines += ["", "| task | comparison | pairs | mean difference [95% interval] | verdict |",
                          "|---|---|---|---|---|"]
                for c in cs:
                    lines.append(f"| {c.task} | {c.what}{'' if c.primary else ' (secondary)'} | {c.interval['n']} | "
                                 f"{_ci(c.interval)} | {c.verdict or '(reported)'} |")
            lines.append("")
    return "\n".join(lines) + "\n"


def verdicts_md(p: Plan, comps: list[Comparison], cost_info: dict) -> str:
    lines = ["# Regime study: verdicts", "", header(p), "", "Rules (decided before the numbers, applied by "
             "`zotune.regime.verdict` and `overall`):", "", f"- per task, a comparison: {RULE_BETTER}.",
             f"- the int8 part: {RULE_NO_WORSE}.", f"- {RULE_TASKS}.",
             "- primary comparisons decide a claim; secondary ones (r = 8, the fp32 contrast, rank effects) are "
             "reported beside it.", ""]
    lines += [f"- note: {n}" for n in p.notes]
    for claim_name in p.study.claims:
        claim = CLAIMS[claim_name]
        lines += ["", f"## {claim.title}", "", f"Claim: {claim.statement}.", ""]
        for arm in p.study.arms:
            cs = [c for c in comps if c.claim == claim_name and c.arm == arm]
            lines.append(f"### {ARM_NAMES[arm]} arm")
            lines.append("")
            if not cs:
                lines += [f"- {NOT_RUN} (no pair this claim compares is in this selection of methods; "
                          f"--report-only over the whole study writes them)", ""]
                continue
            primary = [c for c in cs if c.primary]
            finals = []
            planned = len(p.study.seeds)
            short = lambda c: 1 < c.interval["n"] < planned  # noqa: E731  (a pair short: "1 pair" says itself)
            for group in dict.fromkeys(c.group for c in primary):
                gs = [c for c in primary if c.group == group]
                v = overall([c.verdict for c in gs])
                if v in (HOLDS, FAILS) and any(short(c) for c in gs if c.verdict == v):
                    v += " so far"  # it rests on a task whose seeds are not all in: it may still change
                finals.append(v)
                per_task = "; ".join(f"{c.task}: {NOT_RUN}" if c.verdict == NOT_RUN else
                                     f"{c.task} {_ci(c.interval)}: {c.verdict}"
                                     + (f" ({c.interval['n']} of {planned} pairs)" if short(c) else "") for c in gs)
                lines.append(f"- **{gs[0].what}** — **{v}** ({per_task})")
            if finals:
                claim_v = finals[0] if len(set(finals)) == 1 else "partly: " + ", ".join(
                        f"{c}: {v}" for c, v in zip(dict.fromkeys(c.group for c in primary), finals))
                lines.append(f"- the claim in the {ARM_NAMES[arm]} arm: **{claim_v}**")
            for c in [c for c in cs if not c.primary]:
                said = c.verdict or ("" if c.interval["n"] else NOT_RUN)  # rank effects carry no verdict
                lines.append(f"- secondary, {c.task}: {c.what}: {_ci(c.interval)}" + (f" ({said})" if said else ""))
            lines.append("")
    f = cost_info["forward_passes"]
    lines += ["", f"Planned cost: {cost_info['total_forward_passes']:,} forward passes of 16 examples (training "
              f"{f['train']:,}, probes {f['probes']:,}, evaluation {f['evaluation']:,}, diagnostics "
              f"{f['diagnostics']:,}), about {hours(cost_info['hours'])} at {cost_info['seconds_per_forward_bf16']}"
              f" s per bf16 forward on one thread."]
    return "\n".join(lines) + "\n"


def contrast_g_lines(groups: dict[tuple, list[dict]]) -> list[str]:
    """|g| early in bf16 against fp32 for the same method, rank, task and arm (the fp32 contrast's cells).

    Why: the runs themselves measure the noise floor's share. Near the init point both bases follow
    the same loss surface, so the fp32 run's early |g| is the slope's true size and a bf16 early |g|
    many times larger is mostly rounding (the diagnostics measure the same at one point; this covers
    every configuration the study ran in both precisions, without another pass)."""
    early: dict[tuple, dict[str, float]] = {}
    for (task, arm, _), rs in groups.items():
        ok = [r["g_abs_early"] for r in rs if r["status"] == "ok" and r["g_abs_early"] == r["g_abs_early"]]
        if ok:
            key = (task, arm, rs[0]["config"], rs[0]["rank"], rs[0].get("quantize", "none"))
            early.setdefault(key, {})[rs[0]["dtype"]] = statistics.mean(ok)
    pairs = {k: v for k, v in early.items() if {"bfloat16", "float32"} <= v.keys()}
    if not pairs:
        return []
    lines = ["", "## bf16 against fp32 for the same method and rank (early |g|, finished seeds)", "",
             "bf16 / fp32 well above 1 means most of the bf16 slope near init is rounding, not signal.", "",
             "| task | arm | config | r | |g| early bf16 | |g| early fp32 | bf16 / fp32 |", "|---|---|---|---|---|---|---|"]
    for (task, arm, config, rank, _), v in pairs.items():
        b, f = v["bfloat16"], v["float32"]
        lines.append(f"| {task} | {arm} | {config} | {rank or '-'} | {_num(b, '.3g')} | {_num(f, '.3g')} | "
                     f"{_num(b / f if f > 0 else float('nan'), '.1f')} |")
    return lines


def g_table(p: Plan, rows: list[dict], diag: dict[str, list[dict]]) -> str:
    lines = ["# Per-step |g| and the bf16 noise floor", "",
             "|g| = the step's mean |slope| over its queries (metrics.jsonl), median over the first 10%, the last "
             "10% and all steps of each run, then averaged over seeds. Noise floor = rms over 64 directions of "
             "g(bf16 base) − g(fp32) at the init point on the run's first batch (diagnostics/<task>/"
             "grad_cosine.json); '-' where the run's base is fp32 or no diagnostic was run. |g| below the floor "
             "means the slope the run follows is mostly rounding. Finished seeds only: an unfinished run's last "
             "10% is not its end, so entries with no finished seed are left out.", "",
             "| task | arm | entry | |g| early | |g| late | |g| all | bf16 floor (init) | late / floor |",
             "|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["arm"], r["entry"]), []).append(r)
    for (task, arm, entry), rs in groups.items():
        ok = [r for r in rs if r["status"] == "ok"]
        if not ok:
            continue
        mean = lambda k: statistics.mean([r[k] for r in ok if r[k] == r[k]] or [float("nan")])  # noqa: E731
        floor = float("nan")
        r0 = rs[0]
        if r0["dtype"] == "bfloat16":
            floor = next((d["noise"] for d in diag.get(task, []) if d["config"] == r0["config"]
                          and d["rank"] == r0["rank"] and d["point"] == "init" and d["dtype"] == "bfloat16"), floor)
        late = mean("g_abs_late")
        lines.append(f"| {task} | {arm} | {entry} | {_num(mean('g_abs_early'), '.3g')} | {_num(late, '.3g')} | "
                     f"{_num(mean('g_abs_median'), '.3g')} | {_num(floor, '.3g')} | "
                     f"{_num(late / floor if floor == floor and floor > 0 else float('nan'), '.1f')} |")
    lines += contrast_g_lines(groups)
    if diag:
        lines += ["", "## Gradient cosine at the largest n (diagnostics/<task>/grad_cosine.png)", "",
                  "| task | config | r | point | dtype | n | cos (queried) | cos (all trainable) | Gaussian ref | "
                  "rms g | bf16 noise |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for task, ds in diag.items():
            top = max((d["n"] for d in ds), default=0)
            for d in ds:
                if d["n"] == top:
                    lines.append(f"| {task} | {d['config']} | {d['rank'] or '-'} | {d['point']} | {d['dtype']} | "
                                 f"{d['n']} | {_num(d['cos'])} | {_num(d['cos_full'])} | {_num(d['gauss_ref'])} | "
                                 f"{_num(d['rms_g'], '.3g')} | {_num(d['noise'], '.3g')} |")
    return "\n".join(lines) + "\n"


def write_all(p: Plan, rows: list[dict], diag: dict[str, list[dict]]) -> None:
    out = p.out
    comps = comparisons(p, rows)
    cost_info = cost(p)
    picks = [{"entry": r["entry"], "task": r["task"], "grid": r["lr_grid"], "lr": r["lr"],
              "dev_after": r["lr_pick_dev"], "probe_forwards": r["probe_forwards"], "tune": r["tune"]}
             for r in rows if r["seed"] == p.study.seeds[0]]
    kept = rows + p.other_rows()  # results.json keeps the rows of cells outside this plan (a narrower re-run)
    record = {"title": header(p), "runs": kept, "picks": picks,
              "comparisons": [dataclasses.asdict(c) for c in comps], "cost_estimate": cost_info,
              "protocol": {"tasks": list(p.study.tasks), "seeds": list(p.study.seeds), "arms": list(p.study.arms),
                           "claims": list(p.study.claims), "ranks": list(p.study.ranks),
                           "budgets": {bench.task_label(t): p.study.budget_for(t) for t in p.study.tasks},
                           "probe_fraction": p.study.probe_fraction, "settings": p.study.settings},
              "notes": p.notes}
    atomic.write_text(out / "results.json", json.dumps(record, indent=2))
    atomic.write_text(out / "results.csv", bench.csv_text(kept))
    atomic.write_text(out / "tables.md", tables(p, rows, comps, read_zero_shot(p)))
    atomic.write_text(out / "verdicts.md", verdicts_md(p, comps, cost_info))
    atomic.write_text(out / "g_summary.md", g_table(p, rows, diag))
    for claim in p.study.claims:
        for arm in p.study.arms:
            sel = [{**r, "method": r["entry"].removesuffix(f"-{arm}")} for r in rows
                   if claim in r["claims"] and r["arm"] == arm]
            if sel:
                bench.plot(sel, out / f"curves_{claim}_{arm}.png",
                           f"{CLAIMS[claim].title}, {ARM_NAMES[arm]} arm: dev accuracy against forward passes "
                           f"(mean over seeds)")


# ------------------------------------------------------------------------------------------- the command

def main(args, say: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True)) -> int:
    """``zotune bench --preset regime`` (cli.cmd_bench hands its arguments over)."""
    words = lambda text: [w for w in (x.strip() for x in text.split(",")) if w] if text else None  # noqa: E731
    require(args.lr is None, "--lr: the regime study picks each entry's lr itself (zotune tune on a carved dev "
                             "split); there is no shared lr")
    settings = dict(SETTINGS)
    for item in args.set or []:
        key, sep, value = item.partition("=")
        require(bool(sep), f"--set expects KEY=VALUE, got {item!r}")
        settings[key.strip().replace("-", "_")] = value.strip()
    for name in ("model", "data_dir", "threads", "device"):
        if getattr(args, name, None) is not None:
            settings[name] = getattr(args, name)
    try:
        seeds = tuple(int(s) for s in words(args.seeds)) if args.seeds else SEEDS
        ranks = tuple(int(s) for s in words(args.ranks)) if getattr(args, "ranks", None) else RANKS
        shard = tuple(int(x) for x in args.shard.split("/")) if getattr(args, "shard", None) else (0, 1)
    except ValueError:
        raise ZOError("--seeds and --ranks expect comma-separated integers, --shard K/N") from None
    require(len(shard) == 2, f"--shard expects K/N (e.g. 0/2), got {args.shard!r}")
    require(args.budget is None or args.budget >= 1, f"--budget must be >= 1 forward pass, got {args.budget}")
    study = Study(tasks=tuple(words(args.tasks) or TASKS), seeds=seeds,
                  arms=tuple(words(getattr(args, "arms", None)) or ARMS),
                  claims=tuple(words(getattr(args, "claims", None)) or CLAIMS), ranks=ranks,
                  contrast_rank=max(ranks), methods=tuple(words(args.methods)) if args.methods else None,
                  budget=args.budget, settings=settings, diagnostics=not getattr(args, "skip_diagnostics", False),
                  shard=shard, base_dtype=getattr(args, "base_dtype", None) or "auto",
                  dtypes=tuple(dtype_name(w) for w in words(getattr(args, "dtypes", None)) or ()) or None)
    out = Path(args.out or "runs/bench-regime")
    if args.dry_run:
        print(describe(plan(study, out, prepare=False)))
        return 0
    if getattr(args, "report_only", False):
        require((out / "results.json").exists() or (out / "runs").is_dir(),
                f"--report-only: {out} holds no study (no results.json, no runs/); give the --out of the runs")
        rows = report(study, out)
    else:
        rows = run_study(study, out, retry_failed=args.retry_failed, say=say)["rows"]
    print((out / "verdicts.md").read_text())
    bad = sum(r["status"] == "failed" for r in rows)
    print(f"written to {out}/: results.json, results.csv, tables.md, verdicts.md, g_summary.md, curves_*.png, "
          f"diagnostics/*/grad_cosine.png" + (f"; {bad} of {len(rows)} runs failed (tables.md)" if bad else ""))
    return 0
