"""Keys as tenants against the real SGLang on this CPU: two models, a plain token and named keys with limits, one of
them with a priority (so both SGLang servers run with priority scheduling). What each key's client sees, and what
the deployment counted, compared with the engines' own `usage`."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import time
from pathlib import Path

import pytest

pytest.importorskip("sglang")

import requests  # noqa: E402

from app.config import load_config  # noqa: E402
from app.demo.tiny_model import make_tiny_models  # noqa: E402
from tests.engine.test_real_engine import Served  # noqa: E402

pytestmark = pytest.mark.engine

ADMIN = "keys-engine-admin-" + "a" * 16
KEYS = {name: f"keys-engine-{name}-" + "k" * 16 for name in ("rpm5", "pair", "budget", "scoped", "vip")}
LIMITS = {"rpm5": {"rpm": 5}, "pair": {"concurrent": 2}, "budget": {"tpm": 300}, "scoped": {"models": ["a"]},
          "vip": {"priority": 100}}


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    models = make_tiny_models(Path(tmp_path_factory.mktemp("tiny")))
    tokens = ",".join([ADMIN, *(f"{name}={token}" for name, token in KEYS.items())])
    config = load_config(overrides=[
        f"models.0.model={models.base}", "models.0.endpoint_name=a", "models.0.max-total-tokens=16384",
        f"models.1.model={models.base}", "models.1.endpoint_name=b", "models.1.max-total-tokens=16384",
        "general.device=cpu", f"auth.tokens={tokens}", "auth.limits=" + json.dumps(LIMITS),
        "idle.report_interval_seconds=2",
    ])
    captured = Captured()
    logging.getLogger().addHandler(captured)
    try:
        with Served.serving(config) as server:
            server.log = captured
            yield server
    finally:
        logging.getLogger().removeHandler(captured)


def post(served: Served, token: str, path: str = "/v1/chat/completions", stream: bool = False, **body):
    body = {"model": "a", "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 8,
            "temperature": 0, "stream": stream, **body}
    return requests.post(served.base + path, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=120,
                         stream=stream)


def test_plain_and_named_tokens_work_and_engines_schedule_by_priority(served):
    assert post(served, ADMIN).status_code == 200
    assert post(served, KEYS["vip"], model="b").status_code == 200
    for engine in served.deployment.supervisor.engines:
        argv = engine.command.argv
        assert "--enable-priority-scheduling" in argv
        assert argv[argv.index("--default-priority-value") + 1] == "0"
        assert not any(token in " ".join(argv) for token in (ADMIN, *KEYS.values()))


def test_rpm_answers_five_refuses_the_sixth_and_answers_again_after_the_reset(served):
    token = KEYS["rpm5"]
    for i in range(5):
        response = post(served, token)
        assert response.status_code == 200, response.text
        assert response.headers["x-ratelimit-remaining-requests"] == str(4 - i)
    sixth = post(served, token)
    assert sixth.status_code == 429 and sixth.json()["error"]["code"] == "rate_limit_exceeded"
    assert sixth.headers["x-ratelimit-limit-requests"] == "5" and sixth.headers["x-ratelimit-remaining-requests"] == "0"
    wait_s = int(sixth.headers["Retry-After"])
    assert 0 < wait_s <= 60
    time.sleep(wait_s)  # a client honouring Retry-After (the window is the wall clock's)
    again = post(served, token)
    assert again.status_code == 200, again.text


def test_a_third_simultaneous_stream_is_refused_while_two_run(served):
    token = KEYS["pair"]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:  # three streams sent at once
        responses = list(pool.map(lambda _: post(served, token, stream=True, max_tokens=1900, ignore_eos=True),
                                  range(3)))
    try:
        refused = [r for r in responses if r.status_code == 429]
        assert len(refused) == 1 and sorted(r.status_code for r in responses) == [200, 200, 429]
        assert "concurrent" in refused[0].json()["error"]["message"] and refused[0].headers["Retry-After"] == "1"
        for response in responses:  # the two ran whole, each to its 1,900 tokens
            if response.status_code == 200:
                events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith(b"data: {")]
                assert events[-1]["choices"][0]["finish_reason"] == "length"
    finally:
        for response in responses:
            response.close()
    assert post(served, token).status_code == 200  # they have ended: room again


def test_tpm_refuses_once_the_engines_usage_reaches_it_and_counts_exactly_that(served):
    token = KEYS["budget"]
    counted, answered = 0, 0
    for _ in range(100):
        streamed = answered % 2 == 1
        response = post(served, token, stream=streamed, max_tokens=24,
                        **({"stream_options": {"include_usage": True}} if streamed else {}))
        if response.status_code == 429:
            break
        assert response.status_code == 200, response.text
        if streamed:
            events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith(b"data: {")]
            usage = events[-1]["usage"]
        else:
            usage = response.json()["usage"]
        counted += usage["prompt_tokens"] + usage["completion_tokens"]
        answered += 1
    assert response.status_code == 429 and "tpm" in response.json()["error"]["message"]
    assert response.headers["x-ratelimit-remaining-tokens"] == "0" and counted >= 300
    usage = served.deployment.stats.key_usage()["budget"]
    assert usage.prompt_tokens + usage.completion_tokens == counted
    assert (usage.requests, usage.rate_limited, usage.errors) == (answered + 1, 1, 0)


def test_a_stream_is_counted_without_showing_its_client_a_usage_chunk_it_did_not_ask_for(served):
    before = served.deployment.stats.key_usage()["token-1"].completion_tokens
    response = post(served, ADMIN, stream=True, max_tokens=9, ignore_eos=True)
    lines = [line for line in response.iter_lines() if line.startswith(b"data: ")]
    assert lines[-1] == b"data: [DONE]"
    assert all(json.loads(line[6:])["choices"] for line in lines[:-1])
    deadline = time.monotonic() + 10
    while served.deployment.gateway.in_flight and time.monotonic() < deadline:  # (recorded as it ends)
        time.sleep(0.02)
    assert served.deployment.stats.key_usage()["token-1"].completion_tokens - before == 9


def test_a_scoped_key_sees_only_its_model(served):
    token = KEYS["scoped"]
    assert post(served, token).status_code == 200
    other = post(served, token, model="b")
    assert other.status_code == 404 and other.json()["error"]["code"] == "model_not_found"
    assert post(served, token, path="/b/v1/chat/completions").status_code == 404
    ids = [m["id"] for m in requests.get(served.base + "/v1/models", headers={"Authorization": f"Bearer {token}"},
                                         timeout=10).json()["data"]]
    assert ids == ["a"]


def test_no_token_is_in_a_log_line_metric_or_the_page(served):
    metrics = requests.get(served.base + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10).text
    status = requests.get(served.base + "/ui/api/status", headers={"Authorization": f"Bearer {KEYS['vip']}"},
                          timeout=10).text
    page = requests.get(served.base + "/", timeout=10).text
    assert 'clearml_sglang_key_requests_total{key="rpm5"}' in metrics and '"name": "vip"' in status
    for text in (metrics, status, page, "\n".join(served.log.lines)):
        assert not any(token in text for token in (ADMIN, *KEYS.values()))
