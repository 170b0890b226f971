"""With the `engine` extra installed: SGLang's own parser agrees with the shipped table, both ways; the shipped
table of SGLang's HTTP routes is its own.

Skipped where sglang is not installed (the plain install); CI runs them on the engine install.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("sglang")

from app.config.flags import FlagTable, check_with_real_parser, real_parser_available  # noqa: E402
from tests.conftest import ROOT, run_cli  # noqa: E402
from tests.unit.test_args_golden import CASES  # noqa: E402

pytestmark = pytest.mark.engine


def test_shipped_table_is_what_the_installed_sglang_defines():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "dump_sglang_args.py"), "--check"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_shipped_route_table_is_what_the_installed_sglang_serves():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "dump_sglang_routes.py"), "--check"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_real_parser_is_used_here():
    assert real_parser_available()


@pytest.mark.parametrize("case", sorted(CASES))
def test_real_parser_accepts_every_golden_command_line(case):
    argv, _ = CASES[case]
    result = run_cli("args", *argv)
    assert result.code == 0, result.err
    for line in result.lines():
        assert check_with_real_parser(line["argv"][3:]) is None


@pytest.mark.parametrize("tokens", [
    ["--max-runing-requests", "3"],
    ["--tp-size", "two"],
    ["--schedule-policy", "best"],
    ["--context-length"],
    ["--context-length", "32K"],
    ["--trust-remote-code=yes"],
    ["stray"],
])
def test_what_the_table_refuses_sglang_refuses_too(tokens):
    argv = ["--model-path", "org/m", *tokens]
    assert FlagTable.load().check_argv(argv), tokens
    assert check_with_real_parser(argv) is not None, tokens
