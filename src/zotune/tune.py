"""``zotune tune``: pick the learning rate by short probe runs, on a dev split carved out of the training data.

Each grid point (an lr, and an eps where ``--eps-grid`` is given) is one short,
seeded run of the ordinary recipe (:func:`zotune.train.train`) at a budget of
``--probe-forwards`` forward passes, with its own run directory. The probes
never see the real dev set (nor the test set): a dev split of ``--probe-dev``
examples (at most ``--dev-fraction`` of the training split) is held out of the
*training* split, and the probes train on the rest. The pick is the best final
dev metric on that carved split, ties broken by the lower mean training loss of
the last 10 steps, where a dev metric within one example of the best (1/N of the
N dev examples; ``--dev-tie``) counts as a tie; a probe that diverges (any
:class:`ZOError` during its run: a non-finite loss, the loss-explosion guard)
counts as failed and is never picked.

A probe whose training loss *rose* (the mean of its last 10 steps above that of
its first 10: the table's loss ratio above 1) is left out of the pick too, unless
every probe's rose (``--allow-rising-loss`` turns the rule off). Why: on 200 dev
examples a few lucky answers decide a close call, and an lr whose loss climbed
from its first steps is not learning, whatever its dev accuracy says. In the
regime study (SST-2, MeZO-LoRA r = 64 on bf16) the best dev of five probes,
0.570 against zero-shot 0.535, went to an lr whose loss had gone from 1.07 to
1.92 and whose |g| was 40x its neighbours'; its full run's loss stayed near 2.2
from step 1 on. Every other pick of that study had lowered its loss (ratios
0.48 to 0.92), so the rule changed none of them.

The table also shows each probe's |g| growth: the mean |slope| of its last
quarter of steps over that of its first quarter. Where it grew, the run was
moving into steeper ground. In the regime study's ZO-SGD arm on Rotten Tomatoes
(docs/benchmarks.md), 14 of the 15 full runs whose picked probe had grown its
|g| by 1.4x or more ended below their zero-shot dev accuracy, against 4 of the
24 runs whose probe had not: a late divergence the quarter-budget probe's dev
accuracy did not show. ``--max-g-growth X`` leaves such probes out of the pick
(off by default: the rule is read off one task).

Output folder (``--out``, default ``runs/tune-<data>-<method>``)::

    probes/lr<LR>_eps<EPS>/   one ordinary run directory per probe (curves.png included)
    tune.json                 every probe's row, the pick, the total cost in forward passes
    run/                      with --train (and no --output-dir): the full run at the picked lr

Re-running the same command skips finished (and failed) probes, resumes a
killed one exactly, and with ``--train`` skips or resumes the full run the same
way; the same ``--out`` with other settings is refused.

Why the one-example tie: a probe's dev accuracy often sits at the floor, where
one lucky answer separates lrs that have not yet moved it, while the training
loss has already parted them. In the regime study (CR, SubZero, 125 steps a
probe) three lrs scored 0.570 on 200 dev examples and the grid's top, 1e-4,
scored 0.565 (one answer fewer) with a last-10 loss of 0.99 against their
1.14-1.21; exact ties picked 3e-5 and never probed above the grid, while SubZero's
pick was 9e-4 on SST-2 and Rotten Tomatoes. Of that study's 60 finished lr
grids, a tie of one, two or three examples changes that pick alone.

It is a probe, not a tuning study: one seed and a few dozen steps, so it catches
lrs that do not move or that diverge; close calls between neighbouring lrs are
noise (200 dev examples: about +-3.5 points of accuracy).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import atomic
from .bench import same_config as check_same_config, steps_for_budget
from .config import TrainConfig
from .errors import ZOError, require
from .report import plot_run, read_run
from .rundir import STATE, read_summary, read_trajectory
from .tasks import Example, TaskData

FACTORS = (0.1, 1 / 3, 1.0, 3.0, 10.0)  # the default grid: x1/10 .. x10 around the centre, log-spaced
PROBE_FORWARDS = 100
PROBE_DEV = 200
DEV_FRACTION = 0.2
LAST = 10  # the tie-break: the mean training loss of the last 10 steps
DEV_TIE = 1  # dev metrics within this many examples' worth (x 1/N) of the best tie, and the loss decides
GROWTH_MIN_STEPS = 8  # |g| growth needs at least two steps in each quarter


def default_grid(center: float) -> list[float]:
    """Five lrs, log-spaced over two decades around ``center`` (two significant digits: 3e-3 x 1/3 = 1e-3)."""
    return [float(f"{center * f:.2g}") for f in FACTORS]


def parse_floats(text: str, flag: str) -> list[float]:
    """A comma list of non-negative numbers, sorted and without repeats; a bad one fails in one line."""
    values = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        try:
            value = float(item)
        except ValueError:
            raise ZOError(f"{flag} expects comma-separated numbers, got {item!r}") from None
        require(math.isfinite(value) and value >= 0, f"{flag}: {item} is not a number >= 0")
        values.append(value)
    require(bool(values), f"{flag} is empty")
    return sorted(set(values))


def uses_eps(method: str) -> bool:
    """Whether the method's step perturbs by eps: every ZO method; not one with its own engine (fo-lora)."""
    from .methods import Method, get_method

    return get_method(method).build_engine is Method.build_engine


