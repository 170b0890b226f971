"""The one shape of every error the endpoint answers: OpenAI's `{"error": {"message", "type", "param", "code"}}`.

The gateway's own refusals, the HTTP layer's (malformed request, head too large, timeouts) and errors an engine
returned all leave in this shape, so a client (the OpenAI SDK, or a script reading `error.message`) needs to know
only one. `type` follows the status the way OpenAI's API and SDK read it (400-class: `invalid_request_error`, 401:
`authentication_error`, 403: `permission_error`, 429: `rate_limit_error`, 5xx: `server_error`); `code` is always a
string that names the reason (`invalid_api_key`, `model_not_found`, `engine_crashed`, ...). A stream that fails
after it began ends with the same object as one SSE event.

An engine's own error message is kept only after `clean_message` has taken out what a client must not see: file
paths, tracebacks, and any secret the gateway knows of (SGLang quotes request values and server paths in its
messages).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

JSON = b"application/json"

# Longest message kept from an engine's error (they can quote whole prompts).
MAX_MESSAGE_CHARS = 1000


def error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


@dataclass(frozen=True)
class Reply:
    """A whole response the gateway makes itself."""

    status: int
    body: bytes
    headers: tuple[tuple[bytes, bytes], ...] = ()
    content_type: bytes = JSON


def error_object(status: int, message: str, code: str, param: str | None = None) -> dict[str, object]:
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


def error_reply(status: int, message: str, code: str, *, param: str | None = None,
                retry_after_s: int | None = None, headers: tuple[tuple[bytes, bytes], ...] = ()) -> Reply:
    if retry_after_s is not None:
        headers = (*headers, (b"retry-after", str(retry_after_s).encode()))
    return Reply(status, json.dumps(error_object(status, message, code, param)).encode(), headers)


def sse_error_event(status: int, message: str, code: str) -> bytes:
    """The last event of a stream that could not be finished."""
    return b"data: " + json.dumps(error_object(status, message, code)).encode() + b"\n\n"


# A path on the server (`/usr/lib/python3/x.py`, `/root/.cache/...`), a Windows one, or a source location.
_PATH = re.compile(r"""(?:[A-Za-z]:\\|(?<![\w.])/)(?:[^\s'",:;()\[\]{}]+/)+[^\s'",:;()\[\]{}]*""")
_SOURCE_LINE = re.compile(r"""\bFile "[^"]*", line \d+(?:, in \S+)?|\bline \d+ in \S+""")
_TRACEBACK = re.compile(r"Traceback \(most recent call last\):.*", re.S)


def _exception_line(traceback: re.Match[str]) -> str:
    """A traceback's last line (the exception and its message), without the frames above it."""
    lines = [line for line in traceback.group(0).splitlines() if line.strip() and not line[:1].isspace()]
    return lines[-1] if len(lines) > 1 else ""


# A Python container's repr (`dict_keys(['a', 'b'])`, SGLang's list of loaded adapters): its items, as words.
_REPR = re.compile(r"\b(?:dict_keys|dict_values|set|frozenset|tuple|list)\(\[([^\]]*)\]\)")


def _items(container: re.Match[str]) -> str:
    return ", ".join(item.strip().strip("'\"") for item in container.group(1).split(",") if item.strip()) or "none"


def clean_message(text: str, secrets: tuple[str, ...] = ()) -> str:
    """An engine's error message with secrets, tracebacks, source locations, server paths and Python reprs taken
    out."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    text = _REPR.sub(_items, text)
    text = _TRACEBACK.sub(_exception_line, text)
    text = _SOURCE_LINE.sub("", text)
    text = _PATH.sub("<path>", text)
    text = " ".join(text.split())
    return text[:MAX_MESSAGE_CHARS] + ("…" if len(text) > MAX_MESSAGE_CHARS else "")


def engine_error_message(status: int, body: bytes) -> str:
    """The message in an engine's error body, whatever its shape: OpenAI's (`{"error": {"message"}}`), SGLang's own
    (`{"object": "error", "message"}`), FastAPI's (`{"detail": "..." | [{"msg", "loc"}]}`), `{"error": "..."}`, or
    plain text. Not yet cleaned."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        text = body.decode("utf-8", "replace").strip()
        return text or f"the engine answered {status}"
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
        if isinstance(error, str):
            return error
        if isinstance(data.get("message"), str):
            return _validation_summary(data["message"]) or data["message"]
        detail = data.get("detail")
        if isinstance(detail, str):
            return detail
        if isinstance(detail, list):
            return "; ".join(_validation_item(item) for item in detail[:5])
    return f"the engine answered {status}"


# SGLang words a request that fails validation as pydantic's error list, repr'd, then where in its server it was
# raised: "1 validation error:\n  {'type': ..., 'loc': ('body', 'messages'), 'msg': '...', 'input': ...}\n  File ..."
_PYDANTIC_ITEM = re.compile(r"'loc': \(([^)]*)\), 'msg': (?:'((?:[^'\\]|\\.)*)'|\"([^\"]*)\")")


def _validation_summary(message: str) -> str | None:
    """`body.messages: Input should be a valid list` for each of SGLang's validation errors (not the server's
    location, nor the client's input repeated)."""
    if "validation error" not in message[:40]:
        return None
    found: list[str] = []
    for match in _PYDANTIC_ITEM.finditer(message):
        loc, msg = match.group(1), match.group(2) if match.group(2) is not None else match.group(3)
        parts = [part.strip().strip("'\"") for part in loc.split(",")]
        where = ".".join(part for part in parts if part and part != "body")
        item = f"{where}: {msg}" if where else msg
        if item not in found:
            found.append(item)
    return "; ".join(found) or None


def _validation_item(item: object) -> str:
    if not isinstance(item, dict):
        return str(item)
    where = ".".join(str(part) for part in item.get("loc", ()) if part != "body")
    return f"{where}: {item.get('msg', 'invalid')}" if where else str(item.get("msg", "invalid"))


def invalid_json(body: bytes) -> Reply | None:
    """The 400 for a request body that is not JSON, saying where it goes wrong in words; None for one that is."""
    try:
        json.loads(body)
    except UnicodeDecodeError:
        return error_reply(400, "The request body is not valid JSON: it is not UTF-8 text", "invalid_json")
    except json.JSONDecodeError as exc:
        what = exc.msg[:1].lower() + exc.msg[1:]
        if exc.pos >= len(exc.doc.rstrip()):
            return error_reply(400, f"The request body is not valid JSON: it ends after {len(exc.doc)} characters "
                               f"where more is expected ({what}); was it cut short?", "invalid_json")
        where = f"line {exc.lineno}, column {exc.colno}" if exc.lineno > 1 else f"character {exc.pos + 1}"
        return error_reply(400, f"The request body is not valid JSON: {what} at {where}", "invalid_json")
    except RecursionError:
        return error_reply(400, "The request body is not JSON the endpoint can read: it is nested too deeply",
                           "invalid_json")
    return None
