"""A run is its trajectory: rebuild trained weights from (initial state, [(step, g, lr)]).

Every direction is a pure function of (run seed, step, query, tensor name), so
the update of a step is determined by its slopes g and its lr. Replaying the
optimizer updates in order, through the same update path as training
(:meth:`zotune.engine.ZOEngine.apply`), reproduces the trained tensors bit for
bit. That holds for momentum and Adam too: their state is itself a
deterministic function of the same sequence, so it is rebuilt along the way.
This is what ``zotune replay`` does and how ``zotune train --resume`` continues
a killed run exactly: no tensor checkpoint is needed, only the trajectory
(kilobytes) flushed after every step.

The model is rebuilt by :func:`zotune.setup.setup` from the run's own config,
so a run trained in bf16, on CUDA or over a quantized base replays in the same
setting.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .rundir import RunDir, safetensors_bytes
from .setup import setup


def replay_run(run_dir: Path, out: Path | None = None) -> dict:
    """Rebuild ``run_dir``'s trained tensors from its config and trajectory; compare with its adapter."""
    from safetensors.torch import load_file

    run = RunDir.open(run_dir)
    cfg = run.config(progress=False)
    rows = run.trajectory()
    built = setup(cfg, calibration=run.calibration())  # the run's own basis; recomputed from its seeds if absent
    built.engine.replay(rows)
    out = Path(out) if out else run.path / "replayed"
    RunDir(out.parent).save(built.method, built.model, out.name)
    log_bytes = (run.path / "trajectory.jsonl").stat().st_size if rows else 0
    adapter_bytes = safetensors_bytes(out)
    result = {"steps": len(rows), "replayed": str(out), "trajectory_bytes": log_bytes,
              "adapter_bytes": adapter_bytes,  # the trained tensors the log stands for (safetensors)
              "log_vs_adapter": round(log_bytes / adapter_bytes, 6) if adapter_bytes else None,
              "device": built.device, "dtype": built.precision.name,
              "forward_passes": built.engine.forward_passes}
    saved = run.path / "adapter"
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
