#!/usr/bin/env python3
"""Regenerate the README's configuration table from the schema (`app/config/schema.py`)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.config.docs import replace_table  # noqa: E402

README = Path(__file__).resolve().parent.parent / "README.md"

if __name__ == "__main__":
    README.write_text(replace_table(README.read_text(encoding="utf-8")), encoding="utf-8")
    sys.stderr.write(f"updated {README}\n")
