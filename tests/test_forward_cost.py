"""The forward pass is the whole cost of a ZO step; the scorer's shortcuts must not change a single score.

* restricted scoring (candidate rows / answer positions only) equals the model's full-vocabulary logits;
* multiple choice on a shared prompt KV cache equals re-running prompt + candidate;
* length sorting and micro-batches cut padding and change neither accuracy nor loss.
"""

from __future__ import annotations

import json
import math
import random
import warnings

import pytest
import torch

from conftest import FILLER, NEGATIVE, POSITIVE, synthetic_examples
from zotune.config import TrainConfig
from zotune.errors import ZOError
from zotune.evaluate import Scorer, length_sorted_chunks, padding_fraction
from zotune.models import load_model
from zotune.tasks import Example

ARCHS = ("llama", "opt", "qwen3", "gpt2")


def multiple_choice(n: int, seed: int = 0, varying: bool = False) -> list[Example]:
    """COPA/ReCoRD-like: prompts of different lengths, multi-token candidates of different lengths
    (one of them a single token), and with ``varying`` a different number of candidates per example."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = " ".join(rng.choices(FILLER + POSITIVE + NEGATIVE, k=rng.randint(2, 9)))
        k = rng.randint(2, 4) if varying else 2
        cands = tuple(" " + " ".join(rng.choices(POSITIVE + NEGATIVE + FILLER, k=rng.randint(1, 4))) for _ in range(k))
        out.append(Example(prompt, cands, rng.randrange(k)))
    return out


def varied_sentiment(n: int, seed: int = 0) -> list[Example]:
    """Single-token candidates, prompts from 3 to 14 words: batches carry real padding."""
    rng = random.Random(seed)
    return [Example(" ".join(rng.choices(FILLER + POSITIVE + NEGATIVE, k=rng.randint(2, 13))) + " It was",
                    (" terrible", " great"), rng.randrange(2)) for _ in range(n)]


@pytest.fixture(scope="module")
def models(tiny_models):
    return {a: load_model(str(tiny_models[a]))[:2] for a in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_restricted_scoring_equals_full_vocabulary_logits(models, arch):
    model, tok = models[arch]
    single = varied_sentiment(12)
    restricted, full = Scorer(model, tok), Scorer(model, tok, scoring="full")
    # single-token candidates: restricted scores are logits, full ones log-probs; they differ by the
    # per-example normalizer only, so the candidates' log-probs among themselves are identical
    r, f = restricted.scores(single), full.scores(single)
    assert r.shape == f.shape == (12, 2)
    diff = r - f
    assert torch.allclose(diff, diff[:, :1].expand_as(diff), atol=1e-5)
    assert torch.allclose(restricted.candidate_logprobs(single), full.candidate_logprobs(single), atol=1e-5)
    assert restricted.loss(single) == pytest.approx(full.loss(single), abs=1e-5)
    # multi-token candidates: both are mean per-token log-likelihoods, equal outright
    mc = multiple_choice(10, varying=True)
    for share in (True, False):
        r = Scorer(model, tok, share_prompt=share).scores(mc)
        f = Scorer(model, tok, scoring="full", share_prompt=share).scores(mc)
        assert torch.equal(torch.isinf(r), torch.isinf(f))
        assert torch.allclose(r, f, atol=1e-5)
        assert (r[~torch.isinf(r)] < 0).all()  # log-likelihoods


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("scoring", ["restricted", "full"])
def test_shared_prompt_kv_cache_equals_recomputation(models, arch, scoring):
    model, tok = models[arch]
    for examples in (multiple_choice(9), multiple_choice(9, seed=1, varying=True)):
        sharing = Scorer(model, tok, scoring=scoring, share_prompt=True)
        with warnings.catch_warnings():  # the cache goes in (and comes out) under the name this transformers uses
            warnings.simplefilter("error", FutureWarning)
            shared = sharing.scores(examples)
            assert sharing._scores_shared([sharing._plan(e) for e in examples]) is not None  # not the fallback
        again = Scorer(model, tok, scoring=scoring, share_prompt=False).scores(examples)
        assert torch.equal(torch.isinf(shared), torch.isinf(again))
        assert torch.allclose(shared, again, atol=1e-4)
        # and each example alone (no padding at all) gives the same candidate log-probs as in the
        # padded batch (alone, an example whose candidates happen to be single tokens takes the
        # single-token path, whose scores are logits: equal up to a constant, hence the normalization)
        scorer = Scorer(model, tok, scoring=scoring)
        for row, e in enumerate(examples):
            k = len(e.candidates)
            assert torch.allclose(torch.log_softmax(shared[row, :k], -1), scorer.candidate_logprobs([e])[0],
                                  atol=1e-4)


def test_sorting_cuts_padding_and_keeps_accuracy(models):
    model, tok = models["llama"]
    scorer = Scorer(model, tok)
    examples = varied_sentiment(40, seed=3)
    lengths = [scorer.length(e) for e in examples]
    arrival = [list(range(i, min(i + 8, 40))) for i in range(0, 40, 8)]
    sorted_ = length_sorted_chunks(lengths, 8)
    assert sorted(i for b in sorted_ for i in b) == list(range(40))
    assert 0 <= padding_fraction(lengths, sorted_) < padding_fraction(lengths, arrival)
    assert padding_fraction([5, 5], [[0, 1]]) == 0.0 and padding_fraction([1, 3], [[0, 1]]) == pytest.approx(1 / 3)
    accs = {scorer.accuracy(examples, 8, sort=True), scorer.accuracy(examples, 8, sort=False),
            scorer.accuracy(examples, 1)}
    assert len(accs) == 1
    mc = multiple_choice(20, varying=True)
    assert scorer.accuracy(mc, 6, sort=True) == scorer.accuracy(mc, 6, sort=False) == scorer.accuracy(mc, 1)


@pytest.mark.parametrize("examples", [varied_sentiment(16, seed=5), multiple_choice(16, seed=5, varying=True)],
                         ids=["single-token", "multiple-choice"])
def test_micro_batches_give_the_same_loss_with_less_padding(models, examples):
    model, tok = models["qwen3"]
    whole, chunked = Scorer(model, tok), Scorer(model, tok, micro_batch_size=4)
    assert torch.allclose(whole.scores(examples), chunked.scores(examples), atol=1e-5)
    assert chunked.loss(examples) == pytest.approx(whole.loss(examples), abs=1e-6)
    lengths = [whole.length(e) for e in examples]
    assert padding_fraction(lengths, length_sorted_chunks(lengths, 4)) <= padding_fraction(lengths, [list(range(16))])


def test_settings_are_checked_and_reach_the_config(models):
    model, tok = models["llama"]
    with pytest.raises(ZOError, match="scoring"):
        Scorer(model, tok, scoring="fast")
    with pytest.raises(ZOError, match="micro_batch_size"):
        Scorer(model, tok, micro_batch_size=-1)
    cfg = TrainConfig.from_dict({"scoring": "full", "share_prompt": "false", "micro_batch_size": 4, "compile": "true"})
    assert (cfg.scoring, cfg.share_prompt, cfg.micro_batch_size, cfg.compile) == ("full", False, 4, True)
    with pytest.raises(ZOError, match="scoring"):
        TrainConfig.make(scoring="fast").validate()
    import argparse

    from zotune.cli import _add_config_flags, config_from_args

    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    _add_config_flags(parser)
    cfg = config_from_args(parser.parse_args(["--compile", "--scoring", "full", "--share-prompt", "false"]))
    assert (cfg.compile, cfg.scoring, cfg.share_prompt, cfg.progress) == (True, "full", False, True)


def test_training_batch_scores_do_not_depend_on_batch_company(models):
    """Right padding + explicit positions: an example's score is the same alone and in any batch."""
    model, tok = models["gpt2"]
    examples = synthetic_examples(6) + varied_sentiment(6)
    scorer = Scorer(model, tok)
    together = scorer.scores(examples)
    alone = torch.cat([scorer.scores([e]) for e in examples])
    assert torch.allclose(together, alone, atol=1e-5)


