"""Building each model's SGLang server command line: a pure function of the config and the resolved model.

`engine_spec(config, index, resolved, port=..., machine=...)` computes one engine's launch as a typed `EngineSpec`
(model path, address, parallelism, the flags, environment and notes) and `EngineSpec.render()` makes its command
line, last; `build_engine_command` does both. It reads nothing and starts nothing; the flags are checked against
SGLang's argument table, so a bad command line is a `ConfigError` here rather than a crashed engine later. SGLang's
own parser, where sglang is installed, checks the rendered commands at the edge (`check_commands`: `args`; under
`run` each engine's own parser does, as it starts, without the seconds an import of SGLang costs the app).

How the form becomes flags (the README's "Form fields and SGLang flags" section says the same to users):
    model -> --model-path, endpoint name -> --served-model-name, gpus -> --tp-size, replicas -> --dp-size,
    lora.* -> --enable-lora --lora-paths --max-loras-per-batch --max-lora-rank --max-loaded-loras,
    auto_cpu_offload -> --enable-memory-saver --enable-weights-cpu-backup, disk_swap -> --enable-memory-saver,
    max_cuda_memory_gib above the GPU's memory -> --cpu-offload-gb, debug -> --log-level debug,
    device cpu -> --device cpu + SGLANG_USE_CPU_ENGINE=1 (+ --lora-backend torch_native),
    every other flag by its CLI name, general first and the model's own on top; --enable-metrics always.
With `cli` set, its arguments are used as they are, with only the model, address, name and metrics added.
"""

from __future__ import annotations

import math
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from app import constants
from app.config import schema
from app.config.flags import FlagTable, check_with_real_parser
from app.config.types import DeploymentConfig, GeneralConfig, ModelConfig, MultiNode
from app.errors import ConfigError, Problem
from app.sglang.cpu import cpu_engine_env


@dataclass(frozen=True)
class Machine:
    """What the builder needs to know of the machine the engines run on (None: unknown)."""

    gpu_count: int | None = None
    gpu_memory_gib: float | None = None


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


def gpus_per_copy(model: ModelConfig, machine: Machine) -> int:
    """GPUs one copy of a model takes on one machine: its `gpus`, else every GPU the machine has."""
    return model.gpus or machine.gpu_count or 1


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


@dataclass
class _Argv:
    table: FlagTable
    tokens: list[str] = field(default_factory=list)
    dests: set[str] = field(default_factory=set)

    def add(self, name: str, value: Any) -> None:
        spec = self.table.lookup_key(name)
        if spec is None:  # pragma: no cover - the builder only adds flags the table knows
            raise AssertionError(name)
        rendered = spec.render(value)
        if rendered:
            self.tokens += rendered
            self.dests.add(spec.dest)


