"""Floods at the edge (issue 21), through a whole deployment on loopback, bounded in time and count: what strangers
can make the gateway hold, and what a token holder sees meanwhile. The attackers and observers are `tests/floods.py`,
which `bench/edge.py` also runs against the real SGLang for the figures."""

from __future__ import annotations

import asyncio
import json

import psutil

from tests.floods import (
    Observer,
    chat_body,
    finished,
    head_flood,
    health_sampler,
    post_raw,
    start_idle_flood,
)
from tests.harness import TOKEN, Running, _until, requests_logged, run_async, running
from tests.reliability.test_reliability import RSS_BOUND, PeakRss

MB = 2**20
# How long the connection floods last here (the figures in docs/performance.md are bench/edge.py's 60 s).
FLOOD_SECONDS = 15
CHAT = "/m/v1/chat/completions"
AUTH_JSON = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


async def _rss_at_most(limit: int) -> bool:
    return psutil.Process().memory_info().rss <= limit


def test_400_strangers_sending_endless_heads_cost_bounded_memory_and_healthz_stays_quick():
    async def scenario():
        async with running() as run:
            port = run.deployment.gateway.port
            sampler = health_sampler(port)
            sampler.start()
            baseline = psutil.Process().memory_info().rss
            async with PeakRss() as rss:
                endless = await asyncio.to_thread(head_flood, port, 400, 240_000)
                held = await asyncio.to_thread(head_flood, port, 400, 31_000, 20.0)  # just short, and waiting
            await _until(lambda: _rss_at_most(baseline + 16 * MB), "the memory to come back", 10)
            timings = await asyncio.to_thread(sampler.stop)  # (it joins a thread: not on the loop it watches)
            answered = dict(run.deployment.gateway.stats.answered)
        # every endless head refused 431 and cut off (a client still sending when it is closed may see the reset
        # before the answer: TCP discards what it had not read)
        assert answered.get(431) == 400 and set(endless["answers"]) <= {"431", "closed while sending"}, endless
        assert held["answers"] == {"408": 400}, held  # the head deadline, not the 30 s a token holder has
        assert rss.growth <= RSS_BOUND, rss.growth / MB
        assert not timings.failures and timings.worst <= 0.25, timings.summary()
    run_async(scenario())


async def _answered(observer: Observer) -> bool:
    return bool(observer.timings.seconds)


async def _holding(run: Running, count: int) -> bool:
    return len(run.deployment.gateway.connections) >= count


def _idle_flood_beside_a_token_holder(*overrides: str, connections: int, **options) -> tuple[dict, dict, int]:
    async def scenario():
        async with running(*overrides, **options) as run:
            port = run.deployment.gateway.port
            # The token holder's kept-alive connection is open before the flood: one opened while the flood fills
            # the kernel's accept queue can wait for its SYN to be sent again (1 s; docs/performance.md's edge
            # figures give new connections' times). Here what the gateway does with it is judged: never closed,
            # always answered.
            holder = Observer(port, CHAT, every_s=0.1, headers=AUTH_JSON, body=chat_body("hi"), source="127.0.0.3")
            holder.start()
            await _until(lambda: _answered(holder), "the token holder's first answer", 20)
            flood = start_idle_flood(port, "127.0.0.2", connections, FLOOD_SECONDS)
            await _until(lambda: _holding(run, 1000), "the flood to hold connections", 20)
            report = await asyncio.to_thread(finished, flood, FLOOD_SECONDS + 60)
            timings = await asyncio.to_thread(holder.stop)
            made_room = run.deployment.gateway.connections.closed_to_make_room
        return report, timings, made_room
    report, timings, made_room = run_async(scenario())
    assert not timings.failures and timings.worst <= 1.0, timings.summary()
    assert len(timings.seconds) >= FLOOD_SECONDS * 3  # (answers all along, not one slow one)
    return report, timings.summary(), made_room


def test_8000_idle_strangers_from_one_address_leave_a_token_holder_every_answer():
    report, _, made_room = _idle_flood_beside_a_token_holder(connections=8000)
    # the table had room: nothing was closed to make it, the strangers left at their first-byte deadline (5 s)
    assert made_room == 0 and report["closed by the gateway"] >= 8000, report


# A table's worth of connections closed to make room (a table of 2,000): how many of the flood's 8,000 the gateway
# accepts within its 15 s, beyond the table, depends on the machine's speed (4,748 to all 6,000 on this 2-core one).
MADE_ROOM_AT_LEAST = 2000


def test_a_full_table_makes_room_from_the_address_over_its_share():
    # a table of 2,000: the flood's address holds far more than its share (1,024) of it, so each new connection of
    # the flood closes the flood's own oldest; the token holder's is never the one
    report, _, made_room = _idle_flood_beside_a_token_holder(connections=8000, max_connections=2000)
    assert made_room >= MADE_ROOM_AT_LEAST and report["closed by the gateway"] >= MADE_ROOM_AT_LEAST, report


def test_a_full_table_with_no_share_per_address_makes_room_from_strangers():
    # no share per address (as behind a proxy): the table's own order, strangers first
    report, _, made_room = _idle_flood_beside_a_token_holder("general.max_connections_per_address=0",
                                                               connections=8000, max_connections=2000)
    assert made_room >= MADE_ROOM_AT_LEAST and report["closed by the gateway"] >= MADE_ROOM_AT_LEAST, report


def test_a_30_mb_prompt_is_refused_at_once_and_one_that_cannot_fit_the_context_never_reaches_the_engine(tmp_path):
    log = tmp_path / "requests.jsonl"

    async def scenario():
        async with running(f"env.FAKE_SGLANG_REQUEST_LOG={log}") as run:
            port = run.deployment.gateway.port
            huge, small = await asyncio.gather(
                asyncio.to_thread(post_raw, port, CHAT, TOKEN, chat_body("x" * 30_000_000)),
                asyncio.to_thread(post_raw, port, CHAT, TOKEN, chat_body("hi")))
            # within the body limit, far beyond the stand-in's context (2,048 tokens)
            long = await asyncio.to_thread(post_raw, port, CHAT, TOKEN, chat_body("x" * 1_000_000))
            return huge, small, long
    (huge, huge_s, huge_answer), (small, small_s, _), (long, long_s, long_answer) = run_async(scenario())
    assert huge == 413 and huge_s <= 1.0 and b"general.max_request_body_mib" in huge_answer
    assert small == 200 and small_s <= 2.0
    assert long == 413 and long_s <= 1.0
    error = json.loads(long_answer.split(b"\r\n\r\n", 1)[1])["error"]
    assert error["code"] == "context_length_exceeded" and "2048 tokens" in error["message"]
    reached = [r for r in requests_logged(log) if r.get("event") == "request" and r["path"] == "/v1/chat/completions"]
    assert len(reached) == 1  # the small one: neither big prompt was sent on


def test_token_holders_sending_31_mib_bodies_are_refused_before_the_bodies_are_read():
    async def scenario():
        async with running() as run:
            port = run.deployment.gateway.port
            body = chat_body("x" * (31 * MB))
            async with PeakRss() as rss:
                answers = await asyncio.gather(*(asyncio.to_thread(post_raw, port, CHAT, TOKEN, body)
                                                 for _ in range(20)))
            return answers, rss.growth
    answers, growth = run_async(scenario())
    assert {status for status, _, _ in answers} == {413} and max(took for _, took, _ in answers) <= 1.0
    assert growth <= RSS_BOUND, growth / MB
