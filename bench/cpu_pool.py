#!/usr/bin/env python3
"""CPU memory benchmark: deployments of the tiny model side by side on this CPU, each benchmarked at a concurrency
(`clearml-sglang bench`: SGLang's own `sglang.benchmark.serving` through the endpoint), against what each startup
summary said its engine would hold.

    .venv/bin/python bench/cpu_pool.py [--deployments 2] [--concurrency 8] [--rounds 8] [--set KEY=VALUE ...]

Every 0.25 s it reads the resident memory (RSS) of each engine's processes together (`python -m app.sglang.launch
-m sglang.launch_server` and its children: tokenizer manager, scheduler, detokenizer), and keeps the most each held.
The summary's "expected resident" (`app.sglang.pool`: SGLang's runtime + weights + the KV pool it sized) is read from
the deployment's console. bench/results/cpu_pool.json holds every deployment's figures, written as each ends, and
whether the kernel killed any process (exit -9 / an OOM line on the console). `--set` adds a setting to every
deployment (`models.0.max-total-tokens=...` compares a pool sized by hand).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "cpu_pool.json"
TOKEN = "bench-token-0123456789"
SAMPLE_S = 0.25
EXPECTED = re.compile(r"expected resident ([0-9.]+) (GiB|MiB)")
GIB = 1024**3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_memory(root: psutil.Process) -> tuple[int, int]:
    """The resident bytes of the engines under a deployment's process (each launcher and its descendants), summed
    over the processes (RSS: shared pages counted in each) and proportionally (PSS: shared pages split)."""
    rss = pss = 0
    try:
        descendants = root.children(recursive=True)
    except psutil.Error:
        return 0, 0
    for process in descendants:
        try:
            if "sglang.launch_server" not in " ".join(process.cmdline()):
                continue
            for member in [process, *process.children(recursive=True)]:
                info = member.memory_full_info()
                rss, pss = rss + info.rss, pss + info.pss
        except psutil.Error:
            continue
    return rss, pss


def run_one(index: int, base: Path, model: Path, concurrency: int, rounds: int, settings: list[str], out: dict) -> None:
    """One deployment's bench, its engines' peak RSS sampled until it exits."""
    cache = base / f"clearml-{index}"
    argv = [sys.executable, "-m", "app", "bench", "--offline", "--port", str(free_port())]
    for setting in (f"models.0.model={model}", f"models.0.endpoint_name=tiny{index}",
                    "general.device=cpu", f"benchmark.concurrencies={concurrency}", f"benchmark.rounds={rounds}",
                    "benchmark.input_tokens=512", "benchmark.output_tokens=64", "benchmark.max_seconds=600",
                    *settings):
        argv += ["--set", setting]
    env = {**os.environ, "CLEARML_CACHE_DIR": str(cache), "CLEARML_OFFLINE_MODE": "1", "HOME": str(base / f"h{index}"),
           "CLEARML_SGLANG_API_TOKENS": TOKEN}
    env.pop("CLEARML_TASK_ID", None)
    log = base / f"console-{index}.txt"
    with log.open("w") as console:
        process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=console, stderr=subprocess.STDOUT)
        root, peak, at_ready = psutil.Process(process.pid), (0, 0), None
        while process.poll() is None:
            now = engine_memory(root)
            peak = (max(peak[0], now[0]), max(peak[1], now[1]))
            if at_ready is None and "Ready in" in log.read_text(errors="replace"):
                at_ready = now
            time.sleep(SAMPLE_S)
    text = log.read_text(errors="replace")
    expected = EXPECTED.search(text)
    at_ready = at_ready or (0, 0)
    out.update(exit=process.returncode, peak_rss_gib=round(peak[0] / GIB, 3), peak_pss_gib=round(peak[1] / GIB, 3),
               ready_rss_gib=round(at_ready[0] / GIB, 3), ready_pss_gib=round(at_ready[1] / GIB, 3),
               expected_gib=float(expected[1]) / (1024 if expected[2] == "MiB" else 1) if expected else None,
               pool=next((line.strip() for line in text.splitlines() if "KV pool" in line), None),
               benchmark=[line.split(": ", 1)[-1] for line in text.splitlines() if "Benchmark tiny" in line],
               oom="out of memory" in text.lower() or "killed" in text.lower())
    if out["expected_gib"]:
        out["peak_rss_over_expected"] = round(peak[0] / GIB / out["expected_gib"], 3)
        out["peak_pss_over_expected"] = round(peak[1] / GIB / out["expected_gib"], 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deployments", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=8, help="each run sends this many times its concurrency")
    parser.add_argument("--set", action="append", default=[], dest="settings")
    parser.add_argument("--results", type=Path, default=RESULTS)
    options = parser.parse_args()
    from app.demo.tiny_model import make_tiny_models

    base = Path(tempfile.mkdtemp(prefix="cpu-pool-"))
    model = make_tiny_models(base / "tiny").base
    results = {"deployments": [{} for _ in range(options.deployments)], "concurrency": options.concurrency,
               "settings": options.settings, "available_gib_before": round(psutil.virtual_memory().available / GIB, 1)}
    threads = [threading.Thread(target=run_one, args=(i, base, model, options.concurrency, options.rounds,
                                                      options.settings, results["deployments"][i]))
               for i in range(options.deployments)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
        options.results.write_text(json.dumps(results, indent=1) + "\n")  # what it has, as each ends
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
