"""AR1-ZO: one rank-1 atom per layer per step, at a rank-invariant scale."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import assert_peft_round_trip, synthetic_examples
from zotune.config import TrainConfig
from zotune.engine import ZOEngine
from zotune.evaluate import Scorer
from zotune.methods import get_method
from zotune.models import load_model
from zotune.optim import ZOAdam, ZOSGD


def ar1(model_dir, **cfg):
    model, tok, _ = load_model(str(model_dir))
    method = get_method("ar1zo")(TrainConfig.make(method="ar1zo", **cfg))
    model = method.prepare(model)
    for n, p in method.params.items():  # non-zero B so both factors carry signal
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    return model, tok, method


def changed_atoms(before, method) -> dict[str, set[int]]:
    """Per LoRA factor, the atom indices whose entries changed (rows of A, columns of B)."""
    out = {}
    for n, p in method.params.items():
        diff = (p.data != before[n])
        atoms = diff.any(dim=1) if "lora_A" in n else diff.any(dim=0)
        out[n] = set(torch.nonzero(atoms).flatten().tolist())
    return out


@pytest.mark.parametrize("optimizer", [ZOSGD(), ZOAdam()])
def test_one_step_changes_exactly_one_atom_per_layer(tiny_llama, optimizer):
    model, tok, method = ar1(tiny_llama, lora_r=4, lora_alpha=2)
    scorer, batch = Scorer(model, tok), synthetic_examples(8)
    engine = ZOEngine(method, optimizer, eps=1e-2, seed=0)
    for step in range(6):
        before = {n: p.data.clone() for n, p in method.params.items()}
        engine.step(lambda: scorer.loss(batch), lr=1e-2)
        k = step % 4
        for name, atoms in changed_atoms(before, method).items():
            assert atoms == {k}, (step, name, atoms)


@pytest.mark.parametrize("r", [1, 2, 4, 16, 64])
def test_effective_scale_is_alpha_for_topology_and_alpha_over_r_for_canonical(tiny_llama, r):
    alpha = 2.0
    expected = {"topology": alpha, "canonical": alpha / r, "rslora": alpha / math.sqrt(r)}
    for scaling, scale in expected.items():
        model, _, method = ar1(tiny_llama, lora_r=r, lora_alpha=alpha, ar1_scaling=scaling)
        assert method.effective_scale(model) == pytest.approx(scale)


def test_cyclic_schedule_covers_every_atom_once_per_r_steps(tiny_llama):
    r = 8
    for per_layer in (False, True):
        _, _, method = ar1(tiny_llama, lora_r=r, ar1_per_layer=per_layer)
        for layer in range(len(method.layers)):
            for start in (0, r, 3 * r):
                assert sorted(method.atom(t, layer) for t in range(start, start + r)) == list(range(r))


def test_random_schedule_queries_one_atom_per_layer_and_varies(tiny_llama):
    _, _, method = ar1(tiny_llama, lora_r=8, ar1_schedule="random", ar1_per_layer=True)
    views = method.views(3)
    assert len(views) == 2 * len(method.layers)
    ks = {method.atom(t, 0) for t in range(40)}
    assert len(ks) > 3


def test_query_work_per_layer_is_d_out_plus_d_in(tiny_llama):
    _, _, method = ar1(tiny_llama, lora_r=16)
    queried = sum(v.numel() for _, v in method.views(0))
    assert queried == method.num_trainable() // 16  # one atom of sixteen, in every layer


def test_saved_adapter_is_standard_peft_with_lora_alpha_gamma(tiny_llama, tmp_path):
    import json

    model, tok, method = ar1(tiny_llama, lora_r=4, lora_alpha=2)
    method.save(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8  # gamma = alpha * r
    assert_peft_round_trip(model, tiny_llama, tmp_path / "adapter")


def test_ar1_lowers_the_loss_of_a_tiny_language_model(tiny_llama):
    model, tok, method = ar1(tiny_llama, lora_r=8, lora_alpha=1)
    scorer, train = Scorer(model, tok), synthetic_examples(64, seed=1)
    engine = ZOEngine(method, ZOSGD(), eps=1e-2, seed=0)
    start = scorer.loss(train)
    for step in range(300):  # one atom per step: coverage costs r steps
        batch = train[(step * 16) % 64 : (step * 16) % 64 + 16]
        engine.step(lambda: scorer.loss(batch), lr=1.0)
    assert scorer.loss(train) < 0.8 * start
