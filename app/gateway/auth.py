"""Access tokens the gateway makes: a fresh one when none is configured, and the benchmark's own."""

from __future__ import annotations

import secrets


def generate_token() -> str:
    """A fresh access token (about 256 bits)."""
    return secrets.token_urlsafe(32)
