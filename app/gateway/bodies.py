"""What the gateway reads of a request's body (its `model`, the adapters it names, its text's size: by pattern where a
pattern can tell, since parsing whole bodies costs more than proxying them), what it writes into it for its key (its
priority, its `max_tokens`, a stream's usage), and what it reads of an answer's usage (`UsageScanner`) and takes out of
it (`UsageStripper`).

`shape` returns the body to send (or the 400 that refuses it) and whether the stream's usage chunk must be taken out
of the answer (`UsageStripper`): a stream of the OpenAI routes is sent with `stream_options.include_usage`, so that
its tokens are counted from the engine's own `usage`, and the client that did not ask for that chunk does not get it.

What the gateway sets it appends as the object's last members: SGLang reads bodies with orjson (FastAPI's stdlib json
for some routes), and of members with one name both keep the last, so the gateway's value is the one SGLang reads,
whatever the client wrote before it, and the body itself is never written again. What the gateway must read (a
stream's `stream` and `stream_options`, a capped request's `max_tokens`) it reads from the body parsed, and only when
the body names it somewhere: a pattern cannot tell the request's own field from one of the same name nested deeper,
nor `1e3` or `"1000"` (which SGLang's pydantic reads as 1000) from what they mean. A body it must read and cannot is
refused (400): passed on, it could be one that SGLang's orjson reads (nested deeper than the stdlib parser goes); a
body it need not read is left as it is, for the engine to judge.
"""

from __future__ import annotations

import json
import re
from typing import Any, NamedTuple

from app.gateway.errors import Reply, error_reply, invalid_json

# The OpenAI routes whose tokens the gateway counts and caps: `max_tokens` and `stream_options` are theirs.
GOVERNED = frozenset({"/v1/chat/completions", "/v1/completions"})
# Routes whose SGLang request has a `priority` (SGLang 0.5.23: ChatCompletionRequest, CompletionRequest,
# EmbeddingRequest, ClassifyRequest, ResponsesRequest, GenerateReqInput, EmbeddingReqInput).
PRIORITIZED = GOVERNED | {"/v1/embeddings", "/v1/classify", "/v1/responses", "/generate", "/encode", "/classify"}
# The routes open to a key whose tokens are bounded (`tpm`, `max_tokens`): those whose tokens are counted and capped,
# and those that generate none. The others (Anthropic's and Ollama's APIs, /generate, /v1/responses, scoring, ...)
# generate tokens the gateway neither caps nor counts.
TOKEN_BOUNDED = GOVERNED | {"/v1/embeddings", "/v1/tokenize", "/v1/detokenize", "/tokenize", "/detokenize",
                            "/v1/messages/count_tokens", "/v1/responses/{response_id}", "/api/tags", "/api/show"}
# The fields a route's request asks its completion's length in.
LENGTH_FIELDS = {"/v1/chat/completions": (b"max_tokens", b"max_completion_tokens"), "/v1/completions": (b"max_tokens",)}

# Largest non-streamed response kept in memory to count its tokens; larger ones pass through uncounted.
MAX_COUNTED_RESPONSE_BYTES = 4 * 1024 * 1024

_USAGE_RE = re.compile(rb'"(prompt_tokens|completion_tokens|total_tokens)"\s*:\s*(\d+)')
_COUNT_NAMES = {name.encode(): name for name in ("prompt_tokens", "completion_tokens", "total_tokens")}
_NO_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')
_USAGE = re.compile(rb'"usage"\s*:\s*\{')


class Shaped(NamedTuple):
    body: bytes
    strip_usage: bool = False  # the client did not ask for the stream's usage chunk: take it out


