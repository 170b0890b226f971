"""A stand-in for the SGLang 0.5.23 HTTP server, for integration tests that need faults on demand.

The real engine cannot be told to crash after three tokens, hang mid-stream or start slowly; this fake can, and it
is started exactly like the real one, so a test can run it through the project's own supervisor:

    python tests/fakes/fake_sglang_server.py --model-path tiny --port 30001 --enable-metrics
    python -m tests.fakes.fake_sglang_server --model-path tiny --served-model-name chat \\
        --lora-paths lora_a=/adapters/a --api-key sk-test            # (from the repository root)

The command line is checked against SGLang's real argument table (`app.config.flags.FlagTable`): any SGLang flag is
accepted (most are ignored), an unknown flag or a bad value prints an argparse-style error to stderr and exits 2, and
`--model-path` is required, as in SGLang. `--config FILE.yaml` (once) is merged first, as SGLang's
ConfigArgumentMerger does: each key is a flag (`api-key: sk`), `true` adds a switch, a list gives its items, and the
command line wins. Used: `--model-path`/`--model`, `--served-model-name` (default: the model
path), `--host` (127.0.0.1), `--port` (30000), `--api-key`, `--admin-api-key`, `--lora-paths` (`NAME=PATH`, `PATH`
or SGLang's JSON form), `--context-length` (2048), `--enable-metrics` (without it `/metrics` is 404, as in SGLang;
the project's command builder always adds it), `--enable-memory-saver`, `--enable-weights-cpu-backup` and
`--mem-fraction-static` (see "Memory" below).

What it serves (docs/sglang.md, "HTTP routes"):
    GET  /health, /health_generate, /ready   503 until ready, then 200. Always open (no key needed), like /metrics.
    GET  /v1/models                          the served model plus one card per LoRA adapter.
    POST /v1/chat/completions, /v1/completions
         OpenAI-shaped; `model` may be the served name, `<served>:<adapter>` (or any `x:<adapter>`; the body field
         `lora_path` works too); an unknown adapter is a 400 with SGLang's message; an unknown plain model name is
         served by the base model, as SGLang does. `max_tokens` (or `max_completion_tokens`) tokens, default 16.
         Streaming: one SSE chunk per token (the first also carries the role), a finish chunk
         (`finish_reason: "length"`), a usage chunk when `stream_options.include_usage`, then `data: [DONE]`.
    POST /generate                           native: `text`, `sampling_params.max_new_tokens` (default 128, SGLang's),
         `lora_path`, `stream`; streamed chunks carry the cumulative text, as SGLang's do.
    GET  /metrics                            Prometheus text: sglang:prompt_tokens_total, generation_tokens_total,
         num_requests_total (labels engine_type, is_streaming, model_name); the gauges num_running_reqs (requests
         producing tokens) and num_queue_reqs (requests waiting while the engine resumes or reloads weights), and
         the static memory gauges weight_memory_usage_gb, kv_cache_memory_usage_gb and graph_memory_usage_gb (extra
         label phase="decode"), emitted once the memory is allocated at startup and not changed by release/resume
         (labels engine_type, model_name, moe_ep_rank, pp_rank, tp_rank); time_to_first_token_seconds and
         e2e_request_latency_seconds histograms.
    GET  /model_info, /server_info (and the deprecated /get_* aliases), GET|POST /flush_cache, GET /ping.
    GET|POST /release_memory_occupation      `{"tags": null | ["weights", "kv_cache", "cuda_graph"]}` (null or [] =
         all three); 200 with an empty body. See "Memory".
    GET|POST /resume_memory_occupation       same body; 200 with an empty body.
    POST /update_weights_from_disk           `{"model_path": str, ...}` -> `{"success", "message",
         "num_paused_requests": 0}`, 200, or 400 while the weights are released; a missing model_path is a 422.
Output is deterministic: token i is the word WORDS[(offset + i) % len(WORDS)] (with a leading space after the first),
where offset is 0 for the base model and crc32(adapter name) % len(WORDS) for an adapter, so adapter output differs.
Prompt tokens are counted as whitespace-separated words (token ids count one each). Auth mirrors SGLang: with
`--api-key` every other route needs `Authorization: Bearer <key>`, else 401 `{"error":"Unauthorized"}`. The
ADMIN_OPTIONAL routes (/flush_cache, release/resume_memory_occupation, update_weights_from_disk) need the
`--admin-api-key` when one is set (the `--api-key` is then refused), else the `--api-key` if set, else are open.

Memory (SGLang's memory saver; docs/sglang.md, "Memory saver and weights"):
    Each server has three GPU allocations, in GiB: weights (FAKE_SGLANG_WEIGHTS_GIB), kv_cache and cuda_graph.
    release_memory_occupation first checks, like SGLang's scheduler, that the server is idle: if any inference
    request is in progress (queued, or a response not yet complete, streamed or not) it logs
    `AssertionError: release_memory_occupation should be called only when server is idle.` and
    `Scheduler hit an exception`, and the process exits 1 at once (the whole server is torn down). Without
    `--enable-memory-saver` release and resume change nothing (SGLang's no-op adapter) and still answer 200. With
    it, the tags are released; inference then answers 500 `memory is released: call /resume_memory_occupation
    first` until they are resumed. Releasing the weights without `--enable-weights-cpu-backup` loses them: after the
    resume, inference answers 500 `weights were released without a CPU backup and not reloaded` until a successful
    update_weights_from_disk. Resume and update_weights_from_disk keep the engine busy: inference requests that
    arrive meanwhile wait (counted by sglang:num_queue_reqs) and then run; update_weights_from_disk also first waits
    for the requests in progress to finish (SGLang's model-update writer lock). Control requests run one at a
    time and finish even if their client goes away. /health stays 200 throughout.
    With FAKE_SGLANG_DEVICE_LEDGER, allocations are booked in a ledger shared by every fake on the same emulated
    device (format: tests/fakes/ledger.py): after the startup delay, before ready, all three are allocated; if they
    do not fit, the server logs `torch.OutOfMemoryError: CUDA out of memory. Tried to allocate ...` as its last
    line and exits 1. A release frees the tags' memory, a resume books it again (if that does not fit: the OOM
    line, `Scheduler hit an exception`, exit 1), and the server's entry is freed when it exits (SIGTERM, or any of
    the exit-1 faults above); the entry of a process killed outright (SIGKILL) is reclaimed by the next update of
    the ledger, as a driver reclaims a dead process's memory.

Faults and pacing, read from the environment at startup:
    FAKE_SGLANG_STARTUP_SECONDS=0.2   seconds from start to ready (then it logs the readiness line
                                      `The server is fired up and ready to roll!`).
    FAKE_SGLANG_TOKEN_DELAY_SECONDS=0 seconds between tokens (streamed or not).
    FAKE_SGLANG_CRASH_AT_STARTUP=msg  after the startup delay, log `msg` as the last line and exit 1, never ready.
    FAKE_SGLANG_CRASH_AFTER_TOKENS=N  once a response has produced N tokens, the process dies at once
                                      (`os._exit(1)`), cutting the stream (no finish chunk, no [DONE]). Applies to
                                      non-streamed requests that ask for at least N tokens too.
    FAKE_SGLANG_CRASH_ONCE=path       the crash above happens once for every server started with this path: the
                                      first to crash creates the file, and none crashes while it exists (a
                                      restarted engine serves).
    FAKE_SGLANG_HANG_AFTER_TOKENS=N   once a response has produced N tokens it produces nothing more, forever;
                                      the server stays up and /health keeps answering 200.
    FAKE_SGLANG_STATUS=CODE           every inference route answers CODE with SGLang's error body
                                      `{"object":"error","message":...,"type":...,"param":null,"code":CODE}`.
    FAKE_SGLANG_HTTP_LOG=path         append `{"method","path","headers":[names]}` for every request received (any
                                      route, before the auth check).
    FAKE_SGLANG_REQUEST_LOG=path      append one JSON line per inference request received (before the auth check):
                                      `{"event":"request","path":...,"model":...,"stream":...,"authorized":...}`
                                      (and the body's priority, max_tokens, stream_options and messages where it
                                      has them),
                                      and `{"event":"disconnect","path":...,"model":...,"stream":...,"tokens_sent":N}`
                                      when a client goes away before its response is complete; and one per
                                      authorised memory call: `{"event":"release"|"resume","model":<served
                                      name>,"tags":[...],"model_path":null}` (tags normalised: null or [] is all
                                      three) or `{"event":"update_weights","model":...,"tags":null,
                                      "model_path":...}`.
    FAKE_SGLANG_DEVICE_LEDGER=path    the JSON ledger of the emulated device's memory, shared by every fake on it;
                                      each read-modify-write holds `fcntl.flock` on `<path>.lock`. Unset: no
                                      allocation is booked anywhere (and nothing can run out of memory).
    FAKE_SGLANG_DEVICE_GIB=80         the device's capacity; the first fake to create the ledger sets it (later
                                      ones use the ledger's). Must be > 0.
    FAKE_SGLANG_WEIGHTS_GIB=1.0       the model weights' size.
    FAKE_SGLANG_KV_GIB=1.0            the KV cache pool's size; with `--mem-fraction-static F` it is instead
                                      max(0, F * capacity - weights - cuda_graph), as SGLang sizes its pool.
    FAKE_SGLANG_GRAPH_GIB=0.0         the captured CUDA graphs' size.
    FAKE_SGLANG_RESUME_SECONDS=0      how long resume_memory_occupation takes (a slow wake-up).
    FAKE_SGLANG_RELOAD_SECONDS=0      how long update_weights_from_disk takes.
    FAKE_SGLANG_TEARDOWN_SECONDS=5    how long the launcher lives on after its scheduler process died.
A bad value in one of these is reported on stderr, exit 2.

Processes: like SGLang's launcher, the server starts a scheduler process (named `sglang::scheduler`, killed with the
launcher) and watches it once a second; when it dies the launcher logs SGLang's lines (`Subprocess scheduler_0
(pid=N) crashed with exit code -9. Triggering SIGQUIT for cleanup...`, `Sleeping 5 seconds before crash
diagnostics...`), keeps serving what it can for FAKE_SGLANG_TEARDOWN_SECONDS (5), then kills itself (SIGKILL, as
SGLang's kill_process_tree does).

Logs go to stdout, one flushed line each. SIGTERM (or SIGINT) logs a line and exits 0 within about a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hmac
import json
import logging
import os
import signal
import sys
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, NoReturn

if __package__ in (None, ""):  # run as a file: make the repository root importable for `app`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import yaml  # noqa: E402
from aiohttp import web  # noqa: E402

from app.config.flags import FlagTable, FlagValueError  # noqa: E402
from tests.fakes.ledger import TAGS, DeviceLedger, LedgerError, OutOfMemory  # noqa: E402

logger = logging.getLogger("fake_sglang")

SGLANG_VERSION = "0.5.23"
READY_LINE = "The server is fired up and ready to roll!"
PROG = "sglang serve"
USAGE = f"usage: {PROG} [-h] --model-path MODEL_PATH [--host HOST] [--port PORT] [...]"
WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "and", "runs", "away")
DEFAULT_MAX_TOKENS = 16  # OpenAI routes
DEFAULT_MAX_NEW_TOKENS = 128  # native /generate: SGLang's SamplingParams default
DEFAULT_CONTEXT_LENGTH = 2048
ENGINE_TYPE = "unified"
TTFT_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 20.0, 40.0, 60.0, 80.0, 100.0, 200.0, 400.0)
E2E_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 20.0, 40.0, 60.0, 80.0, 100.0, 200.0, 400.0,
               600.0, 1200.0, 1800.0, 2400.0)
OPEN_PREFIXES = ("/health", "/ready", "/metrics")
RELEASE_PATH = "/release_memory_occupation"
RESUME_PATH = "/resume_memory_occupation"
RELOAD_PATH = "/update_weights_from_disk"
ADMIN_PATHS = frozenset({"/flush_cache", RELEASE_PATH, RESUME_PATH, RELOAD_PATH})  # SGLang's ADMIN_OPTIONAL
INFERENCE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/generate"})
SHUTDOWN_GRACE_SECONDS = 1.0
DEFAULT_DEVICE_GIB = 80.0
GRAPH_PHASE = "decode"
IDLE_ASSERTION = "AssertionError: release_memory_occupation should be called only when server is idle."
SCHEDULER_CRASH = "Scheduler hit an exception"
RELEASED_MESSAGE = "memory is released: call /resume_memory_occupation first"
WEIGHTS_LOST_MESSAGE = "weights were released without a CPU backup and not reloaded"
RELOADED_MESSAGE = "Succeeded to update model weights."
INJECTED_ERROR = ("1 validation error:\n  {{'type': 'value_error', 'loc': ('body', 'messages'), 'msg': 'Fault injected "
                  "by FAKE_SGLANG_STATUS={status}', 'input': 3}}\n\n  File \"{file}\", line 1870, in "
                  "openai_v1_chat_completions\n    POST {path} [{{'type': 'value_error', 'loc': ('body', 'messages'), "
                  "'msg': 'Fault injected by FAKE_SGLANG_STATUS={status}', 'input': 3}}]")


class UsageError(Exception):
    """A command line or environment SGLang (or this fake) would refuse; exit 2."""


class ApiError(Exception):
    """An error answered as SGLang's OpenAI-style error body."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# ----- configuration: the command line and the fault environment -----


