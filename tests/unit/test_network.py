"""The printed curl: it names where the token is, and runs as printed in the shell that started the app."""

from __future__ import annotations

import subprocess

import pytest

from app.config import load_config
from app.serving.network import curl_command, token_reference

MODEL = "models.0.model=org/m"


def argv_of(command: str, environ: dict[str, str]) -> list[str]:
    """The arguments bash gives `curl` when it runs `command` (curl itself replaced by a function that prints them)."""
    script = 'curl() { printf "%s\\n" "$@"; }\n' + command
    done = subprocess.run(["bash", "-c", script], env=environ, capture_output=True, text=True, check=True)
    return done.stdout.splitlines()


@pytest.mark.parametrize("tokens", ["plain-token-0123456789", "alice=plain-token-0123456789"])
def test_one_token_in_the_environment_is_sent_from_the_variable_itself(tokens):
    reference = token_reference(load_config(overrides=[MODEL]), {"CLEARML_SGLANG_API_TOKENS": tokens})
    command = curl_command("http://h:8000", "m", reference)
    assert "plain-token" not in command
    assert "Authorization: Bearer plain-token-0123456789" in argv_of(command, {"CLEARML_SGLANG_API_TOKENS": tokens})


def test_elsewhere_a_placeholder_names_the_token_to_put_in():
    env = {"CLEARML_SGLANG_API_TOKENS": "a-token-0123456789,b-token-0123456789"}
    several = token_reference(load_config(overrides=[MODEL]), env)
    in_config = token_reference(load_config(overrides=[MODEL, "auth.tokens=c-token-0123456789"]), {})
    generated = token_reference(load_config(overrides=[MODEL]), {})
    assert (several, in_config, generated) == ("YOUR_TOKEN", "YOUR_TOKEN", "YOUR_GENERATED_TOKEN")
    assert "Authorization: Bearer YOUR_TOKEN" in argv_of(curl_command("http://h:8000", "m", several), {})
