"""The ClearML Enterprise app definition (`.app.conf`, HOCON): the launch form and the dashboard, from the schema.

`clearml-sglang wizard` writes it; `wizard/sglang_model_deployment.app.conf` is the committed copy (a test fails
when it differs from what this module generates). Its parts (docs/clearml.md, "The app definition"):
- `task`: the script the instance runs and the form's defaults (hyperparameters);
- `wizard.entries`: the form, in the seed's order: instance, the models list (CLI, model, endpoint name, GPUs, LoRA,
  with LoRA's fields shown only when LoRA is enabled), General, environment variables, idle options, access;
- `dashboard.lines`: status and idle time, endpoints and the curl command, the Deployed Models and Key Usage tables,
  the scalar plots and machine monitors under the exact names the app reports (app.clearml.reporting), and the
  console log.
The output is JSON-shaped, which is valid HOCON.
"""

from __future__ import annotations

import json
from typing import Any

from app import __version__, constants
from app.clearml.reporting import IDLE_TIME, IN_FLIGHT, KEY_TABLE, LATENCY, REQUESTS, TABLE, TOKENS
from app.clearml.templates import TaskDefinition
from app.config import schema
from app.config.export import format_value
from app.config.flags import FlagTable
from app.config.schema import HYPERPARAMETER_SECTIONS, WIZARD_ENV_KEY, WIZARD_MODELS_KEY, Field

APP_FILE = "wizard/sglang_model_deployment.app.conf"
DEFAULT_REPOSITORY = "https://github.com/<you>/clearml-sglang.git"

# Series of ClearML's resource monitor the dashboard plots (names from clearml/utilities/resource_monitor.py).
MACHINE_PLOTS = (
    ("CPU usage (%)", ["cpu_usage"]),
    ("Network throughput (MB/s)", ["network_rx_mbs", "network_tx_mbs"]),
    ("Disk performance (MB/s)", ["io_read_mbs", "io_write_mbs"]),
    ("Memory (GB)", ["memory_used_gb", "memory_free_gb"]),
)
GPU_PLOTS = (
    ("GPU utilization (%)", ["gpu_0_utilization"]),
    ("GPU memory usage (%)", ["gpu_0_mem_usage"]),
    ("GPU temperature (°C)", ["gpu_0_temperature"]),
)


def _entry_type(f: Field, table: FlagTable) -> dict[str, Any]:
    choices = f.choices
    if f.is_flag and choices is None and f.sglang_flag:
        spec = table.lookup(f.sglang_flag)
        choices = spec.choices if spec is not None else None
    if f.type == "bool":
        return {"type": "checkbox"}
    if choices and f.type != "list":  # (a list of choices is typed, comma-separated: its help names them)
        return {"type": "dropdown", "choices": [str(c) for c in choices]}
    if f.key == "cli" or f.type == schema.MAPPING:  # a mapping: its YAML or JSON text
        return {"type": "multiline_text"}
    return {"type": {"int": "integer", "float": "float"}.get(f.type, "string")}


def _entry(f: Field, table: FlagTable, target: dict[str, Any] | None, name: str | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name or f.key, "title": f.title, "info": f.help, **_entry_type(f, table)}
    if f.required:
        entry["required"] = True
    default = f.default
    if default is not None and default != () and default != "":
        entry["default"] = default if not isinstance(default, tuple) else list(default)
    if f.key == "modules":
        entry["placeholder"] = "sql=org/sql-lora, chat=0123456789abcdef0123456789abcdef"
    if f.key == "on_request":
        entry["placeholder"] = "local, clearml"
    if f.key == "on_request_dirs":
        entry["placeholder"] = "/data/adapters"
    if f.key == "model":
        entry["placeholder"] = "openai-community/gpt2"
    if f.key == "tokens":
        entry["placeholder"] = "alice=<token>, <token>"
    if f.key == "limits":
        entry["placeholder"] = "default: {rpm: 60}\nalice: {tpm: 100000, priority: 10, models: [qwen]}"
    if target is not None:
        entry["target"] = target
    return entry


def _target(section: str, name: str, fmt: str | None = None) -> dict[str, Any]:
    target = {"field": "hyperparams", "section": HYPERPARAMETER_SECTIONS[section], "name": name}
    if fmt:
        target["format"] = fmt
    return target