# ------------------------------------------------------------------------------------------- the data

def train_split(cfg: TrainConfig) -> list[Example]:
    """The whole training split of the run's data, read without touching its dev or test files.

    (A named task's loader may read all of its files; only its train split is used.)
    """
    from .tasks import load_task, load_task_file, load_user_files

    require(bool(cfg.train_file) or not (cfg.dev_file or cfg.test_file),
            "--dev-file/--test-file without --train-file: give the training file too")
    if cfg.train_file:
        data = load_user_files(cfg.train_file, None, None, text_field=cfg.text_field, label_field=cfg.label_field,
                               text_pair_field=cfg.text_pair_field or None, template=cfg.template,
                               verbalizer=cfg.verbalizer)
    elif cfg.task.endswith((".yaml", ".yml")):
        data = load_task_file(cfg.task, splits=("train",))
    else:
        data = load_task(cfg.task, Path(cfg.data_dir) if cfg.data_dir else None)
    require(bool(data.train), f"{data.name}: no training data to probe on")
    return data.train


def carve(cfg: TrainConfig, probe_dev: int = PROBE_DEV, dev_fraction: float = DEV_FRACTION) -> TaskData:
    """The probes' data: a dev split held out of the training split, and the rest to train on.

    The dev split has ``probe_dev`` examples, or ``dev_fraction`` of the training split if that is fewer
    (0 turns either limit off); both are drawn with the run seed. The probes' training examples are then
    sampled from the rest as a run samples its train split (``train_size``). No test split.
    """
    from .tasks.base import hold_out

    require(probe_dev >= 0, f"--probe-dev must be >= 0, got {probe_dev}")
    require(0 <= dev_fraction < 1, f"--dev-fraction must be in [0, 1), got {dev_fraction}")
    require(probe_dev or dev_fraction, "--probe-dev 0 and --dev-fraction 0: the carved dev split would be empty")
    split = train_split(cfg)
    limits = [n for n in (probe_dev, max(1, math.floor(dev_fraction * len(split))) if dev_fraction else 0) if n]
    n = min(limits)
    require(1 <= n < len(split), f"the training split has {len(split)} examples: too few to carve a dev split of "
                                 f"{n} out of it and train on the rest (see --probe-dev, --dev-fraction)")
    rest, dev = hold_out(split, n, seed=cfg.seed)
    return TaskData("probe", rest, dev).subsample(cfg.seed, cfg.train_size, 0, 0)


# ----------------------------------------------------------------------------------------- the probes

@dataclass
class Probe:
    lr: float
    eps: float
    cfg: TrainConfig

    @property
    def path(self) -> Path:
        return Path(self.cfg.output_dir)


def probe_name(lr: float, eps: float) -> str:
    return f"lr{lr:g}_eps{eps:g}"


def plan(cfg: TrainConfig, grid: list[float], eps_grid: list[float], probe_forwards: int, out: Path,
         data: TaskData) -> list[Probe]:
    """A validated config per (lr, eps): the run's settings, the probe's budget, lr and eps, no test split."""
    probes = []
    for eps in eps_grid:
        for lr in grid:
            settings = {**cfg.to_dict(), "lr": lr, "eps": eps, "eval_every": 0, "test_size": 0, "progress": False,
                        "train_size": len(data.train), "dev_size": len(data.dev),
                        "output_dir": str(out / "probes" / probe_name(lr, eps))}
            probe_cfg = TrainConfig.from_dict(settings, source="zotune tune")
            probe_cfg.validate()
            probe_cfg.steps = steps_for_budget(probe_forwards, probe_cfg)
            probes.append(Probe(lr, eps, probe_cfg))
    return probes