@dataclass(frozen=True)
class ServerConfig:
    """The SGLang arguments the fake acts on."""

    model_path: str
    served_model_name: str
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = field(default=None, repr=False)
    admin_api_key: str | None = field(default=None, repr=False)
    adapters: Mapping[str, str] = field(default_factory=dict)  # name -> path, in command-line order
    context_length: int = DEFAULT_CONTEXT_LENGTH
    enable_metrics: bool = False
    enable_memory_saver: bool = False
    enable_weights_cpu_backup: bool = False
    mem_fraction_static: float | None = None
    log_level_http: str | None = None  # uvicorn's level: at warning and above, no access lines
    access_log_exclude_prefixes: tuple[str, ...] = ()  # no access line for a path starting with one of these
    argv: tuple[str, ...] = ()


def parse_lora_item(item: str) -> tuple[str, str]:
    """One `--lora-paths` item as SGLang's LoRAPathAction reads it: `PATH`, `NAME=PATH` or a JSON object."""
    text = item.strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"argument --lora-paths: invalid JSON {item!r} ({exc.msg})") from None
        if not isinstance(data, dict) or not isinstance(data.get("lora_name"), str) or not isinstance(
            data.get("lora_path"), str
        ):
            raise UsageError(f"argument --lora-paths: {item!r} needs string fields lora_name and lora_path")
        return data["lora_name"], data["lora_path"]
    if "=" in text:
        name, _, path = text.partition("=")
        return name, path
    return text, text


