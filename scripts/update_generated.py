#!/usr/bin/env python3
"""Regenerate every file derived from the schema: the configuration reference (docs/configuration.md) and the
`clearml-task` command (docs/deploying.md), the ClearML app definition (wizard/) and the task template
(task_templates/). Tests fail when any of them is stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.clearml.templates import TEMPLATE_FILE, TaskDefinition, example_clearml_task_command  # noqa: E402
from app.clearml.wizard import APP_FILE, render  # noqa: E402
from app.config.docs import GENERATED_PAGES, replace_generated  # noqa: E402

if __name__ == "__main__":
    for name in GENERATED_PAGES:
        page = ROOT / name
        page.write_text(replace_generated(page.read_text(encoding="utf-8"), example_clearml_task_command()),
                        encoding="utf-8")
    (ROOT / APP_FILE).write_text(render(), encoding="utf-8")
    (ROOT / TEMPLATE_FILE).write_text(TaskDefinition().to_yaml(), encoding="utf-8")
    sys.stderr.write(f"updated {', '.join(GENERATED_PAGES)}, {APP_FILE}, {TEMPLATE_FILE}\n")
