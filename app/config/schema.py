"""The configuration schema: every field of the deployment form, in the form's order.

This is the single source of truth. Loading (YAML/JSON files, ClearML hyperparameters, `--set`), validation,
export, the SGLang command line, the configuration table (docs/configuration.md) and (later) the wizard form and
the task template all read these definitions; none of them lists fields of its own.

Sections, as in the config file (docs/configuration.md):
    instance  where the app instance lives (name, project, queue, AI Gateway Route)
    models    a list; each item: model, endpoint name, GPUs, CLI, LoRA (`lora` sub-section), any SGLang flag
    general   debug, device, memory options, HF token, the form's SGLang options, any SGLang flag
    env       environment variables for the engines (free-form names)
    idle      idle shutdown
    benchmark SGLang's serving benchmark, run once every model is ready (opt-in)
    auth      access keys for the endpoint (`tokens`) and what each may do (`limits`: `LIMIT_FIELDS`, per key)

A key written in kebab-case in `general` or in a model is an SGLang flag by its CLI name; the named SGLang fields
below are the ones the form shows, every other flag of SGLang's parser is accepted too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Types a field may have: how it is parsed from a string and shown in the form. A mapping is a YAML/JSON mapping in a
# file, and its YAML or JSON text as a hyperparameter, in the form (one multi-line text field) and in `--set`.
STR, INT, FLOAT, BOOL, LIST, CHOICE, MAPPING = "str", "int", "float", "bool", "list", "choice", "mapping"


@dataclass(frozen=True)
class Field:
    """One configuration knob and everything the app derives from it."""

    section: str  # instance | model | lora | general | idle | benchmark | auth | limits (one key's, in auth.limits)
    key: str  # the config-file key: snake_case, or an SGLang flag's CLI name (kebab-case)
    title: str  # the form's label
    help: str
    type: str
    default: Any = None
    choices: tuple[Any, ...] | None = None
    sglang_flag: str | None = None  # the SGLang argument it becomes, when it maps to exactly one
    secret: bool = False
    minimum: float | None = None
    maximum: float | None = None
    required: bool = False
    # Said as the fix when a value falls outside [minimum, maximum] (for fields whose range is a rule, not taste).
    bound_fix: str = ""

    @property
    def is_flag(self) -> bool:
        """A named SGLang flag (a kebab-case key): stored with the other SGLang flags of its section."""
        return "-" in self.key

    @property
    def path(self) -> str:
        """Where the field sits in the config file, for messages and docs."""
        prefix = {"model": "models[].", "lora": "models[].lora.", "limits": "auth.limits.<name>."}.get(
            self.section, self.section + ".")
        return prefix + self.key


# Hours of idling before shutdown; 0 means never (the dashboard then shows "stopped after ∞ hours").
DEFAULT_IDLE_HOURS = 24.0
DEFAULT_REPORT_INTERVAL_SECONDS = 60
# SGLang takes any string for its log levels and hands it to Python logging and uvicorn; these are the ones both know.
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
# Where an adapter may be loaded from on request (`lora.on_request`).
ADAPTER_SOURCES = ("clearml", "hf", "local")

INSTANCE_FIELDS = (
    Field("instance", "name", "Instance name", "Name of the app instance; it appears in the instance list.",
          STR, "SGLang Model Deployment"),
    Field("instance", "project", "Service Project - Access Control",
          "ClearML project where the instance is created; users with read access to it can use the app.",
          STR, "LLM Deployments"),
    Field("instance", "queue", "Queue",
          "ClearML queue the instance is enqueued to (make sure an agent on a GPU machine serves it).", STR, ""),
    Field("instance", "gateway_route", "AI Gateway Route",
          "An admin-preconfigured AI Application Gateway route to use as the endpoint; empty creates an "
          "ephemeral endpoint.", STR, ""),
)

MODEL_FIELDS = (
    Field("model", "cli", "CLI",
          "SGLang command-line arguments. When set they are passed to SGLang as they are, and every other field "
          "of this model is ignored except Model (and the endpoint name, which routes to it).", STR, ""),
    Field("model", "model", "Model",
          "A ClearML Model ID (32 hex characters), a HuggingFace model name (e.g. openai-community/gpt2) or a "
          "local path.", STR, None, sglang_flag="--model-path", required=True),
    Field("model", "endpoint_name", "Model Endpoint Name",
          "Name the model is served under: the path prefix /<name>/v1 and the OpenAI `model` field. Lowercase "
          "letters, digits, '.', '_' and '-'. Default: derived from the model.", STR, None,
          sglang_flag="--served-model-name"),
    Field("model", "gpus", "GPUs (Tensor Parallel Size)",
          "Number of GPUs one copy of the model is split over. Default: every GPU detected.", INT, None,
          sglang_flag="--tp-size", minimum=1, maximum=1024),
    Field("model", "replicas", "Replicas (Data Parallel Size)",
          "Copies of the model, each on its own GPUs: SGLang's data parallelism, balanced by the Load Balance "
          "Method. In the CPU development mode, separate SGLang servers behind sglang-router.",
          INT, 1, sglang_flag="--dp-size", minimum=1, maximum=64),
    Field("model", "nodes", "Nodes",
          "Machines one copy of the model spans (multi-node tensor parallelism over `gpus` GPUs on each): the "
          "other machines are started through ClearML's multi-node launch on the instance's queue. One model "
          "per deployment may span nodes.", INT, 1, minimum=1, maximum=64),
)

LORA_FIELDS = (
    Field("lora", "enable", "Enable LoRA", "Serve LoRA adapters on top of the model.", BOOL, False,
          sglang_flag="--enable-lora"),
    Field("lora", "modules", "LoRA Modules",
          "Adapters as name=path, where path is a ClearML Model ID, a HuggingFace name or a local path. "
          "Request one with model \"<endpoint>:<name>\".", LIST, (), sglang_flag="--lora-paths"),
    Field("lora", "max_loras", "Max LoRAs", "Maximum number of adapters in one batch (SGLang default: 8).",
          INT, None, sglang_flag="--max-loras-per-batch", minimum=1, maximum=1024),
    Field("lora", "max_lora_rank", "Max LoRA Rank",
          "Largest adapter rank to reserve memory for (default: inferred from the adapters).", INT, None,
          sglang_flag="--max-lora-rank", minimum=1, maximum=4096),
    Field("lora", "extra_vocab_size", "LoRA Extra Vocabulary Size",
          "Extra vocabulary an adapter may add. SGLang has no such option: only 0 is accepted.", INT, 0,
          minimum=0, maximum=0,
          bound_fix="SGLang 0.5.23 has no extra LoRA vocabulary option: leave it at 0, and merge an adapter's "
                    "added tokens into the base model's tokenizer instead"),
    Field("lora", "dtype", "LoRA Dtype",
          "Data type of the adapters. SGLang loads adapters in the model's dtype (set --dtype for the model): "
          "only auto is accepted.", CHOICE, "auto", choices=("auto", "float16", "bfloat16", "float32")),
    Field("lora", "max_cpu_loras", "Max CPU LoRAs",
          "Maximum number of adapters held in CPU memory; at least Max LoRAs and the number of modules. With "
          "adapters on request, the least recently used idle one is unloaded to make room (default then: Max "
          "LoRAs, and at least one more than the modules; SGLang is given one slot more, so a new adapter loads "
          "before the least recently used one is unloaded).",
          INT, None, sglang_flag="--max-loaded-loras", minimum=1, maximum=65536),
    Field("lora", "on_request", "LoRA Adapters on Request",
          "Sources an adapter may be loaded from on its first request, as model \"<endpoint>:<reference>\": "
          "clearml (a ClearML Model ID), hf (a HuggingFace repo name), local (a path under LoRA Adapter "
          "Directories). Empty: only the modules above are served.",
          LIST, (), choices=ADAPTER_SOURCES),
    Field("lora", "on_request_dirs", "LoRA Adapter Directories",
          "Directories on the serving machine whose adapters may be loaded on request (the local source): an "
          "absolute path inside one of them, or the name of an adapter folder directly in one.", LIST, ()),
)

GENERAL_FIELDS = (
    Field("general", "debug", "Enable Debug Mode", "Debug logging for the app and for SGLang.", BOOL, False),
    Field("general", "device", "Device",
          "cuda on a GPU machine; cpu runs SGLang's CPU engine with small models (development mode).",
          CHOICE, "cuda", choices=("cuda", "cpu"), sglang_flag="--device"),
    Field("general", "auto_cpu_offload", "Enable Automatic CPU Offloading",
          "Let several models share GPUs by moving unused ones to CPU memory. With Max CUDA Memory above the "
          "GPU's capacity the surplus is offloaded to CPU RAM.", BOOL, False),
    Field("general", "disk_swap", "Enable Disk Swapping",
          "Let several models share GPUs by swapping inactive ones out to disk (needs Automatic CPU Offloading "
          "off).", BOOL, False),
    Field("general", "hf_token", "HuggingFace Token",
          "Token for HuggingFace models that need authentication. Passed to SGLang in its environment only.",
          STR, "", secret=True),
    Field("general", "max_cuda_memory_gib", "Max CUDA Memory (GiB)",
          "CUDA memory each GPU may appear to have; above the card's capacity the surplus is offloaded to CPU "
          "RAM (SGLang --cpu-offload-gb). 0: the GPU's own capacity.", FLOAT, 0.0, minimum=0, maximum=100000),
    Field("general", "cuda_memory_threshold_kb", "CUDA Memory Manager Minimum Threshold",
          "SGLang 0.5.23 has no CUDA memory manager threshold; only the default, -1, is accepted.", INT, -1,
          minimum=-1, maximum=-1,
          bound_fix="SGLang 0.5.23 has no knob for it; leave it at -1 and use Max CUDA Memory to offload"),
    Field("general", "sleep_after_idle_seconds", "Sleep Idle Models After (Seconds)",
          "With CPU offloading or disk swapping: a model idle this long gives its GPU memory back even when no "
          "other model needs it, and wakes on its next request. 0: only when another model needs the memory.",
          INT, 0, minimum=0, maximum=30 * 24 * 3600),
    Field("general", "wake_deadline_seconds", "Wake-up Deadline (Seconds)",
          "Longest a request waits while its sleeping model wakes; past it the answer is 503 with Retry-After "
          "(the model goes on waking).", INT, 120, minimum=1, maximum=3600),
    Field("general", "restart_hold_seconds", "Restart Hold (Seconds)",
          "Longest a request waits while its model restarts after a crash; past it the answer is 503 with "
          "Retry-After (the model goes on restarting). 0: answer 503 at once.", INT, 180, minimum=0, maximum=3600),
    Field("general", "sleep_on_idle", "Engines Sleep When Idle",
          "SGLang's scheduler waits for work instead of polling for it while it has none (SGLang --sleep-on-idle): "
          "an idle deployment uses 3% of a core instead of a whole one. It wakes on the request itself; the first "
          "request after a pause took about 0.1 s longer on the CPU (docs/sglang.md has the figures).", BOOL, True),
    Field("general", "max_request_body_mib", "Max Request Body (MiB)",
          "Largest request body a token holder may send (413 past it, before it is read): chat traffic is a few "
          "KiB, a full 128k-token prompt a few hundred, an inline image a few MiB. A prompt that cannot fit its "
          "model's context is refused before the engine reads it, whatever this says.", FLOAT, 4.0, minimum=0.01,
          maximum=1024),
    Field("general", "max_connections_per_address", "Max Connections per Client Address",
          "Client connections one address may keep once the endpoint's connection table is full (an IPv6 /64 is one "
          "address): past it, a new one from that address closes that address's own connection longest without an "
          "authenticated request. Behind a proxy or a NAT every client shares one address: raise it, or 0 for no "
          "share per address.", INT, 1024, minimum=0, maximum=1_000_000),
    Field("general", "gateway_workers", "Gateway Workers",
          "Processes that serve the endpoint's port together (the kernel spreads connections over them), each relaying "
          "on a core of its own; the deployment's process owns the counters, keys' rate limits, engine states and "
          "adapters, and answers what needs them. 0: from the cores the engines leave (1 on a CPU deployment or a "
          "small machine: the deployment's process serves alone).", INT, 0, minimum=0, maximum=64),
    # The form's SGLang options (the seed's General section); their defaults are SGLang's own.
    Field("general", "trust-remote-code", "Trust Remote Code",
          "Allow models with custom code from the hub.", BOOL, None, sglang_flag="--trust-remote-code"),
    Field("general", "log-requests", "Log Requests", "Log the metadata of every request.", BOOL, None,
          sglang_flag="--log-requests"),
    Field("general", "log-requests-level", "Log Requests Level",
          "0: metadata, 1: and sampling parameters, 2: and partial input/output, 3: everything.", CHOICE, None,
          sglang_flag="--log-requests-level"),
    Field("general", "enable-request-time-stats-logging", "Enable Request Time Stats Logging",
          "Log the time each request spends in each stage.", BOOL, None,
          sglang_flag="--enable-request-time-stats-logging"),
    Field("general", "enable-cache-report", "Enable Cache Report",
          "Report cached prompt tokens in each response's usage.", BOOL, None,
          sglang_flag="--enable-cache-report"),
    Field("general", "disable-chunked-prefix-cache", "Disable Chunked Prefix Cache",
          "Turn off the chunked prefix cache.", BOOL, None, sglang_flag="--disable-chunked-prefix-cache"),
    Field("general", "disable-fast-image-processor", "Disable Fast Image Processor",
          "Use the slow image processor of multimodal models.", BOOL, None,
          sglang_flag="--disable-fast-image-processor"),
    Field("general", "enable-p2p-check", "Enable P2P Check",
          "Check GPU peer-to-peer access instead of assuming it.", BOOL, None, sglang_flag="--enable-p2p-check"),
    Field("general", "schedule-policy", "Schedule Policy", "Order in which waiting requests are scheduled.",
          CHOICE, None, sglang_flag="--schedule-policy"),
    Field("general", "max-running-requests", "Max Running Requests",
          "Most requests running at once (default: decided by SGLang from memory).", INT, None,
          sglang_flag="--max-running-requests", minimum=1, maximum=1_000_000),
    Field("general", "watchdog-timeout", "Watchdog Timeout",
          "Seconds one forward batch may take before SGLang declares itself hung and stops (default 300).",
          FLOAT, None, sglang_flag="--watchdog-timeout", minimum=1, maximum=86400),
    Field("general", "load-balance-method", "Load Balance Method",
          "How requests are spread over data-parallel replicas.", CHOICE, None, sglang_flag="--load-balance-method"),
    Field("general", "log-level", "Log Level", "SGLang's log level (Enable Debug Mode sets debug).", CHOICE,
          None, choices=LOG_LEVELS, sglang_flag="--log-level"),
    Field("general", "log-level-http", "Log Level HTTP", "Log level of SGLang's HTTP server.", CHOICE, None,
          choices=LOG_LEVELS, sglang_flag="--log-level-http"),
)

IDLE_FIELDS = (
    Field("idle", "time_limit_hours", "Idle Time Limit (Hours)",
          "Idle time after which the instance shuts down; 0 never shuts it down.", FLOAT, DEFAULT_IDLE_HOURS,
          minimum=0, maximum=100000),
    Field("idle", "report_interval_seconds", "Last Action Report Interval (Seconds)",
          "How often the last activity is reported; prevents idle shutdown while still active.", INT,
          DEFAULT_REPORT_INTERVAL_SECONDS, minimum=1, maximum=86400),
)

BENCHMARK_FIELDS = (
    Field("benchmark", "enable", "Benchmark at Ready",
          "Once every model is ready, run SGLang's own benchmark (sglang.benchmark.serving) through the endpoint "
          "with each model and report throughput, time to first token and inter-token latency as scalars and a "
          "table, so clones that differ only in SGLang options compare side by side. Its requests are not counted "
          "and do not reset the idle clock.", BOOL, False),
    Field("benchmark", "concurrencies", "Benchmark Concurrencies",
          "Requests in flight at once: one benchmark run at each.", LIST, ("1", "8", "32")),
    Field("benchmark", "input_tokens", "Benchmark Input Tokens", "Prompt length of each request (random tokens).",
          INT, 256, minimum=1, maximum=1_000_000),
    Field("benchmark", "output_tokens", "Benchmark Output Tokens", "Tokens generated for each request.", INT, 128,
          minimum=1, maximum=100_000),
    Field("benchmark", "rounds", "Benchmark Rounds",
          "Each run sends this many times its concurrency in requests.", INT, 4, minimum=1, maximum=1000),
    Field("benchmark", "max_seconds", "Benchmark Time Limit (Seconds)",
          "Longest one run may take; past it the run is stopped and reported as such.", INT, 300, minimum=10,
          maximum=86400),
)

AUTH_FIELDS = (
    Field("auth", "tokens", "Access Tokens",
          "Bearer tokens accepted by the endpoint, each TOKEN or NAME=TOKEN: a key's name (letters, digits, '.', '_' "
          "and '-'; not default) is what its usage is reported under and what Key Limits calls it; an unnamed token "
          "is token-<its position>, from 1. Also from CLEARML_SGLANG_API_TOKENS, comma-separated, numbered after "
          "these. With none, the app generates one.", LIST, (), secret=True),
    Field("auth", "limits", "Key Limits",
          "What each key may do, as YAML or JSON: a key's name (or default, for every key without an entry of its "
          "own) and its limits, each optional: rpm, tpm, concurrent, max_tokens, priority, models (the Key limits "
          "table). E.g. {default: {rpm: 60}, alice: {tpm: 100000, priority: 10, models: [qwen]}}. A priority turns "
          "on SGLang's priority scheduling for every model (schedule-policy fcfs or lof). Not a secret: exported "
          "with the config.", MAPPING, ()),
)

# The largest count or rate a key's limit may be: far above any one deployment's capacity, far below overflow.
MAX_KEY_LIMIT = 10**9

# One key's limits (`auth.limits.<name>`), each optional (None: no limit of that kind); `app.keys.KeyLimits` holds
# them under the same names.
LIMIT_FIELDS = (
    Field("limits", "rpm", "Requests per Minute", "Requests the key may send in any 60 seconds.", INT, None,
          minimum=1, maximum=MAX_KEY_LIMIT),
    Field("limits", "tpm", "Tokens per Minute",
          "Prompt and completion tokens the key's requests may take in any 60 seconds.", INT, None, minimum=1,
          maximum=MAX_KEY_LIMIT),
    Field("limits", "concurrent", "Concurrent Requests", "Requests of the key in flight at once.", INT, None,
          minimum=1, maximum=MAX_KEY_LIMIT),
    Field("limits", "max_tokens", "Max Tokens per Request",
          "The largest max_tokens a request may ask for; a request that asks for none gets this.", INT, None,
          minimum=1, maximum=MAX_KEY_LIMIT),
    Field("limits", "priority", "Priority",
          "Its requests' priority in SGLang's scheduler, higher first (keys without one: 0). Any priority turns on "
          "SGLang's priority scheduling (--enable-priority-scheduling --default-priority-value 0) for every model.",
          INT, None, minimum=-MAX_KEY_LIMIT, maximum=MAX_KEY_LIMIT),
    Field("limits", "models", "Models",
          "The endpoint names the key may use (an endpoint grants its model and its adapters) and endpoint:adapter "
          "names (that adapter only); every other model does not exist for it. Default: every one.", LIST, None),
)

SECTION_FIELDS: dict[str, tuple[Field, ...]] = {
    "instance": INSTANCE_FIELDS,
    "model": MODEL_FIELDS,
    "lora": LORA_FIELDS,
    "general": GENERAL_FIELDS,
    "idle": IDLE_FIELDS,
    "benchmark": BENCHMARK_FIELDS,
    "auth": AUTH_FIELDS,
}

ALL_FIELDS: tuple[Field, ...] = tuple(f for fields in SECTION_FIELDS.values() for f in fields)

# Top-level keys of a config file, in order.
TOP_LEVEL_KEYS = ("instance", "models", "general", "env", "idle", "benchmark", "auth")

# SGLang flags (by dest) that the app sets itself: where they would come from instead, for the error message.
OWNED_FLAGS: dict[str, str] = {
    "model_path": "set the model's `model` field",
    "host": "the app binds engines to loopback behind its gateway",
    "port": "the app picks each engine's port; use `run --port` for the gateway",
    "served_model_name": "set the model's `endpoint_name`",
    "tp_size": "set the model's `gpus`",
    "dp_size": "set the model's `replicas`",
    "nnodes": "set the model's `nodes`",
    "node_rank": "the app gives each node its rank",
    "dist_init_addr": "the app gives every node the master's address",
    "enable_lora": "set `lora.enable`",
    "lora_paths": "set `lora.modules`",
    "max_loras_per_batch": "set `lora.max_loras`",
    "max_lora_rank": "set `lora.max_lora_rank`",
    "max_loaded_loras": "set `lora.max_cpu_loras`",
    "cpu_offload_gb": "set `general.max_cuda_memory_gib`",
    "enable_memory_saver": "set `general.auto_cpu_offload` or `general.disk_swap`",
    "enable_weights_cpu_backup": "set `general.auto_cpu_offload`",
    "device": "set `general.device`",
    "sleep_on_idle": "set `general.sleep_on_idle` (on unless you turn it off)",
    "enable_metrics": "the app always turns SGLang's metrics on: the dashboard reads them",
    "api_key": "the gateway holds the access tokens: set `auth.tokens`",
    "admin_api_key": "the gateway holds the access tokens: set `auth.tokens`",
    "config": "write the flags in the config itself",
}

# In a model's raw `cli` the user owns everything except how the app reaches and addresses the engine.
OWNED_FLAGS_IN_CLI = ("model_path", "host", "port", "api_key", "admin_api_key", "nnodes", "node_rank",
                      "dist_init_addr")

# Environment variables the app sets itself, and which field sets them.
OWNED_ENV: dict[str, str] = {
    "CUDA_VISIBLE_DEVICES": "the app places each model on its GPUs: set the model's `gpus`",
    "HF_TOKEN": "set `general.hf_token` (a secret: it is masked and never exported)",
    "HUGGING_FACE_HUB_TOKEN": "set `general.hf_token` (a secret: it is masked and never exported)",
    "CLEARML_SGLANG_API_TOKENS": "set it in the app's own environment or use `auth.tokens`",
    "SGLANG_USE_CPU_ENGINE": "set `general.device: cpu`",
    "SGLANG_CPU_SHIM_UNPIN": "set `general.device: cpu`",
    "PYTHONPATH": "the app sets it for the CPU development mode; install packages into the environment instead",
}

# Paths the gateway answers itself, so no endpoint may be named after them.
RESERVED_ENDPOINT_NAMES = frozenset({"v1", "api", "ui", "healthz", "readyz", "metrics", "health", "docs",
                                     "openapi.json"})

# The hyperparameter sections of a ClearML task, by config section.
HYPERPARAMETER_SECTIONS = {
    "instance": "Instance",
    "models": "Models",
    "general": "General",
    "env": "Environment",
    "idle": "Idle",
    "benchmark": "Benchmark",
    "auth": "Auth",
}
# The app form's lists (wizard `list` entries) are one JSON hyperparameter each: Models/models, a list of models
# keyed like the config file ("lora.enable"), and Environment/variables, a list of {"name", "value"}.
WIZARD_MODELS_KEY = "models"
WIZARD_ENV_KEY = "variables"


def default(section: str, key: str) -> Any:
    """A field's default, as the config types take it (lists as tuples): the one place defaults are written."""
    (found,) = [f for f in SECTION_FIELDS[section] if f.key == key]
    return tuple(found.default) if isinstance(found.default, list) else found.default


def flag(section: str, key: str) -> str:
    """The SGLang flag a field maps to, by its name without dashes (`max-loras-per-batch`): the one place the form's
    fields are tied to SGLang's flags (the builder, the docs' table and the form's help all read it here)."""
    (found,) = [f for f in SECTION_FIELDS[section] if f.key == key]
    assert found.sglang_flag is not None, (section, key)
    return found.sglang_flag.removeprefix("--")
