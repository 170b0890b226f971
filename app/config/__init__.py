"""The deployment configuration: schema, loading and validation, export."""

from app.config.export import Hyperparameter, to_hyperparameters, to_json, to_mapping
from app.config.limits import check_key_names
from app.config.load import load_config
from app.config.parse import parse_config
from app.config.sources import raw_from_hyperparameters, read_config_file
from app.config.types import AuthConfig, DeploymentConfig, LoraConfig, LoraModule, ModelConfig

__all__ = [
    "AuthConfig",
    "DeploymentConfig",
    "Hyperparameter",
    "LoraConfig",
    "LoraModule",
    "ModelConfig",
    "check_key_names",
    "load_config",
    "parse_config",
    "raw_from_hyperparameters",
    "read_config_file",
    "to_hyperparameters",
    "to_json",
    "to_mapping",
]
