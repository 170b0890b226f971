"""The README and the docs tell the truth: the generated reference, the commands and the example output are the real
ones, and the README stays a landing page that points at every docs page."""

from __future__ import annotations

import re

from app.config.docs import CONFIGURATION_PAGE, END, render_config_table
from tests.conftest import ROOT, run_cli

README = (ROOT / "README.md").read_text(encoding="utf-8")
CONFIGURATION = (ROOT / CONFIGURATION_PAGE).read_text(encoding="utf-8")
MAX_README_LINES = 250


def test_configuration_reference_is_generated_from_the_schema():
    start = CONFIGURATION.index("<!-- config-table:start")
    end = CONFIGURATION.index(END) + len(END)
    assert CONFIGURATION[start:end] == render_config_table(), "run scripts/update_generated.py"


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


def test_readme_is_a_landing_page_that_links_every_docs_page():
    lines = README.count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines, more than {MAX_README_LINES}: move some to docs/"
    documentation = README[README.index("\n## Documentation\n"):]
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"](docs/{page.name})" in documentation, f"README's Documentation does not link docs/{page.name}"
