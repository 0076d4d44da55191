"""A run directory: everything a run keeps on disk, owned by one object.

Layout::

    config.yaml              the resolved config (flat settings; `zotune train --config` reads it back)
    metrics.jsonl            one line per step (loss, g, forward passes, time) and per evaluation (dev_acc)
    trajectory.jsonl         one line per step: step, seed, the slopes g, the lr. With the initial state
                             this determines the trained tensors (`zotune replay`, `--resume`)
    calibration.safetensors  what a calibrating method computed (ZO-Act's U), reused bit for bit
    calibration.json         its report (captured energy, time)
    state.pt                 methods a trajectory cannot rebuild (agzo, fo-lora): the engine's state at
                             the last dev evaluation, which `--resume` continues from; removed at the end
    adapter/                 the final trained tensors (a PEFT adapter, or the full model)
    best/                    the best-dev checkpoint
    summary.json             the run's summary, written last: its presence means the run finished
    curves.png               training loss and dev metric against forward passes

Every write that could be torn by a kill is atomic (a temporary file or folder,
then a rename), and the JSONL logs are flushed line by line, so a killed run
always reads back as a consistent run of N complete steps.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import yaml

from . import atomic
from .config import TrainConfig
from .errors import ZOError, require

CONFIG, METRICS, TRAJECTORY, SUMMARY = "config.yaml", "metrics.jsonl", "trajectory.jsonl", "summary.json"
STATE = "state.pt"


def read_trajectory(path: Path) -> list[dict]:
    """The complete steps logged in ``trajectory.jsonl``, in order.

    A process killed mid-write leaves a partial last line: it is dropped (its
    step is simply run again). Steps must be consecutive from 0.
    """
    if not path.exists():
        return []
    rows = []
    lines = path.read_text().splitlines()
    for lineno, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            complete = isinstance(row, dict) and {"step", "g", "lr"} <= set(row)
        except json.JSONDecodeError:
            complete = False
        if not complete:
            if lineno == len(lines):
                break  # a torn last line
            raise ZOError(f"{path}:{lineno}: not a trajectory record")
        if row["step"] != len(rows):
            raise ZOError(f"{path}:{lineno}: expected step {len(rows)}, found {row['step']}")
        rows.append(row)
    return rows


def read_summary(path: str | Path) -> dict | None:
    """The summary of the run in folder ``path``, or None while it has not finished.

    summary.json is written last and atomically, so its presence is the one test
    of "this run finished" that the callers which skip finished runs (tune,
    bench, the regime study) share.
    """
    summary = Path(path) / SUMMARY
    return json.loads(summary.read_text()) if summary.exists() else None


def safetensors_bytes(path: Path) -> int:
    """Bytes of the tensors saved in ``path`` (an adapter folder): what the trajectory stands for."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def check_free_space(path: Path, need: int) -> None:
    """Fail before training, not at the final save, when the disk cannot hold the run."""
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    free = shutil.disk_usage(existing).free
    require(free >= need, f"not enough disk space for the run in {path}: it will write about "
                          f"{need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free")


def run_bytes(cfg: TrainConfig, method) -> int:
    """About what a run writes: the trained tensors three times (adapter, best, the copy an atomic
    save holds while swapping), for a method a trajectory cannot rebuild twice more with an
    optimizer's two moments each (state.pt and its swap), plus the logs (a few hundred bytes per step)."""
    tensors = sum(p.numel() * p.element_size() for p in method.params.values())
    state = 0 if method.replayable else 2 * 3 * tensors
    return 3 * tensors + state + cfg.steps * (400 + 50 * cfg.queries)


def default_path(cfg: TrainConfig) -> Path:
    """runs/<data>-<method>-<time>: named after the user's file when there is one."""
    task = Path(cfg.train_file).stem if cfg.train_file else Path(cfg.task).stem
    return Path(f"runs/{task}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}")


