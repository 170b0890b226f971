"""A model's metadata, read where it is, never its weights: `config.json`, `tokenizer_config.json` and the safetensors
headers (each file's first bytes: an 8-byte length, then JSON naming every tensor's dtype and shape).

`read_local` reads a folder. `HubFiles` looks a HuggingFace name up: in the local cache first, then on the hub
(`huggingface_hub`, a short timeout), telling found, gated, not found and unreachable apart; it is the seam tests
replace. Nothing here decides what is wrong: `app.preflight.checks` does.
"""

from __future__ import annotations

import difflib
import importlib
import json
import logging
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from app.serving.models import json_object

logger = logging.getLogger(__name__)

# Longest safetensors header read (a header names tensors, it holds no data: a 70B model's is under 100 KiB).
MAX_HEADER_BYTES = 64 * 1024 * 1024
# How long one question to the hub may take (a lookup asks two: twice this at most): a check answers in seconds.
HUB_TIMEOUT_SECONDS = 2.0

Tensors = dict[str, tuple[str, list[int]]]  # name -> (dtype, shape)

FOUND, GATED, NOT_FOUND, UNREACHABLE, INVALID = "found", "gated", "not found", "unreachable", "invalid"


@dataclass(frozen=True)
class Lookup:
    """What looking a model up gave: its metadata (`FOUND`), or why not, in words."""

    outcome: str
    where: str = ""  # found: "local folder", "local cache", "hub"
    config: dict[str, Any] = field(default_factory=dict)
    tensors: Tensors | None = None  # None: no safetensors headers could be read
    tokenizer_config: dict[str, Any] | None = None
    detail: str = ""  # why not found / unreachable, in words
    similar: str | None = None  # a cached name close to one not found


class ModelFiles(Protocol):
    """Where metadata of HuggingFace names come from (`HubFiles`; tests pass fakes)."""

    def lookup(self, name: str, files: tuple[str, ...] = ("config.json",)) -> Lookup: ...


def read_local(folder: Path, config_name: str = "config.json") -> Lookup:
    """A local folder's metadata: INVALID when it is not a folder holding `config_name`."""
    if not folder.exists():
        return Lookup(INVALID, detail=f"{folder} does not exist")
    if not folder.is_dir():
        return Lookup(INVALID, detail=f"{folder} is a file, not a model's folder")
    config = json_object(folder / config_name)
    if config is None:
        return Lookup(INVALID, detail=f"{folder} holds no readable {config_name}")
    return Lookup(FOUND, "local folder", config, safetensors_tensors(folder),
                  json_object(folder / "tokenizer_config.json"))


def safetensors_tensors(folder: Path) -> Tensors | None:
    """Every tensor's dtype and shape from a folder's safetensors headers (None: it has no safetensors files)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    tensors: Tensors = {}
    for path in files:
        header = read_header(path)
        if header is None:
            return None
        tensors.update(header)
    return tensors


def read_header(path: Path) -> Tensors | None:
    """One safetensors file's tensors, from its header alone."""
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > MAX_HEADER_BYTES:
                return None
            header = json.loads(f.read(length))
    except (OSError, ValueError, RecursionError, struct.error):
        return None
    if not isinstance(header, dict):
        return None
    tensors = {name: (entry.get("dtype"), entry.get("shape")) for name, entry in header.items()
               if name != "__metadata__" and isinstance(entry, dict)}
    if not all(isinstance(dtype, str) and isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
               for dtype, shape in tensors.values()):
        return None  # (not a header safetensors writes: its weights are "not estimated")
    return tensors




