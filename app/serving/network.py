"""What a deployment needs of the machine and the network before it starts: ports, its address, keys and tokens."""

from __future__ import annotations

import contextlib
import secrets
import socket

from app import constants
from app.config.types import DeploymentConfig
from app.gateway.auth import generate_token


def access_tokens(config: DeploymentConfig, environ: dict[str, str]) -> tuple[list[str], bool]:
    """The gateway's tokens: the config's and CLEARML_SGLANG_API_TOKENS'; one generated when there are none."""
    tokens = list(config.auth.tokens)
    tokens += [t.strip() for t in environ.get(constants.API_TOKENS_ENV, "").split(",") if t.strip()]
    if tokens:
        return tokens, False
    return [generate_token()], True


def free_ports(count: int, host: str = constants.ENGINE_HOST, exclude: frozenset[int] = frozenset()) -> list[int]:
    """Ports free right now on loopback (the OS picks them), one per engine, none of `exclude` (the gateway's)."""
    sockets, ports = [], []
    try:
        while len(ports) < count:
            s = socket.socket()
            s.bind((host, 0))
            sockets.append(s)
            if s.getsockname()[1] not in exclude:
                ports.append(s.getsockname()[1])
    finally:
        for s in sockets:
            s.close()
    return ports


def engine_key() -> str:
    """The key only the gateway knows. Hex, not url-safe base64: a value starting with "-" would be read as an
    option by SGLang's argument parser (and by ours)."""
    return secrets.token_hex(24)


def public_address(environ: dict[str, str]) -> str:
    """How other machines reach this one: the agent's host IP when it set one, else this host's address."""
    if environ.get("CLEARML_AGENT_HOST_IP"):
        return environ["CLEARML_AGENT_HOST_IP"]
    with contextlib.suppress(OSError):
        return socket.gethostbyname(socket.gethostname())
    return "127.0.0.1"


def curl_command(base_url: str, endpoint: str, token_placeholder: str = "YOUR_GENERATED_TOKEN") -> str:
    """A command that works as printed (once the placeholder is replaced by a token)."""
    return (f"curl {base_url}/{endpoint}/v1/chat/completions \\\n"
            f"  -H 'Authorization: Bearer {token_placeholder}' -H 'Content-Type: application/json' \\\n"
            f"  -d '{{\"model\": \"{endpoint}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}], "
            f"\"max_tokens\": 64}}'")
