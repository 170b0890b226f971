#!/usr/bin/env python3
"""Gateway benchmark: our gateway side by side with direct access, ClearML's local proxy and nginx, against upstreams
that are never the bottleneck.

    .venv/bin/python bench/gateway.py [--seconds 4] [--runs 3] [--skip-tokens] [--configs direct,gateway,...]
                                      [--baseline REV] [--keys-only] [--output bench/results/gateway.json]

Everything runs on this machine's loopback. Upstreams far faster than any proxy: for plain requests Debian's nginx
answering `return 200` with a fixed OpenAI-shaped body; for streams `bench/sse_upstream.py` (uvloop, one write per
event, every event's bytes made once); the real SGLang on the CPU for tokens per second. Four ways to reach them:
    direct    the upstream itself
    gateway   app.gateway.Gateway (uvloop, bearer check), one process
    workers2  the same as the deployment runs it with `general.gateway_workers: 2`: two worker processes sharing
              the port (SO_REUSEPORT) in front of the gateway as their control plane; on two cores of their own
              where the machine has six or more, else on the proxy's one (CPU per request is then what they cost)
    limits    the same, its key with rate limits (rpm, tpm, concurrent: none ever reached), so that their
              bookkeeping is measured against `gateway` in the same runs, again side by side with it
              (alternating wrk measurements, `paired_phase`), and in one process (a key of each kind, the wrk
              measurements alternating between their tokens, `one_process_phase`): a difference of a few
              microseconds is less than two runs, or two processes, of one configuration differ by; and without
              sockets (`bench/in_process.py`: the gateway's own objects, a key of each kind, its thread's CPU)
    shaped    the same, its key with a priority and a max_tokens: each request's body gets fields written in
    clearml   ClearML's local proxy, `Task.get_http_router()`, a route with a bearer-check callback, access log on
              as shipped (clearml[router]: fastapi, uvicorn, httpx)
    nginx     Debian's nginx, one worker, keep-alive upstream, buffering off, the same bearer check
Where the machine has two cores or more, the proxy runs alone on the last core (`taskset`); with four or more the
upstream gets half of the others (nginx: a worker per core) and the load generator (wrk, or this script's client)
the rest; with two, the upstream and the load generator share the first. Load: wrk for plain requests at 1 and 16
connections; 16 unpaced streams of 10,000 events (events/s, CPU per relayed chunk); 16 streams of 512 events at 2 ms
(time to the first chunk, three rounds after a warm-up); 1,000 concurrent streams of 100 events at 100 ms (from
cold); 64 concurrent streams from the real SGLang engine. CPU from the OS (psutil, whole process tree; the load
generator's from getrusage). The whole set runs `--runs` times, interleaved; every figure is the median with its range
over the runs, ratios computed within each run. A run in which direct access is not at least 3x the best proxy
(requests/s at 16 connections, events/s of unpaced streams) is upstream-bound: then no ratio is reported.
`--configs` runs only some of them (direct is needed for the upstream-bound check and the added latencies);
`--keys-only` only what keys' limits add (side by side, in one process, without sockets: about 2.5 minutes a run).
`--baseline REV` adds `baseline`: the gateway of another revision of this repository (a git worktree, this venv),
started by that revision's own copy of this script, measured in the same runs, interleaved with the current one;
the summary then gives the current gateway's CPU per request and per stream event over the baseline's, per run.
Writes bench/results/gateway.json, or `--output` (and again after every run, so a failure keeps what was
measured); installs wrk and nginx with apt-get when they are missing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "gateway.json"
TOKEN = "bench-token-0123456789abcdef"
# `one_process_phase`: one gateway, a key per configuration, each with its own token
KIND_TOKENS = {"gateway": TOKEN, "limits": "bench-limits-0123456789abcdef", "shaped": "bench-shaped-0123456789abcdef"}
SSE = ROOT / "bench" / "sse_upstream.py"
ALL_CONFIGS = ("direct", "gateway", "workers2", "limits", "shaped", "clearml", "nginx")
CONFIGS: tuple[str, ...] = ALL_CONFIGS  # what this run measures (--configs, --baseline)
BASELINE_TREE: Path | None = None  # --baseline: the other revision's worktree
# Direct access must be this much faster than the best proxy, or the proxies' figures measure the upstream.
UPSTREAM_HEADROOM = 3.0
CORES = sorted(os.sched_getaffinity(0))
PROXY_CORES = CORES[-1:] if len(CORES) > 1 else CORES  # the proxy alone on the last core
WORKER_CORES = CORES[-2:] if len(CORES) >= 6 else PROXY_CORES  # `workers2`: a core per worker where there are many
_REST = CORES[:-len(WORKER_CORES)] if len(CORES) > 1 else CORES
# With four cores or more the upstream gets half of the others (a worker each) and the load generator the rest: an
# upstream answers a request for about half of what nginx spends proxying it, so 3x headroom needs 2 cores of its own.
UPSTREAM_CORES = _REST[:len(_REST) // 2] if len(_REST) >= 3 else _REST
LOAD_CORES = _REST[len(_REST) // 2:] if len(_REST) >= 3 else _REST


def pinned(argv: list[str], cores: list[int]) -> list[str]:
    return ["taskset", "-c", ",".join(map(str, cores)), *argv] if shutil.which("taskset") else argv
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def ensure_tools() -> None:
    missing = [pkg for tool, pkg in (("wrk", "wrk"), ("nginx", "nginx-light")) if not shutil.which(tool)
               and not Path(f"/usr/sbin/{tool}").exists()]
    if missing:
        print(f"installing {' '.join(missing)} with apt-get", flush=True)
        subprocess.run(["apt-get", "update", "-q"], check=False, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-q", *missing], check=True, capture_output=True)


# ----------------------------------------------------------------------------------------------------------
# processes


@dataclass
class Proc:
    popen: subprocess.Popen
    url: str

    def cpu_seconds(self) -> float:
        import psutil

        try:
            root = psutil.Process(self.popen.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0.0
        total = 0.0
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def rss_mb(self) -> float:
        import psutil

        try:
            root = psutil.Process(self.popen.pid)
            return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20
        except psutil.NoSuchProcess:
            return 0.0

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def wait_http(url: str, deadline_s: float = 60, expect=(200,)) -> None:
    import requests

    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        with contextlib.suppress(requests.RequestException):
            if requests.get(url, timeout=2, headers={"Authorization": f"Bearer {TOKEN}"}).status_code in expect:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def start_plain_upstream(workdir: Path) -> Proc:
    """nginx answering every request at once with a fixed chat completion."""
    port = free_port()
    popen = start_nginx(UPSTREAM_CONF.format(port=port, prefix=workdir, body=json.dumps(COMPLETION),
                                             workers=len(UPSTREAM_CORES)), f"upstream-{port}", workdir, UPSTREAM_CORES)
    proc = Proc(popen, f"http://127.0.0.1:{port}")
    wait_http(proc.url + "/health")
    return proc


def start_nginx(conf_text: str, name: str, workdir: Path, cores: list[int]) -> subprocess.Popen:
    """Debian's nginx with this configuration, pinned to `cores`."""
    conf = workdir / f"{name}.conf"
    conf.write_text(conf_text)
    return subprocess.Popen(pinned(["nginx", "-c", str(conf), "-p", str(workdir)], cores),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_stream_upstream(pace_s: float) -> Proc:
    port = free_port()
    # one process per upstream core (SO_REUSEPORT): one Python process relays no more than one core's worth
    popen = subprocess.Popen(pinned([sys.executable, str(SSE), str(port), str(pace_s), str(len(UPSTREAM_CORES))],
                                    UPSTREAM_CORES),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = Proc(popen, f"http://127.0.0.1:{port}")
    wait_http(proc.url + "/health")
    return proc


COMPLETION = {"id": "x", "object": "chat.completion", "model": "m",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "w w w w w w w w"},
                           "finish_reason": "length"}],
              "usage": {"prompt_tokens": 2, "completion_tokens": 8, "total_tokens": 10}}

