"""A key's limits at the gateway, pure: sliding windows, admission with OpenAI's 429 and headers, the fields written
into a key's requests, and the usage chunk taken out of a stream its client did not ask it for."""

from __future__ import annotations

import json

import pytest

from app.gateway.bodies import GOVERNED, Shaped, UsageStripper, shape
from app.gateway.errors import Reply
from app.gateway.keys import KeyRing, KeyState, Window, duration
from app.keys import NO_LIMITS, KeyLimits, named_tokens, split_entry


def headers(reply: Reply) -> dict[bytes, bytes]:
    return dict(reply.headers)


def fields(raw: bytes) -> dict[str, str]:
    lines = [line.split(b": ", 1) for line in raw.split(b"\r\n") if line]
    return {name.decode(): value.decode() for name, value in lines}


def test_entries_are_named_or_numbered_by_position():
    assert named_tokens(["alice=" + "a" * 20, "b" * 20, "c" * 20 + "=="]) == [
        ("alice", "a" * 20), ("token-2", "b" * 20), ("token-3", "c" * 20 + "==")]  # (base64 padding is a token's)
    assert split_entry("bob=tok=en" + "x" * 20) == ("bob", "tok=en" + "x" * 20)  # a token with '=' needs a name
    assert split_entry("-x=" + "y" * 20) == (None, "-x=" + "y" * 20)  # not a name: the whole entry is the token


def test_a_window_counts_the_last_minute_and_says_when_room_comes():
    window = Window(span_s=60, grain_s=0.1)
    window.add(0.0, 3)
    window.add(10.0, 4)
    window.add(10.05, 1)  # (coalesced with the one before, timed at the later)
    assert window.expire(30.0) == 8
    assert window.wait(30.0, 8) == pytest.approx(30.0)  # below 8 once the first 3 leave, at 60
    assert window.wait(30.0, 6) == pytest.approx(30.0)  # 5 left then: below 6 too
    assert window.wait(30.0, 4) == pytest.approx(40.05)  # below 4 only when the second entry leaves too
    assert window.wait(30.0, 9) == 0.0
    assert window.reset(30.0) == pytest.approx(40.05)
    assert window.expire(60.0) == 5 and window.expire(70.1) == 0 and window.reset(70.1) == 0.0


def test_steady_traffic_leaves_the_window_on_time():
    """Requests 50 ms apart for two minutes: the window holds the last minute's, never the whole history (each event
    leaves at most a grain late). An entry that took in every event within a grain of its newest grew forever."""
    window = Window(span_s=60, grain_s=0.1)
    for i in range(2400):
        window.add(i * 0.05, 1)
    assert 1200 <= window.expire(2399 * 0.05) <= 1202


def test_a_key_under_its_rpm_at_a_steady_rate_is_never_refused():
    key = KeyState("steady", KeyLimits(rpm=1500))  # 1,200 a minute: under the limit
    for i in range(20 * 150):
        now = i * 0.05
        assert key.admit(now) is None, f"refused at {now:.2f} s"
        key.release(now, 0)


