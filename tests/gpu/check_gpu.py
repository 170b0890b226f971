#!/usr/bin/env python3
"""GPU check: detection, placement and the memory split, against a real NVIDIA card. Under two minutes.

Needs nothing but this project (installed, or on PYTHONPATH) and what a CUDA machine with PyTorch has (torch,
nvidia-ml-py). Run it on the GPU machine:

    python tests/gpu/check_gpu.py            # prints one line per check, exit 0 when all hold

What it checks:
1. NVML detection (`app.serving.gpus.detect_gpus`) agrees with CUDA (torch) on the count, names and memory of the
   devices,
   and honours CUDA_VISIBLE_DEVICES.
2. Placement gives models that fit disjoint devices, and an engine pinned by CUDA_VISIBLE_DEVICES sees exactly its
   devices.
3. Models that share a device get memory fractions that really fit: one process per model allocates its share of
   the card at once, and NVML sees every share resident together, under the card's capacity; an over-subscribed
   split is refused before anything starts.
4. The command builder turns a placement into CUDA_VISIBLE_DEVICES and --mem-fraction-static.
5. The app's ClearML task, offline, with ClearML's resource monitor set as the app sets it, records the
   `:monitor:gpu` series (utilisation, memory, temperature) for a minute while a GPU is busy; they are printed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from app.config import load_config  # noqa: E402
from app.errors import ConfigError  # noqa: E402
from app.serving.gpus import MAX_MEMORY_FRACTION_PER_DEVICE, Demand, detect_gpus, place  # noqa: E402
from app.serving.models import describe  # noqa: E402
from app.serving.plan import demands  # noqa: E402
from app.sglang.command import Machine, Site, build_engine_commands  # noqa: E402

# The offline session's folder, on a line of its own: clearml's own lines come around it (`Task.close()` prints
# "ClearML Task: Offline session stored in ….zip" last), so it is found by this prefix, never by its place.
FOLDER_PREFIX = "offline folder: "
MONITOR = """
import sys, time
from app.clearml.task import DeploymentTask
task = DeploymentTask.start(project="gpu-check", name="monitor", offline=True, monitor_interval_s=5)
print(sys.argv[2] + str(task.offline_folder), flush=True)
if float(sys.argv[1]) > 0:
    import torch
    a = torch.randn(4096, 4096, device="cuda")
    end = time.monotonic() + float(sys.argv[1])
    while time.monotonic() < end:  # keep the GPU busy, so utilisation is not 0
        a = (a @ a).tanh()
        torch.cuda.synchronize()
task.close()
"""


def offline_folder(stdout: str) -> Path | None:
    """The monitor run's offline session folder, from its output (None: it never said)."""
    said = [line[len(FOLDER_PREFIX):].strip() for line in stdout.splitlines() if line.startswith(FOLDER_PREFIX)]
    return Path(said[-1]) if said else None


def run_monitor(seconds: float, cache: str) -> subprocess.CompletedProcess:
    """The app's offline ClearML task for `seconds` with the GPU busy (0: no GPU work), closed as the app closes it."""
    root = str(Path(__file__).resolve().parents[2])
    return subprocess.run([sys.executable, "-c", MONITOR, str(seconds), FOLDER_PREFIX], capture_output=True, text=True,
                          timeout=seconds + 90, env={**os.environ, "CLEARML_CACHE_DIR": cache, "PYTHONPATH": root,
                                                     "CLEARML_OFFLINE_MODE": "1"})

CHILD = """
import json, sys, time, torch
fraction = float(sys.argv[1])
free, total = torch.cuda.mem_get_info(0)
block = torch.empty(int(total * fraction), dtype=torch.uint8, device="cuda:0")
print(json.dumps({"count": torch.cuda.device_count(), "allocated": block.numel()}), flush=True)
time.sleep(float(sys.argv[2]))
"""

failures: list[str] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
    if not ok:
        failures.append(name)


