"""What a run directory shows: its curves (``curves.png``) and a comparison of runs (``zotune report``).

Everything here reads only the run directory's files (``config.yaml``,
``metrics.jsonl``, ``summary.json``, and ``failed.json`` where a bench or a
tune recorded a failure), never a model, so it works on any run: finished,
killed midway, diverged, or written by another machine.

* :func:`plot_run` writes ``RUN/curves.png``: the training loss (each step
  faint, a moving mean on top) and the dev metric, both against forward passes.
  :func:`zotune.train.train` calls it at the end of every run (a resumed run
  rewrites it).
* :func:`read_run`, :func:`table` and :func:`plot_compare` are ``zotune report
  RUN [RUN ...]``: one row per run and one figure with a line per run.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import ZOError, require

CURVES = "curves.png"


@dataclass
class RunRecord:
    """A run directory as read back from its files."""

    path: Path
    config: dict  # config.yaml as written (not validated: a run of a method not installed here still reads)
    steps: list[dict] = field(default_factory=list)  # step records, one per step, in order
    evals: list[dict] = field(default_factory=list)  # dev evaluations, one per evaluated step, in order
    summary: dict | None = None  # summary.json: present when the run finished
    error: str = ""  # failed.json's error, where a bench or tune recorded one

    @property
    def status(self) -> str:
        if self.summary is not None:
            return "finished"
        return "failed" if self.error else "unfinished"

    @property
    def metric(self) -> str:
        """The dev metric's name (accuracy; SQuAD: f1)."""
        if self.summary and self.summary.get("metric"):
            return self.summary["metric"]
        return next((e["metric"] for e in self.evals if "metric" in e), "accuracy")

    @property
    def data(self) -> str:
        """What the run trained on, as the user named it: their file, or the task."""
        train_file = self.config.get("train_file") or ""
        return Path(train_file).name if train_file else str(self.config.get("task", "?"))

    @property
    def forward_passes(self) -> int:
        if self.summary:
            return int(self.summary.get("forward_passes", 0))
        return int(self.steps[-1].get("forward_passes", 0)) if self.steps else 0

    def loss_curve(self) -> tuple[list[float], list[float]]:
        """(forward passes, loss) of every step."""
        return ([_x(r) for r in self.steps], [float(r["loss"]) for r in self.steps])

    def dev_curve(self) -> tuple[list[float], list[float]]:
        """(forward passes, dev metric) of every evaluation."""
        return ([_x(r) for r in self.evals], [float(r["dev_acc"]) for r in self.evals])


def _x(record: dict) -> float:
    return float(record.get("forward_passes", record["step"]))


def read_run(path: str | Path) -> RunRecord:
    """Read a run directory; a folder that is not one fails with a one-line :class:`ZOError`."""
    path = Path(path)
    require(path.is_dir(), f"{path}: no such run directory")
    require((path / "config.yaml").is_file(), f"{path} is not a run directory (no config.yaml)")
    try:
        config = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ZOError(f"{path / 'config.yaml'}: not readable YAML ({' '.join(str(exc).split())})") from None
    require(isinstance(config, dict), f"{path / 'config.yaml'}: not a mapping of settings")
    steps: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    metrics = path / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill
            if not isinstance(r, dict) or not isinstance(r.get("step"), int):
                continue
            if "loss" in r:
                steps[r["step"]] = r  # a later record of the same step (a redone step) replaces it
            elif "dev_acc" in r:
                evals[r["step"]] = r
    summary = _json(path / "summary.json")
    failed = _json(path / "failed.json")
    return RunRecord(path, config, [steps[s] for s in sorted(steps)], [evals[s] for s in sorted(evals)],
                     summary, str((failed or {}).get("error", "")))


