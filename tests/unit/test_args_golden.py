"""Golden command lines: what `clearml-sglang args` prints for representative configs, pinned flag by flag.

Each case is what a user runs and the SGLang command they should get; if one changes, the mapping of form fields
to flags in docs/configuration.md has changed too.
"""

from __future__ import annotations

import pytest

from app.sglang.cpu import SHIM_DIR
from tests.conftest import EXAMPLES, run_cli

PREFIX = ["python", "-m", "sglang.launch_server"]
TOKEN = "hf_" + "Ab1" * 12  # shaped like a HuggingFace token
# Always, after the metrics: no access line per request, and none ever for the app's own probes
QUIET = ["--log-level-http", "warning", "--uvicorn-access-log-exclude-prefixes", "/health", "/metrics"]
# What every engine gets: the metrics the dashboard reads, an idle scheduler that waits instead of polling, quiet
ALWAYS = ["--enable-metrics", "--sleep-on-idle", *QUIET]


def base(model: str, port: int, name: str) -> list[str]:
    return [*PREFIX, "--model-path", model, "--host", "127.0.0.1", "--port", str(port), "--served-model-name", name]


CASES = {
    "single model on every GPU": (
        ["--config", str(EXAMPLES / "single.yaml"), "--gpu-count", "4"],
        [{"endpoint": "qwen2.5-0.5b-instruct",
          "argv": base("Qwen/Qwen2.5-0.5B-Instruct", 30000, "qwen2.5-0.5b-instruct")
          + ["--tp-size", "4", *ALWAYS],
          "env": {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}}],
    ),
    "two models sharing one GPU split its memory": (
        ["--config", str(EXAMPLES / "two-models.yaml"), "--gpu-count", "1"],
        [{"endpoint": "qwen", "argv": base("Qwen/Qwen2.5-0.5B-Instruct", 30000, "qwen")
          + ["--tp-size", "1", "--mem-fraction-static", "0.44", *ALWAYS],
          "env": {"CUDA_VISIBLE_DEVICES": "0"}},
         {"endpoint": "gpt2", "argv": base("openai-community/gpt2", 30001, "gpt2")
          + ["--tp-size", "1", "--mem-fraction-static", "0.44", *ALWAYS],
          "env": {"CUDA_VISIBLE_DEVICES": "0"}}],
    ),
    "two models, one GPU each, consecutive ports": (
        ["--config", str(EXAMPLES / "two-models.yaml"), "--engine-port", "31000"],
        [{"endpoint": "qwen", "argv": base("Qwen/Qwen2.5-0.5B-Instruct", 31000, "qwen")
          + ["--tp-size", "1", *ALWAYS], "env": {}},
         {"endpoint": "gpt2", "argv": base("openai-community/gpt2", 31001, "gpt2")
          + ["--tp-size", "1", *ALWAYS], "env": {}}],
    ),
    "LoRA with modules and limits": (
        ["--config", str(EXAMPLES / "lora.yaml")],
        [{"endpoint": "llama",
          "argv": base("meta-llama/Llama-3.2-1B-Instruct", 30000, "llama")
          + ["--tp-size", "1", "--enable-lora", "--lora-paths", "sql=org/sql-lora",
             "chat=0123456789abcdef0123456789abcdef", "--max-loras-per-batch", "4", "--max-lora-rank", "16",
             "--max-loaded-loras", "8", *ALWAYS],
          "env": {}}],
    ),
    "CLI override keeps only the model and the name": (
        ["--config", str(EXAMPLES / "cli-override.yaml"), "--set", "general.schedule-policy=lpm"],
        [{"endpoint": "qwen7b",
          "argv": [*PREFIX, "--model-path", "Qwen/Qwen2.5-7B-Instruct", "--host", "127.0.0.1", "--port", "30000",
                   "--tp-size", "2", "--context-length", "16384", "--chunked-prefill-size", "4096",
                   "--reasoning-parser", "qwen3", "--served-model-name", "qwen7b", *ALWAYS],
          "env": {}}],
    ),
    "CPU offload from Max CUDA Memory above the card": (
        ["--config", str(EXAMPLES / "cpu-offload.yaml"), "--gpu-memory-gib", "141"],
        [{"endpoint": "qwen2.5-32b-instruct",
          "argv": base("Qwen/Qwen2.5-32B-Instruct", 30000, "qwen2.5-32b-instruct")
          + ["--tp-size", "1", "--cpu-offload-gb", "19", *ALWAYS],
          "env": {}}],
    ),
    "Max CUDA Memory within the card offloads nothing": (
        ["--config", str(EXAMPLES / "cpu-offload.yaml"), "--gpu-memory-gib", "192"],
        [{"endpoint": "qwen2.5-32b-instruct",
          "argv": base("Qwen/Qwen2.5-32B-Instruct", 30000, "qwen2.5-32b-instruct")
          + ["--tp-size", "1", *ALWAYS],
          "env": {},
          "notes": ["max_cuda_memory_gib (160) fits in the GPU's 192 GiB: nothing is offloaded"]}],
    ),
    "tensor parallel with data-parallel replicas": (
        ["--config", str(EXAMPLES / "tensor-parallel.yaml")],
        [{"endpoint": "llama70b",
          "argv": base("meta-llama/Llama-3.1-70B-Instruct", 30000, "llama70b")
          + ["--tp-size", "4", "--dp-size", "2", "--load-balance-method", "round_robin", *ALWAYS],
          "env": {}}],
    ),
    "environment variables, secret-looking ones masked": (
        ["--config", str(EXAMPLES / "env-vars.yaml")],
        [{"endpoint": "qwen2.5-0.5b-instruct",
          "argv": base("Qwen/Qwen2.5-0.5B-Instruct", 30000, "qwen2.5-0.5b-instruct")
          + ["--tp-size", "1", *ALWAYS],
          "env": {"NCCL_DEBUG": "WARN", "SGLANG_ENABLE_TORCH_COMPILE": "0", "WANDB_API_KEY": "***"}}],
    ),
    "General options, the model's own flags on top": (
        ["--config", str(EXAMPLES / "general-options.yaml")],
        [{"endpoint": "qwen2.5-0.5b-instruct",
          "argv": base("Qwen/Qwen2.5-0.5B-Instruct", 30000, "qwen2.5-0.5b-instruct")
          + ["--tp-size", "1", "--context-length", "8192", "--enable-cache-report", "--log-level", "debug",
             "--log-requests", "--log-requests-level", "1", "--max-running-requests", "32",
             "--mem-fraction-static", "0.85", "--schedule-policy", "lpm", "--trust-remote-code",
             "--watchdog-timeout", "600.0", *ALWAYS[:2], *QUIET[2:]],  # debug: access lines, not probes
          "env": {}}],
    ),
    "HF token goes to the environment, masked": (
        ["--config", str(EXAMPLES / "gated-model.yaml"), "--set", f"general.hf_token={TOKEN}"],
        [{"endpoint": "llama3b",
          "argv": base("meta-llama/Llama-3.2-3B-Instruct", 30000, "llama3b")
          + ["--tp-size", "1", *ALWAYS],
          "env": {"HF_TOKEN": "***"}}],
    ),
    "ClearML Model ID printed as given": (
        ["--config", str(EXAMPLES / "clearml-model.yaml")],
        [{"endpoint": "finetuned",
          "argv": base("0123456789abcdef0123456789abcdef", 30000, "finetuned")
          + ["--tp-size", "2", *ALWAYS],
          "env": {}}],
    ),
    "CPU device: CPU engine switch and the torch-native LoRA backend": (
        ["--set", "models.0.model=org/tiny", "--set", "models.0.endpoint_name=tiny",
         "--set", "models.0.lora.enable=true", "--set", "models.0.lora.modules=a=org/a",
         "--set", "general.device=cpu"],
        [{"endpoint": "tiny",
          "argv": base("org/tiny", 30000, "tiny")
          + ["--device", "cpu", "--enable-lora", "--lora-paths", "a=org/a", "--lora-backend", "torch_native",
             *ALWAYS],
          "env": {"SGLANG_USE_CPU_ENGINE": "1", "SGLANG_CPU_SHIM_UNPIN": "1", "PYTHONPATH": str(SHIM_DIR)},
          # (a name not in the local cache: its size is not known here)
          "notes": ["KV pool: SGLang sizes it from the available RAM (its model's size is not known here); "
                    "max-total-tokens bounds it"]}],
    ),
    "automatic CPU offloading prepares the engine to sleep": (
        ["--set", "models.0.model=org/m", "--set", "general.auto_cpu_offload=true"],
        [{"endpoint": "m",
          "argv": base("org/m", 30000, "m")
          + ["--tp-size", "1", "--enable-memory-saver", "--enable-weights-cpu-backup", *ALWAYS],
          "env": {}}],
    ),
    "a raw command line gets what sleeping needs, once": (
        ["--set", "models.0.model=org/m", "--set", "general.auto_cpu_offload=true",
         "--set", "models.0.cli=--tp-size 2 --enable-memory-saver"],
        [{"endpoint": "m",
          "argv": base("org/m", 30000, "m")[:-2]
          + ["--tp-size", "2", "--enable-memory-saver", "--served-model-name", "m", "--enable-weights-cpu-backup",
             *ALWAYS],
          "env": {}}],
    ),
    "disk swapping releases weights": (
        ["--set", "models.0.model=org/m", "--set", "general.disk_swap=True"],
        [{"endpoint": "m",
          "argv": base("org/m", 30000, "m") + ["--tp-size", "1", "--enable-memory-saver", *ALWAYS],
          "env": {}}],
    ),
    "keys' priorities turn on SGLang's priority scheduling, for a raw command line too": (
        ["--config", str(EXAMPLES / "keys.yaml"), "--set", "models.1.cli=--tp-size 2"],
        [{"endpoint": "qwen",
          "argv": base("Qwen/Qwen2.5-0.5B-Instruct", 30000, "qwen")
          + ["--tp-size", "1", "--default-priority-value", "0", "--enable-priority-scheduling", *ALWAYS],
          "env": {}},
         {"endpoint": "llama",
          "argv": base("meta-llama/Llama-3.2-1B-Instruct", 30001, "llama")[:-2]
          + ["--tp-size", "2", "--served-model-name", "llama", "--enable-priority-scheduling",
             "--default-priority-value", "0", *ALWAYS],
          "env": {},
          "notes": ["cli is set, so these model settings are ignored: lora"]}],
    ),
    "an idle engine polls as SGLang's default does when told to": (
        ["--set", "models.0.model=org/m", "--set", "general.sleep_on_idle=false"],
        [{"endpoint": "m", "argv": base("org/m", 30000, "m") + ["--tp-size", "1", "--enable-metrics", *QUIET],
          "env": {}}],
    ),
    "a raw command line's own --sleep-on-idle is kept, not doubled": (
        ["--set", "models.0.model=org/m", "--set", "models.0.cli=--sleep-on-idle"],
        [{"endpoint": "m", "argv": base("org/m", 30000, "m")[:-2]
          + ["--sleep-on-idle", "--served-model-name", "m", *ALWAYS[:1], *QUIET], "env": {}}],
    ),
    "negatable flags and lists by their CLI names": (
        ["--set", "models.0.model=org/m", "--set", "models.0.lora-strict-loading=false",
         "--set", "models.0.cuda-graph-bs-decode=[1, 2, 4]", "--set", "general.context-length=32k"],
        [{"endpoint": "m",
          "argv": base("org/m", 30000, "m")
          + ["--tp-size", "1", "--context-length", "32000", "--cuda-graph-bs-decode", "1", "2", "4",
             "--no-lora-strict-loading", *ALWAYS],
          "env": {}}],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_args_prints_pinned_command_line(case):
    argv, expected = CASES[case]
    result = run_cli("args", *argv)
    assert result.code == 0, result.err
    assert result.lines() == expected  # (the engine's key is never on the command line: app.sglang.launch)


def test_cli_override_says_which_settings_it_ignores():
    result = run_cli("args", "--config", str(EXAMPLES / "cli-override.yaml"),
                     "--set", "models.0.gpus=4", "--set", "models.0.context-length=1024")
    assert result.code == 0, result.err
    (line,) = result.lines()
    assert line["notes"] == ["cli is set, so these model settings are ignored: gpus, context-length"]
    assert "--context-length" in line["argv"] and "1024" not in line["argv"]


def test_disabled_lora_modules_are_reported_not_loaded():
    result = run_cli("args", "--config", str(EXAMPLES / "lora.yaml"), "--set", "models.0.lora.enable=false")
    (line,) = result.lines()
    assert "--enable-lora" not in line["argv"] and "--lora-paths" not in line["argv"]
    assert line["notes"] == ["lora.enable is false, so its 2 module(s) are not loaded"]


def test_every_example_config_is_valid():
    for path in sorted(EXAMPLES.glob("*.yaml")):
        result = run_cli("args", "--config", str(path), "--gpu-memory-gib", "80")
        assert result.code == 0, f"{path.name}: {result.err}"
        assert result.lines(), path.name