UPSTREAM_CONF = """
daemon off;
worker_processes {workers};
pid {prefix}/upstream-{port}.pid;
error_log {prefix}/upstream-error.log;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  client_body_temp_path {prefix}/upstream-body;
  server {{
    listen 127.0.0.1:{port};
    location / {{ default_type application/json; return 200 '{body}'; }}
  }}
}}
"""


def start_proxy(kind: str, upstream: str, workdir: Path) -> Proc:
    port = free_port()
    if kind == "nginx":
        popen = start_nginx(NGINX_CONF.format(port=port, upstream=upstream.removeprefix("http://"), token=TOKEN,
                                              prefix=workdir), f"nginx-{port}", workdir, PROXY_CORES)
    else:  # the baseline's gateway is served by its own revision of this script, which imports its own app
        script, serve = ((BASELINE_TREE / "bench" / "gateway.py", "gateway") if kind == "baseline"
                         else (__file__, f"gateway-{kind}") if kind in ("limits", "shaped", "keys", "workers2")
                         else (__file__, kind))
        argv = pinned([sys.executable, str(script), f"--serve-{serve}", str(port), upstream],
                      WORKER_CORES if kind == "workers2" else PROXY_CORES)
        popen = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=workdir,
                                 env={**os.environ, "CLEARML_OFFLINE_MODE": "1", "CLEARML_CACHE_DIR": str(workdir)})
    proc = Proc(popen, f"http://127.0.0.1:{port}")
    own = kind in ("gateway", "workers2", "limits", "shaped", "keys", "baseline")
    wait_http(proc.url + ("/healthz" if own else "/health"))  # (nginx's and ClearML's: proxied)
    return proc


NGINX_CONF = """
daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/nginx-error.log;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  client_body_temp_path {prefix}/nginx-body;
  proxy_temp_path {prefix}/nginx-proxy;
  upstream engine {{ server {upstream}; keepalive 256; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      if ($http_authorization != "Bearer {token}") {{ return 401; }}
      proxy_pass http://engine;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_read_timeout 600s;
    }}
  }}
}}
"""


def serve_gateway(port: int, upstream: str, limits_of: str = "") -> None:
    import uvloop
    from in_process import KINDS  # (this script's folder: the key kinds both measure)

    from app.gateway import Gateway, KeyRing, ModelRoute, RequestStats
    from app.keys import NO_LIMITS

    KIND_LIMITS = {kind: limits for kind, limits in KINDS.items() if kind != "gateway"}  # (none ever reached)

    class Engine:
        url, state = upstream, "resident"

    if limits_of == "keys":  # one process, a key of each kind (`one_process_phase`)
        keys = [("bench", TOKEN, NO_LIMITS)] + [(kind, KIND_TOKENS[kind], KIND_LIMITS[kind]) for kind in KIND_LIMITS]
    else:
        keys = [("bench", TOKEN, KIND_LIMITS.get(limits_of, NO_LIMITS))]

    async def main() -> None:
        gateway = Gateway([ModelRoute("m", Engine())], KeyRing(keys), RequestStats())
        if limits_of != "workers2":
            await gateway.start("127.0.0.1", port)
            await asyncio.Event().wait()
        from app.gateway.gateway import GatewayLimits
        from app.serving.gateway_workers import Front, GatewayWorkers, worker_setup

        setup = worker_setup([(n, t, v.set_values()) for n, t, v in keys], gateway, GatewayLimits(), 2, None)
        await Front(gateway, GatewayWorkers(2, gateway, setup, stats=gateway.stats, tracker=None,
                                            clock=time.monotonic)).start("127.0.0.1", port)
        await asyncio.Event().wait()

    raise_fd_limit()
    uvloop.run(main())


def bearer_check(request, persistent_state):  # module level: ClearML pickles the callback
    from fastapi import HTTPException

    if request.headers.get("authorization") != f"Bearer {TOKEN}":
        raise HTTPException(status_code=401, detail="bad token")


