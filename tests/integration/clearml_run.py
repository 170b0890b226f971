"""Runs `clearml-sglang run` (app.run.run_service) with stand-in engines, for tests that read ClearML's records.

    python -m tests.integration.clearml_run --port P [--config F] [--set k=v]...

A process of its own per run: the ClearML SDK keeps one task per process.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from app.cli import _configure_logging
from app.constants import EXIT_USAGE
from app.errors import ConfigError
from app.run import run_service

FAKE = Path(__file__).resolve().parent.parent / "fakes" / "fake_sglang_server.py"

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    options = parser.parse_args()
    _configure_logging(sys.stderr)
    logging.getLogger("app").info("test driver: engines are the stand-in server")
    try:
        sys.exit(run_service(config_path=options.config, overrides=options.overrides, host="127.0.0.1",
                             port=options.port, offline=True, launcher=(sys.executable, str(FAKE))))
    except ConfigError as exc:  # as `clearml-sglang run` answers it (app.cli.main)
        if not exc.told:
            sys.stderr.write(str(exc) + "\n")
        sys.exit(EXIT_USAGE)
