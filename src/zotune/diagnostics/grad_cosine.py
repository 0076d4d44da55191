"""How well does a method's ZO estimate point along the true gradient? cos(ĝ_n, ∇) against n and r.

At one parameter point and one training batch, for each query configuration
(a method and its settings) and LoRA rank r:

* ∇: the backprop gradient of the run's loss (``Scorer.loss_tensor``) with
  respect to the method's trainable tensors (``Method.params``; grads are
  enabled on them only for this one backward), in an fp32 copy of the model;
* ĝ_n = (1/n) Σ_i g_i z_i over n directions drawn by the method itself: one
  engine step (:class:`~zotune.engine.ZOEngine`, ``queries = N``, lr 0, so the
  weights stay bit-identical) gives the N slopes g_i along the method's own
  ``views`` and ``direction``, and :meth:`zotune.optim.ZOSGD.estimate` (the sum
  ZO-SGD applies) turns a group of n of them into ĝ_n;
* cos(ĝ_n, ∇) for each n in ``ns``: the N = max(ns) directions are cut into
  N/n disjoint groups, and the row holds the mean (and spread) over groups.

Two cosines per row, because a step's estimate lives only on the coordinates
it queried (its views):

* ``cos``: on the queried coordinates only (ĝ against ∇ restricted to the
  views). For AR1-ZO that is the step's atom (b_k, a_k) in every layer;
* ``cos_full``: on every trainable tensor (ĝ is zero off the views). For
  methods whose views are all their trainable tensors the two are equal; for
  AR1-ZO ``cos_full = cos x grad_share``, ``grad_share`` = ‖∇ on the atom‖ / ‖∇‖.

``gauss_ref`` is E cos for isotropic Gaussian directions with exact slopes in d
dimensions, d the queried dimension: E sqrt(X / (X + d − 1)) with X ~ χ²_n,
≈ sqrt(n / (n + d)) for large n (:func:`gauss_ref`). MeZO-LoRA and one AR1
atom should sit on it in fp32 with a small eps; structured directions (LOZO,
SubZero, AGZO, ZO-Act) may beat it, evaluation noise pulls a method below it.

Evaluation dtypes (``dtypes``): ``float32``, and ``bfloat16``: the same point
on a bf16 base (as ``--dtype bfloat16`` runs it: LoRA factors stay fp32, the
trainable values are copied from the fp32 model, ZO-Act's basis too), with the
same directions. The bf16 rows also hold the **noise floor**
``noise = rms_i(g_i(bf16) − g_i(fp32))``: what bf16 rounding adds to a slope,
against ``rms_g``, the slopes' own size. Methods that train base weights have
no bf16 rows (``--dtype bfloat16`` refuses them).

Parameter points: ``init`` (the method's seeded init; peft's B = 0) and
``warm`` (fd_snr's: B drawn so that ‖s·B·A‖ = warm_norm·‖W‖ per layer; only
for methods with LoRA layers, others are skipped there).
"""

from __future__ import annotations

import copy
import csv
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..config import DTYPE_ALIASES, TrainConfig
from ..engine import ZOEngine
from ..errors import ZOError, require
from ..evaluate import Scorer
from ..optim import ZOSGD

