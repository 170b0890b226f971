"""Building each model's SGLang server command line: a pure function of the config and the resolved model.

`engine_spec(config, index, resolved, port=..., site=...)` computes one engine's launch as a typed `EngineSpec`
(model path, address, parallelism, the flags, environment and notes; `app.sglang.spec`) and `EngineSpec.render()`
makes its command line, last; `build_engine_command` does both. It reads nothing and starts nothing; the flags are
checked against SGLang's argument table, so a bad command line is a `ConfigError` here rather than a crashed engine
later. SGLang's own parser, where sglang is installed, checks the rendered commands at the edge (`check_commands`:
`args`; under `run` each engine's own parser does, as it starts, without the seconds an import of SGLang costs the
app). A deployment's commands are made in one place, `app.serving.plan`.

How the form becomes flags (docs/configuration.md, "Form fields and SGLang flags", says the same to users):
    model -> --model-path, endpoint name -> --served-model-name, gpus -> --tp-size, replicas -> --dp-size,
    lora.* -> --enable-lora --lora-paths --max-loras-per-batch --max-lora-rank --max-loaded-loras,
    auto_cpu_offload -> --enable-memory-saver --enable-weights-cpu-backup, disk_swap -> --enable-memory-saver,
    max_cuda_memory_gib above the GPU's memory -> --cpu-offload-gb, debug -> --log-level debug,
    device cpu -> --device cpu + SGLANG_USE_CPU_ENGINE=1 (+ --lora-backend torch_native),
    device cpu without max-total-tokens -> --max-total-tokens sized from the model (`app.sglang.pool`),
    every other flag by its CLI name, general first and the model's own on top; --enable-metrics always;
    a priority in auth.limits -> --enable-priority-scheduling --default-priority-value 0 (unless set).
With `cli` set, its arguments are used as they are, with only the model, address, name, metrics and priority
scheduling added.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from app import constants
from app.config import schema
from app.config.flags import FlagTable, check_with_real_parser
from app.config.types import DeploymentConfig, GeneralConfig, ModelConfig
from app.errors import ConfigError, Problem
from app.sglang.cpu import cpu_engine_env
from app.sglang.pool import cpu_pool
from app.sglang.spec import (
    EngineCommand,
    EngineSpec,
    Launch,
    Machine,
    MultiNode,
    Parallelism,
    Placed,
    Resolved,
    Site,
)

__all__ = ["EngineCommand", "EngineSpec", "Launch", "Machine", "MultiNode", "Parallelism", "Site", "as_worker",
           "build_engine_command", "build_engine_commands", "check_commands", "engine_spec", "gpus_per_copy",
           "replica_servers"]  # (the typed values live in app.sglang.spec)


# Keys' priorities (`auth.limits`) reach SGLang's scheduler, which orders by them only with this flag; requests without
# one (the gateway's own, keys without a priority) then get priority 0 rather than None (SGLang warns that None becomes
# a "None" label in its metrics).
PRIORITY_SCHEDULING, DEFAULT_PRIORITY = "enable-priority-scheduling", "default-priority-value"


def gpus_per_copy(model: ModelConfig, machine: Machine) -> int:
    """GPUs one copy of a model takes on one machine: its `gpus`, else every GPU the machine has."""
    return model.gpus or machine.gpu_count or 1


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


def engine_spec(config: DeploymentConfig, index: int, resolved: Resolved, *, port: int,
                placement: Placed | None = None, replicas: int | None = None, site: Site = Site(),
                launch: Launch = Launch()) -> EngineSpec:
    """The launch of the engine serving `config.models[index]`.

    `placement` pins the engine to its GPUs (and, on shared GPUs, its memory share); `replicas`: the model's
    replicas this machine runs (SGLang's --dp-size; default: the config's, where none go to worker tasks). `site`:
    the machine, the address and, when the model spans nodes (`nodes` > 1), this machine's rank (`--tp-size` is then
    the GPUs of every node together). `launch`: the engine key, the interpreter or launcher.
    """
    table = launch.flag_table or FlagTable.load()
    model = config.models[index]
    replicas = model.replicas if replicas is None else replicas
    where = f"models[{index}]"
    argv = _Argv(table)
    notes: list[str] = []
    if model.cli:
        parallel = _add_cli(argv, model, config, notes)
    else:
        parallel = _add_form(argv, model, replicas, config, resolved, site.machine, where, notes)
        if model.nodes > 1:
            parallel = _add_nodes(argv, model, parallel, site.multi_node, notes)
    if placement is not None and placement.memory_fraction is not None and "mem_fraction_static" not in argv.dests:
        argv.add("mem-fraction-static", placement.memory_fraction)
    argv.add("enable-metrics", True)  # the dashboard's tokens per second come from SGLang's counters
    if config.general.sleep_on_idle and "sleep_on_idle" not in argv.dests:
        argv.add("sleep-on-idle", True)  # an idle scheduler waits on its sockets instead of polling them
    _add_parsers(argv, getattr(resolved, "parsers", None), notes)
    _add_quiet_console(argv, config.general.debug)
    problems = table.check_argv(["--model-path", resolved.model_path, *argv.tokens])
    if problems:
        raise ConfigError([Problem(where, p, "fix the flag in the config") for p in problems])
    env, secret_env = _environment(config, placement, parallel)
    return EngineSpec(endpoint=model.endpoint, model_path=resolved.model_path, host=site.host, port=port,
                      flags=tuple(argv.tokens), parallel=parallel, env=env, secret_env=frozenset(secret_env),
                      notes=tuple(notes), launcher=launch.prefix, api_key=launch.engine_api_key)


def _environment(config: DeploymentConfig, placement: Placed | None,
                 parallel: Parallelism) -> tuple[dict[str, str], set[str]]:
    """The variables an engine gets on top of the app's (its devices, the HF token, the CPU mode's), and which of them
    are secret."""
    env = dict(config.env)
    if placement is not None and config.general.device != "cpu":
        env["CUDA_VISIBLE_DEVICES"] = placement.cuda_visible_devices
    secret_env: set[str] = {name for name in env if _looks_secret(name)}
    if config.general.hf_token:
        env[constants.HF_TOKEN_ENV] = config.general.hf_token
        secret_env.add(constants.HF_TOKEN_ENV)
    if config.general.device == "cpu":
        env.update(cpu_engine_env(parallel.ranks, parallel.local_ranks, parallel.first_rank))
    return env, secret_env


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


def build_engine_commands(config: DeploymentConfig, resolved: Sequence[Resolved], ports: Sequence[int], *,
                          placements: Sequence[Placed] | None = None, replicas: Sequence[int] | None = None,
                          site: Site = Site(), launch: Launch = Launch()) -> list[EngineCommand]:
    """Every model's command (`app.serving.plan` is where a deployment's are made); every problem of every model in
    one ConfigError. `site.multi_node` applies to the models spanning nodes only."""
    commands, problems = [], []
    for i, (item, port) in enumerate(zip(resolved, ports, strict=True)):
        spans = config.models[i].nodes > 1
        try:
            commands.append(build_engine_command(
                config, i, item, port=port, placement=placements[i] if placements else None,
                replicas=replicas[i] if replicas else None, launch=launch,
                site=site if spans or site.multi_node is None else replace(site, multi_node=None)))
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
    if config.auth.uses_priorities:
        if "enable_priority_scheduling" not in dests:
            argv.add(PRIORITY_SCHEDULING, True)
        if "default_priority_value" not in dests:
            argv.add(DEFAULT_PRIORITY, 0)
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


def _add_form(argv: _Argv, model: ModelConfig, replicas: int, config: DeploymentConfig, resolved: Resolved,
              machine: Machine, where: str, notes: list[str]) -> Parallelism:
    """The form's fields as SGLang flags (`replicas`: this machine's); the parallelism they make."""
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
    if replicas > 1 and general.device == "cpu":
        notes.append(f"replicas: {replicas} SGLang servers on this machine behind sglang-router (the "
                     "topology of replicas on several machines, run on one)")
    elif replicas > 1:
        dp = replicas
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

    flags = _flags_by_name(model, config)
    for name in sorted(flags):
        argv.add(name, flags[name])
    if general.device == "cpu" and "max_total_tokens" not in argv.dests:
        _add_cpu_pool(argv, config, resolved, machine, flags, notes)
    return Parallelism(tp=tp, dp=dp, pp=int(flags.get("pp-size") or 1))


def _add_cpu_pool(argv: _Argv, config: DeploymentConfig, resolved: Resolved, machine: Machine, flags: dict[str, Any],
                  notes: list[str]) -> None:
    """On the CPU, the KV pool sized from the model (`app.sglang.pool`), where its files and the machine's available
    RAM are known; else SGLang's own sizing, a share of the RAM, is said."""
    model_config = getattr(resolved, "config", None)
    pool = cpu_pool(dict(model_config), weights_bytes=getattr(resolved, "weights_bytes", 0),
                    available_bytes=machine.memory_available_bytes, engines=sum(m.replicas for m in config.models),
                    running=_int_or_none(flags.get("max-running-requests")),
                    context_flag=_int_or_none(flags.get("context-length")),
                    kv_cache_dtype=str(flags.get("kv-cache-dtype") or "auto")) \
        if model_config and machine.memory_available_bytes else None
    if pool is None:
        notes.append("KV pool: SGLang sizes it from the available RAM (its model's size is not known here); "
                     "max-total-tokens bounds it")
        return
    argv.add("max-total-tokens", pool.tokens)
    notes.append(pool.note())


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _flags_by_name(model: ModelConfig, config: DeploymentConfig) -> dict[str, Any]:
    """The SGLang flags by CLI name: general's, the model's on top, and those the app's settings imply."""
    general = config.general
    flags: dict[str, Any] = dict(general.flags)
    flags.update(model.flags)
    if general.debug:
        flags.setdefault("log-level", "debug")
    if general.device == "cpu" and model.lora.enable:
        flags.setdefault("lora-backend", "torch_native")  # the only LoRA backend without CUDA kernels
    if config.auth.uses_priorities:
        flags[PRIORITY_SCHEDULING] = True
        flags.setdefault(DEFAULT_PRIORITY, 0)
    return flags


def _add_parsers(argv: _Argv, parsers: Any, notes: list[str]) -> None:
    """The model family's tool-call and reasoning parsers (`app.sglang.parsers`) where the user set neither."""
    if not parsers:
        return
    chosen = [(flag, value) for flag, value in (("tool-call-parser", parsers.tool_call),
                                                ("reasoning-parser", parsers.reasoning))
              if value and flag.replace("-", "_") not in argv.dests]  # (the user's own value wins)
    if not chosen:
        return
    for flag, value in chosen:
        argv.add(flag, value)
    notes.append(f"parsers for {parsers.family}: " + ", ".join(f"{flag} {value}" for flag, value in chosen))


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
