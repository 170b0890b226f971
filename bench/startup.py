#!/usr/bin/env python3
"""Startup benchmark: `clearml-sglang run` side by side with SGLang started by hand, on this machine's CPU.

    .venv/bin/python bench/startup.py [--runs 3]

The same model both ways (the tiny model, made offline; already converted, nothing fetched), interleaved:
    sglang    `python -m sglang.launch_server` with the app's flags for it, until its `/health` answers 200
    app       `clearml-sglang run --config ...` (offline ClearML), until the gateway's `/readyz` answers 200;
              its own account of the app's part (`startup_own_seconds`, from the offline task's properties)
The ratio app / sglang is computed within each run; bench/results/startup.json holds every run and the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "startup.json"
TOKEN = "bench-token-0123456789"
DEADLINE_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_200(url: str, process: subprocess.Popen, started: float) -> float:
    while time.monotonic() - started < DEADLINE_S:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[:3]} ended with {process.returncode}")
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return time.monotonic() - started
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready in {DEADLINE_S} s")


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def the_config(workdir: Path) -> Path:
    from app.demo import demo_raw
    from app.demo.tiny_model import make_tiny_models

    made = make_tiny_models(workdir / "tiny")
    path = workdir / "tiny.json"
    path.write_text(json.dumps(demo_raw(made.base, made.adapters)))
    return path


def sglang_by_hand(config: Path) -> float:
    """SGLang with the command line `clearml-sglang args` gives for the same config (its key left out)."""
    line = json.loads(subprocess.run([sys.executable, "-m", "app", "args", "--config", str(config)], cwd=ROOT,
                                     capture_output=True, text=True, check=True).stdout.splitlines()[0])
    argv, env = [sys.executable, *line["argv"][1:]], {**os.environ, **line["env"]}
    port = free_port()
    argv[argv.index("--port") + 1] = str(port)
    started = time.monotonic()
    process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        return wait_200(f"http://127.0.0.1:{port}/health", process, started)
    finally:
        stop(process)


def the_app(config: Path, workdir: Path) -> tuple[float, float]:
    port = free_port()
    cache = Path(tempfile.mkdtemp(dir=workdir))
    env = {**os.environ, "CLEARML_OFFLINE_MODE": "1", "CLEARML_CACHE_DIR": str(cache),
           "CLEARML_SGLANG_API_TOKENS": TOKEN}
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "app", "run", "--config", str(config), "--port", str(port),
                                "--host", "127.0.0.1"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        ready = wait_200(f"http://127.0.0.1:{port}/readyz", process, started)
        own = None
        while own is None and time.monotonic() - started < DEADLINE_S:  # (written just after ready)
            own = _own_seconds(cache)
            time.sleep(0.1)
        return ready, float(own)
    finally:
        stop(process)


def _own_seconds(cache: Path) -> str | None:
    for task in (cache / "offline").glob("*/task.json"):
        try:
            properties = json.loads(task.read_text())["hyperparams"].get("properties", {})
        except ValueError:  # (being written)
            continue
        if "startup_own_seconds" in properties:
            return properties["startup_own_seconds"]["value"]
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        config = the_config(workdir)
        for run in range(args.runs):
            sglang_s = sglang_by_hand(config)
            app_s, own_s = the_app(config, workdir)
            runs.append({"sglang_s": round(sglang_s, 2), "app_s": round(app_s, 2), "app_own_s": own_s,
                         "ratio": round(app_s / sglang_s, 3)})
            print(f"run {run + 1}: {runs[-1]}", flush=True)
    median = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    RESULTS.write_text(json.dumps({"what": __doc__.splitlines()[0],
                                   "command": shlex.join(["bench/startup.py", "--runs", str(args.runs)]),
                                   "runs": runs, "median": median}, indent=2) + "\n")
    print(f"median: {median}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
