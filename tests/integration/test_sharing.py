"""Several models on one GPU, end to end: the real deployment, gateway and supervisor, with stand-in SGLang servers
that speak SGLang's release / resume / update-weights routes and share an emulated device's memory ledger (a fake
server that is resumed beyond the device's capacity dies of CUDA OOM, one released while busy dies of SGLang's
assertion, one serving released or lost weights answers 500: a wrong decision shows up as a client error).

The device: 80 GiB, as the harness's detected GPU says. Each model: 2 GiB of weights, and SGLang's pool sized from
its `--mem-fraction-static` 0.44 (the app's default share when models sleep): 35.2 GiB. Two fit in the app's budget
(0.88 of the device), three do not.
"""

from __future__ import annotations

import asyncio
import json

from tests.fakes.ledger import read_ledger
from tests.harness import Running, _until, requests_logged, run_async, running

DEVICE_GIB = 80.0
MODELS = ("m", "m1", "m2")


def sharing(tmp_path, *extra: str) -> tuple[str, ...]:
    return ("general.auto_cpu_offload=true", f"env.FAKE_SGLANG_DEVICE_LEDGER={tmp_path / 'ledger.json'}",
            f"env.FAKE_SGLANG_DEVICE_GIB={DEVICE_GIB}", "env.FAKE_SGLANG_WEIGHTS_GIB=2",
            f"env.FAKE_SGLANG_REQUEST_LOG={tmp_path / 'requests.jsonl'}", *extra)


async def answer(run: Running, model: str, stream: bool = False) -> str:
    response = await run.chat(model, stream=stream, max_tokens=3)
    body = await response.text()
    assert response.status == 200, (model, response.status, body)
    return body


async def readyz(run: Running) -> dict:
    async with run.session.get(run.url("/readyz")) as response:
        assert response.status == 200
        return json.loads(await response.text())


def admin_calls(tmp_path, event: str, model: str | None = None) -> int:
    return sum(1 for r in requests_logged(tmp_path / "requests.jsonl")
               if r.get("event") == event and (model is None or r.get("model") == model))


def peak_gib(tmp_path) -> float:
    return read_ledger(tmp_path / "ledger.json")["peak_gib"]


def test_three_models_on_a_device_that_fits_two_answer_alternating_requests(tmp_path):
    async def scenario():
        async with running(*sharing(tmp_path), models=3) as run:
            ready = await readyz(run)
            assert sorted(ready["models"].values()) == ["resident", "resident", "sleeping"]
            assert all(abs(m["memory_gib"] - 35.2) < 0.01 for m in ready["residency"].values())  # measured
            for model in MODELS * 3:
                body = await answer(run, model)
                assert json.loads(body)["choices"][0]["message"]["content"]
            ready = await readyz(run)
            assert sum(m["wakeups"] for m in ready["residency"].values()) >= 3
            assert list(ready["models"].values()).count("resident") == 2
            assert peak_gib(tmp_path) <= DEVICE_GIB * 0.88 + 0.01
            await _until(lambda: _reported_wakes(run), "a report with wake-ups")
    run_async(scenario())


async def _reported_wakes(run: Running) -> bool:
    return bool(run.reporter.wakes) and sum(run.reporter.wakes[-1][0].values()) >= 3 \
        and run.reporter.wakes[-1][1] is not None


def test_a_burst_for_a_sleeping_model_causes_exactly_one_wake_up(tmp_path):
    async def scenario():
        async with running(*sharing(tmp_path, "env.FAKE_SGLANG_RESUME_SECONDS=0.5"), models=3) as run:
            sleeping = next(name for name, state in (await readyz(run))["models"].items() if state == "sleeping")
            bodies = await asyncio.gather(*(answer(run, sleeping) for _ in range(12)))
            assert len(bodies) == 12
            assert admin_calls(tmp_path, "resume") == 1
            assert (await readyz(run))["residency"][sleeping]["wakeups"] == 1
    run_async(scenario())


