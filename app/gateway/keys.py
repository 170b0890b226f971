"""Access keys at the gateway: which key a request's token is, and what that key may do now.

`KeyRing.find` names the key of an `Authorization` header (by the token's SHA-256, then a constant-time comparison:
as fast with a hundred keys as with one). `KeyState` is one key's live state, written only by the gateway's requests:
its requests in flight and, in sliding windows of 60 s (`Window`), the requests it was admitted and the tokens its
requests used. `KeyState.admit` judges a request as it arrives, with the semantics of OpenAI's API so that clients'
retry logic works unchanged: over `concurrent`, `rpm` or `tpm` it is 429 `rate_limit_exceeded` with `Retry-After`
(and `retry-after-ms`, which OpenAI's SDKs read first); every answer to a key with `rpm` or `tpm` carries
`x-ratelimit-limit-*`, `x-ratelimit-remaining-*` and `x-ratelimit-reset-*` for requests and tokens. Tokens are
counted when a request ends, from the engine's `usage`: a key is refused once its window's tokens reach `tpm`, until
enough of them are older than 60 s (its requests in flight may take it past `tpm`; `concurrent` and `max_tokens`
bound by how much).
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import math
from collections.abc import Iterable

from app.gateway.errors import Reply, error_reply
from app.keys import KeyLimits

# The span of `rpm` and `tpm`.
WINDOW_SECONDS = 60.0
# Events this close together share one entry of a window, timed at the latest of them: an event leaves its window at
# most this much late, never early, and a window holds at most WINDOW_SECONDS / GRAIN_SECONDS entries.
GRAIN_SECONDS = 0.1
# What a request refused for its key's requests in flight is told to wait (nothing says when one will end).
CONCURRENT_RETRY_SECONDS = 1.0


class Window:
    """Amounts added over the last `span_s` seconds, and when they leave it."""

    __slots__ = ("span_s", "grain_s", "_entries", "total")

    def __init__(self, span_s: float = WINDOW_SECONDS, grain_s: float = GRAIN_SECONDS):
        self.span_s, self.grain_s = span_s, grain_s
        self._entries: collections.deque[list[float]] = collections.deque()  # [time, amount], oldest first
        self.total = 0

    def add(self, now: float, amount: int) -> None:
        entries = self._entries
        if entries and now - entries[-1][0] < self.grain_s:
            last = entries[-1]
            last[0], last[1] = max(last[0], now), last[1] + amount
        else:
            entries.append([now, amount])
        self.total += amount

    def expire(self, now: float) -> int:
        """Drop what is older than the span; the total left."""
        entries, oldest = self._entries, now - self.span_s
        while entries and entries[0][0] <= oldest:
            self.total -= int(entries.popleft()[1])
        return self.total

    def wait(self, now: float, limit: int) -> float:
        """Seconds until the total is below `limit` (0 when it is)."""
        excess = self.total - limit
        for at, amount in self._entries:
            if excess < 0:
                break
            excess -= int(amount)
            if excess < 0:
                return max(0.0, at + self.span_s - now)
        return 0.0

    def reset(self, now: float) -> float:
        """Seconds until the window is empty again."""
        return max(0.0, self._entries[-1][0] + self.span_s - now) if self._entries else 0.0


def duration(seconds: float) -> str:
    """A reset time as OpenAI's headers write it (`20ms`, `1s`, `6m0s`, `1.5s`), rounded up to the millisecond."""
    ms = math.ceil(seconds * 1000)
    if ms < 1000:
        return f"{ms}ms"
    minutes, ms = divmod(ms, 60000)
    return f"{minutes}m{ms / 1000:g}s" if minutes else f"{ms / 1000:g}s"


# A reset time in a header, precomputed: to the millisecond under a second, else rounded up to whole seconds (a
# window is 60 s: every value it can take is here).
_RESET_MS = [duration(ms / 1000).encode() for ms in range(1000)]
_RESET_S = [duration(s).encode() for s in range(int(WINDOW_SECONDS) + 2)]


def reset_field(seconds: float) -> bytes:
    if seconds < 1:
        return _RESET_MS[max(0, math.ceil(seconds * 1000))] if seconds < 0.999 else _RESET_S[1]
    whole = math.ceil(seconds)
    return _RESET_S[whole] if whole < len(_RESET_S) else duration(whole).encode()


