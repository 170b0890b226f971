"""A deployment's report, read off its parts every report interval and handed to its reporter as one frozen
`app.serving.report.Report`.

`Readings.take` reads SGLang's token counters off every serving engine and each router's count per replica server
(over the network), takes the gateway's window of requests (and logs it as one console line, with each key's
requests since the previous report), and copies the gateway's counters, each key's usage, the residency's wake-ups
and the adapters' loads: the reporter reads the copy on its own thread while the deployment goes on counting.
`model_states` is each model's state as the dashboard lists them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from app.config.types import DeploymentConfig
from app.gateway import RequestStats
from app.keys import KeyUsage
from app.serving.adapters import AdapterStats, OnRequestAdapters
from app.serving.build import Built, RoutedModel
from app.serving.engine import Engine
from app.serving.idle import IdleDecision
from app.serving.report import AdapterLoads, Report, Wakes
from app.serving.residency import Residency, WakeStats
from app.sglang.api import SGLangClient
from app.sglang.command import MultiNode
from app.sglang.metrics import ZERO, TokenRate, TokenTotals, parse_prometheus
from app.sglang.router import requests_per_worker
from app.states import ASLEEP, EngineState, ModelState, model_state
from app.statistics import usage_since

logger = logging.getLogger(__name__)


class Readings:
    """What every report reads, and what it keeps between them: when the deployment began (a report's iteration is
    the seconds since), the last reading of SGLang's token counters (their rate is taken between readings) and of
    each key's usage (the console line's requests by key are those since)."""

    def __init__(self, stats: RequestStats, client: SGLangClient, clock: Callable[[], float]):
        self.stats = stats
        self.client = client
        self.clock = clock
        self.started = clock()
        self._rate = TokenRate()
        self._keys: dict[str, KeyUsage] = {}

    def begin(self) -> None:
        """The deployment begins now."""
        self.started = self.clock()

    async def take(self, built: Built, decision: IdleDecision, states: dict[str, ModelState]) -> Report:
        now = self.clock()
        tokens = self._rate.update(now, await scrape_tokens(self.client, built.supervisor.engines, built.residency))
        window, keys = self.stats.take_window(), self.stats.key_usage()
        by_key, self._keys = usage_since(self._keys, keys), keys
        if line := window.console_line(tokens.generation if tokens else None, by_key):
            logger.info("%s", line)  # (a line per report interval with traffic, however heavy: not one per request)
        return Report(
            elapsed_s=now - self.started, status=decision.state, in_flight=decision.in_flight,
            idle_for_s=decision.idle_for_s, states=dict(states), requests=dict(self.stats.requests),
            latency_sum_s=dict(self.stats.latency_sum_s), window=window,
            generation_per_s=tokens.generation if tokens else None, prompt_per_s=tokens.prompt if tokens else None,
            wakes=wakes(built.residency.wake_stats()) if built.residency is not None else None,
            replica_requests=await replica_requests(self.client, built.routed) if built.routed else None,
            adapters=adapter_loads(built.adapters, built.adapter_stats) if built.adapters else None, keys=keys)


def model_states(built: Built, config: DeploymentConfig, multi_node: MultiNode | None) -> dict[str, ModelState]:
    """Each model's state, and each replica server's where a router spreads a model (`<endpoint>/<n>`, …)."""
    states = built.gateway.states()
    for routed in built.routed.values():
        states.update({w.endpoint: model_state(w.state) for w in routed.servers if w.endpoint not in states})
    for remote in built.remote_workers.values():
        states.update(remote.states())
    if multi_node is not None:  # SGLang's rank 0 is ready only once every rank has joined it
        for model in config.models:
            if model.nodes > 1:
                state = states.get(model.endpoint, ModelState.LOADING)
                states.update({f"{model.endpoint}/node{r}": state for r in range(model.nodes)})
    return states


def wakes(stats: WakeStats) -> Wakes:
    """Models sharing GPUs: their wake-ups so far, and the latest wake latencies' p50 and p95."""
    return Wakes(dict(stats.wakeups), dict(stats.last_wake), stats.p(50), stats.p(95))


def adapter_loads(adapters: dict[str, OnRequestAdapters], stats: AdapterStats) -> AdapterLoads:
    """Adapters on request: each model's loads, the latest load times' p50 and p95, each adapter's state."""
    states = {f"{endpoint}:{name}": state for endpoint, model in adapters.items() for name, state in model.cards()}
    return AdapterLoads({endpoint: stats.loads[endpoint] for endpoint in adapters}, stats.p(50), stats.p(95), states)


async def scrape_tokens(client: SGLangClient, engines: list[Engine],
                        residency: Residency | None = None) -> TokenTotals:
    """SGLang's own token counters, summed over every serving engine (not one whose model sleeps or wakes: its
    engine is resident, its memory given back)."""
    asleep = {name for name, state in residency.states().items() if state in ASLEEP} if residency else set()
    texts = await asyncio.gather(*(client.metrics(e.url) for e in engines
                                   if e.state == EngineState.RESIDENT and e.endpoint not in asleep))
    total = ZERO
    for text in texts:
        total = total + TokenTotals.from_metrics(parse_prometheus(text))
    return total


async def replica_requests(client: SGLangClient, routed: dict[str, RoutedModel]) -> dict[str, float]:
    """Requests each replica server has answered, as its router counts them."""
    counts: dict[str, float] = {}
    for model in routed.values():
        answered = requests_per_worker(await client.metrics(model.metrics_url))
        counts.update({w.endpoint: answered.get(w.url, 0.0) for w in model.servers})
    return counts