def test_a_model_with_an_open_stream_is_never_released(tmp_path):
    async def scenario():
        async with running(*sharing(tmp_path, "env.FAKE_SGLANG_TOKEN_DELAY_SECONDS=0.05",
                                    "general.wake_deadline_seconds=2"), models=3) as run:
            states = (await readyz(run))["models"]
            resident = [name for name, state in states.items() if state == "resident"]
            sleeping = next(name for name, state in states.items() if state == "sleeping")
            streams = [await run.chat(name, stream=True, max_tokens=80) for name in resident]  # 4 s each
            assert all(s.status == 200 for s in streams)
            held = await run.chat(sleeping, max_tokens=2)  # no room while both stream: 503 after the deadline
            assert held.status == 503 and held.headers["Retry-After"]
            assert "waking" in (await held.json())["error"]["message"]
            for stream in streams:
                text = await stream.text()
                assert text.rstrip().endswith("data: [DONE]")  # neither was released under its stream
            assert admin_calls(tmp_path, "release") == 1  # the one at startup
            await answer(run, sleeping)  # both streams are over: now it wakes in the least recently used's place
            assert peak_gib(tmp_path) <= DEVICE_GIB * 0.88 + 0.01
    run_async(scenario())


def test_disk_swapping_reloads_the_weights_on_waking(tmp_path):
    async def scenario():
        overrides = [o for o in sharing(tmp_path) if o != "general.auto_cpu_offload=true"]
        async with running("general.disk_swap=true", *overrides, models=3) as run:
            for model in MODELS * 2:
                await answer(run, model)  # the stand-in answers 500 if it serves weights that were dropped
            assert admin_calls(tmp_path, "update_weights") == admin_calls(tmp_path, "resume") >= 2
    run_async(scenario())


def test_an_idle_model_sleeps_without_pressure_and_wakes_on_its_next_request(tmp_path):
    async def scenario():
        async with running(*sharing(tmp_path, "general.sleep_after_idle_seconds=1"), models=1) as run:
            await answer(run, "m")
            await _until(lambda: _state_is(run, "m", "sleeping"), "the idle model to sleep", 15)
            # "sleeping" from the moment the release is decided (requests wait from then on): its memory follows
            await _until(lambda: _released(tmp_path), "its memory to be given back", 15)
            await answer(run, "m", stream=True)
            assert (await readyz(run))["residency"]["m"]["wakeups"] == 1
    run_async(scenario())


async def _released(tmp_path) -> bool:
    return read_ledger(tmp_path / "ledger.json")["used_gib"] < 0.01


async def _state_is(run: Running, model: str, state: str) -> bool:
    return (await readyz(run))["models"][model] == state


def test_models_sharing_a_gpu_behind_gateway_workers_wake_once_for_a_burst(tmp_path):
    """With two gateway workers the control plane owns the residency: a burst through both workers for a sleeping
    model wakes it once, and /readyz (answered there) says which model sleeps."""
    async def scenario():
        async with running(*sharing(tmp_path, "env.FAKE_SGLANG_RESUME_SECONDS=0.5"), "general.gateway_workers=2",
                           models=3) as run:
            assert run.deployment.built.workers is not None
            sleeping = next(name for name, state in (await readyz(run))["models"].items() if state == "sleeping")
            bodies = await asyncio.gather(*(_fresh_answer(run, sleeping) for _ in range(12)))
            assert len(bodies) == 12
            assert admin_calls(tmp_path, "resume") == 1
            assert (await readyz(run))["residency"][sleeping]["wakeups"] == 1
            assert peak_gib(tmp_path) <= DEVICE_GIB * 0.88 + 0.01
    run_async(scenario())


async def _fresh_answer(run: Running, model: str) -> str:
    """On a connection of its own: whichever worker takes it."""
    import aiohttp

    from tests.harness import AUTH
    async with aiohttp.ClientSession() as session:
        async with session.post(run.url("/v1/chat/completions"), headers=AUTH, json={
                "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}) as r:
            assert r.status == 200, await r.text()
            return await r.text()
