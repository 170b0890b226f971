"""Typing a user's values: text, true/false, numbers, lists, choices; each bad one a `ValueProblem` saying what the
field takes. SGLang's flags (`app.config.flags`) use the same parsers for the values they take.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import yaml

from app.config.problems import Problems, preview
from app.config.schema import BOOL, CHOICE, FLOAT, INT, LIST, MAPPING, STR, Field


class ValueProblem(ValueError):
    """A value that does not fit its field; the message says what the field takes."""


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0", ""}


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueProblem("takes true or false")


def parse_list(value: Any) -> list[Any]:
    """A list from YAML/JSON, or from a string: a JSON list, or items separated by commas or new lines."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        if text.startswith("["):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueProblem(f"is not a valid JSON list ({exc.msg})") from None
            if not isinstance(parsed, list):
                raise ValueProblem("takes a list")
            return parsed
        return [item.strip() for item in re.split(r"[,\n]", text) if item.strip()]
    raise ValueProblem("takes a list")


def parse_mapping(value: Any) -> dict[Any, Any]:
    """A mapping from YAML/JSON, or from a string holding one in YAML or JSON (a hyperparameter, the form, `--set`).
    The text is read as JSON first, with JSON's own rules, as config files are."""
    if isinstance(value, Mapping):
        return dict(value)
    if not isinstance(value, str):
        raise ValueProblem(f"takes a mapping, not a {type(value).__name__}")
    check_text(value, allow_newlines=True)
    try:
        parsed = json.loads(value)
    except (json.JSONDecodeError, RecursionError):
        try:
            parsed = yaml.safe_load(value)  # SafeLoader builds no objects from tags
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ValueProblem(f"is not valid YAML or JSON ({getattr(exc, 'problem', None) or 'syntax'}{at})") \
                from None
        except RecursionError:
            raise ValueProblem("is nested too deeply") from None
    if parsed is None:
        return {}
    if not isinstance(parsed, Mapping):
        raise ValueProblem(f"holds a {type(parsed).__name__}, not a mapping")
    return dict(parsed)


def parse_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueProblem("takes a whole number, not true/false")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d{1,30}\s*", value):
        return int(value)
    raise ValueProblem("takes a whole number")


def parse_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueProblem("takes a number, not true/false")
    if isinstance(value, (int, float)):
        result = float(value)
    elif isinstance(value, str):
        try:
            result = float(value)
        except ValueError:
            raise ValueProblem("takes a number") from None
    else:
        raise ValueProblem("takes a number")
    if result != result or result in (float("inf"), float("-inf")):
        raise ValueProblem("takes a finite number")
    return result


# Longest single text value (a CLI, a chat template path, an env value).
MAX_TEXT_CHARS = 64 * 1024


_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def default_value(f: Field) -> Any:
    return tuple(f.default) if isinstance(f.default, (list, tuple)) else f.default


def coerce_field(f: Field, value: Any, where: str, problems: Problems) -> Any:
    """One app field's value, or its default after reporting the problem."""
    if value is None or (isinstance(value, str) and not value.strip() and f.type != STR):
        return default_value(f)
    try:
        if f.type == STR:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueProblem(f"takes text, not a {type(value).__name__}")
            result: Any = str(value).strip()
            check_text(result, allow_newlines=f.key == "cli")
        elif f.type == BOOL:
            result = parse_bool(value)
        elif f.type == INT:
            result = parse_int(value)
        elif f.type == FLOAT:
            result = parse_float(value)
        elif f.type == LIST:
            items = [str(i) if isinstance(i, int) and not isinstance(i, bool) else i for i in parse_list(value)]
            for item in items:
                if not isinstance(item, str):
                    raise ValueProblem(f"takes a list of text, not of {type(item).__name__}")
                check_text(item, allow_newlines=False)
            result = tuple(item.strip() for item in items if item.strip())
            if f.choices:  # a set of choices: each at most once
                if any(item not in f.choices for item in result):
                    raise ValueProblem("is not a list of the choices")
                result = tuple(dict.fromkeys(result))
        elif f.type == CHOICE:
            result = value.strip() if isinstance(value, str) else value
            if result not in (f.choices or ()):
                raise ValueProblem("is not one of the choices")
        elif f.type == MAPPING:
            result = parse_mapping(value)
        else:  # pragma: no cover - a schema typo, caught by the schema tests
            raise AssertionError(f.type)
    except ValueProblem as exc:
        problems.add(where, str(exc) if f.secret else f"{preview(value)} {exc}", _field_fix(f))
        return default_value(f)
    if not within_bounds(f, result):
        problems.add(where, f"{_num(result)} is not supported" if f.bound_fix else f"{_num(result)} is out of range",
                     f.bound_fix or bounds_text(f))
        return default_value(f)
    return result


def within_bounds(f: Field, value: Any) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return True
    if f.minimum is not None and value < f.minimum:
        return False
    return not (f.maximum is not None and value > f.maximum)


def bounds_text(f: Field) -> str:
    if f.minimum is not None and f.maximum is not None:
        return f"use a value from {_num(f.minimum)} to {_num(f.maximum)}"
    if f.minimum is not None:
        return f"use {_num(f.minimum)} or more"
    return f"use at most {_num(f.maximum)}"


def _num(x: float | None) -> str:
    return str(int(x)) if x is not None and float(x).is_integer() else str(x)


def _field_fix(f: Field) -> str:
    if f.type == BOOL:
        return "write true or false"
    if f.type == INT:
        return bounds_text(f) if f.minimum is not None or f.maximum is not None else "write a whole number"
    if f.type == FLOAT:
        return bounds_text(f) if f.minimum is not None or f.maximum is not None else "write a number"
    if f.type == CHOICE:
        return "choose one of: " + ", ".join(str(c) for c in f.choices or ())
    if f.type == MAPPING:
        return "write a YAML or JSON mapping, e.g. {default: {rpm: 60}}"
    if f.type == LIST:
        if f.choices:
            return "write some of: " + ", ".join(str(c) for c in f.choices)
        return "write a list, or items separated by commas"
    return "write plain UTF-8 text on one line"


def check_text(text: str, *, allow_newlines: bool) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueProblem("is not valid UTF-8 text") from None
    if len(text) > MAX_TEXT_CHARS:
        raise ValueProblem(f"is {len(text)} characters long; at most {MAX_TEXT_CHARS} are accepted")
    bad = _CONTROL_RE.search(text if allow_newlines else text.replace("\t", " "))
    if bad or (not allow_newlines and "\n" in text):
        raise ValueProblem("contains a control character (a new line, NUL, ...)")
