"""An adapter loaded on request, as files: fetched from its source (`Fetcher`) and checked before the engine is asked
(`inspect`), every read within a budget. Blocking: `app.serving.adapters` runs both off the event loop.

What a check reads is bounded before it is read: the config's size, the safetensors header's length (its first 8
bytes say it), and the weights' size against what a LoRA of the adapter's rank can weigh for this base model (from
the base model's `config.json`, where it is on this machine). Every file must be a regular file that resolves inside
the adapter's own directories (a symlink to elsewhere is refused), and a safetensors file must be whole and exact: its
tensors cover its data with no hole, each as long as its dtype and shape say (github.com/huggingface/safetensors,
"Format"). Anything a check raises, whatever it is, is a refusal (`AdapterRefused`), never a crash.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from app.gateway.adapters import AdapterRefused, Refusal
from app.serving.models import ModelNotFound, ModelRegistry, json_object

logger = logging.getLogger(__name__)

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
ADAPTER_FILES = ("adapter_config.json", *WEIGHT_FILES)
# A PEFT adapter_config.json is a kilobyte or two.
MAX_CONFIG_BYTES = 64 * 1024
# A safetensors header lists each tensor in about 130 bytes: 1,120 for every linear layer of a 70B model (150 KB).
# 2 MiB holds 15,000, and parses in about 45 ms; the parser holds the interpreter meanwhile, so this is also the
# longest the event loop can wait on one check.
MAX_SAFETENSORS_HEADER_BYTES = 2 * 1024 * 1024
# Weights of an HF adapter whose base model's size is not known here: the largest adapters in use (rank 64 over every
# linear layer of a 405B model) are about 5 GB.
MAX_DOWNLOAD_BYTES = 8 * 1024**3
# The dtypes LoRA weights are stored in, and their sizes.
_FLOAT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
# The fields of a model's config.json that size its linear layers (LLaMA-type names and the MoE ones).
_WIDTHS = ("hidden_size", "intermediate_size", "moe_intermediate_size", "ffn_hidden_size", "n_embd")
_EXPERTS = ("num_local_experts", "n_routed_experts", "num_experts")


def _bad(reference: str, what: str, refusal: Refusal = Refusal.INVALID) -> AdapterRefused:
    return AdapterRefused(refusal, f"The adapter {reference[:200]!r} {what}")


def _inside(path: str, roots: Iterable[str]) -> bool:
    real = os.path.realpath(path)
    return any(os.path.commonpath([real, root]) == root for root in roots)


def inspect(path: str, reference: str, max_rank: int | None, roots: Iterable[str],
            base: Mapping[str, Any] | None = None) -> None:
    """Check an adapter's directory before the engine is asked: a PEFT LoRA config with a rank and target modules,
    its weights whole and within what its rank allows for the base model (`base`: its config.json, where known),
    every file inside `roots` (resolved), and a rank the engine reserved memory for. AdapterRefused says what is
    wrong (400); so does anything else a check raises."""
    try:
        _inspect(path, reference, max_rank, [os.path.realpath(r) for r in roots], base)
    except AdapterRefused:
        raise
    except RecursionError:
        raise _bad(reference, "has a JSON file nested too deeply to be a PEFT adapter's") from None
    except Exception as exc:  # (a hostile file must not take the load down with it)
        raise _bad(reference, f"could not be checked ({type(exc).__name__})") from None


def _inspect(path: str, reference: str, max_rank: int | None, roots: list[str], base: Mapping[str, Any] | None):
    config_path = _adapter_file(path, "adapter_config.json", reference, roots)
    if config_path is None:
        raise _bad(reference, "has no adapter_config.json: it is not a PEFT LoRA adapter directory")
    if os.path.getsize(config_path) > MAX_CONFIG_BYTES:
        raise _bad(reference, f"has an adapter_config.json over {MAX_CONFIG_BYTES // 1024} KiB")
    try:
        with open(config_path, encoding="utf-8") as file:
            config: Any = json.load(file)
    except (OSError, ValueError) as exc:
        raise _bad(reference, f"has an unreadable adapter_config.json ({type(exc).__name__})") from None
    if not isinstance(config, dict):
        raise _bad(reference, "has an adapter_config.json that is not a JSON object")
    rank, targets = config.get("r"), config.get("target_modules")
    if config.get("peft_type", "LORA") != "LORA":
        raise _bad(reference, f"is a {str(config.get('peft_type'))[:40]} adapter; only LoRA adapters are served")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1 or not targets:
        raise _bad(reference, "has an adapter_config.json without a rank (r) and target_modules")
    if max_rank is not None and rank > max_rank:
        raise _bad(reference, f"has rank {rank}, above this model's max_lora_rank {max_rank}: the engine reserved "
                   f"memory for ranks up to {max_rank} (raise lora.max_lora_rank and restart to serve it)",
                   Refusal.INCOMPATIBLE)
    weights = next((found for name in WEIGHT_FILES
                    if (found := _adapter_file(path, name, reference, roots)) is not None), None)
    if weights is None:
        raise _bad(reference, "has no weights (adapter_model.safetensors or adapter_model.bin)")
    bound = max_weight_bytes(base, rank) if base is not None else None
    size = os.path.getsize(weights)
    if bound is not None and size > bound + MAX_SAFETENSORS_HEADER_BYTES:
        raise _bad(reference, f"has {size} bytes of weights, more than a rank-{rank} LoRA of this model can have "
                   f"({bound})")
    if weights.endswith(".safetensors"):
        problem = safetensors_problem(weights, size)
        if problem is not None:
            raise _bad(reference, f"has corrupt weights: adapter_model.safetensors {problem}")


def _adapter_file(path: str, name: str, reference: str, roots: list[str]) -> str | None:
    """One of the adapter's files: None when absent; refused when it is not a regular file or leads outside."""
    candidate = os.path.join(path, name)
    if not os.path.lexists(candidate):
        return None
    if not _inside(candidate, roots):
        raise AdapterRefused(Refusal.PATH_NOT_ALLOWED, f"The adapter {reference[:200]!r} has a file ({name}) that "
                             "leads outside the adapter directories")
    if not os.path.isfile(candidate):
        raise _bad(reference, f"has a {name} that is not a regular file")
    return candidate