def same_config(path: Path, cfg: TrainConfig) -> None:
    """Refuse to reuse a run directory that holds a run of other settings."""
    check_same_config(path, cfg, "tune")


def run_or_reuse(cfg: TrainConfig, data: TaskData | None = None,
                 starting: Callable[[str], object] | None = None) -> tuple[str, str]:
    """Train the run ``cfg`` describes into ``cfg.output_dir``, or reuse what is there.

    Returns (what happened: trained | resumed | done before | failed | failed before, the error).
    A finished run is skipped, a failed one is not retried (a divergence is deterministic), a killed one
    resumes exactly (a method whose trajectory cannot be replayed: from its last dev evaluation).
    ``starting`` is told what is about to happen before a run that trains ("training N steps", "resuming
    after step N ..."): a long run is silent until it ends, and a full-weight replay takes minutes.
    """
    from .methods import get_method
    from .train import train

    path = Path(cfg.output_dir)
    failed = path / "failed.json"
    if read_summary(path) is not None:
        same_config(path, cfg)
        return "done before", ""
    if failed.exists():
        same_config(path, cfg)
        return "failed before", json.loads(failed.read_text()).get("error", "")
    resume = None
    if (path / "config.yaml").exists():
        same_config(path, cfg)
        if (path / "trajectory.jsonl").exists():
            resume = path
        else:
            shutil.rmtree(path)
    elif path.exists() and any(path.iterdir()):
        raise ZOError(f"{path} exists and is not a run directory; use another --out (or delete that folder)")
    if starting is not None:
        n = len(read_trajectory(path / "trajectory.jsonl")) if resume else 0
        if not n:
            starting(f"training {cfg.steps} steps")
        elif get_method(cfg.method).replayable:
            starting(f"resuming after step {n} of {cfg.steps}; its {n} logged steps are replayed first")
        elif (path / STATE).exists():
            starting(f"resuming after step {n} of {cfg.steps} from its state at the last dev evaluation")
        else:  # it saves its state at each dev evaluation, and none has come yet
            starting(f"{n} of {cfg.steps} steps were logged but no state was saved: training again from step 0")
    try:
        train(TrainConfig.from_dict(cfg.to_dict(), source="zotune tune"), resume=resume, data=data)
    except ZOError as exc:  # a diverged run is a result: recorded, and never picked
        if not (path / "config.yaml").exists():
            raise  # it failed before its run directory existed: a problem of the settings, not of the lr
        failed.write_text(json.dumps({"error": str(exc)}, indent=2))
        plot_run(path)  # the curves of a divergence are worth a look
        return "failed", str(exc)
    return ("resumed" if resume else "trained"), ""


def abs_slopes(steps: list[dict]) -> list[float]:
    """Each logged step's |g|: the mean over its queries (steps that log no slopes are skipped)."""
    return [sum(abs(g) for g in r["g"]) / len(r["g"]) for r in steps if r.get("g")]


def g_growth(steps: list[dict]) -> float:
    """Mean |g| (each step's mean over its queries) of the last quarter of ``steps`` over the first quarter's.

    Why quarters of means: a probe has a few dozen to a few hundred steps, and one outlier slope should
    not decide; NaN where the steps log no slopes (first-order) or are too few to split.
    """
    gs = [g for g in abs_slopes(steps) if math.isfinite(g)]
    if len(gs) < GROWTH_MIN_STEPS:
        return float("nan")
    q = len(gs) // 4
    early = sum(gs[:q]) / q
    return sum(gs[-q:]) / q / early if early > 0 else float("nan")


def loss_ratio(steps: list[dict]) -> float:
    """Mean training loss of the last 10 steps over that of the first 10: above 1, the loss rose.

    NaN with fewer than 20 finite losses (the two windows would overlap) or a first mean that is not positive.
    """
    losses = [r["loss"] for r in steps if math.isfinite(r.get("loss", float("nan")))]
    if len(losses) < 2 * LAST:
        return float("nan")
    first = sum(losses[:LAST]) / LAST
    return sum(losses[-LAST:]) / LAST / first if first > 0 else float("nan")


