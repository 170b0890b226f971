"""An engine's processes (`app.serving.engine.Engine`): SGLang's own, watched once it is ready, and the whole group
ended when it stops.

SGLang names its processes `sglang::scheduler`, `sglang::detokenizer`, `sglang::scheduler_TP1`, ... (setproctitle);
`MemberWatch` tells when the first of them ends: the kernel tells at once where a pidfd can be opened, a poll looks
where it cannot. `end_group` sends SIGTERM to the launcher (SGLang's launcher drains and stops its own children on
it), waits a grace period, then sends SIGKILL to the whole group (docs/sglang.md, "Stopping").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass

import psutil

logger = logging.getLogger(__name__)

# How often SGLang's processes are looked at where the kernel cannot tell at once (no pidfd).
MEMBER_POLL_SECONDS = 0.25
# SGLang names its processes `sglang::scheduler`, `sglang::detokenizer`, `sglang::scheduler_TP1`, ... (setproctitle).
MEMBER_PREFIX = "sglang::"


@dataclass
class Member:
    """One of an engine's SGLang processes, watched."""

    pid: int
    name: str
    fd: int | None = None
    poll: asyncio.Task[None] | None = None


class MemberWatch:
    """SGLang's processes of one engine, watched: `on_death(member)` when the first of them ends, after which nothing
    is watched any more (`watch` again for the next start)."""

    def __init__(self, endpoint: str, on_death: Callable[[Member], None]):
        self.endpoint = endpoint
        self._on_death = on_death
        self._members: list[Member] = []

    def watch(self, members: list[tuple[int, str]]) -> None:
        """Watch each (pid, name) (`sglang_processes`), instead of what was watched before."""
        self.close()
        loop = asyncio.get_running_loop()
        for pid, name in members:
            member = Member(pid, name)
            try:
                member.fd = os.pidfd_open(pid)
            except (AttributeError, OSError):  # no pidfd (not Linux, or an old kernel), or it is gone already
                member.poll = loop.create_task(self._poll(member), name=f"watch-{self.endpoint}-{pid}")
            else:
                loop.add_reader(member.fd, self._died, member)
            self._members.append(member)

    async def _poll(self, member: Member) -> None:
        while _alive(member.pid):
            await asyncio.sleep(MEMBER_POLL_SECONDS)
        self._died(member)

    def _died(self, member: Member) -> None:
        self.close()
        self._on_death(member)

    def close(self) -> None:
        """Watch nothing."""
        for member in self._members:
            if member.fd is not None:
                with contextlib.suppress(Exception):
                    asyncio.get_running_loop().remove_reader(member.fd)
                os.close(member.fd)
            if member.poll is not None and member.poll is not asyncio.current_task():
                member.poll.cancel()
        self._members = []


async def end_group(endpoint: str, process: asyncio.subprocess.Process, exited: asyncio.Event,
                    grace_s: float) -> None:
    """SIGTERM to the launcher first when `grace_s` (until `exited` is set, at most `grace_s`), then SIGKILL to its
    whole process group."""
    if not exited.is_set() and grace_s > 0:
        logger.info("Stopping engine %s (pid %s)", endpoint, process.pid)
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(exited.wait(), grace_s)
        except asyncio.TimeoutError:
            logger.warning("Engine %s did not stop within %.0f s: killing its process group", endpoint, grace_s)
    # children that outlived the launcher (or a launcher that ignored SIGTERM) go with the group
    kill_group(process.pid)


def kill_group(pid: int) -> None:
    """SIGKILL to the process group `pid` leads, if it is still there."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def sglang_processes(launcher: int) -> list[tuple[int, str]]:
    """(pid, name) of the SGLang processes under a launcher: those SGLang names `sglang::...`."""
    found = []
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(launcher).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                name = child.name()
                if name.startswith(MEMBER_PREFIX):
                    found.append((child.pid, name))
    return found


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
