"""The app around the task: the app definition (form + dashboard), the task template, the `clearml-task` line, and
`launch` / `clone` / `export --task` through the SDK seam (every call checked against the real SDK's signature).
"""

from __future__ import annotations

import argparse
import io
import json

import pytest
import yaml
from clearml import Task
from clearml.cli.task.__main__ import setup_parser
from pyhocon import ConfigFactory

from app.clearml.task import TaskService, map_host_port
from app.clearml.templates import (
    REQUIREMENTS,
    TEMPLATE_FILE,
    TaskDefinition,
    clearml_task_argv,
    render_clearml_task_block,
)
from app.clearml.wizard import APP_FILE, render, wizard_entries
from app.cli import _cmd_clone, _cmd_export, _cmd_launch, _cmd_template, build_parser
from app.config import load_config, parse_config, schema, to_hyperparameters, to_mapping
from app.config.docs import DEPLOYING_PAGE
from app.config.sources import parse_config_text
from app.errors import ConfigError
from tests.conftest import EXAMPLES, ROOT, run_cli
from tests.unit.test_clearml_task import Recorder

SECRET = "hf_" + "S" * 34


# ----- generated files -----

def test_committed_app_definition_and_template_are_what_the_schema_generates():
    assert (ROOT / APP_FILE).read_text() == render(), "run scripts/update_generated.py"
    assert (ROOT / TEMPLATE_FILE).read_text() == TaskDefinition().to_yaml(), "run scripts/update_generated.py"
    assert render_clearml_task_block() in (ROOT / DEPLOYING_PAGE).read_text(), "run scripts/update_generated.py"


def test_app_definition_parses_as_hocon_with_its_parts():
    conf = ConfigFactory.parse_string((ROOT / APP_FILE).read_text())
    assert conf["name"] == "SGLang Model Deployment"
    assert conf["task"]["script"]["entry_point"] == "task_templates/sglang_task.py"
    assert conf["task"]["container"]["image"] == "lmsysorg/sglang:v0.5.23"
    assert conf["task"]["hyperparams"]["Models"]["models"] == "[]"
    assert [e["name"] for e in conf["wizard"]["entries"]] == [
        "name", "project", "queue", "gateway_route", "models", "general", "env", "idle", "benchmark", "tokens",
        "limits"]


def _targets() -> dict[str, list[str]]:
    """Schema path -> where the form writes it (one entry per field)."""
    found: dict[str, list[str]] = {}
    for entry in wizard_entries():
        if entry["type"] == "list" and entry["name"] == "models":
            target = entry["target"]
            assert (target["field"], target["section"], target["name"], target["format"]) == \
                   ("hyperparams", "Models", "models", "json")
            for item in entry["item_template"]:
                path = ("models[].lora." + item["name"][5:]) if item["name"].startswith("lora.") \
                    else "models[]." + item["name"]
                found.setdefault(path, []).append("Models/models:" + item["name"])
        elif entry["type"] == "group":
            for item in entry["item_template"]:
                t = item["target"]
                found.setdefault(f"{entry['name']}.{item['name']}", []).append(f"{t['section']}/{t['name']}")
        elif "target" in entry and entry["name"] != "env":
            t = entry["target"]
            section = {"Instance": "instance", "Auth": "auth"}[t["section"]]
            found.setdefault(f"{section}.{entry['name']}", []).append(f"{t['section']}/{t['name']}")
    return found


def test_every_schema_field_is_in_the_form_once_with_its_target():
    found = _targets()
    for f in schema.ALL_FIELDS:
        assert len(found.get(f.path, [])) == 1, f.path
        where = found[f.path][0]
        if f.section in ("model", "lora"):
            assert where == "Models/models:" + (f"lora.{f.key}" if f.section == "lora" else f.key)
        else:
            assert where == {"instance": "Instance", "general": "General", "idle": "Idle",
                             "benchmark": "Benchmark", "auth": "Auth"}[f.section] + "/" + f.key
    assert set(found) == {f.path for f in schema.ALL_FIELDS}


def test_lora_fields_show_only_when_lora_is_enabled():
    (models,) = [e for e in wizard_entries() if e["name"] == "models"]
    for item in models["item_template"]:
        if item["name"].startswith("lora.") and item["name"] != "lora.enable":
            assert item["conditional"] == {"entries": [{"name": "lora.enable", "value": True}]}
        else:
            assert "conditional" not in item


