"""Bearer-token checks: constant time, whichever token matches (or none)."""

from __future__ import annotations

import hmac
import secrets


class TokenChecker:
    """Accepts `Authorization: Bearer <token>` for any of the configured tokens."""

    def __init__(self, tokens: list[str] | tuple[str, ...]):
        if not tokens:
            raise ValueError("at least one access token is needed")
        self._tokens = [t.encode() for t in tokens]

    def check(self, authorization: str | None) -> bool:
        if not authorization:
            return False
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() != "bearer":  # (an authentication scheme is case-insensitive: RFC 9110 11.1)
            return False
        offered = credentials.strip().encode("utf-8", "replace")
        ok = False
        for token in self._tokens:  # compare with every token, so timing does not tell which one matched
            ok |= hmac.compare_digest(offered, token)
        return ok


def generate_token() -> str:
    """A fresh access token (about 256 bits)."""
    return secrets.token_urlsafe(32)
