"""`clearml-sglang run`, the composition root: the config, the ClearML task, the deployment, the event loop.

The config comes from the file, `--set` or the embedded default when run by hand, and from the task's
hyperparameters (the UI's form) under an agent; everything the deployment says goes to the ClearML task. Under an
agent the task may also be one of the instance's other machines: a replica worker or a node of a model spanning
nodes (`app.serving.node`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from dataclasses import replace

from app import STARTED, constants
from app.clearml.reporting import TaskReporter
from app.clearml.task import WORKER_KEY, WORKER_OF, WORKER_URL, ClearMLModelRegistry, DeploymentTask
from app.config import load_config, to_hyperparameters
from app.config.types import DeploymentConfig
from app.constants import EXIT_ENGINE, EXIT_OK
from app.demo import DEMO_NAME, demo_config
from app.errors import ConfigError, Problem
from app.preflight import run_checks
from app.serving.deployment import Deployment, RunOptions
from app.serving.network import access_keys, public_address
from app.serving.node import Master, RankNode, ReplicaWorker, WorkerOrder
from app.serving.startup import Span
from app.states import Outcome, Status

logger = logging.getLogger(__name__)


def run_service(*, config_path: str | None, overrides: list[str], host: str, port: int, offline: bool,
                launcher: tuple[str, ...] | None = None, environ: dict[str, str] | None = None,
                benchmark_only: bool = False) -> int:
    """Serve until idle shutdown, a signal or abort (`benchmark_only`: until the benchmark at ready is reported);
    the exit code."""
    started = STARTED
    environ = dict(os.environ) if environ is None else environ
    config = None
    demo = not environ.get("CLEARML_TASK_ID") and config_path is None and not overrides
    if not environ.get("CLEARML_TASK_ID") and not demo:  # validate before anything is created: a bad config
        config = _local_config(config_path, overrides)  # launches nothing
        access_keys(config, environ)  # (its keys' names too: the environment's tokens are known here)
    monitor_s = float(config.idle.report_interval_seconds) if config else 30.0
    task = DeploymentTask.start(project=config.instance.project if config else "", offline=offline,
                                name=config.instance.name if config else DEMO_NAME if demo else "",
                                monitor_interval_s=monitor_s, environ=environ)
    try:
        options = RunOptions(host=host, port=port, launcher=launcher, process_started=started,
                             task_url=task.web_url(), exit_after_benchmark=benchmark_only, environ=environ,
                             preflight=run_checks)
        if demo:
            config, options = _demo(task, options, environ)
        config = _task_config(task, config, overrides)
        if config.general.debug:
            logging.getLogger().setLevel(logging.DEBUG)
        deployment = _deployment(config, task, options, environ)
        code = event_loop_runner()(_serve(deployment, task))
    except ConfigError as exc:
        if not exc.told:
            logger.error("%s", exc)  # at once: closing ClearML's session can take seconds
        exc.told = True
        task.finish(Outcome.FAILED, str(exc))
        task.close()
        raise
    outcome = Outcome.COMPLETED if code == EXIT_OK else Outcome.FAILED if code == EXIT_ENGINE else Outcome.STOPPED
    task.finish(outcome, deployment.failure_reason or deployment.stop_reason)
    if not task.close():
        # ClearML is stuck (its threads can wait on the network forever): they must not keep the process alive
        logging.shutdown()
        os._exit(code)
    return code


def _local_config(config_path: str | None, overrides: list[str]) -> DeploymentConfig:
    config = load_config(config_path, overrides)
    _refuse_local_multi_node(config)
    return config


def _demo(task: DeploymentTask, options: RunOptions, environ: dict[str, str]) -> tuple[DeploymentConfig, RunOptions]:
    """The embedded default: its model from the cache, or fetched now, each step a status reason and a console line
    (`app.demo`); how long that took, the first of the startup phases."""
    reporter = TaskReporter(task, models={})
    reporter.status(Status.LOADING, "preparing the demo model")
    demo = demo_config(lambda text: reporter.status(Status.LOADING, text), environ)
    prior = [Span(name, s) for name, s in (("fetching the demo model", demo.fetch_s),
                                           ("converting the demo model", demo.convert_s)) if s]
    return demo.config, replace(options, prior=tuple(prior))


def _task_config(task: DeploymentTask, config: DeploymentConfig | None, overrides: list[str]) -> DeploymentConfig:
    """Under an agent the task's form is the config; run by hand, the config is written to the task."""
    if config is None:
        params = task.read_hyperparameters()
        # `clearml-task --args section.key=value` writes Args/section.key: the same as --set
        from_args = [f"{k[len('Args/'):]}={v}" for k, v in params.items() if k.startswith("Args/")]
        config = load_config(hyperparameters=params, overrides=[*from_args, *overrides])
        logger.info("Configuration read from task %s", task.id)
    else:
        task.write_hyperparameters(to_hyperparameters(config.without_secrets()))
    return config