def serve_clearml(port: int, upstream: str) -> None:
    import clearml.router.fastapi_proxy as fastapi_proxy
    from clearml import Task

    run = fastapi_proxy.uvicorn.run
    fastapi_proxy.uvicorn.run = lambda app, **kw: run(app, **{**kw, "host": "127.0.0.1"})  # loopback only
    raise_fd_limit()
    task = Task.init("bench", "clearml-proxy", auto_resource_monitoring=False, auto_connect_frameworks=False)
    router = task.get_http_router()
    router.set_local_proxy_parameters(incoming_port=port)
    router.create_local_route(source="/", target=upstream, request_callback=bearer_check, endpoint_telemetry=False)
    router.start_local_proxy()
    signal.sigwait({signal.SIGTERM})
    router._proxy.stop()  # the SDK has no public stop; its uvicorn child would keep the process alive
    os._exit(0)


# ----------------------------------------------------------------------------------------------------------
# load


def wrk(url: str, connections: int, seconds: float, workdir: Path, token: str = TOKEN) -> dict:
    script = workdir / f"post-{token}.lua"
    script.write_text(f'wrk.method = "POST"\nwrk.body = \'{json.dumps(CHAT)}\'\n'
                      f'wrk.headers["Content-Type"] = "application/json"\n'
                      f'wrk.headers["Authorization"] = "Bearer {token}"\n')
    threads = 1 if connections == 1 else len(LOAD_CORES)
    before = _children_cpu()
    out = subprocess.run(pinned(["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
                                 "--latency", "-s", str(script), url + "/v1/chat/completions"], LOAD_CORES),
                         capture_output=True, text=True).stdout
    load_cpu = _children_cpu() - before

    def ms(label: str) -> float:
        match = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)", out, re.M)
        value, unit = float(match.group(1)), match.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    requests = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "p50_ms": ms("50"),
            "p99_ms": ms("99"), "requests": requests, "non_2xx": int(errors.group(1)) if errors else 0,
            "load_cpu_us_per_request": load_cpu / requests * 1e6 if requests else None}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class _RawStream(asyncio.Protocol):
    """One unpaced stream read as bytes: events counted, nothing parsed (a load generator as cheap as it gets)."""

    def __init__(self, request: bytes, done: asyncio.Future):
        self.request, self.done, self.events, self.tail = request, done, 0, b""  # tail: the last bytes read

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        joined = self.tail[-5:] + data  # an event's `data: ` split between two reads is counted once
        self.events += joined.count(b"data: ")
        self.tail = (self.tail + data)[-16:]
        if self.tail.endswith(b"\r\n0\r\n\r\n") and not self.done.done():
            self.done.set_result(self.events)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(self.events)


async def stream_throughput(url: str, proc: Proc | None, count: int = 16, events: int = 10000) -> dict:
    """`count` unpaced streams of `events` events at once: events relayed per second, and the CPU per event of the
    proxy and of this client (the load generator)."""
    loop = asyncio.get_running_loop()
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({**CHAT, "max_tokens": events, "stream": True}).encode()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: %s\r\nauthorization: Bearer %s\r\n"
               b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
               % (f"{host}:{port}".encode(), TOKEN.encode(), len(body), body))
    cpu_before, client_before = (proc.cpu_seconds() if proc else 0.0), time.process_time()
    started = time.monotonic()
    done = [loop.create_future() for _ in range(count)]
    transports = [(await loop.create_connection(lambda f=f: _RawStream(request, f), host, int(port)))[0]
                  for f in done]
    counted = await asyncio.wait_for(asyncio.gather(*done), 60)
    elapsed = time.monotonic() - started
    for transport in transports:
        transport.close()
    chunks = sum(counted)
    result = {"completed": sum(c >= events for c in counted), "events_per_s": chunks / elapsed, "elapsed_s": elapsed}
    result["load_cpu_us_per_event"] = (time.process_time() - client_before) / chunks * 1e6 if chunks else None
    if proc is not None and chunks:
        result["cpu_us_per_event"] = (proc.cpu_seconds() - cpu_before) / chunks * 1e6
    return result


async def streams(url: str, count: int, events: int, deadline_s: float, proc: Proc | None = None,
                  rounds: int = 1) -> dict:
    """`count` concurrent streams of `events` events, `rounds` times after one unrecorded warm-up round when
    `rounds` > 1 (the proxies' engine connections are open and kept alive then, as in service): completed streams
    per round, time to the first chunk (median over every stream of every round), events/s, the proxy's peak RSS."""
    if rounds > 1:
        await streams(url, count, 8, deadline_s)
        measured = [await _streams_once(url, count, events, deadline_s, proc, _ttfc_list=True) for _ in range(rounds)]
        ttfcs = [t for m in measured for t in m.pop("ttfc")]
        return {"completed": min(m["completed"] for m in measured),
                "ttfc_p50_ms": statistics.median(ttfcs) * 1000 if ttfcs else None,
                "events_per_s": statistics.median(m["events_per_s"] for m in measured),
                "peak_rss_mb": max((m["peak_rss_mb"] or 0) for m in measured) or None, "rounds": rounds}
    return await _streams_once(url, count, events, deadline_s, proc)


async def _streams_once(url: str, count: int, events: int, deadline_s: float, proc: Proc | None = None,
                        _ttfc_list: bool = False) -> dict:
    import aiohttp

    body = {**CHAT, "max_tokens": events, "stream": True}
    ttfc: list[float] = []
    done, chunks, peak_rss = 0, 0, 0.0
    connector = aiohttp.TCPConnector(limit=0, force_close=True)

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal done, chunks
        started = time.monotonic()
        async with session.post(url + "/v1/chat/completions", json=body,
                                headers={"Authorization": f"Bearer {TOKEN}"}) as response:
            first = True
            async for chunk in response.content.iter_any():
                if first:
                    ttfc.append(time.monotonic() - started)
                    first = False
                chunks += chunk.count(b"data: ")
                if b"[DONE]" in chunk:
                    done += 1

    async def sample() -> None:
        nonlocal peak_rss
        while True:
            if proc is not None:
                peak_rss = max(peak_rss, proc.rss_mb())
            await asyncio.sleep(0.5)

    started = time.monotonic()
    sampler = asyncio.create_task(sample())
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        tasks = [asyncio.create_task(one(session)) for _ in range(count)]
        await asyncio.wait(tasks, timeout=deadline_s)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    elapsed = time.monotonic() - started
    sampler.cancel()
    result = {"completed": done, "ttfc_p50_ms": statistics.median(ttfc) * 1000 if ttfc else None,
              "events_per_s": chunks / elapsed, "peak_rss_mb": peak_rss or None, "elapsed_s": elapsed}
    if _ttfc_list:
        result["ttfc"] = ttfc
    return result


