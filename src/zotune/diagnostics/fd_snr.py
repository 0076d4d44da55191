"""FD-SNR against LoRA rank: the measurement behind AR1-ZO's claim.

For a fixed parameter point and minibatch, and directions z drawn by the
method under test (its own ``views`` and ``direction``, the very code that
trains):

* active signal  S = mean_z |L(θ+εz) − L(θ−εz)| / (2ε), evaluated in fp32;
* noise floor    N = std_z of the error the run's residual noise adds to that
  same finite difference:
    - ``bf16``:  FD evaluated under bf16 autocast minus FD in fp32 (the
      rounding a bf16 run has, perturbation rounding included);
    - ``batch``: FD on a second minibatch minus FD on the first (data noise);
* FD-SNR = S² / N².

Parameter points: ``init`` (peft's LoRA init, B = 0, so only b_k carries
signal) and ``warm`` (B drawn at random so that the adapter's update s·B·A has
the same Frobenius norm, ``warm_norm`` times ‖W‖, in every layer for every
rank and scaling: one point per rank that all rules share in function space).

Query topologies (``configs``): ``mezo-lora`` (one Gaussian over all of A and B,
canonical α/r), ``atom-canonical`` (one atom, α/r), ``atom-rslora`` (one atom,
α/√r) and ``ar1zo`` (one atom, topology scaling: α). Expected under a fixed
noise floor: S ∝ r^-1 (FD-SNR ∝ r^-2) for atom-canonical, flat for ar1zo.
"""

from __future__ import annotations

import copy
import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import TrainConfig
from ..engine import QueryKey
from ..evaluate import Scorer
from ..models import load_model
from ..tasks import resolve_task
from ..setup import batch_indices, build_engine

CONFIGS: dict[str, tuple[str, str]] = {
    "mezo-lora": ("mezo-lora", "canonical"),
    "atom-canonical": ("ar1zo", "canonical"),
    "atom-rslora": ("ar1zo", "rslora"),
    "ar1zo": ("ar1zo", "topology"),
}


@dataclass
class SNRConfig:
    model: str = "smollm2-135m"
    task: str = "sst2"
    data_dir: str = ""
    ranks: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    configs: tuple[str, ...] = tuple(CONFIGS)
    points: tuple[str, ...] = ("init", "warm")
    lora_alpha: float = 16.0
    eps: float = 1e-2
    n_dirs: int = 8
    batch_size: int = 8
    noise: str = "bf16"
    warm_norm: float = 0.02
    seed: int = 0


def _warm_start(method, model, warm_norm: float, seed: int) -> None:
    """Draw B so that ‖s·B·A‖_F = warm_norm·‖W‖_F in every adapted layer."""
    from peft.tuners.lora import LoraLayer

    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            s = module.scaling["default"]
            b.data = torch.randn(b.shape, generator=gen)
            delta = s * (b.data @ a.data)
            b.data *= warm_norm * module.get_base_layer().weight.norm() / delta.norm()


def _fd(method, scorer, batch, key: QueryKey, step: int, eps: float, autocast: bool) -> float:
    views = method.views(step)
    snap = [v.clone() for _, v in views]
    losses = []
    for sign in (1, -1):
        for (name, v), s in zip(views, snap):
            v.copy_(s).add_(method.direction(name, v, key), alpha=sign * eps)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            losses.append(scorer.loss(batch))
    for (_, v), s in zip(views, snap):
        v.copy_(s)
    return (losses[0] - losses[1]) / (2 * eps)


@torch.no_grad()
def measure(cfg: SNRConfig, progress: bool = True) -> list[dict]:
    """One row per (config, rank, point): S, N, FD-SNR."""
    data = resolve_task(cfg.task, Path(cfg.data_dir) if cfg.data_dir else None)
    batches = [[data.train[i] for i in batch_indices(len(data.train), cfg.batch_size, cfg.seed, j)] for j in (0, 1)]
    jobs = [(c, r, p) for c in cfg.configs for r in cfg.ranks for p in cfg.points]
    if progress:
        from tqdm.auto import tqdm
        jobs = tqdm(jobs, desc="fd-snr", unit="point")
    base, tok, _ = load_model(cfg.model)
    rows = []
    for config, r, point in jobs:
        method_name, scaling = CONFIGS[config]
        model = copy.deepcopy(base)  # peft wraps in place: every point starts from the same base
        tc = TrainConfig.make(method=method_name, lora_r=r, lora_alpha=cfg.lora_alpha, seed=cfg.seed,
                              **({"ar1_scaling": scaling} if method_name == "ar1zo" else {}))
        model, engine = build_engine(tc, model)  # the same A at every rank (seeded), whatever the scaling
        method = engine.method
        if point == "warm":
            _warm_start(method, model, cfg.warm_norm, cfg.seed)
        scorer = Scorer(model, tok)
        signal, noise = [], []
        for i in range(cfg.n_dirs):
            key = QueryKey(cfg.seed, i, 0)
            fd = _fd(method, scorer, batches[0], key, i, cfg.eps, autocast=False)
            if cfg.noise == "bf16":
                other = _fd(method, scorer, batches[0], key, i, cfg.eps, autocast=True)
            else:
                other = _fd(method, scorer, batches[1], key, i, cfg.eps, autocast=False)
            signal.append(abs(fd))
            noise.append(other - fd)
        s = sum(signal) / len(signal)
        n = math.sqrt(sum(x * x for x in noise) / len(noise))
        rows.append({"config": config, "rank": r, "point": point, "S": s, "N": n,
                     "snr": (s * s) / (n * n) if n > 0 else float("inf"), "n_dirs": cfg.n_dirs,
                     "noise": cfg.noise, "eps": cfg.eps})
    return rows


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y against log x."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    var = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / var if var else float("nan")


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for config in dict.fromkeys(r["config"] for r in rows):
        for point in dict.fromkeys(r["point"] for r in rows):
            sel = [r for r in rows if r["config"] == config and r["point"] == point]
            if len(sel) >= 2:
                ranks = [r["rank"] for r in sel]
                out.append({"config": config, "point": point,
                            "slope_S": slope(ranks, [r["S"] for r in sel]),
                            "slope_snr": slope(ranks, [r["snr"] for r in sel])})
    return out


def write_outputs(rows: list[dict], fits: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "fd_snr.json").write_text(json.dumps({"rows": rows, "fits": fits}, indent=2))
    with open(out / "fd_snr.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = list(dict.fromkeys(r["point"] for r in rows))
    fig, axes = plt.subplots(2, len(points), figsize=(5.5 * len(points), 8), squeeze=False)
    for j, point in enumerate(points):
        for config in dict.fromkeys(r["config"] for r in rows):
            sel = [r for r in rows if r["config"] == config and r["point"] == point]
            fit = next((f for f in fits if f["config"] == config and f["point"] == point), None)
            for i, key in enumerate(("S", "snr")):
                label = config if fit is None else f"{config} (slope {fit['slope_' + key]:+.2f})"
                axes[i][j].loglog([r["rank"] for r in sel], [r[key] for r in sel], "o-", label=label)
        for i, key in enumerate(("active FD signal S", "FD-SNR = S²/N²")):
            axes[i][j].set_title(f"{key} at {point}")
            axes[i][j].set_xlabel("LoRA rank r")
            axes[i][j].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "fd_snr.png", dpi=110)