def _deployment(config: DeploymentConfig, task: DeploymentTask, options: RunOptions,
                environ: dict[str, str]) -> Deployment | RankNode | ReplicaWorker:
    """The instance, or one of its other machines when the task says so."""
    reporter = TaskReporter(task, models={m.endpoint: m.model for m in config.models},
                            gateway_route=config.instance.gateway_route)
    told = task.properties() if task.remote else {}
    master = Master(task.master_running)
    if told.get(WORKER_OF):  # a replica worker the instance enqueued (app.serving.scale_out)
        order = WorkerOrder(told[WORKER_OF], told.get(WORKER_KEY),
                            publish=lambda url: task.set_properties(**{WORKER_URL: url}))
        options = replace(options, public_host=options.public_host or public_address(environ))  # in its URL
        return ReplicaWorker(config, ClearMLModelRegistry(), order, master, reporter=reporter, options=options)
    multi_node = _multi_node(config, task)
    if multi_node is not None and multi_node.rank > 0:
        return RankNode(config, ClearMLModelRegistry(), multi_node, master, reporter=reporter, options=options)
    return Deployment(config, ClearMLModelRegistry(), reporter=reporter, options=options, multi_node=multi_node,
                      worker_pool=task.worker_pool() if task.remote and not task.offline else None)


async def _serve(deployment: Deployment | RankNode | ReplicaWorker, task: DeploymentTask) -> int:
    """Run the deployment; SIGTERM, SIGINT and an abort from the UI drain and stop it."""
    loop = asyncio.get_running_loop()
    finished = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, deployment.request_stop, signum)

    def on_abort() -> None:  # the SDK's thread: drain on the loop, return once the deployment is down
        loop.call_soon_threadsafe(deployment.request_stop, signal.SIGTERM, "stopped from the ClearML UI")
        finished.wait()

    if not task.offline:
        task.on_abort(on_abort)
    try:
        return await deployment.run()
    finally:
        finished.set()


def _refuse_local_multi_node(config) -> None:
    """A model spanning nodes needs agents: run locally there is no queue to start the other machines from."""
    for index, model in enumerate(config.models):
        if model.nodes > 1:
            raise ConfigError(Problem(f"models[{index}].nodes", f"is {model.nodes}: the other machines are started "
                                      "by ClearML agents, which a local run has none of",
                                      "launch it with `clearml-sglang launch --config F --queue Q`, or set nodes to 1"))


def _multi_node(config, task):
    """A model spanning nodes: this machine's rank from ClearML's multi-node launch (which, on the master, enqueues
    the other nodes)."""
    spanning = [(i, m) for i, m in enumerate(config.models) if m.nodes > 1]
    if not spanning:
        return None
    index, model = spanning[0]
    if not task.remote:
        _refuse_local_multi_node(config)
    multi_node = task.launch_multi_node(model.nodes, constants.MULTI_NODE_PORT)
    logger.info("Model %s spans %d nodes: this is node %d, the master is at %s", model.endpoint, model.nodes,
                multi_node.rank, multi_node.dist_init_addr)
    return multi_node


def event_loop_runner():
    """uvloop's event loop where it is installed (the gateway's I/O costs about half), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run


