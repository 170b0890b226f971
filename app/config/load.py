"""Loading a configuration: the one edge where user input becomes a DeploymentConfig.

Three sources, one path: a YAML/JSON file, ClearML hyperparameters and `--set section.key=value` overrides all
become one raw mapping (`app.config.sources`), and `parse_config` (`app.config.parse`) turns that mapping into a
frozen `DeploymentConfig` or raises a `ConfigError` listing every problem, each as `field: problem (fix)`.

Example::

    config = load_config("deploy.yaml", overrides=["general.max-running-requests=64"])
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from app.config.flags import FlagTable
from app.config.parse import parse_config
from app.config.sources import apply_overrides, raw_from_hyperparameters, read_config_file
from app.config.types import DeploymentConfig


def load_config(
    config_path: str | Path | None = None,
    overrides: Iterable[str] = (),
    hyperparameters: Mapping[str, Any] | None = None,
    flag_table: FlagTable | None = None,
) -> DeploymentConfig:
    """Read, merge and validate: file (or hyperparameters), then overrides, then the schema."""
    raw: dict[str, Any] = {}
    if hyperparameters is not None:
        raw = raw_from_hyperparameters(hyperparameters)
    if config_path is not None:
        raw = read_config_file(config_path)
    raw = apply_overrides(raw, overrides)
    return parse_config(raw, flag_table=flag_table)
