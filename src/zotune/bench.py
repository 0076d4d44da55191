"""``zotune bench``: methods x tasks x seeds at the same forward-pass budget.

Methods are compared in forward passes, not steps (methods.md): a grid entry
with q queries per step spends 2q forward passes a step, first-order LoRA
counts its forward + backward as 3 (``Method.forwards_per_step``), and every
entry gets ``steps = budget // forwards_per_step`` so all spend the same
budget (up to the remainder of that division). Each entry trains with its own
learning rate, since a fair comparison needs a tuned lr per method.

A grid entry is a *label* plus TrainConfig settings, so one method can appear
several times with different settings (the rank sweep: ``ar1zo`` at r = 1, 4,
16, 64, and ``atom-canonical`` = ar1zo with canonical scaling). Nothing here
names a method: a new method plugs in by being registered.

Output folder (``--out``)::

    runs/<label>__<task>__s<seed>/   one zotune run directory per grid point
    results.csv, results.json        one row per run (json also holds the dev curve)
    results.md                       mean ± std over seeds per entry x task
    dev_curves.png                   dev accuracy against forward passes, one panel per task
    forward_times.json               the measured forward time per entry x task (the step-cost unit)

Re-running the same command skips runs whose ``summary.json`` exists, resumes
runs that were killed midway (exactly, through the run's trajectory) and does
not retry failed runs unless ``--retry-failed``; a long bench is resumable.
A run that diverges (a :class:`ZOError`, e.g. a non-finite loss) is recorded
with its error instead of stopping the bench.
"""

from __future__ import annotations

import csv
import dataclasses
import gc
import io
import json
import random
import re
import shutil
import statistics
import textwrap
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
import torch
import yaml

from . import atomic
from .config import TrainConfig
from .errors import ZOError, require
from .rundir import read_summary

FO_NOTE = "first-order counted as 3 forwards per step"


@dataclass(frozen=True)
class Entry:
    """One line of the comparison: a label, the TrainConfig settings that define it, its learning rate."""

    label: str
    settings: dict  # TrainConfig fields; must include "method"
    lr: float
    tuned: bool = False  # True only with a probe: an lr picked on this model and task
    probe: str = ""  # the committed file (relative to the repository) whose table shows the pick


@dataclass
class Preset:
    name: str
    description: str
    entries: list[Entry]
    tasks: list[str]
    seeds: list[int]
    budget: int  # forward passes per run
    settings: dict = field(default_factory=dict)  # shared TrainConfig settings (model, batch, sizes, eps, ...)
    evals: int = 3  # dev evaluations during a run, evenly spaced in forward passes (plus zero-shot and final)


SMOLLM_SETTINGS = dict(model="smollm2-135m", batch_size=16, train_size=1000, dev_size=500, eps=1e-2)
# The method comparisons: CPU-sized (200 dev examples, 60 ZO steps), micro-batches of 4 halve the forward time
COMPARE_SETTINGS = dict(SMOLLM_SETTINGS, dev_size=200, micro_batch_size=4)
SST2_PROBE = "benchmarks/results/sst2_smollm2/README.md"  # the lr probe of the sst2-smollm2 entries
TUNING = "benchmarks/results/default_job_tuning.md"  # the earlier SmolLM2 lr runs (mezo-lora, ar1zo)
SMOLLM_ENTRIES: dict[str, Entry] = {e.label: e for e in [
    Entry("mezo-lora", {"method": "mezo-lora"}, 3e-3, True, TUNING),
    Entry("ar1zo", {"method": "ar1zo"}, 1.5e-2, True, TUNING),
    Entry("zoact", {"method": "zoact", "optimizer": "adam"}, 5e-3, True, SST2_PROBE),
    Entry("zoact-int8", {"method": "zoact", "optimizer": "adam", "quantize": "int8"}, 5e-3, True, SST2_PROBE),
    # full-parameter methods at the papers' eps (1e-3); the LoRA-space methods at SmolLM2's tuned 1e-2
    Entry("lozo", {"method": "lozo", "eps": 1e-3}, 5e-5, True, SST2_PROBE),
    Entry("subzero", {"method": "subzero", "eps": 1e-3}, 5e-5, True, SST2_PROBE),
    Entry("agzo", {"method": "agzo", "eps": 1e-3}, 1e-3, True, SST2_PROBE),
    Entry("fo-lora", {"method": "fo-lora"}, 1e-3, True, SST2_PROBE),
]}


