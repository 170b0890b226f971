#!/usr/bin/env python3
"""Dump the installed SGLang's server arguments into the table the app ships (app/data/sglang_server_args.json).

Run it with the `engine` install whenever the pinned SGLang changes:

    .venv-engine/bin/python scripts/dump_sglang_args.py            # rewrites app/data/sglang_server_args.json
    .venv-engine/bin/python scripts/dump_sglang_args.py --check    # exit 1 when the shipped table is stale

It builds the parser exactly as `sglang serve` does (`ServerArgs.add_cli_args`) and walks its actions; no GPU is
needed (the CUDA build of torch imports without one).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TABLE = Path(__file__).resolve().parent.parent / "app" / "data" / "sglang_server_args.json"


def _name(obj: object) -> str | None:
    if obj is None:
        return None
    if isinstance(obj, str):
        return obj
    module = getattr(obj, "__module__", "") or ""
    qualname = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or type(obj).__name__
    return qualname if module in ("builtins", "argparse") else f"{module}.{qualname}"


def _jsonable(value: object) -> object:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return _name(value) if callable(value) else repr(value)


def dump() -> dict:
    import sglang
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(prog="sglang serve")
    ServerArgs.add_cli_args(parser)
    records = []
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        longs = [s for s in action.option_strings if s.startswith("--")]
        flag = longs[0] if longs else action.option_strings[0]
        records.append({
            "flag": flag,
            "aliases": [s for s in action.option_strings if s != flag],
            "dest": action.dest,
            "type": _name(action.type),
            "default": _jsonable(action.default),
            "choices": _jsonable(list(action.choices)) if action.choices is not None else None,
            "nargs": action.nargs,
            "action": _action_name(action),
            "required": action.required,
            "help": action.help if action.help != argparse.SUPPRESS else "==SUPPRESS==",
        })
    return {"sglang_version": sglang.__version__, "generated_by": "scripts/dump_sglang_args.py",
            "arguments": records}


def _action_name(action: argparse.Action) -> str:
    cls = type(action)
    names = {
        argparse._StoreAction: "store",
        argparse._StoreTrueAction: "store_true",
        argparse._StoreFalseAction: "store_false",
        argparse._StoreConstAction: "store_const",
        argparse._AppendAction: "append",
        argparse.BooleanOptionalAction: "BooleanOptionalAction",
    }
    return names.get(cls) or f"{cls.__module__}.{cls.__qualname__}"


def _normalised(table: dict) -> dict:
    """Choices built from registries come in import order; compare them as sets."""
    out = dict(table)
    out["arguments"] = [
        {**r, "choices": sorted(map(str, r["choices"])) if r.get("choices") is not None else None}
        for r in table.get("arguments", [])
    ]
    return out


def main() -> int:
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("--check", action="store_true", help="compare with the shipped table instead of writing")
    options.add_argument("-o", "--output", type=Path, default=TABLE)
    args = options.parse_args()
    text = json.dumps(dump(), indent=1, ensure_ascii=False) + "\n"
    if args.check:
        current = json.loads(args.output.read_text(encoding="utf-8")) if args.output.exists() else {}
        if _normalised(current) != _normalised(json.loads(text)):
            sys.stderr.write(f"{args.output} differs from the installed sglang's arguments; rerun without --check\n")
            return 1
        return 0
    args.output.write_text(text, encoding="utf-8")
    sys.stderr.write(f"wrote {len(json.loads(text)['arguments'])} arguments to {args.output}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
