"""tests/gpu/check_gpu.py's ClearML-monitor check finds the offline session against clearml's real closing output
(without a GPU: the same task, started and closed as the check does, with no GPU work)."""

from __future__ import annotations

import importlib.util
import json

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("check_gpu", ROOT / "tests" / "gpu" / "check_gpu.py")
check_gpu = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_gpu)


def test_the_monitor_check_finds_the_offline_session_whatever_clearml_prints_last(tmp_path):
    run = check_gpu.run_monitor(0, str(tmp_path))
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.strip().splitlines()
    assert "Offline session stored in" in lines[-1]  # clearml 2.1.12's closing line: "the last line" is not the folder
    folder = check_gpu.offline_folder(run.stdout)
    assert folder is not None and folder.is_dir() and folder.parent == tmp_path / "offline"
    task = json.loads((folder / "task.json").read_text())
    assert task["name"] == "monitor"


def test_no_folder_is_none_not_the_last_line():
    assert check_gpu.offline_folder("ClearML Task: Offline session stored in /x.zip\n") is None
