"""On the CPU, SGLang's memory saver cannot work (it needs CUDA: the engine dies at start, and a release call takes
a running server down; docs/sglang.md, "CPU mode"), so `run` refuses CPU offloading, disk swapping and the raw
flags behind them before anything starts, with the field and the fix named. Runs the installed `clearml-sglang`
as a user would, with the real tiny model on the engine install."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("sglang")

import psutil  # noqa: E402

from app.demo.tiny_model import make_tiny_models  # noqa: E402

pytestmark = pytest.mark.engine


@pytest.mark.parametrize("overrides, field, fix", [
    (["general.auto_cpu_offload=true"], "general.auto_cpu_offload", "turn auto_cpu_offload off"),
    (["general.disk_swap=true"], "general.disk_swap", "turn disk_swap off"),
    (["models.0.cli=--enable-memory-saver --max-total-tokens 2048"], "models[0].cli", "general.auto_cpu_offload"),
    (["models.0.cli=--cpu-offload-gb 2"], "models[0].cli", "general.max_cuda_memory_gib"),
    (["general.max_cuda_memory_gib=200"], "general.max_cuda_memory_gib", "set it to 0"),
])
def test_cpu_mode_refuses_sleeping_with_a_clear_error_and_starts_nothing(tmp_path_factory, overrides, field, fix):
    models = make_tiny_models(tmp_path_factory.getbasetemp() / "tiny")
    argv = [sys.executable, "-m", "app", "run", "--offline", "--port", "0", "--set", "general.device=cpu",
            "--set", f"models.0.model={models.base}"]
    for override in overrides:
        argv += ["--set", override]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    children = set()
    try:
        while process.poll() is None:
            children |= {c.pid for c in psutil.Process(process.pid).children(recursive=True)}
            try:
                process.wait(0.05)
            except subprocess.TimeoutExpired:
                pass
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 2, err
    assert f"{field}:" in err and fix in err and "Traceback" not in err
    assert not children  # no engine was ever launched