def probe_row(probe: Probe, what: str, error: str) -> dict:
    """A probe's line of the table, read back from its run directory."""
    run = read_run(probe.path)
    s = run.summary or {}
    losses = [r["loss"] for r in run.steps if math.isfinite(r["loss"])][-LAST:]
    before = run.evals[0]["dev_acc"] if run.evals and run.evals[0]["step"] == 0 else float("nan")
    return {
        "lr": probe.lr, "eps": probe.eps, "status": "ok" if run.summary else "failed",
        "dev_before": s.get("dev_before", before), "dev_after": s.get("dev_after", float("nan")),
        "train_loss_last": s.get("train_loss_last", sum(losses) / len(losses) if losses else float("nan")),
        "g_growth": g_growth(run.steps), "loss_ratio": loss_ratio(run.steps),
        "metric": run.metric, "steps": len(run.steps), "forward_passes": run.forward_passes,
        "run_dir": str(probe.path), "error": error, "this_call": what in ("trained", "resumed", "failed"),
    }


def steep(row: dict, max_g_growth: float | None) -> bool:
    """Whether a probe's |g| grew past ``max_g_growth`` (never, when the bound is off or the growth unknown)."""
    return max_g_growth is not None and row.get("g_growth", float("nan")) > max_g_growth


def rising(row: dict, allow_rising_loss: bool = False) -> bool:
    """Whether a probe's training loss rose over its run (:func:`loss_ratio` above 1; unknown counts as not)."""
    return not allow_rising_loss and row.get("loss_ratio", float("nan")) > 1.0


def pick(rows: list[dict], max_g_growth: float | None = None, allow_rising_loss: bool = False,
         tie: float = 0.0) -> dict | None:
    """The best final dev metric; ties go to the lower training loss of the last 10 steps, then the smaller lr.

    A dev metric within ``tie`` of the best counts as a tie (:func:`tune` passes one example's worth).
    Probes whose training loss rose are left out (unless ``allow_rising_loss``), and with ``max_g_growth``
    so are probes whose |g| grew past it; each rule steps aside when it would leave none."""
    calm = eligible(rows, max_g_growth, allow_rising_loss)
    if not calm:
        return None
    best = max(r["dev_after"] for r in calm)
    tied = [r for r in calm if r["dev_after"] >= best - tie - 1e-9]  # 1e-9: 0.570 - 0.005 in floating point
    return min(tied, key=lambda r: (r["train_loss_last"], r["lr"], r["eps"]))


def tie_width(dev_tie: int, n_dev: int) -> float:
    """The ``tie`` for :func:`pick`: ``dev_tie`` examples' worth of a dev metric over ``n_dev`` examples.

    One place for the rule, so that a re-pick from a finished tune.json (``dev_tie``, ``probe_dev``)
    reproduces the pick :func:`tune` made."""
    return dev_tie / max(1, n_dev)


def eligible(rows: list[dict], max_g_growth: float | None = None, allow_rising_loss: bool = False) -> list[dict]:
    """The probes :func:`pick` chooses among: finished, then (where any remain) not rising, then not steep."""
    ok = [r for r in rows if r["status"] == "ok"]
    ok = [r for r in ok if not rising(r, allow_rising_loss)] or ok
    return [r for r in ok if not steep(r, max_g_growth)] or ok


def _num(x: float, fmt: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:{fmt}}"


def table(rows: list[dict], chosen: dict | None, max_g_growth: float | None = None,
          allow_rising_loss: bool = False) -> str:
    """The probes as aligned text: lr, eps, dev before -> after, train loss (last 10) and its ratio to the
    first 10's, |g| growth, status, the pick."""
    metric = rows[0]["metric"] if rows else "accuracy"
    head = ["lr", "eps", f"dev {metric} before -> after", f"train loss (last {LAST})", "loss ratio", "|g| growth",
            "status", ""]
    lines = [head]
    for r in rows:
        status = "ok" if r["status"] == "ok" else "failed (below)"
        status += " (loss rose)" if r["status"] == "ok" and rising(r, allow_rising_loss) else ""
        status += " (steep)" if r["status"] == "ok" and steep(r, max_g_growth) else ""
        lines.append([f"{r['lr']:g}", f"{r['eps']:g}", f"{_num(r['dev_before'])} -> {_num(r['dev_after'])}",
                      _num(r["train_loss_last"], ".4f"), _num(r.get("loss_ratio", float("nan")), ".2f"),
                      _num(r.get("g_growth", float("nan")), ".2f") + "x", status, "<- pick" if r is chosen else ""])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    right = {0, 1, 3, 4, 5}
    text = ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))).rstrip()
            for line in lines]
    text += [f"lr {r['lr']:g} eps {r['eps']:g} failed: {' '.join(r['error'].split())}" for r in rows if r["error"]]
    return "\n".join(text)