async def tokens_per_second(url: str, headers: dict, streams_: int = 64, tokens: int = 64) -> float:
    """`streams_` concurrent streamed completions of `tokens` tokens each: tokens received per second."""
    import aiohttp

    body = {"model": "tiny", "prompt": "import os", "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    received = 0

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal received
        async with session.post(url + "/v1/completions", json=body, headers=headers) as response:
            assert response.status == 200, await response.text()
            async for line in response.content:
                if line.startswith(b"data: {"):
                    received += 1

    started = time.monotonic()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=600)) as session:
        await asyncio.gather(*(one(session) for _ in range(streams_)))
    return received / (time.monotonic() - started)


# ----------------------------------------------------------------------------------------------------------
# the runs


def plain_and_stream_phase(results: dict, run: int, seconds: float, workdir: Path) -> None:
    import uvloop

    upstream = start_plain_upstream(workdir)
    try:
        for kind in CONFIGS:
            proxy = None if kind == "direct" else start_proxy(kind, upstream.url, workdir)
            url = upstream.url if proxy is None else proxy.url
            try:
                wrk(url, 16, 1, workdir)  # warm-up, not recorded
                entry = results.setdefault(kind, {}).setdefault(run, {})
                for connections in (1, 16):
                    before, upstream_before, started = (proxy.cpu_seconds() if proxy else 0.0,
                                                        upstream.cpu_seconds(), time.monotonic())
                    entry[f"c{connections}"] = measured = wrk(url, connections, seconds, workdir)
                    measured["upstream_core_share"] = (upstream.cpu_seconds() - upstream_before) / (
                        time.monotonic() - started)
                    if proxy is not None and measured["requests"]:
                        measured["cpu_us_per_request"] = (proxy.cpu_seconds() - before) / measured["requests"] * 1e6
                print(f"run {run} {kind:8} plain: " + ", ".join(
                    f"c{c} {entry[f'c{c}']['rps']:.0f} req/s" for c in (1, 16)), flush=True)
            finally:
                if proxy is not None:
                    proxy.stop()
    finally:
        upstream.stop()
    upstream = start_stream_upstream(0.0)
    try:
        for kind in CONFIGS:
            proxy = None if kind == "direct" else start_proxy(kind, upstream.url, workdir)
            try:
                url = upstream.url if proxy is None else proxy.url
                uvloop.run(stream_throughput(url, None, 4, 200))  # warm-up, not recorded
                upstream_before, started = upstream.cpu_seconds(), time.monotonic()
                results[kind][run]["stream_rate"] = measured = uvloop.run(stream_throughput(url, proxy))
                measured["upstream_core_share"] = (upstream.cpu_seconds() - upstream_before) / (
                    time.monotonic() - started)
                print(f"run {run} {kind:8} unpaced streams: {measured['events_per_s']:.0f} events/s", flush=True)
            finally:
                if proxy is not None:
                    proxy.stop()
    finally:
        upstream.stop()
    for pace, key, count, events, deadline, rounds in (
            (0.002, "streams16", 16, 512, 30, 3),  # 512 events at 2 ms, three rounds after a warm-up
            (0.1, "streams1000", 1000, 100, 25, 1)):  # 100 at 100 ms: 10 s, from cold
        upstream = start_stream_upstream(pace)
        try:
            for kind in CONFIGS:
                proxy = None if kind == "direct" else start_proxy(kind, upstream.url, workdir)
                try:
                    url = upstream.url if proxy is None else proxy.url
                    results[kind][run][key] = asyncio.run(streams(url, count, events, deadline, proxy, rounds))
                    print(f"run {run} {kind:8} {count} streams: {results[kind][run][key]}", flush=True)
                finally:
                    if proxy is not None:
                        proxy.stop()
        finally:
            upstream.stop()


# What a key's limits add to a request is a few microseconds of the gateway's ~70: less than two runs of one
# configuration differ by. So `gateway`, `limits` and `shaped` run side by side against one upstream, their wrk
# measurements alternating, this many rounds of this many seconds a run, each round's order rotated; what the limits
# add is the median of the rounds' differences.
PAIRED_ROUNDS = 10  # (--rounds)
PAIRED_SECONDS = 2


def paired_phase(results: dict, run: int, workdir: Path) -> None:
    kinds = [k for k in ("gateway", "limits", "shaped") if k in CONFIGS]
    if "gateway" not in kinds or len(kinds) < 2:
        return
    upstream = start_plain_upstream(workdir)
    proxies: dict[str, Proc] = {}
    try:
        for kind in kinds:
            proxies[kind] = start_proxy(kind, upstream.url, workdir)
            wrk(proxies[kind].url, 16, 1, workdir)  # warm-up, not recorded
        for round_ in range(PAIRED_ROUNDS):
            shift = round_ % len(kinds)
            for kind in kinds[shift:] + kinds[:shift]:
                proxy, before = proxies[kind], proxies[kind].cpu_seconds()
                measured = wrk(proxy.url, 16, PAIRED_SECONDS, workdir)
                cpu_us = (proxy.cpu_seconds() - before) / measured["requests"] * 1e6 if measured["requests"] else None
                results.setdefault(kind, {}).setdefault(run, {}).setdefault("paired_cpu_us_per_request", []).append(
                    cpu_us)
        print(f"run {run} paired CPU us/request: " + ", ".join(
            f"{k} " + " ".join(f"{v:.1f}" for v in results[k][run]["paired_cpu_us_per_request"] if v is not None)
            for k in kinds), flush=True)
    finally:
        for proxy in proxies.values():
            proxy.stop()
        upstream.stop()


