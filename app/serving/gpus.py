"""GPUs: how many this machine has (NVML), and which devices and memory share each engine gets (pure).

Placement rules:
- every model gets `gpus x replicas` devices; when the models' needs fit the machine, each gets its own devices
  (its own CUDA_VISIBLE_DEVICES) and SGLang's own memory default;
- when they do not fit, models share devices and the split of each device's memory is explicit: every engine
  gets `--mem-fraction-static` (the user's per-model value, or an even share), and the sum on a device must leave
  SGLang its headroom. A model that needs more devices than the machine has is an error.
- when models may sleep (CPU offloading or disk swapping), sharers need not fit together: each gets the user's
  fraction or half the device's budget (two resident at a time), and `app.serving.residency` keeps the resident ones
  within the budget, measured.

Example::

    devices = detect_gpus()                                   # [Gpu(index=0, memory_gib=139.8, ...)]
    plan = place([Demand("qwen", 1, None), Demand("gpt2", 1, None)], devices)
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from app.errors import ConfigError, Problem

logger = logging.getLogger(__name__)

# SGLang's static memory fraction is at most about 0.9 of a device; what is left covers activations and graphs.
MAX_MEMORY_FRACTION_PER_DEVICE = 0.88
# Models that may sleep share a device by default as this many residents at a time (each gets that share).
RESIDENT_SHARERS_WHEN_SLEEPING = 2
# Below this an engine cannot hold a useful KV cache next to its weights: the split is refused instead.
MIN_MEMORY_FRACTION = 0.05


@dataclass(frozen=True)
class Gpu:
    index: int  # as CUDA numbers it in this process (after CUDA_VISIBLE_DEVICES)
    name: str
    memory_gib: float


@dataclass(frozen=True)
class Demand:
    """What one model asks for."""

    endpoint: str
    devices: int  # gpus x replicas
    memory_fraction: float | None  # the user's --mem-fraction-static, if set
    where: str = ""  # the config field, for messages


@dataclass(frozen=True)
class Placement:
    devices: tuple[int, ...]
    memory_fraction: float | None  # when devices are shared: the engine's --mem-fraction-static
    shared: bool = False

    @property
    def cuda_visible_devices(self) -> str:
        return ",".join(str(d) for d in self.devices)


def available_memory() -> int:
    """This machine's available RAM in bytes (the CPU development mode's engines keep their KV cache there)."""
    import psutil

    return int(psutil.virtual_memory().available)


def detect_gpus() -> list[Gpu]:
    """The GPUs this process may use, from NVML; empty without a driver (a CPU machine)."""
    try:
        import pynvml
    except ImportError:
        logger.info("nvidia-ml-py is not installed: no GPUs detected")
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        logger.info("No NVIDIA driver (%s): no GPUs detected", exc)
        return []
    try:
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        gpus = []
        for physical, handle in enumerate(handles):
            name = pynvml.nvmlDeviceGetName(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle).total / 2**30
            gpus.append((physical, Gpu(physical, name.decode() if isinstance(name, bytes) else name, memory)))
    finally:
        pynvml.nvmlShutdown()
    visible = _visible_devices(os.environ.get("CUDA_VISIBLE_DEVICES"), len(gpus))
    return [Gpu(i, gpu.name, gpu.memory_gib) for i, (_, gpu) in enumerate(g for g in gpus if g[0] in visible)]


def _visible_devices(value: str | None, count: int) -> list[int]:
    """Physical indices CUDA_VISIBLE_DEVICES allows (integers only; UUID lists keep every device)."""
    if value is None or not value.strip():
        return list(range(count))
    if value.strip() in ("none", "-1"):
        return []
    parts = [p.strip() for p in value.split(",")]
    if not all(p.isdigit() for p in parts):
        return list(range(count))
    return [int(p) for p in parts if int(p) < count]


def place(demands: list[Demand], gpus: list[Gpu], *, sleeping: bool = False) -> list[Placement]:
    """Assign devices (and, when shared, memory fractions) to every model; ConfigError when impossible.
    `sleeping`: models may give their memory back while idle, so sharers need not all fit at once."""
    count = len(gpus)
    problems = [Problem(d.where or d.endpoint, f"needs {d.devices} GPUs; this machine has {count}",
                        "lower gpus or replicas, or enqueue to a queue whose machines have more GPUs")
                for d in demands if d.devices > count]
    if problems:
        raise ConfigError(problems)
    if sum(d.devices for d in demands) <= count:
        placements, start = [], 0
        for d in demands:
            placements.append(Placement(tuple(range(start, start + d.devices)), None))
            start += d.devices
        return placements
    return _share(demands, count, sleeping)


def _share(demands: list[Demand], count: int, sleeping: bool = False) -> list[Placement]:
    # Fill devices round-robin from device 0, so the engines spread as evenly as their sizes allow.
    load = [0] * count
    assigned: list[tuple[int, ...]] = []
    for d in demands:
        best = min(range(count - d.devices + 1), key=lambda s: (max(load[s:s + d.devices]), s))
        devices = tuple(range(best, best + d.devices))
        for i in devices:
            load[i] += 1
        assigned.append(devices)
    fractions = []
    for d, devices in zip(demands, assigned, strict=True):
        sharers = max(load[i] for i in devices)
        if sleeping:
            sharers = min(sharers, RESIDENT_SHARERS_WHEN_SLEEPING)
        fractions.append(d.memory_fraction or round(MAX_MEMORY_FRACTION_PER_DEVICE / sharers, 3))
    if sleeping:  # the residency ledger keeps the resident ones within each device's budget
        return [Placement(devices, f, shared=True) for devices, f in zip(assigned, fractions, strict=True)]
    problems = []
    for i in range(count):
        on_device = [(d, f) for d, devices, f in zip(demands, assigned, fractions, strict=True) if i in devices]
        total = sum(f for _, f in on_device)
        if total > MAX_MEMORY_FRACTION_PER_DEVICE + 1e-9:
            names = ", ".join(f"{d.endpoint} {f:g}" for d, f in on_device)
            problems.append(Problem(f"GPU {i}", f"the models sharing it ask for {total:.2f} of its memory ({names})",
                                    f"set mem-fraction-static per model so they add up to at most "
                                    f"{MAX_MEMORY_FRACTION_PER_DEVICE}, or use fewer models per machine"))
    for d, f in zip(demands, fractions, strict=True):
        if f < MIN_MEMORY_FRACTION:
            problems.append(Problem(d.where or d.endpoint, f"would get only {f:g} of a shared GPU's memory",
                                    "serve fewer models on this machine, or give them more GPUs"))
    if problems:
        raise ConfigError(problems)
    return [Placement(devices, f, shared=True) for devices, f in zip(assigned, fractions, strict=True)]
