"""The ClearML adapter's calls into the SDK, pinned through its seam: a recording task whose every call is checked
against the real SDK's signature (`inspect.signature(...).bind`), for what offline mode cannot run: the App
Gateway (Enterprise), Model Endpoints telemetry (needs a server), the abort callback and final statuses.
"""

from __future__ import annotations

import inspect

import pytest
from clearml import Logger, Task
from clearml.router.endpoint_telemetry import EndpointTelemetry

from app.clearml.reporting import TaskReporter
from app.clearml.task import DeploymentTask, server_configured
from app.config import load_config, to_hyperparameters
from app.gateway.stats import RequestRecord, RequestStats
from app.serving.idle import IdleDecision
from app.serving.network import curl_command
from app.serving.report import Report


def snapshot(elapsed_s, decision, stats, states, **rest) -> Report:
    """What the deployment's readings make of its parts (`app.serving.readings.Readings.take`)."""
    return Report(elapsed_s, decision.state, decision.in_flight, decision.idle_for_s, dict(states),
                  dict(stats.requests), dict(stats.latency_sum_s), stats.take_window(), **rest)


class Recorder:
    """Stands in for an SDK object: records calls, after checking them against the real class's signature."""

    def __init__(self, real: type, returns: dict | None = None):
        self._real = real
        self._returns = returns or {}
        self.calls: list[tuple[str, tuple, dict]] = []

    def __getattr__(self, name: str):
        target = getattr(self._real, name)

        bound = inspect.ismethod(target)  # a classmethod: no `self` to stand in for

        def call(*args, **kwargs):
            signature = inspect.signature(target)
            signature.bind(*args, **kwargs) if bound else signature.bind(None, *args, **kwargs)  # TypeError if wrong
            self.calls.append((name, args, kwargs))
            value = self._returns.get(name)
            return value(*args, **kwargs) if callable(value) else value
        return call

    def named(self, name: str) -> list[tuple[tuple, dict]]:
        return [(a, k) for n, a, k in self.calls if n == name]


class FakeSession:
    def __init__(self, feature_set: str = "basic", api: str = "2.31"):
        self.feature_set = feature_set
        self.api = api

    def check_min_api_version(self, version: str) -> bool:
        return tuple(map(int, self.api.split("."))) >= tuple(map(int, version.split(".")))


def make_task(*, feature_set="basic", api="2.31", offline=False, remote=False, endpoint=None):
    logger = Recorder(Logger)
    task = Recorder(Task, {"get_logger": lambda: logger, "request_external_endpoint":
                           lambda **kw: {"endpoint": endpoint, "browser_endpoint": endpoint} if endpoint else None,
                           "get_parameters": {"Models/0/model": "org/m", "Args/x": "1"}})
    telemetry: list[dict] = []

    def telemetry_factory(**kwargs):
        inspect.signature(EndpointTelemetry.__init__).bind(None, **kwargs)
        record = {"kwargs": kwargs, "requests_num": 0, "requests_num_window": 0, "latency_sum_window": 0.0}
        telemetry.append(record)
        return TelemetryRecord(record)

    task.id = "task-123"
    adapter = DeploymentTask(task, remote=remote, offline=offline, session=FakeSession(feature_set, api),
                             telemetry_factory=telemetry_factory)
    return adapter, task, logger, telemetry


class TelemetryRecord:
    def __init__(self, record):
        object.__setattr__(self, "record", record)

    def __getattr__(self, name):
        return self.record[name]

    def __setattr__(self, name, value):
        self.record[name] = value

    def stop(self):
        self.record["stopped"] = True


def test_app_gateway_is_used_where_the_server_has_it():
    adapter, task, _, _ = make_task(feature_set="advanced", endpoint="https://router.example/service/abc/")
    reporter = TaskReporter(adapter, models={"m": "org/m"}, gateway_route="llm-route")
    assert reporter.base_url(8000, "http://10.0.0.5:8000") == "https://router.example/service/abc"
    ((args, kwargs),) = task.named("request_external_endpoint")
    assert kwargs == {"port": 8000, "protocol": "http", "wait": True, "wait_timeout_seconds": 90.0,
                      "static_route": "llm-route"}


