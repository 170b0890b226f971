#!/usr/bin/env python3
"""The edge under floods, measured: `clearml-sglang run` serving the README's model (SmolLM2 on the real SGLang, on
this CPU) in a process of its own, attacked with raw sockets from other threads and processes (`tests/floods.py`),
while a prober and a token holder measure what a well-behaved client sees.

    .venv/bin/python bench/edge.py [--flood-seconds 60] [--baseline REV]

Scenarios (issue 21's findings, each run against the same deployment):
    heads    400 connections sending 240 KB of one-byte header fields without ending the head; then 400 holding
             31 KB each; the gateway's memory (peak growth, and how soon it is back) and /healthz at 20 Hz
    idle     8,000 idle connections from 127.0.0.2, opened again as they are closed, for --flood-seconds; a token
             holder on 127.0.0.3 asks for one token every 100 ms on a kept-alive connection, another on 127.0.0.6 on
             a new connection each time, a third for the model list (the gateway's own answer) on 127.0.0.4; the
             engine's own HTTP server is asked directly on 127.0.0.5 (what the machine's CPU leaves it, gateway
             aside): each answer's time
    full     the same with 9,000: more than the whole table (8,192)
    prompts  a 30 MB prompt and a one-token request sent beside it; a 1 MB prompt (within the body limit, far beyond
             the model's context)
    bodies   20 token holders sending 31 MiB bodies at once: the gateway's memory

With --baseline REV the same scenarios run first against that revision of the app (a git worktree, this venv), side
by side: bench/results/edge.json holds both. Results are written after every scenario; a run of some scenarios
(--scenarios full,prompts) replaces theirs and keeps the others'.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.floods import Observer, chat_body, finished, head_flood, health_sampler, post_raw, start_idle_flood  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "edge.json"
TOKEN = "bench-edge-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
CHAT = "/smollm2/v1/chat/completions"
MB = 2**20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def model_config(scratch: Path) -> Path:
    """The README's main job's config (SmolLM2 and its two demo adapters), with this bench's token."""
    from app.demo import cache_dir, smollm_raw
    from app.demo.smollm import prepare

    made = prepare(cache_dir() / "smollm2", lambda text: print(text, flush=True))
    raw = smollm_raw(made.base, made.adapters)
    raw["auth"] = {"tokens": [TOKEN]}
    raw["idle"] = {"time_limit_hours": 0, "report_interval_seconds": 10}
    path = scratch / "edge.json"
    path.write_text(json.dumps(raw))
    return path


class Deployment:
    """`python -m app run` from a source tree, on loopback, in a process group of its own."""

    def __init__(self, tree: Path, config: Path, scratch: Path):
        self.port = free_port()
        env = {**os.environ, "PYTHONPATH": str(tree), "CLEARML_CACHE_DIR": str(scratch / "clearml")}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app", "run", "--config", str(config), "--port", str(self.port), "--host",
             "127.0.0.1", "--offline"], cwd=tree, env=env, start_new_session=True,
            stdout=open(scratch / f"run-{self.port}.log", "w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the deployment ended with {self.process.returncode}: {scratch}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"http://127.0.0.1:{self.port}/readyz", timeout=5).status_code == 200:
                    return
            time.sleep(0.5)
        raise RuntimeError("the deployment was not ready in 900 s")

    def rss(self) -> int:
        return psutil.Process(self.process.pid).memory_info().rss

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)


class Memory(threading.Thread):
    """The gateway process's resident memory, sampled every 50 ms: its peak over the baseline."""

    def __init__(self, deployment: Deployment):
        super().__init__(daemon=True)
        self.deployment, self.baseline = deployment, deployment.rss()
        self.peak, self._done = self.baseline, threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.05):
            self.peak = max(self.peak, self.deployment.rss())

    def stop(self) -> dict[str, float]:
        self._done.set()
        self.join()
        ended = time.monotonic()
        while (back := self.deployment.rss() <= self.baseline + 16 * MB) is False and time.monotonic() < ended + 30:
            time.sleep(0.1)
        return {"baseline_mb": round(self.baseline / MB, 1),
                "peak_growth_mb": round((self.peak - self.baseline) / MB, 1),
                "back_within_16_mb_after_s": round(time.monotonic() - ended, 1) if back else None}