def form_output(config) -> dict[str, str]:
    """What the app form writes for a config: its targets, with the lists as JSON."""
    mapping = to_mapping(config, secrets=True)
    params = {f"Instance/{k}": str(v) for k, v in mapping["instance"].items()}
    items = []
    for model in mapping["models"]:
        item = {k: v for k, v in model.items() if k != "lora"}
        item.update({f"lora.{k}": v for k, v in model["lora"].items()})
        items.append(item)
    params["Models/models"] = json.dumps(items)
    params.update({f"General/{k}": json.dumps(v) if isinstance(v, list) else str(v)
                   for k, v in mapping["general"].items()})
    params["Environment/variables"] = json.dumps([{"name": k, "value": v} for k, v in mapping["env"].items()])
    params.update({f"Idle/{k}": str(v) for k, v in mapping["idle"].items()})
    params.update({f"Benchmark/{k}": json.dumps(v) if isinstance(v, (list, bool)) else str(v)
                   for k, v in mapping["benchmark"].items()})
    params["Auth/tokens"] = json.dumps(mapping["auth"]["tokens"])
    params["Auth/limits"] = json.dumps(mapping["auth"]["limits"])
    return params


def test_what_the_form_writes_deploys_as_the_same_config():
    config = load_config(EXAMPLES / "lora.yaml", ["env.NCCL_DEBUG=WARN", "models.1.model=org/b",
                                                  "general.schedule-policy=lpm", f"general.hf_token={SECRET}",
                                                  "benchmark.enable=true", "benchmark.concurrencies=2,16",
                                                  "auth.tokens=alice=" + "t" * 20,
                                                  "auth.limits={alice: {rpm: 60, models: [llama]}}"])
    assert config.auth.limits_for("alice").models == ("llama",)
    assert load_config(hyperparameters=form_output(config)) == config


def test_dashboard_names_only_series_the_app_reports_or_clearml_monitors():
    import inspect

    import clearml.utilities.resource_monitor as monitor

    from app.clearml import reporting

    source = inspect.getsource(monitor)
    conf = ConfigFactory.parse_string(render())
    app_series = {reporting.REQUESTS: {"total"}, reporting.TOKENS: {"generation", "prompt"},
                  reporting.LATENCY: {"mean", "p50", "p95", "time to first token p50"},
                  reporting.IN_FLIGHT: {"total"}, reporting.IDLE_TIME: {"idle"}}
    kinds = set()
    for line in conf["dashboard"]["lines"]:
        for element in line["contents"]:
            kinds.add(element["type"])
            if element["type"] == "scalar" and element["metric"].startswith(":monitor:"):
                for variant in element["variant"]:
                    pattern = f'"{variant}"' if not variant.startswith("gpu_0_") else \
                        '"gpu_%d_' + variant[len("gpu_0_"):] + '" % i'
                    assert pattern in source, variant
            elif element["type"] == "scalar":
                assert set(element["variant"]) <= app_series[element["metric"]]
            elif element["type"] == "plot":
                assert (element["metric"], element["variant"]) in {(reporting.TABLE, "models"),
                                                                   (reporting.KEY_TABLE, "keys")}
            elif element["type"] == "html":
                for name in ("status", "idle_since", "endpoint", "models", "curl", "status_reason"):
                    if f"properties.{name}." in element["text"]:
                        kinds.add("property:" + name)
    assert {"html", "scalar", "plot", "log"} <= kinds
    assert {"property:status", "property:idle_since", "property:endpoint", "property:curl"} <= kinds


# ----- the task template and clearml-task -----

def test_template_requirements_are_requirements_txt():
    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert list(REQUIREMENTS) == lines


def recording_service():
    created: list[Recorder] = []

    def create(**kwargs):
        task = Recorder(Task, {"get_parameters": lambda **kw: dict(written),
                               "update_parameters": lambda values, **kw: written.update(values),
                               "set_parameters": lambda values, **kw: (written.clear(), written.update(values)),
                               "get_output_log_web_page": "https://app.example/task"})
        task.id = f"task-{len(created)}"
        created.append(task)
        return task

    written: dict[str, str] = {}
    task_class = Recorder(Task, {"create": create, "clone": lambda **kw: create(), "get_task": lambda **kw:
                                 created[0] if created else create(), "is_offline": False})
    return TaskService(task_class), task_class, created, written


