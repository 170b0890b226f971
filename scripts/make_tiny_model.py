#!/usr/bin/env python3
"""Make the tiny Llama model and its two LoRA adapters offline: `python scripts/make_tiny_model.py OUT_DIR`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.demo.tiny_model import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
