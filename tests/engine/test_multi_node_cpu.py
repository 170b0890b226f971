"""A model spanning two nodes, both ranks of the real SGLang on this CPU over loopback: rank 0 is the app's
`Deployment` (gateway in front), rank 1 the app's `RankNode`, each told its rank as ClearML's multi-node
launch would tell it. Requests are answered through rank 0's gateway; stopping the master stops both.

On the CPU SGLang needs SGLANG_CPU_OMP_THREADS_BIND for more than one rank and gloo instead of the CUDA build's
NCCL (app.sglang.cpu); with those, tensor parallelism over two processes works. Skipped where sglang is not
installed; CI runs it on the engine install.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

pytest.importorskip("sglang")

import psutil  # noqa: E402
import requests  # noqa: E402

from app.config import load_config  # noqa: E402
from app.demo.tiny_model import make_tiny_models  # noqa: E402
from app.serving.deployment import Deployment, RunOptions  # noqa: E402
from app.serving.network import free_ports  # noqa: E402
from app.serving.node import Master, RankNode  # noqa: E402
from app.sglang.command import MultiNode  # noqa: E402
from tests.engine.test_real_engine import AUTH, STARTUP_DEADLINE_S, TOKEN, readyz  # noqa: E402
from tests.fakes.registry import NoRegistry  # noqa: E402

pytestmark = pytest.mark.engine


def test_two_ranks_on_loopback_serve_through_the_gateway_and_stop_together(tmp_path):
    models = make_tiny_models(Path(tmp_path) / "tiny")
    config = load_config(overrides=[
        f"models.0.model={models.base}", "models.0.endpoint_name=tiny", "models.0.max-total-tokens=4096",
        "models.0.nodes=2", "general.device=cpu", f"auth.tokens={TOKEN}", "idle.report_interval_seconds=2"])
    (dist_port,) = free_ports(1)
    options = RunOptions(host="127.0.0.1", port=0, public_host="127.0.0.1", startup_deadline_s=STARTUP_DEADLINE_S,
                         drain_deadline_s=30)
    master_runs = [True]
    master = Deployment(config, NoRegistry(), options=options,
                        multi_node=MultiNode(2, 0, "127.0.0.1", dist_port))
    other = RankNode(config, NoRegistry(), MultiNode(2, 1, "127.0.0.1", dist_port),
                     Master(lambda: master_runs[0], watch_interval_s=0.5), options=options)
    loop = asyncio.new_event_loop()
    codes: dict[str, int] = {}

    async def both() -> None:
        async def one(name, deployment):
            codes[name] = await deployment.run()
        await asyncio.gather(one("master", master), one("node", other))

    thread = threading.Thread(target=loop.run_until_complete, args=(both(),), daemon=True)
    thread.start()
    try:
        base = _ready(master)
        argv = master.supervisor.engines[0].command.argv
        assert argv[argv.index("--node-rank") + 1] == "0" and argv[argv.index("--tp-size") + 1] == "2"
        answer = requests.post(base + "/v1/completions", headers=AUTH, timeout=120,
                               json={"model": "tiny", "prompt": "import os", "max_tokens": 8, "temperature": 0})
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 8
        assert master.states() == {"tiny": "resident", "tiny/node0": "resident", "tiny/node1": "resident"}
    finally:
        master_runs[0] = False
        loop.call_soon_threadsafe(master.request_stop, 15)
        thread.join(120)
    assert codes == {"master": 143, "node": 0}
    assert not psutil.Process().children(recursive=True)


def _ready(master: Deployment) -> str:
    import time

    deadline = time.monotonic() + STARTUP_DEADLINE_S
    while time.monotonic() < deadline:
        gateway = master.gateway
        if gateway is not None and gateway.port:
            base = f"http://127.0.0.1:{gateway.port}"
            if readyz(base) == 200:
                return base
        time.sleep(0.5)
    raise AssertionError("rank 0 was not ready in time")