class KeyState:
    """One key: its name, limits and what it is using now. The gateway's requests are its one writer."""

    __slots__ = ("name", "limits", "grants", "in_flight", "requests", "tokens", "headers", "_requests_head",
                 "_tokens_head")

    def __init__(self, name: str, limits: KeyLimits):
        self.name, self.limits = name, limits
        self.grants = frozenset(limits.models) if limits.models is not None else None
        self.in_flight = 0
        self.requests = Window()
        self.tokens = Window()
        self.headers = b""  # the x-ratelimit-* fields of its latest answer
        self._requests_head = b"x-ratelimit-limit-requests: %d\r\nx-ratelimit-remaining-requests: " % (limits.rpm or 0)
        self._tokens_head = b"x-ratelimit-limit-tokens: %d\r\nx-ratelimit-remaining-tokens: " % (limits.tpm or 0)

    # ----- which models it may use -----

    def sees(self, endpoint: str) -> bool:
        """The endpoint exists for this key: it may use the model, or one of its adapters."""
        grants = self.grants
        return grants is None or endpoint in grants or any(g.startswith(endpoint + ":") for g in grants)

    def may_use(self, endpoint: str, adapters: Iterable[str]) -> bool:
        """It may send a request to `endpoint` naming `adapters` (none: the model itself)."""
        grants = self.grants
        if grants is None or endpoint in grants:
            return True
        named = list(adapters)
        return bool(named) and all(f"{endpoint}:{adapter}" in grants for adapter in named)

    # ----- rate limits -----

    def rate_headers(self, now: float) -> bytes:
        """OpenAI's `x-ratelimit-*` fields for the limits it has, as they stand now."""
        rpm, tpm = self.limits.rpm, self.limits.tpm
        self.headers = self._fields(now, self.requests.expire(now) if rpm is not None else 0,
                                    self.tokens.expire(now) if tpm is not None else 0)
        return self.headers

    def _fields(self, now: float, requests: int, tokens: int) -> bytes:
        """The fields, given the requests and tokens in the windows now."""
        rpm, tpm, fields = self.limits.rpm, self.limits.tpm, b""
        if rpm is not None:
            fields = self._requests_head + b"%d\r\nx-ratelimit-reset-requests: %s\r\n" % (
                max(0, rpm - requests), reset_field(self.requests.reset(now)))
        if tpm is not None:
            fields += self._tokens_head + b"%d\r\nx-ratelimit-reset-tokens: %s\r\n" % (
                max(0, tpm - tokens), reset_field(self.tokens.reset(now)))
        return fields

    def admit(self, now: float) -> Reply | None:
        """Take a request in (None), or the 429 that refuses it: the first of its limits it would pass."""
        limits = self.limits
        rpm, tpm, concurrent = limits.rpm, limits.tpm, limits.concurrent
        requests = self.requests.expire(now) if rpm is not None else 0
        tokens = self.tokens.expire(now) if tpm is not None else 0
        if concurrent is not None and self.in_flight >= concurrent:
            refusal = (f"{concurrent} requests in flight (concurrent)", CONCURRENT_RETRY_SECONDS)
        elif rpm is not None and requests >= rpm:
            refusal = (f"{rpm} requests per minute (rpm)", self.requests.wait(now, rpm))
        elif tpm is not None and tokens >= tpm:
            refusal = (f"{tpm} tokens per minute (tpm)", self.tokens.wait(now, tpm))
        else:
            self.in_flight += 1
            fields = b""
            if rpm is not None:  # (it is the window's newest: the window is whole again in 60 s)
                self.requests.add(now, 1)
                fields = self._requests_head + b"%d\r\nx-ratelimit-reset-requests: %s\r\n" % (
                    rpm - requests - 1, _RESET_S[int(WINDOW_SECONDS)])
            if tpm is not None:
                fields += self._tokens_head + b"%d\r\nx-ratelimit-reset-tokens: %s\r\n" % (
                    tpm - tokens, reset_field(self.tokens.reset(now)))
            self.headers = fields
            return None
        if rpm is not None or tpm is not None:
            self.headers = self._fields(now, requests, tokens)
        what, wait_s = refusal
        wait_s = max(wait_s, 0.001)
        return error_reply(429, f"Rate limit reached for key {self.name!r}: {what}; retry in {duration(wait_s)}",
                           "rate_limit_exceeded", retry_after_s=math.ceil(wait_s),
                           headers=((b"retry-after-ms", b"%d" % math.ceil(wait_s * 1000)),))

    def release(self, now: float, tokens: int) -> None:
        """A request it was admitted has ended, having used `tokens` (prompt and completion)."""
        self.in_flight -= 1
        if tokens and self.limits.tpm is not None:
            self.tokens.add(now, tokens)


class KeyRing:
    """Every key, found by its token."""

    def __init__(self, keys: Iterable[tuple[str, str, KeyLimits]]):
        self._by_digest: dict[bytes, tuple[bytes, KeyState]] = {}
        self.keys: dict[str, KeyState] = {}
        for name, token, limits in keys:
            state = self.keys[name] = KeyState(name, limits)
            self._by_digest[hashlib.sha256(token.encode()).digest()] = (token.encode(), state)
        if not self.keys:
            raise ValueError("at least one access token is needed")

    def find(self, authorization: bytes | None) -> KeyState | None:
        """The key of `Authorization: Bearer <token>` (the scheme in any case), or None."""
        if not authorization:
            return None
        scheme, _, credentials = authorization.partition(b" ")
        if scheme.lower() != b"bearer":  # (an authentication scheme is case-insensitive: RFC 9110 11.1)
            return None
        offered = credentials.strip()
        found = self._by_digest.get(hashlib.sha256(offered).digest())
        if found is None or not hmac.compare_digest(found[0], offered):
            return None
        return found[1]

    @property
    def prioritized(self) -> bool:
        """Some key has a priority: SGLang schedules by priority, and every request gets its key's."""
        return any(k.limits.priority is not None for k in self.keys.values())