def merge_config_file(argv: Sequence[str]) -> list[str]:
    """SGLang's `--config FILE.yaml`: the file's flags first, then the command line (which wins)."""
    args = list(argv)
    at = [i for i, a in enumerate(args) if a == "--config"]
    if not at:
        return args
    if len(at) > 1:
        raise UsageError("Multiple config files specified! Only one allowed.")
    if at[0] == len(args) - 1:
        raise UsageError("No config file specified after --config flag!")
    path = Path(args[at[0] + 1])
    if path.suffix not in (".yaml", ".yml"):
        raise UsageError(f"Config file must be YAML format with .yaml or .yml extension: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(f"cannot read the config file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError("Config file must contain a dictionary at root level")
    merged: list[str] = []
    for key, value in data.items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            merged.append(flag)
        elif isinstance(value, list):
            merged += [flag, *map(str, value)]
        elif value is not False and value is not None:
            merged += [flag, str(value)]
    return merged + args[:at[0]] + args[at[0] + 2:]


def parse_cli(argv: Sequence[str]) -> ServerConfig:
    """Parse SGLang's command line with the project's argument table; raise UsageError like argparse would."""
    argv = merge_config_file(argv)
    parsed, problems = FlagTable.load().parse_argv(list(argv))
    values: dict[str, Any] = {}
    for spec, option, raw in parsed:
        try:
            if spec.kind == "switch":
                value: Any = True
            elif spec.kind == "negatable":
                value = not option.startswith("--no-")
            elif spec.kind == "list":
                value = spec.coerce(raw)
            elif spec.kind == "optional" and not raw:
                value = spec.default
            else:
                value = spec.coerce(raw[0])
        except FlagValueError as exc:
            problems.append(f"argument {option}: invalid value {' '.join(raw)!r}: {exc}")
            continue
        values[spec.dest] = value
    if problems:
        raise UsageError("; ".join(problems))
    if not values.get("model_path"):
        raise UsageError("the following arguments are required: --model-path/--model")
    adapters: dict[str, str] = {}
    for item in values.get("lora_paths") or []:
        name, path = parse_lora_item(str(item))
        adapters[name] = path
    model_path = values["model_path"]
    return ServerConfig(
        model_path=model_path,
        served_model_name=values.get("served_model_name") or model_path,
        host=values.get("host") or "127.0.0.1",
        port=values.get("port") if values.get("port") is not None else 30000,
        api_key=values.get("api_key"),
        admin_api_key=values.get("admin_api_key"),
        adapters=adapters,
        context_length=values.get("context_length") or DEFAULT_CONTEXT_LENGTH,
        enable_metrics=bool(values.get("enable_metrics")),
        enable_memory_saver=bool(values.get("enable_memory_saver")),
        enable_weights_cpu_backup=bool(values.get("enable_weights_cpu_backup")),
        mem_fraction_static=values.get("mem_fraction_static"),
        log_level_http=values.get("log_level_http") or values.get("log_level"),
        access_log_exclude_prefixes=tuple(values.get("uvicorn_access_log_exclude_prefixes") or ()),
        argv=tuple(argv),
    )


@dataclass(frozen=True)
class Faults:
    """Pacing and fault injection, from FAKE_SGLANG_* environment variables."""

    startup_seconds: float = 0.2
    token_delay_seconds: float = 0.0
    crash_at_startup: str | None = None
    crash_after_tokens: int | None = None
    crash_once: Path | None = None
    hang_after_tokens: int | None = None
    status: int | None = None
    request_log: Path | None = None
    http_log: Path | None = None
    device_ledger: Path | None = None
    device_gib: float | None = None  # None: the ledger's capacity, or DEFAULT_DEVICE_GIB when creating it
    weights_gib: float = 1.0
    kv_gib: float = 1.0
    graph_gib: float = 0.0
    resume_seconds: float = 0.0
    reload_seconds: float = 0.0
    teardown_seconds: float = 5.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Faults:
        def number(name: str, default: float) -> float:
            text = env.get(name, "").strip()
            if not text:
                return default
            try:
                result = float(text)
            except ValueError:
                raise UsageError(f"{name}={text!r}: not a number") from None
            if not result >= 0 or result == float("inf"):
                raise UsageError(f"{name}={text!r}: must be a finite number >= 0")
            return result

        def count(name: str) -> int | None:
            text = env.get(name, "").strip()
            if not text:
                return None
            if not text.isdigit():
                raise UsageError(f"{name}={text!r}: must be a whole number >= 0")
            return int(text)

        status = count("FAKE_SGLANG_STATUS")
        if status is not None and not 100 <= status <= 599:
            raise UsageError(f"FAKE_SGLANG_STATUS={status}: not an HTTP status")
        log_path = env.get("FAKE_SGLANG_REQUEST_LOG", "").strip()
        ledger_path = env.get("FAKE_SGLANG_DEVICE_LEDGER", "").strip()
        device_gib: float | None = None
        if env.get("FAKE_SGLANG_DEVICE_GIB", "").strip():
            device_gib = number("FAKE_SGLANG_DEVICE_GIB", DEFAULT_DEVICE_GIB)
            if device_gib <= 0:
                raise UsageError(f"FAKE_SGLANG_DEVICE_GIB={device_gib}: must be > 0")
        return cls(
            startup_seconds=number("FAKE_SGLANG_STARTUP_SECONDS", 0.2),
            token_delay_seconds=number("FAKE_SGLANG_TOKEN_DELAY_SECONDS", 0.0),
            crash_at_startup=env.get("FAKE_SGLANG_CRASH_AT_STARTUP") or None,
            crash_after_tokens=count("FAKE_SGLANG_CRASH_AFTER_TOKENS"),
            crash_once=Path(env["FAKE_SGLANG_CRASH_ONCE"]) if env.get("FAKE_SGLANG_CRASH_ONCE", "").strip() else None,
            hang_after_tokens=count("FAKE_SGLANG_HANG_AFTER_TOKENS"),
            status=status,
            request_log=Path(log_path) if log_path else None,
            http_log=Path(env["FAKE_SGLANG_HTTP_LOG"]) if env.get("FAKE_SGLANG_HTTP_LOG", "").strip() else None,
            device_ledger=Path(ledger_path) if ledger_path else None,
            device_gib=device_gib,
            weights_gib=number("FAKE_SGLANG_WEIGHTS_GIB", 1.0),
            kv_gib=number("FAKE_SGLANG_KV_GIB", 1.0),
            graph_gib=number("FAKE_SGLANG_GRAPH_GIB", 0.0),
            resume_seconds=number("FAKE_SGLANG_RESUME_SECONDS", 0.0),
            reload_seconds=number("FAKE_SGLANG_RELOAD_SECONDS", 0.0),
            teardown_seconds=number("FAKE_SGLANG_TEARDOWN_SECONDS", 5.0),
        )

    def describe(self) -> str:
        active = {k: v for k, v in vars(self).items() if v not in (None, 0.0) or k == "startup_seconds"}
        if "crash_at_startup" in active:  # the message itself is kept for the last line, where it belongs
            active["crash_at_startup"] = "set"
        return ", ".join(f"{k}={v}" for k, v in active.items())


def memory_sizes(config: ServerConfig, faults: Faults, capacity_gib: float) -> dict[str, float]:
    """GiB per SGLang memory tag. With --mem-fraction-static the KV pool gets what the fraction leaves, as in SGLang."""
    weights, graph = faults.weights_gib, faults.graph_gib
    kv = faults.kv_gib
    if config.mem_fraction_static is not None:
        kv = max(0.0, config.mem_fraction_static * capacity_gib - weights - graph)
    return {"weights": weights, "kv_cache": round(kv, 6), "cuda_graph": graph}


def normalise_tags(body: Any) -> list[str]:
    """The tags of a release/resume body, as SGLang reads them: null or [] is all three, unknown names are ignored."""
    tags = body.get("tags") if isinstance(body, dict) else None
    if tags is None or tags == []:
        return list(TAGS)
    if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
        raise ApiError(422, "tags must be null or a list of strings")
    return [tag for tag in TAGS if tag in tags]


# ----- Prometheus metrics, written by hand in the text exposition format -----


def _format_value(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    return repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: Sequence[tuple[str, str]]) -> str:
    return "{" + ",".join(f'{key}="{_escape(value)}"' for key, value in pairs) + "}"


class Histogram:
    """One Prometheus histogram family, keyed by label values."""

    def __init__(self, buckets: Sequence[float]):
        self.buckets = tuple(buckets) + (float("inf"),)
        self.series: dict[tuple[tuple[str, str], ...], tuple[list[int], list[float]]] = {}

    def observe(self, labels: tuple[tuple[str, str], ...], value: float) -> None:
        counts, total = self.series.setdefault(labels, ([0] * len(self.buckets), [0.0]))
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                counts[i] += 1
                break
        total[0] += value

    def render(self, name: str) -> list[str]:
        lines: list[str] = []
        for labels, (counts, total) in self.series.items():
            cumulative = 0
            for bound, n in zip(self.buckets, counts, strict=True):
                cumulative += n
                lines.append(f"{name}_bucket{_labels((*labels, ('le', _format_value(bound))))} {float(cumulative)}")
            lines.append(f"{name}_sum{_labels(labels)} {_format_value(total[0])}")
            lines.append(f"{name}_count{_labels(labels)} {float(cumulative)}")
        return lines


class Metrics:
    """The few SGLang metric families the project reads, with SGLang's names, labels and help text."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.prompt_tokens: dict[bool, float] = {False: 0.0, True: 0.0}
        self.generation_tokens: dict[bool, float] = {False: 0.0, True: 0.0}
        self.requests: dict[bool, float] = {False: 0.0, True: 0.0}
        self.running = 0
        self.queued = 0
        self.memory: dict[str, float] | None = None  # GiB per tag, once allocated at startup
        self.ttft = Histogram(TTFT_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)

    def request_labels(self, streaming: bool) -> tuple[tuple[str, str], ...]:
        return (
            ("engine_type", ENGINE_TYPE),
            ("is_streaming", "true" if streaming else "false"),
            ("model_name", self.model_name),
        )

    def render(self) -> str:
        lines: list[str] = []

        def counter(name: str, help_text: str, values: dict[bool, float]) -> None:
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} counter"])
            for streaming in (False, True):
                lines.append(f"{name}{_labels(self.request_labels(streaming))} {_format_value(values[streaming])}")

        counter("sglang:prompt_tokens_total", "Number of prefill tokens processed.", self.prompt_tokens)
        counter("sglang:generation_tokens_total", "Number of generation tokens processed.", self.generation_tokens)
        counter("sglang:num_requests_total", "Number of requests processed.", self.requests)
        scheduler_labels = (("engine_type", ENGINE_TYPE), ("model_name", self.model_name), ("moe_ep_rank", "0"),
                            ("pp_rank", "0"), ("tp_rank", "0"))

        def gauge(name: str, help_text: str, value: float, labels: tuple[tuple[str, str], ...]) -> None:
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} gauge",
                          f"{name}{_labels(labels)} {_format_value(value)}"])

        gauge("sglang:num_running_reqs", "The number of running requests.", self.running, scheduler_labels)
        gauge("sglang:num_queue_reqs", "The number of requests in the waiting queue.", self.queued, scheduler_labels)
        if self.memory is not None:
            gauge("sglang:weight_memory_usage_gb", "Memory used by model weights in GB.", self.memory["weights"],
                  scheduler_labels)
            gauge("sglang:kv_cache_memory_usage_gb", "Memory used by the KV cache pools in GB.",
                  self.memory["kv_cache"], scheduler_labels)
            gauge("sglang:graph_memory_usage_gb", "Memory used by captured device graphs in GB.",
                  self.memory["cuda_graph"], (*scheduler_labels, ("phase", GRAPH_PHASE)))
        for family, help_text, histogram in (
            ("sglang:time_to_first_token_seconds", "Histogram of time to first token in seconds.", self.ttft),
            ("sglang:e2e_request_latency_seconds", "Histogram of End-to-end request latency in seconds", self.e2e),
        ):
            lines.extend([f"# HELP {family} {help_text}", f"# TYPE {family} histogram", *histogram.render(family)])
        return "\n".join(lines) + "\n"


# ----- requests -----


@dataclass
class Job:
    """One inference request, validated."""

    path: str
    model: str
    adapter: str | None
    prompt_tokens: int
    max_tokens: int
    stream: bool
    include_usage: bool = False
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def offset(self) -> int:
        return zlib.crc32(self.adapter.encode()) % len(WORDS) if self.adapter else 0

    def usage(self, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }


def token_text(offset: int, index: int) -> str:
    word = WORDS[(offset + index) % len(WORDS)]
    return word if index == 0 else " " + word


def count_words(value: Any) -> int:
    """Prompt tokens: words of text, one per token id, summed over lists and message parts."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return 1
    if isinstance(value, list):
        return sum(count_words(item) for item in value)
    if isinstance(value, dict):  # a content part {"type": "text", "text": ...}
        return count_words(value.get("text"))
    return 0


def _error_type(status: int) -> str:
    try:
        phrase = HTTPStatus(status).phrase.replace(" ", "").replace("-", "")
    except ValueError:
        return "Error"
    return phrase if phrase.endswith("Error") else phrase + "Error"


def error_response(status: int, message: str) -> web.Response:
    body = {"object": "error", "message": message, "type": _error_type(status), "param": None, "code": status}
    return web.json_response(body, status=status)


def _sse(payload: Mapping[str, Any]) -> bytes:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


class Format:
    """How one route shapes its responses; subclasses per route."""

    def full(self, job: Job, text: str, n: int) -> dict[str, Any]:
        raise NotImplementedError

    def chunk(self, job: Job, token: str, index: int, text_so_far: str) -> dict[str, Any]:
        raise NotImplementedError

    def tail(self, job: Job, n: int, text: str) -> list[dict[str, Any]]:
        raise NotImplementedError


class ChatFormat(Format):
    def full(self, job: Job, text: str, n: int) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-{job.request_id}", "object": "chat.completion", "created": job.created,
            "model": job.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": "length"}],
            "usage": job.usage(n),
        }

    def _chunk(self, job: Job, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-{job.request_id}", "object": "chat.completion.chunk", "created": job.created,
            "model": job.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }

    def chunk(self, job: Job, token: str, index: int, text_so_far: str) -> dict[str, Any]:
        delta = {"role": "assistant", "content": token} if index == 0 else {"content": token}
        return self._chunk(job, delta, None)

    def tail(self, job: Job, n: int, text: str) -> list[dict[str, Any]]:
        events = [self._chunk(job, {"role": "assistant", "content": ""} if n == 0 else {}, "length")]
        if job.include_usage:
            events.append({"id": f"chatcmpl-{job.request_id}", "object": "chat.completion.chunk",
                           "created": job.created, "model": job.model, "choices": [], "usage": job.usage(n)})
        return events


