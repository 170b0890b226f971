"""A machine of a model spanning nodes (rank > 0), end to end with the stand-in SGLang server: it runs its rank's
command, serves nothing, and stops when the master's task ends, when its engine dies, or on a signal; no process is
left behind either way."""

from __future__ import annotations

import asyncio
import signal
import sys

from app.config import load_config
from app.serving.deployment import RunOptions
from app.serving.gpus import Gpu
from app.serving.node import Master, RankNode, ReplicaWorker, WorkerOrder
from app.sglang.command import MultiNode
from tests.fakes.registry import NoRegistry
from tests.harness import FAKE, RecordingReporter, _no_children, _until, run_async

RANK_1 = MultiNode(nodes=2, rank=1, master_addr="127.0.0.1", master_port=29555)


def node(*overrides: str, master: list[bool]) -> tuple[RankNode, RecordingReporter]:
    config = load_config(overrides=["models.0.model=org/big", "models.0.endpoint_name=big", "models.0.nodes=2",
                                    "models.0.gpus=1", "models.1.model=org/small", *overrides])
    reporter = RecordingReporter()
    options = RunOptions(launcher=(sys.executable, str(FAKE)), startup_deadline_s=20, engine_stop_grace_s=5)
    deployment = RankNode(config, NoRegistry(), RANK_1, Master(lambda: master[0], watch_interval_s=0.2),
                          reporter=reporter, options=options, detect=lambda: [Gpu(0, "fake", 80.0)])
    return deployment, reporter


def test_a_node_runs_its_rank_and_stops_when_the_master_ends():
    async def scenario():
        master = [True]
        deployment, reporter = node(master=master)
        task = asyncio.create_task(deployment.run())
        await _until(lambda: _active(reporter), "the node to be active")
        argv = deployment.engine.command.argv
        assert argv[argv.index("--node-rank") + 1] == "1" and argv[argv.index("--nnodes") + 1] == "2"
        assert argv[argv.index("--dist-init-addr") + 1] == "127.0.0.1:29555"
        assert argv[argv.index("--tp-size") + 1] == "2" and "org/small" not in argv  # only the spanning model
        master[0] = False
        assert await asyncio.wait_for(task, 20) == 0
        assert reporter.statuses[-1] == ("stopped", "the master node's task ended")
        await _until(_no_children, "the rank to be stopped")
    run_async(scenario())


def test_a_node_whose_engine_dies_fails_with_the_cause():
    async def scenario():
        deployment, reporter = node("env.FAKE_SGLANG_CRASH_AT_STARTUP=NCCL error: unhandled system error",
                                    master=[True])
        assert await asyncio.wait_for(deployment.run(), 20) == 3
        state, reason = reporter.statuses[-1]
        assert state == "failed" and "node 1 of 2" in reason
        await _until(_no_children, "nothing left")
    run_async(scenario())


def test_a_node_stops_on_sigterm():
    async def scenario():
        deployment, reporter = node(master=[True])
        task = asyncio.create_task(deployment.run())
        await _until(lambda: _active(reporter), "the node to be active")
        deployment.request_stop(signal.SIGTERM)
        assert await asyncio.wait_for(task, 20) == 128 + signal.SIGTERM
        await _until(_no_children, "the rank to be stopped")
    run_async(scenario())


async def _active(reporter: RecordingReporter) -> bool:
    return any(state == "active" for state, _ in reporter.statuses)


def test_a_replica_worker_serves_its_model_with_the_instances_key_and_publishes_its_url():
    async def scenario():
        import aiohttp

        master, published = [True], []
        config = load_config(overrides=["models.0.model=org/a", "models.0.endpoint_name=a",
                                        "models.1.model=org/m", "models.1.endpoint_name=m", "models.1.replicas=4"])
        options = RunOptions(launcher=(sys.executable, str(FAKE)), startup_deadline_s=20, engine_stop_grace_s=5,
                             public_host="127.0.0.1")
        worker = ReplicaWorker(config, NoRegistry(), WorkerOrder("m", "instance-engine-key-0123", published.append),
                               Master(lambda: master[0], watch_interval_s=0.2), reporter=RecordingReporter(),
                               options=options, detect=lambda: [Gpu(0, "fake", 80.0)])
        task = asyncio.create_task(worker.run())
        await _until(lambda: _published(published), "the worker to publish its URL")
        argv = worker.engine.command.argv
        assert argv[argv.index("--host") + 1] == "0.0.0.0" and "--dp-size" not in argv  # one replica per worker
        body = {"model": "m", "prompt": "hi", "max_tokens": 2}
        async with aiohttp.ClientSession() as session:
            async with session.post(published[0] + "/v1/completions", json=body) as response:
                assert response.status == 401  # only with the instance's key (its router has it)
            async with session.post(published[0] + "/v1/completions", json=body,
                                    headers={"Authorization": "Bearer instance-engine-key-0123"}) as response:
                assert response.status == 200
        master[0] = False
        assert await asyncio.wait_for(task, 20) == 0
        await _until(_no_children, "the worker's engine to be stopped")
    run_async(scenario())


async def _published(published: list) -> bool:
    return bool(published)
