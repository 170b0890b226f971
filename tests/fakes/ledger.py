"""The emulated GPU memory ledger that fake SGLang servers on one "device" share (FAKE_SGLANG_DEVICE_LEDGER).

The ledger is one JSON file; every read-modify-write holds an exclusive `fcntl.flock` on the sibling file
`<ledger>.lock`, and readers hold a shared one, so several fake servers (separate processes) and the tests can use it
at once. It is replaced atomically (write a temporary file, then `os.replace`). Shape:

    {
      "capacity_gib": 8.0,                      # set by the first fake that creates the file
      "used": {"30001": {"weights": 3.0, "kv_cache": 2.0, "cuda_graph": 0.0}},   # resident GiB, per port and tag
      "pids": {"30001": 12345},                 # the process holding each entry
      "used_gib": 5.0,                          # sum of "used"
      "peak_gib": 5.0,                          # the highest used_gib ever recorded
      "events": [{"t": 1700000000.0, "port": 30001, "event": "allocate", "tags": ["weights", "kv_cache",
                  "cuda_graph"], "gib": 5.0, "used_gib": 5.0}, ...]
    }

Events: `allocate` (startup), `release` and `resume` (memory saver), `free` (the process exited, or died: a real
driver reclaims a dead process's memory; entries whose pid is gone are reclaimed by the next update, with
`"reason": "process gone"`), and `oom` (an allocation that did not fit; nothing is recorded as used; `gib` is what
was asked for, `used_gib` what was in use). A released tag stays in "used" with 0.0 GiB. A release or resume that
changes nothing (the tags are already released / resident, or the memory saver is off) records no event.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

TAGS = ("weights", "kv_cache", "cuda_graph")  # SGLang's GPU memory types, in its order

T = TypeVar("T")


class LedgerError(Exception):
    """The ledger file exists but is not a ledger."""


def lock_path(path: Path | str) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".lock")


@contextlib.contextmanager
def locked(path: Path | str, exclusive: bool = True) -> Iterator[None]:
    """Hold the ledger's lock (exclusive for a read-modify-write, shared for a read)."""
    with lock_path(path).open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _load(path: Path) -> dict[str, Any] | None:
    """The ledger as stored, or None when there is none yet; the caller holds the lock."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    if not text.strip():
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LedgerError(f"{path}: not JSON ({exc.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("capacity_gib"), (int, float)):
        raise LedgerError(f"{path}: not a device ledger (no capacity_gib)")
    return data


def _store(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def total_gib(used: Mapping[str, Mapping[str, float]]) -> float:
    return float(round(sum(sum(tags.values()) for tags in used.values()), 6))


def read_ledger(path: Path | str) -> dict[str, Any]:
    """The ledger, read under the (shared) lock; {} when no fake has created it yet."""
    with locked(path, exclusive=False):
        return _load(Path(path)) or {}


def peak_gib(path: Path | str) -> float:
    """The highest device usage the ledger has seen (0.0 when there is no ledger)."""
    return float(read_ledger(path).get("peak_gib", 0.0))


def used_gib(path: Path | str) -> float:
    """The device usage now (0.0 when there is no ledger)."""
    return float(read_ledger(path).get("used_gib", 0.0))


def resident_ports(path: Path | str) -> list[int]:
    """The ports of the servers holding any memory now, sorted."""
    used = read_ledger(path).get("used", {})
    return sorted(int(port) for port, tags in used.items() if sum(tags.values()) > 0)


def events(path: Path | str, port: int | None = None, kind: str | None = None) -> list[dict[str, Any]]:
    """The ledger's events, optionally only one server's and/or one kind ("allocate", "release", ...)."""
    return [e for e in read_ledger(path).get("events", [])
            if (port is None or e.get("port") == port) and (kind is None or e.get("event") == kind)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reclaim(data: dict[str, Any]) -> list[int]:
    """Free the entries of processes that are gone, as the driver would; return their ports."""
    gone = [port for port, pid in data["pids"].items() if isinstance(pid, int) and not _alive(pid)]
    for port in gone:
        freed = total_gib({port: data["used"].pop(port, {})})
        del data["pids"][port]
        data["used_gib"] = total_gib(data["used"])
        data["events"].append({"t": time.time(), "port": int(port), "event": "free", "tags": list(TAGS),
                               "gib": freed, "used_gib": data["used_gib"], "reason": "process gone"})
    return [int(port) for port in gone]


def _update(path: Path, change: Callable[[dict[str, Any]], T], capacity_gib: float) -> T:
    with locked(path):
        data = _load(path) or {"capacity_gib": float(capacity_gib), "used": {}, "used_gib": 0.0, "peak_gib": 0.0,
                               "events": []}
        for key, default in (("used", {}), ("pids", {}), ("events", []), ("peak_gib", 0.0)):
            data.setdefault(key, default)
        result = change(data)
        data["used_gib"] = total_gib(data["used"])
        data["peak_gib"] = max(float(data["peak_gib"]), data["used_gib"])
        _store(path, data)
        return result


def update_ledger(path: Path | str, change: Callable[[dict[str, Any]], T], capacity_gib: float) -> T:
    """Apply `change` to the ledger under the exclusive lock, creating it with `capacity_gib` if there is none.

    Entries of dead processes are reclaimed first; used_gib and peak_gib are recomputed after `change`.
    """

    def reclaim_then_change(data: dict[str, Any]) -> T:
        _reclaim(data)
        return change(data)

    return _update(Path(path), reclaim_then_change, capacity_gib)


def reclaim_dead(path: Path | str) -> list[int]:
    """Free the entries of fake servers that died without freeing them (e.g. SIGKILL); return their ports."""
    if not Path(path).exists():
        return []
    return _update(Path(path), _reclaim, capacity_gib=0.0)


@dataclass(frozen=True)
class OutOfMemory:
    """An allocation that did not fit, with the figures a CUDA OOM message reports."""

    need_gib: float
    capacity_gib: float
    used_gib: float

    @property
    def free_gib(self) -> float:
        return max(0.0, self.capacity_gib - self.used_gib)

    def message(self) -> str:
        return (f"torch.OutOfMemoryError: CUDA out of memory. Tried to allocate {self.need_gib:.2f} GiB (GPU 0; "
                f"{self.capacity_gib:.2f} GiB total capacity; {self.used_gib:.2f} GiB already allocated; "
                f"{self.free_gib:.2f} GiB free)")


class DeviceLedger:
    """One fake server's view of the shared ledger: its port is its key."""

    def __init__(self, path: Path | str, port: int, default_capacity_gib: float, pid: int | None = None):
        self.path = Path(path)
        self.key = str(port)
        self.port = port
        self.default_capacity_gib = default_capacity_gib
        self.pid = os.getpid() if pid is None else pid

    def _update(self, change: Callable[[dict[str, Any]], T]) -> T:
        return update_ledger(self.path, change, self.default_capacity_gib)

    def _event(self, data: dict[str, Any], event: str, tags: Iterable[str], gib: float, used: float) -> None:
        data["events"].append({"t": time.time(), "port": self.port, "event": event, "tags": list(tags),
                               "gib": round(gib, 6), "used_gib": round(used, 6)})

    def capacity(self) -> float:
        """The device capacity, creating the ledger (with the default capacity) if it does not exist yet."""
        return self._update(lambda data: float(data["capacity_gib"]))

    def allocate(self, sizes: Mapping[str, float], event: str = "allocate") -> OutOfMemory | None:
        """Make `sizes` (GiB per tag) resident for this server, or record an `oom` event and return the failure."""

        def change(data: dict[str, Any]) -> OutOfMemory | None:
            used = total_gib(data["used"])
            need = round(sum(sizes.values()), 6)
            capacity = float(data["capacity_gib"])
            if used + need > capacity + 1e-9:
                self._event(data, "oom", sizes, need, used)
                return OutOfMemory(need, capacity, used)
            entry = data["used"].setdefault(self.key, dict.fromkeys(TAGS, 0.0))
            for tag, gib in sizes.items():
                entry[tag] = float(gib)
            data["pids"][self.key] = self.pid
            self._event(data, event, sizes, need, total_gib(data["used"]))
            return None

        return self._update(change)

    def release(self, tags: Iterable[str]) -> float:
        """Free the given tags of this server; return the GiB freed."""
        tags = list(tags)

        def change(data: dict[str, Any]) -> float:
            entry = data["used"].get(self.key, {})
            freed = sum(entry.get(tag, 0.0) for tag in tags)
            for tag in tags:
                if tag in entry:
                    entry[tag] = 0.0
            self._event(data, "release", tags, freed, total_gib(data["used"]))
            return freed

        return self._update(change)

    def free(self) -> float:
        """Drop this server's entry (it exits); return the GiB freed. Nothing is recorded when there is none."""

        def change(data: dict[str, Any]) -> float:
            if data["pids"].get(self.key, self.pid) != self.pid:  # the port has been taken by a newer server
                return 0.0
            data["pids"].pop(self.key, None)
            entry = data["used"].pop(self.key, None)
            if entry is None:
                return 0.0
            freed = sum(entry.values())
            self._event(data, "free", TAGS, freed, total_gib(data["used"]))
            return freed

        return self._update(change)