class CompletionFormat(Format):
    def _base(self, job: Job, text: str, finish: str | None) -> dict[str, Any]:
        return {
            "id": f"cmpl-{job.request_id}", "object": "text_completion", "created": job.created, "model": job.model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
        }

    def full(self, job: Job, text: str, n: int) -> dict[str, Any]:
        return {**self._base(job, text, "length"), "usage": job.usage(n)}

    def chunk(self, job: Job, token: str, index: int, text_so_far: str) -> dict[str, Any]:
        return self._base(job, token, None)

    def tail(self, job: Job, n: int, text: str) -> list[dict[str, Any]]:
        events = [self._base(job, "", "length")]
        if job.include_usage:
            events.append({"id": f"cmpl-{job.request_id}", "object": "text_completion", "created": job.created,
                           "model": job.model, "choices": [], "usage": job.usage(n)})
        return events


class GenerateFormat(Format):
    def _meta(self, job: Job, n: int, finished: bool) -> dict[str, Any]:
        return {
            "id": job.request_id,
            "finish_reason": {"type": "length", "length": n} if finished else None,
            "prompt_tokens": job.prompt_tokens,
            "completion_tokens": n,
            "cached_tokens": 0,
        }

    def full(self, job: Job, text: str, n: int) -> dict[str, Any]:
        return {"text": text, "meta_info": self._meta(job, n, True)}

    def chunk(self, job: Job, token: str, index: int, text_so_far: str) -> dict[str, Any]:
        return {"text": text_so_far, "meta_info": self._meta(job, index + 1, False)}

    def tail(self, job: Job, n: int, text: str) -> list[dict[str, Any]]:
        return [{"text": text, "meta_info": self._meta(job, n, True)}]