def safetensors_problem(path: str, size: int) -> str | None:
    """What is wrong with a safetensors file, or None: an 8-byte little-endian header length (within
    MAX_SAFETENSORS_HEADER_BYTES), a JSON header, and tensors that cover the data exactly, each as long as its dtype
    and shape say."""
    with open(path, "rb") as file:
        length = int.from_bytes(file.read(8), "little")
        if length < 2 or 8 + length > size:
            return "is not a whole safetensors file"
        if length > MAX_SAFETENSORS_HEADER_BYTES:
            return f"has a header of {length} bytes (at most {MAX_SAFETENSORS_HEADER_BYTES} are read)"
        header = json.loads(file.read(length))
    if not isinstance(header, dict):
        return "has a header that is not a JSON object"
    spans = []
    for name, tensor in header.items():
        if name == "__metadata__":
            continue
        problem = _tensor_problem(tensor)
        if problem is not None:
            return f"has a tensor {str(name)[:80]!r} {problem}"
        spans.append(tuple(tensor["data_offsets"]))
    end = 0
    for begin, stop in sorted(spans):
        if begin != end:
            return "has bytes no tensor holds, or tensors that overlap"
        end = stop
    if end != size - 8 - length:
        return "is not as long as its tensors (cut short, or with bytes no tensor holds)"
    return None


