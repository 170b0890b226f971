#!/usr/bin/env python3
"""Dump the HTTP routes the installed SGLang registers into the table the app ships (app/data/sglang_routes.json).

Run it with the `engine` install whenever the pinned SGLang changes, then review `app/gateway/routes.py` (which of
them the endpoint relays):

    .venv/bin/python scripts/dump_sglang_routes.py            # rewrites app/data/sglang_routes.json
    .venv/bin/python scripts/dump_sglang_routes.py --check    # exit 1 when the shipped table is stale

It imports SGLang's FastAPI app (`sglang.srt.entrypoints.http_server.app`) without starting it and lists every
route's path and methods, the routes added at startup or by an environment variable (Ollama's root route) aside.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TABLE = Path(__file__).resolve().parent.parent / "app" / "data" / "sglang_routes.json"


def installed_routes() -> dict[str, object]:
    import sglang
    from sglang.srt.entrypoints.http_server import app

    routes: dict[str, set[str]] = {}

    def walk(items: list, prefix: str) -> None:
        for route in items:
            included = getattr(route, "original_router", None)  # a router included without copying its routes
            if included is not None:
                walk(included.routes, prefix + getattr(getattr(route, "include_context", None), "prefix", ""))
            elif getattr(route, "methods", None):  # (mounts and websocket routes have none)
                routes.setdefault(prefix + route.path, set()).update(route.methods)

    walk(app.routes, "")
    return {"sglang": sglang.__version__,
            "routes": [{"path": path, "methods": sorted(methods)} for path, methods in sorted(routes.items())]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the shipped table instead of writing it")
    args = parser.parse_args(argv)
    table = installed_routes()
    if args.check:
        shipped = json.loads(TABLE.read_text())
        if shipped != table:
            print(f"{TABLE} is stale: rerun scripts/dump_sglang_routes.py", file=sys.stderr)
            return 1
        return 0
    TABLE.write_text(json.dumps(table, indent=1) + "\n")
    print(f"{len(table['routes'])} routes of SGLang {table['sglang']} written to {TABLE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
