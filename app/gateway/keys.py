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
# Events less than this after the first of an entry share it, timed at the latest of them: an event leaves its window
# at most this much late, never early, and a window holds at most WINDOW_SECONDS / GRAIN_SECONDS entries.
GRAIN_SECONDS = 0.1
# What a request refused for its key's requests in flight is told to wait (nothing says when one will end).
CONCURRENT_RETRY_SECONDS = 1.0


class Window:
    """Amounts added over the last `span_s` seconds, and when they leave it. `last`: the time of its newest entry,
    `first` at most its oldest's (infinite when it is empty), for the callers' one-comparison checks."""

    __slots__ = ("span_s", "grain_s", "_entries", "total", "first", "last", "_until")

    def __init__(self, span_s: float = WINDOW_SECONDS, grain_s: float = GRAIN_SECONDS):
        self.span_s, self.grain_s = span_s, grain_s
        self._entries: collections.deque[list[float]] = collections.deque()  # [time, amount], oldest first
        self.total = 0
        self.first, self.last = math.inf, -math.inf
        self._until = -math.inf  # the newest entry takes in events before this: a grain after its first

    def add(self, now: float, amount: int) -> None:
        if now < self._until:  # (the newest entry's grain: its bound is fixed by its first event, never moved)
            entry = self._entries[-1]
            entry[1] += amount
            if now > entry[0]:
                entry[0] = self.last = now
        else:
            entries = self._entries
            entries.append([now, amount])
            self.last, self._until = now, now + self.grain_s
            self.first = entries[0][0]
        self.total += amount

    def expire(self, now: float) -> int:
        """Drop what is older than the span; the total left."""
        entries, oldest = self._entries, now - self.span_s
        while entries and entries[0][0] <= oldest:
            self.total -= int(entries.popleft()[1])
        if entries:
            self.first, self.last = entries[0][0], entries[-1][0]
        else:
            self.first, self.last, self._until = math.inf, -math.inf, -math.inf
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
        return max(0.0, self.last + self.span_s - now) if self._entries else 0.0


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
_WHOLE_WINDOW = _RESET_S[int(WINDOW_SECONDS)]  # a request admitted now is its window's newest
_NO_WAIT = _RESET_MS[0]  # an empty window


def reset_field(seconds: float) -> bytes:
    if seconds < 1:
        return _RESET_MS[max(0, math.ceil(seconds * 1000))] if seconds < 0.999 else _RESET_S[1]
    whole = math.ceil(seconds)
    return _RESET_S[whole] if whole < len(_RESET_S) else duration(whole).encode()


