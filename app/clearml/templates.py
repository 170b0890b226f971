"""The task that runs a deployment on an agent: its definition, the template file, and the `clearml-task` line.

One definition, derived from the schema and the pinned SGLang, feeds `clearml-sglang template` / `launch` (through
`app.clearml.task.TaskService`), the committed `task_templates/sglang_deployment.yaml` (a test regenerates it), and
the `clearml-task` command of docs/deploying.md (generated here; a test parses it with clearml-task's own parser).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

import yaml

from app import constants
from app.config.docs import task_block
from app.config.export import Hyperparameter, to_hyperparameters
from app.config.types import DeploymentConfig, ModelConfig

# The script the agent runs: `clearml-sglang run`, from the repository's root.
ENTRY_POINT = "task_templates/sglang_task.py"
# SGLang's own image, at the version the app pins; it has CUDA, torch and sglang, so the agent adds only ours.
DOCKER_IMAGE = f"lmsysorg/sglang:v{constants.SGLANG_VERSION}"
# Shared memory for SGLang's processes, locked-memory and stack limits as SGLang's docs run it, and the gateway's
# port published (the agent remaps it when busy and tells the task which host port it got).
DOCKER_ARGS = f"--ipc=host --ulimit memlock=-1 --ulimit stack=67108864 -p {constants.GATEWAY_DEFAULT_PORT}:" \
              f"{constants.GATEWAY_DEFAULT_PORT}"
# What the agent installs into the image's Python: the control plane, as in requirements.txt (a test keeps the two
# equal); SGLang and torch are the image's own.
REQUIREMENTS = ("clearml==2.1.12", "clearml-agent>=3.0.3", "PyYAML>=6.0", "requests>=2.31", "huggingface_hub>=1.0",
                "aiohttp>=3.9", "httptools>=0.6", "uvloop>=0.19",
                "psutil>=5.9", "nvidia-ml-py>=12.535")
TEMPLATE_FILE = "task_templates/sglang_deployment.yaml"


def template_config() -> DeploymentConfig:
    """The form's defaults: every field at its default, one model to fill in."""
    return DeploymentConfig(models=(ModelConfig(model=""),))


@dataclass(frozen=True)
class TaskDefinition:
    name: str = "SGLang Model Deployment"
    project: str = "LLM Deployments"
    task_type: str = "application"
    script: str = ENTRY_POINT
    working_dir: str = "."
    requirements: tuple[str, ...] = REQUIREMENTS
    docker_image: str = DOCKER_IMAGE
    docker_args: str = DOCKER_ARGS
    hyperparameters: tuple[Hyperparameter, ...] = field(
        default_factory=lambda: tuple(to_hyperparameters(template_config())))

    def to_yaml(self) -> str:
        data = {
            "name": self.name,
            "project": self.project,
            "task_type": self.task_type,
            "script": {"entry_point": self.script, "working_dir": self.working_dir},
            "requirements": list(self.requirements),
            "container": {"image": self.docker_image, "arguments": self.docker_args},
            "hyperparameters": [{"name": h.name, "value": h.value, "type": h.type, "description": h.description}
                                for h in self.hyperparameters],
        }
        header = ("# The task that runs a deployment on a ClearML agent. Generated from the app's schema by\n"
                  "# scripts/update_generated.py: do not edit. `clearml-sglang template` creates it on a server.\n")
        return header + yaml.safe_dump(data, sort_keys=False, width=120, allow_unicode=True)


def clearml_task_argv(definition: TaskDefinition, *, repo: str, branch: str, queue: str,
                      overrides: list[str], name: str | None = None) -> list[str]:
    """The `clearml-task` command that enqueues a deployment; `overrides` are `--set`-style settings, which the
    task reads from its `Args` section (`clearml-task --args` writes there)."""
    argv = ["clearml-task", "--project", definition.project, "--name", name or definition.name,
            "--task-type", definition.task_type, "--repo", repo, "--branch", branch,
            "--script", definition.script, "--cwd", definition.working_dir,
            "--packages", *definition.requirements,
            "--docker", definition.docker_image,
            # "=": a value that starts with "--" would otherwise be read as an option
            f"--docker_args={definition.docker_args}", "--skip-task-init"]
    if overrides:
        argv += ["--args", *overrides]
    return argv + ["--queue", queue]


CLEARML_TASK_EXAMPLE = dict(
    repo="https://github.com/<you>/clearml-sglang.git", branch="main", queue="gpu",
    overrides=["models.0.model=Qwen/Qwen2.5-7B-Instruct", "models.0.gpus=1", "idle.time_limit_hours=4"],
    name="qwen-7b")


def example_clearml_task_command() -> str:
    argv = clearml_task_argv(TaskDefinition(), **CLEARML_TASK_EXAMPLE)
    return " \\\n    ".join(_pairs(argv))


def _pairs(argv: list[str]) -> list[str]:
    """argv as shell words, an option and its values on one line."""
    lines: list[list[str]] = [[]]
    for word in argv:
        if word.startswith("--") and lines[-1]:
            lines.append([])
        lines[-1].append(shlex.quote(word))
    return [" ".join(line) for line in lines]


def render_clearml_task_block() -> str:
    """The generated `clearml-task` block of docs/deploying.md."""
    return task_block(example_clearml_task_command())
