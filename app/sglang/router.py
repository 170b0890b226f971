"""Replicas behind SGLang's own router (`sglang-router`, the "SGLang Model Gateway"; docs/sglang.md).

A model whose replicas run as separate SGLang servers (workers) is served through one router process in front of
them, and the gateway routes the model to the router: auth, stats and the idle policy stay the gateway's; spreading
requests over the workers, retrying a request a dead worker never started, and the load-balancing policy are the
router's. The workers and the router all run with the engine key only the gateway knows (the router passes it on
to the workers it was started with, and to the ones added later when told to).

Workers come and go: `RouterWorkers` removes a worker from the router as soon as its engine dies (the supervisor's
view) and adds it back once its restart is ready, through the router's worker API (`POST /workers`,
`DELETE /workers/{id}`); a worker on another machine is added when its task publishes its URL.

Example::

    command = router_command("qwen", port=31000, metrics_port=31001, worker_urls=[w.url for w in workers],
                             api_key=key, load_balance_method="round_robin")
    router = Engine(command)                       # started, probed and restarted like an engine
    workers = RouterWorkers(router.url, key)
    await workers.add("http://10.0.0.7:30000")
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Iterable

from app.sglang.api import SGLangClient
from app.sglang.command import EngineCommand
from app.sglang.metrics import parse_prometheus_samples

logger = logging.getLogger(__name__)

ROUTER_MODULE = "sglang_router.launch_router"
ROUTER_VERSION = "0.3.2"
# SGLang's --load-balance-method (data parallelism inside one server) → the router's --policy.
ROUTER_POLICY = {"round_robin": "round_robin", "total_requests": "power_of_two", "total_tokens": "power_of_two"}
DEFAULT_POLICY = "cache_aware"  # the router's own default: requests with a shared prefix go where it is cached
CONTROL_TIMEOUT_SECONDS = 30.0


def router_command(endpoint: str, *, port: int, metrics_port: int, worker_urls: Iterable[str], api_key: str | None,
                   load_balance_method: str | None = None, host: str = "127.0.0.1",
                   python: str = sys.executable) -> EngineCommand:
    """The router's command line: listening on loopback (only the gateway talks to it), its Prometheus listener on
    loopback too, the policy from the form's Load Balance Method, the engine key for clients and workers alike."""
    argv = [python, "-m", ROUTER_MODULE, "--host", host, "--port", str(port),
            "--policy", ROUTER_POLICY.get(load_balance_method or "", DEFAULT_POLICY),
            "--prometheus-host", host, "--prometheus-port", str(metrics_port)]
    urls = list(worker_urls)
    if urls:
        argv += ["--worker-urls", *urls]
    return EngineCommand(endpoint=endpoint, argv=tuple(argv), env={"NO_COLOR": "1"}, port=port, api_key=api_key,
                         secret_args={"--api-key": api_key} if api_key else {},
                         notes=(f"sglang-router over {len(urls)} worker(s)",))


def requests_per_worker(metrics_text: str) -> dict[str, float]:
    """How many requests each worker has answered, by the router's own count: its per-worker circuit-breaker
    outcomes (`smg_worker_cb_outcomes_total{worker, outcome="success"}`; `smg_worker_selection_total` has no
    worker label in 0.3.2)."""
    out: dict[str, float] = {}
    for labels, value in parse_prometheus_samples(metrics_text).get("smg_worker_cb_outcomes_total", ()):
        if labels.get("outcome") == "success":
            out[labels.get("worker", "")] = out.get(labels.get("worker", ""), 0.0) + value
    return out


class RouterError(Exception):
    pass


class RouterWorkers:
    """The router's worker list, through its control API (the engine key is also the router's key)."""

    def __init__(self, router_url: str, api_key: str | None, *, timeout_s: float = CONTROL_TIMEOUT_SECONDS,
                 client: SGLangClient | None = None):
        self.client = client or SGLangClient()
        self.router_url = router_url
        self.api_key = api_key
        self.timeout_s = timeout_s
        self._lock = asyncio.Lock()  # one change at a time: the router queues them anyway

    async def _request(self, method: str, path: str, body: dict | None = None) -> object:
        text = await self.client.call(self.router_url, method, path, api_key=self.api_key, body=body,
                                      timeout_s=self.timeout_s, error=RouterError, accept=range(200, 300))
        try:
            return json.loads(text) if text.strip() else None
        except ValueError as exc:
            raise RouterError(f"{method} {path} answered something other than JSON: {text[:300]}") from exc

    async def list(self) -> list[dict]:
        """The router's workers: each with at least `url`, and `id`, `is_healthy` where the router gives them."""
        answer = await self._request("GET", "/workers")
        workers = answer.get("workers", []) if isinstance(answer, dict) else answer
        return [w for w in workers or [] if isinstance(w, dict)]

    async def healthy(self) -> set[str]:
        """The workers the router has registered and finds healthy (it registers them in the background)."""
        return {w.get("url", "") for w in await self.list() if w.get("is_healthy", True)}

    def readiness(self, expected: int):
        """A readiness probe for the router's engine: up, with `expected` healthy workers registered (its own
        /health answers 200 before any worker is, and requests then get 503 "no_available_workers")."""
        async def probe(url: str) -> bool:
            try:
                return len(await self.healthy()) >= expected
            except RouterError:
                return False
        return probe

    async def urls(self) -> set[str]:
        return {w.get("url", "") for w in await self.list()}

    async def add(self, url: str) -> None:
        """Register a worker (the router checks it and starts sending it requests once healthy)."""
        async with self._lock:
            if url in await self.urls():
                return
            body: dict[str, object] = {"url": url}
            if self.api_key:
                body["api_key"] = self.api_key  # workers added later do not inherit the router's key
            await self._request("POST", "/workers", body)
            logger.info("Router %s: worker %s added", self.router_url, url)

    async def remove(self, url: str) -> None:
        """Stop sending a worker requests (it died, or its task ended)."""
        async with self._lock:
            for worker in await self.list():
                if worker.get("url") == url:
                    await self._request("DELETE", f"/workers/{worker.get('id') or url}")
                    logger.info("Router %s: worker %s removed", self.router_url, url)
