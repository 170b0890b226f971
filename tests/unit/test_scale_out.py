"""Replicas beyond this machine: how they split (pure), keeping the worker tasks at their count with their URLs in
the router (against a recording pool), and ClearML's side through the adapter seam (the real SDK's signatures)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
from clearml import Task

from app.clearml.task import ClearMLWorkerPool
from app.config import load_config
from app.errors import ConfigError
from app.serving.scale_out import RemoteWorkers, ReplicaPlan, plan_replicas
from tests.unit.test_clearml_task import Recorder


def config(*overrides: str):
    return load_config(overrides=["models.0.model=org/m", *overrides])


def test_replicas_that_fit_stay_here_and_the_rest_go_to_worker_tasks():
    assert plan_replicas(config("models.0.gpus=2", "models.0.replicas=3"), 8, can_spawn=True) == [ReplicaPlan(3, 0)]
    assert plan_replicas(config("models.0.gpus=2", "models.0.replicas=7"), 8, can_spawn=True) == [ReplicaPlan(4, 3)]
    # a local run cannot enqueue workers: everything stays, and placement says what does not fit
    assert plan_replicas(config("models.0.gpus=2", "models.0.replicas=7"), 8, can_spawn=False) == [ReplicaPlan(7, 0)]
    assert plan_replicas(config("general.device=cpu", "models.0.replicas=3"), 0, can_spawn=True) == [
        ReplicaPlan(3, 0)]


def test_a_replica_larger_than_this_machine_is_refused():
    with pytest.raises(ConfigError) as info:
        plan_replicas(config("models.0.gpus=16", "models.0.replicas=2"), 8, can_spawn=True)
    assert info.value.problems[0].field == "models[0].gpus"


@dataclass
class Pool:
    statuses: dict[str, str] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)
    spawned: list[tuple[str, int, str | None]] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)

    def spawn(self, endpoint: str, replica: int, engine_key: str | None) -> str:
        self.spawned.append((endpoint, replica, engine_key))
        task_id = f"w{len(self.spawned)}"
        self.statuses[task_id] = "queued"
        return task_id

    def poll(self, worker_id: str) -> tuple[str, str | None]:
        return self.statuses[worker_id], self.urls.get(worker_id)

    def stop(self, worker_id: str) -> None:
        self.stopped.append(worker_id)


def test_workers_are_kept_at_their_count_registered_when_up_and_replaced_when_they_end():
    async def scenario():
        pool, router = Pool(), []

        async def add(url):
            router.append(("add", url))

        async def remove(url):
            router.append(("remove", url))

        workers = RemoteWorkers("m", 2, pool, add=add, remove=remove, engine_key="k")
        await workers.tick()
        assert pool.spawned == [("m", 0, "k"), ("m", 1, "k")] and router == []
        assert workers.states() == {"m/remote0": "loading", "m/remote1": "loading"}
        pool.statuses["w1"], pool.urls["w1"] = "in_progress", "http://10.0.0.7:30000"
        await workers.tick()
        await workers.tick()  # nothing new: nothing registered twice
        assert router == [("add", "http://10.0.0.7:30000")]
        pool.statuses["w1"] = "failed"  # the worker's machine went away
        await workers.tick()
        assert router[-1] == ("remove", "http://10.0.0.7:30000") and workers.replaced == 1
        await workers.tick()
        assert pool.spawned[-1] == ("m", 0, "k")  # a new task for the lost replica
        await workers.stop()
        assert sorted(pool.stopped) == ["w2", "w3"]
    asyncio.run(scenario())


def test_clearml_worker_tasks_are_clones_of_the_instance_told_their_model():
    clone = Recorder(Task)
    clone.id = "clone-1"
    task_class = Recorder(Task, {"clone": lambda **kw: clone})
    instance = Recorder(Task)
    instance.id, instance.name = "instance-1", "SGLang Model Deployment"
    pool = ClearMLWorkerPool(instance, queue="gpu-queue", task_class=task_class)
    assert pool.spawn("m", 1, "engine-key") == "clone-1"
    ((_, clone_kwargs),) = task_class.named("clone")
    assert clone_kwargs["parent"] == "instance-1" and clone_kwargs["source_task"] is instance
    ((_, properties),) = clone.named("set_user_properties")
    assert properties == {"worker_of": "m", "worker_replica": "1", "worker_key": "engine-key"}
    ((args, kwargs),) = task_class.named("enqueue")
    assert args == (clone,) and kwargs == {"queue_name": "gpu-queue"}


def test_clearml_worker_status_url_and_stop():
    worker = Recorder(Task, {"get_status": "in_progress",
                             "get_user_properties": lambda **kw: {"worker_url": "http://10.0.0.7:30000"}})
    task_class = Recorder(Task, {"get_task": lambda **kw: worker})
    pool = ClearMLWorkerPool(Recorder(Task), task_class=task_class)
    assert pool.poll("w1") == ("in_progress", "http://10.0.0.7:30000")
    pool.stop("w1")
    ((_, kwargs),) = worker.named("mark_stopped")
    assert kwargs["force"] is True
    queued = Recorder(Task, {"get_status": "queued"})
    task_class = Recorder(Task, {"get_task": lambda **kw: queued})
    ClearMLWorkerPool(Recorder(Task), task_class=task_class).stop("w2")
    assert task_class.named("dequeue") == [((queued,), {})]
