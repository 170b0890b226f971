#!/usr/bin/env python3
"""Gateway benchmark: our gateway side by side with direct access, ClearML's local proxy and nginx.

    .venv/bin/python bench/gateway.py [--seconds 5] [--runs 2] [--skip-tokens]

Everything runs on this machine's loopback. One upstream at a time (the stand-in SGLang server answering at once,
or streaming at a fixed pace; the real SGLang on the CPU for the tokens test); four ways to reach it:
    direct    the upstream itself
    gateway   app.gateway.Gateway (uvloop, bearer check), one process
    clearml   ClearML's local proxy, `Task.get_http_router()`, a route with a bearer-check callback, access log on
              as shipped (clearml[router]: fastapi, uvicorn, httpx)
    nginx     Debian's nginx, one worker, keep-alive upstream, buffering off, the same bearer check
Load: wrk (Debian) for plain requests at 1, 16 and 64 connections; an asyncio client for 16 x 512-event SSE
streams (three rounds after an unrecorded warm-up round) and for 1,000 concurrent 100-event streams (from cold);
proxies' CPU from the OS (psutil, whole process tree).
The whole set runs twice, interleaved; ratios are computed within each run, and bench/results/gateway.json holds
the worse of the two for each figure. Installs wrk and nginx with apt-get when they are missing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
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
FAKE = ROOT / "tests" / "fakes" / "fake_sglang_server.py"
RESULTS = ROOT / "bench" / "results" / "gateway.json"
TOKEN = "bench-token-0123456789abcdef"
CONFIGS = ("direct", "gateway", "clearml", "nginx")
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


def start_upstream(token_delay: float) -> Proc:
    port = free_port()
    env = {**os.environ, "FAKE_SGLANG_TOKEN_DELAY_SECONDS": str(token_delay), "FAKE_SGLANG_STARTUP_SECONDS": "0"}
    popen = subprocess.Popen([sys.executable, str(FAKE), "--model-path", "m", "--port", str(port),
                              "--enable-metrics"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = Proc(popen, f"http://127.0.0.1:{port}")
    wait_http(proc.url + "/health")
    return proc


def start_proxy(kind: str, upstream: str, workdir: Path) -> Proc:
    port = free_port()
    if kind == "nginx":
        conf = workdir / f"nginx-{port}.conf"
        conf.write_text(NGINX_CONF.format(port=port, upstream=upstream.removeprefix("http://"), token=TOKEN,
                                          prefix=workdir))
        popen = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(workdir)], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
    else:
        popen = subprocess.Popen([sys.executable, __file__, f"--serve-{kind}", str(port), upstream],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=workdir,
                                 env={**os.environ, "CLEARML_OFFLINE_MODE": "1", "CLEARML_CACHE_DIR": str(workdir)})
    proc = Proc(popen, f"http://127.0.0.1:{port}")
    wait_http(proc.url + ("/healthz" if kind == "gateway" else "/health"))  # nginx and ClearML: proxied
    return proc


NGINX_CONF = """
daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/nginx-error.log;
events {{ worker_connections 8192; }}
http {{
  access_log off;
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


def serve_gateway(port: int, upstream: str) -> None:
    import uvloop

    from app.gateway import Gateway, ModelRoute, RequestStats, TokenChecker

    class Engine:
        url, state = upstream, "resident"

    async def main() -> None:
        gateway = Gateway([ModelRoute("m", Engine())], TokenChecker([TOKEN]), RequestStats())
        await gateway.start("127.0.0.1", port)
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


def wrk(url: str, connections: int, seconds: float, workdir: Path) -> dict:
    script = workdir / "post.lua"
    script.write_text(f'wrk.method = "POST"\nwrk.body = \'{json.dumps(CHAT)}\'\n'
                      f'wrk.headers["Content-Type"] = "application/json"\n'
                      f'wrk.headers["Authorization"] = "Bearer {TOKEN}"\n')
    threads = 1 if connections == 1 else 2
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency", "-s",
                          str(script), url + "/v1/chat/completions"], capture_output=True, text=True).stdout

    def ms(label: str) -> float:
        match = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)", out, re.M)
        value, unit = float(match.group(1)), match.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    requests = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "p50_ms": ms("50"),
            "p99_ms": ms("99"), "requests": requests, "non_2xx": int(errors.group(1)) if errors else 0}


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
              "events_per_s": chunks / elapsed, "peak_rss_mb": peak_rss or None}
    if _ttfc_list:
        result["ttfc"] = ttfc
    return result