class KeyState:
    """One key: its name, limits and what it is using now. The gateway's requests are its one writer."""

    __slots__ = ("name", "limits", "grants", "rated", "admits", "bounds_tokens", "in_flight", "requests", "tokens",
                 "headers", "_template", "_concurrent", "_rpm", "_tpm", "_rates")

    def __init__(self, name: str, limits: KeyLimits):
        self.name, self.limits = name, limits
        self.grants = frozenset(limits.models) if limits.models is not None else None
        self.rated, self.admits, self.bounds_tokens = limits.rated, limits.admits, limits.bounds_tokens  # (per request)
        self.in_flight = 0
        self.requests = Window()
        self.tokens = Window()
        self.headers = b""  # the x-ratelimit-* fields of its latest answer
        rpm, tpm = limits.rpm, limits.tpm
        # the limits as numbers (infinite where none is set), and which of rpm (1) and tpm (2) it has: what `admit`
        # reads for every request
        self._concurrent, self._rpm, self._tpm = (math.inf if v is None else v for v in (limits.concurrent, rpm, tpm))
        self._rates = (rpm is not None) + 2 * (tpm is not None)
        # the fields as one template, its limits written in: remaining and reset of requests, then of tokens
        self._template = ((b"x-ratelimit-limit-requests: %d\r\nx-ratelimit-remaining-requests: %%d\r\n"
                           b"x-ratelimit-reset-requests: %%s\r\n" % rpm if rpm is not None else b"")
                          + (b"x-ratelimit-limit-tokens: %d\r\nx-ratelimit-remaining-tokens: %%d\r\n"
                             b"x-ratelimit-reset-tokens: %%s\r\n" % tpm if tpm is not None else b""))

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
    # (`admit` and `release` run for every request of a key with limits: each window is looked into only when its
    # oldest entry has left it, the limits are compared as numbers, and the fields of a request taken in are written
    # with one template and no other call; a refusal is the rare case, `_refuse`.)

    def rate_headers(self, now: float) -> bytes:
        """OpenAI's `x-ratelimit-*` fields for the limits it has, as they stand now."""
        self.headers = self._fields(now, self.requests.expire(now), self.tokens.expire(now))
        return self.headers

    def _fields(self, now: float, requests: int, tokens: int) -> bytes:
        """The fields of the limits it has (of requests, of tokens, or both), given the windows' totals."""
        rpm, tpm = self.limits.rpm, self.limits.tpm
        if rpm is None and tpm is None:
            return b""
        tokens_reset = reset_field(self.tokens.last + WINDOW_SECONDS - now) if tokens else _NO_WAIT
        requests_reset = reset_field(self.requests.last + WINDOW_SECONDS - now) if requests else _NO_WAIT
        if rpm is None:
            return self._template % (max(0, tpm - tokens), tokens_reset)  # type: ignore[operator]
        if tpm is None:
            return self._template % (max(0, rpm - requests), requests_reset)
        return self._template % (max(0, rpm - requests), requests_reset, max(0, tpm - tokens), tokens_reset)

    def admit(self, now: float) -> Reply | None:
        """Take a request in (None), or the 429 that refuses it: the first of its limits it would pass."""
        requests, tokens = self.requests, self.tokens
        oldest = now - WINDOW_SECONDS
        if requests.first <= oldest:
            requests.expire(now)
        if tokens.first <= oldest:
            tokens.expire(now)
        if self.in_flight >= self._concurrent or requests.total >= self._rpm or tokens.total >= self._tpm:
            return self._refuse(now)
        self.in_flight += 1
        rates = self._rates
        if not rates:
            return None
        # the fields as they stand once it is in (below its limits: nothing remaining is negative)
        if rates == 1:
            requests.add(now, 1)
            self.headers = self._template % (self._rpm - requests.total, _WHOLE_WINDOW)
            return None
        used = tokens.total
        tokens_reset = reset_field(tokens.last + WINDOW_SECONDS - now) if used else _NO_WAIT
        if rates == 2:
            self.headers = self._template % (self._tpm - used, tokens_reset)
            return None
        requests.add(now, 1)  # (the window's newest: the window is whole again in 60 s)
        self.headers = self._template % (self._rpm - requests.total, _WHOLE_WINDOW, self._tpm - used, tokens_reset)
        return None

    def _refuse(self, now: float) -> Reply:
        """The 429 for a request over one of its limits (`concurrent` first, then `rpm`, then `tpm`)."""
        limits, requests, tokens = self.limits, self.requests, self.tokens
        if self.in_flight >= self._concurrent:
            what, wait_s = f"{limits.concurrent} requests in flight (concurrent)", CONCURRENT_RETRY_SECONDS
        elif requests.total >= self._rpm:
            what, wait_s = f"{limits.rpm} requests per minute (rpm)", requests.wait(now, self._rpm)
        else:
            what, wait_s = f"{limits.tpm} tokens per minute (tpm)", tokens.wait(now, self._tpm)
        self.headers = self._fields(now, requests.total, tokens.total)
        wait_s = max(wait_s, 0.001)
        return error_reply(429, f"Rate limit reached for key {self.name!r}: {what}; retry in {duration(wait_s)}",
                           "rate_limit_exceeded", retry_after_s=math.ceil(wait_s),
                           headers=((b"retry-after-ms", b"%d" % math.ceil(wait_s * 1000)),))

    def release(self, now: float, tokens: int) -> None:
        """A request it was admitted has ended, having used `tokens` (prompt and completion)."""
        self.in_flight -= 1
        if tokens and self._rates & 2:
            self.tokens.add(now, tokens)


# `Authorization` values verified already, kept to find their key again without hashing the token (most clients send
# one value on every request): only values that named a key, of at most `MAX_VERIFIED_BYTES` (a token holder may
# spell the header many ways), at most `MAX_VERIFIED` of them.
MAX_VERIFIED = 1024
MAX_VERIFIED_BYTES = 256


class KeyRing:
    """Every key, found by its token."""

    def __init__(self, keys: Iterable[tuple[str, str, KeyLimits]]):
        self._by_digest: dict[bytes, tuple[bytes, KeyState]] = {}
        self._verified: dict[bytes, KeyState] = {}
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
        known = self._verified.get(authorization)  # (a dict's lookup compares no bytes unless their keyed hashes match)
        if known is not None:
            return known
        scheme, _, credentials = authorization.partition(b" ")
        if scheme.lower() != b"bearer":  # (an authentication scheme is case-insensitive: RFC 9110 11.1)
            return None
        offered = credentials.strip()
        found = self._by_digest.get(hashlib.sha256(offered).digest())
        if found is None or not hmac.compare_digest(found[0], offered):
            return None
        if len(authorization) <= MAX_VERIFIED_BYTES and len(self._verified) < MAX_VERIFIED:
            self._verified[authorization] = found[1]
        return found[1]

    @property
    def prioritized(self) -> bool:
        """Some key has a priority: SGLang schedules by priority, and every request gets its key's."""
        return any(k.limits.priority is not None for k in self.keys.values())