def shape(path: str, body: bytes, *, priority: int | None, max_tokens: int | None, key: str) -> Shaped | Reply:
    """The body for `path` with `priority` set (None: left alone), a completion's length capped at `max_tokens`,
    and a stream's usage asked for; or the 400 for a request asking more than `max_tokens`, or asking it otherwise
    than as a whole number."""
    if priority is None and max_tokens is None and b'"stream' not in body:
        return Shaped(body)  # (nothing to write: most requests of a key without limits)
    tail: list[bytes] = []  # members appended: the last of a name is the one SGLang reads
    strip = False
    if path in GOVERNED:
        names = LENGTH_FIELDS[path]
        named = b'"stream' in body or (max_tokens is not None and any(b'"%s"' % n in body for n in names))
        data = _parse(body) if named else {}
        if data is None:  # (passed on, it would go uncapped or uncounted where SGLang's orjson reads it)
            return invalid_json(body) or error_reply(400, "The request body is not one JSON object the endpoint can "
                                                     "read (nested too deep)", "invalid_json")
        if max_tokens is not None:
            refusal = _cap(names, data, max_tokens, key, tail)
            if refusal is not None:
                return refusal
        options = data.get("stream_options")
        if _true(data.get("stream")) and not (isinstance(options, dict) and _true(options.get("include_usage"))):
            strip = True
            asked = {**options, "include_usage": True} if isinstance(options, dict) else {"include_usage": True}
            tail.append(b'"stream_options":' + json.dumps(asked, separators=(",", ":")).encode())
    if priority is not None and path in PRIORITIZED:
        tail.append(b'"priority":%d' % priority)
    return Shaped(_append(body, tail) if tail else body, strip)


def _cap(names: tuple[bytes, ...], data: dict[str, Any], limit: int, key: str, tail: list[bytes]) -> Reply | None:
    """The 400 for a request asking more than `limit` (or asking in anything but a whole number from 1: SGLang reads
    chat's `max_completion_tokens or max_tokens`, so a 0 would lift the cap); where it asks nothing, `limit` for it."""
    asked = False
    for raw in names:
        name = raw.decode()
        value = data.get(name)
        if value is None:
            continue
        if type(value) is not int or not 1 <= value <= limit:
            shown = json.dumps(value)[:40]
            return error_reply(400, f"{name} is {shown}; key {key!r} may ask for at most {limit} (a whole number, "
                               "from 1)", "max_tokens_exceeded", param=name)
        asked = True
    if not asked:
        tail.append(b'"max_tokens":%d' % limit)
    return None


# What pydantic's lax mode reads as false (SGLang's `stream` and `include_usage` are pydantic booleans).
_FALSE_TEXT = frozenset({"0", "off", "f", "false", "n", "no"})


def _true(value: Any) -> bool:
    """Whether SGLang may read `value` as true: any value but an absent one or one pydantic reads as false (a value
    it refuses does no harm either way)."""
    if value is None or value is False or (isinstance(value, (int, float)) and value == 0):
        return False
    return not (isinstance(value, str) and value.strip().lower() in _FALSE_TEXT)


def _append(body: bytes, members: list[bytes]) -> bytes:
    """The object with `members` as its last members (the gateway checked the body begins as an object)."""
    end = len(body.rstrip())
    if not end or body[end - 1] != ord("}"):
        return body
    before = end - 1
    while before and body[before - 1] in b" \t\r\n":
        before -= 1
    empty = before > 0 and body[before - 1] == ord("{")
    return body[:end - 1] + (b"" if empty else b",") + b",".join(members) + body[end - 1:]