def _rank_sweep() -> list[Entry]:
    # methods.md's rank sweep with a shared lr; lora_alpha 2 as benchmarks/rank_sweep.py
    topologies = [("mezo-lora", {"method": "mezo-lora"}),
                  ("atom-canonical", {"method": "ar1zo", "ar1_scaling": "canonical"}),
                  ("ar1zo", {"method": "ar1zo", "ar1_scaling": "topology"})]
    return [Entry(f"{name}-r{r}", {**settings, "lora_r": r}, 1.5e-2, False) for name, settings in topologies
            for r in (1, 4, 16, 64)]


#: Presets that are studies, not grids: each entry's lr is picked by zotune.tune's probes on a dev split carved
#: from the training data, then the seeds' claims are tested (tables, verdicts). Name -> (module, description);
#: the module's ``main(args, say)`` runs it from ``zotune bench --preset NAME``.
STUDIES: dict[str, tuple[str, str]] = {
    "regime": ("zotune.regime", "issue 16: AR1-ZO's and ZO-Act's claims on SmolLM2-135M, SST-2 + Rotten Tomatoes "
                                "+ CR, 1,000 train, lr per entry picked on a carved dev split, 3 seeds, test on a "
                                "held-out 500, ZO-SGD and Adam arms, paired 95% intervals, verdicts.md (many CPU "
                                "hours: see docs/benchmarks.md, Regime study)"),
}

PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("quick", "CI-sized: a tiny random llama (or --model PATH) on a synthetic task, two methods whose "
                    "steps cost 2 and 4 forwards, 48 forwards each",
           [Entry("mezo-lora", {"method": "mezo-lora"}, 0.05),
            Entry("ar1zo-q2", {"method": "ar1zo", "queries": 2}, 0.05)],
           tasks=["synthetic"], seeds=[0, 1], budget=48,
           settings=dict(model="tiny-random", batch_size=8, train_size=64, dev_size=32, max_length=32)),
    Preset("sst2-smollm2", "SST-2 on SmolLM2-135M: every method at the same forward-pass budget, each at its "
                           "own lr (picked by a short probe, see benchmarks/results/sst2_smollm2/README.md)",
           [SMOLLM_ENTRIES[k] for k in ("mezo-lora", "ar1zo", "zoact", "lozo", "subzero", "agzo", "fo-lora")],
           tasks=["sst2"], seeds=[0, 1, 2], budget=120, evals=1, settings=dict(COMPARE_SETTINGS)),
    Preset("zoact", "ZO-Act over an fp32 and an int8 base against MeZO-LoRA and AR1-ZO on SST-2 and RTE, "
                    "SmolLM2-135M, same budget and seed",
           [SMOLLM_ENTRIES[k] for k in ("mezo-lora", "ar1zo", "zoact", "zoact-int8")],
           tasks=["sst2", "rte"], seeds=[0], budget=120, evals=1, settings=dict(COMPARE_SETTINGS)),
    Preset("rank-sweep", "methods.md's rank sweep at a shared lr: mezo-lora, atom-canonical (ar1zo with alpha/r) "
                         "and ar1zo at r in 1,4,16,64 (subsumes benchmarks/rank_sweep.py's default)",
           _rank_sweep(), tasks=["sst2"], seeds=[0], budget=400,
           settings=dict(SMOLLM_SETTINGS, lora_alpha=2.0)),
]}


# ---------------------------------------------------------------------------------------------- the grid

def forwards_per_step(cfg: TrainConfig) -> int:
    """Forward-pass equivalents of one step of ``cfg``'s method (2 per query for ZO)."""
    from .methods import get_method

    return int(get_method(cfg.method).forwards_per_step(cfg))


