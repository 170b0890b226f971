"""The SGLang argument table: lookups, coercion, rendering and command-line checks as SGLang's parser has them."""

from __future__ import annotations

import json

import pytest

from app.config.flags import FlagTable, FlagValueError

TABLE = FlagTable.load()


def test_the_shipped_table_is_sglang_0_5_23_with_every_argument():
    assert TABLE.sglang_version == "0.5.23"
    assert len(TABLE.specs) == 531
    assert TABLE.lookup("--tensor-parallel-size") is TABLE.lookup("--tp-size")


@pytest.mark.parametrize("flag, value, expected", [
    ("--max-running-requests", "64", 64),
    ("--max-running-requests", 64, 64),
    ("--mem-fraction-static", "0.8", 0.8),
    ("--context-length", "32k", 32000),
    ("--context-length", "25.6k", 25600),
    ("--context-length", "1Ki", 1024),
    ("--trust-remote-code", "True", True),
    ("--lora-strict-loading", "false", False),
    ("--cuda-graph-bs-decode", "[1, 2]", [1, 2]),
    ("--cuda-graph-bs-decode", "1, 2", [1, 2]),
    ("--preferred-sampling-params", '{"temperature": 0}', {"temperature": 0}),
    ("--log-requests-level", "2", 2),
])
def test_coerce(flag, value, expected):
    assert TABLE.lookup(flag).coerce(value) == expected


@pytest.mark.parametrize("flag, value", [
    ("--max-running-requests", "1.5"),
    ("--max-running-requests", True),
    ("--context-length", "1.5Ki"),       # SGLang: no decimals with IEC suffixes
    ("--context-length", "32K"),         # suffixes are case-sensitive
    ("--trust-remote-code", "sure"),
    ("--log-requests-level", "7"),
    ("--cuda-graph-bs-decode", "[]"),    # nargs "+": at least one
    ("--preferred-sampling-params", "{x"),
    ("--mem-fraction-static", "nan"),
])
def test_coerce_rejects(flag, value):
    with pytest.raises(FlagValueError):
        TABLE.lookup(flag).coerce(value)


def test_render_follows_argparse_actions():
    assert TABLE.lookup("--trust-remote-code").render(True) == ["--trust-remote-code"]
    assert TABLE.lookup("--trust-remote-code").render(False) == []
    assert TABLE.lookup("--lora-strict-loading").render(False) == ["--no-lora-strict-loading"]
    assert TABLE.lookup("--cuda-graph-bs-decode").render([1, 2]) == ["--cuda-graph-bs-decode", "1", "2"]
    params = TABLE.lookup("--preferred-sampling-params").render({"a": 1})
    assert json.loads(params[1]) == {"a": 1}


@pytest.mark.parametrize("argv, message", [
    (["--max-runing-requests", "3"], "did you mean --max-running-requests?"),
    (["--context-len", "3"], "did you mean --context-length?"),
    (["--trust-remote-code=yes"], "takes no value"),
    (["--tp-size", "2", "--tensor-parallel-size", "2"], "given twice"),
    (["--schedule-policy", "best"], "is not one of the choices"),
    (["positional"], "unexpected argument 'positional'"),
    (["--tp-size"], "needs a value"),
])
def test_check_argv_finds_what_argparse_would_refuse(argv, message):
    problems = TABLE.check_argv(argv)
    assert any(message in p for p in problems), problems


def test_check_argv_accepts_a_real_command_line():
    argv = ["--model-path", "org/m", "--tp-size", "2", "--lora-paths", "a=x", "b=y", "--enable-lora",
            "--chunked-prefill-size", "-1", "--no-lora-strict-loading", "--context-length=8192"]
    assert TABLE.check_argv(argv) == []
