"""The ClearML adapter: the only module of the app that imports `clearml`.

`DeploymentTask` is the deployment's ClearML task: where its configuration lives (hyperparameters, a readable form
in the UI) and where the dashboard reads everything from (properties, scalars, the Deployed Models table, the
console, ClearML's own machine monitor). It wraps an SDK `Task`; tests hand it a recording object with the same
methods instead (`tests/unit/test_clearml_task.py` checks every call against the real SDK's signatures).

Nothing here runs at import time. Under an agent (`CLEARML_TASK_ID`) `start` attaches to the agent's task;
locally it creates one, in offline mode when no server is configured or `offline=True`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from clearml import Model, Task
from clearml.backend_api.session import Session

from app.config.export import Hyperparameter
from app.config.types import MultiNode
from app.errors import ModelNotFound
from app.states import Outcome

logger = logging.getLogger(__name__)

# The Model Endpoints API ("serving.*") came with this server API version; open-source servers have it.
SERVING_API_VERSION = "2.31"
# How long waiting for the App Gateway to assign an endpoint may take.
EXTERNAL_ENDPOINT_TIMEOUT_SECONDS = 90.0
# task.close() flushes reports; it must not hold the process past this (docs/clearml.md, "The task").
CLOSE_TIMEOUT_SECONDS = 30.0
# The abort callback gets this long to drain requests and stop engines before the SDK ends the process.
ABORT_CALLBACK_TIMEOUT_SECONDS = 330.0


def server_configured(environ: dict[str, str] | None = None) -> bool:
    """Whether a ClearML server is configured here (env, or a clearml.conf) - if not, the app runs offline."""
    environ = dict(os.environ) if environ is None else environ
    if environ.get("CLEARML_API_HOST") or environ.get("CLEARML_TASK_ID"):
        return True
    config = environ.get("CLEARML_CONFIG_FILE")
    home = Path(environ.get("HOME") or Path.home())
    candidates = [Path(config)] if config else [home / "clearml.conf", home / ".clearml.conf"]
    return any(path.is_file() for path in candidates)


class EndpointStats:
    """Feeds the SDK's `EndpointTelemetry` (the UI's Model Endpoints table) from the gateway's own counts.

    The telemetry's daemon reports every 30 s from its public counters; the gateway, not the telemetry's per-request
    hooks, measures requests (those hooks keep one "last request" time, wrong for concurrent requests).
    """

    def __init__(self, telemetry: Any):
        self.telemetry = telemetry

    def feed(self, requests: int, latency_sum_ms: float) -> None:
        self.telemetry.requests_num += requests
        self.telemetry.requests_num_window += requests
        self.telemetry.latency_sum_window += latency_sum_ms

    def stop(self) -> None:
        self.telemetry.stop()


class DeploymentTask:
    """The deployment's ClearML task. Construct with `start()`; tests construct it around a fake task."""

    def __init__(self, task: Any, *, remote: bool, offline: bool, session: Any = Session,
                 telemetry_factory: Callable[..., Any] | None = None, task_class: Any = Task):
        self.task = task
        self._task_class = task_class
        self.remote = remote
        self.offline = offline
        self._session = session
        self._telemetry_factory = telemetry_factory

    @classmethod
    def start(cls, *, project: str, name: str, offline: bool = False, monitor_interval_s: float = 30.0,
              environ: dict[str, str] | None = None) -> DeploymentTask:
        environ = dict(os.environ) if environ is None else environ
        remote = bool(environ.get("CLEARML_TASK_ID"))
        offline = offline or environ.get("CLEARML_OFFLINE_MODE", "") not in ("", "0") or not server_configured(
            environ)
        if offline:
            Task.set_offline(True)
        task = Task.init(
            project_name=project,
            task_name=name,
            task_type=Task.TaskTypes.application,
            reuse_last_task_id=False,
            auto_connect_arg_parser=False,
            # no framework patching, and no repository detection racing the app's threads (docs/clearml.md, "The task")
            auto_connect_frameworks={"detect_repository": False, "pytorch": False, "tensorflow": False,
                                     "matplotlib": False, "joblib": False},
            # a long-running service: report machine and GPU metrics from the start, at the report interval
            auto_resource_monitoring={"first_report_sec": monitor_interval_s,
                                      "report_frequency_sec": monitor_interval_s,
                                      "wait_for_first_iteration_to_start_sec": monitor_interval_s,
                                      "max_wait_for_first_iteration_to_start_sec": monitor_interval_s},
        )
        logger.info("ClearML task %s (%s%s)", task.id, "agent" if remote else "local",
                    ", offline" if offline else "")
        return cls(task, remote=remote, offline=offline)

    def web_url(self) -> str | None:
        """The task's page in the ClearML web app (None offline: there is no server to show it)."""
        if self.offline:
            return None
        try:
            return self.task.get_output_log_web_page()
        except Exception:  # the SDK's own errors: a link is not worth failing for
            return None

    @property
    def id(self) -> str:
        return str(self.task.id)

    # ----- configuration -----

    def read_hyperparameters(self) -> dict[str, str]:
        """The task's hyperparameters as the UI holds them: "Section/key" -> string."""
        return {k: "" if v is None else str(v) for k, v in (self.task.get_parameters(cast=False) or {}).items()}

    def write_hyperparameters(self, params: Iterable[Hyperparameter]) -> None:
        """Write the config into the task's form, with types and descriptions; other sections stay as they are."""
        params = list(params)
        # keyword names with two leading underscores: passed through a dict so no class mangles them
        self.task.update_parameters({p.name: p.value for p in params},
                                    **{"__parameters_descriptions": {p.name: p.description for p in params},
                                       "__parameters_types": {p.name: p.type for p in params}})

    # ----- what the dashboard reads -----

    def set_properties(self, **values: str) -> None:
        self.task.set_user_properties(**values)

    def report_scalar(self, title: str, series: str, value: float, iteration: int) -> None:
        self.task.get_logger().report_scalar(title=title, series=series, value=value, iteration=iteration)

    def report_table(self, title: str, series: str, rows: list[list[str]], iteration: int = 0) -> None:
        self.task.get_logger().report_table(title=title, series=series, iteration=iteration, table_plot=rows)

    # ----- endpoint publication -----

    def can_request_external_endpoint(self) -> bool:
        """The App Gateway needs an Enterprise server (feature set "advanced"); never offline."""
        return not self.offline and getattr(self._session, "feature_set", "basic") == "advanced"

    def request_external_endpoint(self, port: int, static_route: str | None) -> str | None:
        """Register the gateway's port with the App Gateway and wait for the URL it assigns."""
        result = self.task.request_external_endpoint(port=port, protocol="http", wait=True,
                                                     wait_timeout_seconds=EXTERNAL_ENDPOINT_TIMEOUT_SECONDS,
                                                     static_route=static_route or None)
        return (result or {}).get("endpoint")

    def host_port(self, port: int) -> int:
        """The port other machines reach the gateway on: the agent's docker mapping of it, when there is one."""
        if self.offline:
            return port
        runtime = self.task._get_runtime_properties() or {}  # noqa: SLF001 - the SDK's own way to read it
        return map_host_port(runtime.get("_external_host_tcp_port_mapping"), port)

    def has_serving_api(self) -> bool:
        """The Model Endpoints API (open-source servers have it too); never offline."""
        return not self.offline and bool(self._session.check_min_api_version(SERVING_API_VERSION))

    def start_endpoint_stats(self, endpoint: str, model: str, url: str) -> EndpointStats:
        factory = self._telemetry_factory
        if factory is None:
            from clearml.router.endpoint_telemetry import EndpointTelemetry as factory  # noqa: N813
        telemetry = factory(endpoint_name=endpoint, model_name=model, endpoint_url=url, input_type="json",
                            app_instance=self.id)
        return EndpointStats(telemetry)

    # ----- several machines -----

    def launch_multi_node(self, nodes: int, port: int) -> MultiNode:
        """ClearML's multi-node launch: on the master (rank 0, under an agent) it enqueues `nodes - 1` clones of
        this task to its queue, each told its rank; on a clone it returns that rank. Locally (and offline) it only
        records the `launch_multi_node` section (the SDK's docstring says `multi_node_instance`; its code names it
        `launch_multi_node`) and answers rank 0, as the SDK does."""
        conf = self.task.launch_multi_node(total_num_nodes=nodes, port=port, wait=False)
        return MultiNode(nodes=int(conf.get("total_num_nodes") or nodes), rank=int(conf.get("node_rank") or 0),
                         master_addr=str(conf.get("master_addr") or "127.0.0.1"),
                         master_port=int(conf.get("master_port") or port))

    def master_running(self) -> bool:
        """On a node the multi-node launch started: whether the master's task (this task's parent) still runs."""
        parent = getattr(self.task, "parent", None)
        if not parent or self.offline:
            return True
        try:
            status = str(self._task_class.get_task(task_id=parent).get_status())
        except Exception as exc:  # the server is unreachable for a moment: assume it runs, ask again later
            logger.warning("Could not read the master task's status: %s", exc)
            return True
        return status in ("created", "queued", "in_progress")

    def properties(self) -> dict[str, str]:
        """This task's user properties (a worker task reads what the instance told it here); none offline, where
        the SDK cannot read them back."""
        if self.offline:
            return {}
        return {k: str(v) for k, v in (self.task.get_user_properties(value_only=True) or {}).items()}

    def worker_pool(self, queue: str | None = None) -> ClearMLWorkerPool:
        return ClearMLWorkerPool(self.task, queue=queue, task_class=self._task_class)

    # ----- lifecycle -----

    def on_abort(self, callback: Callable[[], None], timeout_s: float = ABORT_CALLBACK_TIMEOUT_SECONDS) -> None:
        """Run `callback` (drain and stop) when the task is stopped from the UI, before the SDK ends the process."""
        self.task.register_abort_callback(callback, callback_execution_timeout=timeout_s)

    def finish(self, outcome: Outcome, reason: str = "") -> None:
        """Set the final status: completed, stopped or failed (with its reason). Offline, the SDK keeps none."""
        if self.offline:
            return
        if outcome == Outcome.FAILED:
            self.task.mark_failed(status_reason=reason, status_message=reason)
        elif self.remote:
            return  # under an agent the agent sets completed / stopped from the exit code
        elif outcome == Outcome.STOPPED:
            self.task.mark_stopped(status_message=reason)
        else:
            self.task.mark_completed(status_message=reason)

    def close(self, timeout_s: float = CLOSE_TIMEOUT_SECONDS) -> bool:
        """Flush and close, but never wait longer than `timeout_s`: True when it closed in time."""
        closer = threading.Thread(target=self.task.close, name="clearml-close", daemon=True)
        closer.start()
        closer.join(timeout_s)
        if closer.is_alive():
            logger.warning("ClearML did not close within %.0f s; exiting anyway", timeout_s)
            return False
        return True

    @property
    def offline_folder(self) -> Path | None:
        folder = self.task.get_offline_mode_folder() if self.offline else None
        return Path(folder) if folder else None


