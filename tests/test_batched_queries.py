"""Batched queries (zotune.batched): every perturbation of a step in one forward over copies of the batch.

The batched step must be the sequential step (ZOEngine.step) in everything but
speed: the same slopes, the same update, the same forward-pass count, lr 0
leaving every weight bit-identical, replay of its logged g bit-exact.

Tolerances. A batched slope may differ from the sequential one only by the
float rounding of the forward: the stacked batch runs the base matmuls with
c times as many rows and the copies' LoRA terms through bmm, which may sum in
another order. On this machine (torch 2.13 CPU, MKL/oneDNN) the slopes came out
bit-identical in float32 (tiny llama here; SmolLM2-135M in
benchmarks/results/batched_queries.md) and in bfloat16 on the tiny llama, but
nothing guarantees that on other kernels, so the tests allow:

* float32: |Δg| ≤ 1e-4. The losses are O(1) means in float32; a reordered sum
  moves one by a few ulps (~1e-7), and g divides a difference of two losses by
  2ε = 0.02: ~1e-5. 1e-4 leaves a 10x margin and is still 3 orders below the
  slopes (0.01-1).
* bfloat16 base: |Δg| ≤ 4x the rounding noise of the sequential slope itself,
  measured in the test as its distance to the float32 base's slope (+1e-3).
  A bf16 base rounds every activation to 8 bits of mantissa, so a slope, a
  difference of two nearby losses divided by 2ε, carries that rounding as noise:
  on the tiny llama 0.007-0.01 RMS for mezo-lora/ar1zo and 0.13 for zoact; on
  SmolLM2-135M 0.34-0.50 RMS for all three, for the sequential and the batched
  path alike (benchmarks/results/batched_queries_bf16_noise.json), where the two
  paths' slopes differed by 0.46-0.75 RMS: independent draws of that noise. A
  fixed bound below the noise would test the kernels, not this code.

When the slopes are bit-identical, the trained tensors must be too (same g, same
apply()); otherwise they must agree to the tolerance the slopes imply. Either
way a replay of the batched run's logged g rebuilds its tensors bit for bit.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import PROBE_IDS, synthetic_examples
from zotune import batched
from zotune.batched import step_batched, use_batched
from zotune.calibration import calibration_batches
from zotune.cli import main
from zotune.config import TrainConfig
from zotune.errors import ZOError
from zotune.evaluate import Scorer
from zotune.methods import METHODS
from zotune.models import load_model
from zotune.setup import build_engine
from zotune.tasks import Example

BATCHABLE = sorted(n for n, c in METHODS.items() if c.batchable)
BATCH = synthetic_examples(8, seed=5)
LR = 1e-2
TOL = {torch.float32: 1e-4}


def build(model_dir, name: str, dtype=torch.float32, micro_batch_size: int = 0, **settings):
    """(model, scorer, engine) for ``name`` on a fresh tiny model with non-zero, seeded trainable values."""
    model, tok, _ = load_model(str(model_dir), dtype)
    cfg = TrainConfig.make(method=name, lora_r=2, seed=3, eps=1e-2, **settings).validate()
    calibration = (lambda: calibration_batches(BATCH, tok, 4, 0)) if METHODS[name].needs_calibration else None
    model, engine = build_engine(cfg, model, calibration=calibration)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():  # LoRA's B (ZO-Act's C) starts at zero: make every factor matter
        for p in engine.method.params.values():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype), alpha=0.05)
    return model, Scorer(model, tok, micro_batch_size=micro_batch_size), engine


def state(engine) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in engine.method.params.items()}


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def counted(scorer, calls: list):
    """loss_per_copy that records how many copies each call asked for."""
    return lambda c: calls.append(c) or scorer.copy_losses(BATCH, c)


def test_the_batchable_methods_are_the_lora_factor_methods():
    assert BATCHABLE == ["ar1zo", "mezo-lora", "subzero-lora", "zoact"]
    assert not any(METHODS[n].unperturbed_forward for n in BATCHABLE)


@pytest.mark.parametrize("name", BATCHABLE)
@pytest.mark.parametrize("difference", ["central", "forward"])
@pytest.mark.parametrize("queries", [1, 3])
def test_batched_step_is_the_sequential_step(tiny_llama, name, difference, queries):
    """Same slopes (to float tolerance), same update, same forward-pass count; replay is bit-exact."""
    settings = dict(difference=difference, queries=queries, optimizer="adam" if name == "zoact" else "sgd")
    _, seq_scorer, seq = build(tiny_llama, name, **settings)
    model, scorer, eng = build(tiny_llama, name, **settings)
    assert state(seq).keys() == state(eng).keys() and all(bits_equal(a, state(eng)[n]) for n, a in state(seq).items())
    cost = METHODS[name].forward_cost(queries, difference)
    rows = []
    for step in range(2):
        calls = []
        s = seq.step(lambda: seq_scorer.loss_tensor(BATCH), LR)
        b = step_batched(eng, model, counted(scorer, calls), LR)
        assert calls == [cost]  # one forward over as many copies as the sequential step has forwards
        assert b.forward_passes == s.forward_passes == cost and eng.forward_passes == seq.forward_passes
        assert b.keys == s.keys and b.step == s.step == step
        assert b.grads == pytest.approx(s.grads, abs=TOL[torch.float32], rel=0)
        assert b.loss == pytest.approx(s.loss, abs=1e-5)
        rows.append({"step": step, "g": b.grads, "lr": LR})
        ours, theirs = state(eng), state(seq)
        if b.grads == s.grads:  # same g through the same apply(): the same bits
            assert all(bits_equal(ours[n], theirs[n]) for n in ours)
        else:
            assert all(torch.allclose(ours[n], theirs[n], rtol=0, atol=1e-4) for n in ours)
    _, _, fresh = build(tiny_llama, name, **settings)
    fresh.replay(rows)
    assert (fresh.step_count, fresh.forward_passes) == (eng.step_count, eng.forward_passes)
    assert all(bits_equal(a, state(fresh)[n]) for n, a in state(eng).items())


@pytest.mark.parametrize("name", BATCHABLE)
def test_a_zero_learning_rate_batched_step_leaves_every_weight_bit_identical(tiny_llama, name):
    """With weight decay and two queries; the model computes exactly as before (hooks gone, adapters on)."""
    model, scorer, engine = build(tiny_llama, name, weight_decay=0.1, queries=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        logits = model(input_ids=PROBE_IDS).logits
    for _ in range(3):
        step_batched(engine, model, lambda c: scorer.copy_losses(BATCH, c), 0.0)
    assert all(bits_equal(before[n], p.detach()) for n, p in model.named_parameters())
    with torch.no_grad():
        assert torch.equal(model(input_ids=PROBE_IDS).logits, logits)
    assert not any(m._forward_hooks for m in batched.lora_layers(model))
    assert not any(m.disable_adapters for m in batched.lora_layers(model))


@pytest.mark.parametrize("name", ["mezo-lora", "ar1zo", "zoact"])
def test_a_bf16_base_gives_the_same_slopes_to_its_rounding_noise(tiny_llama, name):
    """Over a bfloat16 base the batched slopes may differ from the sequential ones by a few times the
    rounding noise the sequential slopes themselves carry, measured here against a float32 base."""
    settings = dict(queries=3)
    _, ref_scorer, ref = build(tiny_llama, name, torch.float32, **settings)
    _, seq_scorer, seq = build(tiny_llama, name, torch.bfloat16, **settings)
    model, scorer, eng = build(tiny_llama, name, torch.bfloat16, **settings)
    assert next(p for n, p in model.named_parameters() if "lora" not in n).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in eng.method.params.values())  # peft keeps the factors fp32
    exact = ref.step(lambda: ref_scorer.loss_tensor(BATCH), LR).grads
    s = seq.step(lambda: seq_scorer.loss_tensor(BATCH), LR)
    b = step_batched(eng, model, lambda c: scorer.copy_losses(BATCH, c), LR)
    noise = max(abs(x - y) for x, y in zip(s.grads, exact))  # bf16's own error on the slope
    assert noise > 0  # the base really computes in bf16
    assert b.grads == pytest.approx(s.grads, abs=4 * noise + 1e-3, rel=0)
    assert b.forward_passes == s.forward_passes
    ours, theirs = state(eng), state(seq)
    if b.grads == s.grads:  # as measured on this machine (torch 2.13 CPU): then the same bits
        assert all(bits_equal(ours[n], theirs[n]) for n in ours)
    else:  # |Δθ| = lr·|Δg|·|z|/q with |z| a few units
        assert all(torch.allclose(ours[n], theirs[n], rtol=0, atol=LR * (4 * noise + 1e-3) * 10) for n in ours)


@pytest.mark.parametrize("name", ["mezo-lora", "ar1zo"])
def test_micro_batches_are_repeated_per_copy(tiny_llama, name):
    """micro_batch_size 3 cuts 8 examples into 3+3+2: each chunk runs as its own forward over the copies."""
    _, seq_scorer, seq = build(tiny_llama, name, micro_batch_size=3, queries=3)
    model, scorer, eng = build(tiny_llama, name, micro_batch_size=3, queries=3)
    rows = []
    hooked = batched.lora_layers(model)[0]
    hooked.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    s = seq.step(lambda: seq_scorer.loss_tensor(BATCH), LR)
    rows.clear()
    b = step_batched(eng, model, lambda c: scorer.copy_losses(BATCH, c), LR)
    assert sorted(rows) == [6 * 2, 6 * 3, 6 * 3]  # 6 copies of each chunk
    assert b.grads == pytest.approx(s.grads, abs=TOL[torch.float32], rel=0)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.mark.parametrize("placement", [
    pytest.param(dict(quantize="int8"), id="int8-torchao",
                 marks=pytest.mark.skipif(not _has("torchao"), reason="needs torchao")),
    pytest.param(dict(quantize="int4"), id="int4-bitsandbytes",
                 marks=pytest.mark.skipif(not _has("bitsandbytes"), reason="needs bitsandbytes")),
    pytest.param(dict(max_memory="cpu=60KB"), id="disk-offload"),
])
def test_quantized_and_offloaded_bases(tiny_llama, placement):
    """peft wraps a torchao int8 base in lora.Linear's subclass and a bitsandbytes NF4 base in its own
    Linear4bit (which casts the LoRA term before adding it); accelerate offloads layers to disk: the
    batched step reproduces each."""
    def make():
        model, tok, _ = load_model(str(tiny_llama), **({"max_memory": placement["max_memory"]}
                                                       if "max_memory" in placement else {}))
        cfg = TrainConfig.make(method="ar1zo", lora_r=2, seed=3, queries=2,
                               quantize=placement.get("quantize", "none")).validate()
        model, engine = build_engine(cfg, model)
        return model, Scorer(model, tok), engine

    _, seq_scorer, seq = make()
    model, scorer, eng = make()
    assert batched.lora_layers(model) and not batched.unsupported_layers(model)
    s = seq.step(lambda: seq_scorer.loss_tensor(BATCH), LR)
    b = step_batched(eng, model, lambda c: scorer.copy_losses(BATCH, c), LR)
    assert b.grads == pytest.approx(s.grads, abs=TOL[torch.float32], rel=0)


def test_lora_layers_it_does_not_reproduce_are_refused(tiny_llama):
    """A LoRA on the embeddings (peft's lora.Embedding) is not a layer zotune.batched hooks."""
    from peft import LoraConfig, get_peft_model

    model, scorer, engine = build(tiny_llama, "mezo-lora")
    odd_model = get_peft_model(load_model(str(tiny_llama))[0], LoraConfig(r=2, target_modules=["embed_tokens",
                                                                                                 "q_proj"]))
    assert batched.unsupported_layers(odd_model) == ["base_model.model.model.embed_tokens"]
    assert not use_batched("auto", engine, "cpu", 4, 16, odd_model)
    assert use_batched("auto", engine, "cpu", 4, 16, model)
    with pytest.raises(ZOError, match="embed_tokens is of a kind"):
        use_batched("on", engine, "cpu", 4, 16, odd_model)


def test_copy_losses_without_a_hook_are_the_loss_of_each_copy(tiny_llama):
    """Every copy sees the same model: each entry is loss_tensor's number (classification and generation)."""
    model, tok, _ = load_model(str(tiny_llama))
    gen = [Example("the movie was", (), 0, answers=("good",)), Example("a plot it is", (), 0, answers=("dull fine",))]
    for micro in (0, 3):
        scorer = Scorer(model, tok, micro_batch_size=micro)
        for examples in (BATCH, gen):
            one = scorer.loss_tensor(examples)
            copies = scorer.copy_losses(examples, 4)
            assert copies.shape == (4,)
            assert torch.allclose(copies, one.expand(4), rtol=0, atol=1e-6)
            assert torch.allclose(scorer.copy_losses(examples, 1), one.expand(1), rtol=0, atol=1e-6)


def test_a_failing_forward_leaves_the_model_as_it_was(tiny_llama):
    model, scorer, engine = build(tiny_llama, "mezo-lora", queries=2)
    before = state(engine)

    def broken(c):
        scorer.copy_losses(BATCH, c)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        step_batched(engine, model, broken, LR)
    assert engine.step_count == 0 and engine.forward_passes == 0
    assert all(bits_equal(a, state(engine)[n]) for n, a in before.items())
    assert not any(m._forward_hooks or m.disable_adapters for m in batched.lora_layers(model))


def test_a_forward_that_is_not_copies_of_a_batch_is_refused(tiny_llama):
    model, scorer, engine = build(tiny_llama, "ar1zo", queries=2)  # 4 copies
    with pytest.raises(ZOError, match="not 4 copies"):
        step_batched(engine, model, lambda c: scorer.copy_losses(BATCH[:3], 1), LR)


def test_the_setting(tiny_llama):
    """auto: batched on CPU for micro-batched forwards (measured faster), sequential otherwise."""
    _, _, lora = build(tiny_llama, "ar1zo")
    _, _, ln = build(tiny_llama, "mezo-ln")
    assert use_batched("auto", lora, "cpu", micro_batch_size=4, batch_size=16)
    assert not use_batched("auto", lora, "cpu", micro_batch_size=0, batch_size=16)  # whole-batch forwards
    assert not use_batched("auto", lora, "cpu", micro_batch_size=16, batch_size=16)  # the same: one forward
    assert not use_batched("auto", lora, "cuda", micro_batch_size=4, batch_size=16)  # not measured
    assert not use_batched("off", lora, "cpu", 4, 16) and use_batched("on", lora, "cuda", 0, 16)
    assert not use_batched("auto", ln, "cpu", 4, 16) and not use_batched("off", ln, "cpu", 4, 16)
    with pytest.raises(ZOError, match="mezo-ln.*cannot evaluate"):
        use_batched("on", ln, "cpu")
    with pytest.raises(ZOError, match="batched_queries must be one of"):
        use_batched("yes", lora, "cpu")
    with pytest.raises(ZOError, match="cannot take batched steps"):
        step_batched(ln, None, lambda c: torch.zeros(c), LR)
    assert TrainConfig.make(batched_queries="off").batched_queries == "off"


def test_train_with_batched_queries_matches_the_sequential_run(tiny_llama, tmp_path, capsys):
    """`zotune train --batched-queries on` logs the sequential run's slopes and forward passes; replay is exact."""
    def run(mode):
        out = tmp_path / mode
        assert main(["train", "--model", str(tiny_llama), "--task", "rotten-tomatoes", "--method", "ar1zo",
                     "--lora-r", "2", "--queries", "2", "--steps", "3", "--train-size", "16", "--dev-size", "4",
                     "--batch-size", "4", "--lr", "0.05", "--progress", "false", "--output-dir", str(out),
                     "--batched-queries", mode]) == 0
        traj = [json.loads(line) for line in (out / "trajectory.jsonl").read_text().splitlines()]
        return out, [r["g"] for r in traj if "g" in r], json.loads((out / "summary.json").read_text())

    seq_dir, seq_g, seq_summary = run("off")
    bat_dir, bat_g, bat_summary = run("on")
    assert len(bat_g) == len(seq_g) == 3
    assert all(b == pytest.approx(s, abs=TOL[torch.float32], rel=0) for b, s in zip(bat_g, seq_g))
    assert bat_summary["forward_passes"] == seq_summary["forward_passes"] == 3 * 4
    capsys.readouterr()
    assert main(["replay", str(bat_dir)]) == 0
    assert '"bit_identical": true' in capsys.readouterr().out