def _tensor_problem(tensor: object) -> str | None:
    if not isinstance(tensor, dict):
        return "that is not described"
    dtype, shape, offsets = tensor.get("dtype"), tensor.get("shape"), tensor.get("data_offsets")
    if dtype not in _FLOAT_BYTES:
        return f"of dtype {str(dtype)[:20]!r} (LoRA weights are floats: {', '.join(_FLOAT_BYTES)})"
    if not (isinstance(shape, list) and len(shape) <= 4 and all(_count(d) for d in shape)):
        return "without a shape"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_count(o) for o in offsets)):
        return "without its offsets"
    if offsets[1] - offsets[0] != math.prod(shape) * _FLOAT_BYTES[dtype]:
        return "whose bytes do not match its shape"
    return None


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def max_weight_bytes(base: Mapping[str, Any], rank: int) -> int | None:
    """The most a LoRA of `rank` can weigh for a model with this config.json: every linear layer of every block (and
    of every expert) adapted, stored as F32, plus whole embedding and output layers (an adapter may save them). None
    when the config does not say the model's size."""
    text = base.get("text_config") if isinstance(base.get("text_config"), dict) else base
    layers = text.get("num_hidden_layers") or text.get("n_layer")
    widths = [w for key in _WIDTHS if _count(w := text.get(key)) and w]
    heads, head_dim = text.get("num_attention_heads"), text.get("head_dim")
    if _count(heads) and _count(head_dim) and heads and head_dim:
        widths.append(heads * head_dim)
    if not (_count(layers) and layers and widths):
        return None
    widest = max(widths)
    experts = max([e for key in _EXPERTS if _count(e := text.get(key))] + [1])
    vocab = text.get("vocab_size") if _count(text.get("vocab_size")) else 0
    # a block has at most 8 linear layers (q, k, v, o, gate, up, down, and a fused one); each LoRA pair is
    # rank x (in + out) values, in and out at most the widest width
    per_block = 8 * rank * 2 * widest * (1 + experts)
    return max(_FLOAT_BYTES.values()) * (layers * per_block + 2 * vocab * widest)


def base_config(model_path: str) -> dict[str, Any] | None:
    """The base model's config.json, where it is on this machine: its directory, or the HF cache for a repo name
    (SGLang has downloaded it by the time an adapter is asked for); None when neither holds it."""
    path = os.path.join(model_path, "config.json") if os.path.isdir(model_path) else _hf_cached(model_path)
    return json_object(Path(path), MAX_CONFIG_BYTES * 16) if path is not None else None


def _hf_cached(repo: str) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(repo, "config.json")
    except Exception:  # (a name that is no repo id: nothing cached)
        return None
    return found if isinstance(found, str) else None


class AdapterHub(Protocol):
    """The HF Hub as adapters on request use it (`HuggingFaceHub`; tests pass a recording stand-in). Each call raises
    AdapterRefused saying why it failed."""

    def files(self, repo: str, token: str | None) -> dict[str, int]:
        """The repo's files and their sizes in bytes."""
        ...

    def download(self, repo: str, names: list[str], token: str | None) -> str:
        """Those files into the HF cache; the directory holding them."""
        ...


class HuggingFaceHub:
    """`huggingface_hub` (installed with SGLang): a repo's file list with sizes, then only the files asked for."""

    def files(self, repo: str, token: str | None) -> dict[str, int]:
        with _hub_errors(repo) as hub:
            info = hub.HfApi().model_info(repo, files_metadata=True, token=token)
            return {sibling.rfilename: sibling.size or 0 for sibling in info.siblings or ()}

    def download(self, repo: str, names: list[str], token: str | None) -> str:
        with _hub_errors(repo) as hub:
            return hub.snapshot_download(repo, allow_patterns=names, token=token)


@contextlib.contextmanager
def _hub_errors(repo: str) -> Iterator[Any]:
    """`huggingface_hub`, its failures said as refusals."""
    try:
        import huggingface_hub
        from huggingface_hub import errors
    except ImportError:  # (the engine install has it: SGLang needs it)
        raise AdapterRefused(Refusal.DOWNLOAD_FAILED, "huggingface_hub is not installed here") from None
    try:
        yield huggingface_hub
    except errors.GatedRepoError:
        raise AdapterRefused(Refusal.NOT_PERMITTED,
                             f"The HuggingFace repo {repo} is gated: general.hf_token needs access to it") from None
    except errors.RepositoryNotFoundError:
        raise AdapterRefused(Refusal.NOT_FOUND, f"The HuggingFace repo {repo} was not found (or is private: set "
                             "general.hf_token)") from None
    except (errors.HfHubHTTPError, errors.LocalEntryNotFoundError, OSError, ValueError) as exc:
        raise AdapterRefused(Refusal.DOWNLOAD_FAILED,
                             f"The HuggingFace repo {repo} could not be downloaded ({type(exc).__name__})") from None