def test_without_the_app_gateway_the_machine_address_is_published():
    for feature_set, offline in (("basic", False), ("advanced", True)):
        adapter, task, _, _ = make_task(feature_set=feature_set, offline=offline)
        reporter = TaskReporter(adapter, models={"m": "org/m"})
        assert reporter.base_url(8000, "http://10.0.0.5:8000") == "http://10.0.0.5:8000"
        assert task.named("request_external_endpoint") == []


def test_a_gateway_that_assigns_nothing_falls_back_to_the_machine():
    adapter, _, _, _ = make_task(feature_set="advanced", endpoint=None)
    assert TaskReporter(adapter, models={}).base_url(8000, "http://h:8000") == "http://h:8000"


def test_model_endpoints_telemetry_is_registered_and_fed_with_the_gateways_counts():
    adapter, task, _, telemetry = make_task(api="2.31")
    reporter = TaskReporter(adapter, models={"m": "org/m"})
    reporter.endpoints("http://h:8000", {"m": "http://h:8000/m/v1"}, curl_command("http://h:8000", "m"))
    (record,) = telemetry
    assert record["kwargs"] == {"endpoint_name": "m", "model_name": "org/m", "endpoint_url": "http://h:8000/m/v1",
                                "input_type": "json", "app_instance": "task-123"}
    stats = RequestStats()
    for latency in (0.1, 0.3):
        stats.record(RequestRecord("m", 200, latency_s=latency))
    decision = IdleDecision(False, 0.0, 0, "active", 0.0)
    reporter.report(snapshot(10, decision, stats, {"m": "resident"}, generation_per_s=5, prompt_per_s=1))
    reporter.report(snapshot(20, decision, stats, {"m": "resident"}, generation_per_s=5, prompt_per_s=1))
    assert record["requests_num"] == 2 and record["requests_num_window"] == 2
    assert record["latency_sum_window"] == pytest.approx(400.0)
    reporter.close()
    assert record["stopped"]


def test_no_telemetry_without_the_serving_api_or_offline():
    for api, offline in (("2.30", False), ("2.31", True)):
        adapter, _, _, telemetry = make_task(api=api, offline=offline)
        TaskReporter(adapter, models={"m": "org/m"}).endpoints("http://h", {"m": "http://h/m/v1"}, "curl")
        assert telemetry == []


def test_scalars_properties_and_table_under_the_dashboards_names():
    adapter, task, logger, _ = make_task()
    reporter = TaskReporter(adapter, models={"m": "org/m"}, wall_clock=lambda: 1_800_000_000.0)
    reporter.endpoints("http://h:8000", {"m": "http://h:8000/m/v1"}, "curl ...")
    stats = RequestStats()
    stats.record(RequestRecord("m", 200, latency_s=0.2, ttft_s=0.05, stream=True))
    reporter.report(snapshot(42.7, IdleDecision(False, 7200.0, 0, "idle", 0.0), stats, {"m": "resident"},
                             generation_per_s=12.5, prompt_per_s=3.0))
    reported = {(k["title"], k["series"]): (k["value"], k["iteration"]) for _, k in logger.named("report_scalar")}
    assert reported == {
        ("Total Number of Requests", "m"): (1.0, 42), ("Total Number of Requests", "total"): (1.0, 42),
        ("Tokens per Second", "generation"): (12.5, 42), ("Tokens per Second", "prompt"): (3.0, 42),
        ("Latency (ms)", "mean"): (200.0, 42), ("Latency (ms)", "p50"): (200.0, 42),
        ("Latency (ms)", "p95"): (200.0, 42), ("Latency (ms)", "time to first token p50"): (50.0, 42),
        ("Requests in Flight", "total"): (0.0, 42), ("Idle Time (hours)", "idle"): (2.0, 42)}
    properties = {k: v for _, kw in task.named("set_user_properties") for k, v in kw.items()}
    assert properties["endpoint"] == "http://h:8000" and properties["curl"] == "curl ..."
    assert properties["idle_since"] == "2027-01-15T06:00:00+00:00"
    ((_, table),) = logger.named("report_table")
    assert table["title"] == "Deployed Models" and table["iteration"] == 0
    assert table["table_plot"] == [["Model", "Endpoint name", "URL", "Status", "Last wake-up"],
                                   ["org/m", "m", "http://h:8000/m/v1", "resident", ""]]
    reporter.report(snapshot(43, IdleDecision(False, 0.0, 1, "active", 0.0), stats, {"m": "resident"}))
    assert len(logger.named("report_table")) == 1  # written again only when a state changes
    assert [k for _, k in task.named("set_user_properties")][-1] == {"idle_since": ""}