# ----- the server -----


class FakeSGLangServer:
    """The routes and state of one fake server."""

    def __init__(self, config: ServerConfig, faults: Faults):
        self.config = config
        self.faults = faults
        self.ready = False
        self.shutting_down = False
        self.started_at = time.time()
        self.metrics = Metrics(config.served_model_name)
        # memory saver state
        self.ledger: DeviceLedger | None = None
        if faults.device_ledger is not None:
            self.ledger = DeviceLedger(faults.device_ledger, config.port, faults.device_gib or DEFAULT_DEVICE_GIB)
        self.sizes: dict[str, float] = {}  # GiB per tag, set at startup
        self.allocated = False  # booked in the ledger (so to be freed on exit)
        self.released: set[str] = set()  # tags released by the memory saver
        self.weights_lost = False  # weights released without a CPU backup, and not reloaded since
        # the scheduler: one control request at a time; inference waits while one keeps the engine busy
        self.control_lock = asyncio.Lock()
        self.engine_free = asyncio.Event()
        self.engine_free.set()
        self.pending = 0  # inference requests received and not yet answered (waiting or running)
        self.admitted = 0  # of those, the ones past the wait
        self.drained = asyncio.Event()
        self.drained.set()
        self.control_tasks: set[asyncio.Task[Any]] = set()

    # --- app and middleware ---

    def build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_get("/health", self.health)
        app.router.add_get("/health_generate", self.health)
        app.router.add_get("/ready", self.health)
        app.router.add_get("/ping", self.health)
        app.router.add_get("/metrics", self.metrics_route)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/model_info", self.model_info)
        app.router.add_get("/get_model_info", self.model_info)
        app.router.add_get("/server_info", self.server_info)
        app.router.add_get("/get_server_info", self.server_info)
        app.router.add_route("GET", "/flush_cache", self.flush_cache)
        app.router.add_route("POST", "/flush_cache", self.flush_cache)
        for method in ("GET", "POST"):
            app.router.add_route(method, RELEASE_PATH, self.release_memory_occupation)
            app.router.add_route(method, RESUME_PATH, self.resume_memory_occupation)
        app.router.add_post(RELOAD_PATH, self.update_weights_from_disk)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/generate", self.generate)
        app.router.add_put("/generate", self.generate)
        return app

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        authorized = self._authorized(request)
        if self.faults.http_log is not None:
            with self.faults.http_log.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps({"method": request.method, "path": request.path_qs,
                                     "headers": sorted({name.lower() for name in request.headers})}) + "\n")
        if request.path in INFERENCE_PATHS and request.method in ("POST", "PUT"):
            await self._log_request(request, authorized)
        if not authorized:
            return web.json_response({"error": "Unauthorized"}, status=401)
        try:
            return await handler(request)
        except web.HTTPNotFound:
            return web.json_response({"detail": "Not Found"}, status=404)
        except web.HTTPMethodNotAllowed:
            return web.json_response({"detail": "Method Not Allowed"}, status=405)

    def _authorized(self, request: web.Request) -> bool:
        if request.method == "OPTIONS" or request.path.startswith(OPEN_PREFIXES):
            return True
        key = self.config.api_key
        if request.path in ADMIN_PATHS and self.config.admin_api_key:
            key = self.config.admin_api_key
        if not key:
            return True
        given = request.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {key}".encode())

    def _append_log(self, record: Mapping[str, Any]) -> None:
        if self.faults.request_log is None:
            return
        with self.faults.request_log.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    async def _log_request(self, request: web.Request, authorized: bool) -> None:
        body = await _json_body(request)
        model = body.get("model") if isinstance(body, dict) else None
        stream = bool(body.get("stream")) if isinstance(body, dict) else False
        sent = {name: body.get(name) for name in ("priority", "max_tokens", "stream_options", "messages")
                if isinstance(body, dict) and name in body}
        self._append_log({"event": "request", "path": request.path, "model": model, "stream": stream,
                          "authorized": authorized, **sent})

    def _client_gone(self, job: Job, tokens_sent: int) -> None:
        if self.shutting_down:
            return
        logger.info("Client disconnected from %s after %d tokens (rid=%s); aborting the request",
                    job.path, tokens_sent, job.request_id)
        self._append_log({"event": "disconnect", "path": job.path, "model": job.model, "stream": job.stream,
                          "tokens_sent": tokens_sent})

    # --- open routes ---

    async def health(self, request: web.Request) -> web.Response:
        if not self.ready or self.shutting_down:
            return web.Response(status=503)
        return web.Response(status=200)

    async def metrics_route(self, request: web.Request) -> web.Response:
        if not self.config.enable_metrics:
            return web.json_response({"detail": "Not Found"}, status=404)
        return web.Response(text=self.metrics.render(), content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    # --- info routes ---

    async def models(self, request: web.Request) -> web.Response:
        served = self.config.served_model_name
        data: list[dict[str, Any]] = [{
            "id": served, "object": "model", "created": int(self.started_at), "owned_by": "sglang",
            "root": self.config.model_path, "parent": None, "max_model_len": self.config.context_length,
        }]
        for name, path in self.config.adapters.items():
            data.append({"id": name, "object": "model", "created": int(self.started_at), "owned_by": "sglang",
                         "root": path, "parent": served, "max_model_len": None})
        return web.json_response({"object": "list", "data": data})

    async def model_info(self, request: web.Request) -> web.Response:
        return web.json_response({
            "model_path": self.config.model_path, "tokenizer_path": self.config.model_path,
            "served_model_name": self.config.served_model_name, "is_generation": True,
            "preferred_sampling_params": None, "weight_version": "default", "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
        })

    async def server_info(self, request: web.Request) -> web.Response:
        config = self.config
        return web.json_response({
            "model_path": config.model_path, "tokenizer_path": config.model_path,
            "served_model_name": config.served_model_name, "host": config.host, "port": config.port,
            "api_key": config.api_key,  # SGLang returns it in plain text to an authorised caller (A2)
            "enable_lora": bool(config.adapters) or None,
            "lora_paths": [{"lora_name": n, "lora_path": p, "pinned": False} for n, p in config.adapters.items()],
            "context_length": config.context_length, "enable_metrics": config.enable_metrics,
            "enable_memory_saver": config.enable_memory_saver,
            "enable_weights_cpu_backup": config.enable_weights_cpu_backup,
            "mem_fraction_static": config.mem_fraction_static,
            "version": SGLANG_VERSION, "internal_states": [{}], "startup_time": self.started_at,
            "launch_command": " ".join(["sglang", "serve", *config.argv]),
        })

    async def flush_cache(self, request: web.Request) -> web.Response:
        return web.Response(text="Cache flushed.\nPlease check backend logs for more details. (When there are "
                                 "running or waiting requests, the operation will not be performed.)\n")

    # --- memory saver routes ---

    async def release_memory_occupation(self, request: web.Request) -> web.Response:
        try:
            tags = normalise_tags(await _json_body(request))
        except ApiError as exc:
            return web.json_response({"detail": exc.message}, status=exc.status)
        self._admin_log("release", tags, None)
        return await self._control(self._release(tags))

    async def resume_memory_occupation(self, request: web.Request) -> web.Response:
        try:
            tags = normalise_tags(await _json_body(request))
        except ApiError as exc:
            return web.json_response({"detail": exc.message}, status=exc.status)
        self._admin_log("resume", tags, None)
        return await self._control(self._resume(tags))

    async def update_weights_from_disk(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("model_path"), str):
            return web.json_response({"detail": [{"type": "missing", "loc": ["body", "model_path"],
                                                  "msg": "Field required"}]}, status=422)
        model_path = body["model_path"]
        self._admin_log("update_weights", None, model_path)
        return await self._control(self._reload(model_path))

    def _admin_log(self, event: str, tags: list[str] | None, model_path: str | None) -> None:
        self._append_log({"event": event, "model": self.config.served_model_name, "tags": tags,
                          "model_path": model_path})

    async def _control(self, work: Coroutine[Any, Any, web.Response]) -> web.Response:
        """Run a control request to its end even if the client goes away: the scheduler does not watch the client."""
        task = asyncio.ensure_future(work)
        self.control_tasks.add(task)
        task.add_done_callback(self.control_tasks.discard)
        return await asyncio.shield(task)

    async def _release(self, tags: list[str]) -> web.Response:
        async with self.control_lock:
            logger.info("Release memory occupation: tags=%s", tags)
            if self.pending:  # SGLang's scheduler asserts is_fully_idle(); a failed assertion kills the server
                logger.error("release_memory_occupation with %d inference request(s) in progress", self.pending)
                self._die(IDLE_ASSERTION, SCHEDULER_CRASH)
            if not self.config.enable_memory_saver:
                logger.info("Memory saver disabled (no --enable-memory-saver): nothing released")
                return web.Response()
            fresh = [tag for tag in tags if tag not in self.released]
            self.released.update(fresh)
            if "weights" in fresh and not self.config.enable_weights_cpu_backup:
                self.weights_lost = True
            if self.ledger is not None and self.allocated and fresh:
                self.ledger.release(fresh)
            logger.info("Released %s: %.2f GiB freed%s", fresh or "nothing new",
                        sum(self.sizes.get(tag, 0.0) for tag in fresh),
                        "; weights discarded (no --enable-weights-cpu-backup)" if "weights" in fresh
                        and not self.config.enable_weights_cpu_backup else "")
            return web.Response()

    async def _resume(self, tags: list[str]) -> web.Response:
        async with self.control_lock, self._engine_busy(drain=False):
            logger.info("Resume memory occupation: tags=%s", tags)
            if self.faults.resume_seconds:
                await asyncio.sleep(self.faults.resume_seconds)
            if not self.config.enable_memory_saver:
                logger.info("Memory saver disabled (no --enable-memory-saver): nothing to resume")
                return web.Response()
            back = [tag for tag in TAGS if tag in tags and tag in self.released]
            if self.ledger is not None and self.allocated and back:
                oom = self.ledger.allocate({tag: self.sizes.get(tag, 0.0) for tag in back}, event="resume")
                if oom is not None:
                    self._die(oom.message(), SCHEDULER_CRASH)
            self.released.difference_update(back)
            logger.info("Resumed %s: %.2f GiB%s", back or "nothing released",
                        sum(self.sizes.get(tag, 0.0) for tag in back),
                        "; the weights are garbage until /update_weights_from_disk" if "weights" in back
                        and self.weights_lost else "")
            return web.Response()

    async def _reload(self, model_path: str) -> web.Response:
        async with self.control_lock:
            logger.info("Start update_weights. Load format=auto, model_path=%r", model_path)
            if "weights" in self.released:
                message = ("Failed to update weights: the model weights are released (memory saver); call "
                           "/resume_memory_occupation first.")
                logger.error("%s", message)
                return web.json_response({"success": False, "message": message, "num_paused_requests": 0},
                                         status=400)
            async with self._engine_busy(drain=True):
                if self.faults.reload_seconds:
                    await asyncio.sleep(self.faults.reload_seconds)
                self.weights_lost = False
            logger.info("%s", RELOADED_MESSAGE)
            return web.json_response({"success": True, "message": RELOADED_MESSAGE, "num_paused_requests": 0})

    @contextlib.asynccontextmanager
    async def _engine_busy(self, drain: bool) -> AsyncIterator[None]:
        """The scheduler is busy with a control request: new inference waits. With `drain`, first let the requests
        already admitted finish (SGLang's model-update writer lock)."""
        self.engine_free.clear()
        try:
            while drain and self.admitted:
                await self.drained.wait()
            yield
        finally:
            self.engine_free.set()

    @contextlib.asynccontextmanager
    async def _inference_turn(self) -> AsyncIterator[None]:
        """One inference request from its arrival to its answer: it waits (queued) while the engine is busy."""
        self.pending += 1
        # SGLang's scheduler prints a line per prefill batch (one request each, at this fake's pace)
        logger.info("Prefill batch, #new-seq: 1, #new-token: 1, #cached-token: 0, token usage: 0.00, "
                    "#running-req: %d, #queue-req: 0", self.pending - 1)
        try:
            if not self.engine_free.is_set():
                self.metrics.queued += 1
                try:
                    while not self.engine_free.is_set():
                        await self.engine_free.wait()
                finally:
                    self.metrics.queued -= 1
            self.admitted += 1
            self.drained.clear()
            try:
                yield
            finally:
                self.admitted -= 1
                if not self.admitted:
                    self.drained.set()
        finally:
            self.pending -= 1

    def _memory_problem(self) -> str | None:
        if self.released:
            return RELEASED_MESSAGE
        if self.weights_lost:
            return WEIGHTS_LOST_MESSAGE
        return None

    def _die(self, *lines: str) -> NoReturn:
        """Exit 1 at once, as SGLang does when its scheduler dies: the last lines, the device memory freed."""
        for line in lines:
            logger.error("%s", line)
        self.free_memory()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(1)

    def free_memory(self) -> None:
        """Give this server's device memory back in the ledger (at exit)."""
        if self.ledger is None or not self.allocated:
            return
        self.allocated = False
        try:
            freed = self.ledger.free()
        except (OSError, LedgerError) as exc:
            logger.warning("Could not free the device memory in %s: %s", self.ledger.path, exc)
            return
        logger.info("Device memory freed: %.2f GiB", freed)

    # --- inference routes ---

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._inference(request, self._chat_job, ChatFormat())

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._inference(request, self._completion_job, CompletionFormat())

    async def generate(self, request: web.Request) -> web.StreamResponse:
        return await self._inference(request, self._generate_job, GenerateFormat())

    async def _inference(
        self, request: web.Request, make_job: Callable[[str, dict[str, Any]], Job], fmt: Format
    ) -> web.StreamResponse:
        if self.faults.status is not None:  # worded like SGLang's own 400s, server path and all
            return error_response(self.faults.status, INJECTED_ERROR.format(status=self.faults.status,
                                                                            path=request.path, file=__file__))
        body = await _json_body(request)
        if not isinstance(body, dict):
            return error_response(400, "The request body must be a JSON object.")
        try:
            job = make_job(request.path, body)
        except ApiError as exc:
            return error_response(exc.status, exc.message)
        async with self._inference_turn():
            problem = self._memory_problem()
            if problem is not None:
                logger.error("Inference request on %s refused: %s", request.path, problem)
                return error_response(500, problem)
            return await self._respond(request, job, fmt)

    def _resolve_adapter(self, model: Any, lora_path: Any) -> str | None:
        """SGLang's rule: an exact served name is the base; otherwise `base:adapter`; else the `lora_path` field."""
        adapter: str | None = None
        if isinstance(model, str) and model != self.config.served_model_name and ":" in model:
            adapter = model.split(":", 1)[1]
        elif isinstance(lora_path, list) and lora_path:
            adapter = lora_path[0] if isinstance(lora_path[0], str) else None
        elif isinstance(lora_path, str) and lora_path:
            adapter = lora_path
        if adapter is not None and adapter not in self.config.adapters:
            raise ApiError(400, f"Got LoRA adapter that has never been loaded: {adapter}\n"
                                f"All loaded adapters: dict_keys({list(self.config.adapters)!r}).")
        return adapter

    def _limit(self, value: Any, name: str, default: int) -> int:
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ApiError(400, f"{name} must be a non-negative integer, got {value!r}")
        return value

    def _check_context(self, prompt_tokens: int, max_tokens: int) -> None:
        limit = self.config.context_length
        if prompt_tokens + max_tokens > limit:
            raise ApiError(400, f"Requested token count exceeds the model's maximum context length of {limit} "
                                f"tokens. You requested a total of {prompt_tokens + max_tokens} tokens: "
                                f"{prompt_tokens} tokens from the input messages and {max_tokens} tokens for the "
                                "completion. Please reduce the number of tokens in the input messages or the "
                                "completion to fit within the limit.")

    def _openai_job(self, path: str, body: dict[str, Any], prompt_tokens: int) -> Job:
        model = body.get("model")
        adapter = self._resolve_adapter(model, body.get("lora_path"))
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        max_tokens = self._limit(limit, "max_tokens", DEFAULT_MAX_TOKENS)
        self._check_context(prompt_tokens, max_tokens)
        options = body.get("stream_options")
        return Job(
            path=path, model=model if isinstance(model, str) else self.config.served_model_name, adapter=adapter,
            prompt_tokens=prompt_tokens, max_tokens=max_tokens, stream=bool(body.get("stream")),
            include_usage=isinstance(options, dict) and bool(options.get("include_usage")),
        )

    def _chat_job(self, path: str, body: dict[str, Any]) -> Job:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty list")
        prompt = sum(count_words(m.get("content")) for m in messages if isinstance(m, dict))
        return self._openai_job(path, body, prompt)

    def _completion_job(self, path: str, body: dict[str, Any]) -> Job:
        if "prompt" not in body:
            raise ApiError(400, "prompt is required")
        return self._openai_job(path, body, count_words(body["prompt"]))

    def _generate_job(self, path: str, body: dict[str, Any]) -> Job:
        if body.get("text") is None and body.get("input_ids") is None:
            raise ApiError(400, "Either text or input_ids should be provided.")
        prompt = count_words(body.get("text") if body.get("text") is not None else body.get("input_ids"))
        params = body.get("sampling_params") or {}
        if not isinstance(params, dict):
            raise ApiError(400, "sampling_params must be an object")
        max_tokens = self._limit(params.get("max_new_tokens"), "max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        self._check_context(prompt, max_tokens)
        adapter = self._resolve_adapter(None, body.get("lora_path"))
        return Job(path=path, model=self.config.served_model_name, adapter=adapter, prompt_tokens=prompt,
                   max_tokens=max_tokens, stream=bool(body.get("stream")))

    async def _tokens(self, job: Job) -> AsyncIterator[str]:
        """Produce the job's tokens, with pacing and faults; counts only tokens the consumer took."""
        start = time.monotonic()
        labels = self.metrics.request_labels(job.stream)
        self.metrics.requests[job.stream] += 1
        self.metrics.prompt_tokens[job.stream] += job.prompt_tokens
        self.metrics.running += 1
        try:
            for index in range(job.max_tokens + 1):
                self._fault_point(index)
                if index == self.faults.hang_after_tokens:
                    logger.warning("Fault injection: hanging after %d tokens (FAKE_SGLANG_HANG_AFTER_TOKENS)", index)
                    await asyncio.Event().wait()  # forever, until the client goes away
                if index == job.max_tokens:
                    break
                if index and self.faults.token_delay_seconds:
                    await asyncio.sleep(self.faults.token_delay_seconds)
                if index == 0:
                    self.metrics.ttft.observe(labels, time.monotonic() - start)
                yield token_text(job.offset, index)
                self.metrics.generation_tokens[job.stream] += 1
            self.metrics.e2e.observe(labels, time.monotonic() - start)
        finally:
            self.metrics.running -= 1

    def _fault_point(self, tokens_done: int) -> None:
        if tokens_done == self.faults.crash_after_tokens:
            once = self.faults.crash_once
            if once is not None:
                try:
                    once.open("x").close()  # (created by the first to crash: the others serve)
                except FileExistsError:
                    return
            self._die(f"Fault injection: engine crashed after {tokens_done} tokens (FAKE_SGLANG_CRASH_AFTER_TOKENS)")

    async def _respond(self, request: web.Request, job: Job, fmt: Format) -> web.StreamResponse:
        parts: list[str] = []
        if not job.stream:
            try:
                async with contextlib.aclosing(self._tokens(job)) as tokens:
                    async for token in tokens:
                        parts.append(token)
            except asyncio.CancelledError:
                self._client_gone(job, 0)
                raise
            return web.json_response(fmt.full(job, "".join(parts), len(parts)))

        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        response.enable_chunked_encoding()
        sent = 0  # token events written to the client
        try:
            await response.prepare(request)
            async with contextlib.aclosing(self._tokens(job)) as tokens:
                async for token in tokens:
                    parts.append(token)
                    await response.write(_sse(fmt.chunk(job, token, sent, "".join(parts))))
                    sent += 1
            for event in fmt.tail(job, sent, "".join(parts)):
                await response.write(_sse(event))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionError:  # the write failed: the client is gone
            self._client_gone(job, sent)
        except asyncio.CancelledError:  # the client went away while we waited (token delay, hang)
            self._client_gone(job, sent)
            raise
        return response

    # --- lifecycle ---

    async def start_up(self, stop: asyncio.Event) -> int | None:
        """Wait the startup delay, then become ready, or crash (return 1) when told to."""
        await asyncio.sleep(self.faults.startup_seconds)
        if self.faults.crash_at_startup is not None:
            logger.error("%s", self.faults.crash_at_startup)
            stop.set()
            return 1
        failure = self._allocate_memory()
        if failure is not None:
            logger.error("%s", failure)
            stop.set()
            return 1
        logger.info("Load weight end. elapsed=%.2f s, type=FakeForCausalLM", self.faults.startup_seconds)
        logger.info("Engine startup timings (s): load_weight=%.2f", self.faults.startup_seconds)
        self.ready = True
        logger.info("%s", READY_LINE)
        return None

    def _allocate_memory(self) -> str | None:
        """Size the memory and book it in the device ledger, if any; return the error line when it does not fit."""
        capacity = self.faults.device_gib or DEFAULT_DEVICE_GIB
        if self.ledger is not None:
            try:
                capacity = self.ledger.capacity()
                if self.faults.device_gib and capacity != self.faults.device_gib:
                    logger.warning("FAKE_SGLANG_DEVICE_GIB=%s ignored: the ledger %s says the device has %.2f GiB",
                                   self.faults.device_gib, self.ledger.path, capacity)
                self.sizes = memory_sizes(self.config, self.faults, capacity)
                oom: OutOfMemory | None = self.ledger.allocate(self.sizes)
            except (OSError, LedgerError) as exc:
                return f"RuntimeError: device ledger {self.ledger.path}: {exc}"
            if oom is not None:
                return oom.message()
            self.allocated = True
        else:
            self.sizes = memory_sizes(self.config, self.faults, capacity)
        self.metrics.memory = dict(self.sizes)
        logger.info("Memory: weights %.2f GiB, KV cache %.2f GiB, CUDA graphs %.2f GiB on a %.2f GiB device%s",
                    self.sizes["weights"], self.sizes["kv_cache"], self.sizes["cuda_graph"], capacity,
                    f" (booked in {self.ledger.path})" if self.allocated and self.ledger else "")
        return None


async def _json_body(request: web.Request) -> Any:
    """The body as JSON, or None when it is not JSON (aiohttp caches the bytes, so handlers can read it again)."""
    try:
        raw = await request.read()
        return json.loads(raw) if raw else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


async def serve(config: ServerConfig, faults: Faults, scheduler: int | None = None) -> int:
    """Run until SIGTERM/SIGINT (exit 0) or a startup crash (exit 1); with a `scheduler` process, until it dies."""
    server = FakeSGLangServer(config, faults)
    _configure_access_log(config)
    runner = web.AppRunner(
        server.build_app(),
        handler_cancellation=True,  # a client that goes away cancels its handler (how disconnects are seen)
        access_log=logging.getLogger("fake_sglang.access"),
        access_log_format='%a - "%r" %s',
        shutdown_timeout=SHUTDOWN_GRACE_SECONDS,
    )
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    try:
        await site.start()
    except OSError as exc:
        logger.error("ERROR: [Errno %s] error while attempting to bind on address (%r, %d): %s",
                     exc.errno, config.host, config.port, exc.strerror)
        await runner.cleanup()
        return 1

    stop = asyncio.Event()
    exit_code = 0
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if not stop.is_set():
            logger.info("%s received. signum=%d. Draining requests and shutting down...",
                        signal.Signals(signum).name, signum)
            server.shutting_down = True
            stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    # (SGLang loads its weights before its HTTP server is up; this fake answers 503 meanwhile, as SGLang's warmup does)
    logger.info("Load weight begin. (fake server: no weights, startup delay %.3fs)", faults.startup_seconds)
    logging.getLogger("fake_sglang.uvicorn").info("INFO:     Uvicorn running on http://%s:%d (Press CTRL+C to quit)",
                                                  config.host, config.port)
    startup = asyncio.create_task(server.start_up(stop))
    watchdog = asyncio.create_task(_watch_scheduler(scheduler, faults, server)) if scheduler else None
    try:
        await stop.wait()
        if startup.done():
            exit_code = startup.result() or 0
        else:
            startup.cancel()
        server.shutting_down = True
        try:
            await asyncio.wait_for(runner.cleanup(), timeout=SHUTDOWN_GRACE_SECONDS * 3)
        except asyncio.TimeoutError:
            logger.warning("Shutdown took too long; exiting anyway")
    finally:
        if watchdog is not None:
            watchdog.cancel()
        server.free_memory()
    return exit_code


async def _watch_scheduler(pid: int, faults: Faults, server: FakeSGLangServer) -> None:
    """SGLang's SubprocessWatchdog: a look a second; a dead scheduler takes the launcher down, after its pause."""
    while True:
        await asyncio.sleep(1.0)
        done, status = os.waitpid(pid, os.WNOHANG)
        if done and not server.shutting_down:
            code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            logger.error("Subprocess scheduler_0 (pid=%d) crashed with exit code %d. Triggering SIGQUIT for "
                         "cleanup...", pid, code)
            logger.error("SIGQUIT received. signum=3. It usually means one child failed.")
            logger.info("Sleeping 5 seconds before crash diagnostics to let GPU activity settle.")
            await asyncio.sleep(faults.teardown_seconds)
            os.kill(os.getpid(), signal.SIGKILL)  # kill_process_tree(os.getpid()) includes the launcher


def start_scheduler() -> int:
    """A process standing for SGLang's scheduler: named `sglang::scheduler`, it dies with the launcher."""
    pid = os.fork()
    if pid:
        return pid
    try:
        libc = ctypes.CDLL(None)
        libc.prctl(15, b"sglang::scheduler", 0, 0, 0)  # PR_SET_NAME (the kernel keeps 15 bytes)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:
            os._exit(0)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        while True:
            signal.pause()
    finally:
        os._exit(0)


def _configure_logging() -> None:
    with contextlib.suppress(AttributeError):
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    handler = logging.StreamHandler(sys.stdout)  # flushes after every record
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.getLogger("aiohttp").setLevel(logging.WARNING)
    logging.getLogger("fake_sglang.access").setLevel(logging.INFO)


def _configure_access_log(config: ServerConfig) -> None:
    """As SGLang sets uvicorn's: `--log-level-http` (else `--log-level`) for the access lines, and
    `--uvicorn-access-log-exclude-prefixes` filtering them by path (sglang/srt/utils/common.py)."""
    access = logging.getLogger("fake_sglang.access")
    access.setLevel((config.log_level_http or "info").upper())
    logging.getLogger("fake_sglang.uvicorn").setLevel(access.level)  # (uvicorn's own lines: the same level)
    prefixes = config.access_log_exclude_prefixes
    if prefixes:
        access.addFilter(lambda record: not any(f'"{method} {prefix}' in record.getMessage() for prefix in prefixes
                                                for method in ("GET", "POST", "PUT", "DELETE", "HEAD")))


def main(argv: Sequence[str] | None = None) -> int:
    """Parse SGLang's command line and the FAKE_SGLANG_* environment, then serve."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        sys.stdout.write(USAGE + "\n\nA fake SGLang server for tests; see tests/fakes/fake_sglang_server.py.\n")
        return 0
    try:
        config = parse_cli(args)
        faults = Faults.from_env(os.environ)
    except UsageError as exc:
        sys.stderr.write(f"{USAGE}\n{PROG}: error: {exc}\n")
        return 2
    _configure_logging()
    adapters = ", ".join(f"{n}={p}" for n, p in config.adapters.items()) or "none"
    logger.info("Fake SGLang %s server: model_path=%r served_model_name=%r host=%s port=%d lora adapters: %s; "
                "api key: %s; metrics: %s", SGLANG_VERSION, config.model_path, config.served_model_name,
                config.host, config.port, adapters, "set" if config.api_key else "none",
                "on" if config.enable_metrics else "off")
    logger.info("Fake SGLang faults: %s", faults.describe())
    return asyncio.run(serve(config, faults, start_scheduler()))


if __name__ == "__main__":
    sys.exit(main())