def heads(deployment: Deployment, _: argparse.Namespace) -> dict[str, object]:
    prober, memory = health_sampler(deployment.port), Memory(deployment)
    prober.start()
    memory.start()
    endless = head_flood(deployment.port, 400, 240_000, 60.0)
    held = head_flood(deployment.port, 400, 31_000, 60.0)
    return {"endless": endless, "held": held, "memory": memory.stop(), "healthz": prober.stop().summary()}


def idle(deployment: Deployment, args: argparse.Namespace, connections: int = 8000) -> dict[str, object]:
    flood = start_idle_flood(deployment.port, "127.0.0.2", connections, args.flood_seconds)
    time.sleep(2)  # (the flood's first connections are in before the token holder starts measuring)
    engine_port = next(int(p.cmdline()[p.cmdline().index("--port") + 1])
                       for p in psutil.Process(deployment.process.pid).children() if "--port" in p.cmdline())
    observers = {
        "token_holder_chat": Observer(deployment.port, CHAT, every_s=0.1, headers=AUTH, body=chat_body("Hi"),
                                      source="127.0.0.3", timeout_s=60),
        "token_holder_model_list": Observer(deployment.port, "/v1/models", every_s=0.1, headers=AUTH,
                                            source="127.0.0.4", timeout_s=60),
        "token_holder_chat_new_connections": Observer(deployment.port, CHAT, every_s=0.1, headers=AUTH,
                                                      body=chat_body("Hi"), fresh=True, source="127.0.0.6",
                                                      timeout_s=60),
        # (answered 401 without the engine's key: only its time is read)
        "engine_directly": Observer(engine_port, "/metrics", every_s=0.1, source="127.0.0.5", timeout_s=60),
    }
    for observer in observers.values():
        observer.start()
    report = finished(flood, args.flood_seconds + 120)
    return {"flood": report, **{name: observer.stop().summary() for name, observer in observers.items()}}


def prompts(deployment: Deployment, _: argparse.Namespace) -> dict[str, object]:
    """Each big prompt with a token holder asking for one token every 250 ms meanwhile (from before it is sent to
    after it is answered): how long the big one took, and the token holder's worst answer."""
    results: dict[str, object] = {}
    for name, size in (("30_mb_prompt", 30_000_000), ("1_mb_prompt", 1_000_000)):
        holder = Observer(deployment.port, CHAT, every_s=0.25, headers=AUTH, body=chat_body("Hi"),
                          source="127.0.0.3", timeout_s=300)
        holder.start()
        time.sleep(0.5)
        status, took, _ = post_raw(deployment.port, CHAT, TOKEN, chat_body("x" * size), 300)
        time.sleep(0.5)
        results[name] = {"status": status, "seconds": round(took, 3), "token_holder_meanwhile": holder.stop().summary()}
    return results


def bodies(deployment: Deployment, _: argparse.Namespace) -> dict[str, object]:
    body, memory = chat_body("x" * (31 * MB)), Memory(deployment)
    memory.start()
    answers: list[tuple[int, float, bytes]] = []
    threads = [threading.Thread(target=lambda: answers.append(post_raw(deployment.port, CHAT, TOKEN, body, 300)))
               for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"statuses": sorted({a[0] for a in answers}), "worst_s": round(max(a[1] for a in answers), 3),
            "memory": memory.stop()}


def full(deployment: Deployment, args: argparse.Namespace) -> dict[str, object]:
    return idle(deployment, args, 9000)


