"""Keys as tenants, through a whole deployment (stand-in engines): named and plain tokens, each key's limits enforced
at the gateway with OpenAI's 429 and headers, the fields written into its requests, the models it may see, and its
usage counted as its client counts it."""

from __future__ import annotations

import asyncio
import json

from tests.harness import TOKEN, _until, gateway_idle, in_flight, requests_logged, run_async, running

ALICE = "alice-token-" + "a" * 20
BOB = "bob-token-" + "b" * 20
PLAIN = "plain-token-" + "p" * 20
KEYS = f"auth.tokens=alice={ALICE},bob={BOB},{PLAIN}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def limits(value: dict) -> str:
    return "auth.limits=" + json.dumps(value)


async def read_stream(response) -> list[dict]:
    events = []
    async for line in response.content:
        if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
            events.append(json.loads(line[6:]))
    return events


def test_named_and_plain_tokens_both_work_and_only_names_are_shown():
    async def scenario():
        async with running(KEYS, limits({"alice": {"rpm": 100}})) as run:
            for token in (ALICE, BOB, PLAIN):
                response = await run.chat(headers=bearer(token))
                assert response.status == 200, await response.text()
            assert (await run.chat(headers=bearer(TOKEN))).status == 401  # (the harness's token is not listed)
            alice = await run.chat(headers=bearer(ALICE))
            assert alice.headers["x-ratelimit-limit-requests"] == "100"
            assert alice.headers["x-ratelimit-remaining-requests"] == "98"
            assert "x-ratelimit-limit-requests" not in (await run.chat(headers=bearer(BOB))).headers
            async with run.session.get(run.url("/metrics"), headers=bearer(PLAIN)) as r:
                metrics = await r.text()
            assert 'clearml_sglang_key_requests_total{key="alice"} 2' in metrics
            assert 'clearml_sglang_key_requests_total{key="bob"} 2' in metrics
            assert 'clearml_sglang_key_requests_total{key="token-3"} 1' in metrics
            async with run.session.get(run.url("/ui/api/status"), headers=bearer(ALICE)) as r:
                status = await r.json()
            assert status["key"]["name"] == "alice" and status["key"]["limits"] == {"rpm": 100}
            assert status["key"]["usage"]["requests"] == 2
            for text in (metrics, json.dumps(status)):
                assert all(token not in text for token in (ALICE, BOB, PLAIN))
    run_async(scenario())


def test_rpm_answers_the_first_requests_then_429_with_retry_after_and_headers():
    async def scenario():
        async with running(KEYS, limits({"alice": {"rpm": 5}})) as run:
            for i in range(5):
                response = await run.chat(headers=bearer(ALICE))
                assert response.status == 200
                assert response.headers["x-ratelimit-remaining-requests"] == str(4 - i)
            sixth = await run.chat(headers=bearer(ALICE))
            assert sixth.status == 429
            error = (await sixth.json())["error"]
            assert error["code"] == "rate_limit_exceeded" and error["type"] == "rate_limit_error"
            assert "'alice'" in error["message"] and "rpm" in error["message"]
            assert 55 <= int(sixth.headers["Retry-After"]) <= 60
            assert sixth.headers["x-ratelimit-remaining-requests"] == "0"
            assert sixth.headers["x-ratelimit-reset-requests"].endswith("s")
            assert (await run.chat(headers=bearer(BOB))).status == 200  # another key is not held back
            usage = run.deployment.stats.key_usage()
            assert (usage["alice"].requests, usage["alice"].rate_limited, usage["alice"].errors) == (6, 1, 0)
    run_async(scenario())


def test_concurrent_refuses_a_third_stream_while_two_run(tmp_path):
    async def scenario():
        async with running(KEYS, limits({"alice": {"concurrent": 2}}),
                           "env.FAKE_SGLANG_TOKEN_DELAY_SECONDS=0.2") as run:
            streams = [asyncio.create_task(run.chat(stream=True, max_tokens=20, headers=bearer(ALICE)))
                       for _ in range(2)]
            responses = await asyncio.gather(*streams)
            assert all(r.status == 200 for r in responses)
            third = await run.chat(stream=True, headers=bearer(ALICE))
            assert third.status == 429 and third.headers["Retry-After"] == "1"
            assert "concurrent" in (await third.json())["error"]["message"]
            assert (await run.chat(stream=True, headers=bearer(BOB))).status == 200
            for response in responses:
                await read_stream(response)
            assert (await run.chat(headers=bearer(ALICE))).status == 200  # the two have ended: room again
    run_async(scenario())


def test_tpm_counts_the_engines_usage_and_refuses_once_it_is_reached():
    async def scenario():
        async with running(KEYS, limits({"alice": {"tpm": 60}})) as run:
            counted = 0
            while True:
                response = await run.chat(headers=bearer(ALICE), max_tokens=8)
                if response.status == 429:
                    break
                usage = (await response.json())["usage"]
                counted += usage["prompt_tokens"] + usage["completion_tokens"]
                assert response.headers["x-ratelimit-limit-tokens"] == "60"
            assert counted >= 60
            error = (await response.json())["error"]
            assert "tpm" in error["message"] and response.headers["x-ratelimit-remaining-tokens"] == "0"
            usage = run.deployment.stats.key_usage()["alice"]
            assert usage.prompt_tokens + usage.completion_tokens == counted
    run_async(scenario())


