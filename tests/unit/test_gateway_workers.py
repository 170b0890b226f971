"""Gateway workers, the pure parts: how many, what a worker is told and reports, which requests it sends on to the
control plane, and a worker's counts landing in the deployment's counters as the gateway's own would."""

from __future__ import annotations

import asyncio
import json

import pytest

from app.gateway import routes as paths
from app.gateway.forward import ControlPlane
from app.gateway.keys import KeyState
from app.gateway.messages import Request
from app.gateway.model_routes import ModelRoute
from app.gateway.stats import RequestRecord, RequestStats, answer_of
from app.gateway.worker import News, Report, Worker, WorkerSetup, limits_of
from app.keys import NO_LIMITS, KeyLimits
from app.serving.gateway_workers import worker_count
from app.serving.idle import IdleTracker
from app.states import EngineState


@pytest.mark.parametrize(("configured", "cores", "gpus", "expected"), [
    (3, 2, None, 3),  # as configured, whatever the machine
    (0, 64, None, 1),  # a CPU deployment: the engines take every core
    (0, 16, [1], 6),  # one model on one GPU: (16 - 3 - 1) // 2
    (0, 16, [1] * 8, 1),  # eight engines leave no core
    (0, 128, [1], 8),  # at most 8
    (0, 4, [1], 1),  # a small machine: the deployment's process alone
])
def test_worker_count_is_the_config_or_half_the_cores_the_engines_leave(configured, cores, gpus, expected):
    assert worker_count(configured, cores, gpus) == expected


class Engine:
    url, state = "http://127.0.0.1:9", EngineState.RESIDENT


def request(key: KeyState | None, path: str = "/v1/chat/completions") -> Request:
    r = Request("POST", path, b"", [], key=key)
    r.route = paths.classify("POST", path, frozenset({"m"}))
    return r


def test_a_worker_sends_on_what_needs_one_owner():
    control = ControlPlane(9, always=["shared"], quiet_token="q" * 20)
    plain, limited = KeyState("a", NO_LIMITS), KeyState("b", KeyLimits(rpm=5))
    model, shared = ModelRoute("m", Engine()), ModelRoute("shared", Engine())
    assert not control.takes(request(plain), model)
    assert not control.takes(request(KeyState("c", KeyLimits(max_tokens=9, priority=1))), model)  # (pure: its own)
    assert control.takes(request(limited), model)  # its windows have one owner
    assert control.takes(request(plain), shared)  # sharing GPUs, adapters on request
    restarting = ModelRoute("m", type("Down", (), {"url": "x", "state": EngineState.RESTARTING})())
    assert control.takes(request(plain), restarting)  # held by the control plane through the restart


def test_a_response_is_counted_alike_by_the_gateway_and_from_a_workers_report():
    key = KeyState("alice", NO_LIMITS)
    answers = [(200, request(key)), (429, request(key)), (401, request(None)), (503, request(None, "/readyz"))]
    answers[1][1].rate_limited = True
    own, reported = RequestStats(), RequestStats()
    for status, r in answers:
        own.count_response(status, r)
        reported.count_answer(*json.loads(json.dumps(answer_of(status, r))))  # (through the channel's JSON)
    assert own.answered == reported.answered and own.key_usage() == reported.key_usage()
    assert own.take_window() == reported.take_window()  # (the window leaves /readyz out, both ways)
    assert reported.key_usage()["alice"].rate_limited == 1 and reported.answered[401] == 1


def test_a_worker_applies_news_and_reports_what_happened_since_its_last_report():
    async def scenario():
        setup = WorkerSetup(keys=[("alice", "t" * 24, {"rpm": 5, "models": ["m"]})],
                            routes=[{"endpoint": "m", "url": "http://x:9", "api_key": "k", "adapters": ["sql"]}],
                            always=[], control_port=9, quiet_token="q" * 24)
        worker = Worker(WorkerSetup.from_json(json.loads(json.dumps(setup.to_json()))))
        assert worker.gateway.keys.keys["alice"].limits == KeyLimits(rpm=5, models=("m",))
        assert worker.gateway.admission.quiet_token == "q" * 24  # (the control plane's benchmark token)
        worker.apply(News(3, {"m": ("resident", 2048)}, draining=True))
        route = worker.gateway.routes["m"]
        assert route.engine.state == EngineState.RESIDENT and route.context_tokens == 2048
        assert worker.gateway.draining
        worker.stats.record(RequestRecord("m", 200, 0.5, prompt_tokens=3, completion_tokens=4, key="alice"))
        worker.activity.request_started(1.0)
        worker.activity.request_finished(2.0)
        report = Report(**json.loads(worker.report().line()))
        assert (report.seq, report.started, report.finished, report.at) == (3, 1, 1, 2.0)
        assert report.request_records() == [RequestRecord("m", 200, 0.5, prompt_tokens=3, completion_tokens=4,
                                                          key="alice")]
        assert worker.report().empty  # (each request reported once)
    asyncio.run(scenario())


def test_limits_come_back_as_the_config_writes_them():
    limits = KeyLimits(rpm=5, tpm=100, concurrent=2, max_tokens=64, priority=3, models=("m", "m:sql"))
    assert limits_of(json.loads(json.dumps(limits.set_values()))) == limits


def test_a_workers_reported_requests_move_the_idle_clock_as_its_own_would():
    mine, reported = IdleTracker(60, 30, now=0.0), IdleTracker(60, 30, now=0.0)
    for tracker in (mine, reported):
        assert tracker.decide(59.0).idle_for_s == 59.0
    for _ in range(3):
        mine.request_started(10.0)
    mine.request_finished(12.0)
    reported.reported(3, 1, 12.0)  # (one report: three began, one ended, the latest at 12)
    assert mine.decide(100.0) == reported.decide(100.0)  # two in flight: never idle
    mine.request_finished(20.0)
    mine.request_finished(20.0)
    reported.reported(0, 2, 20.0)
    assert mine.decide(50.0) == reported.decide(50.0) and mine.decide(81.0).stop and reported.decide(81.0).stop
    with pytest.raises(RuntimeError):
        reported.reported(0, 1, 90.0)  # (more ended than began)
