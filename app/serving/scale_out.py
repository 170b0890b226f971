"""Replicas on other machines: worker tasks behind the instance's router.

When a model's replicas do not all fit on the instance's machine (`gpus` x `replicas` above its GPUs), the
instance keeps the ones that fit (SGLang's --dp-size) and asks ClearML for the rest: each is a worker task, a
clone of the instance enqueued to its queue, told which model it serves and the engine key; it starts one SGLang
server for that model on its machine and publishes the server's URL as a task property. The instance's router
(app.sglang.router) gets every live worker's URL, and loses it when the worker's task ends; a worker that ended
while the instance still serves is replaced by a new one. When the instance stops, it stops its workers.

`plan_replicas` is pure; `RemoteWorkers.tick()` is called by the deployment's loop; `WorkerPool` is ClearML's side
(`app.clearml.task.ClearMLWorkerPool`; tests pass a recording one).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from app.config.types import DeploymentConfig
from app.errors import ConfigError, Problem
from app.states import ModelState

logger = logging.getLogger(__name__)

RUNNING = frozenset({"created", "queued", "in_progress"})


@dataclass(frozen=True)
class ReplicaPlan:
    local: int  # replicas on this machine (SGLang's --dp-size)
    remote: int  # replicas in worker tasks


def plan_replicas(config: DeploymentConfig, gpu_count: int, *, can_spawn: bool) -> list[ReplicaPlan]:
    """How each model's replicas split between this machine and worker tasks (only under an agent, which can
    enqueue them; a local run keeps them all here and placement refuses what does not fit)."""
    plans = []
    for i, model in enumerate(config.models):
        per_replica = model.gpus or gpu_count or 1
        fit = max(1, gpu_count // per_replica) if gpu_count else model.replicas
        if config.general.device == "cpu" or model.cli or model.replicas <= fit or not can_spawn:
            plans.append(ReplicaPlan(model.replicas, 0))
            continue
        if gpu_count < per_replica:
            raise ConfigError(Problem(f"models[{i}].gpus", f"needs {per_replica} GPUs for one replica; this machine "
                                      f"has {gpu_count}", "lower gpus, or enqueue to a queue with bigger machines"))
        plans.append(ReplicaPlan(fit, model.replicas - fit))
    return plans


class WorkerPool(Protocol):
    """ClearML's side: worker tasks, their status and the URL each publishes."""

    def spawn(self, endpoint: str, replica: int, engine_key: str | None) -> str: ...

    def poll(self, worker_id: str) -> tuple[str, str | None]: ...  # (status, url once published)

    def stop(self, worker_id: str) -> None: ...


@dataclass
class Worker:
    replica: int
    task_id: str
    url: str | None = None  # registered with the router


@dataclass
class RemoteWorkers:
    """One model's worker tasks, kept at `count` while the instance serves, their URLs in its router."""

    endpoint: str
    count: int
    pool: WorkerPool
    add: Callable[[str], Awaitable[None]]
    remove: Callable[[str], Awaitable[None]]
    engine_key: str | None = None
    workers: dict[int, Worker] = field(default_factory=dict)
    replaced: int = 0

    async def tick(self) -> None:
        """Start what is missing, register what came up, drop and replace what ended."""
        for replica in range(self.count):
            worker = self.workers.get(replica)
            if worker is None:
                task_id = await asyncio.to_thread(self.pool.spawn, self.endpoint, replica, self.engine_key)
                self.workers[replica] = Worker(replica, task_id)
                logger.info("Model %s: worker task %s enqueued for replica %d", self.endpoint, task_id, replica)
                continue
            status, url = await asyncio.to_thread(self.pool.poll, worker.task_id)
            if status not in RUNNING:
                logger.warning("Model %s: worker task %s ended (%s); replacing it", self.endpoint, worker.task_id,
                               status)
                if worker.url:
                    await self.remove(worker.url)
                del self.workers[replica]
                self.replaced += 1
            elif url and url != worker.url:
                if worker.url:
                    await self.remove(worker.url)
                await self.add(url)
                worker.url = url
                logger.info("Model %s: worker %s serves at %s", self.endpoint, worker.task_id, url)

    def states(self) -> dict[str, ModelState]:
        return {f"{self.endpoint}/remote{r}": ModelState.RESIDENT if w.url else ModelState.LOADING
                for r, w in self.workers.items()}

    async def stop(self) -> None:
        for worker in list(self.workers.values()):
            await asyncio.to_thread(self.pool.stop, worker.task_id)
        self.workers.clear()
