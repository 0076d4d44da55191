"""Two baselines: AGZO (activation-subspace directions) and first-order LoRA (the quality/memory reference)."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_peft_round_trip, synthetic_examples
from zotune import ZOOptimizer
from zotune.cli import main
from zotune.config import TrainConfig
from zotune.engine import QueryKey
from zotune.errors import ZOError
from zotune.evaluate import Scorer
from zotune.methods.agzo import activation_basis
from zotune.models import load_model
from zotune.setup import build_engine


def engine_for(model_dir, method: str, **cfg):
    model, tok, _ = load_model(str(model_dir))
    model, engine = build_engine(TrainConfig.make(method=method, **cfg), model)
    return model, Scorer(model, tok), engine


class Counted:
    """A loss function that counts how often it is evaluated."""

    def __init__(self, scorer: Scorer, batch):
        self.scorer, self.batch, self.calls = scorer, batch, 0

    def __call__(self):
        self.calls += 1
        return self.scorer.loss_tensor(self.batch)


# -- AGZO: the activation basis A -------------------------------------------------------------
def test_activation_basis_is_orthonormal_and_spans_rank_k_inputs():
    """Inputs of rank k: A (d_in × k) has orthonormal columns and span(A) = the inputs' row space."""
    gen = torch.Generator().manual_seed(0)
    d_in, k, tokens = 48, 4, 200
    row_space = torch.linalg.qr(torch.randn(d_in, k, generator=gen)).Q
    x = (torch.randn(tokens, k, generator=gen) * torch.tensor([9.0, 5.0, 3.0, 2.0])) @ row_space.T
    a = activation_basis(x.reshape(10, 20, d_in), k, iters=2, seed=1)  # [batch, seq, d_in] like a hook sees
    assert a.shape == (d_in, k)
    assert torch.allclose(a.T @ a, torch.eye(k), atol=1e-5)
    assert torch.allclose(a @ a.T @ row_space, row_space, atol=1e-4)  # same subspace
    # with noise on top, the top-k directions are still found
    noisy = x + 0.01 * torch.randn(tokens, d_in, generator=gen)
    b = activation_basis(noisy, k, iters=3, seed=2)
    assert torch.linalg.matrix_norm(b @ b.T @ row_space - row_space) < 1e-2


def test_basis_comes_from_the_steps_own_batch_before_any_perturbation(tiny_llama):
    """A of a step = the top-k basis of the layer's real-token inputs at the unperturbed weights."""
    _, scorer, engine = engine_for(tiny_llama, "agzo", agzo_rank=4, agzo_power_iters=30)
    method = engine.method
    batch = synthetic_examples(6, seed=2)  # prompts of different lengths: padding must be left out
    name = next(n for n in method.params if "v_proj" in n)
    seen = []
    handle = method.layers[name].register_forward_hook(lambda m, i, o: seen.append(i[0].detach().clone()))
    with torch.no_grad():
        scorer.loss(batch)  # a plain forward at the current (unperturbed) weights
    handle.remove()
    lengths = [len(scorer._prompt_ids(e.prompt)) for e in batch]
    tokens = torch.cat([seen[0][i, :n] for i, n in enumerate(lengths)])
    engine.step(lambda: scorer.loss_tensor(batch), lr=0.0)
    a = method.bases[name]
    assert a.shape == (32, 4) and torch.allclose(a.T @ a, torch.eye(4), atol=1e-5)
    top = torch.linalg.svd(tokens, full_matrices=False).Vh[:4].T
    assert torch.allclose(a @ a.T, top @ top.T, atol=1e-3)