def check_monitor(seconds: float = 60.0) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as cache:
        run = run_monitor(seconds, cache)
        folder = offline_folder(run.stdout)
        series: dict[str, list[float]] = {}
        if folder is not None and (folder / "metrics.jsonl").exists():
            for line in (folder / "metrics.jsonl").read_text().splitlines():
                for event in json.loads(line):
                    if event.get("metric") == ":monitor:gpu":
                        series.setdefault(event["variant"], []).append(event["value"])
        for variant, values in sorted(series.items()):
            print(f"     :monitor:gpu {variant}: {len(values)} points, last {values[-1]:.1f}, max {max(values):.1f}")
        wanted = {"gpu_0_utilization", "gpu_0_mem_usage", "gpu_0_temperature"}
        check("ClearML's monitor records :monitor:gpu for a service", wanted <= set(series),
              f"series: {sorted(series)}; {run.stderr[-300:] if run.returncode else ''}")


def main() -> int:
    started = time.monotonic()
    import pynvml
    import torch

    gpus = detect_gpus()
    check("NVML finds the GPUs CUDA finds", len(gpus) == torch.cuda.device_count() and len(gpus) > 0,
          f"NVML {len(gpus)}, torch {torch.cuda.device_count()}")
    for gpu in gpus:
        props = torch.cuda.get_device_properties(gpu.index)
        check(f"GPU {gpu.index} name and memory", abs(props.total_memory / 2**30 - gpu.memory_gib) < 1.0,
              f"{gpu.name}, NVML {gpu.memory_gib:.1f} GiB, torch {props.total_memory / 2**30:.1f} GiB")

    restricted = subprocess.run(
        [sys.executable, "-c", "from app.serving.gpus import detect_gpus; print(len(detect_gpus()))"],
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "0", "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        capture_output=True, text=True, timeout=60)
    check("CUDA_VISIBLE_DEVICES=0 leaves one GPU to detect", restricted.stdout.strip() == "1", restricted.stderr[-200:])

    plan = place([Demand("a", 1, None)] * min(len(gpus), 2), gpus)
    check("models that fit get disjoint devices", len({p.devices for p in plan}) == len(plan),
          str([p.cuda_visible_devices for p in plan]))

    shared = place([Demand("a", 1, None), Demand("b", 1, None)], gpus[:1])
    fractions = [p.memory_fraction for p in shared]
    check("two models on one GPU split its memory", all(shared_p.shared for shared_p in shared)
          and abs(sum(fractions) - MAX_MEMORY_FRACTION_PER_DEVICE) < 0.01, str(fractions))

    hold_s = 8.0
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(f * 0.9), str(hold_s)],
                                 env={**os.environ, "CUDA_VISIBLE_DEVICES": p.cuda_visible_devices},
                                 stdout=subprocess.PIPE, text=True) for p, f in zip(shared, fractions, strict=True)]
    reports = [json.loads(c.stdout.readline() or "{}") for c in children]
    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    used = pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**30
    total = pynvml.nvmlDeviceGetMemoryInfo(handle).total / 2**30
    procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
    pynvml.nvmlShutdown()
    for c in children:
        c.wait(timeout=60)
    check("each sharing engine sees exactly its device", all(r.get("count") == 1 for r in reports), str(reports))
    check("both shares are resident at once, under the card's capacity",
          all(c.returncode == 0 for c in children) and used < total,
          f"{used:.1f} of {total:.1f} GiB used, {len(procs)} processes")

    try:
        place([Demand("a", 1, 0.6), Demand("b", 1, 0.5)], gpus[:1])
        check("an over-subscribed split is refused", False)
    except ConfigError as exc:
        check("an over-subscribed split is refused", True, str(exc.problems[0]))

    config = load_config(overrides=["models.0.model=org/a", "models.1.model=org/b"])
    machine = Machine(gpu_count=1, gpu_memory_gib=gpus[0].memory_gib)
    placements = place(demands(config, machine), gpus[:1])
    commands = build_engine_commands(config, describe(config), [30000, 30001], site=Site(machine),
                                     placements=placements)
    check("the builder pins and splits", all(c.env.get("CUDA_VISIBLE_DEVICES") == "0"
                                             and "--mem-fraction-static" in c.argv for c in commands),
          " | ".join(f"{c.env['CUDA_VISIBLE_DEVICES']} {c.argv[c.argv.index('--mem-fraction-static') + 1]}"
                     for c in commands))

    check_monitor()
    print(f"{'all checks hold' if not failures else f'{len(failures)} failed'} in {time.monotonic() - started:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