def engine_spec(
    config: DeploymentConfig,
    index: int,
    resolved: Resolved,
    *,
    port: int,
    machine: Machine = Machine(),
    placement: Placed | None = None,
    engine_api_key: str | None = None,
    host: str = constants.ENGINE_HOST,
    python: str = sys.executable,
    launcher: tuple[str, ...] | None = None,
    flag_table: FlagTable | None = None,
    multi_node: MultiNode | None = None,
) -> EngineSpec:
    """The launch of the engine serving `config.models[index]`.

    `placement` pins the engine to its GPUs (and, on shared GPUs, its memory share); `engine_api_key` is the
    key only the gateway knows, so nothing on this machine reaches the engine around the gateway; it is not on the
    command line but given privately at launch (app.sglang.launch). `launcher` replaces `python -m
    sglang.launch_server` (the tests' stand-in server takes the same arguments). `multi_node`: this machine's rank
    when the model spans nodes (`nodes` > 1); `--tp-size` is then the GPUs of every node together.
    """
    table = flag_table or FlagTable.load()
    model = config.models[index]
    where = f"models[{index}]"
    argv = _Argv(table)
    notes: list[str] = []
    if model.cli:
        parallel = _add_cli(argv, model, config, notes)
    else:
        parallel = _add_form(argv, model, config, resolved, machine, where, notes)
        if model.nodes > 1:
            parallel = _add_nodes(argv, model, parallel, multi_node, notes)
    if placement is not None and placement.memory_fraction is not None and "mem_fraction_static" not in argv.dests:
        argv.add("mem-fraction-static", placement.memory_fraction)
    argv.add("enable-metrics", True)  # the dashboard's tokens per second come from SGLang's counters
    _add_quiet_console(argv, config.general.debug)
    problems = table.check_argv(["--model-path", resolved.model_path, *argv.tokens])
    if problems:
        raise ConfigError([Problem(where, p, "fix the flag in the config") for p in problems])

    env = dict(config.env)
    if placement is not None and config.general.device != "cpu":
        env["CUDA_VISIBLE_DEVICES"] = placement.cuda_visible_devices
    secret_env: set[str] = {name for name in env if _looks_secret(name)}
    if config.general.hf_token:
        env[constants.HF_TOKEN_ENV] = config.general.hf_token
        secret_env.add(constants.HF_TOKEN_ENV)
    if config.general.device == "cpu":
        env.update(cpu_engine_env(parallel.ranks, parallel.local_ranks, parallel.first_rank))
    return EngineSpec(endpoint=model.endpoint, model_path=resolved.model_path, host=host, port=port,
                      flags=tuple(argv.tokens), parallel=parallel, env=env, secret_env=frozenset(secret_env),
                      notes=tuple(notes), launcher=launcher or (python, "-m", constants.SGLANG_LAUNCH_MODULE),
                      api_key=engine_api_key)


def build_engine_command(config: DeploymentConfig, index: int, resolved: Resolved, **options: Any) -> EngineCommand:
    """The command line and environment of the engine serving `config.models[index]` (`engine_spec`, rendered)."""
    return engine_spec(config, index, resolved, **options).render()


def check_commands(commands: list[EngineCommand], models: list[int] | None = None) -> None:
    """SGLang's own parser, where sglang is installed, on every rendered command line (the edge: `args`);
    one ConfigError naming each model it refuses."""
    problems = []
    for i, command in enumerate(commands):
        if command.spec is None:
            continue
        refusal = check_with_real_parser(list(command.argv[len(command.spec.launcher):]))
        if refusal:
            where = f"models[{models[i] if models else i}]"
            problems.append(Problem(where, f"SGLang's parser refuses it: {refusal}", "fix the flag in the config"))
    if problems:
        raise ConfigError(problems)


def replica_servers(config: DeploymentConfig, index: int) -> int:
    """How many separate SGLang servers (router workers) serve `config.models[index]` on this machine: its replicas
    in the CPU development mode (the topology of replicas on several machines, behind sglang-router, run on one);
    one, with SGLang's own --dp-size, on GPUs."""
    model = config.models[index]
    return model.replicas if config.general.device == "cpu" and not model.cli else 1


def as_worker(command: EngineCommand, replica: int, port: int) -> EngineCommand:
    """One replica's server: the model's command on its own port, named `<endpoint>/<replica>` in logs."""
    assert command.spec is not None
    return replace(command.spec, endpoint=f"{command.endpoint}/{replica}", port=port).render()


def build_engine_commands(
    config: DeploymentConfig,
    resolved: list[Resolved],
    ports: list[int],
    *,
    machine: Machine = Machine(),
    placements: list[Placed] | None = None,
    engine_api_key: str | None = None,
    python: str = sys.executable,
    launcher: tuple[str, ...] | None = None,
    flag_table: FlagTable | None = None,
    multi_node: MultiNode | None = None,
    host: str = constants.ENGINE_HOST,
) -> list[EngineCommand]:
    """Every engine's command; every problem of every model in one ConfigError."""
    commands, problems = [], []
    for i, (item, port) in enumerate(zip(resolved, ports, strict=True)):
        try:
            commands.append(build_engine_command(
                config, i, item, port=port, machine=machine, placement=placements[i] if placements else None,
                engine_api_key=engine_api_key, python=python, launcher=launcher, flag_table=flag_table,
                multi_node=multi_node if config.models[i].nodes > 1 else None, host=host))
        except ConfigError as exc:
            problems += exc.problems
    if problems:
        raise ConfigError(problems)
    return commands


