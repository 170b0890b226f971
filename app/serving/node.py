"""The instance's other machines: each runs one SGLang engine for the instance until the instance ends.

A node of a model spanning nodes runs its SGLang rank (the instance's machine, rank 0, serves behind the gateway); a
replica worker runs one server that the instance's router sends requests to (`app.serving.scale_out`). They share
the instance's lifecycle (`app.serving.lifecycle`): stop request, status, exit code.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace

from app import constants
from app.config.types import DeploymentConfig
from app.constants import EXIT_OK
from app.serving.engine import Engine
from app.serving.failures import EngineStartupError, classify_failure
from app.serving.gpus import Gpu, detect_gpus, place
from app.serving.lifecycle import Lifecycle, Reporter, RunOptions
from app.serving.models import ModelRegistry, resolve
from app.serving.network import engine_key, free_ports, public_address
from app.serving.plan import demands
from app.sglang.api import http_health_probe
from app.sglang.command import Machine, MultiNode, build_engine_commands
from app.states import Status

logger = logging.getLogger(__name__)


async def _always_ready(url: str) -> bool:
    """SGLang's ranks above 0 serve no HTTP: a rank is ready once it runs (rank 0's readiness covers them all)."""
    return True


class NodeDeployment(Lifecycle):
    """Another machine of the instance, running one engine until the instance's (the master's) task ends, its
    engine exits, or a signal. Two kinds:

    - a node of a model spanning nodes (`multi_node`, rank > 0): its SGLang rank joins rank 0 at the master's
      address and serves nothing (rank 0 serves, behind the gateway);
    - a replica worker (`worker_of`, app.serving.scale_out): one SGLang server for that model, on this machine's address
      with the instance's engine key, its URL published (`publish`) for the instance's router.

    Exit codes: 0 when the master ended, 3 when the engine failed, 128 + signal number after a signal.
    """

    def __init__(self, config: DeploymentConfig, registry: ModelRegistry, multi_node: MultiNode | None = None, *,
                 master_running: Callable[[], bool], reporter: Reporter | None = None,
                 options: RunOptions = RunOptions(), detect: Callable[[], list[Gpu]] = detect_gpus,
                 clock: Callable[[], float] = time.monotonic, watch_interval_s: float = 10.0,
                 worker_of: str | None = None, engine_api_key: str | None = None,
                 publish: Callable[[str], None] | None = None):
        if worker_of is not None:
            index = next(i for i, m in enumerate(config.models) if m.endpoint == worker_of)
            model = replace(config.models[index], replicas=1)
        else:
            index = next(i for i, m in enumerate(config.models) if m.nodes > 1)
            model = config.models[index]
        super().__init__(replace(config, models=(model,)), registry, reporter=reporter, options=options,
                         detect=detect, clock=clock, multi_node=multi_node)
        self.worker_of = worker_of
        self.engine_api_key = engine_api_key
        self.publish = publish
        self.master_running = master_running
        self.watch_interval_s = watch_interval_s
        self.engine: Engine | None = None

    @property
    def role(self) -> str:
        if self.multi_node is not None:
            return f"node {self.multi_node.rank} of {self.multi_node.nodes}"
        return f"replica worker of {self.worker_of}"

    async def run(self) -> int:
        model = self.config.models[0]
        await self.tell(self.reporter.status, Status.LOADING, f"{self.role} for {model.endpoint}")
        resolved = await asyncio.to_thread(resolve, self.config, self.registry)
        gpus = self.detect()
        machine = Machine(gpu_count=len(gpus), gpu_memory_gib=min((g.memory_gib for g in gpus), default=None))
        placements = place(demands(self.config, machine), gpus) if gpus else None
        host = constants.ENGINE_HOST if self.worker_of is None else "0.0.0.0"
        (command,) = build_engine_commands(self.config, resolved, free_ports(1, host="0.0.0.0"), machine=machine,
                                           placements=placements, engine_api_key=self.engine_api_key or engine_key(),
                                           launcher=self.options.launcher, multi_node=self.multi_node, host=host)
        probe = _always_ready if self.multi_node is not None else http_health_probe
        self.engine = engine = Engine(command, probe=probe,
                                      secrets=[*self.config.auth.tokens, *self.config.secrets,
                                               *([self.engine_api_key] if self.engine_api_key else [])])
        try:
            await engine.start()
            await engine.wait_ready(self.clock() + self.options.startup_deadline_s)
            if self.multi_node is not None:
                what = f"SGLang rank {self.multi_node.rank}, joined at {self.multi_node.dist_init_addr}"
            else:
                url = f"http://{self.options.public_host or public_address(self.environ)}:{command.port}"
                if self.publish is not None:
                    await asyncio.to_thread(self.publish, url)
                what = f"serving at {url}"
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
                done, _ = await asyncio.wait({exited, stop}, timeout=self.watch_interval_s,
                                             return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                if self._stop.is_set():
                    return await self.signal_exit()
                master = await asyncio.to_thread(self.master_running)
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
