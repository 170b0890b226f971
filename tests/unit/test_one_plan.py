"""One planning path: what `clearml-sglang args` prints is what `run` carries out.

For every example config, the demo config and a few that exercise what `args` once left out (routers, replica
servers, worker tasks, models sleeping on a shared GPU, a model spanning nodes), `args` on a described machine and
the plan a `Deployment` would carry out on that machine (computed without starting anything) hold the same
processes: the same argv, environment and memory fractions, port for port.
"""

from __future__ import annotations

import json
import sys

import pytest

from app import constants
from app.config import load_config
from app.demo import demo_raw
from app.serving.deployment import Deployment
from app.serving.gpus import Gpu
from app.serving.models import describe
from app.serving.node import Master, RankNode
from app.serving.plan import node_plan
from app.sglang.command import Launch, MultiNode
from tests.conftest import EXAMPLES, run_cli
from tests.fakes.registry import NoRegistry

FIRST_PORT = 30000
GPU_MEMORY_GIB = 80.0
# ClearML's multi-node launch tells rank 0 the master's address; `args` shows it as the placeholder
RANK_0 = MultiNode(2, 0, "MASTER_ADDR", constants.MULTI_NODE_PORT)

CASES = {
    **{f"example {p.stem}": ([str(p)], [], 8) for p in sorted(EXAMPLES.glob("*.yaml"))},
    "two models on one GPU, shared": ([str(EXAMPLES / "two-models.yaml")], [], 1),
    "three models on one GPU, sleeping": ([str(EXAMPLES / "two-models.yaml")], ["models.2.model=org/c",
                                                                                "general.auto_cpu_offload=true"], 1),
    "replicas as servers behind a router (CPU)": ([], ["models.0.model=org/m", "general.device=cpu",
                                                       "models.0.replicas=3"], 8),
    "replicas beyond the machine go to worker tasks": ([], ["models.0.model=org/m", "models.0.gpus=4",
                                                            "models.0.replicas=3"], 8),
    "a model spanning nodes beside one that does not": ([], ["models.0.model=org/big", "models.0.gpus=8",
                                                             "models.0.nodes=2", "models.1.model=org/small"], 8),
}


class NoWorkerPool:
    """Run under an agent (worker tasks possible), as `args` describes it; nothing is spawned while planning."""

    def spawn(self, endpoint: str, replica: int, engine_key: str | None) -> str:  # pragma: no cover
        raise AssertionError("planning spawns nothing")

    def poll(self, worker_id: str) -> tuple[str, str | None]:  # pragma: no cover
        raise AssertionError("planning polls nothing")

    def stop(self, worker_id: str) -> None:  # pragma: no cover
        raise AssertionError("planning stops nothing")


def gpus(count: int) -> list[Gpu]:
    return [Gpu(i, "described", GPU_MEMORY_GIB) for i in range(count)]


def args_side(files: list[str], overrides: list[str], gpu_count: int) -> list[dict]:
    sets = [token for o in overrides for token in ("--set", o)]
    source = ["--config", files[0]] if files else []
    result = run_cli("args", *source, *sets, "--gpu-count", str(gpu_count), "--gpu-memory-gib", str(GPU_MEMORY_GIB),
                     "--engine-port", str(FIRST_PORT))
    assert result.code == 0, result.err
    return result.lines()


def run_side(config, gpu_count: int, monkeypatch) -> list[dict]:
    monkeypatch.setattr("app.serving.deployment.free_ports",
                        lambda count, exclude=frozenset(): list(range(FIRST_PORT, FIRST_PORT + count)))
    spans = any(m.nodes > 1 for m in config.models)
    deployment = Deployment(config, NoRegistry(), detect=lambda: gpus(gpu_count), worker_pool=NoWorkerPool(),
                            multi_node=RANK_0 if spans else None)
    planned = deployment.plan(describe(config))
    return [as_printed(c.describe()) for c in planned.processes]


def as_printed(line: dict) -> dict:
    """A line as `args` prints it: the interpreter of the machine that runs the deployment is `python` there."""
    argv = [("python" if token == sys.executable else token) for token in line["argv"]]
    return json.loads(json.dumps({**line, "argv": argv}))


@pytest.mark.parametrize("case", sorted(CASES))
def test_args_prints_what_run_runs(case, monkeypatch):
    files, overrides, gpu_count = CASES[case]
    printed = args_side(files, overrides, gpu_count)
    run = run_side(load_config(files[0] if files else None, overrides), gpu_count, monkeypatch)
    assert [line["endpoint"] for line in printed] == [line["endpoint"] for line in run]
    for shown, carried in zip(printed, run, strict=True):
        assert shown["argv"] == carried["argv"], shown["endpoint"]  # memory fractions included
        assert shown["env"] == carried["env"], shown["endpoint"]
    if "nodes" not in case:  # (args says how the other ranks go; rank 0 is told, not told about them)
        assert printed == run


def test_the_demo_config_too(tmp_path, monkeypatch):
    base, adapter = tmp_path / "tiny", tmp_path / "adapter"
    base.mkdir()
    adapter.mkdir()
    path = tmp_path / "demo.json"
    path.write_text(json.dumps(demo_raw(base, (adapter,))))
    assert args_side([str(path)], [], 8) == run_side(load_config(str(path)), 8, monkeypatch)


def test_what_args_leaves_out_no_more(monkeypatch):
    """Routers, replica servers, worker tasks and the fractions of sleeping models: what `args` once omitted."""
    cpu = args_side([], CASES["replicas as servers behind a router (CPU)"][1], 8)
    assert [line["endpoint"] for line in cpu] == ["m/0", "m/1", "m/2", "m"]
    assert "sglang_router.launch_router" in cpu[-1]["argv"]
    split = args_side([], CASES["replicas beyond the machine go to worker tasks"][1], 8)
    assert split[0]["argv"][split[0]["argv"].index("--dp-size") + 1] == "2"
    assert "and 1 replica(s) in worker tasks" in split[-1]["notes"][-1]
    sleeping = args_side(*CASES["three models on one GPU, sleeping"])  # two resident at a time (was 0.293 each)
    assert [line["argv"][line["argv"].index("--mem-fraction-static") + 1] for line in sleeping] == ["0.44"] * 3


def test_a_rank_node_runs_rank_0s_command_but_its_rank(monkeypatch):
    """The node variant of the plan: another rank's command is rank 0's, but --node-rank (a model on its own)."""
    overrides = ["models.0.model=org/big", "models.0.gpus=8", "models.0.nodes=2"]
    config = load_config(overrides=overrides)
    (rank_0,) = run_side(config, 8, monkeypatch)
    rank_1 = node_plan(config, 0, describe(config)[0], gpus(8), FIRST_PORT, launch=Launch("key"),
                       multi_node=MultiNode(2, 1, "MASTER_ADDR", constants.MULTI_NODE_PORT))
    argv = as_printed(rank_1.command.describe())["argv"]
    rank = argv.index("--node-rank") + 1
    assert argv[:rank] + argv[rank + 1:] == rank_0["argv"][:rank] + rank_0["argv"][rank + 1:]
    assert (argv[rank], rank_0["argv"][rank]) == ("1", "0")
    node = RankNode(config, NoRegistry(), MultiNode(2, 1, "MASTER_ADDR", constants.MULTI_NODE_PORT),
                    Master(lambda: True), detect=lambda: gpus(8))
    assert node.plan(describe(config)[0], FIRST_PORT).command.argv[1:] == rank_1.command.argv[1:]