def steps_for_budget(budget: int, cfg: TrainConfig) -> int:
    """Steps that spend ``budget`` forward passes (rounded down): 400 -> 200 for q=1, 100 for q=2, 133 for 3."""
    per_step = forwards_per_step(cfg)
    require(budget >= per_step, f"budget {budget} forward passes is less than one step of {cfg.method} "
                                f"({per_step} forward passes)")
    return budget // per_step


@dataclass
class Run:
    entry: Entry
    task: str
    seed: int
    cfg: TrainConfig
    run_dir: Path


def select(preset: Preset, methods: list[str] | None = None, tasks: list[str] | None = None,
           seeds: list[int] | None = None, budget: int | None = None, lr: float | None = None,
           settings: dict | None = None) -> Preset:
    """``preset`` with the command line's overrides.

    ``methods`` picks entries by label; a name that is no label of the preset adds
    that method with default settings at the method's own ``suggested_lr`` (marked
    untuned unless the method says it was probed). ``lr`` replaces every entry's
    lr (a shared-lr comparison).
    """
    from .methods import get_method

    entries = preset.entries
    if methods:
        by_label = {e.label: e for e in preset.entries}

        def added(name: str) -> Entry:
            cls = get_method(name)
            return Entry(name, {"method": name}, cls.suggested_lr, cls.suggested_lr_tuned)

        entries = [by_label.get(m) or added(m) for m in methods]
    if lr is not None:
        entries = [dataclasses.replace(e, lr=lr, tuned=False) for e in entries]
    return dataclasses.replace(preset, entries=entries, tasks=tasks or preset.tasks, seeds=seeds or preset.seeds,
                               budget=budget or preset.budget, settings={**preset.settings, **(settings or {})})


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text)


def task_label(task: str) -> str:
    return Path(task).stem if task.endswith((".yaml", ".yml")) else task