def test_wake_ups_and_wake_latency_are_reported_and_the_table_shows_the_last_wake_up():
    from app.serving.readings import wakes as snapshot_of
    from app.serving.residency import WakeStats

    adapter, _, logger, _ = make_task()
    reporter = TaskReporter(adapter, models={"a": "org/a", "b": "org/b"})
    reporter.endpoints("http://h:8000", {"a": "http://h:8000/a/v1", "b": "http://h:8000/b/v1"}, "curl ...")
    wakes = WakeStats({"a": 2, "b": 0}, {"a": 1_800_000_000.0})
    wakes.latencies_ms.extend([100.0, 300.0])
    stats = RequestStats()
    reporter.report(snapshot(10, IdleDecision(False, 0.0, 0, "idle", 0.0), stats, {"a": "resident", "b": "sleeping"},
                             wakes=snapshot_of(wakes)))
    reported = {(k["title"], k["series"]): k["value"] for _, k in logger.named("report_scalar")}
    assert reported[("Model Wake-ups", "a")] == 2.0 and reported[("Model Wake-ups", "b")] == 0.0
    # nearest rank, as the gateway's latencies: a percentile is one of the wake-ups measured
    assert reported[("Wake Latency (ms)", "p50")] == 100.0 and reported[("Wake Latency (ms)", "p95")] == 300.0
    ((_, table),) = logger.named("report_table")
    assert table["table_plot"][1:] == [["org/a", "a", "http://h:8000/a/v1", "resident", "2027-01-15T08:00:00+00:00"],
                                       ["org/b", "b", "http://h:8000/b/v1", "sleeping", ""]]


def test_replica_servers_get_their_request_counts_and_their_rows():
    adapter, _, logger, _ = make_task()
    reporter = TaskReporter(adapter, models={"tiny": "org/tiny"})
    reporter.endpoints("http://h:8000", {"tiny": "http://h:8000/tiny/v1"}, "curl ...")
    stats = RequestStats()
    reporter.report(snapshot(10, IdleDecision(False, 0.0, 0, "idle", 0.0), stats,
                             {"tiny": "resident", "tiny/0": "resident", "tiny/1": "restarting"},
                             replica_requests={"tiny/0": 7.0, "tiny/1": 5.0}))
    reported = {(k["title"], k["series"]): k["value"] for _, k in logger.named("report_scalar")}
    assert reported[("Replica Requests", "tiny/0")] == 7.0 and reported[("Replica Requests", "tiny/1")] == 5.0
    assert ("Total Number of Requests", "tiny/0") not in reported
    ((_, table),) = logger.named("report_table")
    assert [row[:4] for row in table["table_plot"][1:]] == [
        ["org/tiny", "tiny", "http://h:8000/tiny/v1", "resident"], ["org/tiny", "tiny/0", "", "resident"],
        ["org/tiny", "tiny/1", "", "restarting"]]


def test_hyperparameters_are_written_with_types_and_descriptions():
    adapter, task, _, _ = make_task()
    config = load_config(overrides=["models.0.model=org/m", "general.hf_token=hf_" + "x" * 30])
    adapter.write_hyperparameters(to_hyperparameters(config.without_secrets()))
    ((args, kwargs),) = task.named("update_parameters")
    values, descriptions, types = args[0], kwargs["__parameters_descriptions"], kwargs["__parameters_types"]
    assert values["Models/0/model"] == "org/m" and values["General/hf_token"] == ""
    assert types["Models/0/gpus"] == "int" and types["General/debug"] == "bool"
    assert descriptions["Idle/time_limit_hours"].startswith("Idle Time Limit (Hours):")
    assert adapter.read_hyperparameters() == {"Models/0/model": "org/m", "Args/x": "1"}


