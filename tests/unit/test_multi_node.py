"""A model spanning nodes: every rank's SGLang command line, and ClearML's multi-node launch through the adapter
seam (every call checked against the real SDK's signature)."""

from __future__ import annotations

import inspect

import pytest
from clearml import Task

from app.clearml.task import DeploymentTask
from app.config import load_config
from app.serving.models import ResolvedModel
from app.sglang.command import Launch, Machine, MultiNode, Site, build_engine_command
from tests.unit.test_args_golden import ALWAYS
from tests.unit.test_clearml_task import FakeSession, Recorder

CONFIG = load_config(overrides=["models.0.model=org/big", "models.0.endpoint_name=big", "models.0.gpus=8",
                                "models.0.nodes=3", "models.0.context-length=32768",
                                "models.1.model=org/small", "models.1.endpoint_name=small", "models.1.gpus=1"])
RESOLVED = ResolvedModel("big", "/models/big", "org/big")


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_every_rank_runs_the_same_command_but_its_rank(rank):
    command = build_engine_command(CONFIG, 0, RESOLVED, port=30000, launch=Launch(engine_api_key="k" * 48),
                                   site=Site(Machine(8, 80.0), multi_node=MultiNode(nodes=3, rank=rank,
                                                                                    master_addr="10.0.0.5",
                                                                                    master_port=29500)))
    assert command.masked_argv()[3:] == [
        "--model-path", "/models/big", "--host", "127.0.0.1", "--port", "30000",
        "--served-model-name", "big", "--tp-size", "24", "--context-length", "32768",
        "--nnodes", "3", "--node-rank", str(rank), "--dist-init-addr", "10.0.0.5:29500", *ALWAYS]
    assert command.secret_args == {"--api-key": "k" * 48}  # the engine's key: never on the command line


def test_a_model_on_one_node_gets_no_multi_node_flags():
    command = build_engine_command(CONFIG, 1, ResolvedModel("small", "org/small", "org/small"), port=30001,
                                   site=Site(Machine(8, 80.0),
                                             multi_node=MultiNode(nodes=3, rank=1, master_addr="10.0.0.5",
                                                                  master_port=29500)))
    assert "--nnodes" not in command.argv and command.argv[command.argv.index("--tp-size") + 1] == "1"


def clearml_task(returns: dict, *, remote: bool = True, offline: bool = False):
    task = Recorder(Task, returns)
    return task, DeploymentTask(task, remote=remote, offline=offline, session=FakeSession())


def test_the_master_launches_the_other_nodes_through_clearml():
    task, adapter = clearml_task({"launch_multi_node": lambda **kw: {
        "master_addr": "10.0.0.5", "master_port": 29500, "node_rank": 0, "total_num_nodes": 3, "wait": False}})
    assert adapter.launch_multi_node(3, 29500) == MultiNode(3, 0, "10.0.0.5", 29500)
    ((args, kwargs),) = task.named("launch_multi_node")
    assert kwargs == {"total_num_nodes": 3, "port": 29500, "wait": False}


def test_a_node_reads_its_rank_as_clearml_stored_it():
    # on a clone the SDK rebuilds the configuration from runtime properties: strings
    _, adapter = clearml_task({"launch_multi_node": lambda **kw: {
        "master_addr": "10.0.0.5", "master_port": "29500", "node_rank": "2", "total_num_nodes": "3"}})
    assert adapter.launch_multi_node(3, 29500) == MultiNode(3, 2, "10.0.0.5", 29500)


@pytest.mark.parametrize("status, running", [("in_progress", True), ("queued", True), ("stopped", False),
                                             ("completed", False), ("failed", False)])
def test_a_node_follows_the_master_tasks_status(status, running):
    class Master:
        def get_status(self):
            return status

    class TaskClass:
        @staticmethod
        def get_task(task_id=None, **kwargs):
            inspect.signature(Task.get_task).bind(task_id=task_id, **kwargs)
            assert task_id == "master-1"
            return Master()

    task = Recorder(Task)
    task.parent = "master-1"
    adapter = DeploymentTask(task, remote=True, offline=False, session=FakeSession(), task_class=TaskClass)
    assert adapter.master_running() is running
