"""SGLang's server arguments as data: look flags up, coerce values, render and check command lines.

The table (`app/data/sglang_server_args.json`) is dumped from the installed sglang's own argparse parser by
`scripts/dump_sglang_args.py`, so a machine without sglang (a laptop, CI's fast tier) rejects the same command
lines as the GPU machine. Where sglang is importable, `check_with_real_parser` also runs SGLang's own parser.

Example::

    table = FlagTable.load()
    table.lookup("--max-running-requests").coerce("64")     # -> 64
    table.check_argv(["--max-runing-requests", "8"])
    # -> ["unknown SGLang flag '--max-runing-requests' (did you mean --max-running-requests?)"]
"""

from __future__ import annotations

import argparse
import difflib
import functools
import io
import json
import logging
import re
from contextlib import redirect_stderr
from dataclasses import dataclass
from decimal import Decimal
from importlib import resources
from typing import Any

from app.config.problems import preview
from app.config.values import ValueProblem, parse_bool, parse_float, parse_int, parse_list

logger = logging.getLogger(__name__)

_SWITCH_ACTIONS = {
    "store_true",
    "sglang.srt.arg_groups.argparse_actions.DeprecatedStoreTrueAction",
    "sglang.srt.arg_groups.argparse_actions.DeprecatedStoreConstAction",
}
_NEGATABLE_ACTIONS = {"BooleanOptionalAction"}
_LIST_ACTIONS = {"sglang.srt.arg_groups.argparse_actions.LoRAPathAction"}
_INT_TYPES = {"int"}
_FLOAT_TYPES = {"float"}
_JSON_TYPES = {"json.loads"}
_JSON_LIST_TYPES = {"sglang.srt.utils.common.json_list_type"}
_HUMAN_INT_TYPES = {"sglang.srt.utils.common.human_readable_int"}
_HUMAN_INT_RE = re.compile(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)")
_SI = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_IEC = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


# A value that does not fit a flag; the message says what the flag takes (the config's own ValueProblem).
FlagValueError = ValueProblem


@dataclass(frozen=True)
class FlagSpec:
    """One SGLang server argument as its parser defines it."""

    flag: str
    aliases: tuple[str, ...]
    dest: str
    type: str | None
    default: Any
    choices: tuple[Any, ...] | None
    nargs: Any
    action: str
    help: str

    @property
    def name(self) -> str:
        """The flag as a config key: `--max-running-requests` -> `max-running-requests`."""
        return self.flag[2:]

    @property
    def kind(self) -> str:
        """How the flag takes its value: switch, negatable, list, optional or value."""
        if self.action in _SWITCH_ACTIONS:
            return "switch"
        if self.action in _NEGATABLE_ACTIONS:
            return "negatable"
        if self.action in _LIST_ACTIONS or self.nargs in ("+", "*"):
            return "list"
        if self.nargs == "?":
            return "optional"
        return "value"

    @property
    def is_bool(self) -> bool:
        return self.kind in ("switch", "negatable")

    @property
    def value_type_name(self) -> str:
        """A short name of the type for messages, hyperparameter types and the form."""
        if self.is_bool:
            return "bool"
        if self.kind == "list":
            return "list"
        if self.type in _INT_TYPES or self.type in _HUMAN_INT_TYPES:
            return "int"
        if self.type in _FLOAT_TYPES:
            return "float"
        if self.type in _JSON_TYPES:
            return "json"
        return "str"

    # ----- coercion: a config value (native from YAML/JSON, or a string from ClearML / --set) -----

    def coerce(self, value: Any) -> Any:
        """Return the canonical Python value for this flag, or raise FlagValueError."""
        if self.is_bool:
            return parse_bool(value)
        if self.kind == "list":
            items = parse_list(value)
            if self.nargs == "+" and not items:
                raise FlagValueError("takes at least one value")
            return [self._coerce_scalar(item) for item in items]
        return self._coerce_scalar(value)

    def _coerce_scalar(self, value: Any) -> Any:
        if isinstance(value, bool) and self.type not in _JSON_TYPES:
            raise FlagValueError(f"takes {self.describe()}, not true/false")
        if self.type in _INT_TYPES:
            result: Any = parse_int(value)
        elif self.type in _HUMAN_INT_TYPES:
            result = _parse_human_int(value)
        elif self.type in _FLOAT_TYPES:
            result = parse_float(value)
        elif self.type in _JSON_TYPES or self.type in _JSON_LIST_TYPES:
            result = _parse_json(value, want_list=self.type in _JSON_LIST_TYPES)
        else:
            if isinstance(value, (dict, list)):
                raise FlagValueError(f"takes {self.describe()}, not a {type(value).__name__}")
            result = value if isinstance(value, str) else str(value)
            if not result.strip() and self.kind != "optional":
                raise FlagValueError("must not be empty")
        if self.choices is not None and result not in self.choices:
            raise FlagValueError("is not one of the choices")
        return result

    def describe(self) -> str:
        if self.choices:
            return "one of " + ", ".join(str(c) for c in self.choices)
        return {"int": "a whole number", "float": "a number", "json": "JSON", "list": "a list"}.get(
            self.value_type_name, "text"
        )

    # ----- rendering -----

    def render(self, value: Any) -> list[str]:
        """The argv tokens for a canonical value (None and false switches render to nothing)."""
        if value is None:
            return []
        kind = self.kind
        if kind == "switch":
            return [self.flag] if value else []
        if kind == "negatable":
            return [self.flag] if value else ["--no-" + self.name]
        if kind == "list":
            return [self.flag, *(_render_scalar(v) for v in value)]
        return [self.flag, _render_scalar(value)]


