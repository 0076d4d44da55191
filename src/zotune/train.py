"""The training recipe, top to bottom: load, evaluate, train with ZO, evaluate, save.

A run directory holds ``config.yaml`` (the resolved config), ``metrics.jsonl``
(one line per step and per evaluation), ``trajectory.jsonl`` (step, seed, the
slopes g and the lr: with SGD, these plus the initial state determine the
final adapter), ``adapter/`` (the final adapter, PEFT format), ``best/`` (the
best-dev adapter when evaluating during training) and ``summary.json``.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from . import distributed
from .calibration import Calibration, calibration_batches, resolve_batches
from .config import TrainConfig
from .errors import ZOError, require
from .evaluate import Scorer
from .metrics import metric_name, score_split
from .methods import get_method, prepare_seeded
from .models import load_model
from .quantize import quantize_base
from .replay import read_trajectory, replay
from .tasks import Example, TaskData, resolve_task


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    require(name != "cuda" or torch.cuda.is_available(), "device cuda requested but CUDA is not available")
    return name


def pick_dtype(name: str, device: str, method_cls) -> torch.dtype:
    """The base weights' dtype: bf16 only where the trainable values stay fp32 and the hardware is fast at it."""
    if name == "auto":
        bf16 = device == "cuda" and method_cls.bf16_base and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    require(name == "float32" or method_cls.bf16_base,
            f"--dtype bfloat16: method {method_cls.name!r} trains base weights or norms, whose ZO updates "
            f"(lr*g*z, often ~1e-6) vanish in bfloat16; use --dtype float32 or a LoRA-type method")
    return torch.bfloat16 if name == "bfloat16" else torch.float32