# What an instance tells a worker task, and what the worker publishes back (user properties: the project's members
# see them, as they see a generated access token; the engine key opens only the model's SGLang servers).
WORKER_OF, WORKER_REPLICA, WORKER_KEY, WORKER_URL = "worker_of", "worker_replica", "worker_key", "worker_url"


class ClearMLWorkerPool:
    """Replica workers as ClearML tasks (app.serving.scale_out.WorkerPool): clones of the instance, children of it,
    enqueued to its queue (or `queue`), told which model to serve and the engine key."""

    def __init__(self, task: Any, *, queue: str | None = None, task_class: Any = Task):
        self.task = task
        self.queue = queue
        self._task_class = task_class

    def spawn(self, endpoint: str, replica: int, engine_key: str | None) -> str:
        clone = self._task_class.clone(source_task=self.task, name=f"{self.task.name} / {endpoint} replica {replica}",
                                       parent=self.task.id)
        properties = {WORKER_OF: endpoint, WORKER_REPLICA: str(replica)}
        if engine_key:
            properties[WORKER_KEY] = engine_key
        clone.set_user_properties(**properties)
        if self.queue:
            self._task_class.enqueue(clone, queue_name=self.queue)
        else:
            self._task_class.enqueue(clone, queue_id=self.task.data.execution.queue)
        return str(clone.id)

    def poll(self, worker_id: str) -> tuple[str, str | None]:
        worker = self._task_class.get_task(task_id=worker_id)
        url = (worker.get_user_properties(value_only=True) or {}).get(WORKER_URL)
        return str(worker.get_status()), str(url) if url else None

    def stop(self, worker_id: str) -> None:
        worker = self._task_class.get_task(task_id=worker_id)
        if str(worker.get_status()) == "queued":
            self._task_class.dequeue(worker)
        else:
            worker.mark_stopped(force=True, status_message="the instance stopped")