def wizard_entries(table: FlagTable | None = None) -> list[dict[str, Any]]:
    table = table or FlagTable.load()
    entries: list[dict[str, Any]] = []
    for f in schema.INSTANCE_FIELDS:
        entry = _entry(f, table, _target("instance", f.key))
        if f.key == "project":
            entry.update(type="dropdown", autocomplete=True,
                         choices={"source": "project", "display_field": "name", "value_field": "name"})
        if f.key == "queue":
            entry.update(type="dropdown", required=True,
                         choices={"source": "queue", "display_field": "name", "value_field": "name"})
        entries.append(entry)
    lora_on = {"entries": [{"name": "lora.enable", "value": True}]}
    model_items = [_entry(f, table, None) for f in schema.MODEL_FIELDS]
    for f in schema.LORA_FIELDS:
        item = _entry(f, table, None, name=f"lora.{f.key}")
        if f.key != "enable":
            item["conditional"] = lora_on
        model_items.append(item)
    entries.append({"name": "models", "title": "Model Configuration", "type": "list", "min_items": 1,
                    "collapsible": True, "collapsibleTitleTemplate": "${model}",
                    "info": "One item per model; every model is served behind the same endpoint.",
                    "item_template": model_items, "target": _target("models", WIZARD_MODELS_KEY, "json")})
    entries.append({"name": "general", "title": "General", "type": "group", "collapsible": True,
                    "item_template": [_entry(f, table, _target("general", f.key)) for f in schema.GENERAL_FIELDS]})
    entries.append({"name": "env", "title": "Environment Variables", "type": "list", "collapsible": True,
                    "info": "Additional environment variables for the engines.",
                    "item_template": [{"name": "name", "title": "Name", "type": "string"},
                                      {"name": "value", "title": "Value", "type": "string"}],
                    "target": _target("env", WIZARD_ENV_KEY, "json")})
    entries.append({"name": "idle", "title": "Idle Options", "type": "group", "required": True,
                    "item_template": [_entry(f, table, _target("idle", f.key)) for f in schema.IDLE_FIELDS]})
    bench_on = {"entries": [{"name": "enable", "value": True}]}
    bench_items = [_entry(f, table, _target("benchmark", f.key)) for f in schema.BENCHMARK_FIELDS]
    for item in bench_items[1:]:
        item["conditional"] = bench_on
    entries.append({"name": "benchmark", "title": "Benchmark at Ready", "type": "group", "collapsible": True,
                    "item_template": bench_items})
    entries += [_entry(f, table, _target("auth", f.key)) for f in schema.AUTH_FIELDS]
    return entries


def _scalar(title: str, metric: str, variants: list[str]) -> dict[str, Any]:
    return {"type": "scalar", "title": title, "metric": metric, "variant": variants}


def dashboard_lines() -> list[dict[str, Any]]:
    prop = "${hyperparams.properties.%s.value}"
    status = ("<h3>" + prop % "status" + "</h3><p>" + prop % "status_reason" + "</p>"
              "<p>Idle since: " + prop % "idle_since" + "</p>"
              "<p>Generate a token in Settings &gt; AI Application Gateway, and use it as the Bearer token.</p>")
    endpoint = ("<p>Endpoint: <code>" + prop % "endpoint" + "</code> &middot; <a href=\"" + prop % "endpoint"
                + "/\" target=\"_blank\" rel=\"noopener noreferrer\">its page</a> (status, request generator, "
                "playground)</p><p>Models: <code>" + prop % "models" + "</code></p><pre>" + prop % "curl" + "</pre>")
    return [
        {"style": {"height": "160px"}, "contents": [{"type": "html", "title": "Status", "text": status},
                                                     {"type": "html", "title": "Endpoint", "text": endpoint}]},
        {"contents": [{"type": "plot", "title": TABLE, "metric": TABLE, "variant": "models"}]},
        {"contents": [{"type": "plot", "title": KEY_TABLE, "metric": KEY_TABLE, "variant": "keys"}]},
        {"contents": [_scalar("Total Number of Requests", REQUESTS, ["total"]),
                      _scalar("Tokens per Second", TOKENS, ["generation", "prompt"]),
                      _scalar("Latency (ms)", LATENCY, ["mean", "p50", "p95", "time to first token p50"])]},
        {"contents": [_scalar("Requests in Flight", IN_FLIGHT, ["total"]),
                      _scalar("Idle Time (hours)", IDLE_TIME, ["idle"])]},
        {"contents": [_scalar(title, ":monitor:machine", variants) for title, variants in MACHINE_PLOTS]},
        {"contents": [_scalar(title, ":monitor:gpu", variants) for title, variants in GPU_PLOTS]},
        {"contents": [{"type": "log", "title": "Console Log"}]},
    ]


def app_definition(repository: str = DEFAULT_REPOSITORY, branch: str = "main") -> dict[str, Any]:
    definition = TaskDefinition()
    hyperparams: dict[str, dict[str, str]] = {}
    for h in definition.hyperparameters:
        section, _, name = h.name.partition("/")
        if section == HYPERPARAMETER_SECTIONS["models"]:
            continue  # the form's list writes them, as Models/models
        hyperparams.setdefault(section, {})[name] = h.value
    hyperparams[HYPERPARAMETER_SECTIONS["models"]] = {WIZARD_MODELS_KEY: format_value([])}
    return {
        "id": "clearml-sglang-model-deployment",
        "name": "SGLang Model Deployment",
        "version": __version__,
        "provider": "clearml-sglang",
        "description": "Deploy LLMs with SGLang behind a secure, authenticated, observable endpoint.",
        "details_page": "task",
        "category": "Deploy",
        "badges": [f"SGLang {constants.SGLANG_VERSION}"],
        "no_info_html": "<p>Launch an instance to serve a model.</p>",
        "task": {
            "script": {"repository": repository, "branch": branch, "entry_point": definition.script,
                       "working_dir": definition.working_dir},
            "container": {"image": definition.docker_image, "arguments": definition.docker_args},
            "hyperparams": hyperparams,
        },
        "wizard": {"entries": wizard_entries()},
        "dashboard": {"lines": dashboard_lines()},
    }


def render(repository: str = DEFAULT_REPOSITORY, branch: str = "main") -> str:
    header = ("# SGLang Model Deployment: the ClearML app definition (form and dashboard), generated from the app's\n"
              "# schema by `clearml-sglang wizard`: do not edit. JSON-shaped HOCON.\n")
    return header + json.dumps(app_definition(repository, branch), indent=2, ensure_ascii=False) + "\n"
