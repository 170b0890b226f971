"""SGLang's memory endpoints for one engine, as the residency (`app.serving.residency`) calls them.

An engine started with `--enable-memory-saver` gives its GPU memory back while idle (`/release_memory_occupation`)
and takes it again (`/resume_memory_occupation`); with disk swapping its weights are then reloaded from the model's
files (`/update_weights_from_disk`): reference/sglang.md A2, A4. Whether SGLang is idle, and how much memory it
holds, are read from its own gauges on /metrics.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from typing import Protocol

from app.sglang.api import SGLangClient
from app.sglang.metrics import parse_prometheus, parse_prometheus_samples
from app.states import EngineState

logger = logging.getLogger(__name__)

CPU_OFFLOAD, DISK_SWAP = "cpu", "disk"

# Longest wait for one admin call (a disk reload of a large model takes minutes).
CONTROL_TIMEOUT_SECONDS = 1800.0
# Before releasing, SGLang itself must report nothing running or queued (an aborted stream takes a moment to leave
# its scheduler): polled this often.
IDLE_CHECK_INTERVAL_SECONDS = 0.1


class EngineLike(Protocol):
    """What the residency needs of an engine (`app.serving.engine.Engine` has it; tests pass simple objects)."""

    endpoint: str
    url: str

    @property
    def state(self) -> EngineState: ...


class MemoryControl(Protocol):
    """SGLang's memory endpoints for one engine (`SGLangMemoryControl`; tests pass recording fakes)."""

    async def busy(self, engine: EngineLike) -> int: ...

    async def release(self, engine: EngineLike) -> None: ...

    async def resume(self, engine: EngineLike) -> None: ...

    async def footprint_gib(self, engine: EngineLike) -> float | None: ...


class ControlError(Exception):
    pass


class SGLangMemoryControl:
    """The admin calls, with the engine's own key: release everything; resume everything, and with disk swapping
    reload the weights from `model_paths[endpoint]` (the path the engine was started with)."""

    def __init__(self, mode: str, *, model_paths: dict[str, str] | None = None, api_keys: dict[str, str | None]
                 | None = None, timeout_s: float = CONTROL_TIMEOUT_SECONDS, client: SGLangClient | None = None):
        self.mode = mode
        self.client = client or SGLangClient()
        self.model_paths = model_paths or {}
        self.api_keys = api_keys or {}
        self.timeout_s = timeout_s

    async def _call(self, engine: EngineLike, method: str, path: str, body: dict | None = None) -> str:
        return await self.client.call(engine.url, method, path, api_key=self.api_keys.get(engine.endpoint),
                                      body=body, timeout_s=self.timeout_s, error=ControlError)

    async def busy(self, engine: EngineLike) -> int:
        """Requests SGLang is running or queueing, from its own gauges."""
        totals = parse_prometheus(await self._call(engine, "GET", "/metrics"))
        return int(totals.get("sglang:num_running_reqs", 0.0) + totals.get("sglang:num_queue_reqs", 0.0))

    async def release(self, engine: EngineLike) -> None:
        await self._call(engine, "POST", "/release_memory_occupation", {"tags": None})

    async def resume(self, engine: EngineLike) -> None:
        await self._call(engine, "POST", "/resume_memory_occupation", {"tags": None})
        if self.mode == DISK_SWAP:
            path = self.model_paths[engine.endpoint]
            await self._call(engine, "POST", "/update_weights_from_disk", {"model_path": path, "flush_cache": True})

    async def footprint_gib(self, engine: EngineLike) -> float | None:
        """Weights + KV cache + graphs on one device, as SGLang measured them (the largest tensor-parallel rank)."""
        try:
            families = parse_prometheus_samples(await self._call(engine, "GET", "/metrics"))
        except ControlError as exc:
            logger.warning("Could not read %s's memory: %s", engine.endpoint, exc)
            return None
        per_rank: dict[str, float] = collections.defaultdict(float)
        found = False
        for name in ("sglang:weight_memory_usage_gb", "sglang:kv_cache_memory_usage_gb",
                     "sglang:graph_memory_usage_gb"):
            for labels, value in families.get(name, ()):
                per_rank[labels.get("tp_rank", "0")] += value
                found = True
        return max(per_rank.values()) if found else None


async def release_when_idle(control: MemoryControl, engine: EngineLike, deadline: float,
                            clock: Callable[[], float]) -> None:
    """Release the engine's memory once SGLang reports nothing running or queued (SGLang asserts it is idle when
    asked to release, and the assertion takes the server down); ControlError when it still does at `deadline` (on
    `clock`), or when a call fails."""
    while (busy := await control.busy(engine)) > 0:
        if clock() >= deadline:
            raise ControlError(f"SGLang still reports {busy} request(s) running")
        await asyncio.sleep(IDLE_CHECK_INTERVAL_SECONDS)
    await control.release(engine)