@pytest.mark.parametrize("remote, outcome, expected", [
    (False, "completed", [("mark_completed", {"status_message": "idle time limit reached"})]),
    (False, "stopped", [("mark_stopped", {"status_message": "idle time limit reached"})]),
    (False, "failed", [("mark_failed", {"status_reason": "idle time limit reached",
                                        "status_message": "idle time limit reached"})]),
    (True, "completed", []),  # under an agent, the agent sets it from the exit code
    (True, "stopped", []),
    (True, "failed", [("mark_failed", {"status_reason": "idle time limit reached",
                                       "status_message": "idle time limit reached"})]),
])
def test_final_status(remote, outcome, expected):
    adapter, task, _, _ = make_task(remote=remote)
    adapter.finish(outcome, "idle time limit reached")
    assert [(n, k) for n, _, k in task.calls] == expected


def test_abort_callback_is_registered_with_a_bounded_timeout():
    adapter, task, _, _ = make_task()

    def on_abort():
        pass

    adapter.on_abort(on_abort, timeout_s=120)
    assert task.named("register_abort_callback") == [((on_abort,), {"callback_execution_timeout": 120})]


def test_close_is_bounded_even_when_clearml_hangs():
    import threading

    release = threading.Event()

    class HangingTask:
        def close(self):
            release.wait(5)

    adapter = DeploymentTask(HangingTask(), remote=False, offline=True)
    assert adapter.close(timeout_s=0.2) is False
    release.set()


def test_server_configured(tmp_path):
    assert not server_configured({"HOME": str(tmp_path)})
    (tmp_path / "clearml.conf").write_text("api {}")
    assert server_configured({"HOME": str(tmp_path)})
    assert server_configured({"CLEARML_API_HOST": "https://api.example"})
    assert server_configured({"CLEARML_TASK_ID": "abc"})
    conf = tmp_path / "c.conf"
    conf.write_text("api {}")
    assert server_configured({"CLEARML_CONFIG_FILE": str(conf)})
    assert not server_configured({"CLEARML_CONFIG_FILE": str(tmp_path / "missing.conf"), "HOME": str(tmp_path)})


def test_adapters_loaded_on_request_get_their_loads_load_time_and_rows():
    from app.serving.adapters import AdapterStats
    from app.serving.report import AdapterLoads

    adapter, _, logger, _ = make_task()
    reporter = TaskReporter(adapter, models={"m": "org/m"})
    reporter.endpoints("http://h:8000", {"m": "http://h:8000/m/v1"}, "curl ...")
    stats = AdapterStats()
    stats.loads["m"] = 3
    stats.load_ms.extend([120.0, 80.0, 900.0])
    requests = RequestStats()
    report = AdapterLoads({"m": stats.loads["m"]}, stats.p(50), stats.p(95),
                          {"m:/data/adapters/sql": "loaded", "m:org/chat-lora": "loading"})
    reporter.report(snapshot(10, IdleDecision(False, 0.0, 0, "idle", 0.0), requests, {"m": "resident"},
                             adapters=report))
    reported = {(k["title"], k["series"]): k["value"] for _, k in logger.named("report_scalar")}
    assert reported[("Adapter Loads", "m")] == 3.0
    assert reported[("Adapter Load Time (ms)", "p50")] == 120.0 and reported[("Adapter Load Time (ms)", "p95")] == 900.0
    ((_, table),) = logger.named("report_table")
    url = "http://h:8000/m/v1"
    assert table["table_plot"][1:] == [["org/m", "m", url, "resident", ""],
                                       ["/data/adapters/sql", "m:/data/adapters/sql", url, "loaded", ""],
                                       ["org/chat-lora", "m:org/chat-lora", url, "loading", ""]]
    loaded = AdapterLoads({"m": stats.loads["m"]}, stats.p(50), stats.p(95),
                          {"m:/data/adapters/sql": "loaded", "m:org/chat-lora": "loaded"})
    reporter.report(snapshot(11, IdleDecision(False, 0.0, 0, "idle", 0.0), requests, {"m": "resident"},
                             adapters=loaded))
    tables = logger.named("report_table")
    assert len(tables) == 2 and tables[-1][1]["table_plot"][-1][3] == "loaded"  # rewritten: a state changed


