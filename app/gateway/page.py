"""The endpoint's own page: `GET /` and its assets (script, style, icon), shipped in the package
(`app/gateway/ui/`), and its data.

The page is static and the same for everyone; it holds nothing about the deployment. Given a token (kept in the
tab's sessionStorage), it reads `GET /ui/api/status` (models, their states, live counters) with it, and calls the
inference routes like any client. Every answer of the page carries strict security headers: a CSP that allows only
this origin's own script and style (no inline script or style), no framing, no MIME sniffing, no referrer.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from importlib import resources
from typing import Any

from app.gateway.errors import Reply
from app.keys import KeyLimits, KeyUsage

SECURITY_HEADERS = (
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                                 b"img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
)
_ASSETS = {"/": ("index.html", b"text/html; charset=utf-8"),
           "/ui/app.js": ("app.js", b"text/javascript; charset=utf-8"),
           "/ui/app.css": ("app.css", b"text/css; charset=utf-8"),
           "/favicon.ico": ("favicon.svg", b"image/svg+xml")}


@functools.cache
def asset(path: str) -> Reply:
    """The page (`/`) or one of its assets, as shipped."""
    name, content_type = _ASSETS[path]
    body = resources.files("app.gateway").joinpath("ui", name).read_bytes()
    return Reply(200, body, headers=SECURITY_HEADERS, content_type=content_type)


def status(models: list[dict[str, Any]], counters: dict[str, dict[str, Any]], in_flight: int,
           task_url: str | None, caller: dict[str, Any] | None = None) -> Reply:
    """What the page shows once it has a token: every model and adapter (that the caller's key may use) with its
    state, each endpoint's counters, and the caller's own key: its name, limits and usage."""
    body = {"models": [{"id": m["id"], "state": m["state"], "parent": m.get("parent"),
                        "context": m.get("max_model_len")} for m in models],
            "endpoints": counters, "in_flight": in_flight, "task_url": task_url, "key": caller}
    return Reply(200, json.dumps(body).encode(), headers=SECURITY_HEADERS)


def caller(name: str, limits: KeyLimits, usage: KeyUsage | None, in_flight: int) -> dict[str, Any]:
    """The caller's key as the page shows it: never its token."""
    return {"name": name, "limits": limits.set_values(), "usage": dataclasses.asdict(usage or KeyUsage()),
            "in_flight": in_flight}
