"""Every registered method, through the same checks (as peft runs one tester over every tuner).

A new method file is covered here the moment it registers: nothing in this
module names a method except where a method's declared abilities say how it
must be checked (``replayable``, ``distributable``, ``needs_calibration``).
"""

from __future__ import annotations

import importlib
import pkgutil

import pytest
import torch

from conftest import PROBE_IDS, synthetic_examples
from zotune import ZOOptimizer
from zotune.calibration import calibration_batches
from zotune.cli import build_parser
from zotune.config import TrainConfig
from zotune.distributed import Cluster
from zotune.engine import QueryKey, ZOEngine
from zotune.errors import ZOError
from zotune.evaluate import Scorer
from zotune.methods import METHODS, Method
from zotune.models import load_model
from zotune.rundir import load_trained
from zotune.setup import build_engine

ALL = sorted(METHODS)
BATCH = synthetic_examples(8, seed=5)
LR = 1e-2  # big enough that a step visibly moves every method's tensors on the tiny model


def build(model_dir, name: str, **settings):
    """(model, scorer, engine) for ``name`` on a fresh tiny model, as zotune train would build it."""
    model, tok, _ = load_model(str(model_dir))
    cfg = TrainConfig.make(method=name, lora_r=2, seed=3, eps=1e-2, **settings).validate()
    calibration = (lambda: calibration_batches(BATCH, tok, 4, 0)) if METHODS[name].needs_calibration else None
    model, engine = build_engine(cfg, model, calibration=calibration)
    return model, Scorer(model, tok), engine


def trained_state(engine) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in engine.method.params.items()}


def loss_fn(scorer):
    return lambda: scorer.loss_tensor(BATCH)


def test_every_method_file_registers_a_method_under_its_own_name():
    """Each module of zotune.methods (but the protocol itself) defines a registered Method subclass,
    registered under the class's own ``name``; registration is the only way into METHODS."""
    import zotune.methods as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name == "base":
            continue
        module = importlib.import_module(f"zotune.methods.{info.name}")
        own = [c for c in vars(module).values()
               if isinstance(c, type) and issubclass(c, Method) and c.__module__ == module.__name__ and c.name]
        assert own, f"methods/{info.name}.py defines no named Method"
        for cls in own:
            assert METHODS.get(cls.name) is cls, f"{cls.__name__} is not registered as {cls.name!r}"
    assert all(name == cls.name for name, cls in METHODS.items())


@pytest.mark.parametrize("name", ALL)
def test_its_options_are_flags_validated_before_any_model_loads(name):
    cls = METHODS[name]
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for flat in cls.options_cls.settings():
        assert "--" + flat.replace("_", "-") in help_text
    TrainConfig.make(method=name).validate()  # its defaults are valid
    other = next((f for m, c in METHODS.items() for f in c.options_cls.settings()
                  if c.options_cls is not cls.options_cls), None)
    if other:  # another method's option is refused by name, not silently ignored
        with pytest.raises(ZOError, match=f"setting {other} applies to"):
            TrainConfig.make(method=name, **{other: 3}).validate()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("difference,queries", [("central", 1), ("central", 2), ("forward", 2)])
def test_a_step_costs_the_forward_passes_its_method_declares(tiny_llama, name, difference, queries):
    """The engine counts Method.forward_cost; for a ZO step that is exactly the closure calls made."""
    _, scorer, engine = build(tiny_llama, name, difference=difference, queries=queries)
    calls = []
    closure = loss_fn(scorer)
    result = engine.step(lambda: calls.append(1) or closure(), LR)
    cost = METHODS[name].forward_cost(queries, difference)
    assert result.forward_passes == engine.forward_passes == cost
    if isinstance(engine, ZOEngine):
        assert len(calls) == cost
    else:  # first-order: one forward + one backward, charged as three forwards
        assert len(calls) == 1 and cost == 3


def zero_lr_steps(tiny_llama, name, **settings):
    """(before, after) of every weight over 3 lr-0 steps with weight decay, two queries and non-zero
    trainable values (LoRA's B starts at zero)."""
    model, scorer, engine = build(tiny_llama, name, weight_decay=0.1, queries=2, **settings)
    with torch.no_grad():
        for p in engine.method.params.values():
            p.add_(torch.randn_like(p), alpha=0.05)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(3):
        engine.step(loss_fn(scorer), 0.0)
    return before, {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ALL)
def test_a_zero_learning_rate_leaves_every_weight_bit_identical_with_a_snapshot_restore(tiny_llama, name):
    """``restore="snapshot"``: every method's lr-0 step is an exact no-op."""
    before, after = zero_lr_steps(tiny_llama, name, restore="snapshot")
    assert all(torch.equal(before[n].view(torch.uint8), after[n].view(torch.uint8)) for n in before)


