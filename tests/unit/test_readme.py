"""The README tells the truth: its generated reference, its commands and its example output are the real ones."""

from __future__ import annotations

import re

from app.config.docs import render_config_table
from tests.conftest import ROOT, run_cli

README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_configuration_reference_is_generated_from_the_schema():
    start = README.index("<!-- config-table:start")
    end = README.index("<!-- config-table:end -->") + len("<!-- config-table:end -->")
    assert README[start:end] == render_config_table(), "run scripts/update_generated.py"


def test_ci_runs_the_readme_commands():
    setup_and_main_job, tests = re.search(r"```bash\n(.*?)```", README, re.S).group(1).strip().splitlines()
    ci = (ROOT / ".ci" / "run").read_text()
    *setup, main_job = setup_and_main_job.split(" && ")
    assert " && ".join(setup) + "\n" in ci
    assert main_job + " &\n" in ci  # in the background: it serves until stopped
    assert tests + "\n" in ci


def test_readme_example_error_is_what_the_cli_prints():
    block = re.search(r"```\n\$ clearml-sglang (.*?)\n(.*?)```", README, re.S)
    argv = block.group(1).split()
    result = run_cli(*argv)
    assert result.code == 2
    assert result.err == block.group(2)
