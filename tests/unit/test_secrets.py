"""Secrets (the HF token, access tokens) never reach `args` output, exports, logs or error messages."""

from __future__ import annotations

import json
import logging

import pytest

from app.config import load_config, to_hyperparameters
from tests.conftest import EXAMPLES, run_cli

HF_TOKEN = "hf_" + "Zq7" * 12
ACCESS_TOKEN = "sk-" + "Pw9x" * 8
OTHER_TOKEN = "tok_" + "Lm3n" * 6
SECRETS = (HF_TOKEN, ACCESS_TOKEN, OTHER_TOKEN)
WITH_SECRETS = ["--set", f"general.hf_token={HF_TOKEN}", "--set", f"auth.tokens={ACCESS_TOKEN},{OTHER_TOKEN}"]


@pytest.fixture
def every_log_line(caplog):
    caplog.set_level(logging.DEBUG)
    return caplog


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text
            assert secret[4:20] not in text  # not even a piece of one


def test_args_output_masks_the_hf_token(every_log_line):
    result = run_cli("args", "--config", str(EXAMPLES / "lora.yaml"), *WITH_SECRETS)
    assert result.code == 0
    (line,) = result.lines()
    assert line["env"]["HF_TOKEN"] == "***"
    assert_no_secret(result.out, result.err, every_log_line.text)


def test_export_leaves_secrets_out(tmp_path, every_log_line):
    out = tmp_path / "export.json"
    result = run_cli("export", "--config", str(EXAMPLES / "lora.yaml"), *WITH_SECRETS, "-o", str(out))
    assert result.code == 0
    exported = out.read_text()
    assert '"hf_token"' not in exported and '"tokens"' not in exported
    assert json.loads(exported)["auth"] == {"limits": {}}  # limits are no secret: always written
    assert_no_secret(exported, result.out, result.err, every_log_line.text)


@pytest.mark.parametrize("bad", [
    ["--set", "general.hf_token=hf_ has a space Zq7Zq7Zq7Zq7Zq7Zq7Zq7Zq7"],
    ["--set", "auth.tokens=sk-Pw9xPw9x"],                                        # too short
    ["--set", f"auth.tokens={ACCESS_TOKEN} {OTHER_TOKEN}"],                      # a space inside
    ["--set", f"auth.tokens={ACCESS_TOKEN},{ACCESS_TOKEN}"],                     # twice
    ["--set", "general.hf_token=" + HF_TOKEN + "\u0000"],                        # a NUL
    ["--set", "general.hf_token=[" + HF_TOKEN + "]", "--set", "general.debug=x"],
])
def test_errors_about_secrets_do_not_repeat_them(bad, every_log_line):
    result = run_cli("args", "--set", "models.0.model=org/m", *bad)
    assert result.code == 2
    assert "hf_token" in result.err or "auth.tokens" in result.err or "general.debug" in result.err
    assert_no_secret(result.out, result.err, every_log_line.text)


def test_other_errors_with_secrets_present_do_not_show_them(every_log_line):
    result = run_cli("args", "--config", str(EXAMPLES / "lora.yaml"), *WITH_SECRETS,
                     "--set", "models.0.gpus=zero")
    assert result.code == 2
    assert_no_secret(result.err, every_log_line.text)


def test_config_repr_hides_secrets():
    config = load_config(EXAMPLES / "lora.yaml", [a for a in WITH_SECRETS if a != "--set"])
    assert config.general.hf_token == HF_TOKEN and config.auth.tokens == (ACCESS_TOKEN, OTHER_TOKEN)
    assert_no_secret(repr(config), str(config))


def test_hyperparameters_keep_secrets_for_the_task_itself():
    # the task's own hyperparameters are where a launched instance reads them from (project members only)
    config = load_config(EXAMPLES / "lora.yaml", [a for a in WITH_SECRETS if a != "--set"])
    params = {h.name: h.value for h in to_hyperparameters(config)}
    assert params["General/hf_token"] == HF_TOKEN
    assert ACCESS_TOKEN in params["Auth/tokens"]
