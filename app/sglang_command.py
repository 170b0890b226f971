"""Building each model's SGLang server command line: a pure function of the config and the resolved model.

`build_engine_command(config, index, resolved, port=..., machine=...)` returns the argv and the environment
additions for one engine. It reads nothing and starts nothing; the result is checked against SGLang's argument
table (and SGLang's own parser where sglang is installed) before it is returned, so a bad command line is a
`ConfigError` here rather than a crashed engine later.

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
from typing import Any

from app import constants
from app.config import schema
from app.config.types import DeploymentConfig, GeneralConfig, ModelConfig
from app.cpu_engine import cpu_engine_env
from app.errors import ConfigError, Problem
from app.gpus import Demand, Placement
from app.models import ResolvedModel
from app.sglang_flags import FlagTable, check_with_real_parser


@dataclass(frozen=True)
class Machine:
    """What the builder needs to know of the machine the engines run on (None: unknown)."""

    gpu_count: int | None = None
    gpu_memory_gib: float | None = None


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
    # Flags given at launch outside the command line, which `ps` shows to everyone (app.engine_launch).
    secret_args: Mapping[str, str] = field(default_factory=dict, repr=False)

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
        """The model the engine loads (`--model-path`, or its alias `--model`), as given on its command line."""
        for i, token in enumerate(self.argv):
            if token in ("--model-path", "--model") and i + 1 < len(self.argv):
                return self.argv[i + 1]
            if token.startswith(("--model-path=", "--model=")):
                return token.split("=", 1)[1]
        return None

    def shell_line(self) -> str:
        """The command for a log line, its secrets masked."""
        return shlex.join(self.masked_argv())


@dataclass(frozen=True)
class MultiNode:
    """Where this machine stands in a model spanning nodes: ClearML's multi-node launch gives every node its rank
    and the master's (rank 0's) address; SGLang's ranks meet at `master_addr:master_port`."""

    nodes: int
    rank: int
    master_addr: str
    master_port: int

    @property
    def dist_init_addr(self) -> str:
        return f"{self.master_addr}:{self.master_port}"


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


def build_engine_command(
    config: DeploymentConfig,
    index: int,
    resolved: ResolvedModel,
    *,
    port: int,
    machine: Machine = Machine(),
    placement: Placement | None = None,
    engine_api_key: str | None = None,
    host: str = constants.ENGINE_HOST,
    python: str = sys.executable,
    launcher: tuple[str, ...] | None = None,
    flag_table: FlagTable | None = None,
    multi_node: MultiNode | None = None,
) -> EngineCommand:
    """The command line and environment of the engine serving `config.models[index]`.

    `placement` pins the engine to its GPUs (and, on shared GPUs, its memory share); `engine_api_key` is the
    key only the gateway knows, so nothing on this machine reaches the engine around the gateway; it is not on the
    command line but in `secret_args`, which the engine's launch passes privately (app.engine_launch). `launcher`
    replaces `python -m sglang.launch_server` (the tests' stand-in server takes the same arguments).
    `multi_node`: this machine's rank when the model spans nodes (`nodes` > 1); `--tp-size` is then the GPUs of
    every node together.
    """
    table = flag_table or FlagTable.load()
    model = config.models[index]
    where = f"models[{index}]"
    argv = _Argv(table)
    argv.add("model-path", resolved.model_path)
    argv.add("host", host)
    argv.add("port", port)
    notes: list[str] = []
    if model.cli:
        _add_cli(argv, model, config, notes)
    else:
        _add_form(argv, model, config, resolved, machine, where, notes)
        if model.nodes > 1:
            _add_nodes(argv, model, multi_node, notes)
    if placement is not None and placement.memory_fraction is not None and "mem_fraction_static" not in argv.dests:
        argv.add("mem-fraction-static", placement.memory_fraction)
    argv.add("enable-metrics", True)  # the dashboard's tokens per second come from SGLang's counters

    env = dict(config.env)
    if placement is not None and config.general.device != "cpu":
        env["CUDA_VISIBLE_DEVICES"] = placement.cuda_visible_devices
    secret_env: set[str] = {name for name in env if _looks_secret(name)}
    if config.general.hf_token:
        env[constants.HF_TOKEN_ENV] = config.general.hf_token
        secret_env.add(constants.HF_TOKEN_ENV)
    if config.general.device == "cpu":
        env.update(cpu_engine_env(*_ranks(argv)))

    problems = table.check_argv(argv.tokens)
    if not problems:
        refusal = check_with_real_parser(argv.tokens)
        problems = [f"SGLang's parser refuses it: {refusal}"] if refusal else []
    if problems:
        raise ConfigError([Problem(where, p, "fix the flag in the config") for p in problems])
    return EngineCommand(
        endpoint=model.endpoint,
        argv=(*(launcher or (python, "-m", constants.SGLANG_LAUNCH_MODULE)), *argv.tokens),
        api_key=engine_api_key,
        secret_args={"--api-key": engine_api_key} if engine_api_key else {},
        env=env,
        secret_env=frozenset(secret_env),
        notes=tuple(notes),
        port=port,
    )


def replica_servers(config: DeploymentConfig, index: int) -> int:
    """How many separate SGLang servers (router workers) serve `config.models[index]` on this machine: its replicas
    in the CPU development mode (the topology of replicas on several machines, behind sglang-router, run on one);
    one, with SGLang's own --dp-size, on GPUs."""
    model = config.models[index]
    return model.replicas if config.general.device == "cpu" and not model.cli else 1