def tokens_per_second(url: str, headers: dict, requests_: int = 16, tokens: int = 128) -> float:
    import concurrent.futures

    import requests

    body = {"model": "tiny", "prompt": "import os", "max_tokens": tokens, "temperature": 0, "ignore_eos": True}

    def one(_: int) -> int:
        return requests.post(url + "/v1/completions", json=body, headers=headers,
                             timeout=300).json()["usage"]["completion_tokens"]

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(requests_) as pool:
        generated = sum(pool.map(one, range(requests_)))
    return generated / (time.monotonic() - started)


# ----------------------------------------------------------------------------------------------------------
# the runs


def plain_and_stream_phase(results: dict, run: int, seconds: float, workdir: Path) -> None:
    upstream = start_upstream(0.0)
    try:
        for kind in CONFIGS:
            proxy = None if kind == "direct" else start_proxy(kind, upstream.url, workdir)
            url = upstream.url if proxy is None else proxy.url
            try:
                wrk(url, 16, 1, workdir)  # warm-up, not recorded
                entry = results.setdefault(kind, {}).setdefault(run, {})
                for connections in (1, 16, 64):
                    before = proxy.cpu_seconds() if proxy else 0.0
                    entry[f"c{connections}"] = measured = wrk(url, connections, seconds, workdir)
                    if proxy is not None and measured["requests"]:
                        measured["cpu_us_per_request"] = (proxy.cpu_seconds() - before) / measured["requests"] * 1e6
                print(f"run {run} {kind:8} plain: " + ", ".join(
                    f"c{c} {entry[f'c{c}']['rps']:.0f} req/s" for c in (1, 16, 64)), flush=True)
            finally:
                if proxy is not None:
                    proxy.stop()
    finally:
        upstream.stop()
    for delay, key, count, events, deadline, rounds in (
            (0.002, "streams16", 16, 512, 30, 3),  # 512 events at 2 ms, three rounds after a warm-up
            (0.1, "streams1000", 1000, 100, 25, 1)):  # 100 at 100 ms: 10 s, from cold
        upstream = start_upstream(delay)
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
    from app.sglang.command import build_engine_command

    made = make_tiny_models(workdir / "tiny")
    raw = demo_raw(made.base, made.adapters)
    raw["models"][0]["lora"] = {"enable": False}
    config = parse_config(raw)
    port = free_port()
    command = build_engine_command(config, 0, describe(config)[0], port=port, engine_api_key="engine-key")
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
        tokens_per_second(direct, {"Authorization": "Bearer engine-key"}, 4, 16)  # warm-up
        for run in range(1, runs + 1):
            d = tokens_per_second(direct, {"Authorization": "Bearer engine-key"})
            g = tokens_per_second(proxy.url, {"Authorization": f"Bearer {TOKEN}"})
            results.setdefault("tokens", {})[run] = {"direct": d, "gateway": g, "ratio": g / d}
            print(f"run {run} tokens/s: direct {d:.0f}, gateway {g:.0f} ({g / d:.3f})", flush=True)
    finally:
        if proxy is not None:
            proxy.stop()
        os.killpg(engine.pid, signal.SIGTERM)
        engine.wait(60)


def serve_gateway_with_key(port: int, upstream: str) -> None:
    import uvloop

    from app.gateway import Gateway, ModelRoute, RequestStats, TokenChecker

    class Engine:
        url, state = upstream, "resident"

    async def main() -> None:
        gateway = Gateway([ModelRoute("tiny", Engine(), api_key="engine-key")], TokenChecker([TOKEN]), RequestStats())
        await gateway.start("127.0.0.1", port)
        await asyncio.Event().wait()

    uvloop.run(main())