def one_process_phase(results: dict, run: int, workdir: Path) -> None:
    """The same, closer still: one gateway process with a key of each kind (`--serve-gateway-keys`), the wrk
    measurements alternating between their tokens. What the limits add is then the only difference: two processes of
    one configuration differ by a few microseconds a request (their memory's layout), one process not."""
    kinds = [k for k in ("gateway", "limits", "shaped") if k in CONFIGS]
    if "gateway" not in kinds or len(kinds) < 2:
        return
    upstream = start_plain_upstream(workdir)
    proxy = None
    try:
        proxy = start_proxy("keys", upstream.url, workdir)
        for kind in kinds:
            wrk(proxy.url, 16, 1, workdir, KIND_TOKENS[kind])  # warm-up, not recorded
        measured_ = results.setdefault("one_process", {}).setdefault(run, {k: [] for k in kinds})
        for round_ in range(PAIRED_ROUNDS):
            shift = round_ % len(kinds)
            for kind in kinds[shift:] + kinds[:shift]:
                before = proxy.cpu_seconds()
                measured = wrk(proxy.url, 16, PAIRED_SECONDS, workdir, KIND_TOKENS[kind])
                ok = measured["requests"] and not measured["non_2xx"]
                measured_[kind].append((proxy.cpu_seconds() - before) / measured["requests"] * 1e6 if ok else None)
        print(f"run {run} one process, CPU us/request: " + ", ".join(
            f"{k} " + " ".join(f"{v:.1f}" for v in measured_[k] if v is not None) for k in kinds), flush=True)
    finally:
        if proxy is not None:
            proxy.stop()
        upstream.stop()


# `in_process_phase`: rounds of `bench/in_process.py`, a run (each a block of its requests per key kind)
IN_PROCESS_ROUNDS = 60


def in_process_phase(results: dict, run: int) -> None:
    """The same, without the kernel, the load generator or the upstream: `bench/in_process.py` drives one gateway's
    own objects (a key of each kind, blocks of requests alternating) on the proxy's core; CPU of its thread only."""
    if "gateway" not in CONFIGS or not {"limits", "shaped"} & set(CONFIGS):
        return
    out = subprocess.run(pinned([sys.executable, str(ROOT / "bench" / "in_process.py"), "--json",
                                 "--rounds", str(IN_PROCESS_ROUNDS)], PROXY_CORES),
                         capture_output=True, text=True, check=True).stdout
    measured = results.setdefault("in_process", {})[run] = json.loads(out)
    print(f"run {run} in process, added CPU us/request (median): " + ", ".join(
        f"{k} {statistics.median(a - b for a, b in zip(v, measured['gateway'], strict=True)):+.2f}"
        for k, v in measured.items() if k != "gateway"), flush=True)


def in_process_added(results: dict, kind: str, runs: int) -> dict:
    """What `kind`'s key adds to a request's Python path: every round's difference, every run."""
    return quartiles([mine - base for r in range(1, runs + 1) if r in results["in_process"]
                      for mine, base in zip(results["in_process"][r][kind], results["in_process"][r]["gateway"],
                                            strict=True)])


def one_process_added(results: dict, kind: str, runs: int) -> dict:
    """What `kind`'s key adds to the CPU per request of one gateway process: every round's difference, every run."""
    rounds = [results["one_process"][r] for r in range(1, runs + 1) if r in results["one_process"]]
    return quartiles([mine - base for measured in rounds
                      for mine, base in zip(measured[kind], measured["gateway"], strict=True)
                      if mine is not None and base is not None])


def quartiles(values: list[float]) -> dict:
    """The spread of `values`, their quartiles, and a 95% interval of their median (a percentile bootstrap, 2,000
    resamples, seeded: the same values give the same interval)."""
    draw = random.Random(0)
    medians = sorted(statistics.median(draw.choices(values, k=len(values))) for _ in range(2000))
    return {**spread(values), "p25": statistics.quantiles(values, n=4)[0],
            "p75": statistics.quantiles(values, n=4)[2], "median_ci95": [medians[50], medians[1949]]}


def paired_added(results: dict, kind: str, runs: int) -> dict:
    """What `kind` adds to the gateway's CPU per request: every round's difference, over every run."""
    differences = [mine - base for r in range(1, runs + 1)
                   for mine, base in zip(results[kind][r]["paired_cpu_us_per_request"],
                                         results["gateway"][r]["paired_cpu_us_per_request"], strict=True)
                   if mine is not None and base is not None]
    return quartiles(differences)