def test_basis_is_the_same_when_the_batch_is_scored_in_micro_batches(tiny_llama):
    """--micro-batch-size splits one loss into several forwards: A still spans the whole batch's inputs."""
    batch = synthetic_examples(6, seed=2)
    bases = []
    for micro in (0, 2):
        model, tok, _ = load_model(str(tiny_llama))
        model, engine = build_engine(TrainConfig.make(method="agzo", agzo_rank=4, agzo_power_iters=30), model)
        scorer = Scorer(model, tok, micro_batch_size=micro)
        engine.step(lambda: scorer.loss_tensor(batch), lr=0.0)
        bases.append({n: a @ a.T for n, a in engine.method.bases.items()})
    assert bases[0].keys() == bases[1].keys()
    for name in bases[0]:
        assert torch.allclose(bases[0][name], bases[1][name], atol=1e-3), name


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_agzo_direction_is_r_times_a_transpose_of_rank_at_most_k(tiny_models, arch):
    model, scorer, engine = engine_for(tiny_models[arch], "agzo", agzo_rank=3)
    method = engine.method
    assert set(method.params) == {n for n, _ in model.named_parameters()
                                  if n.endswith(("q_proj.weight", "v_proj.weight", "c_attn.weight"))}
    engine.step(lambda: scorer.loss_tensor(synthetic_examples(4)), lr=0.0)
    key = QueryKey(0, 0, 0)
    for name, w in method.params.items():
        z = method.direction(name, w, key)
        assert z.shape == w.shape
        assert int(torch.linalg.matrix_rank(z)) <= 3
        a = method.bases[name]
        rows = z.T if arch == "gpt2" else z  # Conv1D stores W as d_in × d_out
        assert torch.allclose(rows @ a @ a.T, rows, atol=1e-4)  # every row of z lies in span(A)
        assert torch.equal(z, method.direction(name, w, key))  # a pure function of (key, basis)


def test_agzo_counts_its_extra_unperturbed_forward(tiny_llama):
    batch = synthetic_examples(4)
    for difference, queries, per_step in [("central", 1, 3), ("central", 2, 5), ("forward", 1, 2), ("forward", 3, 4)]:
        _, scorer, engine = engine_for(tiny_llama, "agzo", difference=difference, queries=queries)
        loss = Counted(scorer, batch)
        for _ in range(2):
            result = engine.step(loss, lr=1e-2)
            assert result.forward_passes == per_step and len(result.grads) == queries
        assert loss.calls == engine.forward_passes == 2 * per_step, difference


AGZO_STEPS, AGZO_LR, AGZO_FACTOR = 90, 0.05, 0.9


def test_agzo_lowers_the_loss_of_a_tiny_language_model(tiny_llama):
    """Slow on this toy (like any ZO restricted to q/v weights: MeZO on them, i.e. k = d_in, is about as slow)."""
    _, scorer, engine = engine_for(tiny_llama, "agzo", eps=1e-3)
    train = synthetic_examples(64, seed=1)
    start = scorer.loss(train)
    for step in range(AGZO_STEPS):
        batch = train[(step * 16) % 64 : (step * 16) % 64 + 16]
        engine.step(lambda: scorer.loss_tensor(batch), lr=AGZO_LR)
    assert scorer.loss(train) < AGZO_FACTOR * start  # measured: 0.704 -> 0.618


def test_agzo_resumes_exactly_through_the_optimizer_state(tiny_llama):
    """No basis is saved: the next step recomputes A from its own batch at the restored weights."""
    batches = [synthetic_examples(8, seed=s) for s in range(3)]

    def run(opt, scorer, steps):
        for b in steps:
            opt.step(lambda: scorer.loss_tensor(batches[b]))

    def fresh():
        model, tok, _ = load_model(str(tiny_llama))
        opt = ZOOptimizer(model, "agzo", lr=0.05, eps=1e-3, optimizer="momentum")
        return opt, Scorer(opt.model, tok)

    ref, ref_scorer = fresh()
    run(ref, ref_scorer, [0, 1, 2])
    first, first_scorer = fresh()
    run(first, first_scorer, [0])
    state = first.state_dict()
    resumed, resumed_scorer = fresh()
    resumed.load_state_dict(state)
    run(resumed, resumed_scorer, [1, 2])
    assert resumed.forward_passes == ref.forward_passes == 9
    assert all(torch.equal(ref.method.params[n], p) for n, p in resumed.method.params.items())


