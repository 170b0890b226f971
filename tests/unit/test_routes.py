"""Default deny: which of SGLang's routes the endpoint relays, judged on method and path alone.

The table of every route SGLang 0.5.23 registers (app/data/sglang_routes.json) comes from its own FastAPI app
(scripts/dump_sglang_routes.py; the engine tier checks it is current). Every one of them, with every method, with
and without an endpoint prefix, is classified here; the integration tier sends the same requests through a running
gateway and checks which reached the engine.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.gateway import routes
from app.gateway.routes import classify

TABLE = json.loads((Path(routes.__file__).resolve().parent.parent / "data" / "sglang_routes.json").read_text())
SGLANG_ROUTES = {r["path"]: frozenset(r["methods"]) for r in TABLE["routes"]}
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")
ENDPOINTS = frozenset({"tiny", "qwen"})

# The operator's routes a user must never reach, named in the reports that led here.
OPERATOR = ("/server_info", "/get_server_info", "/start_expert_distribution_record", "/flush_cache", "/abort_request",
            "/load_lora_adapter", "/unload_lora_adapter", "/slow_down", "/update_weight_version",
            "/get_weights_by_name", "/open_session", "/openapi.json", "/docs", "/metrics", "/v1/loads",
            "/release_memory_occupation", "/update_weights_from_disk", "/weights_checker", "/model_info",
            "/hicache/storage-backend", "/configure_logging", "/start_profile", "/pause_generation")


def concrete(path: str) -> str:
    return path.replace("{response_id}", "resp_0123abcd").replace("{model:path}", "tiny").replace("{model}", "tiny")


def test_the_route_table_is_sglangs_whole_api():
    assert TABLE["sglang"] == "0.5.23" and len(SGLANG_ROUTES) == 90
    assert {"/server_info", "/v1/loads", "/scale_elastic_ep", "/openapi.json", "/generate"} <= set(SGLANG_ROUTES)


def test_every_relayed_route_is_an_sglang_route_with_those_methods():
    for path, methods in routes.INFERENCE.items():
        assert path in SGLANG_ROUTES, path
        assert methods <= SGLANG_ROUTES[path], path


@pytest.mark.parametrize("prefix", ["/tiny", ""])
def test_every_sglang_route_with_every_method_is_relayed_only_when_allowed(prefix):
    relayed = set()
    for path in SGLANG_ROUTES:
        for method in METHODS:
            route = classify(method, prefix + concrete(path), ENDPOINTS)
            if route.kind == "relay":
                relayed.add((method, path))
                assert route.target == concrete(path) and route.endpoint == (prefix[1:] or None)
            elif path in routes.INFERENCE and (prefix or path in routes.BY_MODEL_FIELD):
                assert route.kind == "method_not_allowed" and route.allowed == routes.INFERENCE[path]
            elif path.startswith("/v1/models"):
                assert route.kind in ("models", "method_not_allowed")
            elif path == "/metrics" and not prefix:
                assert route.kind in ("metrics", "method_not_allowed")  # the gateway's own metrics
            elif path == "/" and not prefix:
                assert route.kind in ("page", "method_not_allowed")  # the gateway's own page, not SGLang's
            else:
                assert route.kind == "not_found", (method, prefix + path, route)
    expected = {(m, p) for p, ms in routes.INFERENCE.items() for m in ms
                if prefix or p in routes.BY_MODEL_FIELD}
    assert relayed == expected


@pytest.mark.parametrize("path", OPERATOR)
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_operator_routes_are_never_relayed(path, method):
    for prefix in ("/tiny", "/qwen", ""):
        assert classify(method, prefix + path, ENDPOINTS).kind != "relay", prefix + path


@pytest.mark.parametrize("path", [
    "/tiny/%73erver_info", "/tiny/v1/%63hat/completions", "/tiny//v1/chat/completions", "/tiny/v1/chat/completions/",
    "/tiny/./v1/chat/completions", "/tiny/v1/../server_info", "/tiny/../server_info", "/tiny", "/tiny/",
    "/nope/v1/chat/completions", "/TINY/v1/chat/completions", "/tiny/V1/chat/completions", "//v1/chat/completions",
    "/v1/chat/completions%2F", "/generate", "/api/tags", "/v1/responses/a/b", "/v1/responses/../../server_info",
    "/v1/responses/%2e%2e", "/tiny/v1/responses/x%2Fcancel", "/v1", "/v1/", "*", "/ui", "/ui/", "/ui/../",
    "/ui/app.js/", "/ui/%61pp.js", "/tiny/ui/app.js", "/ui/api/status/",
])
def test_other_spellings_of_a_route_are_not_that_route(path):
    assert classify("POST", path, ENDPOINTS).kind == "not_found"
    assert classify("GET", path, ENDPOINTS).kind == "not_found"


def test_the_gateways_own_routes():
    assert [classify("GET", p, ENDPOINTS).kind for p in ("/", "/ui/app.js", "/ui/app.css")] == ["page"] * 3
    assert classify("GET", "/ui/api/status", ENDPOINTS).kind == "page_status"
    assert classify("POST", "/", ENDPOINTS).kind == "method_not_allowed"
    assert classify("GET", "/healthz", ENDPOINTS).kind == "open"
    assert classify("HEAD", "/readyz", ENDPOINTS).kind == "open"
    assert classify("POST", "/healthz", ENDPOINTS).kind == "method_not_allowed"
    assert classify("GET", "/metrics", ENDPOINTS).kind == "metrics"
    assert classify("GET", "/tiny/metrics", ENDPOINTS).kind == "not_found"  # (the engine's own)
    one = classify("GET", "/v1/models/tiny%3Aa", ENDPOINTS)
    assert (one.kind, one.model_id, one.endpoint) == ("models", "tiny:a", None)
    scoped = classify("GET", "/qwen/v1/models", ENDPOINTS)
    assert (scoped.kind, scoped.endpoint, scoped.model_id) == ("models", "qwen", None)
    # an id no model can have is a model that does not exist, with the prefix too (it was the whole list)
    for path in ("/v1/models/a/b", "/qwen/v1/models/a/b", "/qwen/v1/models/%2e%2e", "/qwen/v1/models/"):
        route = classify("GET", path, ENDPOINTS)
        assert route.kind == "models" and route.model_id not in (None, "qwen"), path
    assert classify("POST", "/v1/models", ENDPOINTS).kind == "method_not_allowed"


def test_json_bodies_are_checked_except_where_the_route_takes_another_kind():
    chat = classify("POST", "/v1/chat/completions", ENDPOINTS)
    audio = classify("POST", "/tiny/v1/audio/transcriptions", ENDPOINTS)
    tags = classify("GET", "/tiny/api/tags", ENDPOINTS)
    assert chat.takes_json("POST") and not audio.takes_json("POST") and not tags.takes_json("GET")


def test_a_short_path_is_judged_once_and_what_is_remembered_is_bounded():
    """Traffic asks a few routes again and again: their judgement is remembered (the same Route, not one built per
    request); a long path, anyone's to choose before a token is checked, is judged afresh (remembered whole, 4,096
    paths of 32 KiB held 128 MiB), and at most MAX_REMEMBERED_ROUTES are kept."""
    endpoints = frozenset({"m"})
    assert classify("POST", "/v1/chat/completions", endpoints) is classify("POST", "/v1/chat/completions", endpoints)
    long_path = "/m/v1/models/" + "x" * routes.MAX_REMEMBERED_PATH
    first, again = classify("GET", long_path, endpoints), classify("GET", long_path, endpoints)
    assert first == again and first is not again and first.kind == "models"
    for n in range(routes.MAX_REMEMBERED_ROUTES + 10):
        classify("POST", f"/m/v1/no-such-route-{n}", endpoints)
    assert routes._judged.cache_info().currsize <= routes.MAX_REMEMBERED_ROUTES
    assert classify("POST", "/m/v1/chat/completions", endpoints).endpoint == "m"
