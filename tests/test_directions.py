"""Rademacher directions for full-weight MeZO (``--mezo-direction rademacher``, issue 15).

A spec of the option and of the generator: the flag, the YAML key and their validation; the values
(+-1, zero mean); block seeding (chunking never changes z); every weight pass (the +-eps passes, the
restore, the fused update, replay) uses the same z; lr-0 steps, replay and resume are bit-exact; a
short run lowers the training loss; the Gaussian default is untouched.
"""

from __future__ import annotations

import pytest
import torch

from conftest import synthetic_examples
from zotune.cli import build_parser, config_from_args, main
from zotune.config import TrainConfig
from zotune.engine import (QueryKey, ZOEngine, add_direction_chunks_, direction_like, gaussian_chunk, gaussian_like,
                           rademacher_chunk, tensor_seed)
from zotune.errors import ZOError
from zotune.evaluate import Scorer
from zotune.methods import get_method
from zotune.models import load_model
from zotune.optim import ZOSGD
from zotune.rounding import BLOCK

BATCH = synthetic_examples(8, seed=5)


def prepared(path, direction="rademacher", dtype=torch.float32):
    model, tok, _ = load_model(str(path))
    model = model.to(dtype)
    method = get_method("mezo")(TrainConfig.make(method="mezo", mezo_direction=direction))
    model = method.prepare(model)
    return model, Scorer(model, tok), method


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.uint8)


# -- the option --------------------------------------------------------------------------------

def test_the_direction_is_a_mezo_flag_and_yaml_key_validated_before_any_model_loads(tmp_path):
    parser = build_parser()
    assert "--mezo-direction" in parser._subparsers._group_actions[0].choices["train"].format_help()
    cfg = config_from_args(parser.parse_args(["train", "--method", "mezo", "--mezo-direction", "rademacher"]))
    assert cfg.options["mezo_direction"] == "rademacher"
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("method: mezo\nmezo_direction: rademacher\n")
    assert config_from_args(parser.parse_args(["train", "--config", str(yaml_file)])).options["mezo_direction"] \
        == "rademacher"
    assert TrainConfig.make(method="mezo").validate().options.get("mezo_direction", "gaussian") == "gaussian"
    with pytest.raises(ZOError, match="mezo_direction must be one of gaussian, rademacher, got 'uniform'"):
        TrainConfig.make(method="mezo", mezo_direction="uniform").validate()
    with pytest.raises(ZOError, match="setting mezo_direction applies to"):  # lozo draws its own directions
        TrainConfig.make(method="lozo", mezo_direction="rademacher").validate()


# -- the generator -----------------------------------------------------------------------------

def test_rademacher_values_are_plus_minus_one_with_zero_mean_and_no_correlation():
    n = 4 * BLOCK + 77
    z = rademacher_chunk(11, n, 0, n, "cpu")
    assert z.dtype == torch.float32 and set(z.unique().tolist()) == {-1.0, 1.0}
    assert abs(z.mean().item()) < 4 / n ** 0.5  # 4 standard errors of a mean of +-1
    assert abs((z[1:] * z[:-1]).mean().item()) < 4 / n ** 0.5  # neighbours (same byte's bits) uncorrelated
    other = rademacher_chunk(12, n, 0, n, "cpu")
    assert abs((z * other).mean().item()) < 4 / n ** 0.5  # different seeds: independent directions


def test_rademacher_chunks_are_block_seeded_and_do_not_depend_on_the_chunking():
    n, seed = 3 * BLOCK + 123, 42
    whole = rademacher_chunk(seed, n, 0, n, "cpu")
    pieces = torch.cat([rademacher_chunk(seed, n, a, min(n, a + BLOCK), "cpu") for a in range(0, n, BLOCK)])
    assert torch.equal(pieces, whole)
    assert torch.equal(rademacher_chunk(seed, n, 2 * BLOCK, n, "cpu"), whole[2 * BLOCK:])
    buf = torch.empty(BLOCK)
    assert torch.equal(rademacher_chunk(seed, n, BLOCK, 2 * BLOCK, "cpu", out=buf), whole[BLOCK:2 * BLOCK])
    # a longer tensor with the same seed shares the leading blocks: block k is a function of (seed, k) only
    assert torch.equal(rademacher_chunk(seed, n + BLOCK, 0, 3 * BLOCK, "cpu"), whole[:3 * BLOCK])
    w = torch.randn(n)
    a, b = w.clone(), w.clone()
    add_direction_chunks_(a, seed, 1e-3, distribution="rademacher")
    add_direction_chunks_(b, seed, 1e-3, chunk=4 * BLOCK, distribution="rademacher")
    assert torch.equal(a, b) and torch.equal(a, w + 1e-3 * whole)


def test_the_gaussian_default_is_unchanged():
    """Recorded runs replay: the default path still draws ``normal_`` block by block, as before."""
    n, seed = 2 * BLOCK + 5, 9
    gen = torch.Generator()
    from zotune.rounding import block_seed

    expected = torch.empty(n)
    for k in range(3):
        gen.manual_seed(block_seed(seed, k))
        expected[k * BLOCK:min(n, (k + 1) * BLOCK)].normal_(generator=gen)
    assert torch.equal(gaussian_chunk(seed, n, 0, n, "cpu"), expected)
    assert torch.equal(direction_like(torch.zeros(n), seed), expected)
    assert torch.equal(gaussian_like(torch.zeros(n), seed), expected)
    with pytest.raises(ZOError, match="unknown direction distribution 'cauchy'"):
        direction_like(torch.zeros(3), 1, "cauchy")


