"""Pre-flight's estimate against what is really there, for the tiny test model and the demo model
(SmolLM2-135M-Instruct): the KV cache's bytes per token from config.json within 10% of what the real SGLang allocates
on this CPU (`KV Cache is allocated. … #tokens: N, K size: a GB, V size: b GB`), and the weights' bytes from the
safetensors headers equal to the tensors' own, loaded. (SGLang's `Load weight end … mem usage=X GB` is no measure of
the weights on the CPU: it is the change of the machine's available memory, `psutil.virtual_memory().available`,
in `get_available_gpu_memory`; for SmolLM2 it says 0.21 GB of 0.25 GiB of tensors.)"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("sglang")

from safetensors.torch import load_file  # noqa: E402

from app.config import parse_config  # noqa: E402
from app.demo import cache_dir, demo_raw, smollm_raw  # noqa: E402
from app.demo.smollm import prepare  # noqa: E402
from app.demo.tiny_model import make_tiny_models  # noqa: E402
from app.preflight.estimate import kv_bytes_per_token, weights_bytes  # noqa: E402
from app.preflight.files import read_local  # noqa: E402
from app.serving.models import describe  # noqa: E402
from app.serving.network import free_ports  # noqa: E402
from app.sglang.command import Launch, build_engine_command  # noqa: E402

pytestmark = pytest.mark.engine

GIB = 1024**3
WEIGHTS = re.compile(r"Load weight end\..*mem usage=([\d.]+) GB")
KV = re.compile(r"KV Cache is allocated\..*#tokens: (\d+), K size: ([\d.]+) GB, V size: ([\d.]+) GB")


def free_port() -> int:
    """A port for the app under test, below the range outgoing connections take theirs from (`free_ports`)."""
    return free_ports(1)[0]


def sglang_figures(raw: dict, deadline_s: float = 600) -> tuple[float | None, int, float]:
    """SGLang's own figures for the first model of `raw`: its weights' GiB (None where it logs none), the KV
    cache's tokens and its GiB (K and V)."""
    config = parse_config(raw)
    command = build_engine_command(config, 0, describe(config)[0], port=free_port(), launch=Launch("engine-key"))
    engine = subprocess.Popen(command.argv, env={**os.environ, **command.env}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    weights, end = None, time.monotonic() + deadline_s
    try:
        for line in engine.stdout:
            if found := WEIGHTS.search(line):
                weights = float(found.group(1))
            if found := KV.search(line):
                tokens, k, v = int(found.group(1)), float(found.group(2)), float(found.group(3))
                return weights, tokens, k + v
            assert time.monotonic() < end, "SGLang did not allocate its KV cache in time"
        raise AssertionError(f"SGLang ended ({engine.wait()}) before allocating its KV cache")
    finally:
        os.killpg(engine.pid, signal.SIGKILL)
        engine.wait(30)


def within(estimate: float, measured: float, rounding: float) -> bool:
    """Within 10% of SGLang's figure, or of what it rounds to (it logs two decimals of a GB)."""
    return abs(estimate - measured) <= max(0.10 * measured, rounding)


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_weights_and_kv_per_token_match_what_sglang_allocates(which, tmp_path_factory):
    if which == "tiny":
        made = make_tiny_models(tmp_path_factory.mktemp("tiny"))
        raw = demo_raw(made.base, made.adapters)
    else:
        made = prepare(cache_dir() / "smollm2", lambda text: None)
        raw = smollm_raw(made.base, made.adapters)
    raw["models"][0]["lora"] = {"enable": False}
    found = read_local(Path(made.base))
    estimated_weights = weights_bytes(found.tensors) / GIB
    estimated_kv = kv_bytes_per_token(found.config).bytes_per_token
    _, tokens, measured_kv_gib = sglang_figures(raw)
    assert within(estimated_kv * tokens / GIB, measured_kv_gib, 0.01), (estimated_kv, tokens, measured_kv_gib)
    loaded = sum(tensor.nbytes for path in Path(made.base).glob("*.safetensors")
                 for tensor in load_file(str(path)).values())
    assert estimated_weights * GIB == loaded