def tokens_phase(results: dict, runs: int, workdir: Path) -> None:
    try:
        import sglang  # noqa: F401
    except ImportError:
        print("sglang is not installed: no tokens test (install the `engine` extra)", flush=True)
        return
    from app.config import parse_config
    from app.demo import demo_raw
    from app.demo.tiny_model import make_tiny_models
    from app.serving.models import describe
    from app.sglang.command import Launch, build_engine_command

    made = make_tiny_models(workdir / "tiny")
    raw = demo_raw(made.base, made.adapters)
    raw["models"][0]["lora"] = {"enable": False}
    config = parse_config(raw)
    port = free_port()
    command = build_engine_command(config, 0, describe(config)[0], port=port, launch=Launch("engine-key"))
    engine = subprocess.Popen(command.argv, env={**os.environ, **command.env}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    direct = f"http://127.0.0.1:{port}"
    proxy = None
    try:
        wait_http(direct + "/health", deadline_s=300)
        proxy_port = free_port()
        proxy = Proc(subprocess.Popen([sys.executable, __file__, "--serve-gateway-key", str(proxy_port), direct],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
                     f"http://127.0.0.1:{proxy_port}")
        wait_http(proxy.url + "/healthz")
        asyncio.run(tokens_per_second(direct, {"Authorization": "Bearer engine-key"}, 4, 16))  # warm-up
        for run in range(1, runs + 1):
            d = asyncio.run(tokens_per_second(direct, {"Authorization": "Bearer engine-key"}))
            g = asyncio.run(tokens_per_second(proxy.url, {"Authorization": f"Bearer {TOKEN}"}))
            results.setdefault("tokens", {})[run] = {"direct": d, "gateway": g, "ratio": g / d}
            print(f"run {run} tokens/s: direct {d:.0f}, gateway {g:.0f} ({g / d:.3f})", flush=True)
    finally:
        if proxy is not None:
            proxy.stop()
        os.killpg(engine.pid, signal.SIGTERM)
        engine.wait(60)


def serve_gateway_with_key(port: int, upstream: str) -> None:
    import uvloop

    from app.gateway import Gateway, KeyRing, ModelRoute, RequestStats
    from app.keys import NO_LIMITS

    class Engine:
        url, state = upstream, "resident"

    async def main() -> None:
        gateway = Gateway([ModelRoute("tiny", Engine(), api_key="engine-key")], KeyRing([("bench", TOKEN, NO_LIMITS)]),
                          RequestStats())
        await gateway.start("127.0.0.1", port)
        await asyncio.Event().wait()

    uvloop.run(main())


def spread(values: list[float]) -> dict:
    """A figure over the runs: its median and range, and every run's value."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def headroom(results: dict, run: int, key: str, rate: str) -> dict:
    """How much more the upstream could have served than the best proxy asked of it: by direct access (which on a
    small machine the load generator, sharing the upstream's cores, bounds first) and by the upstream's own CPU
    while the best proxy ran (the share of one core it used; a third or less: 3x headroom)."""
    best = max((k for k in CONFIGS if k != "direct"), key=lambda k: results[k][run][key][rate])
    direct = results["direct"][run][key][rate] / results[best][run][key][rate]
    share = results[best][run][key]["upstream_core_share"]
    return {"best_proxy": best, "direct_ratio": direct, "upstream_core_share": share, "cpu_headroom": 1 / share}


BOUND_CHECKS = {"plain": ("requests/s at 16 connections", "c16", "rps"),
                "streams": ("events/s of unpaced streams", "stream_rate", "events_per_s")}


def upstream_bound(results: dict, run: int, checks: tuple[str, ...] = tuple(BOUND_CHECKS)) -> list[str]:
    """Why this run's proxy figures would measure the upstream, if they would: neither direct access nor the
    upstream's CPU shows 3x headroom over the best proxy."""
    reasons = []
    for figure, key, rate in (BOUND_CHECKS[c] for c in checks):
        room = headroom(results, run, key, rate)
        if max(room["direct_ratio"], room["cpu_headroom"]) < UPSTREAM_HEADROOM:
            reasons.append(f"run {run}: {figure}: direct is {room['direct_ratio']:.2f}x {room['best_proxy']} and "
                           f"the upstream used {room['upstream_core_share']:.0%} of a core")
    return reasons


def summarise(results: dict, runs: int) -> dict:
    """Every figure the measured configurations allow (one that needs a configuration not run, or a measurement
    that got no requests, is left out rather than failing the summary)."""
    r_ = range(1, runs + 1)
    g, d, n, c, b = (results.get(k, {}) for k in ("gateway", "direct", "nginx", "clearml", "baseline"))
    w2 = results.get("workers2", {})
    lim, sha = results.get("limits", {}), results.get("shaped", {})
    checked = "direct" in results and any(k in results for k in CONFIGS if k != "direct")
    bound = [reason for r in r_ for reason in upstream_bound(results, r)] if checked else []

    def each(fn) -> dict:
        return spread([fn(r) for r in r_])

    summary: dict = {"configs": list(CONFIGS), "upstream_bound": bool(bound) if checked else None,
                     "upstream_bound_because": bound, "runs": runs,
                     "cores": {"proxy": PROXY_CORES, "upstream": UPSTREAM_CORES, "load": LOAD_CORES}}
    figures = {
        "headroom_plain": lambda: [headroom(results, r, "c16", "rps") for r in r_],
        "headroom_streams": lambda: [headroom(results, r, "stream_rate", "events_per_s") for r in r_],
        "direct_rps_c16": lambda: each(lambda r: d[r]["c16"]["rps"]),
        "gateway_rps_c16": lambda: each(lambda r: g[r]["c16"]["rps"]),
        "baseline_rps_c16": lambda: each(lambda r: b[r]["c16"]["rps"]),
        "nginx_rps_c16": lambda: each(lambda r: n[r]["c16"]["rps"]),
        "clearml_rps_c16": lambda: each(lambda r: c[r]["c16"]["rps"]),
        "gateway_cpu_us_per_request": lambda: each(lambda r: g[r]["c16"]["cpu_us_per_request"]),
        # two worker processes in front of a control plane (`general.gateway_workers: 2`), the same runs
        "workers2_rps_c16": lambda: each(lambda r: w2[r]["c16"]["rps"]),
        "workers2_cpu_us_per_request": lambda: each(lambda r: w2[r]["c16"]["cpu_us_per_request"]),
        "workers2_cpu_us_per_event": lambda: each(lambda r: w2[r]["stream_rate"]["cpu_us_per_event"]),
        "workers2_events_per_s": lambda: each(lambda r: w2[r]["stream_rate"]["events_per_s"]),

        "baseline_cpu_us_per_request": lambda: each(lambda r: b[r]["c16"]["cpu_us_per_request"]),
        "nginx_cpu_us_per_request": lambda: each(lambda r: n[r]["c16"]["cpu_us_per_request"]),
        "gateway_cpu_us_per_event": lambda: each(lambda r: g[r]["stream_rate"]["cpu_us_per_event"]),
        "baseline_cpu_us_per_event": lambda: each(lambda r: b[r]["stream_rate"]["cpu_us_per_event"]),
        "nginx_cpu_us_per_event": lambda: each(lambda r: n[r]["stream_rate"]["cpu_us_per_event"]),
        "load_generator_cpu_us_per_request": lambda: each(lambda r: g[r]["c16"]["load_cpu_us_per_request"]),
        "load_generator_cpu_us_per_event": lambda: each(lambda r: g[r]["stream_rate"]["load_cpu_us_per_event"]),
        "added_latency_p50_ms": lambda: each(lambda r: g[r]["c1"]["p50_ms"] - d[r]["c1"]["p50_ms"]),
        "added_latency_p99_ms": lambda: each(lambda r: g[r]["c1"]["p99_ms"] - d[r]["c1"]["p99_ms"]),
        "ttfc_added_ms_16_streams": lambda: each(
            lambda r: g[r]["streams16"]["ttfc_p50_ms"] - d[r]["streams16"]["ttfc_p50_ms"]),
        "open_streams_1000_completed": lambda: each(lambda r: g[r]["streams1000"]["completed"]),
        "open_streams_1000_ttfc_added_ms": lambda: each(
            lambda r: g[r]["streams1000"]["ttfc_p50_ms"] - d[r]["streams1000"]["ttfc_p50_ms"]),
        "open_streams_1000_rss_mb": lambda: each(lambda r: g[r]["streams1000"]["peak_rss_mb"]),
        # the same run, interleaved: the current gateway over the baseline revision's
        "cpu_per_request_ratio_vs_baseline": lambda: each(
            lambda r: g[r]["c16"]["cpu_us_per_request"] / b[r]["c16"]["cpu_us_per_request"]),
        "cpu_per_event_ratio_vs_baseline": lambda: each(
            lambda r: g[r]["stream_rate"]["cpu_us_per_event"] / b[r]["stream_rate"]["cpu_us_per_event"]),
        "throughput_ratio_vs_baseline": lambda: each(lambda r: g[r]["c16"]["rps"] / b[r]["c16"]["rps"]),
        # the same run, interleaved: what a key's limits add to each request and stream event
        "limits_cpu_us_per_request": lambda: each(lambda r: lim[r]["c16"]["cpu_us_per_request"]),
        "limits_added_cpu_us_per_request": lambda: each(
            lambda r: lim[r]["c16"]["cpu_us_per_request"] - g[r]["c16"]["cpu_us_per_request"]),
        "limits_added_cpu_us_per_event": lambda: each(
            lambda r: lim[r]["stream_rate"]["cpu_us_per_event"] - g[r]["stream_rate"]["cpu_us_per_event"]),
        "shaped_added_cpu_us_per_request": lambda: each(
            lambda r: sha[r]["c16"]["cpu_us_per_request"] - g[r]["c16"]["cpu_us_per_request"]),
        # side by side, alternating (`paired_phase`): the same, measured closer
        "limits_added_cpu_us_per_request_paired": lambda: paired_added(results, "limits", runs),
        "shaped_added_cpu_us_per_request_paired": lambda: paired_added(results, "shaped", runs),
        # one process, its keys alternating (`one_process_phase`): the same, without two processes' difference
        "limits_added_cpu_us_per_request_one_process": lambda: one_process_added(results, "limits", runs),
        "shaped_added_cpu_us_per_request_one_process": lambda: one_process_added(results, "shaped", runs),
        # the gateway's own objects, no socket (`in_process_phase`): the Python a key's limits add, alone
        "limits_added_cpu_us_per_request_in_process": lambda: in_process_added(results, "limits", runs),
        "shaped_added_cpu_us_per_request_in_process": lambda: in_process_added(results, "shaped", runs),
    }
    # ratios against nginx and ClearML's proxy only where the proxies, not the upstream, were measured
    if checked and not any(upstream_bound(results, r, ("plain",)) for r in r_):
        figures.update({
            "throughput_ratio_vs_nginx": lambda: each(lambda r: g[r]["c16"]["rps"] / n[r]["c16"]["rps"]),
            "throughput_ratio_vs_clearml_proxy": lambda: each(lambda r: g[r]["c16"]["rps"] / c[r]["c16"]["rps"]),
            "cpu_ratio_vs_nginx": lambda: each(
                lambda r: g[r]["c16"]["cpu_us_per_request"] / n[r]["c16"]["cpu_us_per_request"]),
            "workers2_cpu_ratio_vs_nginx": lambda: each(
                lambda r: w2[r]["c16"]["cpu_us_per_request"] / n[r]["c16"]["cpu_us_per_request"]),
        })
    if checked and not any(upstream_bound(results, r, ("streams",)) for r in r_):
        figures.update({
            "cpu_per_event_ratio_vs_nginx": lambda: each(
                lambda r: g[r]["stream_rate"]["cpu_us_per_event"] / n[r]["stream_rate"]["cpu_us_per_event"]),
            "workers2_cpu_per_event_ratio_vs_nginx": lambda: each(
                lambda r: w2[r]["stream_rate"]["cpu_us_per_event"] / n[r]["stream_rate"]["cpu_us_per_event"]),
            "stream_rate_ratio_vs_nginx": lambda: each(
                lambda r: g[r]["stream_rate"]["events_per_s"] / n[r]["stream_rate"]["events_per_s"]),
        })
    if "tokens" in results:
        figures["tokens_ratio_vs_direct_64_streams"] = lambda: spread([t["ratio"] for t in results["tokens"].values()])
    for name, figure in figures.items():
        with contextlib.suppress(KeyError, TypeError, ZeroDivisionError):
            summary[name] = figure()
    return summary


def print_table(results: dict, runs: int) -> None:
    rows = [("req/s @1", lambda e: e["c1"]["rps"], "{:.0f}"), ("req/s @16", lambda e: e["c16"]["rps"], "{:.0f}"),
            ("p50 @1 ms", lambda e: e["c1"]["p50_ms"], "{:.3f}"),
            ("p99 @1 ms", lambda e: e["c1"]["p99_ms"], "{:.3f}"),
            ("CPU us/req @16", lambda e: e["c16"].get("cpu_us_per_request"), "{:.0f}"),
            ("unpaced streams events/s", lambda e: e["stream_rate"]["events_per_s"], "{:.0f}"),
            ("CPU us/event", lambda e: e["stream_rate"].get("cpu_us_per_event"), "{:.1f}"),
            ("16 streams TTFC ms", lambda e: e["streams16"]["ttfc_p50_ms"], "{:.1f}"),
            ("16 streams events/s", lambda e: e["streams16"]["events_per_s"], "{:.0f}"),
            ("1000 streams done", lambda e: e["streams1000"]["completed"], "{}"),
            ("1000 streams TTFC ms", lambda e: e["streams1000"]["ttfc_p50_ms"], "{:.0f}"),
            ("1000 streams RSS MB", lambda e: e["streams1000"]["peak_rss_mb"], "{:.0f}")]
    print("\n| figure (run " + " / run ".join(str(r) for r in range(1, runs + 1)) + ") | "
          + " | ".join(CONFIGS) + " |")
    print("| --- |" + " --- |" * len(CONFIGS))
    for label, get, fmt in rows:
        cells = []
        for kind in CONFIGS:
            values = []
            for r in range(1, runs + 1):
                try:
                    value = get(results[kind][r])
                except (KeyError, TypeError):
                    value = None
                values.append("–" if value is None else fmt.format(value))
            cells.append(" / ".join(values))
        print(f"| {label} | " + " | ".join(cells) + " |")


def main() -> int:
    global CONFIGS, BASELINE_TREE, PAIRED_ROUNDS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each wrk measurement")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip-tokens", action="store_true", help="no real-SGLang tokens test")
    parser.add_argument("--configs", default=",".join(ALL_CONFIGS),
                        help="which of direct,gateway,clearml,nginx to measure (comma-separated)")
    parser.add_argument("--baseline", metavar="REV", help="also measure the gateway of this git revision")
    parser.add_argument("--output", type=Path, default=RESULTS, help="where the results go (JSON)")
    parser.add_argument("--rounds", type=int, default=PAIRED_ROUNDS,
                        help="rounds of the side-by-side and one-process measurements of keys' limits, a run")
    parser.add_argument("--keys-only", action="store_true",
                        help="only what keys' limits add (side by side, and in one process): no other figure")
    parser.add_argument("--serve-gateway", nargs=2, metavar=("PORT", "UPSTREAM"), help=argparse.SUPPRESS)
    parser.add_argument("--serve-gateway-key", nargs=2, metavar=("PORT", "UPSTREAM"), help=argparse.SUPPRESS)
    parser.add_argument("--serve-gateway-limits", nargs=2, metavar=("PORT", "UPSTREAM"), help=argparse.SUPPRESS)
    parser.add_argument("--serve-gateway-shaped", nargs=2, metavar=("PORT", "UPSTREAM"), help=argparse.SUPPRESS)
    parser.add_argument("--serve-gateway-keys", nargs=2, metavar=("PORT", "UPSTREAM"), help=argparse.SUPPRESS)
    parser.add_argument("--serve-gateway-workers2", nargs=2, metavar=("PORT", "UPSTREAM"), help=argparse.SUPPRESS)
    parser.add_argument("--serve-clearml", nargs=2, metavar=("PORT", "UPSTREAM"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_gateway:
        serve_gateway(int(args.serve_gateway[0]), args.serve_gateway[1])
        return 0
    for kind, served in (("limits", args.serve_gateway_limits), ("shaped", args.serve_gateway_shaped),
                         ("keys", args.serve_gateway_keys), ("workers2", args.serve_gateway_workers2)):
        if served:
            serve_gateway(int(served[0]), served[1], kind)
            return 0
    if args.serve_gateway_key:
        serve_gateway_with_key(int(args.serve_gateway_key[0]), args.serve_gateway_key[1])
        return 0
    if args.serve_clearml:
        serve_clearml(int(args.serve_clearml[0]), args.serve_clearml[1])
        return 0
    PAIRED_ROUNDS = args.rounds
    CONFIGS = tuple(k for k in ALL_CONFIGS if k in args.configs.split(","))
    if unknown := set(args.configs.split(",")) - set(ALL_CONFIGS):
        parser.error(f"--configs: unknown {', '.join(sorted(unknown))}; choose from {', '.join(ALL_CONFIGS)}")
    ensure_tools()
    raise_fd_limit()
    os.sched_setaffinity(0, LOAD_CORES)  # this script is the streams' load generator
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        workdir = Path(tmp)
        if args.baseline:
            BASELINE_TREE = workdir / "baseline"
            subprocess.run(["git", "worktree", "add", "--detach", str(BASELINE_TREE), args.baseline], cwd=ROOT,
                           check=True, capture_output=True)
            CONFIGS = (*CONFIGS, "baseline")
        try:
            for run in range(1, args.runs + 1):
                if not args.keys_only:
                    plain_and_stream_phase(results, run, args.seconds, workdir)
                paired_phase(results, run, workdir)
                one_process_phase(results, run, workdir)
                in_process_phase(results, run)
                write_results(results, run, args.baseline, args.output)
            if not args.skip_tokens:
                tokens_phase(results, args.runs, workdir)
        finally:
            if args.baseline:
                subprocess.run(["git", "worktree", "remove", "--force", str(BASELINE_TREE)], cwd=ROOT, check=False)
    print_table(results, args.runs)
    summary = write_results(results, args.runs, args.baseline, args.output)
    print("\n" + json.dumps(summary, indent=2))
    print(f"wrote {args.output}")
    return 0


def write_results(results: dict, runs: int, baseline: str | None, output: Path) -> dict:
    """The summary of the runs so far, with every measurement, in `output` (bench/results/gateway.json)."""
    summary = summarise(results, runs)
    if baseline:
        summary["baseline_revision"] = baseline
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"summary": summary, "runs": results}, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    sys.exit(main())