class RunDir:
    """One run's folder. ``writable=False`` (torchrun ranks other than 0) reads but never writes."""

    def __init__(self, path: str | Path, writable: bool = True):
        self.path = Path(path)
        self.writable = writable

    # -- creating and opening ------------------------------------------------------------
    @classmethod
    def create(cls, cfg: TrainConfig, need: int = 0, note: str = "") -> "RunDir":
        """A new run directory, proven writable with ``need`` bytes free, holding ``config.yaml``
        (``note``: a comment line on top, e.g. why the dtype was picked)."""
        run = cls(cfg.output_dir or default_path(cfg))
        check_free_space(run.path, need)
        try:
            run.path.mkdir(parents=True, exist_ok=True)
            probe = run.path / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise ZOError(f"run directory {run.path} is not writable: {exc.strerror}") from exc
        run.write_config(cfg, note)
        return run

    @classmethod
    def open(cls, path: str | Path, writable: bool = True) -> "RunDir":
        run = cls(path, writable)
        require((run.path / CONFIG).exists(), f"{run.path} is not a run directory (no {CONFIG})")
        return run

    def config(self, steps: int | None = None, progress: bool | None = None) -> TrainConfig:
        """The run's config; ``steps`` extends (or shortens) the run and is written back, atomically
        (under torchrun other ranks read it); ``progress`` changes only this process's display."""
        cfg = TrainConfig.from_yaml(self.path / CONFIG)
        if steps is not None and steps != cfg.steps:
            require(cfg.lr_schedule == "constant",
                    f"{self.path}: --steps cannot change on resume under lr_schedule {cfg.lr_schedule}: the "
                    f"schedule runs over the run's {cfg.steps} steps, so the steps taken had the lrs of that "
                    f"length; start a new run for a different length")
            cfg.steps = steps
            self.write_config(cfg)
        if progress is not None:
            cfg.progress = progress
        return cfg

    def write_config(self, cfg: TrainConfig, note: str = "") -> None:
        path = self.path / CONFIG
        if not note and path.exists():  # keep the note of the run's first write (an extended run's rewrite)
            note = "\n".join(line[2:] for line in path.read_text().splitlines() if line.startswith("# "))
        comments = "".join(f"# {line}\n" for line in note.splitlines())
        self._write_text(CONFIG, comments + yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    # -- logs ------------------------------------------------------------------------------
    def trajectory(self) -> list[dict]:
        return read_trajectory(self.path / TRAJECTORY)

    def metrics(self, steps_done: int | None = None) -> list[dict]:
        """Metric records; with ``steps_done``, only those consistent with that many completed steps
        (torn lines and records of steps a killed run had not finished are dropped)."""
        out = []
        path = self.path / METRICS
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if steps_done is None or ("loss" in r and r["step"] <= steps_done) or \
                        ("dev_acc" in r and (r["step"] < steps_done or r["step"] == 0)):
                    out.append(r)
        return out

    def restart_logs(self, trajectory: list[dict], metrics: list[dict]) -> None:
        """Rewrite both logs to exactly these records (a resumed run drops what it will redo)."""
        self._write_text(TRAJECTORY, "".join(json.dumps(r) + "\n" for r in trajectory))
        self._write_text(METRICS, "".join(json.dumps(r) + "\n" for r in metrics))

    @contextmanager
    def logs(self) -> Iterator["Logs"]:
        """Appending writers for metrics.jsonl and trajectory.jsonl, flushed after every line."""
        with open(self.path / METRICS if self.writable else os.devnull, "a") as metrics, \
                open(self.path / TRAJECTORY if self.writable else os.devnull, "a") as trajectory:
            yield Logs(metrics, trajectory)

    # -- tensors ---------------------------------------------------------------------------
    def save_calibration(self, method) -> None:
        """Keep what calibration computed (resume and replay reuse it, bit for bit)."""
        if not (self.writable and method.calibration):
            return
        from safetensors.torch import save_file

        tmp = self.path / ".calibration.safetensors.tmp"
        save_file({n: t.contiguous() for n, t in method.calibration.items()}, str(tmp))
        os.replace(tmp, self.path / "calibration.safetensors")
        report = getattr(method, "report", None)
        if report is not None:
            self._write_text("calibration.json", json.dumps(report.__dict__, indent=2))

    def calibration(self) -> dict | None:
        """The saved calibration, if the run has one."""
        path = self.path / "calibration.safetensors"
        if not path.exists():
            return None
        from safetensors.torch import load_file

        return load_file(path)

    def save(self, method, model, name: str = "adapter") -> Path:
        """Write the trained tensors into ``name``/ via a fresh folder swapped in: a kill never leaves
        a half-written adapter."""
        path = self.path / name
        if not self.writable:
            return path
        tmp = path.with_name(f".{path.name}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        method.save(model, tmp)
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        if old.exists():
            shutil.rmtree(old)
        return path

    def save_state(self, engine) -> None:
        """Keep the engine's state (:func:`zotune.engine.engine_state`), atomically: the resume point of a
        run whose trajectory cannot rebuild its tensors."""
        if not self.writable:
            return
        import torch

        from .engine import engine_state

        tmp = self.path / f".{STATE}.tmp"
        torch.save(engine_state(engine), tmp)
        os.replace(tmp, self.path / STATE)

    def load_state(self, engine) -> int:
        """Set ``engine`` to the saved state; returns its step (0, and ``engine`` untouched, when none was saved)."""
        path = self.path / STATE
        if not path.exists():
            return 0
        import torch

        from .engine import load_engine_state

        devices = {t.device for t in engine.method.params.values()}
        try:  # onto the run's device when it has one (a state saved on another machine); else where saved
            state = torch.load(path, map_location=devices.pop() if len(devices) == 1 else None, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a damaged file is named, not a traceback from pickle
            raise ZOError(f"{path}: not a zotune engine state ({exc}); delete it to start the run again") from None
        load_engine_state(engine, state, str(path))
        return engine.step_count

    def drop_state(self) -> None:
        """A finished run needs no resume point (its adapter holds the result)."""
        if self.writable:
            (self.path / STATE).unlink(missing_ok=True)

    def load_trained(self, model, method, name: str = "best"):
        """Load saved trainable values (adapter or full weights) from ``name``/ back into ``model`` in place."""
        return load_trained(model, method, self.path / name)

    # -- the end -----------------------------------------------------------------------------
    def write_summary(self, summary: dict) -> None:
        self._write_text(SUMMARY, json.dumps(summary, indent=2))

    def summary(self) -> dict | None:
        return read_summary(self.path)

    def _write_text(self, name: str, text: str) -> None:
        if not self.writable:
            return
        atomic.write_text(self.path / name, text)


class Logs:
    """The two JSONL logs of a running run."""

    def __init__(self, metrics, trajectory):
        self._metrics, self._trajectory = metrics, trajectory

    def metric(self, record: dict) -> None:
        self._write(self._metrics, record)

    def step(self, record: dict) -> None:
        self._write(self._trajectory, record)

    @staticmethod
    def _write(f, record: dict) -> None:
        f.write(json.dumps(record) + "\n")
        f.flush()


def load_trained(model, method, path: Path):
    """Load saved trainable values (adapter or full weights) from ``path`` back into ``model`` in place."""
    from safetensors.torch import load_file

    files = list(Path(path).glob("*.safetensors"))
    require(bool(files), f"no safetensors file in {path}")
    state = {}
    for f in files:
        state.update(load_file(f))
    if method.is_adapter:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, state)
    else:
        model.load_state_dict(state, strict=False)
    return model
