"""SGLang's own HTTP API, as the app calls it (never a client's request: those go through the gateway).

One `SGLangClient` per deployment, on one long-lived connection pool: readiness (`/health`, open in SGLang),
Prometheus text (`/metrics`, open), and the calls that need the engine's key (memory release/resume, weight
reloads, LoRA adapters loaded on request, sglang-router's worker list). SGLang 0.5.23's routes:
`app/data/sglang_routes.json`.

Example::

    client = SGLangClient()
    ready = await client.healthy("http://127.0.0.1:30001")
    text = await client.call(url, "POST", "/release_memory_occupation", api_key=key, error=ControlError,
                             body={"tags": None}, timeout_s=30)
    await client.close()
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Container

import aiohttp

# One readiness probe may take this long: SGLang's /health runs a one-token generation (its own limit is 20 s).
HEALTH_TIMEOUT_SECONDS = 25.0
METRICS_TIMEOUT_SECONDS = 5.0


class AdapterCallError(Exception):
    """A LoRA load or unload call that could not be made, or answered with something else than SGLang's result."""


class SGLangClient:
    """Calls to SGLang servers and routers on one connection pool, opened on first use (in the running loop)."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def _pool(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    async def healthy(self, url: str) -> bool:
        """True when SGLang's /health answers 200; 503 and connection errors mean "not yet"."""
        try:
            async with self._pool().get(url + "/health",
                                        timeout=aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_SECONDS)) as response:
                return response.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False

    async def metrics(self, url: str) -> str:
        """An engine's (or router's) /metrics text; empty when it does not answer."""
        try:
            async with self._pool().get(url + "/metrics",
                                        timeout=aiohttp.ClientTimeout(total=METRICS_TIMEOUT_SECONDS)) as response:
                return await response.text() if response.status == 200 else ""
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return ""

    async def context_length(self, url: str, api_key: str | None) -> int | None:
        """The served model's context length in tokens, as SGLang's `/v1/models` gives it (`max_model_len`: the
        model's own, or `--context-length`); None when it does not say."""
        try:
            text = await self.call(url, "GET", "/v1/models", api_key=api_key, timeout_s=METRICS_TIMEOUT_SECONDS,
                                   error=OSError)
            length = json.loads(text)["data"][0]["max_model_len"]
        except (OSError, ValueError, LookupError, TypeError):
            return None
        return length if isinstance(length, int) and not isinstance(length, bool) and length > 0 else None

    async def call(self, url: str, method: str, path: str, *, api_key: str | None, timeout_s: float,
                   error: type[Exception], body: dict | None = None, accept: Container[int] = (200,)) -> str:
        """One call to an engine's (or its router's) own API with its key; the answer's text. `error`, naming the
        call and the status or the cause, when it cannot be made or answers a status not in `accept`."""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        try:
            async with self._pool().request(method, url + path, json=body, headers=headers,
                                            timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
                text = await response.text()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise error(f"{method} {path} failed: {exc!r}") from exc
        if response.status not in accept:
            raise error(f"{method} {path} answered {response.status}: {text[:300]}")
        return text

    async def load_lora_adapter(self, url: str, api_key: str | None, name: str, path: str,
                                timeout_s: float) -> str | None:
        """Load an adapter from a directory under a name (SGLang's `/load_lora_adapter`); None when it loaded, else
        SGLang's reason. Raises AdapterCallError when the engine cannot be asked."""
        return await self._lora_update(url, api_key, "/load_lora_adapter", {"lora_name": name, "lora_path": path},
                                       timeout_s)

    async def unload_lora_adapter(self, url: str, api_key: str | None, name: str, timeout_s: float) -> str | None:
        """Unload an adapter by name (`/unload_lora_adapter`); None when it is gone, else SGLang's reason."""
        return await self._lora_update(url, api_key, "/unload_lora_adapter", {"lora_name": name}, timeout_s)

    async def _lora_update(self, url: str, api_key: str | None, path: str, body: dict, timeout_s: float) -> str | None:
        # SGLang answers both with LoRAUpdateOutput {success, error_message, loaded_adapters}: 200, or 400 on failure
        text = await self.call(url, "POST", path, api_key=api_key, timeout_s=timeout_s, error=AdapterCallError,
                               body=body, accept=(200, 400))
        try:
            answer = json.loads(text)
        except ValueError:
            raise AdapterCallError(f"POST {path} answered something that is not JSON: {text[:200]}") from None
        if not isinstance(answer, dict):
            raise AdapterCallError(f"POST {path} answered {text[:200]}")
        if answer.get("success") is True:
            return None
        return str(answer.get("error_message") or answer.get("message") or text[:300])

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def http_health_probe(url: str) -> bool:
    """One readiness probe on a pool of its own (for an engine started without its deployment's client)."""
    client = SGLangClient()
    try:
        return await client.healthy(url)
    finally:
        await client.close()
