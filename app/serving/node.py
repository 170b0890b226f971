"""The instance's other machines: each runs one SGLang engine for the instance until the instance ends.

Two roles, one lifecycle: a node of a model spanning nodes (`RankNode`) runs its SGLang rank (the instance's
machine, rank 0, serves behind the gateway); a replica worker (`ReplicaWorker`) runs one server that the instance's
router sends requests to (`app.serving.scale_out`). Each carries out a node's plan (`app.serving.plan.node_plan`),
follows the instance's task (`Master`), and shares the instance's lifecycle (`app.serving.lifecycle`): stop request,
status, exit code.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from app.config.types import DeploymentConfig
from app.constants import EXIT_OK
from app.serving.engine import Engine
from app.serving.failures import EngineStartupError, classify_failure
from app.serving.gpus import Gpu, detect_gpus
from app.serving.lifecycle import Lifecycle, Reporter, RunOptions
from app.serving.models import ModelRegistry, ResolvedModel, resolve
from app.serving.network import engine_key, free_ports, public_address
from app.serving.plan import NodePlan, node_plan
from app.sglang.api import http_health_probe
from app.sglang.command import Launch, MultiNode
from app.states import Status

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Master:
    """The instance's own task, which every other machine follows: whether it still runs, looked at every
    `watch_interval_s`."""

    running: Callable[[], bool]
    watch_interval_s: float = 10.0


@dataclass(frozen=True)
class WorkerOrder:
    """What the instance tells a replica worker (its task's properties, app.clearml.task): the model it serves,
    the engine key the instance's router uses, and where the server's URL goes for the router to find it."""

    endpoint: str
    engine_key: str | None = None
    publish: Callable[[str], None] | None = None


async def _always_ready(url: str) -> bool:
    """SGLang's ranks above 0 serve no HTTP: a rank is ready once it runs (rank 0's readiness covers them all)."""
    return True


class _OtherMachine(Lifecycle):
    """Another machine of the instance, running one engine until the instance's (the master's) task ends, its
    engine exits, or a signal. Exit codes: 0 when the master ended, 3 when the engine failed, 128 + signal number
    after a signal."""

    index: int  # the model it serves, in the config
    role: str

    def __init__(self, config: DeploymentConfig, registry: ModelRegistry, master: Master, *,
                 reporter: Reporter | None, options: RunOptions, detect: Callable[[], list[Gpu]],
                 clock: Callable[[], float], multi_node: MultiNode | None = None):
        super().__init__(config, registry, reporter=reporter, options=options, detect=detect, clock=clock,
                         multi_node=multi_node)
        self.master = master
        self.engine: Engine | None = None

    def plan(self, resolved: ResolvedModel, port: int) -> NodePlan:
        """This machine's part (`app.serving.plan.node_plan`), on its GPUs and a free port."""
        raise NotImplementedError

    def own_secrets(self) -> list[str]:
        """What its engine's log masks besides the access tokens and the config's secrets."""
        return []

    async def ready(self, engine: Engine) -> str:
        """What the engine does once it runs, said in the status."""
        raise NotImplementedError

    async def run(self) -> int:
        model = self.config.models[self.index]
        await self.tell(self.reporter.status, Status.LOADING, f"{self.role} for {model.endpoint}")
        # only its model is fetched (the config itself stays the instance's: its index, its messages)
        (resolved,) = await asyncio.to_thread(resolve, replace(self.config, models=(model,)), self.registry)
        planned = self.plan(resolved, free_ports(1, host="0.0.0.0")[0])
        secrets = [*self.config.auth.tokens, *self.config.secrets, *self.own_secrets()]
        self.engine = engine = Engine(planned.command, secrets=secrets,
                                      probe=_always_ready if self.multi_node is not None else http_health_probe)
        try:
            await engine.start()
            await engine.wait_ready(self.clock() + self.options.startup_deadline_s)
            what = await self.ready(engine)
            await self.tell(self.reporter.status, Status.ACTIVE, f"{self.role}: {what}")
            return await self._watch(engine)
        except EngineStartupError as exc:
            return await self.fail(exc)
        finally:
            await engine.stop(self.options.engine_stop_grace_s)
            await self.tell(self.reporter.close)

    async def _watch(self, engine: Engine) -> int:
        exited = asyncio.create_task(engine.wait_exit())
        try:
            while True:
                stop = asyncio.create_task(self._stop.wait())
                done, _ = await asyncio.wait({exited, stop}, timeout=self.master.watch_interval_s,
                                             return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                if self._stop.is_set():
                    return await self.signal_exit()
                master = await asyncio.to_thread(self.master.running)
                if not master:
                    logger.info("The master node's task has ended: stopping this node")
                    await self.tell(self.reporter.status, Status.STOPPED, "the master node's task ended")
                    return EXIT_OK
                if exited in done:
                    return await self.fail(EngineStartupError(
                        engine.endpoint, f"({self.role}) exited while the master still runs",
                        classify_failure(engine.exit_code, engine.tail, engine.evidence), engine.exit_code,
                        engine.tail))
        finally:
            exited.cancel()


class RankNode(_OtherMachine):
    """A node of a model spanning nodes (rank > 0): its SGLang rank joins rank 0 at the master's address and serves
    nothing (rank 0 serves, behind the gateway)."""

    def __init__(self, config: DeploymentConfig, registry: ModelRegistry, multi_node: MultiNode, master: Master, *,
                 reporter: Reporter | None = None, options: RunOptions = RunOptions(),
                 detect: Callable[[], list[Gpu]] = detect_gpus, clock: Callable[[], float] = time.monotonic):
        super().__init__(config, registry, master, reporter=reporter, options=options, detect=detect, clock=clock,
                         multi_node=multi_node)
        self.index = next(i for i, m in enumerate(config.models) if m.nodes > 1)
        self.role = f"node {multi_node.rank} of {multi_node.nodes}"

    def plan(self, resolved: ResolvedModel, port: int) -> NodePlan:
        return node_plan(self.config, self.index, resolved, self.detect(), port, multi_node=self.multi_node,
                         launch=Launch(engine_key(), launcher=self.options.launcher))

    async def ready(self, engine: Engine) -> str:
        assert self.multi_node is not None
        return f"SGLang rank {self.multi_node.rank}, joined at {self.multi_node.dist_init_addr}"


class ReplicaWorker(_OtherMachine):
    """A replica worker (app.serving.scale_out): one SGLang server of its model, on this machine's address with the
    instance's engine key, its URL published for the instance's router."""

    def __init__(self, config: DeploymentConfig, registry: ModelRegistry, order: WorkerOrder, master: Master, *,
                 reporter: Reporter | None = None, options: RunOptions = RunOptions(),
                 detect: Callable[[], list[Gpu]] = detect_gpus, clock: Callable[[], float] = time.monotonic):
        """The URL's address: `options.public_host`, else this machine's (`app.serving.network.public_address`)."""
        super().__init__(config, registry, master, reporter=reporter, options=options, detect=detect, clock=clock)
        self.order = order
        self.index = next(i for i, m in enumerate(config.models) if m.endpoint == order.endpoint)
        self.role = f"replica worker of {order.endpoint}"

    def plan(self, resolved: ResolvedModel, port: int) -> NodePlan:
        return node_plan(self.config, self.index, resolved, self.detect(), port,
                         launch=Launch(self.order.engine_key or engine_key(), launcher=self.options.launcher))

    def own_secrets(self) -> list[str]:
        return [self.order.engine_key] if self.order.engine_key else []

    async def ready(self, engine: Engine) -> str:
        url = f"http://{self.options.public_host or public_address(self.environ)}:{engine.command.port}"
        if self.order.publish is not None:
            await asyncio.to_thread(self.order.publish, url)
        return f"serving at {url}"