def test_rpm_admits_that_many_in_any_minute_then_429_with_openais_headers():
    key = KeyState("alice", KeyLimits(rpm=5))
    for i in range(5):
        assert key.admit(float(i)) is None
        assert fields(key.headers)["x-ratelimit-remaining-requests"] == str(4 - i)
        key.release(float(i) + 0.5, 0)
    refused = key.admit(10.0)
    assert refused is not None and refused.status == 429
    error = json.loads(refused.body)["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "rate_limit_error"
    assert "'alice'" in error["message"] and "rpm" in error["message"]
    assert headers(refused)[b"retry-after"] == b"50"  # the first request leaves the window at 60
    assert headers(refused)[b"retry-after-ms"] == b"50000"
    assert fields(key.headers) == {"x-ratelimit-limit-requests": "5", "x-ratelimit-remaining-requests": "0",
                                   "x-ratelimit-reset-requests": "54s"}  # (the last, admitted at 4)
    assert key.admit(59.9) is not None
    assert key.admit(60.0) is None  # one has left the window
    assert key.admit(60.5) is not None


def test_concurrent_counts_requests_in_flight():
    key = KeyState("batch", KeyLimits(concurrent=2))
    assert key.admit(0.0) is None and key.admit(0.0) is None
    third = key.admit(0.0)
    assert third is not None and third.status == 429 and "concurrent" in json.loads(third.body)["error"]["message"]
    assert headers(third)[b"retry-after"] == b"1"
    key.release(1.0, 0)
    assert key.admit(1.0) is None
    assert key.headers == b""  # (no per-minute limit: no x-ratelimit fields)


def test_tpm_refuses_once_the_counted_tokens_reach_it_until_they_leave_the_window():
    key = KeyState("alice", KeyLimits(tpm=100))
    assert key.admit(0.0) is None
    key.release(1.0, 60)
    assert key.admit(2.0) is None
    assert fields(key.headers)["x-ratelimit-remaining-tokens"] == "40"
    key.release(3.0, 50)  # 110 counted: past the limit (a request's tokens are known only once it ends)
    refused = key.admit(4.0)
    assert refused is not None and "tpm" in json.loads(refused.body)["error"]["message"]
    assert headers(refused)[b"retry-after"] == b"57"  # below 100 once the first 60 leave, at 61
    assert fields(key.headers)["x-ratelimit-remaining-tokens"] == "0"
    assert key.admit(61.0) is None


@pytest.mark.parametrize(("seconds", "text"), [(0.02, "20ms"), (1, "1s"), (1.5, "1.5s"), (360, "6m0s"),
                                               (54.0001, "54.001s"), (61.25, "1m1.25s")])
def test_reset_times_are_written_as_openai_writes_them(seconds, text):
    assert duration(seconds) == text


def test_models_grant_endpoints_with_their_adapters_or_single_adapters():
    key = KeyState("k", KeyLimits(models=("a", "b:sql")))
    assert key.sees("a") and key.sees("b") and not key.sees("c")
    assert key.may_use("a", []) and key.may_use("a", ["x"]) and key.may_use("b", ["sql"])
    assert not key.may_use("b", []) and not key.may_use("b", ["sql", "other"]) and not key.may_use("c", [])
    unscoped = KeyState("u", NO_LIMITS)
    assert unscoped.sees("c") and unscoped.may_use("c", ["x"])


def test_a_key_ring_needs_a_key_and_knows_whether_any_has_a_priority():
    with pytest.raises(ValueError):
        KeyRing([])
    assert not KeyRing([("a", "a" * 20, NO_LIMITS)]).prioritized
    assert KeyRing([("a", "a" * 20, NO_LIMITS), ("b", "b" * 20, KeyLimits(priority=0))]).prioritized


CHAT = "/v1/chat/completions"


def shaped(body: dict, path: str = CHAT, **kw) -> tuple[dict, bool]:
    kw.setdefault("priority", None)
    kw.setdefault("max_tokens", None)
    result = shape(path, json.dumps(body).encode(), key="alice", **kw)
    assert isinstance(result, Shaped)
    return json.loads(result.body), result.strip_usage


def test_a_keys_priority_replaces_the_clients_own():
    assert shaped({"model": "m"}, priority=5)[0] == {"priority": 5, "model": "m"}
    assert shaped({"model": "m", "priority": 1000}, priority=0)[0]["priority"] == 0
    assert shaped({"model": "m", "priority": None}, priority=-3)[0]["priority"] == -3
    # a body naming it twice (the engine would take the last) is parsed and written again
    twice = b'{"priority": 9, "messages": [{"role": "priority"}], "priority": 99}'
    assert json.loads(shape(CHAT, twice, priority=1, max_tokens=None, key="k").body)["priority"] == 1
    assert shape("/v1/tokenize", b'{"priority": 9}', priority=1, max_tokens=None, key="k").body == b'{"priority": 9}'
    assert shaped({}, priority=2)[0] == {"priority": 2}  # (an empty object: no stray comma)


def test_max_tokens_caps_what_a_request_asks_and_fills_in_what_it_does_not():
    assert shaped({"model": "m"}, max_tokens=64)[0]["max_tokens"] == 64
    assert shaped({"max_tokens": 10}, max_tokens=64)[0]["max_tokens"] == 10
    for field in ("max_tokens", "max_completion_tokens"):
        refused = shape(CHAT, json.dumps({field: 65}).encode(), priority=None, max_tokens=64, key="alice")
        assert isinstance(refused, Reply) and refused.status == 400
        error = json.loads(refused.body)["error"]
        assert error["param"] == field and "at most 64" in error["message"] and "'alice'" in error["message"]
    completions = shape("/v1/completions", b'{"max_completion_tokens": 999}', priority=None, max_tokens=64,
                        key="k")
    assert json.loads(completions.body)["max_tokens"] == 64  # (completions read max_tokens only)
    zero = shape(CHAT, b'{"max_completion_tokens": 0}', priority=None, max_tokens=64, key="k")
    assert isinstance(zero, Reply) and zero.status == 400  # (SGLang reads 0 or max_tokens: no cap at all)


def test_a_stream_asks_for_its_usage_and_strips_it_only_when_its_client_did_not():
    body, strip = shaped({"model": "m", "stream": True})
    assert body["stream_options"] == {"include_usage": True} and strip
    body, strip = shaped({"stream": True, "stream_options": {"include_usage": True}})
    assert body["stream_options"] == {"include_usage": True} and not strip
    body, strip = shaped({"stream": True, "stream_options": {"continuous_usage_stats": True}})
    assert body["stream_options"] == {"continuous_usage_stats": True, "include_usage": True} and strip
    assert shaped({"stream": False}) == ({"stream": False}, False)
    assert shaped({"stream": True}, path="/v1/embeddings") == ({"stream": True}, False)
    assert "/v1/completions" in GOVERNED


def test_what_the_gateway_sets_is_appended_last_so_it_is_what_sglang_reads():
    body = b'{"model": "m", "priority": 9}  \n'
    result = shape(CHAT, body, priority=1, max_tokens=None, key="k")
    assert result.body == b'{"model": "m", "priority": 9,"priority":1}  \n'  # (the client's text is kept)
    assert json.loads(result.body)["priority"] == 1
    assert shape(CHAT, b"not json", priority=1, max_tokens=64, key="k").body == b"not json"



def test_a_body_the_gateway_must_read_and_cannot_is_refused_not_passed_on():
    # nested past the stdlib parser's depth, not orjson's (SGLang's): passed on, its max_tokens would go uncapped
    deep = b'{"max_tokens": 1000, "x": ' + b"[" * 1010 + b"]" * 1010 + b"}"
    for body in (deep, b'{"stream": tru'):
        refused = shape(CHAT, body, priority=1, max_tokens=64, key="k")
        assert isinstance(refused, Reply) and refused.status == 400
        assert json.loads(refused.body)["error"]["code"] == "invalid_json"


def test_the_usage_chunk_is_taken_out_of_a_stream_whole_events_at_a_time():
    chunk = b'data: {"id":"1","choices":[{"delta":{"content":"hi"}}],"usage":null}\n\n'
    usage = b'data: {"id":"1","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\n'
    done = b"data: [DONE]\n\n"
    stream = chunk + usage + done
    for cut in range(1, len(stream)):  # however the engine's writes are split
        stripper = UsageStripper()
        out = stripper.feed(stream[:cut]) + stripper.feed(stream[cut:]) + stripper.flush()
        assert out == chunk + done


@pytest.mark.parametrize("asked", ['1e3', '"1000"', '1000.0', '1000.5', 'true', '[1000]'])
def test_a_cap_is_not_passed_by_another_spelling_of_a_number(asked):
    # SGLang's pydantic reads 1e3, "1000" and 1000.0 as 1000: every value but a whole number within the cap is refused
    body = b'{"model": "m", "max_tokens": ' + asked.encode() + b"}"
    refused = shape(CHAT, body, priority=None, max_tokens=64, key="alice")
    assert isinstance(refused, Reply) and refused.status == 400
    assert json.loads(refused.body)["error"]["param"] == "max_tokens"


def test_a_field_nested_deeper_is_not_the_requests_own():
    # a "max_tokens" inside another object is not the request's: the request asked none, so it gets the cap
    body = {"model": "m", "response_format": {"type": "json_schema", "max_tokens": 1}, "priority": 5,
            "messages": [{"role": "user", "content": "hi", "priority": 9}]}
    shaped_body, _ = shaped(body, max_tokens=64, priority=2)
    assert shaped_body["max_tokens"] == 64 and shaped_body["priority"] == 2
    assert shaped_body["response_format"]["max_tokens"] == 1 and shaped_body["messages"][0]["priority"] == 9


@pytest.mark.parametrize("stream", ['true', '"true"', '1', '"yes"'])
def test_a_stream_however_spelled_is_counted(stream):
    body = b'{"model": "m", "stream": ' + stream.encode() + b"}"
    result = shape(CHAT, body, priority=None, max_tokens=None, key="k")
    assert isinstance(result, Shaped) and result.strip_usage
    assert json.loads(result.body)["stream_options"] == {"include_usage": True}


def test_a_client_that_asked_for_usage_however_spelled_keeps_it():
    body = b'{"stream": true, "stream_options": {"include_usage": 1, "continuous_usage_stats": false}}'
    result = shape(CHAT, body, priority=None, max_tokens=None, key="k")
    assert isinstance(result, Shaped) and not result.strip_usage