def _add_cli(argv: _Argv, model: ModelConfig, config: DeploymentConfig, notes: list[str]) -> Parallelism:
    """The user's own command line, with what the app needs added; its parallelism as it says."""
    tokens = shlex.split(model.cli)
    parsed, _ = argv.table.parse_argv(tokens)
    dests = {spec.dest for spec, _, _ in parsed}
    sizes = {spec.dest: int(raw[0]) for spec, _, raw in parsed if spec.dest in ("tp_size", "dp_size", "pp_size")}
    argv.tokens += tokens
    argv.dests |= dests
    if "served_model_name" not in dests:
        argv.add(schema.flag("model", "endpoint_name"), model.endpoint)
    if config.general.device == "cpu" and "device" not in dests:
        argv.add(schema.flag("general", "device"), "cpu")
    _add_memory_saver(argv, config.general, skip=dests)
    ignored = _non_default_model_fields(model)
    if ignored:
        notes.append("cli is set, so these model settings are ignored: " + ", ".join(ignored))
    return Parallelism(tp=sizes.get("tp_size", 1), dp=sizes.get("dp_size", 1), pp=sizes.get("pp_size", 1))


def _non_default_model_fields(model: ModelConfig) -> list[str]:
    ignored = [f.key for f in schema.MODEL_FIELDS
               if f.key not in ("cli", "model", "endpoint_name") and getattr(model, f.key) != f.default]
    ignored += [key for key, _ in model.flags]
    if model.lora.enable:
        ignored.append("lora")
    return ignored


def _add_form(argv: _Argv, model: ModelConfig, config: DeploymentConfig, resolved: Resolved,
              machine: Machine, where: str, notes: list[str]) -> Parallelism:
    """The form's fields as SGLang flags; the parallelism they make."""
    general = config.general
    argv.add(schema.flag("model", "endpoint_name"), model.endpoint)
    tp = dp = 1
    if general.device == "cpu":
        argv.add(schema.flag("general", "device"), "cpu")
        if model.nodes > 1:
            tp = model.nodes  # one rank per node
            argv.add(schema.flag("model", "gpus"), tp)
    else:
        tp = gpus_per_copy(model, machine) * model.nodes
        argv.add(schema.flag("model", "gpus"), tp)
    if model.replicas > 1 and general.device == "cpu":
        notes.append(f"replicas: {model.replicas} SGLang servers on this machine behind sglang-router (the "
                     "topology of replicas on several machines, run on one)")
    elif model.replicas > 1:
        dp = model.replicas
        argv.add(schema.flag("model", "replicas"), dp)

    lora = model.lora
    if lora.enable:
        argv.add(schema.flag("lora", "enable"), True)
        argv.add(schema.flag("lora", "modules"), [str(m) for m in resolved.lora_modules] or None)
        argv.add(schema.flag("lora", "max_loras"), lora.max_loras)
        argv.add(schema.flag("lora", "max_lora_rank"), lora.max_lora_rank)
        if lora.on_request:  # one slot more than the app keeps loaded: a new adapter loads before one is unloaded
            argv.add(schema.flag("lora", "max_cpu_loras"), lora.loaded_cap + 1)
            notes.append(f"adapters on request from {', '.join(lora.on_request)}: at most {lora.loaded_cap} loaded")
        else:
            argv.add(schema.flag("lora", "max_cpu_loras"), lora.max_cpu_loras)
    elif lora.modules:
        notes.append(f"lora.enable is false, so its {len(lora.modules)} module(s) are not loaded")

    _add_memory_saver(argv, general)
    if general.max_cuda_memory_gib > 0:
        _add_cpu_offload(argv, general.max_cuda_memory_gib, machine, where, notes)

    flags: dict[str, Any] = dict(general.flags)
    flags.update(model.flags)
    if general.debug:
        flags.setdefault("log-level", "debug")
    if general.device == "cpu" and lora.enable:
        flags.setdefault("lora-backend", "torch_native")  # the only LoRA backend without CUDA kernels
    for name in sorted(flags):
        argv.add(name, flags[name])
    return Parallelism(tp=tp, dp=dp, pp=int(flags.get("pp-size") or 1))


