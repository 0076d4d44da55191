"""The command line: a full run on a tiny model, PEFT-format output, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import SHARED_DATA, assert_peft_round_trip
from zotune.cli import main

needs_data = pytest.mark.skipif(not (SHARED_DATA / "SST-2").exists(), reason="../shared/data not present")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zotune.cli", *args], capture_output=True, text=True, timeout=300)


@needs_data
def test_train_writes_a_complete_run_directory_and_a_peft_adapter(tiny_llama, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--model", str(tiny_llama), "--task", "sst2", "--data-dir", str(SHARED_DATA),
                 "--steps", "6", "--train-size", "64", "--dev-size", "32", "--eval-every", "3",
                 "--lr", "0.05", "--output-dir", str(out), "--progress", "false"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "dev accuracy" in printed and "forward passes    24 in 6 steps" in printed  # the default zoact: 2 queries
    assert str(out / "adapter") in printed
    for name in ("config.yaml", "metrics.jsonl", "trajectory.jsonl", "summary.json", "adapter", "best"):
        assert (out / name).exists(), name
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["steps"] == 6 and config["lr"] == 0.05
    trajectory = [json.loads(line) for line in (out / "trajectory.jsonl").read_text().splitlines()]
    assert [t["step"] for t in trajectory] == list(range(6))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["forward_passes"] == 24

    # The adapter is a standard PEFT adapter: it loads elsewhere and reproduces the trained logits.
    from zotune.config import TrainConfig
    from zotune.methods import get_method, prepare_seeded
    from zotune.models import load_model
    from zotune.rundir import RunDir, load_trained

    cfg = TrainConfig.from_yaml(out / "config.yaml")
    method = get_method(cfg.method)(cfg)
    method.calibration = RunDir.open(out).calibration() or {}  # zoact's activation basis, kept by the run
    ours = prepare_seeded(method, load_model(str(tiny_llama))[0], cfg.seed)
    initial = {n: p.clone() for n, p in method.params.items()}
    ours = load_trained(ours, method, out / "adapter")
    assert any(not torch.equal(initial[n], p) for n, p in method.params.items())  # it trained
    assert_peft_round_trip(ours, tiny_llama, out / "adapter")


def test_config_file_is_overridden_by_flags(tmp_path):
    from zotune.cli import build_parser, config_from_args

    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("lr: 0.5\nlora-r: 4\nsteps: 7\n")
    args = build_parser().parse_args(["train", "--config", str(cfg_file), "--steps", "9"])
    cfg = config_from_args(args)
    assert (cfg.lr, cfg.lora_r, cfg.steps) == (0.5, 4, 9)


def test_dtype_takes_the_short_names_the_bench_flags_use_and_stores_the_long_one():
    from zotune.cli import build_parser, config_from_args

    for short, long in (("fp32", "float32"), ("bf16", "bfloat16"), ("float32", "float32"), ("auto", "auto")):
        cfg = config_from_args(build_parser().parse_args(["train", "--dtype", short])).validate()
        assert cfg.dtype == long and cfg.to_dict()["dtype"] == long


@pytest.mark.parametrize("args,message", [
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["--method", "sgd-magic"], "unknown method 'sgd-magic'"),
    (["--lora-r", "0"], "lora_r (rank) must be > 0"),
    (["--eps", "0"], "eps must be > 0"),
    (["--eps=-1e-3"], "eps must be > 0"),
    (["--lr", "-1"], "lr must be >= 0"),
    (["--steps", "ten"], "setting 'steps' expects int, got 'ten'"),
    (["--task", "imdb"], "unknown task 'imdb'"),
    (["--dtype", "fp16"], "dtype must be auto, float32 (fp32) or bfloat16 (bf16), got 'fp16'"),
])
def test_bad_settings_fail_in_one_line_with_exit_code_2(args, message, tmp_path):
    result = run_cli("train", *args, "--output-dir", str(tmp_path / "r"))
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_empty_data_fails_in_one_line(tmp_path):
    (tmp_path / "SST-2" / "original").mkdir(parents=True)
    for split in ("train", "dev", "test"):
        (tmp_path / "SST-2" / "original" / f"stsa.binary.{split}").write_text("")
    result = run_cli("train", "--task", "sst2", "--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "r"))
    assert result.returncode == 2
    assert "empty train split" in result.stderr and "Traceback" not in result.stderr


def test_malformed_data_names_file_and_line(tmp_path):
    root = tmp_path / "SST-2" / "original"
    root.mkdir(parents=True)
    (root / "stsa.binary.train").write_text("1 a fine film\nx broken line\n")
    for split in ("dev", "test"):
        (root / f"stsa.binary.{split}").write_text("0 dull\n")
    result = run_cli("train", "--task", "sst2", "--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "r"))
    assert result.returncode == 2
    assert "stsa.binary.train:2" in result.stderr


def test_help_teaches():
    result = run_cli("train", "--help")
    assert result.returncode == 0
    for flag in ("--method", "--lr", "--eps", "--lora-r", "--config", "examples:"):
        assert flag in result.stdout
    assert "mezo-lora" in run_cli("methods").stdout
    assert "rotten-tomatoes" in run_cli("tasks").stdout


def test_train_on_the_users_own_csv_files(tiny_llama, tmp_path, capsys):
    rows = ["review,stars", '"dull, clumsy and boring",1', "a charming lovely film,5", "awful plot,1", "superb story,5"]
    (tmp_path / "train.csv").write_text("\ufeff" + "\n".join(rows) + "\n", encoding="utf-8")
    (tmp_path / "dev.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    code = main(["train", "--model", str(tiny_llama), "--train-file", str(tmp_path / "train.csv"),
                 "--dev-file", str(tmp_path / "dev.csv"), "--text-field", "review", "--label-field", "stars",
                 "--verbalizer", "1=terrible,5=great", "--steps", "2", "--batch-size", "2",
                 "--output-dir", str(tmp_path / "run"), "--progress", "false"])
    assert code == 0
    assert "forward passes    8 in 2 steps" in capsys.readouterr().out  # the default zoact: 2 queries


def test_unknown_label_in_users_file_fails_in_one_line(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "fine", "label": 1}\n{"text": "bad", "label": 7}\n')
    result = run_cli("train", "--train-file", str(tmp_path / "train.jsonl"), "--dev-file", str(tmp_path / "train.jsonl"),
                     "--output-dir", str(tmp_path / "r"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "train.jsonl:2" in result.stderr and not (tmp_path / "r").exists()


def test_labels_that_start_with_a_dash_work_as_written_and_the_summary_names_the_users_file(tiny_llama, tmp_path,
                                                                                               capsys):
    """--verbalizer "-1=terrible,1=great" (a space, not "=") works, and the summary says what was trained on."""
    rows = [{"text": f"{w} movie", "label": 1 if w in ("good", "fine", "nice") else -1}
            for w in ("good", "bad", "fine", "awful", "nice", "dull") * 3]
    (tmp_path / "reviews.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = main(["train", "--model", str(tiny_llama), "--train-file", str(tmp_path / "reviews.jsonl"),
                 "--verbalizer", "-1=terrible,1=great", "--method", "mezo-lora", "--steps", "2", "--batch-size", "4",
                 "--progress", "false", "--output-dir", str(tmp_path / "run")])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0] == f"zotune: mezo-lora on reviews.jsonl ({tiny_llama})"
    assert "rotten-tomatoes" not in printed
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["task"] == "reviews.jsonl"


def test_a_headerless_tsv_with_string_labels_and_a_three_label_pair_file_train_as_written(tiny_llama, tmp_path,
                                                                                          capsys):
    """The shapes people bring: columns by number with word labels, and sentence pairs with three labels."""
    words = {"positive": ("good", "fine", "nice"), "negative": ("bad", "dull", "awful")}
    tsv = "".join(f"the film was {w}\t{label}\n" for label, ws in words.items() for w in ws * 4)
    (tmp_path / "reviews.tsv").write_text(tsv)
    assert main(["train", "--model", str(tiny_llama), "--train-file", str(tmp_path / "reviews.tsv"), "--text-field", "0",
                 "--label-field", "1", "--verbalizer", "negative=terrible,positive=great", "--method", "mezo-lora",
                 "--steps", "2", "--batch-size", "4", "--progress", "false", "--output-dir", str(tmp_path / "tsv")]) == 0
    labels = ["entailment", "neutral", "contradiction"]
    pairs = [{"premise": f"a movie was {w}", "hypothesis": h, "gold": labels[i % 3]}
             for i, (w, h) in enumerate(zip(["good", "bad", "dull"] * 5, ["it was", "the plot", "a story"] * 5))]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    assert main(["train", "--model", str(tiny_llama), "--train-file", str(tmp_path / "pairs.jsonl"),
                 "--text-field", "premise", "--text-pair-field", "hypothesis", "--label-field", "gold",
                 "--template", "{text} ? {text_pair} It was", "--verbalizer",
                 "entailment=great,neutral=it,contradiction=terrible", "--method", "mezo-lora", "--steps", "2",
                 "--batch-size", "4", "--progress", "false", "--output-dir", str(tmp_path / "pairs")]) == 0
    out = capsys.readouterr().out
    assert "on reviews.tsv" in out and "on pairs.jsonl" in out
    for run in ("tsv", "pairs"):  # each held a dev split out of its training file and evaluated on it
        summary = json.loads((tmp_path / run / "summary.json").read_text())
        assert 0 <= summary["dev_after"] <= 1 and summary["forward_passes"] == 4