# ------------------------------------------------------------------------------------------- the tune

@dataclass
class TuneResult:
    rows: list[dict]
    pick: dict | None
    text: str  # the table and the cost, as printed
    out: Path
    summary: object = None  # with train_after: the full run's Summary


def default_out(cfg: TrainConfig) -> Path:
    data = Path(cfg.train_file).stem if cfg.train_file else Path(cfg.task).stem
    return Path(f"runs/tune-{data}-{cfg.method}")


def tune(cfg: TrainConfig, grid: list[float] | None = None, eps_grid: list[float] | None = None,
         probe_forwards: int = PROBE_FORWARDS, probe_dev: int = PROBE_DEV, dev_fraction: float = DEV_FRACTION,
         out: str | Path | None = None, train_after: bool = False, center: float | None = None,
         max_g_growth: float | None = None, allow_rising_loss: bool = False, dev_tie: int = DEV_TIE,
         say: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True)) -> TuneResult:
    """Probe every (lr, eps) of the grid, pick one, write ``tune.json``; with ``train_after`` run the full
    ``cfg`` at the pick (into ``cfg.output_dir``, else ``OUT/run``).

    ``grid`` defaults to :func:`default_grid` around ``center`` (else the method's ``suggested_lr``);
    ``eps_grid`` defaults to ``cfg.eps`` alone. When every probe failed, ``pick`` is None and nothing
    is trained. ``max_g_growth``: leave out of the pick the probes whose |g| grew past it (:func:`g_growth`).
    ``allow_rising_loss``: let probes whose training loss rose be picked (by default they are not: :func:`rising`).
    ``dev_tie``: dev metrics within this many examples' worth of the best tie (0: only equal ones).
    """
    from .methods import get_method
    from .train import Summary, data_name

    require(int(os.environ.get("WORLD_SIZE", "1")) <= 1,
            "zotune tune runs in one process; under torchrun, train the picked lr with zotune train")
    cfg.validate()
    require(probe_forwards >= 1, f"--probe-forwards must be >= 1, got {probe_forwards}")
    require(max_g_growth is None or max_g_growth > 0, f"--max-g-growth must be > 0, got {max_g_growth}")
    require(dev_tie >= 0, f"--dev-tie must be >= 0, got {dev_tie}")
    method = get_method(cfg.method)
    if eps_grid and not uses_eps(cfg.method):
        raise ZOError(f"--eps-grid: method {cfg.method!r} takes no eps (its step is not a finite difference)")
    grid = sorted(set(grid)) if grid else default_grid(center if center is not None else method.suggested_lr)
    eps_grid = sorted(set(eps_grid)) if eps_grid else [cfg.eps]
    out = Path(out) if out else default_out(cfg)

    data = carve(cfg, probe_dev, dev_fraction)  # the real dev and test sets are never read
    probes = plan(cfg, grid, eps_grid, probe_forwards, out, data)  # every config checked before any training
    steps = probes[0].cfg.steps
    say(f"zotune tune: {cfg.method} on {data_name(cfg)}: {len(grid)} lr{'s' * (len(grid) > 1)}"
        + (f" x {len(eps_grid)} eps" if len(eps_grid) > 1 else "") + f", {probe_forwards} forward passes each "
        f"({steps} steps); dev = {len(data.dev)} examples held out of the training split, "
        f"{len(data.train)} to train on")
    rows = []
    for i, probe in enumerate(probes, 1):
        what, error = run_or_reuse(probe.cfg, data)
        r = probe_row(probe, what, error)
        rows.append(r)
        result = (f"dev {_num(r['dev_before'])} -> {_num(r['dev_after'])}, loss (last {LAST}) "
                  f"{_num(r['train_loss_last'], '.4f')}") if r["status"] == "ok" else error
        say(f"[{i}/{len(probes)}] lr {probe.lr:g} eps {probe.eps:g}: {what}: {result}")

    tie = tie_width(dev_tie, len(data.dev))
    chosen = pick(rows, max_g_growth, allow_rising_loss, tie)
    total = sum(r["forward_passes"] for r in rows)
    now = sum(r["forward_passes"] for r in rows if r["this_call"])
    lines = [table(rows, chosen, max_g_growth, allow_rising_loss), "",
             f"cost: {total} forward passes of training in {len(rows)} probes ({now} in this call), plus two "
             f"evaluations of the {len(data.dev)} held-out dev examples per probe"]
    if chosen is None:
        lines.append("no pick: every probe failed; try a grid of smaller lrs (--grid)")
    else:
        lines.append(f"pick: lr {chosen['lr']:g}" + (f", eps {chosen['eps']:g}" if len(eps_grid) > 1 else "")
                     + f" (dev {chosen['metric']} {chosen['dev_after']:.3f} on the held-out split)")
        top = max(r["dev_after"] for r in eligible(rows, max_g_growth, allow_rising_loss))
        if chosen["dev_after"] < top:
            lines.append(f"note: its dev is within {dev_tie} example{'s' * (dev_tie != 1)} of the best "
                         f"({top:.3f}), a tie, and its training loss is lower (--dev-tie 0: exact ties only)")
        rose = [r for r in rows if r["status"] == "ok" and rising(r, allow_rising_loss)]
        if rose and rising(chosen, allow_rising_loss):
            lines.append("note: every probe's training loss rose, so the pick ignores that")
        elif rose:
            lines.append("left out (training loss rose; --allow-rising-loss keeps them): "
                         + ", ".join(f"lr {r['lr']:g} ({r['loss_ratio']:.2f}x)" for r in rose))
        steep_ok = [r for r in rows if r["status"] == "ok" and steep(r, max_g_growth)]
        if steep_ok and steep(chosen, max_g_growth):
            lines.append(f"note: every probe's |g| grew past --max-g-growth {max_g_growth:g}, so the pick "
                         f"ignores it")
        elif steep_ok:
            lines.append(f"left out (|g| grew past {max_g_growth:g}x): "
                         + ", ".join(f"lr {r['lr']:g} ({r['g_growth']:.2f}x)" for r in steep_ok))
        if len(grid) > 1 and chosen["lr"] in (grid[0], grid[-1]):
            side = "smallest" if chosen["lr"] == grid[0] else "largest"
            lines.append(f"note: the pick is the grid's {side} lr; the best lr may lie beyond it "
                         f"(extend --grid that way)")
    record = {
        "method": cfg.method, "model": cfg.model, "data": data_name(cfg), "seed": cfg.seed,
        "probe_forwards": probe_forwards, "steps_per_probe": steps, "probe_train": len(data.train),
        "probe_dev": len(data.dev), "grid": grid, "eps_grid": eps_grid, "max_g_growth": max_g_growth,
        "allow_rising_loss": allow_rising_loss, "dev_tie": dev_tie, "rows": rows,
        "pick": None if chosen is None else {k: chosen[k] for k in ("lr", "eps", "dev_after", "train_loss_last",
                                                                   "run_dir")},
        "total_forward_passes": total, "train_run": None,
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out / "tune.json", json.dumps(record, indent=2))
    text = "\n".join(lines)
    result = TuneResult(rows, chosen, text, out)
    if not train_after or chosen is None:  # no pick: the caller says so (the CLI after printing the table)
        return result
    final = TrainConfig.from_dict({**cfg.to_dict(), "lr": chosen["lr"], "eps": chosen["eps"],
                                   "output_dir": cfg.output_dir or str(out / "run")}, source="zotune tune")
    say(f"zotune tune: training {cfg.method} at lr {chosen['lr']:g} into {final.output_dir}")
    what, error = run_or_reuse(final)
    if error:
        raise ZOError(f"the full run at the picked lr {chosen['lr']:g} failed: {error}")
    record["train_run"] = final.output_dir
    atomic.write_text(out / "tune.json", json.dumps(record, indent=2))
    result.summary = Summary(**read_summary(final.output_dir))
    return result