class TaskService:
    """Creating, cloning, reading and enqueueing deployment tasks on a ClearML server (`template`, `launch`,
    `clone`, `export --task`). `task_class` is the SDK's `Task`; tests pass a recording stand-in."""

    def __init__(self, task_class: Any = Task):
        self.Task = task_class

    def create(self, definition: Any, *, project: str, name: str, repo: str | None, branch: str | None) -> Any:
        """A draft task that runs the deployment script in SGLang's image (clearml-task's way of creating one)."""
        if getattr(self.Task, "is_offline", lambda: False)():
            raise RuntimeError("creating a task needs a ClearML server: run `clearml-init`, or set CLEARML_API_HOST")
        return self.Task.create(
            project_name=project, task_name=name, task_type=definition.task_type, repo=repo, branch=branch,
            script=definition.script, working_directory=definition.working_dir,
            packages=list(definition.requirements), docker=definition.docker_image,
            docker_args=definition.docker_args, add_task_init_call=False)

    def get(self, task_id: str) -> Any:
        return self.Task.get_task(task_id=task_id)

    def clone(self, task_id: str, name: str | None = None) -> Any:
        return self.Task.clone(source_task=task_id, name=name)

    def parameters(self, task: Any) -> dict[str, str]:
        return {k: "" if v is None else str(v) for k, v in (task.get_parameters(cast=False) or {}).items()}

    def write(self, task: Any, params: Iterable[Hyperparameter], *, replace: bool = False) -> None:
        """The config into the task's form. `replace` clears the app's sections first (a clone's old models)."""
        params = list(params)
        values = {p.name: p.value for p in params}
        extras = {"__parameters_descriptions": {p.name: p.description for p in params},
                  "__parameters_types": {p.name: p.type for p in params}}
        if replace:
            sections = {p.name.split("/", 1)[0] for p in params}
            kept = {k: v for k, v in self.parameters(task).items() if k.split("/", 1)[0] not in sections}
            task.set_parameters({**kept, **values}, **extras)
        else:
            task.update_parameters(values, **extras)

    def enqueue(self, task: Any, queue: str) -> None:
        self.Task.enqueue(task=task, queue_name=queue)

    def web_url(self, task: Any) -> str:
        return str(task.get_output_log_web_page())