def key_stats() -> RequestStats:
    """The gateway's counts of two keys and a third that sent nothing: alice's request served, two refused by her rate
    limits; token-2's two served, one answered 500."""
    stats = RequestStats()
    stats.add_keys(["alice", "idle-key", "token-2"])
    for key, status, prompt, completion in (("alice", 200, 11, 7), ("token-2", 200, 5, 3), ("token-2", 500, 4, 0)):
        stats.key_answered(key, status)
        stats.record(RequestRecord("m", status, 0.1, prompt_tokens=prompt, completion_tokens=completion, key=key))
    for _ in range(2):
        stats.key_answered("alice", 429, rate_limited=True)
    return stats


def test_each_keys_usage_is_a_series_of_every_usage_figure_and_a_row_of_the_key_usage_table():
    adapter, _, logger, _ = make_task()
    reporter = TaskReporter(adapter, models={"m": "org/m"})
    stats = key_stats()
    decision = IdleDecision(False, 0.0, 0, "active", 0.0)
    reporter.report(snapshot(12.9, decision, stats, {"m": "resident"}, keys=stats.key_usage()))
    usage = {(k["title"], k["series"]): (k["value"], k["iteration"]) for _, k in logger.named("report_scalar")
             if k["title"].startswith("Usage: ")}
    assert usage == {
        ("Usage: Requests", "alice"): (3.0, 12), ("Usage: Requests", "idle-key"): (0.0, 12),
        ("Usage: Requests", "token-2"): (2.0, 12),
        ("Usage: Errors", "alice"): (0.0, 12), ("Usage: Errors", "idle-key"): (0.0, 12),
        ("Usage: Errors", "token-2"): (1.0, 12),
        ("Usage: Rate-Limited Requests", "alice"): (2.0, 12), ("Usage: Rate-Limited Requests", "idle-key"): (0.0, 12),
        ("Usage: Rate-Limited Requests", "token-2"): (0.0, 12),
        ("Usage: Prompt Tokens", "alice"): (11.0, 12), ("Usage: Prompt Tokens", "idle-key"): (0.0, 12),
        ("Usage: Prompt Tokens", "token-2"): (9.0, 12),
        ("Usage: Completion Tokens", "alice"): (7.0, 12), ("Usage: Completion Tokens", "idle-key"): (0.0, 12),
        ("Usage: Completion Tokens", "token-2"): (3.0, 12)}
    (table,) = [k for _, k in logger.named("report_table") if k["title"] == "Key Usage"]
    assert table["iteration"] == 0 and table["table_plot"] == [
        ["Key", "Requests", "Errors", "Rate-limited", "Prompt tokens", "Completion tokens"],
        ["alice", 3, 0, 2, 11, 7], ["idle-key", 0, 0, 0, 0, 0], ["token-2", 2, 1, 0, 9, 3]]

    reporter.report(snapshot(14, decision, stats, {"m": "resident"}, keys=stats.key_usage()))  # nothing changed
    assert len([k for _, k in logger.named("report_scalar") if k["title"] == "Usage: Requests"]) == 6  # still plotted
    assert len([k for _, k in logger.named("report_table") if k["title"] == "Key Usage"]) == 1  # not rewritten
    stats.key_answered("idle-key", 200)
    reporter.report(snapshot(16, decision, stats, {"m": "resident"}, keys=stats.key_usage()))
    tables = [k for _, k in logger.named("report_table") if k["title"] == "Key Usage"]
    assert len(tables) == 2 and tables[-1]["table_plot"][2] == ["idle-key", 1, 0, 0, 0, 0]


def test_without_keys_no_usage_is_reported():
    adapter, _, logger, _ = make_task()
    reporter = TaskReporter(adapter, models={"m": "org/m"})
    stats = RequestStats()
    stats.record(RequestRecord("m", 200, 0.1))
    reporter.report(snapshot(5, IdleDecision(False, 0.0, 0, "active", 0.0), stats, {"m": "resident"}))
    assert not [k for _, k in logger.named("report_scalar") if k["title"].startswith("Usage: ")]
    assert [k["title"] for _, k in logger.named("report_table")] == ["Deployed Models"]
