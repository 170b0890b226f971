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



def test_engine_ports_are_free_and_below_the_range_outgoing_connections_take_ports_from():
    """A port the OS picks for a bind is free for the next outgoing connection's source port too (one took an engine's
    port before it bound it): engines' ports come from below that range."""
    import socket

    from app.serving.network import ENGINE_PORT_SPAN, ephemeral_range, free_ports

    low, _ = ephemeral_range()
    ports = free_ports(8, exclude=frozenset({low - 1}))
    assert len(set(ports)) == 8 and all(low - ENGINE_PORT_SPAN <= p < low - 1 for p in ports), ports
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # (free: each one binds)


def test_a_port_taken_or_excluded_is_never_given_and_the_os_picks_where_the_range_has_no_room():
    import socket

    from app.serving.network import ephemeral_range, free_ports

    with socket.socket() as held:  # (ports 1024-1029 are below a range starting at 1030)
        held.bind(("127.0.0.1", 1026))
        ports = free_ports(6, exclude=frozenset({1027}), ephemeral=(1030, 60999))
    assert sorted(p for p in ports if p < 1030) == [1024, 1025, 1028, 1029]
    assert len(set(ports)) == 6 and all(p >= ephemeral_range()[0] for p in ports if p >= 1030)