#: Query configurations by name: TrainConfig settings, and whether the LoRA rank applies.
#: mezo-lora and the canonical atom use MeZO's alpha 16 (scale 16/r); ar1zo its alpha 2 with topology
#: scaling (scale 2 at every r): all three have scale 2 at r = 8. The full-weight methods use the
#: papers' eps (1e-3), the others SmolLM2's tuned 1e-2 (zotune.bench's entries).
QUERY_CONFIGS: dict[str, tuple[dict, bool]] = {
    "mezo-lora": ({"method": "mezo-lora", "lora_alpha": 16.0, "eps": 1e-2}, True),
    "atom-canonical": ({"method": "ar1zo", "ar1_scaling": "canonical", "lora_alpha": 16.0, "eps": 1e-2}, True),
    "atom-rslora": ({"method": "ar1zo", "ar1_scaling": "rslora", "lora_alpha": 16.0 / math.sqrt(8), "eps": 1e-2},
                    True),
    "ar1zo": ({"method": "ar1zo", "ar1_scaling": "topology", "lora_alpha": 2.0, "eps": 1e-2}, True),
    "zoact": ({"method": "zoact", "eps": 1e-2}, False),
    "agzo": ({"method": "agzo", "eps": 1e-3}, False),
    "lozo": ({"method": "lozo", "eps": 1e-3}, False),
    "subzero": ({"method": "subzero", "eps": 1e-3}, False),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class CosineConfig:
    settings: dict = field(default_factory=lambda: {"model": "smollm2-135m", "task": "sst2"})  # data, model
    configs: tuple[str, ...] = ("mezo-lora", "atom-canonical", "ar1zo")
    ranks: tuple[int, ...] = (8, 64)
    ns: tuple[int, ...] = (1, 4, 16, 64)
    points: tuple[str, ...] = ("init",)
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    eps: float | None = None  # None: each configuration's own
    batch_size: int = 16
    warm_norm: float = 0.02
    seed: int = 0
    step: int = 0  # the step whose views are queried (AR1: atom k = step mod r)

    def validate(self) -> "CosineConfig":
        bad = [c for c in self.configs if c not in QUERY_CONFIGS]
        require(not bad, f"unknown configuration {bad[0] if bad else ''!r}; choose from: {', '.join(QUERY_CONFIGS)}")
        require(bool(self.ns) and min(self.ns) >= 1, f"ns must be >= 1, got {self.ns}")
        require(bool(self.ranks) and min(self.ranks) >= 1, f"ranks must be >= 1, got {self.ranks}")
        bad = [p for p in self.points if p not in ("init", "warm")]
        require(not bad, f"points are init and/or warm, got {bad[0] if bad else ''!r}")
        self.dtypes = tuple(DTYPE_ALIASES.get(d, d) for d in self.dtypes)  # fp32/bf16, as train --dtype takes
        bad = [d for d in self.dtypes if d not in DTYPES]
        require(not bad, f"dtypes are float32 (fp32) and/or bfloat16 (bf16), got {bad[0] if bad else ''!r}")
        require(self.eps is None or self.eps > 0, f"eps must be > 0, got {self.eps}")
        require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        return self


# ---------------------------------------------------------------------------------------------- pieces

def backprop_grad(method, scorer: Scorer, batch) -> dict[str, torch.Tensor]:
    """∇ of the loss w.r.t. ``method.params`` at the current point (fp32 copies); grad flags restored after."""
    params = method.params
    flags = {n: p.requires_grad for n, p in params.items()}
    try:
        for p in params.values():
            p.grad = None
            p.requires_grad_(True)
        with torch.enable_grad():
            scorer.loss_tensor(batch).backward()
        return {n: (torch.zeros_like(p, dtype=torch.float32) if p.grad is None else p.grad.detach().float().clone())
                for n, p in params.items()}
    finally:
        for n, p in params.items():
            p.grad = None
            p.requires_grad_(flags[n])


def owner(view: torch.Tensor, params: dict[str, torch.Tensor]) -> str:
    """The name of the trainable tensor a view is a view of (they share storage)."""
    ptr = view.untyped_storage().data_ptr()
    for name, p in params.items():
        if p.data.untyped_storage().data_ptr() == ptr:
            return name
    raise ZOError("a queried view is not a view of any trainable tensor")


def slice_like(grad: torch.Tensor, view: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The part of ``grad`` (shaped like ``param``) that ``view`` (a view of ``param``) covers."""
    require(tuple(grad.stride()) == tuple(param.data.stride()), "gradient and parameter strides differ")
    return grad.as_strided(view.size(), view.stride(), view.storage_offset() - param.data.storage_offset())


def gauss_ref(n: int, d: int, steps: int = 2000) -> float:
    """E cos(ĝ_n, ∇) for isotropic Gaussian directions in d dimensions and exact slopes.

    With a_i = z_iᵀu (u = ∇/‖∇‖) and X = Σ a_i² ~ χ²_n, ĝ_n has X/n along u and, given the a_i, an
    independent Gaussian part of squared norm ≈ (d−1)X/n² across it, so cos = sqrt(X / (X + d − 1)):
    E over χ²_n by Simpson's rule on x = t². ≈ sqrt(n / (n + d)) for n ≫ 1; sqrt(2 / (π d)) at n = 1.
    """
    if d <= 1:
        return 1.0
    hi = math.sqrt(n) + 12.0
    h = hi / steps
    log_c = math.log(2) - (n / 2) * math.log(2) - math.lgamma(n / 2)  # density of t = sqrt(x), x ~ χ²_n
    total = 0.0
    for i in range(1, steps + 1):
        t = i * h
        x = t * t
        f = math.exp(log_c + (n - 1) * math.log(t) - x / 2) * math.sqrt(x / (x + d - 1))
        total += f * (1 if i == steps else 4 if i % 2 else 2)
    return total * h / 3


def cosines(method, views, keys, grads_g: list[float], grad: dict[str, torch.Tensor], ns) -> dict:
    """cos(ĝ_n, ∇) per n over disjoint groups of the slopes, on the views and on every trainable tensor."""
    opt = ZOSGD()
    parts = [(name, v, slice_like(grad[owner(v, method.params)], v, method.params[owner(v, method.params)]).double())
             for name, v in views]
    g_views = math.sqrt(sum(float(gv.pow(2).sum()) for *_, gv in parts))
    g_full = math.sqrt(sum(float(t.double().pow(2).sum()) for t in grad.values()))
    share = g_views / g_full if g_full > 0 else float("nan")
    out = {"grad_norm": g_full, "grad_norm_queried": g_views, "grad_share": share,
           "d_queried": sum(v.numel() for _, v in views),
           "d_trainable": sum(p.numel() for p in method.params.values()), "by_n": {}}
    pairs = list(zip(keys, grads_g))
    for n in sorted(set(ns)):
        cs = []
        for j in range(len(pairs) // n):
            group = pairs[j * n:(j + 1) * n]
            dot = nsq = 0.0
            for name, v, gv in parts:
                est = opt.estimate(name, v, group, method).double()
                dot += float((est * gv).sum())
                nsq += float(est.pow(2).sum())
            cs.append(dot / (math.sqrt(nsq) * g_views) if nsq > 0 and g_views > 0 else float("nan"))
        finite = [c for c in cs if math.isfinite(c)]
        mean = statistics.mean(finite) if finite else float("nan")
        sd = statistics.stdev(finite) if len(finite) > 1 else float("nan")
        out["by_n"][n] = {"cos": mean, "cos_sd": sd, "groups": len(cs), "cos_full": mean * share,
                          "cos_full_sd": sd * share, "gauss_ref": gauss_ref(n, out["d_queried"])}
    return out


def zo_slopes(method, scorer: Scorer, batch, eps: float, n: int, seed: int, step: int):
    """n slopes at ``step`` along the method's own directions: one engine step with q = n and lr 0."""
    engine = ZOEngine(method, ZOSGD(), eps, queries=n, seed=seed)
    engine.step_count = step
    result = engine.step(lambda: scorer.loss(batch), 0.0)  # lr 0: the weights stay bit-identical
    return result.keys, result.grads


# ---------------------------------------------------------------------------------------------- measure

def _settings(cfg: CosineConfig, name: str, rank: int | None, dtype: str) -> TrainConfig:
    own, _ = QUERY_CONFIGS[name]
    data = {**cfg.settings, **own, "seed": cfg.seed, "batch_size": cfg.batch_size, "dtype": dtype,
            "progress": False, "test_size": 0}
    if rank is not None:
        data["lora_r"] = rank
    if cfg.eps is not None:
        data["eps"] = cfg.eps
    return TrainConfig.from_dict(data, source=f"grad-cosine configuration {name!r}")


def has_lora_layers(model) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in model.modules())


def measure(cfg: CosineConfig, progress: bool = True, say: Callable[[str], None] | None = None) -> list[dict]:
    """One row per (configuration, rank, point, dtype, n)."""
    from ..diagnostics.fd_snr import _warm_start
    from ..hardware import pick_device
    from ..methods import get_method
    from ..models import load_model
    from ..setup import batch_indices, build_engine, calibration_source, load_data

    cfg.validate()
    say = say or ((lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None))
    first = _settings(cfg, cfg.configs[0], cfg.ranks[0] if QUERY_CONFIGS[cfg.configs[0]][1] else None, "float32")
    first.validate()
    if first.threads:  # a study's one process a core: a second torch thread on a shared core thrashes (10x slower)
        torch.set_num_threads(first.threads)
    data = load_data(first)
    batch = [data.train[i] for i in batch_indices(len(data.train), cfg.batch_size, cfg.seed, 0)]
    device = pick_device(first.device)
    bases = {d: load_model(first.model, DTYPES[d], device) for d in dict.fromkeys(("float32", *cfg.dtypes))}
    tok = bases["float32"][1]
    n_dirs = max(cfg.ns)
    scorer_of = lambda model, tc: Scorer(model, tok, tc.max_length, scoring=tc.scoring,  # noqa: E731
                                         share_prompt=tc.share_prompt, micro_batch_size=tc.micro_batch_size)
    rows = []
    for name in cfg.configs:
        ranked = QUERY_CONFIGS[name][1]
        for rank in (cfg.ranks if ranked else (None,)):
            for point in cfg.points:
                tc = _settings(cfg, name, rank, "float32")
                tc.validate()
                cls = get_method(tc.method)
                method = cls(tc)
                model, _ = build_engine(tc, copy.deepcopy(bases["float32"][0]), method,
                                        calibration_source(tc, data, tok))
                if point == "warm":
                    if not has_lora_layers(model):
                        say(f"grad-cosine: {name}: no LoRA layers, no warm point (skipped)")
                        continue
                    _warm_start(method, model, cfg.warm_norm, cfg.seed)
                scorer = scorer_of(model, tc)
                grad = backprop_grad(method, scorer, batch)
                slopes32 = None
                for dtype in cfg.dtypes:
                    if dtype == "float32":
                        m, s = method, scorer
                    elif not cls.bf16_base or cls.trains_base_dtype:  # its trainables are the base weights
                        say(f"grad-cosine: {name} trains base weights: no {dtype} evaluation (skipped)")
                        continue
                    else:  # the same point on a bf16 base: same seed, same basis, trainable values copied
                        tb = _settings(cfg, name, rank, dtype)
                        m = cls(tb)
                        m.calibration = {k: u.clone() for k, u in method.calibration.items()}
                        mb, _ = build_engine(tb, copy.deepcopy(bases[dtype][0]), m)
                        with torch.no_grad():
                            for pname, p in m.params.items():
                                p.copy_(method.params[pname])
                        s = scorer_of(mb, tb)
                    keys, gs = zo_slopes(m, s, batch, tc.eps, n_dirs, cfg.seed, cfg.step)
                    if dtype == "float32":
                        slopes32 = gs
                    views = m.views(cfg.step)
                    result = cosines(m, views, keys, gs, grad, cfg.ns)
                    rms_g = math.sqrt(sum(g * g for g in gs) / len(gs))
                    noise = (math.sqrt(sum((a - b) ** 2 for a, b in zip(gs, slopes32)) / len(gs))
                             if dtype != "float32" and slopes32 is not None else float("nan"))
                    restricted = "all trainable tensors" if result["d_queried"] == result["d_trainable"] \
                        else "the queried coordinates (views) only"
                    for n, r in result["by_n"].items():
                        rows.append({"config": name, "method": tc.method, "rank": rank or 0, "point": point,
                                     "dtype": dtype, "n": n, **r, "grad_share": result["grad_share"],
                                     "grad_norm": result["grad_norm"],
                                     "grad_norm_queried": result["grad_norm_queried"],
                                     "d_queried": result["d_queried"], "d_trainable": result["d_trainable"],
                                     "cos_on": restricted, "rms_g": rms_g, "noise": noise,
                                     "snr": rms_g ** 2 / noise ** 2 if noise and math.isfinite(noise) else float("nan"),
                                     "eps": tc.eps, "n_dirs": n_dirs, "batch_size": cfg.batch_size,
                                     "seed": cfg.seed})
                    top = result["by_n"][max(result["by_n"])]
                    say(f"grad-cosine: {name} r={rank or '-'} {point} {dtype}: cos at n={max(cfg.ns)} "
                        f"{top['cos']:.3f} (full {top['cos_full']:.3f}), |g| rms {rms_g:.3g}"
                        + (f", bf16 noise {noise:.3g}" if math.isfinite(noise) else ""))
                del model, method, scorer
    return rows


# ---------------------------------------------------------------------------------------------- outputs

def label(row: dict) -> str:
    return row["config"] + (f" r={row['rank']}" if row["rank"] else "")


def write_outputs(rows: list[dict], out: Path, title: str = "") -> None:
    """grad_cosine.json, grad_cosine.csv and grad_cosine.png (cosine against n, one line per configuration
    and rank; solid on the queried coordinates, dashed on every trainable tensor where they differ)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "grad_cosine.json").write_text(json.dumps({"title": title, "rows": rows}, indent=2))
    with open(out / "grad_cosine.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["config"])
        w.writeheader()
        w.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = list(dict.fromkeys(r["point"] for r in rows)) or ["init"]
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows)) or ["float32"]
    keys = list(dict.fromkeys(label(r) for r in rows))
    colors = {k: plt.get_cmap("tab10" if len(keys) <= 10 else "tab20")(i % 20) for i, k in enumerate(keys)}
    fig, axes = plt.subplots(len(points), len(dtypes), figsize=(5.5 * len(dtypes) + 2.5, 4 * len(points)),
                             squeeze=False, sharey=True)
    for i, point in enumerate(points):
        for j, dtype in enumerate(dtypes):
            ax = axes[i][j]
            sel = [r for r in rows if r["point"] == point and r["dtype"] == dtype]
            for key in keys:
                line = sorted((r for r in sel if label(r) == key), key=lambda r: r["n"])
                if not line:
                    continue
                xs = [r["n"] for r in line]
                ax.plot(xs, [r["cos"] for r in line], "o-", color=colors[key], label=key)
                if any(r["d_queried"] != r["d_trainable"] for r in line):
                    ax.plot(xs, [r["cos_full"] for r in line], "o--", color=colors[key], alpha=0.7)
            ax.set_xscale("log", base=2)
            ax.axhline(0, color="grey", lw=0.5)
            ax.set_xlabel("directions averaged, n")
            ax.set_ylabel("cos(ĝ_n, backprop ∇)")
            ax.set_title(f"{point} point, {dtype} evaluation", fontsize=9)
            ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=colors[k], marker="o", label=k) for k in keys]
    handles.append(plt.Line2D([], [], color="black", ls="--", label="dashed: on every trainable tensor"))
    fig.legend(handles=handles, loc="center right", fontsize=7)
    fig.suptitle((title + "\n" if title else "") + "solid: on the queried coordinates (AR1-ZO: one atom per layer); "
                 "dashed: on every trainable tensor", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1 - 2.4 / (5.5 * len(dtypes) + 2.5), 1))
    fig.savefig(out / "grad_cosine.png", dpi=110)
    plt.close(fig)


def text_table(rows: list[dict]) -> str:
    lines = [f"{'config':16s} {'r':>3s} {'point':5s} {'dtype':9s} {'n':>3s} {'cos':>7s} {'±':>6s} {'full':>7s} "
             f"{'gauss':>6s} {'|g| rms':>9s} {'bf16 noise':>10s}"]
    for r in rows:
        lines.append(f"{r['config']:16s} {r['rank'] or '-':>3} {r['point']:5s} {r['dtype']:9s} {r['n']:3d} "
                     f"{r['cos']:7.3f} {r['cos_sd']:6.3f} {r['cos_full']:7.3f} {r['gauss_ref']:6.3f} "
                     f"{r['rms_g']:9.3g} {r['noise']:10.3g}")
    return "\n".join(lines)