def plan(preset: Preset, out: Path, prepare: bool = True) -> list[Run]:
    """The runs of ``preset``, each with its resolved and validated config; fails before any training.

    ``prepare`` makes what the grid needs on disk (the synthetic task's files, the
    tiny random model); a dry run plans without it.
    """
    from .methods import METHODS

    missing = sorted({e.settings.get("method", "") for e in preset.entries} - set(METHODS))
    if missing and prepare:
        raise ZOError(f"preset {preset.name!r} needs method(s) not installed here: {', '.join(missing)} "
                      f"(installed: {', '.join(sorted(METHODS))}); pick entries with --methods")
    runs = []
    for task in preset.tasks:
        for entry in preset.entries:
            for seed in preset.seeds:
                data = dict(preset.settings)
                if data.get("model") == "tiny-random":
                    data["model"] = str(tiny_random_model(out / "tiny-random") if prepare else out / "tiny-random")
                data.update(synthetic_task(out / "data", write=prepare) if task == "synthetic" else {"task": task})
                data.update(entry.settings)
                run_dir = out / "runs" / f"{safe_name(entry.label)}__{safe_name(task_label(task))}__s{seed}"
                data.update(lr=entry.lr, seed=seed, output_dir=str(run_dir), progress=False)
                cfg = TrainConfig.from_dict(data, source=f"bench entry {entry.label!r}")
                if cfg.method in missing:  # dry run: show it, without steps
                    runs.append(Run(entry, task_label(task), seed, cfg, run_dir))
                    continue
                try:
                    cfg.validate()
                except ZOError as exc:
                    raise ZOError(f"bench entry {entry.label!r} on {task}: {exc}") from None
                cfg.steps = steps_for_budget(preset.budget, cfg)
                # evaluate at the same forward-pass points for every entry (when the rates divide evenly)
                per_eval = preset.budget // (preset.evals + 1)
                cfg.eval_every = max(1, per_eval // forwards_per_step(cfg)) if preset.evals else 0
                runs.append(Run(entry, task_label(task), seed, cfg, run_dir))
    return runs


def describe(preset: Preset, runs: list[Run]) -> str:
    """The grid as text (``--dry-run``)."""
    s = preset.settings
    lines = [f"preset {preset.name}: {preset.description}",
             f"model {s.get('model')}, budget {preset.budget} forward passes per run, batch "
             f"{s.get('batch_size', TrainConfig().batch_size)}, {len(runs)} runs ({FO_NOTE})",
             f"{'entry':22s} {'method':12s} {'task':14s} {'seed':>4s} {'lr':>9s} {'fwd/step':>8s} {'steps':>6s} "
             f"{'forwards':>8s} {'eval every':>10s}"]
    from .methods import METHODS

    for r in runs:
        if r.cfg.method not in METHODS:
            lines.append(f"{r.entry.label:22s} {r.cfg.method:12s} {r.task:14s} {r.seed:4d} {r.cfg.lr:9.3g}"
                         f"   (method not installed here)")
            continue
        per = forwards_per_step(r.cfg)
        lines.append(f"{r.entry.label:22s} {r.cfg.method:12s} {r.task:14s} {r.seed:4d} {r.cfg.lr:9.3g} {per:8d} "
                     f"{r.cfg.steps:6d} {r.cfg.steps * per:8d} {r.cfg.eval_every:10d}"
                     + ("" if r.entry.tuned else "   (lr untuned)"))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ running it

COMPARED_OUT = ("progress", "threads", "device", "output_dir")  # settings that do not change a run's result
RESOLVED_BY_THE_RUN = ("dtype", "restore")  # "auto" settings a run directory records resolved


def same_config(path: Path, cfg: TrainConfig, who: str = "bench") -> None:
    """Refuse to reuse a run directory that holds a run of other settings (bench, tune, the studies)."""
    saved = yaml.safe_load((path / "config.yaml").read_text()) or {}
    defaults = TrainConfig().to_dict()  # a setting added after the run was made: the run had its default
    unread = () if cfg.reads_data_dir() else ("data_dir",)  # e.g. rotten-tomatoes, from a package
    for key, value in cfg.to_dict().items():
        if key in RESOLVED_BY_THE_RUN and value == "auto":
            continue  # a run records what auto picked on its machine
        if key not in COMPARED_OUT + unread and saved.get(key, defaults.get(key)) != value:
            raise ZOError(f"{path} holds a run with {key}={saved.get(key)!r}, this {who} wants {value!r}; "
                          f"use another --out (or delete that run directory)")


def _same_config(run: Run) -> None:
    same_config(run.run_dir, run.cfg)


def reset_peak_memory(device: str) -> None:
    """Start a fresh peak-memory window for the next run (runs share this process)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        try:  # Linux: "5" resets the process's peak RSS, which ru_maxrss reports
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def measure_forward(cfg: TrainConfig, repeats: int = 7) -> float:
    """Median seconds of one no-grad loss evaluation on the run's first training batch, model built as
    the run builds it (:func:`zotune.setup.setup`): the unit of the step-cost ratio."""
    from .setup import batch_indices, load_data, setup

    data = load_data(cfg)
    built = setup(dataclasses.replace(cfg, compile=False), data)
    batch = [data.train[i] for i in batch_indices(len(data.train), cfg.batch_size, cfg.seed, 0)]
    scorer = built.scorer  # the forward the run's steps are made of
    for _ in range(2):  # warm-up: first-call allocations, thread pools
        scorer.loss(batch)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        scorer.loss(batch)
        times.append(time.perf_counter() - t)
    del built, scorer
    gc.collect()
    return statistics.median(times)


def step_seconds(metrics_path: Path, eval_every: int) -> float | None:
    """Median wall time of a training step, from the time_s stamps of consecutive step records.

    Intervals that contain a dev evaluation (after an eval_every step) or a resume
    (time going backwards) are left out; the median shrugs off machine noise.
    """
    if not metrics_path.exists():
        return None
    steps = [json.loads(line) for line in metrics_path.read_text().splitlines() if '"loss"' in line]
    deltas = [b["time_s"] - a["time_s"] for a, b in zip(steps, steps[1:])
              if b["step"] == a["step"] + 1 and not (eval_every and a["step"] % eval_every == 0)]
    deltas = [d for d in deltas if d > 0]
    return statistics.median(deltas) if deltas else None


def dev_curve(run: Run) -> list[tuple[int, float]]:
    """(forward passes, dev accuracy) at each evaluation, forward passes charged at the method's rate."""
    path = run.run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    per = forwards_per_step(run.cfg)
    records = [json.loads(line) for line in path.read_text().splitlines() if '"dev_acc"' in line]
    return [(r["step"] * per, r["dev_acc"]) for r in records]


def run_one(run: Run, retry_failed: bool = False) -> tuple[str, dict, str]:
    """Train (or skip, or resume) one grid point. Returns (what happened, summary or {}, error)."""
    from .hardware import pick_device
    from .train import train

    failed = run.run_dir / "failed.json"
    summary = read_summary(run.run_dir)
    if summary is not None:
        _same_config(run)
        return "skipped", summary, ""
    if failed.exists() and not retry_failed:
        _same_config(run)
        return "skipped", {}, json.loads(failed.read_text())["error"]
    resume = None
    if (run.run_dir / "trajectory.jsonl").exists() and (run.run_dir / "config.yaml").exists() \
            and not failed.exists():
        _same_config(run)
        resume = run.run_dir  # killed midway: continue it exactly
    elif run.run_dir.exists():
        shutil.rmtree(run.run_dir)
    reset_peak_memory(pick_device(run.cfg.device))
    try:
        summary = train(dataclasses.replace(run.cfg), resume=resume)
    except ZOError as exc:  # a diverged run (non-finite loss) is a result, not a crash of the bench
        error = str(exc)
    except Exception as exc:  # a bug in one method must not cost the rest of a long bench; keep the traceback
        traceback.print_exc()
        error = f"{type(exc).__name__}: {exc}"
    else:
        return ("resumed" if resume else "trained"), summary.__dict__, ""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    failed.write_text(json.dumps({"error": error}, indent=2))
    return "failed", {}, error


def row(run: Run, summary: dict, error: str, forward_s: float | None) -> dict:
    """One line of results.csv."""
    per = forwards_per_step(run.cfg)
    step_s = step_seconds(run.run_dir / "metrics.jsonl", run.cfg.eval_every) if summary else None
    nan = float("nan")
    return {
        "method": run.entry.label, "method_name": run.cfg.method, "task": run.task, "seed": run.seed,
        "lr": run.cfg.lr, "lr_tuned": run.entry.tuned, "status": "failed" if error else "ok",
        "dev_before": summary.get("dev_before", nan), "dev_final": summary.get("dev_after", nan),
        "dev_best": summary.get("dev_best", nan),
        "test": nan if summary.get("test_after") is None else summary["test_after"],
        "train_loss_last": summary.get("train_loss_last", nan),
        "steps": run.cfg.steps, "forwards_per_step": per, "forward_passes": run.cfg.steps * per,
        "counted_forward_passes": summary.get("forward_passes", 0),
        "wall_s": summary.get("wall_s", nan), "peak_memory_mb": summary.get("peak_memory_mb", nan),
        "step_s": nan if step_s is None else step_s, "forward_s": nan if forward_s is None else forward_s,
        "step_cost_ratio": step_cost_ratio(step_s, forward_s, per),
        "run_dir": str(run.run_dir), "error": error,
    }


def step_cost_ratio(step_s: float | None, forward_s: float | None, forwards_per_step: int) -> float:
    """A step's time over the forwards it makes (``forwards_per_step`` x one forward): 1.0 means the
    step costs exactly its forward passes; above 1, what perturbing, restoring and updating add."""
    if step_s is None or not forward_s:
        return float("nan")
    return step_s / (forwards_per_step * forward_s)


def run_bench(preset: Preset, out: Path, retry_failed: bool = False, say=print) -> list[dict]:
    """Run (or resume) the whole grid and write every output; returns the result rows."""
    runs = plan(preset, out)  # every config checked before anything trains
    out.mkdir(parents=True, exist_ok=True)
    times_path = out / "forward_times.json"
    forward_times: dict[str, float] = json.loads(times_path.read_text()) if times_path.exists() else {}
    rows = []
    for i, run in enumerate(runs, 1):
        key = f"{run.entry.label}|{run.task}"
        needs_training = read_summary(run.run_dir) is None and \
            (retry_failed or not (run.run_dir / "failed.json").exists())
        if needs_training and key not in forward_times:
            try:
                forward_times[key] = measure_forward(run.cfg)
            except ZOError as exc:
                say(f"[{i}/{len(runs)}] {key}: forward time not measured ({exc})")
            if times_path.exists():  # another bench process on the same --out may have added keys since
                forward_times = {**json.loads(times_path.read_text()), **forward_times}
            atomic.write_text(times_path, json.dumps(forward_times, indent=2))
        what, summary, error = run_one(run, retry_failed)
        r = row(run, summary, error, forward_times.get(key))
        r["curve"] = dev_curve(run)  # a failed run keeps the evaluations it made
        if not summary and r["curve"] and r["curve"][0][0] == 0:
            r["dev_before"] = r["curve"][0][1]
        rows.append(r)
        head = f"[{i}/{len(runs)}] {run.entry.label} {run.task} seed {run.seed}"
        if error:
            say(f"{head}: {what if what == 'skipped' else 'FAILED'}: {error}")
        else:
            say(f"{head}: {what}: dev {r['dev_before']:.3f} -> {r['dev_final']:.3f} (best {r['dev_best']:.3f}), "
                f"{r['forward_passes']} forwards, {r['wall_s']:.0f} s, step cost {r['step_cost_ratio']:.2f}x")
    write_outputs(rows, out, header(preset))
    return rows


# --------------------------------------------------------------------------------------------- outputs

def header(preset: Preset) -> str:
    s = {**TrainConfig().to_dict(), **preset.settings}
    return (f"zotune bench `{preset.name}`: model {s['model']}, budget {preset.budget} forward passes per run, "
            f"batch {s['batch_size']}, eps {s['eps']} (unless an entry sets its own), dev {s['dev_size']}, seeds "
            f"{','.join(map(str, preset.seeds))}; {FO_NOTE}")


def _stat(values: list[float], fmt: str = ".3f") -> str:
    xs = [v for v in values if v == v]  # drop NaN
    if not xs:
        return "-"
    return f"{statistics.mean(xs):{fmt}}" + (f" ± {statistics.stdev(xs):{fmt}}" if len(xs) > 1 else "")


def markdown(rows: list[dict], title: str) -> str:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["method"]), []).append(r)
    lines = [f"# {title}", "",
             "Mean ± std over seeds (failed runs left out of the means). Step cost = median step time / "
             "the forward passes the step makes (2 per query; agzo 3; fo-lora's forward+backward 3), each "
             "timed on a training batch: 1.00 means a step costs exactly its forwards.", "",
             "| task | method | lr | ok/runs | dev before | dev final | dev best | test | steps | forward passes | "
             "wall s | peak MiB | step cost |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (task, method), rs in groups.items():
        ok = [r for r in rs if r["status"] == "ok"]
        col = lambda key, fmt=".3f", rs=ok: _stat([r[key] for r in rs], fmt)  # noqa: E731
        lr = f"{rs[0]['lr']:g}" + ("" if rs[0]["lr_tuned"] else " (untuned)")
        lines.append(f"| {task} | {method} | {lr} | {len(ok)}/{len(rs)} | {col('dev_before', rs=rs)} | {col('dev_final')} | "
                     f"{col('dev_best')} | {col('test')} | {rs[0]['steps']} | {rs[0]['forward_passes']} | {col('wall_s', '.0f')} | "
                     f"{col('peak_memory_mb', '.0f')} | {col('step_cost_ratio', '.2f')} |")
    failures = [r for r in rows if r["status"] != "ok"]
    if failures:
        lines += ["", "Failed runs:", ""] + [f"- {r['method']} {r['task']} seed {r['seed']}: {r['error']}"
                                             for r in failures]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for method in dict.fromkeys(r["method"] for r in rows if r["task"] == task):
            curves = [r["curve"] for r in rows
                      if r["task"] == task and r["method"] == method and r["status"] == "ok" and r["curve"]]
            if not curves:
                continue
            n = min(len(c) for c in curves)  # seeds share eval points; a shorter curve is a resumed oddity
            xs = [curves[0][i][0] for i in range(n)]
            ys = [statistics.mean(c[i][1] for c in curves) for i in range(n)]
            ax.plot(xs, ys, "o-", label=method)
        ax.set_title(task)
        ax.set_xlabel("forward passes")
        ax.set_ylabel("dev accuracy (mean over seeds)")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
    fig.suptitle(textwrap.fill(title, 55 * len(tasks)), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def csv_text(rows: list[dict]) -> str:
    """results.csv: one line per run, without the dev curve; lists and dicts as JSON, and every field any
    row has (rows kept from an older results.json may lack newer fields)."""
    flat = [{k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items() if k != "curve"}
            for r in rows]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in flat for k in r)) or ["method"],
                            restval="")
    writer.writeheader()
    writer.writerows(flat)
    return buf.getvalue()


