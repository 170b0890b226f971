"""Model resolution: ClearML IDs, HuggingFace names and local paths, for models and LoRA adapters."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from app.config import load_config
from app.errors import ModelResolutionError
from app.serving.models import CLEARML, HUGGINGFACE, LOCAL_PATH, ModelNotFound, classify, describe, resolve

MODEL_ID = "0123456789abcdef0123456789abcdef"
ADAPTER_ID = "fedcba9876543210fedcba9876543210"


class RecordingRegistry:
    """The adapter seam: what the ClearML registry is asked for, and local copies it hands back."""

    def __init__(self, copies: dict[str, str], failures: dict[str, Exception] | None = None):
        self.copies = copies
        self.failures = failures or {}
        self.asked: list[str] = []

    def get_local_copy(self, model_id: str) -> str:
        self.asked.append(model_id)
        if model_id in self.failures:
            raise self.failures[model_id]
        if model_id not in self.copies:
            raise ModelNotFound("no such model")
        return self.copies[model_id]


@pytest.mark.parametrize("reference, kind", [
    (MODEL_ID, CLEARML),
    (MODEL_ID.upper(), CLEARML),
    ("Qwen/Qwen2.5-0.5B-Instruct", HUGGINGFACE),
    ("gpt2", HUGGINGFACE),
    ("/models/llama", LOCAL_PATH),
    ("./llama", LOCAL_PATH),
    ("~/llama", LOCAL_PATH),
])
def test_classify(reference, kind):
    assert classify(reference) == kind


@pytest.mark.parametrize("reference", ["org/name/extra", "org//x", "a--b/c", "org/x..y", "-x", "what is this"])
def test_classify_rejects_what_is_none_of_them(reference):
    with pytest.raises(ValueError):
        classify(reference)


def config_for(*overrides: str):
    return load_config(overrides=list(overrides))


def test_describe_fetches_nothing_and_checks_local_paths(tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    config = config_for(f"models.0.model={MODEL_ID}", "models.0.endpoint_name=a",
                        "models.1.model=org/b", "models.2.model=" + str(weights),
                        "models.2.lora.enable=true", f"models.2.lora.modules=x={ADAPTER_ID},y=org/y")
    resolved = describe(config)
    assert [r.model_path for r in resolved] == [MODEL_ID, "org/b", str(weights)]
    assert [str(m) for m in resolved[2].lora_modules] == [f"x={ADAPTER_ID}", "y=org/y"]


def test_missing_local_path_names_the_field(tmp_path):
    config = config_for("models.0.model=" + str(tmp_path / "nope"), "models.0.endpoint_name=a",
                        "models.0.lora.enable=true", "models.0.lora.modules=x=./not-here")
    with pytest.raises(ModelResolutionError) as info:
        describe(config)
    fields = [p.field for p in info.value.problems]
    assert fields == ["models[0].model", "models[0].lora.modules[0]"]
    assert "does not exist" in str(info.value)


def test_resolve_fetches_clearml_models_and_adapters(tmp_path):
    registry = RecordingRegistry({MODEL_ID: str(tmp_path / "m"), ADAPTER_ID: str(tmp_path / "a")})
    config = config_for(f"models.0.model={MODEL_ID.upper()}", "models.0.lora.enable=true",
                        f"models.0.lora.modules=x={ADAPTER_ID}")
    (resolved,) = resolve(config, registry)
    assert resolved.model_path == str(tmp_path / "m")
    assert resolved.source == CLEARML
    assert [str(m) for m in resolved.lora_modules] == [f"x={tmp_path / 'a'}"]
    assert registry.asked == [MODEL_ID, ADAPTER_ID]


def test_unknown_clearml_id_and_failed_download_are_clear_errors():
    registry = RecordingRegistry({}, failures={ADAPTER_ID: OSError(28, "No space left on device")})
    config = config_for(f"models.0.model={MODEL_ID}", "models.0.lora.enable=true",
                        f"models.0.lora.modules=x={ADAPTER_ID}")
    with pytest.raises(ModelResolutionError) as info:
        resolve(config, registry)
    first, second = info.value.problems
    assert first.field == "models[0].model" and "was not found" in first.problem
    assert "Models tab" in first.fix
    assert second.field == "models[0].lora.modules[0]" and "No space left on device" in second.problem


def test_hf_names_are_handed_to_sglang_unchanged():
    registry = RecordingRegistry({})
    (resolved,) = resolve(config_for("models.0.model=org/model"), registry)
    assert resolved.model_path == "org/model" and registry.asked == []


def test_clearml_registry_in_offline_mode_says_why(tmp_path):
    # the real SDK, in offline mode: a Model ID cannot be looked up, and the message says so
    code = (
        "from app.clearml.task import ClearMLModelRegistry\n"
        "from app.serving.models import ModelNotFound\n"
        "try:\n"
        f"    ClearMLModelRegistry().get_local_copy('{MODEL_ID}')\n"
        "except ModelNotFound as exc:\n"
        "    print('not found:', exc)\n"
    )
    env = {**os.environ, "CLEARML_OFFLINE_MODE": "1", "CLEARML_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "not found: ClearML runs in offline mode" in out.stdout
