"""ZO-Act: the activation basis, C as the only trainable tensor, exact resume, a standard adapter, an int8 base."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import zotune
from zotune.calibration import calibration_batches, collect_grams, token_batches
from zotune.cli import main
from zotune.errors import ZOError
from zotune.evaluate import Scorer
from zotune.models import load_model

from conftest import assert_peft_round_trip, make_tokenizer, synthetic_examples


class ToyLM(nn.Module):
    """Embedding -> one linear layer, the embedding table of rank exactly k (token 0, padding, is off-span)."""

    def __init__(self, vocab: int = 20, d: int = 16, k: int = 3, pad_scale: float = 0.0):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.span = torch.randn(k, d, generator=g)  # rows span the activations
        table = torch.randn(vocab, k, generator=g) @ self.span
        table[0] = pad_scale * torch.randn(d, generator=g)  # padding: a direction outside the span when scaled up
        self.emb = nn.Embedding.from_pretrained(table)
        self.lin = nn.Linear(d, 8)

    def forward(self, input_ids, attention_mask=None):
        return self.lin(self.emb(input_ids))


def batches_of(ids: list[list[int]]) -> list[dict]:
    """Right-padded batches of two sequences each (pad id 0)."""
    out = []
    for i in range(0, len(ids), 2):
        rows = ids[i:i + 2]
        width = max(map(len, rows))
        out.append({"input_ids": torch.tensor([r + [0] * (width - len(r)) for r in rows]),
                    "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])})
    return out


SEQS = [[1, 5, 7, 2], [3, 4], [9, 11, 12, 13, 14, 19], [6], [8, 10, 15], [16, 17, 18, 2, 3]]


def test_basis_is_orthonormal_and_spans_exactly_low_rank_activations():
    from zotune.calibration import activation_bases

    toy = ToyLM(k=3)
    bases, report = activation_bases(toy, {"lin": toy.lin}, batches_of(SEQS), k=3)
    u = bases["lin"].double()
    assert u.shape == (16, 3)
    assert torch.allclose(u.T @ u, torch.eye(3, dtype=torch.float64), atol=1e-6)
    span = toy.span.double()  # the true row space: its projection onto span(U) loses nothing
    assert torch.allclose(span @ u @ u.T, span, atol=1e-5)
    assert abs(report.energy["lin"] - 1.0) < 1e-6
    assert report.tokens == sum(map(len, SEQS)) and report.examples == len(SEQS)


def test_padding_tokens_do_not_enter_the_gram():
    toy = ToyLM(k=3, pad_scale=100.0)  # a huge off-span padding vector: any leak would dominate XᵀX
    padded = collect_grams(toy, {"lin": toy.lin}, batches_of(SEQS))["lin"]
    alone = collect_grams(toy, {"lin": toy.lin}, [{"input_ids": torch.tensor([s]),
                                                  "attention_mask": torch.ones(1, len(s), dtype=torch.long)}
                                                 for s in SEQS])["lin"]
    x = torch.cat([toy.emb(torch.tensor(s)) for s in SEQS]).double()
    assert padded.tokens == alone.tokens == x.shape[0]
    assert torch.allclose(padded.xtx, x.T @ x, rtol=1e-10, atol=1e-9)
    assert torch.allclose(padded.xtx, alone.xtx, rtol=1e-10, atol=1e-9)
    assert torch.linalg.matrix_rank(padded.xtx).item() == 3  # padding would have made it 4


def test_calibration_batches_are_seeded_and_right_padded():
    tok = make_tokenizer()
    train = synthetic_examples(50)
    a = calibration_batches(train, tok, n=10, seed=3, batch_size=4)
    b = calibration_batches(train, tok, n=10, seed=3, batch_size=4)
    assert [x["input_ids"].shape[0] for x in a] == [4, 4, 2]
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    first = token_batches(tok, ["good It was", "the movie was bad It was"])[0]
    assert first["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6]
    assert first["input_ids"][0, 3:].tolist() == [tok.pad_token_id] * 3


def zoact_optimizer(tiny, quantize="none", seed=0, calibration_seed=0, **kw):
    model, tok, _ = load_model(str(tiny))
    calib = calibration_batches(synthetic_examples(64, seed=calibration_seed), tok, n=32, seed=0, batch_size=8)
    settings = dict(optimizer="adam", lr=1e-2, eps=1e-2, queries=2, zoact_rank=4, seed=seed, progress=False)
    settings.update(kw)
    opt = zotune.ZOOptimizer(model, method="zoact", calibration=calib, quantize=quantize, **settings)
    return opt, Scorer(opt.model, tok)


def train_steps(opt, scorer, steps, data=None):
    data = data or synthetic_examples(64)
    for s in range(opt.step_count, opt.step_count + steps):
        batch = data[(s * 16) % len(data):][:16]
        opt.step(lambda: scorer.loss(batch))


def test_only_C_changes_and_U_is_the_activation_basis(tiny_llama):
    opt, scorer = zoact_optimizer(tiny_llama)
    before = {n: t.clone() for n, t in opt.model.state_dict().items()}
    trainable = set(opt.method.params)
    assert trainable and all("lora_B" in n for n in trainable)
    assert all(not p.any() for p in opt.method.params.values())  # C starts at zero: the model is the base model
    assert opt.num_trainable() == 2 * (32 * 4 + 16 * 4)  # two layers of q_proj (d_out 32) and v_proj (d_out 16)
    train_steps(opt, scorer, 5)
    after = opt.model.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == {n for n in before if "lora_B" in n}
    for name, a in opt.method.lora_A.items():  # A = Uᵀ, bit-identical to the calibrated basis
        assert torch.equal(a, opt.method.calibration[name].T)


def test_adam_state_round_trips_and_the_resumed_optimizer_continues_identically(tiny_llama):
    ref, ref_scorer = zoact_optimizer(tiny_llama)
    train_steps(ref, ref_scorer, 6)

    first, scorer = zoact_optimizer(tiny_llama)
    train_steps(first, scorer, 3)
    state = first.state_dict()
    assert set(state["optimizer"]["m"]) == set(first.method.params)  # Adam's moments live in C's space
    # Built with different calibration data: the saved basis must win.
    resumed, scorer2 = zoact_optimizer(tiny_llama, calibration_seed=7)
    assert not all(torch.equal(resumed.method.calibration[n], first.method.calibration[n])
                   for n in first.method.calibration)
    resumed.load_state_dict(state)
    train_steps(resumed, scorer2, 3)
    a, b = ref.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)


def cli_args(tiny, out, steps, *extra):
    return ["train", "--model", str(tiny), "--task", "rotten-tomatoes", "--method", "zoact", "--optimizer", "adam",
            "--lr", "1e-2", "--queries", "2", "--zoact-rank", "4", "--calib-examples", "16", "--steps", str(steps),
            "--train-size", "48", "--dev-size", "8", "--batch-size", "4", "--progress", "false",
            "--output-dir", str(out), *extra]


def test_cli_resume_and_replay_of_a_zoact_adam_run_are_bit_identical(tiny_llama, tmp_path, capsys):
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(cli_args(tiny_llama, full, 6)) == 0
    assert main(cli_args(tiny_llama, part, 3)) == 0
    assert main(["train", "--resume", str(part), "--steps", "6", "--progress", "false"]) == 0
    a, b = load_file(full / "adapter" / "adapter_model.safetensors"), load_file(part / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (full / "trajectory.jsonl").read_text() == (part / "trajectory.jsonl").read_text()
    basis = load_file(full / "calibration.safetensors")
    assert len(basis) == 4 and all(u.shape == (32, 4) for u in basis.values())
    capsys.readouterr()
    assert main(["replay", str(full)]) == 0
    assert '"bit_identical": true' in capsys.readouterr().out
    (full / "calibration.safetensors").unlink()  # replay recalibrates from the run's seeded examples
    assert main(["replay", str(full), "--out", str(tmp_path / "again")]) == 0
    assert '"bit_identical": true' in capsys.readouterr().out


def test_saved_adapter_is_standard_peft_lora_and_merges(tiny_llama, tmp_path):
    opt, scorer = zoact_optimizer(tiny_llama)
    train_steps(opt, scorer, 4)
    opt.save(tmp_path / "adapter")
    import json
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 4 and not cfg["use_rslora"]  # scale 1: W + C·Uᵀ exactly
    assert_peft_round_trip(opt.model, tiny_llama, tmp_path / "adapter")


def test_calibration_is_required_and_settings_are_checked(tiny_llama):
    model, _, _ = load_model(str(tiny_llama))
    with pytest.raises(ZOError, match="needs calibration data"):
        zotune.ZOOptimizer(model, method="zoact")
    with pytest.raises(ZOError, match="zoact_rank"):
        zotune.ZOOptimizer(model, method="zoact", zoact_rank=0, calibration=[])
    with pytest.raises(ZOError, match="quantize"):
        zotune.ZOOptimizer(model, method="mezo", quantize="int8")


# -- a quantized frozen base (optional dependency torchao) -----------------------------------------------------

def test_int8_base_logits_are_close_to_fp32_and_training_lowers_the_loss(tiny_llama):
    pytest.importorskip("torchao")
    from peft.tuners.lora.torchao import TorchaoLoraLinear
    from zotune.quantize import model_bytes

    ids = torch.tensor([[2, 7, 8, 11, 12, 9, 20, 25]])
    fp32, _, _ = load_model(str(tiny_llama))
    with torch.no_grad():
        ref = fp32(input_ids=ids).logits
    opt, scorer = zoact_optimizer(tiny_llama, quantize="int8")
    wrapped = [m for m in opt.model.modules() if isinstance(m, TorchaoLoraLinear)]
    assert len(wrapped) == 4  # peft wrapped the int8 q_proj/v_proj with its torchao LoRA layer
    with torch.no_grad():
        q8 = opt.model(input_ids=ids).logits  # C = 0: the int8 base itself
    # Per-channel int8 rounds each weight by at most max|w_row|/254: about 0.5% relative error per layer for
    # Gaussian-like rows. Independent layers' errors add roughly in quadrature and the (tied) embeddings stay
    # fp32, so the logits move by ~0.5% (measured 0.45% here). 2% leaves 4x headroom and still fails for any
    # broken (de)quantization, whose errors are of the order of the logits themselves.
    assert ((q8 - ref).norm() / ref.norm()).item() < 0.02
    assert not torch.equal(q8, ref)  # it really is quantized
    assert model_bytes(opt.model) < 0.6 * model_bytes(fp32)
    data = synthetic_examples(64)
    before = scorer.loss(data)
    train_steps(opt, scorer, 30, data)
    assert scorer.loss(data) < before - 0.02


def test_an_int8_zoact_run_replays_bit_identically(tiny_llama, tmp_path, capsys):
    pytest.importorskip("torchao")
    run = tmp_path / "int8"
    assert main(cli_args(tiny_llama, run, 3, "--quantize", "int8")) == 0
    capsys.readouterr()
    assert main(["replay", str(run)]) == 0  # replay quantizes the base the same way before rebuilding C
    assert '"bit_identical": true' in capsys.readouterr().out
