"""The embedded default deployment: `clearml-sglang run` with no config serves a tiny model on this CPU.

It needs the `engine` install (SGLang, torch) and nothing else: the tiny Llama model and its two LoRA adapters are
made offline on first use (`app.demo.tiny_model`) in the cache directory, `CLEARML_SGLANG_CACHE` or
`~/.cache/clearml-sglang`. Its answers are gibberish (random weights); it is there to see the whole path work.
"""

from __future__ import annotations

from pathlib import Path

from app.config import parse_config
from app.config.types import DeploymentConfig
from app.constants import CACHE_ENV, cache_dir

__all__ = ["CACHE_ENV", "cache_dir", "demo_config", "demo_raw"]


def demo_raw(base: Path, adapters: tuple[Path, ...]) -> dict:
    """The demo's config as a config file would hold it."""
    return {
        "instance": {"name": "SGLang tiny CPU demo"},
        "models": [{
            "model": str(base),
            "endpoint_name": "tiny",
            "max-total-tokens": 65536,  # on the CPU, the KV cache is sized in tokens, not as a share of RAM
            "lora": {"enable": True, "modules": [f"{chr(ord('a') + i)}={p}" for i, p in enumerate(adapters)],
                     "max_loras": 2, "max_lora_rank": 8},
        }],
        "general": {"device": "cpu"},
        "idle": {"time_limit_hours": 1, "report_interval_seconds": 10},
    }


def demo_config() -> DeploymentConfig:
    from app.demo.tiny_model import make_tiny_models  # needs torch: only the engine install has it

    made = make_tiny_models(cache_dir() / "tiny")
    return parse_config(demo_raw(made.base, made.adapters))