# -- first-order LoRA -------------------------------------------------------------------------
def test_fo_lora_backprops_through_the_same_lora_as_mezo_lora_and_counts_three_per_step(tiny_llama):
    model, scorer, engine = engine_for(tiny_llama, "fo-lora")
    _, _, zo = engine_for(tiny_llama, "mezo-lora")
    assert {n: p.shape for n, p in engine.method.params.items()} == {n: p.shape for n, p in zo.method.params.items()}
    assert engine.method.params and all(p.requires_grad for p in engine.method.params.values())
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    loss = Counted(scorer, synthetic_examples(4))
    for _ in range(2):
        result = engine.step(loss, lr=1e-2)
        assert result.forward_passes == 3 and result.grads == []
    assert loss.calls == 2 and engine.forward_passes == 6  # one forward + backward = 3 forward-equivalents
    assert all(p.grad is None for p in engine.method.params.values())  # no gradient memory between steps
    with pytest.raises(ZOError, match="differentiable tensor"):
        engine.step(lambda: scorer.loss(synthetic_examples(4)), lr=1e-2)


def test_fo_lora_lowers_the_loss_and_saves_a_peft_adapter_that_reloads_identically(tiny_llama, tmp_path):
    model, scorer, engine = engine_for(tiny_llama, "fo-lora")
    train = synthetic_examples(64, seed=1)
    start = scorer.loss(train)
    for step in range(30):
        batch = train[(step * 16) % 64 : (step * 16) % 64 + 16]
        engine.step(lambda: scorer.loss_tensor(batch), lr=1e-2)
    assert scorer.loss(train) < 0.7 * start  # measured: 0.704 -> 0.39
    engine.method.save(model, tmp_path / "adapter")
    assert_peft_round_trip(model, tiny_llama, tmp_path / "adapter")


def test_fo_lora_optimizer_state_resumes_exactly(tiny_llama):
    batches = [synthetic_examples(8, seed=s) for s in range(3)]

    def fresh():
        model, tok, _ = load_model(str(tiny_llama))
        opt = ZOOptimizer(model, "fo-lora", lr=1e-2)
        return opt, Scorer(opt.model, tok)

    ref, rs = fresh()
    for b in batches:
        ref.step(lambda: rs.loss_tensor(b))
    first, fs = fresh()
    first.step(lambda: fs.loss_tensor(batches[0]))
    resumed, s = fresh()
    resumed.load_state_dict(first.state_dict())
    for b in batches[1:]:
        resumed.step(lambda: s.loss_tensor(b))
    assert all(torch.equal(ref.method.params[n], p) for n, p in resumed.method.params.items())


# -- both in the recipe -----------------------------------------------------------------------
@pytest.mark.parametrize("method,per_step", [("agzo", 3), ("fo-lora", 3)])
def test_train_runs_both_refuses_replay_and_says_what_a_resume_without_state_does(tiny_llama, tmp_path, capsys,
                                                                                  method, per_step):
    """A finished run keeps no state.pt (test_resume.py covers resuming from one), so extending it
    starts again from step 0, and says so."""
    out = tmp_path / method
    args = ["train", "--model", str(tiny_llama), "--task", "rotten-tomatoes", "--method", method, "--steps", "3",
            "--train-size", "16", "--dev-size", "8", "--batch-size", "4", "--lr", "1e-3", "--progress", "false",
            "--output-dir", str(out)]
    assert main(args) == 0
    assert f"forward passes    {3 * per_step} in 3 steps" in capsys.readouterr().out
    assert main(["train", "--resume", str(out), "--steps", "5", "--progress", "true"]) == 0
    captured = capsys.readouterr()
    assert "no state.pt was saved" in captured.err and f"forward passes    {5 * per_step} in 5 steps" in captured.out
    assert main(["replay", str(out)]) == 2
