#!/usr/bin/env python3
"""Keys' priorities through SGLang, measured: the README's model (SmolLM2 on the real SGLang, on this CPU) behind
`clearml-sglang run`, with two keys, `low` and `high`.

    .venv/bin/python bench/priority.py [--low-streams 6] [--probes 12]

The engine runs at most 2 requests at once (`max-running-requests: 2`). The low key keeps `--low-streams` background
streams in flight all along (each asking for 48 tokens, a new one as soon as one ends): the engine is saturated,
requests wait in its queue. Meanwhile `--probes` pairs of probe streams (8 tokens each), one high key's and one low
key's, are sent one at a time, alternating: alike in everything but their key. Each request's time to first token is
measured by its client (to the first content chunk). Two runs, the same load: with `auth.limits` giving `high`
priority 100 and `low` 0 (SGLang's priority scheduling: the waiting queue by priority, and preemption past a gap of
10), and without limits (first come, first served). For each, the medians, their ratio high / low and its 95%
interval (a bootstrap): without priorities the ratio's interval should hold 1. Results: bench/results/priority.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from edge import Deployment  # noqa: E402  (bench/edge.py: `python -m app run` in a process group of its own)

RESULTS = ROOT / "bench" / "results" / "priority.json"
LOW = "bench-priority-low-0123456789"
HIGH = "bench-priority-high-0123456789"
CHAT = "/smollm2/v1/chat/completions"


def config(scratch: Path, prioritized: bool) -> Path:
    from app.demo import cache_dir, smollm_raw
    from app.demo.smollm import prepare

    made = prepare(cache_dir() / "smollm2", lambda text: print(text, flush=True))
    raw = smollm_raw(made.base, made.adapters)
    raw["models"][0]["max-running-requests"] = 2
    raw["auth"] = {"tokens": [f"low={LOW}", f"high={HIGH}"]}
    if prioritized:
        raw["auth"]["limits"] = {"low": {"priority": 0}, "high": {"priority": 100}}
    raw["idle"] = {"time_limit_hours": 0, "report_interval_seconds": 10}
    path = scratch / f"priority-{prioritized}.json"
    path.write_text(json.dumps(raw))
    return path


async def stream_ttft(session: aiohttp.ClientSession, base: str, token: str, max_tokens: int,
                      prompt: str) -> float | None:
    """Seconds from sending to the first content chunk (None: it failed)."""
    body = {"model": "smollm2", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "stream": True, "temperature": 0, "ignore_eos": True}
    sent = time.monotonic()
    first = None
    async with session.post(base + CHAT, json=body, headers={"Authorization": f"Bearer {token}"}) as response:
        if response.status != 200:
            print(f"  {response.status}: {(await response.text())[:200]}", flush=True)
            return None
        async for line in response.content:
            if first is None and line.startswith(b"data: {") and b'"content"' in line:
                first = time.monotonic() - sent
    return first


async def load(base: str, low_streams: int, probes: int) -> dict[str, list[float]]:
    """The low key's background streams keep the engine saturated; meanwhile `probes` pairs of probes, a high key's
    and a low key's, one at a time, alternating (which goes first alternates too): each measured by its time to the
    first token. The two keys' probes are alike in everything but the key, so without priorities they find the same
    queue; the background's own times are measured too (a request sent as one ends finds a fuller queue than one
    sent at a random moment)."""
    measured: dict[str, list[float]] = {"high": [], "low": [], "background": []}
    stop = asyncio.Event()
    measuring = asyncio.Event()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        async def background(i: int) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                ttft = await stream_ttft(session, base, LOW, 48, f"Low {i}.{n}: write about the sea.")
                if ttft is not None and measuring.is_set() and not stop.is_set():
                    measured["background"].append(ttft)

        workers = [asyncio.create_task(background(i)) for i in range(low_streams)]
        await asyncio.sleep(15)  # the queue fills: every background stream's first request is under way or waiting
        measuring.set()
        for j in range(probes):
            for key in (("high", "low") if j % 2 == 0 else ("low", "high")):
                token = HIGH if key == "high" else LOW
                ttft = await stream_ttft(session, base, token, 8, f"Probe {key} {j}: name a colour.")
                if ttft is not None:
                    measured[key].append(ttft)
                await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*workers)
    return measured


def ratio_interval(high: list[float], low: list[float]) -> list[float]:
    """A 95% interval of median(high) / median(low): a percentile bootstrap, 2,000 resamples, seeded."""
    draw = random.Random(0)
    median = statistics.median
    ratios = sorted(median(draw.choices(high, k=len(high))) / median(draw.choices(low, k=len(low)))
                    for _ in range(2000))
    return [round(ratios[50], 3), round(ratios[1949], 3)]


def summary(measured: dict[str, list[float]]) -> dict[str, object]:
    medians = {k: statistics.median(v) if v else None for k, v in measured.items()}
    high, low = medians["high"], medians["low"]
    both = bool(measured["high"]) and bool(measured["low"])
    return {"high_ttft_median_s": high, "low_ttft_median_s": low, "background_ttft_median_s": medians["background"],
            "high_over_low": high / low if both else None,  # type: ignore[operator]
            "high_over_low_ci95": ratio_interval(measured["high"], measured["low"]) if both else None,
            **{f"{k}_requests": len(v) for k, v in measured.items()},
            **{f"{k}_ttft_s": [round(t, 3) for t in v] for k, v in measured.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--low-streams", type=int, default=6)
    parser.add_argument("--probes", type=int, default=12, help="probes of each key")
    args = parser.parse_args()
    results: dict[str, object] = {"low_streams": args.low_streams, "probes": args.probes,
                                  "max_running_requests": 2}
    with tempfile.TemporaryDirectory(prefix="bench-priority-") as tmp:
        scratch = Path(tmp)
        for prioritized in (True, False):
            name = "with priorities" if prioritized else "without priorities"
            print(f"{name}: starting the deployment", flush=True)
            deployment = Deployment(ROOT, config(scratch, prioritized), scratch)
            try:
                measured = asyncio.run(load(f"http://127.0.0.1:{deployment.port}", args.low_streams, args.probes))
            finally:
                deployment.stop()
            results[name] = summary(measured)
            r = results[name]
            print(f"{name}: time to first token, median: high {r['high_ttft_median_s']} s, low "  # type: ignore[index]
                  f"{r['low_ttft_median_s']} s (high/low {r['high_over_low']}, 95% interval "  # type: ignore[index]
                  f"{r['high_over_low_ci95']})", flush=True)  # type: ignore[index]
            RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