def write_outputs(rows: list[dict], out: Path, title: str) -> None:
    """results.json, results.csv, results.md and dev_curves.png; each file is replaced whole (atomic.py),
    so a bench killed while writing leaves the previous version, not half a file."""
    atomic.write_text(out / "results.json", json.dumps({"title": title, "runs": rows}, indent=2))
    atomic.write_text(out / "results.csv", csv_text(rows))
    atomic.write_text(out / "results.md", markdown(rows, title))
    plot(rows, out / "dev_curves.png", title)


# ----------------------------------------------------------------------------- what the quick preset needs

POSITIVE = "good fine nice superb lovely brilliant charming".split()
NEGATIVE = "bad awful dull boring poor clumsy tedious".split()
FILLER = "the movie film plot actors story was is and a it".split()


def synthetic_task(folder: Path, write: bool = True, n_train: int = 256, n_dev: int = 64, n_test: int = 0) -> dict:
    """A learnable sentiment-like task as user files (the label is which word list the text draws from).

    Returns the TrainConfig settings that use it; the files are rewritten
    identically each time, so a resumed bench sees the same data. ``n_test``
    adds a test file (drawn after train and dev, which stay as they were).
    """
    rng = random.Random(0)

    def lines(n: int) -> str:
        out = []
        for _ in range(n):
            label = rng.randrange(2)
            words = rng.sample(FILLER, 3) + rng.sample(POSITIVE if label else NEGATIVE, 2)
            rng.shuffle(words)
            out.append(json.dumps({"text": " ".join(words), "label": label}))
        return "\n".join(out) + "\n"

    train, dev = folder / "synthetic_train.jsonl", folder / "synthetic_dev.jsonl"
    test = folder / "synthetic_test.jsonl"
    if write:
        folder.mkdir(parents=True, exist_ok=True)
        train.write_text(lines(n_train))
        dev.write_text(lines(n_dev))
        if n_test:
            test.write_text(lines(n_test))
    return {"train_file": str(train), "dev_file": str(dev), "template": "{text} It was",
            "verbalizer": "0=terrible,1=great", **({"test_file": str(test)} if n_test else {})}


def tiny_random_model(path: Path) -> Path:
    """A 2-layer random llama with a word-level tokenizer over the synthetic task's words (built once).

    It makes no claim of quality: it lets the quick preset exercise the whole
    harness in seconds, with no download.
    """
    if (path / "config.json").exists():
        return path
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "It", "was", "great", "terrible", *POSITIVE, *NEGATIVE, *FILLER]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                        bos_token="[BOS]", eos_token="[EOS]")
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                         architectures=["LlamaForCausalLM"])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return path