def _add_quiet_console(argv: _Argv, debug: bool) -> None:
    """No line per request in the console (the app prints a summary every report interval), but in debug mode; and
    never one for the app's own probes (`/health`, `/metrics`), nor the router's. What the user set stays."""
    if not debug and "log_level_http" not in argv.dests:
        argv.add("log-level-http", "warning")  # uvicorn's access lines are INFO
    if "uvicorn_access_log_exclude_prefixes" not in argv.dests:
        argv.add("uvicorn-access-log-exclude-prefixes", list(constants.ENGINE_PROBE_PATHS))


def _add_nodes(argv: _Argv, model: ModelConfig, parallel: Parallelism, multi_node: MultiNode | None,
               notes: list[str]) -> Parallelism:
    """SGLang's multi-node tensor parallelism: every node the same command but its rank; only rank 0 serves HTTP."""
    if multi_node is None:  # `args`: what rank 0 runs, the master's address as ClearML will give it
        multi_node = MultiNode(model.nodes, 0, "MASTER_ADDR", constants.MULTI_NODE_PORT)
        others = "rank 1 runs" if model.nodes == 2 else f"ranks 1 to {model.nodes - 1} run"
        notes.append(f"nodes: {model.nodes} machines; {others} the same command with its own --node-rank, and "
                     "ClearML's multi-node launch gives each node its rank and the master's address")
    argv.add("nnodes", multi_node.nodes)
    argv.add("node-rank", multi_node.rank)
    argv.add("dist-init-addr", multi_node.dist_init_addr)
    return replace(parallel, nnodes=multi_node.nodes, node_rank=multi_node.rank)


def _add_memory_saver(argv: _Argv, general: GeneralConfig, skip: frozenset[str] | set[str] = frozenset()) -> None:
    """What sleeping needs (app.serving.residency): the memory saver, and for CPU offloading the weights' CPU backup."""
    if general.sleeps and "enable_memory_saver" not in skip:
        argv.add("enable-memory-saver", True)
    if general.auto_cpu_offload and "enable_weights_cpu_backup" not in skip:
        argv.add("enable-weights-cpu-backup", True)


def _add_cpu_offload(argv: _Argv, max_cuda_memory_gib: float, machine: Machine, where: str,
                     notes: list[str]) -> None:
    if machine.gpu_memory_gib is None:
        raise ConfigError(Problem("general.max_cuda_memory_gib",
                                  "needs the GPU's memory to turn the surplus into --cpu-offload-gb",
                                  "tell `args` the target GPU with --gpu-memory-gib (`run` reads it from the GPU)"))
    surplus = max_cuda_memory_gib - machine.gpu_memory_gib
    if surplus > 0:
        argv.add("cpu-offload-gb", math.ceil(surplus))
    else:
        notes.append(f"max_cuda_memory_gib ({max_cuda_memory_gib:g}) fits in the GPU's "
                     f"{machine.gpu_memory_gib:g} GiB: nothing is offloaded")


def _looks_secret(name: str) -> bool:
    upper = name.upper()
    return any(word in upper for word in ("TOKEN", "SECRET", "PASSWORD", "API_KEY", "ACCESS_KEY", "CREDENTIAL"))