SCENARIOS = {"heads": heads, "idle": idle, "full": full, "prompts": prompts, "bodies": bodies}


# The figures compared side by side: (scenario, path to the figure), lower is better.
FIGURES = {
    "heads: peak memory growth (MB)": ("heads", "memory", "peak_growth_mb"),
    "heads: worst /healthz (ms)": ("heads", "healthz", "worst_ms"),
    "idle 8,000: token holder's worst chat (ms)": ("idle", "token_holder_chat", "worst_ms"),
    "full 9,000: token holder's worst chat (ms)": ("full", "token_holder_chat", "worst_ms"),
    "full 9,000: token holder's failed chats": ("full", "token_holder_chat", "failures"),
    "full 9,000: new-connection token holder's failed chats": ("full", "token_holder_chat_new_connections",
                                                               "failures"),
    "full 9,000: new-connection token holder's worst chat (ms)": ("full", "token_holder_chat_new_connections",
                                                                  "worst_ms"),
    "30 MB prompt: seconds to its answer": ("prompts", "30_mb_prompt", "seconds"),
    "30 MB prompt: token holder's worst chat meanwhile (ms)": ("prompts", "30_mb_prompt", "token_holder_meanwhile",
                                                               "worst_ms"),
    "20 bodies of 31 MiB: peak memory growth (MB)": ("bodies", "memory", "peak_growth_mb"),
    "20 bodies of 31 MiB: worst answer (s)": ("bodies", "worst_s"),
}


def side_by_side(out: dict) -> dict[str, dict[str, object]]:
    """Each figure for the baseline and the current tree, and current / baseline where both have it."""
    def figure(run: object, path: tuple[str, ...]) -> object:
        for key in path:
            run = run.get(key) if isinstance(run, dict) else None
        return run

    table = {}
    for label, path in FIGURES.items():
        base, current = figure(out.get("baseline"), path), figure(out.get("current"), path)
        ratio = round(current / base, 4) if isinstance(base, (int, float)) and isinstance(current, (int, float)) \
            and base else None
        table[label] = {"baseline": base, "current": current, "current_over_baseline": ratio}
    return table


def measure(name: str, tree: Path, config: Path, scratch: Path, args: argparse.Namespace, out: dict) -> None:
    deployment = Deployment(tree, config, scratch)
    try:
        for scenario in args.scenarios.split(","):
            print(f"[{name}] {scenario} ...", flush=True)
            try:
                out.setdefault(name, {})[scenario] = SCENARIOS[scenario](deployment, args)
            except Exception as exc:  # (what the others measured is kept)
                out.setdefault(name, {})[scenario] = {"error": repr(exc)}
            out[name]["alive"] = deployment.process.poll() is None
            RESULTS.write_text(json.dumps(out, indent=2) + "\n")
            print(json.dumps(out[name][scenario]), flush=True)
    finally:
        deployment.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flood-seconds", type=float, default=60)
    parser.add_argument("--baseline", help="a git revision to measure first, side by side")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    args = parser.parse_args()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    # (a run of some scenarios updates theirs and keeps the others' last figures)
    out: dict[str, object] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    out.update({"machine": {"cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1)},
                "flood_seconds": args.flood_seconds})
    with tempfile.TemporaryDirectory(prefix="edge-bench-") as tmp:
        scratch = Path(tmp)
        config = model_config(scratch)
        if args.baseline:
            tree = scratch / "baseline"
            subprocess.run(["git", "worktree", "add", "--detach", str(tree), args.baseline], cwd=ROOT, check=True)
            try:
                out["baseline_revision"] = args.baseline
                measure("baseline", tree, config, scratch, args, out)
            finally:
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
        measure("current", ROOT, config, scratch, args, out)
        shutil.rmtree(scratch / "clearml", ignore_errors=True)
    out["side_by_side"] = side_by_side(out)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["side_by_side"], indent=2))


if __name__ == "__main__":
    main()
