"""ClearML's multi-node launch with the real SDK in offline mode, as far as it goes: locally nothing is enqueued;
the master's configuration is recorded and rank 0 answered. (Under an agent, the seam tests in
tests/unit/test_multi_node.py pin the calls.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SNIPPET = """
import json
from app.clearml.task import DeploymentTask
task = DeploymentTask.start(project="p", name="multi-node", offline=True, monitor_interval_s=5)
info = task.launch_multi_node(3, 29500)
print(json.dumps({"info": [info.nodes, info.rank, info.master_addr, info.master_port],
                  "folder": str(task.offline_folder)}))
task.close()
"""


def test_offline_the_launch_records_the_nodes_and_answers_rank_0(tmp_path):
    env = {**os.environ, "CLEARML_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(ROOT), "CLEARML_OFFLINE_MODE": "1"}
    result = subprocess.run([sys.executable, "-c", SNIPPET], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    answer = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))
    nodes, rank, master_addr, master_port = answer["info"]
    assert (nodes, rank, master_port) == (3, 0, 29500) and master_addr
    recorded = json.loads((Path(answer["folder"]) / "task.json").read_text())["hyperparams"]["launch_multi_node"]
    assert recorded["total_num_nodes"]["value"] == "3"
