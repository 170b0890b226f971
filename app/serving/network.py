"""What a deployment needs of the machine and the network before it starts: ports, its address, keys and tokens."""

from __future__ import annotations

import contextlib
import random
import secrets
import socket
from collections.abc import Mapping
from pathlib import Path

from app import constants
from app.config import check_key_names
from app.config.types import DeploymentConfig
from app.errors import ConfigError, Problem
from app.gateway.auth import generate_token
from app.keys import UNNAMED, named_tokens, split_entry


def access_keys(config: DeploymentConfig, environ: Mapping[str, str]) -> tuple[list[tuple[str, str]], bool]:
    """The gateway's keys, (name, token) each: the config's and CLEARML_SGLANG_API_TOKENS' (`NAME=TOKEN` or a
    token, named `token-<position>` in the two lists together); one generated when there are none. A ConfigError when
    two keys have one name, or the config's limits name a key there is not."""
    entries = list(config.auth.tokens)
    entries += [t.strip() for t in environ.get(constants.API_TOKENS_ENV, "").split(",") if t.strip()]
    if not entries:
        return [(UNNAMED.format(1), generate_token())], True
    keys = named_tokens(entries)
    names = [name for name, _ in keys]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(Problem(constants.API_TOKENS_ENV, "names a key that auth.tokens names too: "
                                  + ", ".join(repeated), "give each key its own name (NAME=TOKEN)"))
    check_key_names(config.auth, names)
    return keys, False


# Engines listen below the range the kernel hands out as outgoing connections' source ports: a port it picked for a
# bind and that was let go is free for the next outgoing connection too (a client's, the gateway's own), and one of
# those took an engine's port before the engine bound it (`[Errno 98] address already in use`). Below that range
# only an explicit bind takes a port. This many ports below it are tried, in a random order.
ENGINE_PORT_SPAN = 12_000
DEFAULT_EPHEMERAL = (32768, 60999)  # Linux's default ip_local_port_range


def ephemeral_range(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> tuple[int, int]:
    """The source ports the kernel hands out to outgoing connections (Linux's setting; its default elsewhere)."""
    try:
        low, high = (int(v) for v in Path(path).read_text().split()[:2])
    except (OSError, ValueError):
        return DEFAULT_EPHEMERAL
    return low, high


def free_ports(count: int, host: str = constants.ENGINE_HOST, exclude: frozenset[int] = frozenset(), *,
               ephemeral: tuple[int, int] | None = None) -> list[int]:
    """Ports free right now on `host`, one per engine, none of `exclude` (the gateway's): below the ephemeral range
    (`ENGINE_PORT_SPAN` ports, in a random order), else, where that range leaves no room, as the OS picks them."""
    low, _ = ephemeral or ephemeral_range()
    candidates = list(range(max(1024, low - ENGINE_PORT_SPAN), low))
    random.SystemRandom().shuffle(candidates)
    sockets, ports = [], []
    try:
        for port in candidates:
            if len(ports) == count:
                break
            if port in exclude:
                continue
            s = socket.socket()
            try:
                s.bind((host, port))
            except OSError:
                s.close()
                continue
            sockets.append(s)
            ports.append(port)
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


def token_reference(config: DeploymentConfig, environ: Mapping[str, str]) -> str:
    """What the printed curl sends as its token: where the token is, never the token. The environment variable
    itself where it holds the one token (`${VAR#*=}` drops a `NAME=`), so the command runs as printed in the shell
    that started the app; else a placeholder (for a generated token where neither names one: `access_keys`)."""
    entries = [t.strip() for t in environ.get(constants.API_TOKENS_ENV, "").split(",") if t.strip()]
    if not config.auth.tokens and len(entries) == 1:
        named = split_entry(entries[0])[0] is not None
        return f"${{{constants.API_TOKENS_ENV}#*=}}" if named else f"${constants.API_TOKENS_ENV}"
    return "YOUR_GENERATED_TOKEN" if not config.auth.tokens and not entries else "YOUR_TOKEN"


def curl_command(base_url: str, endpoint: str, token: str = "YOUR_TOKEN") -> str:
    """A command that works as printed: `token` is a shell variable (in double quotes, so the shell expands it) or a
    placeholder to replace."""
    header = f'"Authorization: Bearer {token}"' if token.startswith("$") else f"'Authorization: Bearer {token}'"
    return (f"curl {base_url}/{endpoint}/v1/chat/completions \\\n"
            f"  -H {header} -H 'Content-Type: application/json' \\\n"
            f"  -d '{{\"model\": \"{endpoint}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}], "
            f"\"max_tokens\": 64}}'")