def peak_memory_mb(device: str) -> float:
    """Peak memory of this process: GPU allocations on CUDA, resident set size on CPU."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The examples of ``step``: epochs of seeded permutations, a pure function of (seed, step).

    Being a function of the step (not of a running RNG) is what makes resume
    and replay trivial: no sampler state to save.
    """
    per_epoch = max(1, n // batch_size)
    epoch, pos = divmod(step, per_epoch)
    perm = list(range(n))
    random.Random(seed * 7919 + epoch).shuffle(perm)
    return perm[pos * batch_size : (pos + 1) * batch_size]


def build_engine(cfg: TrainConfig, model, method=None, calibration: Calibration | None = None):
    """Prepare ``model`` for ``cfg``'s method (seeded adapter init) and build its ZO engine.

    The one place a config becomes (model, engine): ``zotune train``, ``zotune replay``
    and :class:`zotune.ZOOptimizer` all call it, so they build the same run.
    Order: quantize the frozen base (``cfg.quantize``), calibrate (methods with
    ``needs_calibration``, unless the method already holds a saved calibration;
    ``calibration`` is a list of batches or a callable giving them, see
    :mod:`zotune.calibration`), then prepare.
    Returns ``(prepared model, engine)``; the method is ``engine.method``.
    """
    method = method or get_method(cfg.method)(cfg)
    if cfg.quantize != "none":
        require(method.is_adapter, f"--quantize {cfg.quantize}: method {cfg.method!r} trains the base weights, "
                                   f"which cannot be stored quantized; use an adapter method")
        quantize_base(model, cfg.quantize)
    if method.needs_calibration and not method.calibration:
        method.calibrate(model, resolve_batches(calibration))
    model = prepare_seeded(method, model, cfg.seed)  # the adapter's init is part of the run
    return model, method.build_engine(cfg)


def run_calibration(cfg: TrainConfig, train: list[Example], tok):
    """The calibration data of a run, built only if the method asks: ``cfg.calib_examples`` seeded training prompts."""
    return lambda: calibration_batches(train, tok, cfg.calib_examples, cfg.seed, cfg.eval_batch_size, cfg.max_length)


def save_calibration(method, run_dir: Path) -> None:
    """Keep what calibration computed in the run directory (resume and replay reuse it, bit for bit)."""
    if method.calibration:
        from safetensors.torch import save_file

        tmp = run_dir / ".calibration.safetensors.tmp"
        save_file({n: t.contiguous() for n, t in method.calibration.items()}, str(tmp))
        os.replace(tmp, run_dir / "calibration.safetensors")
        report = getattr(method, "report", None)
        if report is not None:
            (run_dir / "calibration.json").write_text(json.dumps(report.__dict__, indent=2))


def load_calibration(method, run_dir: Path) -> None:
    """Give ``method`` the calibration saved in ``run_dir``, if any (before :func:`build_engine`)."""
    path = run_dir / "calibration.safetensors"
    if method.needs_calibration and path.exists():
        from safetensors.torch import load_file

        method.calibration = load_file(path)


def task_data(cfg: TrainConfig) -> TaskData:
    """The run's data: the user's files, a YAML task file, or a named task."""
    return resolve_task(cfg.task, Path(cfg.data_dir) if cfg.data_dir else None, cfg.train_file, cfg.dev_file,
                        cfg.test_file, text_field=cfg.text_field, label_field=cfg.label_field,
                        text_pair_field=cfg.text_pair_field or None, template=cfg.template,
                        verbalizer=cfg.verbalizer)


def run_bytes(cfg: TrainConfig, method) -> int:
    """About what a run writes: the trained tensors three times (adapter, best, the copy an atomic
    save holds while swapping) plus the logs (a few hundred bytes per step)."""
    tensors = sum(p.numel() * p.element_size() for p in method.params.values())
    return 3 * tensors + cfg.steps * (400 + 50 * cfg.queries)


def check_free_space(path: Path, need: int) -> None:
    """Fail before training, not at the final save, when the disk cannot hold the run."""
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    free = shutil.disk_usage(existing).free
    require(free >= need, f"not enough disk space for the run in {path}: it will write about "
                          f"{need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free")


def make_run_dir(cfg: TrainConfig, need: int = 0) -> Path:
    """Create the run directory and prove it is writable and has ``need`` bytes free, before any training."""
    task = Path(cfg.train_file).stem if cfg.train_file else Path(cfg.task).stem
    path = Path(cfg.output_dir or f"runs/{task}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}")
    check_free_space(path, need)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ZOError(f"run directory {path} is not writable: {exc.strerror}") from exc
    return path


@dataclass
class Summary:
    run_dir: str
    method: str
    task: str
    model: str
    dev_before: float
    dev_after: float
    dev_best: float
    best_step: int
    test_after: float | None
    steps: int
    forward_passes: int
    train_loss_first: float
    train_loss_last: float
    wall_s: float
    peak_memory_mb: float
    trainable_params: int
    adapter: str
    adapter_bytes: int = 0
    trajectory_bytes: int = 0
    metric: str = "accuracy"  # the task's metric (SQuAD: f1), which dev_* and test_after are in

    def text(self) -> str:
        lines = [
            f"zotune: {self.method} on {self.task} ({self.model})",
            f"  dev {self.metric:<14s}{self.dev_before:.3f} -> {self.dev_after:.3f}"
            f"   (best {self.dev_best:.3f} at step {self.best_step})",
        ]
        if self.test_after is not None:
            lines.append(f"  test {self.metric:<13s}{self.test_after:.3f}")
        lines += [
            f"  train loss        {self.train_loss_first:.4f} (first 10 steps) -> {self.train_loss_last:.4f} (last 10)",
            f"  forward passes    {self.forward_passes} in {self.steps} steps",
            f"  wall time         {self.wall_s:.0f} s",
            f"  peak memory       {self.peak_memory_mb:.0f} MiB",
            f"  trainable params  {self.trainable_params:,}",
            f"  adapter saved in  {self.adapter}",
            f"  run log vs adapter {self.trajectory_bytes:,} bytes of trajectory (replays it) vs "
            f"{self.adapter_bytes:,} bytes of adapter",
        ]
        return "\n".join(lines)


def train(cfg: TrainConfig, resume: Path | None = None) -> Summary:
    """Run (or, with ``resume``, continue) a training run; return its summary.

    Resume replays the run's trajectory onto the freshly prepared model (see
    :mod:`zotune.replay`), so a run killed at any moment continues bit-identically.
    Launched by torchrun, every rank runs this function (see :mod:`zotune.distributed`);
    rank 0 alone writes the run directory, and the other ranks return None.
    """
    t0 = time.time()
    cfg.validate()
    device = pick_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # Everything that can be wrong with the inputs fails here, before a run directory exists.
    data = task_data(cfg)
    data = data.subsample(cfg.seed, cfg.train_size, cfg.dev_size, cfg.test_size)
    if not cfg.test_size:
        data.test = []
    cluster = distributed.from_env(cfg)  # a cluster of one unless launched by torchrun
    main = cluster.is_main  # rank 0, or the only process
    say = (lambda msg: print(msg, file=sys.stderr)) if cfg.progress and main else (lambda msg: None)
    model, tok, kind = load_model(cfg.model, pick_dtype(cfg.dtype, device, get_method(cfg.method)), device)
    require(kind == "causal", f"model {cfg.model!r} is an encoder; prompt-based training needs a causal LM for now")
    say(f"zotune: task {cfg.task}: {len(data.train)} train / {len(data.dev)} dev / {len(data.test)} test")
    if cluster.world > 1:
        say(cluster.describe())
    method = get_method(cfg.method)(cfg)
    if resume:
        load_calibration(method, resume)  # a resumed run keeps its own basis (never a stale one from a reused folder)
    model, engine = build_engine(cfg, model, method, run_calibration(cfg, data.train, tok))
    engine, method = cluster.wrap(engine), engine.method
    if resume is None:
        run_dir = cluster.on_main(lambda: make_run_dir(cfg, run_bytes(cfg, method)))
        if main:
            (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    else:
        run_dir = resume
        check_free_space(run_dir, run_bytes(cfg, method))
    if main:
        save_calibration(method, run_dir)
    scorer = Scorer(model, tok, cfg.max_length, scoring=cfg.scoring, share_prompt=cfg.share_prompt,
                    micro_batch_size=cfg.micro_batch_size, compile=cfg.compile)

    metric = metric_name(data.dev)
    extra: dict[str, float] = {}  # the last evaluation's other metrics (SQuAD: em), logged beside dev_acc

    def evaluate(split: list[Example], desc: str) -> float:
        """The task's metric on ``split`` (accuracy; SQuAD F1), logged as ``dev_acc`` whatever it is."""
        score = score_split(scorer, split, cfg.eval_batch_size, progress=cfg.progress, desc=desc)
        extra.clear()
        extra.update({f"dev_{k}": v for k, v in score.extra.items()})
        return score.value

    done = read_trajectory(run_dir / "trajectory.jsonl") if resume else []
    records = _read_metrics(run_dir / "metrics.jsonl", len(done)) if resume else []
    replay(engine, done)
    cluster.check_sync(engine.step_count, method.params, force=True)  # same start on every rank
    losses = [r["loss"] for r in records if "loss" in r]
    evals = {r["step"]: r["dev_acc"] for r in records if "dev_acc" in r}
    if main:
        _rewrite(run_dir / "trajectory.jsonl", done)
        _rewrite(run_dir / "metrics.jsonl", records)
    if resume:
        say(f"zotune: resuming {run_dir} at step {engine.step_count} of {cfg.steps}")
    best_acc, best_step = max(((a, s) for s, a in evals.items() if s > 0), default=(-1.0, 0))

    own = lambda name: run_dir / name if main else os.devnull  # only rank 0 writes
    save = lambda path: main and save_atomically(method, model, path)
    with open(own("metrics.jsonl"), "a") as metrics, open(own("trajectory.jsonl"), "a") as traj:
        def log(f, record: dict) -> None:
            f.write(json.dumps(record) + "\n")
            f.flush()

        def dev_eval(step: int, desc: str) -> float:
            acc = evaluate(data.dev, desc) if main else float("nan")  # other ranks wait at the next step
            log(metrics, {"step": step, "dev_acc": acc, **({"metric": metric, **extra} if metric != "accuracy" else {}),
                          "forward_passes": engine.forward_passes})
            return acc

        if 0 not in evals:
            evals[0] = dev_eval(0, "dev (zero-shot)")
        dev_before = evals[0]
        say(f"zotune: zero-shot dev {metric} {dev_before:.3f}; training {method.num_trainable():,} params "
            f"with {cfg.method}")

        def maybe_eval(step: int) -> None:
            nonlocal best_acc, best_step
            if cfg.eval_every and step % cfg.eval_every == 0 and 0 < step < cfg.steps and step not in evals:
                evals[step] = acc = dev_eval(step, f"dev @ step {step}")
                if acc > best_acc:
                    best_acc, best_step = acc, step
                    save(run_dir / "best")

        maybe_eval(engine.step_count)  # an evaluation the killed run may not have finished
        steps = range(engine.step_count, cfg.steps)
        if cfg.progress and main:
            from tqdm.auto import tqdm
            steps = tqdm(steps, desc=f"{cfg.method}", unit="step", dynamic_ncols=True,
                         initial=engine.step_count, total=cfg.steps)
        for step in steps:
            indices = batch_indices(len(data.train), cfg.batch_size, cfg.seed, step)
            batch = [data.train[i] for i in cluster.shard(indices)]  # data-parallel: this rank's slice
            try:
                result = engine.step(lambda: scorer.loss_tensor(batch), cfg.lr)  # a graph only for fo-lora
            except FloatingPointError as exc:
                raise ZOError(f"{exc} on batch indices {indices}; weights restored, the {step} steps "
                              f"before it logged: resume or inspect {run_dir}") from None
            losses.append(result.loss)
            log(traj, {"step": result.step, "seed": cfg.seed, "g": result.grads, "lr": cfg.lr})
            cluster.check_sync(step + 1, method.params, force=step + 1 == cfg.steps)
            log(metrics, {"step": step + 1, "loss": result.loss, "g": result.grads,
                          "forward_passes": engine.forward_passes, "time_s": round(time.time() - t0, 3),
                          **cluster.step_stats()})
            check_loss(losses, cfg.max_loss_ratio, step, indices, run_dir)
            if cfg.progress and main:
                recent = losses[-20:]
                steps.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", fwd=engine.forward_passes)
            maybe_eval(step + 1)
        dev_after = dev_eval(cfg.steps, "dev (final)")
    cluster.close()
    if not main:
        return None
    save_atomically(method, model, run_dir / "adapter")
    if dev_after >= best_acc:
        best_acc, best_step = dev_after, cfg.steps
        save_atomically(method, model, run_dir / "best")
    test_after = None
    if data.test:
        if best_step != cfg.steps:  # evaluate the best-dev checkpoint on test, as MeZO does
            model = load_trained(model, method, run_dir / "best")
            scorer.model = model
        test_after = evaluate(data.test, "test (best dev)")

    head, tail = losses[:10] or [float("nan")], losses[-10:] or [float("nan")]
    summary = Summary(
        run_dir=str(run_dir), method=cfg.method, task=cfg.task, model=cfg.model,
        dev_before=dev_before, dev_after=dev_after, dev_best=best_acc, best_step=best_step,
        test_after=test_after, steps=cfg.steps, forward_passes=engine.forward_passes,
        train_loss_first=sum(head) / len(head), train_loss_last=sum(tail) / len(tail),
        wall_s=time.time() - t0, peak_memory_mb=peak_memory_mb(device),
        trainable_params=method.num_trainable(), adapter=str(run_dir / "adapter"), metric=metric,
        adapter_bytes=safetensors_bytes(run_dir / "adapter"), trajectory_bytes=(run_dir / "trajectory.jsonl").stat().st_size,
    )
    (run_dir / "summary.json").write_text(json.dumps(summary.__dict__, indent=2))
    return summary


LOSS_WINDOW = 10


def check_loss(losses: list[float], ratio: float, step: int, indices: list[int], run_dir: Path) -> None:
    """Stop a diverging run: the mean of the last 10 losses above ``ratio`` x the first 10's.

    Called after the step is logged, so the run directory stays a consistent run of
    ``step + 1`` steps that ``zotune replay`` rebuilds and ``--resume`` continues.
    """
    if not ratio or len(losses) <= LOSS_WINDOW:
        return
    first = sum(losses[:LOSS_WINDOW]) / LOSS_WINDOW
    recent = sum(losses[-LOSS_WINDOW:]) / LOSS_WINDOW
    require(first <= 0 or recent <= ratio * first,
            f"loss exploded at step {step}: the last {LOSS_WINDOW} steps average {recent:.4g}, over "
            f"{ratio:g} x the first {LOSS_WINDOW} steps' {first:.4g} (batch indices {indices}); steps 0-{step} "
            f"are logged in {run_dir}: inspect them, or start again with a lower lr (max_loss_ratio 0 disables "
            f"this check)")


def safetensors_bytes(path: Path) -> int:
    """Bytes of the tensors saved in ``path`` (an adapter folder): what the trajectory stands for."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def _read_metrics(path: Path, steps_done: int) -> list[dict]:
    """Metric records consistent with ``steps_done`` completed steps (torn lines and later records dropped)."""
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if ("loss" in r and r["step"] <= steps_done) or ("dev_acc" in r and r["step"] < steps_done) \
                    or ("dev_acc" in r and r["step"] == 0):
                out.append(r)
    return out


def _rewrite(path: Path, records: list[dict]) -> None:
    """Replace a JSONL file atomically (temporary file, then rename)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


def save_atomically(method, model, path: Path) -> None:
    """Write into a fresh folder, then swap it in: a kill never leaves a half-written adapter."""
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


def load_trained(model, method, path: Path):
    """Load saved trainable values (adapter or full weights) back into ``model`` in place."""
    from safetensors.torch import load_file

    files = list(path.glob("*.safetensors"))
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
