"""What the task records, read back from ClearML's offline session: the dashboard's data, with the real SDK.

Each test runs `clearml-sglang run` (app.run.run_service) in a process of its own, with stand-in engines and
ClearML in offline mode, sends it real traffic, lets it shut down, and reads the session's `metrics.jsonl`,
`log.jsonl` and `task.json` as the dashboard would. Each key's usage is also reported straight through the reporter,
on a real offline task of its own, with counts that must read back exactly.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
import requests

from app.serving.network import free_ports
from tests.conftest import ROOT

TOKEN = "offline-test-token-" + "k" * 16
HF_TOKEN = "hf_" + "W" * 34
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CAPPED = "offline-test-capped-" + "c" * 16  # a named key with 2 requests a minute
KEYS = (f"auth.tokens={TOKEN},capped={CAPPED}", 'auth.limits={"capped": {"rpm": 2}}')
# the stand-in engines run anywhere: "cpu" keeps the app from asking for an NVIDIA GPU
MODEL = ("models.0.model=org/m", "models.0.endpoint_name=m", "general.device=cpu")
LOCAL_RUN_SETTINGS = ("idle.time_limit_hours=0.0014", "idle.report_interval_seconds=1",
                      "env.FAKE_SGLANG_TOKEN_DELAY_SECONDS=0.01")


def free_port() -> int:
    """A port for the app under test, below the range outgoing connections take theirs from (`free_ports`)."""
    return free_ports(1)[0]


def start(cache: Path, *overrides: str, env: dict[str, str] | None = None,
          shell_first: str | None = None) -> tuple[subprocess.Popen, str]:
    """`shell_first`: a shell command run before the app, in the shape of a Dockerfile's or an agent's
    `bash -c "pip install … && clearml-sglang run"` (bash execs the last command: the app runs in the shell's
    process)."""
    port = free_port()
    argv = [sys.executable, "-m", "tests.integration.clearml_run", "--port", str(port)]
    for override in overrides:
        argv += ["--set", override]
    if shell_first is not None:
        argv = ["bash", "-c", f"{shell_first} && exec {shlex.join(argv)}"]
    environment = {**os.environ, "CLEARML_CACHE_DIR": str(cache), "CLEARML_OFFLINE_MODE": "1",
                   "HOME": str(cache / "home"), **(env or {})}
    environment.pop("CLEARML_TASK_ID", None) if not env or "CLEARML_TASK_ID" not in env else None
    process = subprocess.Popen(argv, cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    return process, f"http://127.0.0.1:{port}"


def wait_ready(process: subprocess.Popen, base: str, deadline_s: float = 60) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if process.poll() is not None:
            raise AssertionError(f"run ended early with {process.returncode}:\n{process.stdout.read()}")
        try:
            if requests.get(base + "/readyz", timeout=2).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):  # not listening yet, or a busy machine
            pass
        time.sleep(0.1)
    raise AssertionError("not ready in time")


def traffic(base: str) -> dict[str, list[int]]:
    """Requests of two keys; what their clients counted: [requests, errors, rate-limited, prompt, completion
    tokens] by key, from the answers (their statuses, and the engine's `usage` in each)."""
    counted = {"token-1": [0] * 5, "capped": [0] * 5}

    def count(key: str, status: int, usage: dict | None) -> None:
        row = counted[key]
        row[0] += 1
        row[1] += status >= 400 and status != 429
        row[2] += status == 429
        row[3] += (usage or {}).get("prompt_tokens", 0)
        row[4] += (usage or {}).get("completion_tokens", 0)

    for i in range(3):
        r = requests.post(base + "/v1/chat/completions", headers=AUTH, timeout=10,
                          json={"model": "m", "messages": [{"role": "user", "content": f"hello {i}"}],
                                "max_tokens": 8})
        assert r.status_code == 200
        count("token-1", r.status_code, r.json()["usage"])
    for _ in range(2):
        r = requests.post(base + "/m/v1/chat/completions", headers=AUTH, timeout=10, stream=True,
                          json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
                                "stream": True, "stream_options": {"include_usage": True}})
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith(b"data: {")]
        assert r.status_code == 200 and chunks[-1]["choices"] == []
        count("token-1", r.status_code, chunks[-1]["usage"])
    for i in range(3):  # the third is over its rpm
        r = requests.post(base + "/v1/chat/completions", headers={"Authorization": f"Bearer {CAPPED}"}, timeout=10,
                          json={"model": "m", "messages": [{"role": "user", "content": f"capped {i}"}],
                                "max_tokens": 5})
        count("capped", r.status_code, r.json().get("usage"))
    assert [row[2] for row in counted.values()] == [0, 1]
    return counted