def map_host_port(mapping: str | None, port: int) -> int:
    """The host port an agent mapped to the container's `port` ("host-range:container-range,..."), else `port`."""
    for item in (mapping or "").split(","):
        host, sep, container = item.partition(":")
        try:
            host_start = int(host.split("-")[0])
            low, high = (int(x) for x in (container.split("-")[0], container.split("-")[-1]))
        except ValueError:
            continue
        if sep and low <= port <= high:
            return host_start + (port - low)
    return port


class ClearMLModelRegistry:
    """ClearML Model IDs -> local copies, through the SDK (which logs the download's progress). `model` and `offline`
    are the SDK's `Model` and `Task.is_offline` (tests give what a server would answer)."""

    def __init__(self, model: Callable[[str], Any] = Model, offline: Callable[[], bool] = Task.is_offline):
        self._model, self._offline = model, offline

    def name_of(self, model_id: str) -> str:
        """The model's name on the server, nothing downloaded (`clearml-sglang check`); raises ModelNotFound."""
        return self._named(model_id)[1]

    def _named(self, model_id: str) -> tuple[Any, str]:
        if self._offline():
            raise ModelNotFound("ClearML runs in offline mode here, so a Model ID cannot be looked up")
        model = self._model(model_id)
        try:
            name = model.name
        except Exception as exc:  # the SDK raises its own request errors for unknown or unreadable IDs
            raise ModelNotFound(f"the server does not know it: {type(exc).__name__}") from None
        if name is None:
            raise ModelNotFound("the server returned no model")
        return model, name

    def get_local_copy(self, model_id: str) -> str:
        model, name = self._named(model_id)
        logger.info("Downloading ClearML model %s (%s)", model_id, name)
        try:  # an archive (a package, or a zip uploaded as the weights) unpacked: SGLang loads a directory
            path = model.get_local_copy(extract_archive=True, raise_on_error=True)
        except ValueError as exc:  # the SDK's word for a download that failed
            raise OSError(f"the download failed: {exc}") from None
        if not path:
            raise OSError(f"the SDK returned no local copy of model {model_id}")
        return path