def _parse(body: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


class UsageStripper:
    """Takes a stream's usage chunk (`"choices":[]` with a `usage`) out of what the client gets. Events are passed
    on whole: an event split over reads is held until its end."""

    __slots__ = ("_partial",)

    def __init__(self) -> None:
        self._partial = b""

    def feed(self, data: bytes) -> bytes:
        text = self._partial + data if self._partial else data
        end = text.rfind(b"\n\n")
        if end < 0:
            self._partial = text
            return b""
        whole, self._partial = text[:end + 2], text[end + 2:]
        if b"[]" not in whole:  # (most pieces of a stream: no empty choices)
            return whole
        kept = [event for event in whole.split(b"\n\n")[:-1]
                if not (_NO_CHOICES.search(event) and _USAGE.search(event))]
        return b"".join(event + b"\n\n" for event in kept)

    def flush(self) -> bytes:
        """What is held at the stream's end."""
        rest, self._partial = self._partial, b""
        return rest


def _usage_from_json(data: bytes) -> dict[str, int] | None:
    """The token counts of a usage block."""
    at = data.find(b'"usage"')
    if at < 0 or data.startswith(b"null", at + 8) or data.startswith(b" null", at + 8):
        return None
    found = {_COUNT_NAMES[name]: int(count) for name, count in _USAGE_RE.findall(data, at)}
    return found or None


class UsageScanner:
    """Finds a response's token usage: in a whole JSON body, or in a stream's SSE events (usually the last one)."""

    def __init__(self) -> None:
        self.usage: dict[str, int] | None = None
        self.whole = False  # the response is one JSON document: keep it to read its usage at the end
        self._body: list[bytes] = []
        self._partial = b""

    def feed(self, chunk: bytes) -> None:
        """A piece of the answer, cut anywhere (a read of the engine's socket ends where it ends, mid-event too)."""
        if self.whole:
            self._body.append(chunk)
            return
        text = self._partial + chunk if self._partial else chunk
        if not _USAGE.search(text):  # no usage block with counts (a stream's `"usage":null` until its last event):
            end = text.rfind(b"\n\n")
            self._partial = text[end + 2:] if end >= 0 else text  # (only the event the piece ends inside is kept)
            if len(self._partial) > MAX_COUNTED_RESPONSE_BYTES:
                self._partial = b""
            return
        events = text.split(b"\n\n")
        self._partial = events.pop()
        if len(self._partial) > MAX_COUNTED_RESPONSE_BYTES:
            self._partial = b""
        for event in events:
            if b'"usage"' not in event:
                continue
            for line in event.split(b"\n"):
                if line.startswith(b"data:") and b'"usage"' in line:
                    usage = _usage_from_json(line[5:].strip())
                    if usage:
                        self.usage = usage

    def result(self) -> dict[str, int] | None:
        if self.whole and self._body:
            return _usage_from_json(b"".join(self._body))
        return self.usage


# ----------------------------------------------------------------------------------------------------------
# what is read of bodies (by pattern: parsing whole bodies costs more than proxying them)


_MODEL_RE = re.compile(rb'"model"\s*:\s*"([^"\\]{1,256})"')


def _named_once(body: bytes) -> re.Match[bytes] | None:
    """The `"model": "<name>"` of a body that names `"model"` once, read where it is (the common case: no parse);
    None where the body must be parsed to know (named twice, escaped, not a string) or names none."""
    at = body.find(b'"model"')
    if at < 0 or body.find(b'"model"', at + 7) >= 0:
        return None
    return _MODEL_RE.match(body, at)


def model_field(body: bytes) -> str | None:
    """The `model` a JSON request body names."""
    match = _named_once(body)
    if match is not None:
        return match.group(1).decode("utf-8", "replace")
    if b'"model"' not in body:
        return None
    try:
        value = json.loads(body).get("model")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def with_model(body: bytes, model: str) -> bytes:
    """The body with its `model` set to `model` (an adapter asked for under another spelling of its name)."""
    match = _named_once(body)
    if match is not None:
        return body[:match.start(1)] + json.dumps(model)[1:-1].encode() + body[match.end(1):]
    data = json.loads(body)
    data["model"] = model
    return json.dumps(data).encode()


def lora_paths(body: bytes) -> list[str] | None:
    """The adapters a body's `lora_path` names (SGLang's own field: a name, or one per prompt of a batch), None when it
    names none; ValueError when it holds something else."""
    if b'"lora_path"' not in body:
        return None
    try:
        value = json.loads(body).get("lora_path")
    except (ValueError, AttributeError, RecursionError):  # (not a JSON object: the engine's to refuse)
        return None
    if value is None or isinstance(value, str):
        return [value] if value else None
    if isinstance(value, list) and all(name is None or isinstance(name, str) for name in value):
        return [name for name in value if name] or None
    raise ValueError("lora_path is neither an adapter's name nor a list of them")


def json_object(body: bytes) -> bool:
    """Whether a body is (at least at its start) one JSON object; arrays, strings and empty bodies are not. The
    engine parses it whole; this only keeps what no inference route takes from reaching it."""
    return body.lstrip(b" \t\r\n")[:1] == b"{"


def text_bytes(body: bytes) -> tuple[int, int]:
    """The bytes of a JSON body's strings, all of them together and the longest, without inline data (a `data:`
    URI: an image or a sound, which the engine does not tokenize as text). Read by splitting at quotes once escaped
    ones are gone, in a few passes of C: a body of megabytes takes milliseconds, not a parse."""
    plain = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    strings = plain.split(b'"')[1::2]
    if b'"data:' in plain:
        strings = [text for text in strings if not text.startswith(b"data:")]
    return sum(map(len, strings)), max(map(len, strings), default=0)