# -- precision: a bfloat16 base under float32 adapters ---------------------------------------
def test_auto_dtype_is_bf16_only_where_the_cpu_has_it_and_only_for_lora_type_methods(monkeypatch):
    import zotune.hardware
    from zotune.hardware import pick_dtype
    from zotune.methods import get_method

    # bf16 instructions are not enough: the CPU must also run a bf16 forward faster (AMX: 3.4x; a Xeon
    # with avx512_bf16 and no AMX: 0.64x, benchmarks/results/precision_avx512bf16_no_amx.md)
    for native, speedup, expected in ((False, 3.4, torch.float32), (True, 3.4, torch.bfloat16),
                                      (True, 0.64, torch.float32)):
        monkeypatch.setattr(zotune.hardware, "cpu_has_native_bf16", lambda: native)
        monkeypatch.setattr(zotune.hardware, "cpu_bf16_speedup", lambda: speedup)
        picked = pick_dtype("auto", "cpu", get_method("ar1zo"))
        assert picked.dtype == expected and picked.reason.startswith("auto: this CPU")
        assert ("natively and fast" in picked.reason) == (expected == torch.bfloat16)
        assert ("0.64x the speed of fp32" in picked.reason) == (native and speedup < 1)
        # the regime study's protocol takes bf16 wherever the CPU has it (its subject is bf16's noise)
        assert pick_dtype("auto", "cpu", get_method("ar1zo"), need_speedup=False).dtype == (
            torch.bfloat16 if native else torch.float32)
        for method in ("mezo", "mezo-ln", "lozo", "agzo"):  # they train base weights or norms
            assert pick_dtype("auto", "cpu", get_method(method)).dtype == torch.float32
    assert pick_dtype("bfloat16", "cpu", get_method("mezo-lora")).dtype == torch.bfloat16
    for method in ("mezo", "mezo-ln", "lozo", "agzo"):  # on request: updates stochastically rounded (issue 15)
        assert pick_dtype("bfloat16", "cpu", get_method(method)).dtype == torch.bfloat16