def summarise(results: dict, runs: int) -> dict:
    def per_run(fn):
        return [fn(r) for r in range(1, runs + 1)]

    g, d, n, c = (results[k] for k in ("gateway", "direct", "nginx", "clearml"))
    summary = {
        "added_latency_p50_ms": max(per_run(lambda r: g[r]["c1"]["p50_ms"] - d[r]["c1"]["p50_ms"])),
        "added_latency_p99_ms": max(per_run(lambda r: g[r]["c1"]["p99_ms"] - d[r]["c1"]["p99_ms"])),
        "throughput_ratio_vs_nginx": min(per_run(lambda r: g[r]["c16"]["rps"] / n[r]["c16"]["rps"])),
        "throughput_ratio_vs_clearml_proxy": min(per_run(lambda r: g[r]["c16"]["rps"] / c[r]["c16"]["rps"])),
        "cpu_us_per_request": max(per_run(lambda r: g[r]["c16"]["cpu_us_per_request"])),
        "ttfc_added_ms": max(per_run(lambda r: g[r]["streams16"]["ttfc_p50_ms"] - d[r]["streams16"]["ttfc_p50_ms"])),
        "open_streams_1000_completed": min(per_run(lambda r: g[r]["streams1000"]["completed"])),
        "open_streams_1000_ttfc_added_ms": max(per_run(
            lambda r: g[r]["streams1000"]["ttfc_p50_ms"] - d[r]["streams1000"]["ttfc_p50_ms"])),
        "open_streams_1000_rss_mb": max(per_run(lambda r: g[r]["streams1000"]["peak_rss_mb"])),
    }
    if "tokens" in results:
        summary["tokens_ratio_vs_direct"] = min(results["tokens"][r]["ratio"] for r in results["tokens"])
    return summary


def print_table(results: dict, runs: int) -> None:
    rows = [("req/s @1", lambda e: e["c1"]["rps"], "{:.0f}"), ("req/s @16", lambda e: e["c16"]["rps"], "{:.0f}"),
            ("req/s @64", lambda e: e["c64"]["rps"], "{:.0f}"), ("p50 @1 ms", lambda e: e["c1"]["p50_ms"], "{:.3f}"),
            ("p99 @1 ms", lambda e: e["c1"]["p99_ms"], "{:.3f}"),
            ("CPU us/req @16", lambda e: e["c16"].get("cpu_us_per_request"), "{:.0f}"),
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each wrk measurement")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--skip-tokens", action="store_true", help="no real-SGLang tokens test")
    parser.add_argument("--serve-gateway", nargs=2, metavar=("PORT", "UPSTREAM"), help=argparse.SUPPRESS)
    parser.add_argument("--serve-gateway-key", nargs=2, metavar=("PORT", "UPSTREAM"), help=argparse.SUPPRESS)
    parser.add_argument("--serve-clearml", nargs=2, metavar=("PORT", "UPSTREAM"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_gateway:
        serve_gateway(int(args.serve_gateway[0]), args.serve_gateway[1])
        return 0
    if args.serve_gateway_key:
        serve_gateway_with_key(int(args.serve_gateway_key[0]), args.serve_gateway_key[1])
        return 0
    if args.serve_clearml:
        serve_clearml(int(args.serve_clearml[0]), args.serve_clearml[1])
        return 0
    ensure_tools()
    raise_fd_limit()
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        workdir = Path(tmp)
        for run in range(1, args.runs + 1):
            plain_and_stream_phase(results, run, args.seconds, workdir)
        if not args.skip_tokens:
            tokens_phase(results, args.runs, workdir)
    print_table(results, args.runs)
    summary = summarise(results, args.runs)
    print("\n" + json.dumps(summary, indent=2))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"summary": summary, "runs": results}, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
