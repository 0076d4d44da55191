"""The training recipe, top to bottom: setup, resume, loop, finish.

:func:`zotune.setup.setup` builds the run (model, method, engine, scorer) and
:class:`zotune.rundir.RunDir` owns its files; what is left here is the loop a
reader should see at once: evaluate zero-shot, take ZO steps (logging each to
the trajectory), evaluate and checkpoint the best, evaluate test on the best.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import distributed
from .batched import step_batched, use_batched
from .config import TrainConfig
from .errors import ZOError, require
from .hardware import machine_name, peak_memory_mb
from .metrics import metric_name, score_split
from .models import describe_placement
from .optim import lr_at
from .report import plot_run
from .rundir import RunDir, check_free_space, run_bytes, safetensors_bytes
from .setup import batch_indices, load_data, setup
from .tasks import Example, TaskData


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
    dtype: str = "float32"  # the base weights' dtype, and why it was picked
    dtype_reason: str = ""
    machine: str = ""  # the CPU (model, bf16 flags) or GPU it trained on: a study's runs span machines

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
            f"  base weights      {self.dtype}" + (f" ({self.dtype_reason})" if self.dtype_reason else ""),
            f"  peak memory       {self.peak_memory_mb:.0f} MiB",
            f"  trainable params  {self.trainable_params:,}",
            f"  adapter saved in  {self.adapter}",
            f"  run log vs adapter {self.trajectory_bytes:,} bytes of trajectory (replays it) vs "
            f"{self.adapter_bytes:,} bytes of adapter",
        ]
        return "\n".join(lines)


def data_name(cfg: TrainConfig) -> str:
    """What the run trains on, as the user named it: their file, or the task."""
    return Path(cfg.train_file).name if cfg.train_file else cfg.task


def train(cfg: TrainConfig, resume: Path | None = None, data: TaskData | None = None) -> Summary:
    """Run (or, with ``resume``, continue) a training run; return its summary.

    ``data``: the run's splits, already loaded and sampled (``zotune tune`` passes a dev split carved
    from the training data); None loads them as ``cfg`` says.

    Resume replays the run's trajectory onto the freshly prepared model (see
    :meth:`ZOEngine.replay`), so a run killed at any moment continues bit-identically; a method
    that cannot be replayed continues, as bit-identically, from its state at the last dev evaluation.
    Launched by torchrun, every rank runs this function (see :mod:`zotune.distributed`);
    rank 0 alone writes the run directory, and the other ranks return None.
    """
    t0 = time.time()
    cfg.validate()
    data = data if data is not None else load_data(cfg)  # bad inputs fail here, before a run directory exists
    cluster = distributed.from_env(cfg)  # a cluster of one unless launched by torchrun
    main = cluster.is_main  # rank 0, or the only process
    say = (lambda msg: print(msg, file=sys.stderr)) if cfg.progress and main else (lambda msg: None)

    # -- setup: the run exactly as its config describes it (a resumed run keeps its own calibration)
    previous = RunDir.open(resume, writable=main) if resume else None
    run = setup(cfg, data, calibration=previous.calibration() if previous else None, cluster=cluster)
    model, method, engine, scorer = run.model, run.method, run.engine, run.scorer
    batched = use_batched(cfg.batched_queries, engine, run.device, cfg.micro_batch_size, cfg.batch_size, model)
    held = " (dev held out from the training data: no --dev-file)" if "held out" in data.sources.get("dev", "") else ""
    say(f"zotune: {data_name(cfg)}: {len(data.train)} train / {len(data.dev)} dev{held} / {len(data.test)} test; "
        f"base weights in {run.precision.name} ({run.precision.reason})")
    if cfg.device_map or cfg.max_memory or cfg.offload_folder:
        say(f"zotune: {describe_placement(model)}")
    if cluster.world > 1:
        say(cluster.describe())
    if previous:
        rundir = previous
        if main:
            check_free_space(rundir.path, run_bytes(cfg, method))
    else:
        if cfg.dtype == "auto":  # the run records what auto picked, so resume and replay rebuild the same
            cfg.dtype = run.precision.name
        if cfg.restore == "auto" and hasattr(engine, "restore_mode"):  # likewise the restore (it depends on
            cfg.restore = engine.restore_mode(method.views(0))  # dtype and query-parallel ranks)
        note = f"dtype {cfg.dtype}: {run.precision.reason}"
        rundir = RunDir(cluster.on_main(lambda: RunDir.create(cfg, run_bytes(cfg, method), note).path),
                        writable=main)
    rundir.save_calibration(method)

    # -- resume: replay the logged steps, keep the records consistent with them. A method whose
    # trajectory cannot rebuild its tensors (agzo, fo-lora) continues from the state saved at its last
    # dev evaluation (none: from the start); the steps logged after it run again
    done = rundir.trajectory() if previous else []
    if done and not method.replayable:
        kept = rundir.load_state(engine)
        say(f"zotune: {method.name} cannot be replayed from its trajectory: " + (
            f"continuing from its state at step {kept} (state.pt); the {len(done) - kept} steps logged after it run "
            f"again" if kept else "no state.pt was saved (it is written at each dev evaluation), so the run starts "
            "again from step 0"))
        done = done[:kept]
    records = rundir.metrics(len(done)) if previous else []
    evals = {r["step"]: r["dev_acc"] for r in records if "dev_acc" in r}
    best_acc, best_step = best_eval(evals)
    if method.replayable:
        # a run folder copied without its tensors has no best/: rebuild it at its step on the way
        rebuild = best_step if previous and not (rundir.path / "best").exists() else 0
        if done:
            say(f"zotune: replaying the {len(done)} logged steps of {rundir.path} to rebuild its tensors "
                f"(updates only, no forward passes)")
        from tqdm.auto import tqdm
        bar = tqdm(total=len(done), desc="replay", unit="step", dynamic_ncols=True, leave=False,
                   disable=not (done and cfg.progress and main))
        engine.replay(done[:rebuild], bar.update)
        if rebuild:
            rundir.save(method, model, "best")
        engine.replay(done[rebuild:], bar.update)
        bar.close()
    cluster.check_sync(engine.step_count, method.params, force=True)  # same start on every rank
    rundir.restart_logs(done, records)
    if previous:
        say(f"zotune: resuming {rundir.path} at step {engine.step_count} of {cfg.steps}")
    losses = [r["loss"] for r in records if "loss" in r]
    metric = metric_name(data.dev)
    extra: dict[str, float] = {}  # the last evaluation's other metrics (SQuAD: em), logged beside dev_acc

    def evaluate(split: list[Example], desc: str) -> float:
        """The task's metric on ``split`` (accuracy; SQuAD F1), logged as ``dev_acc`` whatever it is."""
        score = score_split(scorer, split, cfg.eval_batch_size, progress=cfg.progress, desc=desc)
        extra.clear()
        extra.update({f"dev_{k}": v for k, v in score.extra.items()})
        return score.value

    # -- the loop
    with rundir.logs() as logs:
        def dev_eval(step: int, desc: str) -> float:
            acc = evaluate(data.dev, desc) if main else float("nan")  # other ranks wait at the next step
            logs.metric({"step": step, "dev_acc": acc, **({"metric": metric, **extra} if metric != "accuracy" else {}),
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
                if not method.replayable:
                    rundir.save_state(engine)  # this run's resume point (see "resume" above)
                evals[step] = acc = dev_eval(step, f"dev @ step {step}")
                if acc > best_acc:
                    best_acc, best_step = acc, step
                    rundir.save(method, model, "best")

        maybe_eval(engine.step_count)  # an evaluation the killed run may not have finished
        steps = range(engine.step_count, cfg.steps)
        if cfg.progress and main:
            from tqdm.auto import tqdm
            steps = tqdm(steps, desc=f"{cfg.method}", unit="step", dynamic_ncols=True,
                         initial=engine.step_count, total=cfg.steps)
        for step in steps:
            indices = batch_indices(len(data.train), cfg.batch_size, cfg.seed, step)
            batch = [data.train[i] for i in cluster.shard(indices)]  # data-parallel: this rank's slice
            lr = lr_at(cfg.lr, step, cfg.steps, cfg.lr_schedule, cfg.warmup_steps)
            try:
                result = step_batched(engine, model, lambda c: scorer.copy_losses(batch, c), lr) if batched \
                    else engine.step(lambda: scorer.loss_tensor(batch), lr)  # a graph only for fo-lora
            except FloatingPointError as exc:
                raise ZOError(f"{exc} on batch indices {indices}; weights restored, the {step} steps "
                              f"before it logged: resume or inspect {rundir.path}") from None
            losses.append(result.loss)
            logs.step({"step": result.step, "seed": cfg.seed, "g": result.grads, "lr": lr})
            cluster.check_sync(step + 1, method.params, force=step + 1 == cfg.steps)
            logs.metric({"step": step + 1, "loss": result.loss, "g": result.grads,
                         "forward_passes": engine.forward_passes, "time_s": round(time.time() - t0, 3),
                         **cluster.step_stats()})
            check_loss(losses, cfg.max_loss_ratio, step, indices, rundir.path)
            if cfg.progress and main:
                recent = losses[-20:]
                steps.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", fwd=engine.forward_passes)
            maybe_eval(step + 1)
        dev_after = dev_eval(cfg.steps, "dev (final)")
    cluster.close()
    if not main:
        return None

    # -- finish: final and best checkpoints, test on the best-dev checkpoint (as MeZO does), summary
    rundir.save(method, model, "adapter")
    if dev_after >= best_acc:
        best_acc, best_step = dev_after, cfg.steps
        rundir.save(method, model, "best")
    test_after = None
    if data.test:
        if best_step != cfg.steps:
            scorer.model = rundir.load_trained(model, method, "best")
        test_after = evaluate(data.test, "test (best dev)")

    head, tail = losses[:10] or [float("nan")], losses[-10:] or [float("nan")]
    summary = Summary(
        run_dir=str(rundir.path), method=cfg.method, task=data_name(cfg), model=cfg.model,
        dev_before=dev_before, dev_after=dev_after, dev_best=best_acc, best_step=best_step,
        test_after=test_after, steps=cfg.steps, forward_passes=engine.forward_passes,
        train_loss_first=sum(head) / len(head), train_loss_last=sum(tail) / len(tail),
        wall_s=time.time() - t0, peak_memory_mb=peak_memory_mb(run.device),
        trainable_params=method.num_trainable(), adapter=str(rundir.path / "adapter"), metric=metric,
        adapter_bytes=safetensors_bytes(rundir.path / "adapter"),
        trajectory_bytes=(rundir.path / "trajectory.jsonl").stat().st_size,
        dtype=run.precision.name, dtype_reason=run.precision.reason, machine=machine_name(run.device),
    )
    rundir.write_summary(summary.__dict__)
    rundir.drop_state()
    plot_run(rundir.path)  # curves.png: training loss and dev metric against forward passes
    return summary


def best_eval(evals: dict[int, float]) -> tuple[float, int]:
    """The best dev score after step 0 and its step: the earliest of equal scores, as the loop keeps it."""
    return max(((a, s) for s, a in evals.items() if s > 0), key=lambda e: (e[0], -e[1]), default=(-1.0, 0))


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