def as_worker(command: EngineCommand, replica: int, port: int) -> EngineCommand:
    """One replica's server: the model's command on its own port, named `<endpoint>/<replica>` in logs."""
    argv = list(command.argv)
    at = argv.index("--port")
    argv[at + 1] = str(port)
    return replace(command, endpoint=f"{command.endpoint}/{replica}", argv=tuple(argv), port=port)


def build_engine_commands(
    config: DeploymentConfig,
    resolved: list[ResolvedModel],
    ports: list[int],
    *,
    machine: Machine = Machine(),
    placements: list[Placement] | None = None,
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


def _add_cli(argv: _Argv, model: ModelConfig, config: DeploymentConfig, notes: list[str]) -> None:
    tokens = shlex.split(model.cli)
    parsed, _ = argv.table.parse_argv(tokens)
    dests = {spec.dest for spec, _, _ in parsed}
    argv.tokens += tokens
    argv.dests |= dests
    if "served_model_name" not in dests:
        argv.add("served-model-name", model.endpoint)
    if config.general.device == "cpu" and "device" not in dests:
        argv.add("device", "cpu")
    _add_memory_saver(argv, config.general, skip=dests)
    ignored = _non_default_model_fields(model)
    if ignored:
        notes.append("cli is set, so these model settings are ignored: " + ", ".join(ignored))


def _non_default_model_fields(model: ModelConfig) -> list[str]:
    ignored = [f.key for f in schema.MODEL_FIELDS
               if f.key not in ("cli", "model", "endpoint_name") and getattr(model, f.key) != f.default]
    ignored += [key for key, _ in model.flags]
    if model.lora.enable:
        ignored.append("lora")
    return ignored


def _add_form(argv: _Argv, model: ModelConfig, config: DeploymentConfig, resolved: ResolvedModel,
              machine: Machine, where: str, notes: list[str]) -> None:
    general = config.general
    argv.add("served-model-name", model.endpoint)
    if general.device == "cpu":
        argv.add("device", "cpu")
        if model.nodes > 1:
            argv.add("tp-size", model.nodes)  # one rank per node
    else:
        argv.add("tp-size", (model.gpus or machine.gpu_count or 1) * model.nodes)
    if model.replicas > 1 and general.device == "cpu":
        notes.append(f"replicas: {model.replicas} SGLang servers on this machine behind sglang-router (the "
                     "topology of replicas on several machines, run on one)")
    elif model.replicas > 1:
        argv.add("dp-size", model.replicas)

    lora = model.lora
    if lora.enable:
        argv.add("enable-lora", True)
        argv.add("lora-paths", [str(m) for m in resolved.lora_modules] or None)
        argv.add("max-loras-per-batch", lora.max_loras)
        argv.add("max-lora-rank", lora.max_lora_rank)
        argv.add("max-loaded-loras", lora.max_cpu_loras)
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


def _ranks(argv: _Argv) -> tuple[int, int, int]:
    """SGLang's ranks: in all (tp x dp x pp), on this node (shared evenly by the nodes), and this node's first."""
    parsed, _ = argv.table.parse_argv(argv.tokens)
    values = {spec.dest: v for spec, _, v in parsed}

    def number(dest: str, default: int = 1) -> int:
        return int(values[dest][0]) if values.get(dest) else default

    ranks = number("tp_size") * number("dp_size") * number("pp_size")
    local = max(1, ranks // number("nnodes"))
    return ranks, local, number("node_rank", 0) * local


def _add_nodes(argv: _Argv, model: ModelConfig, multi_node: MultiNode | None, notes: list[str]) -> None:
    """SGLang's multi-node tensor parallelism: every node the same command but its rank; only rank 0 serves HTTP."""
    if multi_node is None:  # `args`: what rank 0 runs, the master's address as ClearML will give it
        multi_node = MultiNode(model.nodes, 0, "MASTER_ADDR", constants.MULTI_NODE_PORT)
        others = "rank 1 runs" if model.nodes == 2 else f"ranks 1 to {model.nodes - 1} run"
        notes.append(f"nodes: {model.nodes} machines; {others} the same command with its own --node-rank, and "
                     "ClearML's multi-node launch gives each node its rank and the master's address")
    argv.add("nnodes", multi_node.nodes)
    argv.add("node-rank", multi_node.rank)
    argv.add("dist-init-addr", multi_node.dist_init_addr)


def _add_memory_saver(argv: _Argv, general: GeneralConfig, skip: frozenset[str] | set[str] = frozenset()) -> None:
    """What sleeping needs (app.residency): the memory saver, and for CPU offloading the weights' CPU backup."""
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


def demands(config: DeploymentConfig, machine: Machine, table: FlagTable | None = None) -> list[Demand]:
    """What each model asks of the GPUs: devices (tp x dp x pp) and its own memory fraction, if set."""
    table = table or FlagTable.load()
    out = []
    for i, model in enumerate(config.models):
        if model.cli:
            parsed, _ = table.parse_argv(shlex.split(model.cli))
            values = {spec.dest: v for spec, _, v in parsed}
            devices = 1
            for dest in ("tp_size", "dp_size", "pp_size"):
                devices *= int(values[dest][0]) if values.get(dest) else 1
            fraction = float(values["mem_fraction_static"][0]) if values.get("mem_fraction_static") else None
        else:
            devices = (model.gpus or machine.gpu_count or 1) * model.replicas
            fraction = model.flag("mem-fraction-static", config.general.flag("mem-fraction-static"))
        out.append(Demand(model.endpoint, devices, fraction, f"models[{i}].gpus"))
    return out


def _looks_secret(name: str) -> bool:
    upper = name.upper()
    return any(word in upper for word in ("TOKEN", "SECRET", "PASSWORD", "API_KEY", "ACCESS_KEY", "CREDENTIAL"))