def session(cache: Path, task_id: str | None = None) -> Path:
    folders = [p for p in (cache / "offline").iterdir() if p.is_dir() and (task_id is None or p.name == task_id)]
    assert len(folders) == 1, folders
    return folders[0]


def events(folder: Path, name: str) -> list[dict]:
    path = folder / name
    return [e for line in path.read_text().splitlines() for e in json.loads(line)] if path.exists() else []


def scalars(folder: Path) -> dict[tuple[str, str], list[tuple[int, float]]]:
    out: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for e in events(folder, "metrics.jsonl"):
        if e["type"] == "training_stats_scalar":
            out.setdefault((e["metric"], e["variant"]), []).append((e["iter"], e["value"]))
    return out


def console(folder: Path) -> str:
    return "\n".join(e["msg"] for e in events(folder, "log.jsonl"))


def properties(folder: Path) -> dict[str, str]:
    task = json.loads((folder / "task.json").read_text())
    return {k: v["value"] for k, v in task["hyperparams"].get("properties", {}).items()}


def wait_status(cache: Path, status: str, deadline_s: float = 30) -> None:
    wait_property(cache, "status", lambda value: value == status, f"status never became {status!r}", deadline_s)


def wait_property(cache: Path, name: str, holds, failure: str, deadline_s: float = 30) -> None:
    """Until the task's property `name` holds (`holds(value)`, value None while it is unset)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            if holds(properties(session(cache)).get(name)):
                return
        except (AssertionError, OSError, ValueError, KeyError):
            pass  # the session or its task.json is not there yet, or half written
        time.sleep(0.05)
    raise AssertionError(failure)


def no_process_left() -> None:
    deadline = time.monotonic() + 10
    while psutil.Process().children(recursive=True) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not psutil.Process().children(recursive=True)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """One local run, offline: traffic, then an idle shutdown (5 s limit, 1 s reports)."""
    cache = tmp_path_factory.mktemp("clearml")
    process, base = start(cache, *MODEL, *KEYS, f"general.hf_token={HF_TOKEN}", *LOCAL_RUN_SETTINGS)
    try:
        wait_ready(process, base)
        wait_status(cache, "idle")  # the dashboard saw it idle before any request
        (cache / "client-counts.json").write_text(json.dumps(traffic(base)))
        code = process.wait(timeout=60)
        output = process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
    no_process_left()
    return code, output, session(cache)


def test_idle_shutdown_exits_0(local_run):
    code, output, _ = local_run
    assert code == 0, output


def test_every_dashboard_series_is_recorded_with_plausible_values(local_run):
    _, _, folder = local_run
    series = scalars(folder)
    for key in [("Total Number of Requests", "m"), ("Total Number of Requests", "total"),
                ("Tokens per Second", "generation"), ("Tokens per Second", "prompt"),
                ("Latency (ms)", "mean"), ("Latency (ms)", "p50"), ("Latency (ms)", "p95"),
                ("Latency (ms)", "time to first token p50"), ("Requests in Flight", "total"),
                ("Idle Time (hours)", "idle")]:
        assert key in series, key
    assert series[("Total Number of Requests", "total")][-1][1] == 7  # (the rate-limited request reached none)
    assert max(v for _, v in series[("Tokens per Second", "generation")]) > 0
    assert all(0 < v < 10_000 for _, v in series[("Latency (ms)", "p50")])
    assert all(v >= 0 for _, v in series[("Requests in Flight", "total")])
    iterations = [i for i, _ in series[("Idle Time (hours)", "idle")]]
    assert iterations == sorted(iterations) and iterations[-1] >= 3  # seconds since start, growing
    assert max(v for _, v in series[("Idle Time (hours)", "idle")]) > 0


def test_machine_metrics_come_from_clearmls_monitor(local_run):
    _, _, folder = local_run
    machine = {variant for (metric, variant) in scalars(folder) if metric == ":monitor:machine"}
    assert {"cpu_usage", "memory_used_gb", "network_rx_mbs", "io_read_mbs"} <= machine


def test_status_sequence_and_properties(local_run):
    _, _, folder = local_run
    statuses = [line.split("Status: ", 1)[1].split(" ")[0] for line in console(folder).splitlines()
                if "app.clearml.reporting: Status: " in line]
    assert statuses[0] == "loading" and statuses[-1] == "stopped"
    compressed = [s for i, s in enumerate(statuses) if i == 0 or statuses[i - 1] != s]
    assert compressed == ["loading", "idle", "active", "idle", "stopped"]
    props = properties(folder)
    assert props["status"] == "stopped" and props["status_reason"] == "idle time limit reached"
    assert props["endpoint"].startswith("http://127.0.0.1:")
    assert json.loads(props["models"]) == {"m": props["endpoint"] + "/m/v1"}
    assert "'Authorization: Bearer YOUR_TOKEN'" in props["curl"] and "/m/v1/chat/completions" in props["curl"]
    assert props["idle_since"]  # it ended idle


def test_startup_phases_in_order_in_the_console_the_status_reasons_and_the_properties(local_run):
    _, _, folder = local_run
    lines = console(folder).splitlines()
    phases = ["starting SGLang", "loading weights", "allocating memory", "warming up", "ready"]
    reasons = [next(i for i, line in enumerate(lines) if f"Status: loading (m: {phase})" in line) for phase in phases]
    summary = next(i for i, line in enumerate(lines) if "Ready in " in line)
    # (the `ready` reason is told on the reporter's thread: its line may come just after the summary's)
    assert reasons == sorted(reasons) and summary > reasons[-2]
    assert "fetching models" in lines[summary + 1]  # the summary's phases follow its first line
    props = properties(folder)
    assert props["startup"].startswith("fetching models ") and "m: starting SGLang " in props["startup"]
    assert 0 <= float(props["startup_own_seconds"]) < float(props["startup_seconds"])


def test_deployed_models_table(local_run):
    _, _, folder = local_run
    tables = [json.loads(e["plot_str"]) for e in events(folder, "metrics.jsonl")
              if e["type"] == "plot" and e.get("metric") == "Deployed Models"]
    cells = tables[-1]["data"][0]["cells"]["values"]
    assert cells[0] == ["org/m"] and cells[1] == ["m"] and cells[3] == ["stopped"]
    assert any(t["data"][0]["cells"]["values"][3] == ["resident"] for t in tables)


def test_console_has_setup_status_and_engine_lines(local_run):
    _, _, folder = local_run
    text = console(folder)
    assert "Starting engine m on port " in text
    engine_lines = [line for line in (entry.split(": ", 1)[-1] for entry in text.splitlines()) if line[:4] == "[m] "]
    assert not engine_lines  # a start without a problem: the engine's own lines in debug mode only
    assert "Status: active" in text and "Endpoint: http://127.0.0.1:" in text


def test_configuration_is_a_readable_form_without_secrets(local_run):
    _, _, folder = local_run
    hyperparams = json.loads((folder / "task.json").read_text())["hyperparams"]
    model = hyperparams["Models"]["0/model"]
    assert model["value"] == "org/m" and model["type"] == "str" and model["description"].startswith("Model:")
    assert hyperparams["Idle"]["report_interval_seconds"]["type"] == "int"
    assert hyperparams["General"]["hf_token"]["value"] == ""
    assert hyperparams["Auth"]["tokens"]["value"] == "[]"


def test_the_form_written_by_the_real_sdk_reads_back_as_the_config(local_run):
    from app.config import load_config

    _, _, folder = local_run
    hyperparams = json.loads((folder / "task.json").read_text())["hyperparams"]
    params = {f"{section}/{name}": item["value"] for section, items in hyperparams.items()
              for name, item in items.items()}
    expected = load_config(overrides=[*MODEL, *KEYS, f"general.hf_token={HF_TOKEN}", *LOCAL_RUN_SETTINGS])
    assert load_config(hyperparameters=params) == expected.without_secrets()


def test_tokens_appear_in_no_session_file_and_not_on_the_console(local_run):
    _, output, folder = local_run
    for path in folder.rglob("*"):
        if path.is_file():
            text = path.read_bytes()
            assert not any(secret.encode() in text for secret in (TOKEN, CAPPED, HF_TOKEN)), path
    assert not any(secret in output for secret in (TOKEN, CAPPED, HF_TOKEN))


def test_each_keys_usage_on_the_task_is_what_its_clients_counted(local_run):
    _, output, folder = local_run
    counted = json.loads((folder.parent.parent / "client-counts.json").read_text())
    series = scalars(folder)
    for index, title in enumerate(["Usage: Requests", "Usage: Errors", "Usage: Rate-Limited Requests",
                                   "Usage: Prompt Tokens", "Usage: Completion Tokens"]):
        for key, counts in counted.items():
            assert series[(title, key)][-1][1] == counts[index], (title, key)
    tables = [json.loads(e["plot_str"])["data"][0] for e in events(folder, "metrics.jsonl")
              if e["type"] == "plot" and e.get("metric") == "Key Usage"]
    columns = tables[-1]["cells"]["values"]
    assert [list(row) for row in zip(*columns, strict=True)] == [
        ["capped", *counted["capped"]], ["token-1", *counted["token-1"]]]
    lines = (console(folder) + "\n" + output).splitlines()
    assert any("Traffic: " in line and "by key: " in line and "rate-limited" in line for line in lines)


def test_a_generated_token_is_shown_only_in_the_task_properties(tmp_path):
    cache = tmp_path
    process, base = start(cache, *MODEL, "idle.time_limit_hours=0.0003",
                          "idle.report_interval_seconds=1")
    try:
        wait_ready(process, base)
        code = process.wait(timeout=60)
        output = process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
    assert code == 0
    folder = session(cache)
    token = properties(folder)["access_token"]
    assert len(token) >= 40 and "Bearer YOUR_GENERATED_TOKEN" in properties(folder)["curl"]
    assert token not in output and token not in console(folder)
    assert token not in (folder / "metrics.jsonl").read_text()
    no_process_left()


def test_ready_in_counts_from_the_apps_start_not_from_the_shell_that_execd_it(tmp_path):
    began = time.monotonic()
    process, base = start(tmp_path, *MODEL, "idle.time_limit_hours=0.0003", "idle.report_interval_seconds=1",
                          shell_first="sleep 4")
    try:
        wait_ready(process, base)
        wall_s = time.monotonic() - began - 4
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    reported = float(properties(session(tmp_path))["startup_seconds"])
    assert wall_s - 2 <= reported <= wall_s + 0.5, (reported, wall_s)  # (ready is noticed up to 0.1 s late)
    no_process_left()


def test_simulated_agent_run_deploys_the_values_edited_in_the_ui(local_run, tmp_path):
    _, _, source = local_run
    task = json.loads((source / "task.json").read_text())
    task_id = "offline-" + uuid.uuid4().hex
    task["id"] = task_id
    params = task["hyperparams"]
    params["Models"]["0/endpoint_name"]["value"] = "edited"          # what a user changes in the UI's form
    params["General"]["max-running-requests"] = {"section": "General", "name": "max-running-requests",
                                                 "value": "7", "type": "int", "description": ""}
    params["Idle"]["time_limit_hours"]["value"] = "0.0006"
    params["General"]["debug"]["value"] = "true"  # (the engine's command line is on the console in debug mode)
    params["Auth"]["tokens"]["value"] = json.dumps([TOKEN, f"capped={CAPPED}"])  # (auth.limits names capped)
    params.pop("properties", None)
    seeded = tmp_path / "offline" / task_id
    seeded.mkdir(parents=True)
    (seeded / "task.json").write_text(json.dumps(task))

    process, base = start(tmp_path, env={"CLEARML_TASK_ID": task_id})
    try:
        wait_ready(process, base)
        r = requests.post(base + "/edited/v1/chat/completions", headers=AUTH, timeout=10,
                          json={"model": "edited", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200
        code = process.wait(timeout=60)
        output = process.stdout.read()
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
    assert code == 0, output
    assert f"Configuration read from task {task_id}" in output
    assert "--served-model-name edited" in output and "--max-running-requests 7" in output
    no_process_left()


def test_the_app_dashboard_plots_series_this_run_recorded(local_run):
    """Every dashboard element of the app definition names something this offline session really holds (GPU
    monitors aside: this machine has no GPU; their names are checked against ClearML's monitor in the unit tests)."""
    from pyhocon import ConfigFactory

    from app.clearml.wizard import render

    _, _, folder = local_run
    recorded = set(scalars(folder))
    plots = {(e.get("metric"), e.get("variant")) for e in events(folder, "metrics.jsonl") if e["type"] == "plot"}
    props = properties(folder)
    for line in ConfigFactory.parse_string(render())["dashboard"]["lines"]:
        for element in line["contents"]:
            if element["type"] == "scalar" and element["metric"] != ":monitor:gpu":
                for variant in element["variant"]:
                    assert (element["metric"], variant) in recorded, (element["metric"], variant)
            elif element["type"] == "plot":
                assert (element["metric"], element["variant"]) in plots
            elif element["type"] == "html":
                for name in [p.split(".")[0] for p in element["text"].split("${hyperparams.properties.")[1:]]:
                    assert name in props, name


# Reports with each key's usage so far, through the reporter, on a real task (offline): (elapsed, {key: usage}).
KEY_REPORTS = [(1.2, {"alice": [0, 0, 0, 0, 0], "token-2": [0, 0, 0, 0, 0]}),
               (2.5, {"alice": [3, 1, 2, 40, 25], "token-2": [1, 0, 0, 10, 5]}),
               (3.1, {"alice": [3, 1, 2, 40, 25], "token-2": [1, 0, 0, 10, 5]}),  # nothing new: no table written
               (4.0, {"alice": [7, 1, 2, 95, 61], "token-2": [4, 2, 1, 33, 17]})]
KEY_SNIPPET = """
import json, sys
from app.clearml.reporting import TaskReporter
from app.clearml.task import DeploymentTask
from app.keys import KeyUsage
from app.serving.report import Report
from app.states import Status
from app.statistics import WindowSummary
task = DeploymentTask.start(project="p", name="key-usage", offline=True, monitor_interval_s=5)
reporter = TaskReporter(task, models={"m": "org/m"})
quiet = WindowSummary(0, 0, None, None, None, None, 0, 0)
for elapsed, keys in json.loads(sys.argv[1]):
    usage = {name: KeyUsage(*counts) for name, counts in keys.items()}
    reporter.report(Report(elapsed, Status.ACTIVE, 0, 0.0, {"m": "resident"}, {"m": 0}, {"m": 0.0}, quiet, keys=usage))
sys.exit(0 if task.close() else 1)
"""


def test_each_keys_usage_reads_back_from_the_offline_session_as_reported(tmp_path):
    env = {**os.environ, "CLEARML_CACHE_DIR": str(tmp_path), "CLEARML_OFFLINE_MODE": "1", "PYTHONPATH": str(ROOT),
           "HOME": str(tmp_path / "home")}
    env.pop("CLEARML_TASK_ID", None)
    result = subprocess.run([sys.executable, "-c", KEY_SNIPPET, json.dumps(KEY_REPORTS)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    folder = session(tmp_path)
    series = scalars(folder)
    for index, title in enumerate(["Usage: Requests", "Usage: Errors", "Usage: Rate-Limited Requests",
                                   "Usage: Prompt Tokens", "Usage: Completion Tokens"]):
        assert {variant for metric, variant in series if metric == title} == {"alice", "token-2"}, title
        for key in ("alice", "token-2"):  # iteration: whole seconds since start; the value: the count so far
            assert series[(title, key)] == [(int(elapsed), keys[key][index]) for elapsed, keys in KEY_REPORTS]
    tables = [json.loads(e["plot_str"])["data"][0] for e in events(folder, "metrics.jsonl")
              if e["type"] == "plot" and e.get("metric") == "Key Usage"]
    assert len(tables) == 3  # written when it changed
    header, columns = tables[-1]["header"]["values"], tables[-1]["cells"]["values"]
    assert header == ["Key", "Requests", "Errors", "Rate-limited", "Prompt tokens", "Completion tokens"]
    assert [list(row) for row in zip(*columns, strict=True)] == [
        ["alice", 7, 1, 2, 95, 61], ["token-2", 4, 2, 1, 33, 17]]


def test_a_model_that_cannot_fit_is_refused_in_seconds_before_any_engine_starts(tmp_path):
    from tests.unit.test_preflight import LLAMA_70B, fabricate, llama_tensors

    big = fabricate(tmp_path / "llama-70b", LLAMA_70B, llama_tensors(LLAMA_70B))
    began = time.monotonic()
    process, _ = start(tmp_path, f"models.0.model={big}", "general.device=cpu")
    said_at, lines = None, []
    for line in process.stdout:  # the refusal is on the console before ClearML's session closes
        lines.append(line)
        if "its weights take 131.4 GiB, more than the" in line and said_at is None:
            said_at = time.monotonic() - began
            assert not [p for p in psutil.Process(process.pid).children(recursive=True)
                        if "sglang" in " ".join(p.cmdline())], "an engine was started"
    code = process.wait(timeout=60)
    assert code == 2, "".join(lines)
    assert said_at is not None and said_at <= 5, (said_at, "".join(lines))
    props = properties(session(tmp_path))
    assert props["status"] == "failed" and "its weights take 131.4 GiB" in props["status_reason"]
    assert "131.4 GiB" in props["preflight"]
    assert "".join(lines).count("its weights take 131.4 GiB") == 1  # told once
    no_process_left()


def test_the_startup_summary_and_the_preflight_property_say_the_pool_and_the_parsers_chosen(tmp_path):
    from tests.unit.test_preflight import LLAMA3_TEMPLATE, fabricate

    small = fabricate(tmp_path / "llama3-small", {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024, "torch_dtype": "bfloat16"})
    (small / "tokenizer_config.json").write_text(json.dumps({"chat_template": LLAMA3_TEMPLATE}))
    process, base = start(tmp_path, f"models.0.model={small}", "models.0.endpoint_name=m", "general.device=cpu")
    try:
        wait_ready(process, base)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    folder = session(tmp_path)
    text = console(folder)
    # 2 layers x 2 KV heads x 16 x 2 x 2 bytes = 256 a token; 8 contexts of 1,024 tokens
    assert "  m: KV pool 8,192 tokens (8 contexts of 1,024 tokens): 2.0 MiB; expected resident" in text
    assert "  m: parsers for Llama 3.1+: tool-call-parser llama3" in text
    assert "m: tool-call-parser llama3 (for Llama 3.1+)" in properties(folder)["preflight"]
    no_process_left()