@dataclass(frozen=True)
class Fetched:
    """An adapter on this machine: its directory, and the directory its files must resolve into (the registry's copy,
    or the repo's folder of the HF cache, where a snapshot's files are links to its blobs)."""

    path: str
    root: str


class Fetcher:
    """Adapter sources to local directories, the way configured adapters are fetched: ClearML Model IDs through the
    model registry (the SDK logs its download), HF repos into the HF cache with the deployment's token, their adapter
    files only and within a size. Blocking: `OnRequestAdapters` runs it in a thread."""

    def __init__(self, registry: ModelRegistry | None, hf_token: str = "", hub: AdapterHub | None = None):
        self.registry = registry
        self._hf_token = hf_token
        self.hub = hub if hub is not None else HuggingFaceHub()

    def __call__(self, kind: str, location: str, max_bytes: int | None = None) -> Fetched:
        """`kind` clearml or hf (a local adapter is where it is); `max_bytes`: the most its weights may weigh."""
        started = time.monotonic()
        if kind == "clearml":
            root = path = self._clearml(location)
        else:
            path = self._hf(location, max_bytes or MAX_DOWNLOAD_BYTES)
            parent = os.path.dirname(path)
            root = os.path.dirname(parent) if os.path.basename(parent) == "snapshots" else path
        logger.info("Fetched adapter %s in %.1f s", location, time.monotonic() - started)
        return Fetched(adapter_root(path), root)

    def _clearml(self, model_id: str) -> str:
        if self.registry is None:
            raise AdapterRefused(Refusal.DOWNLOAD_FAILED, "ClearML models cannot be fetched here")
        try:
            return self.registry.get_local_copy(model_id)
        except ModelNotFound as exc:
            raise AdapterRefused(Refusal.NOT_FOUND, f"ClearML model {model_id} was not found ({exc})") from None
        except OSError as exc:  # (the cause names storage the client need not see: it goes to the console)
            logger.warning("ClearML model %s could not be downloaded: %s", model_id, exc.strerror or exc)
            raise AdapterRefused(Refusal.DOWNLOAD_FAILED, f"ClearML model {model_id} could not be downloaded; the "
                                 "deployment's console says why") from None

    def _hf(self, repo: str, max_bytes: int) -> str:
        logger.info("Fetching adapter %s from HuggingFace", repo)
        token = self._hf_token or None
        files = self.hub.files(repo, token)
        weights = next((name for name in WEIGHT_FILES if name in files), None)
        if "adapter_config.json" not in files or weights is None:
            raise AdapterRefused(Refusal.INVALID, f"The HuggingFace repo {repo} holds no PEFT LoRA adapter "
                                 "(adapter_config.json and its weights at its top)")
        size = files[weights]
        if size > max_bytes + MAX_SAFETENSORS_HEADER_BYTES or files["adapter_config.json"] > MAX_CONFIG_BYTES:
            raise AdapterRefused(Refusal.INVALID, f"The HuggingFace repo {repo}'s adapter weighs {size} bytes, more "
                                 f"than an adapter of this model can ({max_bytes})")
        return self.hub.download(repo, ["adapter_config.json", weights], token)


def adapter_root(path: str) -> str:
    """The directory holding adapter_config.json: the path itself, or the one folder a registry's archive unpacked
    into."""
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "adapter_config.json")):
        inner = [e.path for e in os.scandir(path) if e.is_dir() and not e.name.startswith(".")]
        if len(inner) == 1 and os.path.isfile(os.path.join(inner[0], "adapter_config.json")):
            return inner[0]
    return path