def options(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def test_template_builds_the_task_the_template_file_describes():
    service, task_class, created, written = recording_service()
    out = io.StringIO()
    _cmd_template(options("template", "--repo", "https://git.example/app.git", "--branch", "main"), out,
                  service=service)
    template = yaml.safe_load((ROOT / TEMPLATE_FILE).read_text())
    ((_, create),) = task_class.named("create")
    assert create == {
        "project_name": template["project"], "task_name": template["name"], "task_type": template["task_type"],
        "repo": "https://git.example/app.git", "branch": "main", "script": template["script"]["entry_point"],
        "working_directory": template["script"]["working_dir"], "packages": template["requirements"],
        "docker": template["container"]["image"], "docker_args": template["container"]["arguments"],
        "add_task_init_call": False}
    assert written == {h["name"]: h["value"] for h in template["hyperparameters"]}
    (task,) = created
    ((_, kwargs),) = task.named("update_parameters")
    assert kwargs["__parameters_types"] == {h["name"]: h["type"] for h in template["hyperparameters"]}
    assert json.loads(out.getvalue())["task"] == "task-0"


def test_readme_clearml_task_line_is_what_clearml_task_understands():
    argv = clearml_task_argv(TaskDefinition(), repo="https://git.example/app.git", branch="main", queue="gpu",
                             overrides=["models.0.model=org/m", "models.0.lora.modules=a=org/a,b=org/b"], name="x")
    parser = argparse.ArgumentParser()
    setup_parser(parser)
    args = parser.parse_args(argv[1:])
    definition = TaskDefinition()
    assert (args.project, args.name, args.task_type, args.repo, args.branch) == \
           (definition.project, "x", "application", "https://git.example/app.git", "main")
    assert (args.script, args.cwd, args.docker, args.docker_args) == \
           (definition.script, ".", definition.docker_image, definition.docker_args)
    assert args.packages == list(REQUIREMENTS) and args.skip_task_init and args.queue == "gpu"
    assert args.args == ["models.0.model=org/m", "models.0.lora.modules=a=org/a,b=org/b"]
    # what the instance makes of them: its Args section, applied like --set
    params = {f"Args/{a.split('=', 1)[0]}": a.split("=", 1)[1] for a in args.args}
    overrides = [f"{k[5:]}={v}" for k, v in params.items()]
    config = load_config(hyperparameters=params, overrides=overrides)
    assert config.models[0].model == "org/m" and [m.name for m in config.models[0].lora.modules] == ["a", "b"]


# ----- launch, clone, export --task -----

def test_launch_then_export_gives_back_the_config_without_secrets(tmp_path):
    service, task_class, created, written = recording_service()
    source = tmp_path / "x.yaml"
    source.write_text((EXAMPLES / "lora.yaml").read_text() + f"general: {{hf_token: {SECRET}}}\n")
    config = load_config(source)
    out = io.StringIO()
    _cmd_launch(options("launch", "--config", str(source), "--queue", "gpu", "--repo", "r"), out, service=service)
    assert task_class.named("enqueue") == [((), {"task": created[0], "queue_name": "gpu"})]
    assert written["General/hf_token"] == SECRET  # the instance needs it to run

    exported = io.StringIO()
    _cmd_export(options("export", "--task", created[0].id), exported, service=service)
    text = exported.getvalue()
    assert SECRET not in text
    assert parse_config(parse_config_text(text)) == config.without_secrets()
    assert to_mapping(parse_config(parse_config_text(text))) == to_mapping(config)


def test_clone_applies_changes_and_replaces_the_old_form():
    service, task_class, created, written = recording_service()
    base = load_config(EXAMPLES / "two-models.yaml")
    source = service.create(TaskDefinition(), project="p", name="n", repo="r", branch="b")
    service.write(source, to_hyperparameters(base))
    _cmd_clone(options("clone", "--task", source.id, "--set", "models.0.gpus=4", "--queue", "gpu"), io.StringIO(),
               service=service)
    clone_config = load_config(hyperparameters=written)
    assert clone_config.models[0].gpus == 4 and clone_config.models[1] == base.models[1]
    ((_, kwargs),) = task_class.named("clone")
    assert kwargs == {"source_task": source.id, "name": None}


@pytest.mark.parametrize("content, field", [
    ("{not json or yaml: [", "config file"),
    ('{"models": [{"model": "org/m"}], "genral": {}}', "genral"),
    ('{"models": [{"model": "org/m", "gpus": 0}]}', "models[0].gpus"),
])
def test_launch_refuses_a_bad_file_and_creates_no_task(tmp_path, content, field):
    path = tmp_path / "bad.json"
    path.write_text(content)
    result = run_cli("launch", "--config", str(path), "--queue", "gpu", "--repo", "r")
    assert result.code == 2 and field in result.err and "Traceback" not in result.err
    service, task_class, created, _ = recording_service()
    with pytest.raises(ConfigError):
        _cmd_launch(options("launch", "--config", str(path), "--queue", "gpu"), io.StringIO(), service=service)
    assert task_class.calls == [] and created == []


def test_agent_port_mapping():
    assert map_host_port("10001:8000", 8000) == 10001
    assert map_host_port("10000-10010:8000-8010", 8003) == 10003
    assert map_host_port("10001:9000", 8000) == 8000
    assert map_host_port(None, 8000) == 8000
    assert map_host_port("garbage", 8000) == 8000
