"""One engine's launch, typed: what it is built from (`Machine`, `Site`, `Launch`, a resolved model, a placement)
and what it is (`EngineSpec`, rendered last into an `EngineCommand`: argv and environment).

The values here are plain and frozen; `app.sglang.command` computes them from the config, `app.serving.plan` for a
whole deployment, and `app.serving.engine` runs an `EngineCommand`.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from app import constants
from app.config.flags import FlagTable
from app.config.types import MultiNode


@dataclass(frozen=True)
class Machine:
    """What the builder needs to know of the machine the engines run on (None: unknown)."""

    gpu_count: int | None = None
    gpu_memory_gib: float | None = None
    memory_available_bytes: int | None = None  # RAM (the CPU development mode's engines keep their KV cache there)


class Resolved(Protocol):
    """A resolved model (`app.serving.models.ResolvedModel`): the path SGLang loads, its LoRA modules."""

    @property
    def model_path(self) -> str: ...

    @property
    def lora_modules(self) -> tuple[Any, ...]: ...


class Placed(Protocol):
    """Where an engine runs (`app.serving.gpus.Placement`): its devices, and its memory share on shared ones."""

    @property
    def cuda_visible_devices(self) -> str: ...

    @property
    def memory_fraction(self) -> float | None: ...


@dataclass(frozen=True)
class Parallelism:
    """SGLang's ranks for one engine: tensor x data x pipeline parallel, over `nnodes` machines."""

    tp: int = 1
    dp: int = 1
    pp: int = 1
    nnodes: int = 1
    node_rank: int = 0

    @property
    def ranks(self) -> int:
        return self.tp * self.dp * self.pp

    @property
    def local_ranks(self) -> int:
        """The ranks on one machine (the nodes share them evenly)."""
        return max(1, self.ranks // self.nnodes)

    @property
    def first_rank(self) -> int:
        return self.node_rank * self.local_ranks


@dataclass(frozen=True)
class EngineSpec:
    """One engine's launch, typed: what the app reads of it (model path, port, parallelism) is kept here as values,
    and the command line is rendered from it last (`render`)."""

    endpoint: str
    model_path: str
    host: str
    port: int
    flags: tuple[str, ...]  # every other SGLang flag, rendered, in order
    parallel: Parallelism
    env: Mapping[str, str]
    secret_env: frozenset[str] = frozenset()
    notes: tuple[str, ...] = ()
    launcher: tuple[str, ...] = ()
    api_key: str | None = field(default=None, repr=False)

    def render(self) -> EngineCommand:
        argv = (*self.launcher, "--model-path", self.model_path, "--host", self.host, "--port", str(self.port),
                *self.flags)
        return EngineCommand(endpoint=self.endpoint, argv=argv, env=self.env, secret_env=self.secret_env,
                             notes=self.notes, port=self.port, api_key=self.api_key,
                             secret_args={"--api-key": self.api_key} if self.api_key else {}, spec=self)


@dataclass(frozen=True)
class EngineCommand:
    """One engine's launch: `argv` as a list (never through a shell) and the variables added to its env."""

    endpoint: str
    argv: tuple[str, ...]
    env: Mapping[str, str]
    secret_env: frozenset[str] = frozenset()
    notes: tuple[str, ...] = ()
    port: int = 0
    api_key: str | None = field(default=None, repr=False)
    # Flags given at launch outside the command line, which `ps` shows to everyone (app.sglang.launch).
    secret_args: Mapping[str, str] = field(default_factory=dict, repr=False)
    spec: EngineSpec | None = field(default=None, repr=False, compare=False)  # an SGLang server's (not a router's)

    def masked_env(self) -> dict[str, str]:
        return {k: (constants.SECRET_MASK if k in self.secret_env else v) for k, v in self.env.items()}

    def masked_argv(self) -> list[str]:
        """The command line, its secrets masked (`secret_args` are not on it)."""
        argv = list(self.argv)
        for i, token in enumerate(argv[:-1]):
            if token == "--api-key":
                argv[i + 1] = constants.SECRET_MASK
        return argv

    def describe(self) -> dict[str, Any]:
        """What `clearml-sglang args` prints for this engine (secrets masked)."""
        out: dict[str, Any] = {"endpoint": self.endpoint, "argv": self.masked_argv(), "env": self.masked_env()}
        if self.notes:
            out["notes"] = list(self.notes)
        return out

    @property
    def model_path(self) -> str | None:
        """The model an SGLang server loads (None for a router)."""
        return self.spec.model_path if self.spec is not None else None

    def shell_line(self) -> str:
        """The command for a log line, its secrets masked."""
        return shlex.join(self.masked_argv())


@dataclass(frozen=True)
class Site:
    """Where an engine runs: what is known of the machine, the address it listens on (loopback: only the gateway
    reaches it; a replica worker's listens on every address, for the instance's router), and this machine's rank
    when its model spans nodes."""

    machine: Machine = Machine()
    host: str = constants.ENGINE_HOST
    multi_node: MultiNode | None = None


@dataclass(frozen=True)
class Launch:
    """How every engine of a deployment starts: the key only the gateway knows (given privately at launch, never on
    the command line: app.sglang.launch), the interpreter of the machine that runs it, and `launcher` instead of
    `python -m sglang.launch_server` (the tests' stand-in server takes the same arguments)."""

    engine_api_key: str | None = field(default=None, repr=False)
    python: str = sys.executable
    launcher: tuple[str, ...] | None = None
    flag_table: FlagTable | None = None

    @property
    def prefix(self) -> tuple[str, ...]:
        """What an SGLang server's command line begins with."""
        return self.launcher or (self.python, "-m", constants.SGLANG_LAUNCH_MODULE)
