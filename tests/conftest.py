"""Shared fixtures: tiny random-initialised models with a word-level tokenizer.

Tiny models test architecture coverage and mechanics fast; they make no claim
of quality. The few tests that need a real model use SmolLM2-135M.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

import pytest
import torch

from zotune.tasks import Example

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

POSITIVE = "good fine nice superb lovely brilliant charming".split()
NEGATIVE = "bad awful dull boring poor clumsy tedious".split()
FILLER = "the movie film plot actors story was is and a it".split()
VOCAB = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "[MASK]", "[CLS]", "[SEP]", "It", "was", "great", "terrible",
         *POSITIVE, *NEGATIVE, *FILLER]


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   bos_token="[BOS]", eos_token="[EOS]", mask_token="[MASK]",
                                   cls_token="[CLS]", sep_token="[SEP]")


def tiny_config(arch: str):
    from transformers import BertConfig, GPT2Config, LlamaConfig, OPTConfig, Qwen3Config

    v = len(VOCAB)
    common = dict(vocab_size=v, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    if arch == "llama":
        return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
                           architectures=["LlamaForCausalLM"], **common)
    if arch == "qwen3":
        return Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                           architectures=["Qwen3ForCausalLM"], **common)
    if arch == "opt":
        return OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                         word_embed_proj_dim=32, max_position_embeddings=128, architectures=["OPTForCausalLM"],
                         **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, architectures=["GPT2LMHeadModel"],
                          **common)
    if arch == "bert":
        return BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          max_position_embeddings=128, architectures=["BertModel"], vocab_size=v, pad_token_id=0)
    raise ValueError(arch)


def build_tiny(arch: str, path: Path, seed: int = 0) -> Path:
    from transformers import AutoModel, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(arch)
    cls = AutoModel if arch == "bert" else AutoModelForCausalLM
    model = cls.from_config(cfg)
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {a: build_tiny(a, root / a) for a in ("llama", "qwen3", "opt", "gpt2", "bert")}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]


def synthetic_examples(n: int, seed: int = 0) -> list[Example]:
    """A learnable sentiment-like task: the label is which word list the text draws from."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.randrange(2)
        words = rng.sample(FILLER, 3) + rng.sample(POSITIVE if label else NEGATIVE, 2)
        rng.shuffle(words)
        out.append(Example(" ".join(words) + " It was", (" terrible", " great"), label))
    return out


PROBE_IDS = torch.tensor([[2, 7, 8, 11, 12, 9]])


def second_forward_spoilt(loss: Callable[[], object], spoil: Exception | float) -> Callable[[], object]:
    """``loss``, except that its second call -- a ZO step's forward at θ − εz, with the weights
    perturbed -- raises ``spoil`` (an exception) or returns it (a NaN): the two ways a step can
    die half-way, after which the weights must be back where they were."""
    calls = []

    def spoilt():
        calls.append(1)
        if len(calls) != 2:
            return loss()
        if isinstance(spoil, Exception):
            raise spoil
        return spoil

    return spoilt


def assert_peft_round_trip(model, base_dir: Path, adapter_dir: Path) -> torch.Tensor:
    """The adapter in ``adapter_dir`` loads with plain peft onto the base model, reproduces ``model``'s
    logits exactly, and merges (``merge_and_unload``) to the same logits; returns those logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    with torch.no_grad():
        ours = model(input_ids=PROBE_IDS).logits
        theirs = reloaded(input_ids=PROBE_IDS).logits
        merged = reloaded.merge_and_unload()(input_ids=PROBE_IDS).logits
    assert torch.equal(ours, theirs)
    assert torch.allclose(ours, merged, atol=1e-5)
    return ours


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch):
    """One thread: tiny models gain nothing from two, and OpenMP spin-waits on a busy 2-core machine.

    The global RNG (peft's LoRA init draws from it) is reseeded for every test,
    so no test's outcome depends on which tests ran before it.
    """
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(1)
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _cpu_without_native_bf16(request, monkeypatch):
    """`--dtype auto` picks bf16 on CPUs with avx512_bf16/AMX: tests pin the answer to "no", so a test's
    numbers do not depend on which CPU CI draws. Tests of that choice mark themselves ``native_bf16``."""
    if "native_bf16" not in request.keywords:
        import zotune.hardware

        monkeypatch.setattr(zotune.hardware, "cpu_has_native_bf16", lambda: False)
