"""The ZO engine: exact restore, seeded directions, honest counting, real descent."""

from __future__ import annotations

import torch
from torch import nn

from conftest import synthetic_examples
from zotune.config import TrainConfig
from zotune.engine import QueryKey, ZOEngine, tensor_seed
from zotune.evaluate import Scorer
from zotune.methods import Method, get_method
from zotune.models import load_model
from zotune.optim import ZOAdam, ZOMomentum, ZOSGD


class ParamsMethod(Method):
    """A method over a plain dict of tensors (no transformers), for engine-level tests."""

    name = "test-params"

    def __init__(self, params: dict[str, torch.Tensor]):
        super().__init__(cfg=None)
        self.params = params


def snapshot(params) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in params.items()}


def bit_identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))  # compares bits, so -0.0 != 0.0


def prepared(method_name: str, model_dir, **cfg):
    model, tok, _ = load_model(str(model_dir))
    method = get_method(method_name)(TrainConfig.make(method=method_name, **cfg))
    model = method.prepare(model)
    return model, tok, method


def test_directions_depend_on_seed_step_query_and_name_only():
    key = QueryKey(seed=1, step=7, query=0)
    w = torch.zeros(4, 3)
    m1 = ParamsMethod({"a": torch.zeros(2), "w": w})
    m2 = ParamsMethod({"w": w.clone()})  # another trainable set, another order
    assert torch.equal(m1.direction("w", w, key), m2.direction("w", w, key))
    assert not torch.equal(m1.direction("w", w, key), m1.direction("w", w, QueryKey(1, 8, 0)))
    assert not torch.equal(m1.direction("w", w, key), m1.direction("w", w, QueryKey(1, 7, 1)))
    assert not torch.equal(m1.direction("w", w, key), m1.direction("w", w, QueryKey(2, 7, 0)))
    assert tensor_seed(key, "w") != tensor_seed(key, "v")
    torch.manual_seed(0)
    z = m1.direction("w", w, key)
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(z, m1.direction("w", w, key))


def test_slope_is_the_directional_derivative_and_queries_are_averaged():
    # f(x) = 0.5 |x - t|^2: central differences are exact for a quadratic.
    target = torch.randn(10, generator=torch.Generator().manual_seed(0))
    x = torch.zeros(10)
    method = ParamsMethod({"x": x})
    engine = ZOEngine(method, ZOSGD(), eps=1e-3, queries=4, seed=3)
    x0 = x.clone()
    result = engine.step(lambda: 0.5 * float(((x.double() - target.double()) ** 2).sum()), lr=0.1)
    grad = x0 - target
    expected = x0.clone()
    for key, g in zip(result.keys, result.grads):
        z = method.direction("x", x, key)
        assert abs(g - float(z @ grad)) < 1e-2 * (1 + abs(g))
        expected -= 0.1 * g * z / 4
    assert torch.allclose(x, expected, atol=1e-6)
    assert result.forward_passes == 8 and engine.forward_passes == 8


def test_forward_differences_cost_one_forward_per_query_plus_one_and_carry_an_eps_bias():
    # For f(x) = 0.5 |x - t|^2, (f(x + eps z) - f(x)) / eps = z.grad + eps |z|^2 / 2 exactly.
    target = torch.randn(10, generator=torch.Generator().manual_seed(0))
    x = torch.zeros(10)
    method = ParamsMethod({"x": x})
    engine = ZOEngine(method, ZOSGD(), eps=1e-3, queries=3, seed=3, difference="forward")
    calls = []
    loss = lambda: calls.append(1) or 0.5 * float(((x.double() - target.double()) ** 2).sum())
    x0 = x.clone()
    result = engine.step(loss, lr=0.0)
    for key, g in zip(result.keys, result.grads):
        z = method.direction("x", x, key).double()
        exact = float(z @ (x0.double() - target.double())) + 1e-3 * float(z @ z) / 2
        assert abs(g - exact) < 1e-2 * (1 + abs(g))
    assert len(calls) == 4 and result.forward_passes == 4 and engine.forward_passes == 4
    assert bit_identical(x, x0)  # lr 0: restored exactly, as with central differences
    assert result.loss == loss()  # the step's loss is L(theta) itself