def test_streams_are_counted_from_a_usage_chunk_their_client_gets_only_when_it_asked(tmp_path):
    log = tmp_path / "requests.jsonl"

    async def scenario():
        async with running(KEYS, f"env.FAKE_SGLANG_REQUEST_LOG={log}") as run:
            plain = await read_stream(await run.chat(stream=True, max_tokens=5, headers=bearer(BOB)))
            assert plain and all(event.get("choices") for event in plain)  # no usage chunk it did not ask for
            asked = await read_stream(await run.chat(stream=True, max_tokens=3, headers=bearer(BOB),
                                                     stream_options={"include_usage": True}))
            assert asked[-1]["choices"] == [] and asked[-1]["usage"]["completion_tokens"] == 3
            usage = run.deployment.stats.key_usage()["bob"]
            assert usage.completion_tokens == 5 + 3
    run_async(scenario())
    sent = [r for r in requests_logged(log) if r["event"] == "request"]
    assert [r["stream_options"] for r in sent] == [{"include_usage": True}] * 2


def test_a_keys_models_are_all_that_exist_for_it():
    async def scenario():
        async with running(KEYS, limits({"alice": {"models": ["m"]}}), models=2) as run:
            assert (await run.chat(model="m", headers=bearer(ALICE))).status == 200
            other = await run.chat(model="m1", headers=bearer(ALICE))
            assert other.status == 404 and (await other.json())["error"]["code"] == "model_not_found"
            assert "m1" not in (await other.json())["error"]["message"].split("available:")[1]
            async with run.session.post(run.url("/m1/v1/chat/completions"), headers=bearer(ALICE),
                                        json={"messages": [{"role": "user", "content": "hi"}]}) as r:
                assert r.status == 404 and (await r.json())["error"]["code"] == "model_not_found"
            async with run.session.get(run.url("/v1/models"), headers=bearer(ALICE)) as r:
                assert [card["id"] for card in (await r.json())["data"]] == ["m"]
            async with run.session.get(run.url("/v1/models"), headers=bearer(BOB)) as r:
                assert [card["id"] for card in (await r.json())["data"]] == ["m", "m1"]
            async with run.session.get(run.url("/metrics"), headers=bearer(ALICE)) as r:
                metrics = await r.text()
            assert 'endpoint="m1"' not in metrics and 'key="bob"' not in metrics and 'key="alice"' in metrics
    run_async(scenario())


def test_priority_and_max_tokens_are_the_keys_whatever_the_client_sends(tmp_path):
    log = tmp_path / "requests.jsonl"

    async def scenario():
        async with running(KEYS, limits({"alice": {"priority": 10, "max_tokens": 6}}),
                           f"env.FAKE_SGLANG_REQUEST_LOG={log}") as run:
            assert (await run.chat(headers=bearer(ALICE), max_tokens=6, priority=99)).status == 200
            too_many = await run.chat(headers=bearer(ALICE), max_tokens=7)
            assert too_many.status == 400 and (await too_many.json())["error"]["param"] == "max_tokens"
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
            async with run.session.post(run.url("/v1/chat/completions"), json=body, headers=bearer(ALICE)) as r:
                assert r.status == 200 and (await r.json())["usage"]["completion_tokens"] == 6
            assert (await run.chat(headers=bearer(BOB), priority=99)).status == 200
            async with run.session.post(run.url("/m/generate"), json={"text": "hi"}, headers=bearer(ALICE)) as r:
                assert r.status == 403 and (await r.json())["error"]["code"] == "route_not_allowed"
    run_async(scenario())
    sent = [(r["priority"], r.get("max_tokens")) for r in requests_logged(log) if r["event"] == "request"]
    assert sent == [(10, 6), (10, 6), (0, 4)]  # (bob has no priority of his own: 0, not the 99 he asked)


def test_a_flood_of_refused_requests_holds_no_place():
    async def scenario():
        async with running(KEYS, limits({"alice": {"concurrent": 1, "rpm": 1000}}),
                           "env.FAKE_SGLANG_TOKEN_DELAY_SECONDS=0.05") as run:
            first = asyncio.create_task(run.chat(stream=True, max_tokens=10, headers=bearer(ALICE)))
            await _until(lambda: in_flight(run, 1), "the first stream to be under way")
            refused = await asyncio.gather(*(run.chat(headers=bearer(ALICE)) for _ in range(20)))
            assert [r.status for r in refused] == [429] * 20
            await read_stream(await first)
            assert run.deployment.gateway.keys.keys["alice"].in_flight == 0
            assert (await run.chat(headers=bearer(ALICE))).status == 200
    run_async(scenario())



def test_a_stream_left_before_its_usage_still_counts_against_tpm():
    async def scenario():
        async with running(KEYS, limits({"alice": {"tpm": 100000}}), "env.FAKE_SGLANG_TOKEN_DELAY_SECONDS=0.05") as run:
            response = await run.chat(stream=True, max_tokens=200, headers=bearer(ALICE))
            seen = 0
            async for line in response.content:
                seen += line.startswith(b"data: {")
                if seen == 5:
                    break
            response.close()  # the client leaves long before the usage chunk
            await _until(lambda: gateway_idle(run), "the cut stream to end")
            charged = run.deployment.gateway.keys.keys["alice"].tokens.total
            assert charged >= 5  # its events, and its prompt's estimate
    run_async(scenario())
