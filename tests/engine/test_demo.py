"""The embedded default where the package index cannot be reached: it says so and serves the tiny model instead.

(Where it can, CI's run of the README's main job serves SmolLM2 and checks its answer: `.ci/run`.)
"""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("torch")

from app.constants import CACHE_ENV  # noqa: E402
from app.demo import demo_config  # noqa: E402

pytestmark = pytest.mark.engine


def test_no_index_no_real_model_but_a_demo_that_runs(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    environ = {CACHE_ENV: str(tmp_path), "PIP_INDEX_URL": "http://127.0.0.1:9/simple/"}  # (nothing listens on 9)
    demo = demo_config(lambda text: None, environ)
    assert [m.endpoint for m in demo.config.models] == ["tiny"]
    assert (tmp_path / "tiny" / "tiny-llama" / "model.safetensors").is_file()
    assert demo.fetch_s == demo.convert_s == 0.0
    assert "Could not fetch the demo model from the package index (http://127.0.0.1:9/simple/" in caplog.text
    assert "serving the tiny random model instead" in caplog.text