def test_the_bf16_speed_is_measured_once_per_machine_and_cached(monkeypatch, tmp_path):
    import zotune.hardware as hw

    monkeypatch.setenv("ZOTUNE_HOME", str(tmp_path))
    calls = []
    monkeypatch.setattr(hw, "measure_bf16_speedup", lambda: calls.append(1) or 2.5)
    assert hw.cpu_bf16_speedup() == 2.5 and hw.cpu_bf16_speedup() == 2.5 and len(calls) == 1
    cache = json.loads((tmp_path / "cpu_bf16.json").read_text())
    assert cache == {f"{hw.cpu_name()} torch {torch.__version__}": 2.5}  # keyed by CPU, its flags and torch
    (tmp_path / "cpu_bf16.json").write_text("not json")  # a torn cache is measured again, not an error
    assert hw.cpu_bf16_speedup() == 2.5 and len(calls) == 2


@pytest.mark.native_bf16
def test_native_bf16_means_the_cpu_has_bf16_instructions():
    """oneDNN calls any AVX-512 CPU bf16-capable and emulates it there (an Ice Lake Xeon without
    avx512_bf16 ran a SmolLM2 forward at 0.35x of fp32): "native" must follow the CPU's own flags."""
    from zotune.hardware import cpu_has_native_bf16, cpu_info

    flags = cpu_info()[1]
    if not flags:
        pytest.skip("no /proc/cpuinfo flags to compare with")
    assert cpu_has_native_bf16() == bool(flags & {"avx512_bf16", "amx_tile"})


def test_the_bf16_probe_times_a_real_block_in_both_dtypes():
    from zotune.hardware import measure_bf16_speedup

    threads = torch.get_num_threads()
    speedup = measure_bf16_speedup(repeats=1)
    assert math.isfinite(speedup) and 0.05 < speedup < 50  # a ratio of two real timings, either way round
    assert torch.get_num_threads() == threads  # the probe's one thread is not left behind


def test_a_bf16_base_on_a_cpu_without_native_bf16_multiplies_in_fp32_and_rounds_to_bf16(tiny_llama, monkeypatch):
    """torch emulates a bf16 matmul there at under a third of fp32's speed; native bf16 hardware multiplies
    bf16 values and accumulates in fp32, so zotune does that instead: same weights, same bf16 outputs
    up to summation order (benchmarks/results/bf16_matmul.md)."""
    from torch.nn import functional as F

    import zotune.hardware
    from zotune.hardware import matmuls_in_fp32

    model, _, _ = load_model(str(tiny_llama), torch.bfloat16)  # conftest: this CPU has no native bf16
    assert matmuls_in_fp32(model)  # what setup reads to record it in the run's dtype reason
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.dtype == torch.bfloat16 and m._forward_pre_hooks for m in linears)
    layer = linears[0]
    x = torch.randn(3, layer.in_features).to(torch.bfloat16)
    ours = layer(x)
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, F.linear(x.float(), layer.weight.float(), None).to(torch.bfloat16))
    torch.testing.assert_close(ours, F.linear(x, layer.weight), rtol=2e-2, atol=2e-2)  # torch's own, ~1 ulp off

    monkeypatch.setenv("ZOTUNE_CPU_BF16_MATMUL", "native")  # left to torch, for measuring the difference
    torchs, _, _ = load_model(str(tiny_llama), torch.bfloat16)
    assert not matmuls_in_fp32(torchs) and not any(m._forward_pre_hooks for m in torchs.modules())
    with torch.no_grad():
        a, b = model(ids).logits, torchs(ids).logits
    assert a.dtype == b.dtype == torch.bfloat16
    torch.testing.assert_close(a.float(), b.float(), rtol=0.05, atol=0.05)  # the same numbers to bf16's grain

    with pytest.raises(RuntimeError):  # a forward that fails leaves no mode behind
        layer(torch.randn(3, layer.in_features + 1).to(torch.bfloat16))
    assert torch._C._len_torch_function_stack() == 0
    monkeypatch.setenv("ZOTUNE_CPU_BF16_MATMUL", "fast")
    with pytest.raises(ZOError, match="ZOTUNE_CPU_BF16_MATMUL='fast'"):
        load_model(str(tiny_llama), torch.bfloat16)
    monkeypatch.delenv("ZOTUNE_CPU_BF16_MATMUL")
    fp32, _, _ = load_model(str(tiny_llama), torch.float32)
    monkeypatch.setattr(zotune.hardware, "cpu_has_native_bf16", lambda: True)
    native, _, _ = load_model(str(tiny_llama), torch.bfloat16)
    assert not any(matmuls_in_fp32(net) or m._forward_pre_hooks for net in (fp32, native) for m in net.modules())


