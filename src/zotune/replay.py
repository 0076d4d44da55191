"""A run is its trajectory: rebuild trained weights from (initial state, [(step, g, lr)]).

Every direction is a pure function of (run seed, step, query, tensor name), so
the update of a step is determined by its slopes g and its lr. Replaying the
optimizer updates in order, with the same code and the same arithmetic as
training, reproduces the trained tensors bit for bit. That holds for momentum
and Adam too: their state is itself a deterministic function of the same
sequence, so it is rebuilt along the way. This is what ``zotune replay`` does
and how ``zotune train --resume`` continues a killed run exactly: no tensor
checkpoint is needed, only the trajectory (kilobytes) flushed after every step.
"""

from __future__ import annotations

import json
from pathlib import Path

from .engine import QueryKey, ZOEngine
from .errors import ZOError


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


def replay(engine: ZOEngine, rows: list[dict]) -> None:
    """Apply the logged updates to the engine's freshly prepared method, in order.

    A method-owned engine with its own ``replay(rows)`` (e.g. one whose directions
    depend on data, or a first-order step) decides for itself, which may be to refuse.
    """
    if hasattr(engine, "replay"):
        engine.replay(rows)
        return
    method, optimizer = engine.method, engine.optimizer
    for row in rows:
        step = row["step"]
        views = method.views(step)
        keys = [QueryKey(engine.seed, step, q) for q in range(len(row["g"]))]
        optimizer.update(views, list(zip(keys, row["g"])), method, row["lr"])
        engine.step_count = step + 1
        engine.forward_passes += 2 * len(row["g"])


def replay_run(run_dir: Path, out: Path | None = None) -> dict:
    """Rebuild ``run_dir``'s trained tensors from its config and trajectory; compare with its adapter."""
    import torch
    from safetensors.torch import load_file

    from .config import TrainConfig
    from .models import load_model
    from .methods import get_method
    from .train import (build_engine, load_calibration, run_calibration, safetensors_bytes, save_atomically,
                        task_data)

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise ZOError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = TrainConfig.from_yaml(run_dir / "config.yaml")
    rows = read_trajectory(run_dir / "trajectory.jsonl")
    method = get_method(cfg.method)(cfg)
    load_calibration(method, run_dir)  # the run's own basis; recomputed from its seeded examples if absent
    model, tok, _ = load_model(cfg.model)
    calibration = None
    if method.needs_calibration and not method.calibration:
        data = task_data(cfg).subsample(cfg.seed, cfg.train_size, cfg.dev_size, cfg.test_size)
        calibration = run_calibration(cfg, data.train, tok)
    model, engine = build_engine(cfg, model, method, calibration)
    replay(engine, rows)
    out = Path(out) if out else run_dir / "replayed"
    save_atomically(method, model, out)
    log_bytes = (run_dir / "trajectory.jsonl").stat().st_size if rows else 0
    adapter_bytes = safetensors_bytes(out)
    result = {"steps": len(rows), "replayed": str(out), "trajectory_bytes": log_bytes,
              "adapter_bytes": adapter_bytes,  # the trained tensors the log stands for (safetensors)
              "log_vs_adapter": round(log_bytes / adapter_bytes, 6) if adapter_bytes else None}
    saved = run_dir / "adapter"
    if saved.exists() and len(rows) == cfg.steps:
        def tensors(folder: Path) -> dict:
            state = {}
            for f in sorted(folder.glob("*.safetensors")):
                state.update(load_file(f))
            return state

        a, b = tensors(saved), tensors(out)
        result["bit_identical"] = a.keys() == b.keys() and all(
            torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)
    return result
