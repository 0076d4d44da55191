"""The gradient-cosine diagnostic: cos(ZO estimate over n of a method's own directions, backprop gradient)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from zotune.bench import synthetic_task
from zotune.cli import main
from zotune.config import TrainConfig
from zotune.diagnostics.grad_cosine import CosineConfig, backprop_grad, gauss_ref, measure, write_outputs
from zotune.errors import ZOError
from zotune.evaluate import Scorer
from zotune.models import load_model
from zotune.setup import batch_indices, build_engine, load_data


@pytest.fixture(scope="module")
def data_settings(tmp_path_factory):
    return synthetic_task(tmp_path_factory.mktemp("cosdata"))


def settings(tiny_llama, data_settings) -> dict:
    return {"model": str(tiny_llama), **data_settings, "max_length": 32}


def test_gaussian_reference_is_the_chi_square_expectation():
    torch.manual_seed(0)
    for n, d in ((1, 448), (4, 448), (16, 100), (64, 448)):
        x = torch.distributions.Chi2(torch.tensor(float(n))).sample((200_000,))
        assert gauss_ref(n, d) == pytest.approx(float((x / (x + d - 1)).sqrt().mean()), rel=0.01)
    assert gauss_ref(1, 448) == pytest.approx(math.sqrt(2 / (math.pi * 448)), rel=0.01)  # E|N(0,1)| / sqrt(d)
    assert gauss_ref(4096, 448) == pytest.approx(math.sqrt(4096 / (4096 + 448)), rel=0.01)


def test_gaussian_directions_reach_the_known_cosine_and_it_grows_with_n(tiny_llama, data_settings):
    # MeZO-LoRA's directions are isotropic Gaussians over all of A and B: with a small eps in fp32 the slopes are
    # exact directional derivatives, so the mean cosine over groups must sit on E sqrt(X/(X+d-1)), X ~ chi2_n.
    cfg = CosineConfig(settings=settings(tiny_llama, data_settings), configs=("mezo-lora",), ranks=(2,),
                       ns=(1, 4, 16, 64), points=("init",), dtypes=("float32",), eps=1e-3, batch_size=8, seed=3)
    rows = sorted(measure(cfg, progress=False), key=lambda r: r["n"])
    assert [r["n"] for r in rows] == [1, 4, 16, 64]
    assert [r["groups"] for r in rows] == [64, 16, 4, 1]
    d = rows[0]["d_queried"]
    assert d == rows[0]["d_trainable"] == 2 * (2 * 32 + 32 * 2 + 2 * 32 + 16 * 2)  # q and v in 2 layers, r = 2
    for r in rows:
        assert r["gauss_ref"] == pytest.approx(gauss_ref(r["n"], d))
        assert r["cos"] == r["cos_full"] and r["cos_on"] == "all trainable tensors"
        spread = r["cos_sd"] / math.sqrt(r["groups"]) if r["groups"] > 1 else 0.2 * r["gauss_ref"]
        assert abs(r["cos"] - r["gauss_ref"]) < 4 * spread + 0.01, r
    cos = [r["cos"] for r in rows]
    assert cos == sorted(cos) and cos[-1] > 3 * cos[0]


def test_it_runs_on_the_threads_its_settings_name(tiny_llama, data_settings):
    # The regime study runs one process a core and computes its diagnostics in the same process; with torch's
    # default of every core, the diagnostic's second thread fought the other process's and ran 10x slower.
    cfg = CosineConfig(settings={**settings(tiny_llama, data_settings), "threads": 1}, configs=("mezo-lora",),
                       ranks=(2,), ns=(1,), points=("init",), dtypes=("float32",), batch_size=4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert measure(cfg, progress=False)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_backprop_gradient_matches_a_finite_difference_on_one_coordinate(tiny_llama, data_settings):
    tc = TrainConfig.make(**settings(tiny_llama, data_settings), method="mezo-lora", lora_r=2, batch_size=8)
    data = load_data(tc)
    batch = [data.train[i] for i in batch_indices(len(data.train), 8, 0, 0)]
    model, tok, _ = load_model(tc.model)
    model, engine = build_engine(tc, model)
    method = engine.method
    scorer = Scorer(model, tok, 32)
    grad = backprop_grad(method, scorer, batch)
    assert all(not p.requires_grad and p.grad is None for p in method.params.values())  # flags restored
    name = next(n for n in method.params if "lora_B" in n)  # at init B = 0: dL/dA = 0, dL/dB carries the signal
    assert all(float(grad[n].abs().max()) == 0 for n in method.params if "lora_A" in n)
    g = grad[name]
    i, j = divmod(int(g.abs().argmax()), g.shape[1])
    p, h = method.params[name], 2e-2  # fp32 loss rounding (~4e-8) over 2h stays below 1% of the slope
    with torch.no_grad():
        p[i, j] += h
        up = scorer.loss(batch)
        p[i, j] -= 2 * h
        down = scorer.loss(batch)
        p[i, j] += h
    assert (up - down) / (2 * h) == pytest.approx(float(g[i, j]), rel=1e-2)


def test_ar1_estimate_is_closer_to_the_gradient_on_its_atom_than_on_the_whole_adapter(tiny_llama, data_settings,
                                                                                     tmp_path):
    cfg = CosineConfig(settings=settings(tiny_llama, data_settings), configs=("ar1zo", "mezo-lora", "lozo"),
                       ranks=(4,), ns=(1, 4, 16), points=("init",), dtypes=("float32", "bfloat16"), batch_size=8)
    rows = measure(cfg, progress=False)
    ar1 = [r for r in rows if r["config"] == "ar1zo"]
    for r in ar1:
        assert r["d_queried"] < r["d_trainable"] and r["cos_on"].startswith("the queried coordinates")
        assert 0 < r["grad_share"] < 1  # B = 0: every column of B has a gradient, the atom holds one of four
        assert r["cos_full"] == pytest.approx(r["cos"] * r["grad_share"])
    top = [r for r in ar1 if r["n"] == 16]
    assert all(r["cos"] > r["cos_full"] > 0 for r in top)
    # bf16 rows carry the noise floor against fp32 on the same directions; lozo trains base weights: no bf16 row
    bf16 = [r for r in rows if r["dtype"] == "bfloat16"]
    assert {r["config"] for r in bf16} == {"ar1zo", "mezo-lora"}
    assert all(0 < r["noise"] < r["rms_g"] for r in bf16)
    assert all(math.isnan(r["noise"]) for r in rows if r["dtype"] == "float32")
    write_outputs(rows, tmp_path, "test")
    assert (tmp_path / "grad_cosine.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "grad_cosine.json").read_text())["rows"]
    assert len(saved) == len(rows) and (tmp_path / "grad_cosine.csv").stat().st_size > 0


def test_zoact_and_agzo_use_their_own_directions_and_the_warm_point_skips_methods_without_lora(tiny_llama,
                                                                                             data_settings):
    cfg = CosineConfig(settings={**settings(tiny_llama, data_settings), "calib_examples": 8},
                       configs=("zoact", "agzo"), ranks=(8,), ns=(1, 4), points=("init", "warm"),
                       dtypes=("float32",), batch_size=8)
    rows = measure(cfg, progress=False)
    assert {(r["config"], r["point"]) for r in rows} == {("zoact", "init"), ("zoact", "warm"), ("agzo", "init")}
    assert all(r["rank"] == 0 and math.isfinite(r["cos"]) for r in rows)


def test_zotune_diagnose_writes_json_csv_png_and_refuses_bad_input(tiny_llama, data_settings, tmp_path, capsys):
    task = tmp_path / "synthetic.yaml"  # the synthetic files as a YAML task (--task takes one)
    task.write_text(f"train: {data_settings['train_file']}\ndev: {data_settings['dev_file']}\n"
                    f"template: '{{text}} It was'\nverbalizer: '0=terrible,1=great'\n")
    out = tmp_path / "cos"
    assert main(["diagnose", "--model", str(tiny_llama), "--task", str(task), "--configs", "ar1zo", "--ranks", "2",
                 "--ns", "1,2", "--dtypes", "float32", "--batch-size", "4", "--max-length", "32",
                 "--out", str(out)]) == 0
    assert "written to" in capsys.readouterr().out
    for name in ("grad_cosine.json", "grad_cosine.csv", "grad_cosine.png"):
        assert (out / name).stat().st_size > 0
    assert main(["diagnose", "--configs", "nope", "--out", str(out)]) == 2
    assert "unknown configuration 'nope'" in capsys.readouterr().err
    with pytest.raises(ZOError, match="ns must be >= 1"):
        CosineConfig(ns=(0,)).validate()
    assert CosineConfig(dtypes=("fp32", "bf16")).validate().dtypes == ("float32", "bfloat16")  # as train --dtype
    with pytest.raises(ZOError, match="got 'fp16'"):
        CosineConfig(dtypes=("fp16",)).validate()
