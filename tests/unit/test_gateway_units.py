"""The gateway's pure parts: token checks, request statistics, usage found in streams."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from app.gateway.adapters import AdapterRefused, Refusal
from app.gateway.auth import generate_token
from app.gateway.bodies import UsageScanner as _UsageScanner
from app.gateway.bodies import model_field, text_bytes
from app.gateway.errors import clean_message, engine_error_message, error_reply, error_type, sse_error_event
from app.gateway.keys import KeyRing
from app.gateway.messages import Request
from app.gateway.model_routes import MAX_PROMPT_BYTES_PER_TOKEN, ModelRoute, prompt_too_long
from app.gateway.routes import classify
from app.gateway.stats import RequestRecord, RequestStats, percentile
from app.keys import NO_LIMITS


def test_a_token_is_found_as_its_key():
    ring = KeyRing([("alice", "a" * 20, NO_LIMITS), ("token-2", "b" * 20, NO_LIMITS)])

    def name(header: str | None) -> str | None:
        key = ring.find(header.encode() if header is not None else None)
        return key.name if key is not None else None

    assert name("Bearer " + "a" * 20) == "alice" and name("Bearer " + "b" * 20) == "token-2"
    # the scheme is case-insensitive (RFC 9110 11.1), and spaces before the token do not matter
    assert name("bearer " + "a" * 20) == "alice" and name("BEARER   " + "b" * 20) == "token-2"
    for bad in (None, "", "Bearer", "Bearer " + "c" * 20, "Basic " + "a" * 20, "a" * 20, "Bearer " + "a" * 19,
                "Bearer" + "a" * 20, "Bearerx " + "a" * 20, "Bearer alice"):
        assert name(bad) is None


def test_a_verified_authorization_finds_its_key_again_and_what_is_kept_of_them_is_bounded():
    """A token holder's header is verified once (then its key is found without hashing the token); only values that
    named a key are kept, no longer than MAX_VERIFIED_BYTES and no more than MAX_VERIFIED of them: a stranger's
    guesses keep nothing, and a token holder spelling the header 5,000 ways keeps at most the bound."""
    from app.gateway import keys

    ring = KeyRing([("alice", "a" * 20, NO_LIMITS)])
    header = b"Bearer " + b"a" * 20
    assert ring.find(header) is ring.find(bytes(header)) is ring.keys["alice"]
    assert list(ring._verified) == [header]
    for n in range(5000):
        assert ring.find(b"Bearer %020d" % n) is None  # guesses
    assert len(ring._verified) == 1
    for n in range(5000):  # (long spellings: found, not kept)
        assert ring.find(b"Bearer " + b" " * keys.MAX_VERIFIED_BYTES + b"a" * 20 + b" " * n) is ring.keys["alice"]
    assert len(ring._verified) == 1
    for before in range(50):
        for after in range(50):
            assert ring.find(b"Bearer " + b" " * before + b"a" * 20 + b" " * after) is ring.keys["alice"]
    assert len(ring._verified) == keys.MAX_VERIFIED
    assert ring.find(b"Bearer " + b"a" * 19 + b"b") is None and ring.find(header) is ring.keys["alice"]


def test_text_bytes_counts_a_bodys_strings_without_inline_data():
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 5000}}
    body = json.dumps({"model": "m", "messages": [
        {"role": "user", "content": [{"type": "text", "text": 'say "hi" \\ ' + "x" * 100}, image]},
    ]}).encode()
    total, longest = text_bytes(body)
    strings = ["model", "m", "messages", "role", "user", "content", "type", "text", "text", "type", "image_url",
               "image_url", "url"]
    escaped = len('say "hi" \\ ' + "x" * 100) - 3  # (its escaped characters are not counted: two quotes, a backslash)
    assert longest == escaped and total == escaped + sum(map(len, strings))


def test_a_prompt_that_cannot_fit_the_context_is_refused_before_the_engine():
    model = ModelRoute("m", engine=None, context_tokens=100)  # type: ignore[arg-type]
    chat, embeddings = (classify("POST", path, frozenset({"m"})) for path in ("/v1/chat/completions", "/v1/embeddings"))

    def request(body: dict) -> Request:
        return Request("POST", "/v1/x", b"", [], json.dumps(body).encode())

    limit = 100 * MAX_PROMPT_BYTES_PER_TOKEN
    fits = request({"model": "m", "messages": [{"role": "user", "content": "w" * (limit - 100)}]})
    assert prompt_too_long(model, chat, fits) is None
    spread = request({"model": "m", "messages": [{"role": "user", "content": "w" * (limit // 2)}] * 3})
    refused = prompt_too_long(model, chat, spread)
    assert refused is not None and refused.status == 413
    error = json.loads(refused.body)["error"]
    assert error["code"] == "context_length_exceeded" and str(limit) in error["message"]
    # a batch: each input must fit on its own, all of them need not
    batch = request({"model": "m", "input": ["w" * (limit // 2)] * 3})
    assert prompt_too_long(model, embeddings, batch) is None
    assert prompt_too_long(model, embeddings, request({"model": "m", "input": ["w" * (limit + 1)]})) is not None
    # an image inline is not text; a model whose context is not known is bounded by the body limit only
    image = request({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 10 * limit}}]}]})
    assert prompt_too_long(model, chat, image) is None
    assert prompt_too_long(ModelRoute("m", engine=None), chat, spread) is None  # type: ignore[arg-type]


def test_generated_tokens_are_long_and_distinct():
    tokens = {generate_token() for _ in range(100)}
    assert len(tokens) == 100 and min(map(len, tokens)) >= 40


def test_percentile_nearest_rank():
    assert percentile([], 50) is None
    assert percentile([5.0, 1.0, 3.0], 50) == 3.0
    assert percentile(list(range(1, 101)), 95) == 95


def test_stats_windows_and_totals():
    stats = RequestStats()
    for i in range(10):
        stats.record(RequestRecord("a", 200, latency_s=(i + 1) / 100, ttft_s=0.01 if i % 2 else None,
                                   prompt_tokens=3, completion_tokens=5, stream=bool(i % 2)))
    stats.record(RequestRecord("b", 502, latency_s=0.5))
    window = stats.take_window()
    assert (window.requests, window.errors, window.prompt_tokens, window.completion_tokens) == (11, 1, 30, 50)
    assert window.latency_p50_ms == 60.0 and window.ttft_p50_ms == 10.0
    assert stats.take_window().requests == 0
    assert stats.total_requests == 11 and stats.requests["a"] == 10
    text = stats.prometheus(in_flight=2, states={"a": "resident"})
    assert 'clearml_sglang_requests_total{endpoint="b",status="502"} 1' in text
    assert "clearml_sglang_requests_in_flight 2" in text


def test_usage_is_found_in_a_stream_however_it_is_chunked():
    events = [b'data: {"choices":[{"delta":{"content":"hi"}}],"usage":null}\n\n',
              b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}\n\n',
              b"data: [DONE]\n\n"]
    no_usage_field = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'  # (an engine that writes none)
    for whole in (b"".join(events), no_usage_field + b"".join(events[1:])):
        for cut in range(1, len(whole)):  # (a read of the engine's socket ends anywhere)
            scanner = _UsageScanner()
            scanner.feed(whole[:cut])
            scanner.feed(whole[cut:])
            assert scanner.usage == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}, (cut, whole)


def test_engine_keys_never_read_as_an_option():
    from app.config.flags import FlagTable
    from app.serving.network import engine_key

    table = FlagTable.load()
    for _ in range(500):  # url-safe base64 began with "-" about once in 64 launches
        key = engine_key()
        assert not key.startswith("-") and len(key) >= 40
        assert table.check_argv(["--model-path", "m", "--api-key", key]) == []


def test_every_error_has_one_shape_and_a_string_code():
    for status in (400, 401, 403, 404, 405, 408, 413, 429, 500, 502, 503, 504):
        reply = error_reply(status, "why", "some_code", retry_after_s=5 if status == 503 else None)
        body = json.loads(reply.body)
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
        assert isinstance(body["error"]["code"], str) and body["error"]["type"] == error_type(status)
    assert error_type(401) == "authentication_error" and error_type(404) == "invalid_request_error"
    assert error_type(503) == "server_error"
    event = sse_error_event(502, "cut", "engine_crashed")
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert json.loads(event[6:])["error"]["code"] == "engine_crashed"


SGLANG_400 = (b'{"object":"error","message":"1 validation error:\\n  {\'type\': \'list_type\', \'loc\': (\'body\', '
              b'\'messages\'), \'msg\': \'Input should be a valid list\', \'input\': 3}\\n\\n  File \\"/work/.venv/lib/'
              b'python3.11/site-packages/sglang/srt/entrypoints/http_server.py\\", line 1870, in '
              b'openai_v1_chat_completions\\n    POST /v1/chat/completions [{\'type\': \'list_type\', \'loc\': '
              b'(\'body\', \'messages\'), \'msg\': \'Input should be a valid list\', \'input\': 3}]","type":'
              b'"Bad Request","param":null,"code":400}')


@pytest.mark.parametrize("body, message", [
    (SGLANG_400, "messages: Input should be a valid list"),
    (b'{"detail":"Not Found"}', "Not Found"),
    (b'{"detail":[{"loc":["body","text"],"msg":"field required"}]}', "text: field required"),
    (b'{"error":"Unauthorized"}', "Unauthorized"),
    (b'{"error":{"message":"bad adapter","type":"x","code":400}}', "bad adapter"),
    (b"Internal Server Error", "Internal Server Error"),
    (b"", "the engine answered 400"),
    (b'{"object":"error","message":"Cannot load /root/.cache/hub/models--x/snapshots/abc/config.json"}',
     "Cannot load <path>"),
    (b'{"message":"x\\nTraceback (most recent call last):\\n  File \\"/a/b.py\\", line 3, in f\\n    f()\\n'
     b'ValueError: boom"}', "x ValueError: boom"),
    (b'{"object":"error","message":"Got LoRA adapter that has never been loaded: x\\nAll loaded adapters: '
     b'dict_keys([\'a\', \'b\'])."}', "Got LoRA adapter that has never been loaded: x All loaded adapters: a, b."),
])
def test_an_engines_error_message_keeps_no_path_or_traceback(body, message):
    cleaned = clean_message(engine_error_message(400, body), ("sk-engine-key",))
    assert cleaned == message
    assert "/work" not in cleaned and "line 1870" not in cleaned and "Traceback" not in cleaned


def test_an_engines_error_message_loses_the_key():
    assert clean_message("key sk-engine-key refused", ("sk-engine-key",)) == "key *** refused"


def test_responses_are_counted_by_status():
    stats = RequestStats()
    for status in (401, 401, 404, 200):
        stats.count_response(status, Request("POST", "/v1/chat/completions", b"", []))
    text = stats.prometheus(in_flight=0, states={})
    assert 'clearml_sglang_responses_total{status="401"} 2' in text
    assert 'clearml_sglang_responses_total{status="404"} 1' in text


def test_the_http_layer_imports_one_way_and_the_relay_is_its_one_bridge():
    # messages <- reader <- server on the client's side, upstream on the engine's, and only the relay sees both;
    # imports under TYPE_CHECKING count too (each was a way back)
    gateway = Path(__file__).resolve().parents[2] / "app" / "gateway"

    def imported(name: str) -> set[str]:
        tree = ast.parse((gateway / f"{name}.py").read_text())
        return {n.module.rsplit(".", 1)[-1] for n in ast.walk(tree)
                if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("app.gateway.")}

    assert not imported("messages") & {"reader", "server", "upstream", "relay"}
    assert not imported("reader") & {"server", "upstream", "relay"}
    assert not imported("upstream") & {"reader", "server", "relay"}
    assert not imported("server") & {"upstream", "relay"}
    assert not imported("relay") & {"server", "reader"}  # (it answers through messages.Responder)


def test_every_reason_an_adapter_is_refused_is_answered_in_the_one_shape():
    for reason in Refusal:
        reply = AdapterRefused(reason, "why").reply()
        error = json.loads(reply.body)["error"]
        assert 400 <= reply.status < 600 and error["message"] == "why" and error["code"]
        assert error["param"] == ("lora_path" if "lora_path" in reason.value else "model")
        assert (dict(reply.headers).get(b"retry-after") is not None) == (reply.status == 503 and reason is not
                                                                          Refusal.ENGINE_RESTARTED)


@pytest.mark.parametrize("body, model", [
    (b'{"model": "m", "messages": []}', "m"),
    (b'{"messages": [], "model" :\t"m:adapter"}', "m:adapter"),
    (b'{"messages": [{"role": "user", "content": "which \\"model\\"?"}], "model": "m"}', "m"),  # (named twice)
    (b'{"messages": [{"role": "model", "content": "hi"}], "model": "m"}', "m"),  # (a value, not the field)
    (b'{"extra": {"model": "x"}, "model": "m"}', "m"),  # (nested: the request's own field is the one read)
    (b'{"model": "caf\\u00e9"}', "caf\u00e9"),  # (escaped: read by parsing)
    (b'{"model": 5}', None), (b'{"messages": []}', None), (b"", None), (b'{"model": ', None),
])
def test_the_model_a_body_names(body, model):
    assert model_field(body) == model