def test_every_weight_pass_of_a_rademacher_mezo_uses_the_rademacher_direction(tiny_llama):
    _, _, method = prepared(tiny_llama)
    name, v = next(iter(method.views(0)))
    key = QueryKey(7, 3, 1)
    z = method.direction(name, v, key)
    assert torch.equal(z, rademacher_chunk(tensor_seed(key, name), v.numel(), 0, v.numel(), "cpu").view(v.shape))
    w = v.clone()
    method.add_direction_(name, w, key, 0.5)
    assert torch.equal(w, v + 0.5 * z)
    # a step with ZO-SGD moves the weights by exactly -lr g z (up to the fp32 rounding of the passes)
    model, scorer, method = prepared(tiny_llama)
    before = {n: p.detach().clone() for n, p in method.params.items()}
    engine = ZOEngine(method, ZOSGD(), eps=1e-3, seed=2, restore="snapshot")
    r = engine.step(lambda: scorer.loss_tensor(BATCH), 1e-2)
    key = QueryKey(2, 0, 0)
    for n, p in method.params.items():
        expected = before[n] - 1e-2 * r.grads[0] * method.direction(n, p, key)
        assert torch.allclose(p, expected, rtol=0, atol=1e-6), n


# -- exactness: lr 0, replay, resume -----------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rademacher_lr0_steps_with_a_snapshot_restore_leave_every_weight_bit_identical(tiny_llama, dtype):
    _, scorer, method = prepared(tiny_llama, dtype=dtype)
    before = {n: p.detach().clone() for n, p in method.params.items()}
    engine = ZOEngine(method, ZOSGD(), eps=1e-3, queries=2, seed=4, restore="snapshot")
    for _ in range(3):
        engine.step(lambda: scorer.loss_tensor(BATCH), 0.0)
    assert all(torch.equal(bits(before[n]), bits(p)) for n, p in method.params.items())


@pytest.mark.parametrize("restore", ["snapshot", "regenerate"])
def test_rademacher_replay_rebuilds_the_weights_bit_for_bit(tiny_llama, restore):
    _, scorer, method = prepared(tiny_llama)
    engine = ZOEngine(method, ZOSGD(), eps=1e-3, seed=1, restore=restore)
    rows = []
    for step in range(4):
        r = engine.step(lambda: scorer.loss_tensor(BATCH), 1e-3)
        rows.append({"step": step, "g": r.grads, "lr": 1e-3})
    _, _, fresh = prepared(tiny_llama)
    ZOEngine(fresh, ZOSGD(), eps=1e-3, seed=1, restore=restore).replay(rows)
    assert all(torch.equal(bits(method.params[n]), bits(p)) for n, p in fresh.params.items())
    # and it is not the Gaussian run: the option reaches the weights
    _, _, gauss = prepared(tiny_llama, direction="gaussian")
    ZOEngine(gauss, ZOSGD(), eps=1e-3, seed=1, restore=restore).replay(rows)
    assert any(not torch.equal(method.params[n], p) for n, p in gauss.params.items())


def cli_args(tiny, out, steps, *extra):
    return ["train", "--model", str(tiny), "--task", "rotten-tomatoes", "--method", "mezo", "--steps", str(steps),
            "--train-size", "64", "--dev-size", "8", "--batch-size", "4", "--eval-every", "4", "--lr", "1e-3",
            "--eps", "1e-3", "--progress", "false", "--output-dir", str(out), "--mezo-direction", "rademacher",
            *extra]


@pytest.mark.parametrize("restore", ["snapshot", "regenerate"])
def test_cli_rademacher_run_replays_and_resumes_bit_identically(tiny_llama, tmp_path, capsys, restore):
    reference = tmp_path / "reference"
    assert main(cli_args(tiny_llama, reference, 6, "--restore", restore)) == 0
    assert "mezo_direction: rademacher" in (reference / "config.yaml").read_text()
    capsys.readouterr()
    assert main(["replay", str(reference)]) == 0
    assert '"bit_identical": true' in capsys.readouterr().out
    # resume: a run stopped after 3 steps and continued to 6 ends where the uninterrupted run ended
    part = tmp_path / "part"
    assert main(cli_args(tiny_llama, part, 3, "--restore", restore)) == 0
    assert main(["train", "--resume", str(part), "--steps", "6", "--progress", "false"]) == 0
    assert (reference / "trajectory.jsonl").read_text() == (part / "trajectory.jsonl").read_text()


def test_a_short_rademacher_run_lowers_the_training_loss(tiny_llama):
    train = synthetic_examples(32, seed=1)
    losses = {}
    for direction in ("rademacher", "gaussian"):
        torch.manual_seed(0)
        _, scorer, method = prepared(tiny_llama, direction=direction)
        engine = ZOEngine(method, ZOSGD(), eps=1e-3, seed=5)
        start = scorer.loss(train)
        for _ in range(40):
            engine.step(lambda: scorer.loss_tensor(train), 1e-2)
        losses[direction] = (start, scorer.loss(train))
    start, end = losses["rademacher"]
    assert end < start - 1e-3, losses
    g_start, g_end = losses["gaussian"]
    assert (start - end) > 0.25 * (g_start - g_end), losses  # same order as MeZO's Gaussian on the same run
