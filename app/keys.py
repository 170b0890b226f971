"""Access keys as tenants: each token has a name, and each name its limits and its usage.

A key is what `auth.tokens` lists (`NAME=TOKEN`, or a bare `TOKEN`, named `token-<position>`) and what
`CLEARML_SGLANG_API_TOKENS` adds; `auth.limits` gives a name (or `default`, every key without an entry) its limits.
The config parses them (`app.config.parse`), the gateway enforces them (`app.gateway.keys`), the reports show each
key's usage by its name (`app.serving.report`). A name is all that ever leaves the gateway: never a token.
Pure values, shared by those layers.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

# The limits entry for every key without one of its own.
DEFAULT = "default"
# A key's name: it appears in reports, metrics labels and log lines.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
# What a key without a name is called: its position among all the tokens, from 1.
UNNAMED = "token-{}"


@dataclass(frozen=True)
class KeyLimits:
    """What one key may do; None: no limit of that kind.

    `rpm`, `tpm`: requests, and prompt + completion tokens, in any 60 s; `concurrent`: requests in flight at once;
    `max_tokens`: the largest completion a request may ask for (and what one that asks for none gets); `priority`:
    its requests' priority in SGLang's scheduler (higher first); `models`: the endpoints (each with its adapters) and
    `endpoint:adapter` names it may use, every other one not existing for it."""

    rpm: int | None = None
    tpm: int | None = None
    concurrent: int | None = None
    max_tokens: int | None = None
    priority: int | None = None
    models: tuple[str, ...] | None = None

    @property
    def rated(self) -> bool:
        """Requests or tokens per minute are limited: its answers carry OpenAI's `x-ratelimit-*` headers."""
        return self.rpm is not None or self.tpm is not None

    @property
    def admits(self) -> bool:
        """Any limit is checked as a request arrives (per minute or in flight)."""
        return self.rated or self.concurrent is not None

    @property
    def bounds_tokens(self) -> bool:
        """Its tokens are bounded (per minute or per request): only routes whose tokens the gateway can count and
        cap are open to it."""
        return self.tpm is not None or self.max_tokens is not None

    def set_values(self) -> dict[str, Any]:
        """The limits that are set, as a config file writes them (a list where it holds a tuple)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in dataclasses.fields(self) if getattr(self, f.name) is not None}


NO_LIMITS = KeyLimits()


@dataclass(frozen=True)
class KeyUsage:
    """One key's requests since the deployment started: how many (every inference request answered), how many were
    answered with an error (its own rate limits apart), how many its rate limits refused, and the tokens the engines'
    `usage` reported for them."""

    requests: int = 0
    errors: int = 0
    rate_limited: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


def split_entry(entry: str) -> tuple[str | None, str]:
    """(name, token) of one `auth.tokens` entry: `NAME=TOKEN` when the text before its first `=` is a name and the
    rest is more than `=` padding, else the whole entry is the token (a base64 token may end in `=`)."""
    name, sep, token = entry.partition("=")
    if sep and NAME_RE.match(name) and token.strip("="):
        return name, token
    return None, entry


def named_tokens(entries: Iterable[str]) -> list[tuple[str, str]]:
    """(name, token) of every entry, in order; an unnamed one is `token-<its position>` (from 1)."""
    named = []
    for position, entry in enumerate(entries, start=1):
        name, token = split_entry(entry)
        named.append((name or UNNAMED.format(position), token))
    return named