def test_a_run_records_that_its_bf16_base_multiplied_in_fp32(tiny_llama, tmp_path, monkeypatch):
    """A bf16 run on a CPU without native bf16 says so where its numbers are read (summary.json,
    config.yaml): its matmuls were fp32's, rounded to bf16, and how to get torch's instead."""
    from zotune.cli import main

    def run(name: str) -> dict:
        out = tmp_path / name
        args = ["train", "--model", str(tiny_llama), "--method", "mezo-lora", "--dtype", "bfloat16",
                "--train-size", "8", "--dev-size", "4", "--batch-size", "4", "--steps", "1",
                "--progress", "false", "--output-dir", str(out)]
        assert main(args) == 0
        return json.loads((out / "summary.json").read_text())

    reason = run("ours")["dtype_reason"]
    assert "matmuls in fp32, rounded to bf16" in reason and "ZOTUNE_CPU_BF16_MATMUL=native" in reason
    monkeypatch.setenv("ZOTUNE_CPU_BF16_MATMUL", "native")
    assert "matmuls in fp32" not in run("torchs")["dtype_reason"]


@pytest.mark.native_bf16
def test_the_cpu_is_asked_through_torch_and_the_run_records_the_pick(tiny_llama, tmp_path, capsys):
    """Whatever this CPU has, a run with --dtype auto says what it picked and why, in config.yaml and
    the summary, and a resume uses the recorded dtype."""
    from zotune.cli import main
    from zotune.hardware import BF16_MIN_SPEEDUP, cpu_bf16_speedup, cpu_has_native_bf16, cpu_name

    expected = "bfloat16" if cpu_has_native_bf16() and cpu_bf16_speedup() >= BF16_MIN_SPEEDUP else "float32"
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_llama), "--method", "mezo-lora", "--train-size", "16", "--dev-size", "4",
            "--batch-size", "4", "--steps", "2", "--progress", "false", "--output-dir", str(out)]
    assert main(args) == 0
    config = (out / "config.yaml").read_text()
    assert f"dtype: {expected}" in config and f"# dtype {expected}: auto: this CPU" in config
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dtype"] == expected and summary["dtype_reason"].startswith("auto: this CPU")
    assert summary["machine"] == cpu_name()  # which machine a run trained on (a study's runs span several)
    assert main(["train", "--resume", str(out), "--steps", "3", "--progress", "false"]) == 0
    assert json.loads((out / "summary.json").read_text())["dtype"] == expected
    assert (out / "config.yaml").read_text().startswith(f"# dtype {expected}")  # the note survives a rewrite


def test_bf16_base_trains_float32_lora_factors_and_restores_exactly(tiny_llama):
    from zotune.setup import build_engine

    model, tok, _ = load_model(str(tiny_llama), dtype=torch.bfloat16)
    model, engine = build_engine(TrainConfig.make(method="mezo-lora", lora_r=4, eps=1e-2), model)
    params = engine.method.params
    assert params and all(p.dtype == torch.float32 for p in params.values())  # peft upcasts the adapter
    base = [p for n, p in model.named_parameters() if "lora_" not in n]
    assert base and all(p.dtype == torch.bfloat16 for p in base)
    scorer, batch = Scorer(model, tok), synthetic_examples(8)
    before = {n: p.detach().clone() for n, p in params.items()}
    engine.step(lambda: scorer.loss_tensor(batch), lr=0.0)
    assert all(torch.equal(before[n], p) for n, p in params.items())  # exact restore, whatever the dtype
    losses = []
    for _ in range(30):
        losses.append(engine.step(lambda: scorer.loss_tensor(batch), lr=0.05).loss)
    assert all(l == l for l in losses) and sum(losses[-5:]) < sum(losses[:5])