def test_forward_differences_descend_and_the_budget_counts_them():
    from zotune.bench import forwards_per_step

    target = torch.randn(20, generator=torch.Generator().manual_seed(1))
    x = torch.zeros(20)
    engine = ZOEngine(ParamsMethod({"x": x}), ZOSGD(), eps=1e-3, queries=2, seed=0, difference="forward")
    loss = lambda: 0.5 * float(((x - target) ** 2).sum())
    start = loss()
    for _ in range(150):
        engine.step(loss, lr=0.02)
    assert loss() < 0.2 * start
    assert forwards_per_step(TrainConfig.make(method="mezo-lora", queries=4, difference="forward")) == 5
    assert forwards_per_step(TrainConfig.make(method="mezo-lora", queries=4)) == 8


def test_zo_sgd_lowers_a_quadratic_loss():
    target = torch.randn(20, generator=torch.Generator().manual_seed(1))
    x = torch.zeros(20)
    engine = ZOEngine(ParamsMethod({"x": x}), ZOSGD(), eps=1e-3, seed=0)
    loss = lambda: 0.5 * float(((x - target) ** 2).sum())
    start = loss()
    for _ in range(300):
        engine.step(loss, lr=0.02)
    assert loss() < 0.2 * start


def test_zo_sgd_lowers_the_loss_of_a_tiny_language_model(tiny_llama):
    """A real learning signal: MeZO on a random tiny Llama learns a synthetic sentiment rule."""
    model, tok, method = prepared("mezo", tiny_llama)
    scorer = Scorer(model, tok)
    train = synthetic_examples(64, seed=1)
    # Seed 3: with the block-seeded Gaussian directions, seeds 1-5 reach 0.30-0.49 after 150 steps and
    # seed 0 does not descend at this lr (0.77, also with restore="snapshot": 0.58); seed 3 measured 0.409.
    engine = ZOEngine(method, ZOSGD(), eps=1e-3, seed=3)
    start = scorer.loss(train)
    for step in range(150):
        batch = train[(step * 16) % 64 : (step * 16) % 64 + 16]
        engine.step(lambda: scorer.loss(batch), lr=3e-3)
    assert scorer.loss(train) < 0.7 * start  # measured: 0.704 -> 0.409


def test_momentum_and_adam_state_lives_in_the_trainable_space(tiny_llama):
    model, tok, method = prepared("mezo-lora", tiny_llama, lora_r=2)
    scorer = Scorer(model, tok)
    batch = synthetic_examples(4)
    n_model = sum(p.numel() for p in model.parameters())
    for opt in (ZOMomentum(), ZOAdam()):
        engine = ZOEngine(method, opt, eps=1e-2, seed=0)
        engine.step(lambda: scorer.loss(batch), lr=1e-3)
        state = opt.state_dict()
        buffers = [t for group in state.values() if isinstance(group, dict) for t in group.values()
                   if isinstance(t, torch.Tensor)]
        assert sum(t.numel() for t in buffers) in (method.num_trainable(), 2 * method.num_trainable())
        assert method.num_trainable() < n_model / 4


def test_adam_moves_every_coordinate_of_a_small_problem():
    x = torch.zeros(5)
    engine = ZOEngine(ParamsMethod({"x": x}), ZOAdam(), eps=1e-3, queries=2, seed=0)
    engine.step(lambda: float(x.sum()), lr=0.01)
    assert torch.all(x.abs() > 0)
    assert torch.allclose(x.abs(), torch.full((5,), 0.01), rtol=1e-3)  # Adam's first step is lr * sign


def test_weight_decay_skips_biases_and_norms():
    method = ParamsMethod({})
    assert method.decays("model.layers.0.self_attn.q_proj.weight")
    assert not method.decays("model.layers.0.input_layernorm.weight")
    assert not method.decays("model.norm.weight")
    assert not method.decays("decoder.layers.0.fc1.bias")


def test_non_finite_loss_is_reported_with_its_step():
    x = torch.zeros(3)
    engine = ZOEngine(ParamsMethod({"x": x}), ZOSGD(), eps=1e-3)
    try:
        engine.step(lambda: float("nan"), lr=0.1)
    except FloatingPointError as exc:
        assert "step 0" in str(exc)
    else:
        raise AssertionError("a NaN loss must stop the step")
    assert torch.equal(x, torch.zeros(3))


def test_plain_torch_module_works():
    layer = nn.Linear(4, 1)
    params = {n: p.data for n, p in layer.named_parameters()}
    x, y = torch.randn(32, 4, generator=torch.Generator().manual_seed(0)), torch.randn(32, 1)
    engine = ZOEngine(ParamsMethod(params), ZOSGD(), eps=1e-3, seed=1)
    with torch.no_grad():
        loss = lambda: float(((layer(x) - y) ** 2).mean())
        start = loss()
        for _ in range(200):
            engine.step(loss, lr=0.05)
        assert loss() < start