class HubFiles:
    """HuggingFace names: the local cache (`huggingface_hub`'s), then one question to the hub for the config file,
    without the retries `hf_hub_download` makes (seconds apart, each a warning on the console) and bounded as a whole
    (`token`: a gated model's)."""

    def __init__(self, token: str | None = None, timeout_s: float = HUB_TIMEOUT_SECONDS, *,
                 cache_dir: Path | None = None, endpoint: str | None = None):
        """`cache_dir`, `endpoint`: the HuggingFace cache and hub (default: huggingface_hub's, `HF_HUB_CACHE` and
        `HF_ENDPOINT`)."""
        self.token, self.timeout_s, self.cache_dir, self.endpoint = token or None, timeout_s, cache_dir, endpoint

    def lookup(self, name: str, files: tuple[str, ...] = ("config.json",)) -> Lookup:
        from huggingface_hub import constants, try_to_load_from_cache

        cached = try_to_load_from_cache(name, files[0], cache_dir=self.cache_dir)
        if isinstance(cached, str):
            found = read_local(Path(cached).parent, files[0])
            if found.outcome == FOUND:
                tensors = found.tensors
                if tensors is None and not constants.HF_HUB_OFFLINE:
                    tensors = bounded(lambda: self._remote_tensors(name), self.timeout_s * 2, None)
                return Lookup(FOUND, "local cache", found.config, tensors, found.tokenizer_config)
        if constants.HF_HUB_OFFLINE:
            return self._unreachable(name, "HF_HUB_OFFLINE is set")
        return bounded(lambda: self._fetch(name, files), self.timeout_s * 2, None) or self._unreachable(
            name, f"no answer in {self.timeout_s * 2:g} s")

    def _fetch(self, name: str, files: tuple[str, ...]) -> Lookup:
        from huggingface_hub import hf_hub_url
        from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, HfHubHTTPError, RepositoryNotFoundError
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        session = get_session()  # huggingface_hub's own client: httpx's (hub 1.x) or httpx2's (2.x)
        transport = importlib.import_module(type(session).__module__.partition(".")[0])
        try:
            response = session.get(hf_hub_url(name, files[0], endpoint=self.endpoint), follow_redirects=True,
                                   headers=build_hf_headers(token=self.token), timeout=self.timeout_s)
            hf_raise_for_status(response)  # (the hub's answer as huggingface_hub's own errors)
            config = response.json()
        except GatedRepoError:
            return Lookup(GATED, detail="it is gated: its page on huggingface.co grants access")
        except RepositoryNotFoundError:
            return Lookup(NOT_FOUND, detail="no such model on the hub (or it is private)",
                          similar=similar_cached(name, self.cache_dir))
        except EntryNotFoundError:
            return Lookup(INVALID, detail=f"the model on the hub has no {files[0]}")
        except (HfHubHTTPError, ValueError) as exc:
            return self._unreachable(name, f"it answered {str(exc).splitlines()[0][:80]}")
        except (transport.HTTPError, OSError) as exc:
            return self._unreachable(name, type(exc).__name__)
        if not isinstance(config, dict):
            return Lookup(INVALID, detail=f"the model's {files[0]} on the hub is not a JSON object")
        return Lookup(FOUND, "hub", config, self._remote_tensors(name) if files[0] == "config.json" else None)

    def _remote_tensors(self, name: str) -> Tensors | None:
        try:
            from huggingface_hub import get_safetensors_metadata

            metadata = get_safetensors_metadata(name, token=self.token, timeout=self.timeout_s)
        except Exception as exc:  # noqa: BLE001 - no headers: the weights are "not estimated", said as such
            logger.debug("No safetensors metadata for %s: %s", name, type(exc).__name__)
            return None
        return {tensor: (info.dtype, list(info.shape)) for file in metadata.files_metadata.values()
                for tensor, info in file.tensors.items()}

    def _unreachable(self, name: str, why: str) -> Lookup:
        return Lookup(UNREACHABLE, detail=f"the hub cannot be reached from here ({why})",
                      similar=similar_cached(name, self.cache_dir))


def bounded(ask: Callable[[], Any], seconds: float, otherwise: Any) -> Any:
    """`ask()`, or `otherwise` when it has no answer in `seconds`: bounded as a whole, name resolution included (which
    no HTTP timeout covers), on a daemon thread left behind (it keeps no process alive)."""
    answer: list = []
    asking = threading.Thread(target=lambda: answer.append(ask()), daemon=True, name="preflight-ask")
    asking.start()
    asking.join(seconds)
    return answer[0] if answer else otherwise


def similar_cached(name: str, cache_dir: Path | None = None) -> str | None:
    """The name in the local HuggingFace cache closest to `name`, if one is close (a typo's likely meaning)."""
    try:
        from huggingface_hub import scan_cache_dir

        names = [repo.repo_id for repo in scan_cache_dir(cache_dir).repos if repo.repo_type == "model"]
    except Exception:  # noqa: BLE001 - no cache, or an unreadable one: no suggestion
        return None
    close = difflib.get_close_matches(name, [n for n in names if n != name], n=1, cutoff=0.8)
    return close[0] if close else None
