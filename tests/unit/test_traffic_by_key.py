"""Each key's requests on the console's `Traffic:` line (those since the previous report), and its usage so far in
the report the reporters read."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

from app.gateway.messages import Request
from app.gateway.stats import RequestRecord, RequestStats
from app.keys import KeyUsage
from app.serving.idle import IdleDecision
from app.serving.readings import Readings
from app.statistics import WindowSummary, usage_since

QUIET = WindowSummary(0, 0, None, None, None, None, 0, 0)
CHAT = "/v1/chat/completions"


def test_the_traffic_line_names_each_key_with_requests_and_its_refusals_and_errors():
    window = WindowSummary(3, 0, 100.0, 100.0, 100.0, None, 0, 0, answers={200: 3, 429: 2})
    keys = {"token-2": KeyUsage(3, 0, 0, 10, 4), "alice": KeyUsage(12, 1, 2), "bob": KeyUsage(0, 0, 0, 5, 5),
            "carol": KeyUsage(2, 2)}
    assert window.console_line(None, keys) == (
        "Traffic: 3 request(s) served; errors: 2 × 429; latency p50 100 ms, p95 100 ms; "
        "by key: alice 12 (2 rate-limited, 1 error), carol 2 (2 errors), token-2 3")
    assert window.console_line(None, {"bob": KeyUsage()}) == (  # no key with requests: no part
        "Traffic: 3 request(s) served; errors: 2 × 429; latency p50 100 ms, p95 100 ms")
    assert QUIET.console_line(None, {"bob": KeyUsage()}) is None
    # a request whose answer began in this window and ends in the next is its key's now, served then
    assert QUIET.console_line(None, {"bob": KeyUsage(1)}) == "Traffic: 0 request(s) served; by key: bob 1"


def test_a_keys_usage_in_a_window_is_the_difference_of_two_snapshots():
    before = {"alice": KeyUsage(5, 1, 2, 100, 50)}
    after = {"alice": KeyUsage(8, 1, 3, 160, 90), "token-2": KeyUsage(1, 0, 0, 7, 2)}
    assert usage_since(before, after) == {"alice": KeyUsage(3, 0, 1, 60, 40), "token-2": KeyUsage(1, 0, 0, 7, 2)}
    assert usage_since(after, after) == {"alice": KeyUsage(), "token-2": KeyUsage()}


def serve(stats: RequestStats, key: str, status: int) -> None:
    """What the gateway counts of one request of a key's that reached an engine."""
    stats.key_answered(key, status)
    stats.count_response(status, Request("POST", CHAT, b"", []))
    stats.record(RequestRecord("m", status, 0.1, prompt_tokens=6, completion_tokens=4, key=key))


def refuse(stats: RequestStats, key: str) -> None:
    """What the gateway counts of one request its key's rate limits refused."""
    stats.key_answered(key, 429, rate_limited=True)
    stats.count_response(429, Request("POST", CHAT, b"", []))


def test_each_report_logs_the_keys_requests_since_the_previous_one_and_carries_their_usage_so_far(caplog):
    caplog.set_level(logging.INFO, logger="app.serving.readings")
    stats = RequestStats()
    stats.add_keys(["alice", "bob", "token-2"])
    readings = Readings(stats, client=None, clock=lambda: 100.0)
    built = SimpleNamespace(supervisor=SimpleNamespace(engines=[]), residency=None, routed={}, adapters={})
    decision = IdleDecision(False, 0.0, 0, "active", 0.0)

    def take():
        caplog.clear()
        report = asyncio.run(readings.take(built, decision, {"m": "resident"}))
        return report, [r.getMessage() for r in caplog.records if r.getMessage().startswith("Traffic: ")]

    serve(stats, "alice", 200)
    refuse(stats, "alice")
    refuse(stats, "alice")
    serve(stats, "token-2", 200)
    serve(stats, "token-2", 500)
    first, lines = take()
    assert lines == ["Traffic: 3 request(s) served; errors: 2 × 429, 1 × 500; latency p50 100 ms, p95 100 ms; "
                     "by key: alice 3 (2 rate-limited), token-2 2 (1 error)"]
    serve(stats, "token-2", 200)
    second, lines = take()
    assert lines == ["Traffic: 1 request(s) served; latency p50 100 ms, p95 100 ms; by key: token-2 1"]
    third, lines = take()
    assert lines == []  # no traffic, no line
    assert first.keys == {"alice": KeyUsage(3, 0, 2, 6, 4), "bob": KeyUsage(), "token-2": KeyUsage(2, 1, 0, 12, 8)}
    assert second.keys == third.keys == {**first.keys, "token-2": KeyUsage(3, 1, 0, 18, 12)}  # since the start
    serve(stats, "bob", 200)
    assert third.keys["bob"] == KeyUsage()  # a report is a copy: the gateway goes on counting
