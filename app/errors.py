"""The app's error types: user-facing problems carry the field and the fix, never a secret."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the user's input: ``field: problem (fix)``."""

    field: str
    problem: str
    fix: str = ""

    def __str__(self) -> str:
        text = f"{self.field}: {self.problem}"
        return f"{text} ({self.fix})" if self.fix else text


class ConfigError(Exception):
    """Invalid configuration or usage. Holds every problem found, not just the first.

    The CLI turns it into exit code 2 and one message on stderr; nothing has been launched.
    """

    told = False  # already on the console (`run` logs it at once, before ClearML's session closes)

    def __init__(self, problems: list[Problem] | Problem):
        self.problems = [problems] if isinstance(problems, Problem) else list(problems)
        super().__init__(self.render())

    def render(self) -> str:
        if len(self.problems) == 1:
            return f"invalid configuration: {self.problems[0]}"
        lines = [f"invalid configuration ({len(self.problems)} problems):"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


class ModelNotFound(LookupError):
    """The registry has no model with this ID (or it cannot be looked up here)."""


class ModelResolutionError(ConfigError):
    """A model or LoRA adapter that does not resolve (unknown ClearML ID, missing path)."""
