"""The console under load: a summary line per report interval, however many requests; never the app's own probes.

`clearml-sglang run` with the stand-in engine (which, like SGLang, prints an access line per request unless told
otherwise and a `Prefill batch` line per request), offline ClearML, 200 requests a second for a few seconds. The
console is the process's output; the offline session's log is what the task's console shows.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from datetime import datetime

import aiohttp

from tests.integration.test_clearml_offline import (
    AUTH,
    MODEL,
    TOKEN,
    console,
    no_process_left,
    session,
    start,
    wait_property,
    wait_ready,
)

RATE_PER_S, LOAD_S, REPORT_S = 200, 6.0, 2
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


async def load(base: str) -> tuple[int, int, float, float]:
    """RATE_PER_S requests a second for LOAD_S seconds, paced; (sent, answered 200, started, ended) wall times."""
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    ok = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as client:

        async def one() -> None:
            nonlocal ok
            async with client.post(base + "/v1/chat/completions", json=body, headers=AUTH) as response:
                await response.read()
                ok += response.status == 200

        started, tasks = time.time(), []
        total = int(RATE_PER_S * LOAD_S)
        for i in range(total):
            await asyncio.sleep(max(0.0, started + i / RATE_PER_S - time.time()))
            tasks.append(asyncio.ensure_future(one()))
        await asyncio.gather(*tasks)
        return total, ok, started, time.time()


def stamped(lines: list[str], start: float, end: float) -> list[str]:
    """The lines the app logged between two wall-clock times (continuation lines belong to the line above)."""
    inside, keep = [], False
    for line in lines:
        match = STAMP.match(line)
        if match:
            at = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            keep = start <= at <= end
        if keep:
            inside.append(line)
    return inside


def test_the_console_stays_readable_at_200_requests_a_second(tmp_path):
    process, base = start(tmp_path, *MODEL, f"auth.tokens={TOKEN}", "idle.time_limit_hours=1",
                          f"idle.report_interval_seconds={REPORT_S}")
    try:
        wait_ready(process, base)
        # its summary, URLs and curl are printed just after it is ready (then the curl property is set): not the load's
        wait_property(tmp_path, "curl", bool, "the endpoint was never announced", 60)
        sent, ok, started, ended = asyncio.run(load(base))
        time.sleep(REPORT_S + 0.5)  # (let the last window's summary out: it is what the test reads)
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=120)[0]
    no_process_left()
    achieved = sent / (ended - started)
    assert ok == sent and achieved >= 0.9 * RATE_PER_S, (ok, sent, achieved)

    lines = output.splitlines()
    during = stamped(lines, started, ended)
    windows = (ended - started) / REPORT_S
    assert len(during) <= windows + 4, "\n".join(during)  # a summary per report interval (and a window's edges)
    traffic = [line for line in lines if "Traffic: " in line]
    served = sum(int(re.search(r"Traffic: (\d+) request", line).group(1)) for line in traffic)
    assert served == sent and all("p95" in line for line in traffic), traffic

    for text in (output, console(session(tmp_path))):  # the process's console, and the task's
        assert '"GET /health' not in text and '"GET /metrics' not in text  # the app's own probes never show
        assert "Prefill batch" not in text  # SGLang's per-batch lines: debug mode only