@pytest.mark.parametrize("name", ALL)
def test_a_zero_learning_rate_with_the_default_restore_is_exact_or_drifts_by_ulps(tiny_llama, name):
    """``restore="auto"``: methods that snapshot (adapters) stay bit-identical; methods that regenerate
    (``restore_default = "regenerate"``: base weights) drift by a few float32 ulps per step (+eps z,
    -2eps z, +eps z round three times), far below one update (docs/methods.md)."""
    before, after = zero_lr_steps(tiny_llama, name)
    if METHODS[name].restore_default == "snapshot":
        assert all(torch.equal(before[n].view(torch.uint8), after[n].view(torch.uint8)) for n in before)
        return
    # 3 steps x 2 queries x 3 roundings of |w + eps z| <= |w| + 0.1: well within 1e-6 (measured: ~1e-8)
    drift = max((before[n] - after[n]).abs().max().item() for n in before)
    assert drift < 1e-6, drift


@pytest.mark.parametrize("name", ALL)
def test_a_step_moves_only_the_trainable_tensors(tiny_llama, name):
    model, scorer, engine = build(tiny_llama, name)
    trainable = {id(p) for p in engine.method.params.values()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(2):
        engine.step(loss_fn(scorer), LR)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed, "two steps at a real lr changed nothing"
    assert all(id(p) in trainable for n, p in model.named_parameters() if n in changed)


@pytest.mark.parametrize("name", ALL)
def test_replay_rebuilds_the_tensors_bit_for_bit_or_refuses_with_the_reason(tiny_llama, name):
    """A replayable method's trajectory of scalars (step, g, lr) rebuilds its trained tensors exactly;
    any other method refuses, naming why, instead of rebuilding something else."""
    _, scorer, engine = build(tiny_llama, name, optimizer="adam" if name != "lozo-m" else "sgd")
    rows = []
    for step in range(3):
        result = engine.step(loss_fn(scorer), LR)
        rows.append({"step": step, "g": result.grads, "lr": LR})
    _, _, fresh = build(tiny_llama, name, optimizer="adam" if name != "lozo-m" else "sgd")
    if not METHODS[name].replayable:
        assert METHODS[name].not_replayable
        with pytest.raises(ZOError, match="cannot be replayed"):
            fresh.replay(rows)
        return
    fresh.replay(rows)
    assert (fresh.step_count, fresh.forward_passes) == (engine.step_count, engine.forward_passes)
    ours, theirs = trained_state(engine), trained_state(fresh)
    assert all(torch.equal(ours[n].view(torch.uint8), theirs[n].view(torch.uint8)) for n in ours)


@pytest.mark.parametrize("name", ALL)
def test_directions_are_pure_functions_of_the_query_key(tiny_llama, name):
    _, scorer, engine = build(tiny_llama, name)
    if not isinstance(engine, ZOEngine):
        pytest.skip("first-order: no directions")
    engine.method.begin_step(QueryKey(3, 0, 0), loss_fn(scorer))  # AGZO computes its bases here
    for view_name, view in engine.method.views(0)[:3]:
        a = engine.method.direction(view_name, view, QueryKey(3, 0, 0))
        b = engine.method.direction(view_name, view.clone(), QueryKey(3, 0, 0))
        c = engine.method.direction(view_name, view, QueryKey(3, 0, 1))
        assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("name", ALL)
def test_the_saved_tensors_load_back_into_a_fresh_model_exactly(tiny_llama, name, tmp_path):
    model, scorer, engine = build(tiny_llama, name)
    engine.step(loss_fn(scorer), LR)
    engine.method.save(model, tmp_path / "saved")
    fresh_model, _, fresh = build(tiny_llama, name)
    load_trained(fresh_model, fresh.method, tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(model(input_ids=PROBE_IDS).logits, fresh_model(input_ids=PROBE_IDS).logits)
    if METHODS[name].is_adapter:  # a standard PEFT adapter folder
        assert (tmp_path / "saved" / "adapter_config.json").exists()


@pytest.mark.parametrize("name", ALL)
def test_distributed_runs_take_only_methods_that_declare_they_can(tiny_llama, name):
    _, _, engine = build(tiny_llama, name)
    cluster = Cluster(rank=0, world=2, parallel="query")  # wrap() installs hooks; no process group needed
    if METHODS[name].distributable:
        assert cluster.wrap(engine) is engine and list(engine.local_queries()) == [0]
    else:
        with pytest.raises(ZOError, match="cannot run on several ranks"):
            cluster.wrap(engine)


@pytest.mark.parametrize("name", ALL)
def test_the_optimizer_state_resumes_bit_identically(tiny_llama, name):
    """ZOOptimizer.state_dict() holds everything the next step depends on, for every method."""
    def optimizer():
        model, tok, _ = load_model(str(tiny_llama))
        calibration = calibration_batches(BATCH, tok, 4, 0) if METHODS[name].needs_calibration else None
        opt = ZOOptimizer(model, method=name, lr=LR, eps=1e-2, seed=3, lora_r=2, calibration=calibration)
        return opt, Scorer(opt.model, tok)

    opt, scorer = optimizer()
    for _ in range(2):
        opt.step(loss_fn(scorer))
    state = opt.state_dict()
    opt.step(loss_fn(scorer))
    resumed, resumed_scorer = optimizer()
    resumed.load_state_dict(state)
    resumed.step(loss_fn(resumed_scorer))
    ours, theirs = opt.method.params, resumed.method.params
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)