def _json(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving mean over ``window`` values (non-finite values left out of the mean)."""
    out = []
    for i in range(len(values)):
        xs = [v for v in values[max(0, i + 1 - window): i + 1] if math.isfinite(v)]
        out.append(sum(xs) / len(xs) if xs else float("nan"))
    return out


def smoothing_window(n: int) -> int:
    """About a twentieth of the run, at least 1 step and at most 50."""
    return max(1, min(50, round(n / 20)))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fmt(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _title(run: RunRecord) -> str:
    c = run.config
    lr = c.get("lr")
    head = (f"{c.get('method', '?')} on {run.data} ({Path(str(c.get('model', '?'))).name}), "
            f"lr {lr:g}" if isinstance(lr, (int, float)) else f"{c.get('method', '?')} on {run.data}")
    s = run.summary
    if s:
        tail = (f"dev {run.metric} {_fmt(s.get('dev_before'))} -> {_fmt(s.get('dev_after'))} (best "
                f"{_fmt(s.get('dev_best'))} at step {s.get('best_step')}), {s.get('forward_passes')} forward passes")
    else:
        tail = f"{run.status}: {len(run.steps)} of {c.get('steps', '?')} steps"
        tail += f" ({run.error})" if run.error else ""
    return f"{head}\n{tail[:110]}"


def plot_run(path: str | Path, out: str | Path | None = None) -> Path:
    """Write ``curves.png`` (or ``out``) for the run in ``path``: training loss and dev metric against
    forward passes, two panels. Reads only the run directory's files; returns the image's path."""
    run = read_run(path)
    out = Path(out) if out else run.path / CURVES
    plt = _pyplot()
    fig, (ax_loss, ax_dev) = plt.subplots(1, 2, figsize=(11, 4.2))
    xs, losses = run.loss_curve()
    if xs:
        window = smoothing_window(len(losses))
        ax_loss.plot(xs, losses, color="tab:blue", alpha=0.25, lw=0.8, label="each step")
        ax_loss.plot(xs, smooth(losses, window), color="tab:blue", lw=2, marker="o" if len(xs) <= 50 else None,
                     ms=3, label=f"moving mean of {window} step{'s' * (window > 1)}")  # a dot per step when few
        ax_loss.legend(fontsize=8)
    else:
        ax_loss.text(0.5, 0.5, "no steps logged", ha="center", va="center", transform=ax_loss.transAxes)
    ax_loss.set_title("training loss", fontsize=10)
    ax_loss.set_xlabel("forward passes")
    ax_loss.set_ylabel("loss")
    dx, dev = run.dev_curve()
    if dx:
        ax_dev.plot(dx, dev, "o-", color="tab:orange")
        if run.summary and run.summary.get("best_step") is not None:
            best = [e for e in run.evals if e["step"] == run.summary["best_step"]]
            if best:
                ax_dev.plot([_x(best[0])], [best[0]["dev_acc"]], "*", color="tab:red", ms=12, label="best")
                ax_dev.legend(fontsize=8)
    else:
        ax_dev.text(0.5, 0.5, "no evaluation logged", ha="center", va="center", transform=ax_dev.transAxes)
    ax_dev.set_title(f"dev {run.metric}", fontsize=10)
    ax_dev.set_xlabel("forward passes")
    ax_dev.set_ylabel(run.metric)
    for ax in (ax_loss, ax_dev):
        ax.grid(alpha=0.3)
    fig.suptitle(_title(run), fontsize=9)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.12, top=0.8, wspace=0.22)  # tight_layout doubles the time
    tmp = out.with_name(f".{out.name}.tmp.png")  # a kill mid-write never leaves a torn image
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
    return out


# ------------------------------------------------------------------------------------ zotune report

COLUMNS = ("run", "status", "method", "data", "lr", "steps", "forwards", "dev before -> after (best)", "test",
           "wall s", "peak MiB", "dtype")


def row(run: RunRecord, label: str) -> dict:
    """One line of the comparison, from whatever the run directory holds."""
    c, s = run.config, run.summary or {}
    evals = [e["dev_acc"] for e in run.evals]
    before = s.get("dev_before", run.evals[0]["dev_acc"] if run.evals and run.evals[0]["step"] == 0 else None)
    after = s.get("dev_after") if s else (evals[-1] if len(evals) > 1 else None)
    best = s.get("dev_best") if s else (max(evals[1:]) if len(evals) > 1 else None)
    total = c.get("steps")
    return {
        "run": label, "path": str(run.path), "status": run.status, "error": run.error,
        "method": c.get("method", "?"), "data": run.data, "model": c.get("model", "?"), "lr": c.get("lr"),
        "eps": c.get("eps"), "steps_done": len(run.steps), "steps": total, "forward_passes": run.forward_passes,
        "metric": run.metric, "dev_before": before, "dev_after": after, "dev_best": best,
        "test": s.get("test_after"), "wall_s": s.get("wall_s"), "peak_memory_mb": s.get("peak_memory_mb"),
        "dtype": s.get("dtype") or c.get("dtype", "?"),
    }


def labels(runs: list[RunRecord]) -> list[str]:
    """Each run's folder name; the path where two runs share a name."""
    names = [r.path.name for r in runs]
    return [r.path.name if names.count(r.path.name) == 1 else str(r.path) for r in runs]


def table(rows: list[dict]) -> str:
    """The comparison as aligned text, one line per run."""
    def cells(r: dict) -> list[str]:
        steps = f"{r['steps']}" if r["status"] == "finished" else f"{r['steps_done']}/{r['steps']}"
        dev = f"{_fmt(r['dev_before'])} -> {_fmt(r['dev_after'])} ({_fmt(r['dev_best'])})"
        if r["metric"] != "accuracy":
            dev += f" {r['metric']}"
        lr = r["lr"]
        return [r["run"], r["status"], str(r["method"]), r["data"], f"{lr:g}" if isinstance(lr, (int, float)) else "?",
                steps, str(r["forward_passes"]), dev, _fmt(r["test"]),
                "-" if r["wall_s"] is None else f"{r['wall_s']:.0f}",
                "-" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}", str(r["dtype"])]

    grid = [list(COLUMNS)] + [cells(r) for r in rows]
    widths = [max(len(line[i]) for line in grid) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in grid]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in rows:
        if r["error"]:
            lines.append(f"{r['run']}: failed: {r['error']}")
    return "\n".join(lines)


def plot_compare(runs: list[RunRecord], names: list[str], out: str | Path) -> Path:
    """One figure: the dev metric and the (smoothed) training loss against forward passes, a line per run."""
    out = Path(out)
    plt = _pyplot()
    fig, (ax_dev, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.6))
    for i, (run, name) in enumerate(zip(runs, names)):
        color = f"C{i % 10}"
        dx, dev = run.dev_curve()
        if dx:
            ax_dev.plot(dx, dev, "o-", color=color, ms=4, label=name)
        xs, losses = run.loss_curve()
        if xs:
            ax_loss.plot(xs, smooth(losses, smoothing_window(len(losses))), color=color, label=name)
    metrics = {r.metric for r in runs}
    metric = metrics.pop() if len(metrics) == 1 else "metric"
    ax_dev.set_title(f"dev {metric}", fontsize=10)
    ax_dev.set_ylabel(metric)
    ax_loss.set_title("training loss (moving mean, ~1/20 of each run)", fontsize=10)
    ax_loss.set_ylabel("loss")
    for ax in (ax_dev, ax_loss):
        ax.set_xlabel("forward passes")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=7)
    fig.tight_layout()
    if out.parent != Path(""):
        out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def report(paths: list[str | Path], out: str | Path = "report.png") -> tuple[str, list[dict], Path]:
    """``zotune report``: read every run (all checked before anything is written), return the table, the
    rows and the comparison image's path."""
    require(bool(paths), "zotune report needs at least one run directory")
    runs = [read_run(p) for p in paths]
    names = labels(runs)
    rows = [row(r, n) for r, n in zip(runs, names)]
    return table(rows), rows, plot_compare(runs, names, out)