def _render_scalar(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _parse_human_int(value: Any) -> int:
    """SGLang's human_readable_int: an integer, or one with an SI (k M G T, decimals allowed) or IEC suffix
    (Ki Mi Gi Ti); suffixes are case-sensitive, as SGLang has them."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return parse_int(value)
    if isinstance(value, str) and len(value) <= 30:
        match = _HUMAN_INT_RE.fullmatch(value.strip())
        if match:
            number, suffix = match.groups()
            if suffix in _IEC and "." not in number:
                return int(number) * _IEC[suffix]
            if suffix in _SI:
                return int(Decimal(number) * _SI[suffix])
        else:
            return parse_int(value)
    raise FlagValueError("takes a whole number, optionally with a suffix: 32k, 1M, 1Ki (decimals only with k/M/G/T)")


def _parse_json(value: Any, *, want_list: bool) -> Any:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise FlagValueError(f"takes JSON ({exc.msg})") from None
    if want_list and not isinstance(value, list):
        raise FlagValueError("takes a JSON list")
    return value


# ----- the table -----


class FlagTable:
    """Every SGLang server argument, looked up by any of its option strings."""

    def __init__(self, specs: list[FlagSpec], sglang_version: str):
        self.specs = specs
        self.sglang_version = sglang_version
        self._by_option: dict[str, FlagSpec] = {}
        for spec in specs:
            for option in (spec.flag, *spec.aliases):
                self._by_option[option] = spec

    @classmethod
    def from_records(cls, records: list[dict[str, Any]], sglang_version: str) -> FlagTable:
        specs = [
            FlagSpec(
                flag=r["flag"],
                aliases=tuple(r.get("aliases") or ()),
                dest=r["dest"],
                type=r.get("type"),
                default=r.get("default"),
                choices=tuple(r["choices"]) if r.get("choices") is not None else None,
                nargs=r.get("nargs"),
                action=r.get("action") or "store",
                help=r.get("help") or "",
            )
            for r in records
            if r["flag"].startswith("--")
        ]
        return cls(specs, sglang_version)

    @classmethod
    @functools.cache
    def load(cls) -> FlagTable:
        """The table shipped with the package."""
        text = resources.files("app.data").joinpath("sglang_server_args.json").read_text(encoding="utf-8")
        data = json.loads(text)
        return cls.from_records(data["arguments"], data["sglang_version"])

    @property
    def options(self) -> list[str]:
        return sorted(self._by_option)

    def lookup(self, option: str) -> FlagSpec | None:
        """Find a flag by an exact option string (`--tp-size`, `--tp`)."""
        return self._by_option.get(option)

    def lookup_key(self, key: str) -> FlagSpec | None:
        """Find a flag by its config key: the CLI name without dashes (`max-running-requests`)."""
        return self._by_option.get("--" + key) if not key.startswith("-") else None

    def suggest(self, option: str) -> str | None:
        """The closest real option string, for a did-you-mean."""
        candidate = option if option.startswith("--") else "--" + option.lstrip("-").replace("_", "-")
        if candidate != option and candidate in self._by_option:
            return candidate
        longer = sorted(o for o in self._by_option if o.startswith(candidate + "-"))
        if longer:  # an abbreviation: argparse would guess, we ask for the whole name
            return longer[0]
        matches = difflib.get_close_matches(candidate, self.options, n=1, cutoff=0.75)
        return matches[0] if matches else None

    def unknown_flag_message(self, option: str, what: str = "flag") -> str:
        hint = self.suggest(option)
        shown = preview(option)
        return f"unknown SGLang {what} {shown}" + (f" (did you mean {hint}?)" if hint else "")

    def parse_argv(self, tokens: list[str]) -> tuple[list[tuple[FlagSpec, str, list[str]]], list[str]]:
        """Split tokens into (spec, option as written, values) the way argparse would; also return problems.

        Stricter than argparse where it helps the user: no abbreviations, no positional words, no flag twice.
        """
        parsed: list[tuple[FlagSpec, str, list[str]]] = []
        problems: list[str] = []
        seen: dict[str, str] = {}
        i = 0
        while i < len(tokens):
            token = tokens[i]
            i += 1
            if not token.startswith("--") or token == "--":
                stray = [token]
                while i < len(tokens) and not tokens[i].startswith("--"):
                    stray.append(tokens[i])
                    i += 1
                problems.append(f"unexpected {'argument' if len(stray) == 1 else 'arguments'} "
                                f"{preview(' '.join(stray))}: every value follows its --flag, and no shell runs "
                                "the command")
                continue
            option, has_inline, inline = token.partition("=")
            spec = self.lookup(option)
            if spec is None:
                problems.append(self.unknown_flag_message(option))
                # skip the values that follow an unknown flag, so they are not reported again
                while i < len(tokens) and not tokens[i].startswith("--"):
                    i += 1
                continue
            values: list[str] = [inline] if has_inline else []
            kind = spec.kind
            if not has_inline and kind != "switch" and kind != "negatable":
                while i < len(tokens) and not _looks_like_option(tokens[i]):
                    values.append(tokens[i])
                    i += 1
                    if kind in ("value", "optional"):
                        break
            problem = _arity_problem(spec, option, values, has_inline)
            if problem:
                problems.append(problem)
                continue
            if spec.dest in seen:
                problems.append(f"{option} is given twice (also as {seen[spec.dest]}; keep one)")
                continue
            seen[spec.dest] = option
            parsed.append((spec, option, values))
        return parsed, problems

    def check_argv(self, tokens: list[str]) -> list[str]:
        """Every problem with a command line (after the module name), as messages; empty when valid."""
        parsed, problems = self.parse_argv(tokens)
        for spec, option, values in parsed:
            for value in values:
                try:
                    spec.coerce(value) if spec.kind != "list" else spec._coerce_scalar(value)
                except FlagValueError as exc:
                    problems.append(f"{option} {preview(value)}: {exc}")
        return problems


def _looks_like_option(token: str) -> bool:
    # argparse treats "-5" / "-0.5" as values, anything else starting with "-" as an option
    return token.startswith("-") and not re.fullmatch(r"-\d+(\.\d+)?", token)


def _arity_problem(spec: FlagSpec, option: str, values: list[str], has_inline: bool) -> str | None:
    kind = spec.kind
    if kind in ("switch", "negatable"):
        return f"{option} takes no value (write just {option})" if has_inline else None
    if kind == "value" and len(values) != 1:
        return f"{option} needs a value"
    if kind == "list" and spec.nargs == "+" and not values:
        return f"{option} needs at least one value"
    return None


# ----- SGLang's own parser, where sglang is installed -----


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        raise FlagValueError(message)


@functools.cache
def _real_parser() -> argparse.ArgumentParser | None:
    try:
        from sglang.srt.server_args import ServerArgs  # noqa: PLC0415 - heavy, and only on the engine install
    except Exception as exc:  # sglang absent, or present without what it needs to import
        logger.debug("sglang's parser is not available here (%s); using the shipped table", type(exc).__name__)
        return None
    parser = _RaisingParser(prog="sglang serve", allow_abbrev=False)
    ServerArgs.add_cli_args(parser)
    return parser


def real_parser_available() -> bool:
    return _real_parser() is not None


def check_with_real_parser(tokens: list[str]) -> str | None:
    """Run SGLang's own argument parser on a command line; its message when it refuses, else None.

    Returns None too where sglang is not installed (`real_parser_available()` tells which).
    """
    parser = _real_parser()
    if parser is None:
        return None
    try:
        with redirect_stderr(io.StringIO()):
            parser.parse_args(tokens)
    except FlagValueError as exc:
        return str(exc)
    except SystemExit:  # an action that exits by itself (e.g. --help)
        return "SGLang's parser exited on this command line"
    return None
