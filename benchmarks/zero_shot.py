"""Zero-shot table: a model's accuracy on every classification / multiple-choice task, no training.

MeZO's protocol for the split: a task is scored on its ``test`` split (for
SuperGLUE that is the validation set, as MeZO reports), or on ``dev`` where the
offline data has no test split (ReCoRD, LM-BFF MNLI/SNLI); at most ``--n``
examples (default 500), sampled with ``--seed`` (default 0) exactly as
``zotune eval --size N --seed S`` does. Generation tasks (SQuAD) are left out.

Results go to ``<out>/zero_shot.json`` and ``<out>/zero_shot.md``, rewritten
after every task, so a run that is stopped keeps the tasks it finished.

    OMP_NUM_THREADS=1 python benchmarks/zero_shot.py --threads 1           # SmolLM2-135M, every task (hours on CPU)
    python benchmarks/zero_shot.py --tasks rte,cb --n 100
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

# MeZO's tasks first (the order of its tables), then the rest of the suite.
ORDER = ["sst2-glue", "rte", "cb", "boolq", "wsc", "wic", "multirc", "copa", "record",
         "lmbff-sst2", "lmbff-sst5", "lmbff-snli", "lmbff-mnli", "lmbff-trec", "lmbff-mr", "lmbff-cr",
         "lmbff-mpqa", "lmbff-subj", "sst2", "rotten-tomatoes"]


def classification_tasks() -> list[str]:
    """Every registered task except generation ones, MeZO's first."""
    from zotune.tasks import TASKS

    rest = sorted(t for t in TASKS if t not in ORDER and t != "squad")
    return [t for t in ORDER if t in TASKS] + rest


def write_tables(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "zero_shot.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Zero-shot: {result['model']}",
             "",
             f"No training; prompts and verbalizers as in `zotune tasks`. Split: test where the offline data has one "
             f"(SuperGLUE: the validation set, MeZO's protocol), else dev; n <= {result['n_max']} sampled with seed "
             f"{result['seed']}; prompts keep their last {result['max_length']} tokens; {result['threads']} thread(s).",
             "",
             "| task | metric | value | majority class | n | split | seconds |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['metric']} | {r['value']:.3f} | {r['majority']:.3f} | {r['n']} | {r['split']} "
              f"| {r['seconds']:.0f} |" for r in result["rows"]]
    if result.get("failed"):
        lines += ["", "Not scored: " + "; ".join(f"{t}: {why}" for t, why in result["failed"].items())]
    if result.get("pending"):
        lines += ["", "Not run yet (the run stopped or is still going): " + ", ".join(result["pending"])]
    (out / "zero_shot.md").write_text("\n".join(lines) + "\n")


def score_task(scorer, task: str, n: int, seed: int, data_dir: str = "", batch_size: int = 16) -> dict:
    """One row of the table: the task's test split (else dev), at most ``n`` examples sampled with ``seed``."""
    import torch

    from zotune.errors import ZOError
    from zotune.metrics import is_generation, score_split
    from zotune.tasks import load_task

    data = load_task(task, Path(data_dir) if data_dir else None)
    split = "test" if data.test else "dev"
    examples = getattr(data.subsample(seed, n, n, n), split)
    if is_generation(examples):
        raise ZOError("a generation task (scored with F1, not in this table)")
    t0 = time.time()
    with torch.no_grad():
        score = score_split(scorer, examples, batch_size)
    return {"task": task, "metric": score.metric, "value": score.value, "n": score.n, "split": split,
            "seconds": round(time.time() - t0, 1), "majority": majority(examples)}


def majority(examples) -> float:
    """Accuracy of always answering the most frequent gold label of the sample: the floor to beat."""
    labels = [e.label for e in examples]
    return max(labels.count(x) for x in set(labels)) / len(labels)


def run(model: str = "smollm2-135m", tasks: list[str] | None = None, n: int = 500, seed: int = 0,
        threads: int = 1, data_dir: str = "", out: str = "benchmarks/results", max_length: int = 256,
        batch_size: int = 16, say=print) -> dict:
    import torch

    from zotune.errors import ZOError
    from zotune.evaluate import Scorer
    from zotune.models import load_model

    torch.set_num_threads(threads)
    net, tok, kind = load_model(model, device="cpu")
    if kind != "causal":
        raise ZOError(f"model {model!r} is an encoder; zero-shot prompting needs a causal LM")
    scorer = Scorer(net, tok, max_length)
    result = {"model": model, "n_max": n, "seed": seed, "max_length": max_length, "threads": threads,
              "rows": [], "failed": {}, "pending": list(tasks or classification_tasks())}
    for task in list(result["pending"]):
        try:
            row = score_task(scorer, task, n, seed, data_dir, batch_size)
        except ZOError as exc:  # data absent, or not a classification task: say so in the table, go on
            result["failed"][task] = str(exc)
            say(f"{task:16s} skipped: {exc}")
        else:
            result["rows"].append(row)
            say(f"{task:16s} {row['split']:4s} n={row['n']:<4d} {row['metric']} {row['value']:.3f}  "
                f"({row['seconds']:.0f} s)")
        result["pending"].remove(task)
        write_tables(result, Path(out))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="named model or local folder (default: smollm2-135m)")
    p.add_argument("--tasks", default="", help="comma-separated tasks (default: every classification task)")
    p.add_argument("--n", type=int, default=500, help="at most this many examples per task (default: 500)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument("--data-dir", default="", help="benchmark data folder (default: $ZOTUNE_DATA or ../shared/data)")
    p.add_argument("--max-length", type=int, default=256, help="max prompt tokens (default: 256)")
    p.add_argument("--batch-size", type=int, default=16, help="evaluation batch size (default: 16)")
    p.add_argument("--out", default="benchmarks/results", help="output folder (default: benchmarks/results)")
    args = p.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t] or None
    run(args.model, tasks, args.n, args.seed, args.threads, args.data_dir, args.out, args.max_length,
        args.batch_size, say=lambda msg: print(msg, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
