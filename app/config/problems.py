"""Collecting every problem of a config at once, each naming its field and its fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

from app.constants import ERROR_VALUE_PREVIEW_CHARS
from app.errors import ConfigError, Problem


class Problems:
    """Collects problems; every check adds to it and goes on, so the user sees them all at once."""

    def __init__(self) -> None:
        self.items: list[Problem] = []

    def add(self, field: str, problem: str, fix: str = "") -> None:
        self.items.append(Problem(field, problem, fix))

    def raise_if_any(self) -> None:
        if self.items:
            raise ConfigError(self.items)


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    matches = difflib.get_close_matches(word.replace("-", "_"), list(candidates), n=1, cutoff=0.6)
    if not matches:
        matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"did you mean {matches[0]}?" if matches else ""


def key_text(key: Any) -> str:
    return key if isinstance(key, str) and len(key) <= 60 and key.isprintable() else preview(str(key))


def preview(value: Any) -> str:
    """A short, printable quotation of a user's value for an error message."""
    text = value if isinstance(value, str) else repr(value)
    shown = repr(text[:ERROR_VALUE_PREVIEW_CHARS])
    return shown[:-1] + "…'" if len(text) > ERROR_VALUE_PREVIEW_CHARS else shown
