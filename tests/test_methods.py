"""Methods plug into one protocol; LoRA is upstream peft on every architecture we claim."""

from __future__ import annotations

import pytest
import torch

from conftest import PROBE_IDS, assert_peft_round_trip, synthetic_examples
from zotune.adapters import target_modules
from zotune.config import TrainConfig
from zotune.engine import ZOEngine
from zotune.errors import ZOError
from zotune.evaluate import Scorer
from zotune.methods import get_method
from zotune.models import load_model
from zotune.optim import ZOSGD


def test_an_unknown_method_is_named_with_the_choices():
    with pytest.raises(ZOError, match="unknown method 'nope'; choose one of: .*mezo-lora"):
        get_method("nope")


@pytest.mark.parametrize("arch,expected", [
    ("llama", ["q_proj", "v_proj"]), ("qwen3", ["q_proj", "v_proj"]), ("opt", ["q_proj", "v_proj"]),
    ("gpt2", ["c_attn"]), ("bert", ["query", "value"]),
])
def test_lora_targets_are_discovered_per_architecture(tiny_models, arch, expected):
    model, _, _ = load_model(str(tiny_models[arch]))
    assert target_modules(model) == expected


def test_unknown_target_module_names_the_culprit(tiny_llama):
    model, _, _ = load_model(str(tiny_llama))
    with pytest.raises(ZOError, match="unknown target module.*k_projj"):
        target_modules(model, ["q_proj", "k_projj"])


@pytest.mark.parametrize("arch", ["llama", "qwen3", "opt", "gpt2"])
def test_mezo_lora_trains_only_peft_lora_factors_on_each_causal_architecture(tiny_models, arch):
    from peft.tuners.lora import LoraLayer

    model, tok, _ = load_model(str(tiny_models[arch]))
    method = get_method("mezo-lora")(TrainConfig.make(lora_r=2, lora_alpha=4))
    model = method.prepare(model)
    assert any(isinstance(m, LoraLayer) for m in model.modules())  # upstream peft layers, not ours
    assert method.params and all(("lora_A" in n) or ("lora_B" in n) for n in method.params)
    base_before = {n: p.clone() for n, p in model.named_parameters() if "lora_" not in n}
    scorer = Scorer(model, tok)
    batch = synthetic_examples(4)
    engine = ZOEngine(method, ZOSGD(), eps=1e-2, seed=0)
    for _ in range(2):
        engine.step(lambda: scorer.loss(batch), lr=1e-1)
    after = dict(model.named_parameters())
    assert all(torch.equal(base_before[n], after[n]) for n in base_before)
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in method.params.items() if "lora_B" in n)


def test_mezo_trains_all_base_weights_once_each(tiny_llama):
    model, _, _ = load_model(str(tiny_llama))
    method = get_method("mezo")(TrainConfig.make(method="mezo"))
    method.prepare(model)
    assert method.num_trainable() == sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    assert not any(p.requires_grad for p in model.parameters())


def test_restricted_candidate_logits_rank_and_loss_like_full_vocabulary_logits(tiny_llama):
    """Scoring only the verbalizer rows must not change the loss or the predictions."""
    import torch.nn.functional as F

    model, tok, _ = load_model(str(tiny_llama))
    scorer = Scorer(model, tok)
    batch = synthetic_examples(6, seed=3)
    fast = scorer.scores(batch)
    full = scorer._scores_multi(batch)  # full log-softmax at the answer position
    labels = torch.tensor([e.label for e in batch])
    assert torch.equal(fast.argmax(-1), full.argmax(-1))
    assert torch.allclose(F.cross_entropy(fast, labels), F.cross_entropy(full, labels), atol=1e-5)
    with torch.no_grad():  # and the full model's own logits agree
        enc = tok([e.prompt for e in batch], return_tensors="pt", padding=True)
        logits = model(**enc).logits
        last = enc.attention_mask.sum(1) - 1
        ids = [tok(c, add_special_tokens=False).input_ids[0] for c in batch[0].candidates]
        ref = logits[torch.arange(len(batch)), last][:, ids]
    assert torch.allclose(fast, ref, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_mezo_ln_trains_only_norm_gains_and_saves_a_standard_peft_adapter(tiny_models, arch, tmp_path):
    from zotune.methods.ln import final_norm_name

    model, tok, _ = load_model(str(tiny_models[arch]))
    n_norm = sum(p.numel() for n, m in model.named_modules() if "Norm" in type(m).__name__ for p in m.parameters())
    assert final_norm_name(model) == {"llama": "norm", "opt": "final_layer_norm", "gpt2": "ln_f"}[arch]
    default = get_method("mezo-ln")(TrainConfig.make(method="mezo-ln"))
    default.prepare(load_model(str(tiny_models[arch]))[0])
    assert all(final_norm_name(model) + ".ln_tuning_layers" in n for n in default.params)  # default: the final norm
    method = get_method("mezo-ln")(TrainConfig.make(method="mezo-ln", target_modules=["all"]))
    model = method.prepare(model)
    assert method.num_trainable() == n_norm and not any(method.decays(n) for n in method.params)
    scorer, batch = Scorer(model, tok), synthetic_examples(8)
    engine = ZOEngine(method, ZOSGD(), eps=1e-2, seed=0)
    for _ in range(3):
        engine.step(lambda: scorer.loss(batch), lr=0.5)
    method.save(model, tmp_path / "ln")
    ours = assert_peft_round_trip(model, tiny_models[arch], tmp_path / "ln")
    fresh, _, _ = load_model(str(tiny_models[arch]))
    with torch.no_grad():
        assert not torch.allclose(fresh(input_ids=PROBE_IDS).logits, ours)  # it trained
