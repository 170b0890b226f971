"""Property tests: every way a config travels brings it back unchanged.

- export -> import is the identity, minus secrets (the JSON a user downloads and uploads again);
- hyperparameters written as strings and read back give the same config (a task cloned and edited in the UI);
- a config and its `--set` spelling agree.
"""

from __future__ import annotations

import json
import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.config import load_config, parse_config, to_hyperparameters, to_json, to_mapping
from app.config.schema import OWNED_ENV
from app.config.sources import parse_config_text
from app.config.types import (
    AuthConfig,
    DeploymentConfig,
    GeneralConfig,
    IdleConfig,
    InstanceConfig,
    LoraConfig,
    LoraModule,
    ModelConfig,
)
from app.keys import DEFAULT, KeyLimits

text = (
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Zl", "Zp")), max_size=24)
    .map(str.strip)
)
nonempty_text = text.filter(bool)
slug = st.from_regex(r"[a-z][a-z0-9]{0,7}", fullmatch=True)
repo = st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,10}", fullmatch=True)
hf_name = st.builds(lambda org, name: f"{org}/{name}", slug, repo)
clearml_id = st.from_regex(r"[0-9a-f]{32}", fullmatch=True)

# SGLang flags by CLI name, each with values of its own type (switches only true: false is SGLang's default).
FLAG_VALUES = {
    "context-length": st.integers(1, 1 << 20),
    "mem-fraction-static": st.floats(0.05, 0.95),
    "chat-template": nonempty_text,
    "trust-remote-code": st.just(True),
    "lora-strict-loading": st.booleans(),
    "cuda-graph-bs-decode": st.lists(st.integers(1, 512), min_size=1, max_size=4),
    "lora-target-modules": st.lists(st.sampled_from(["q_proj", "k_proj", "v_proj", "o_proj"]), max_size=3),
    "preferred-sampling-params": st.dictionaries(slug, st.integers() | st.floats(allow_nan=False) | slug, max_size=3),
    "schedule-policy": st.sampled_from(["lpm", "fcfs", "random"]),
    "log-requests-level": st.sampled_from([0, 1, 2, 3]),
    "max-running-requests": st.integers(1, 4096),
}


def flags():
    return st.dictionaries(st.sampled_from(sorted(FLAG_VALUES)), st.none(), max_size=4).flatmap(
        lambda keys: st.fixed_dictionaries({k: FLAG_VALUES[k] for k in keys})
    ).map(lambda d: tuple(sorted(d.items())))


@st.composite
def lora_configs(draw):
    enable = draw(st.booleans())
    names = draw(st.lists(slug, min_size=1 if enable else 0, max_size=3, unique=True))
    modules = tuple(LoraModule(n, draw(hf_name | clearml_id)) for n in names)
    max_loras = draw(st.none() | st.integers(1, 8))
    floor = max(max_loras or 8, len(modules))
    return LoraConfig(
        enable=enable,
        modules=modules,
        max_loras=max_loras,
        max_lora_rank=draw(st.none() | st.integers(1, 256)),
        max_cpu_loras=draw(st.none() | st.integers(floor, floor + 8)),
    )


@st.composite
def model_configs(draw, index: int):
    return ModelConfig(
        model=draw(hf_name | clearml_id),
        endpoint_name=f"m{index}-" + draw(slug),
        cli=draw(st.sampled_from(["", "--tp-size 2", "--context-length 4096 --trust-remote-code"])),
        gpus=draw(st.none() | st.integers(1, 8)),
        replicas=draw(st.integers(1, 4)),
        lora=draw(lora_configs()),
        flags=draw(flags()),
    )


@st.composite
def general_configs(draw):
    device = draw(st.sampled_from(["cuda", "cpu"]))
    memory = draw(st.sampled_from(["none", "offload", "swap"])) if device == "cuda" else "none"
    return GeneralConfig(
        debug=draw(st.booleans()),
        device=device,
        auto_cpu_offload=memory == "offload",
        disk_swap=memory == "swap",
        hf_token=draw(st.just("") | st.from_regex(r"hf_[A-Za-z0-9]{30}", fullmatch=True)),
        max_cuda_memory_gib=draw(st.floats(0, 2000)) if device == "cuda" else 0.0,
        flags=draw(flags()),
    )


key_names = st.just(DEFAULT) | st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,10}", fullmatch=True)
counts = st.none() | st.integers(1, 10**9)


@st.composite
def key_limits(draw, endpoints: list[str], priorities: bool):
    model = st.sampled_from(endpoints) | st.builds(lambda e, a: f"{e}:{a}", st.sampled_from(endpoints), slug)
    models = draw(st.none() | st.lists(model, min_size=1, max_size=3, unique=True))
    return KeyLimits(rpm=draw(counts), tpm=draw(counts), concurrent=draw(counts), max_tokens=draw(counts),
                     priority=draw(st.none() | st.integers(-10**9, 10**9)) if priorities else None,
                     models=tuple(models) if models is not None else None)


@st.composite
def auth_configs(draw, models: tuple[ModelConfig, ...], general: GeneralConfig):
    tokens = draw(st.lists(
        st.text(alphabet=string.ascii_letters + string.digits + "-_", min_size=10, max_size=40)
        .map(lambda s: "secret-" + s),  # distinctive, so finding it in an export means a leak
        max_size=3, unique=True))
    named = [f"k{i}-{draw(slug)}={t}" if draw(st.booleans()) else t for i, t in enumerate(tokens)]
    # SGLang schedules by priority with schedule-policy fcfs or lof only: priorities where no flag says otherwise
    policies = {dict(flags).get("schedule-policy", "fcfs") for flags in [general.flags, *(m.flags for m in models)]}
    priorities = policies <= {"fcfs", "lof"}
    limits = draw(st.dictionaries(key_names, key_limits([m.endpoint for m in models], priorities), max_size=3))
    return AuthConfig(tokens=tuple(named), limits=tuple(sorted(limits.items())))


env_names = st.from_regex(r"[A-Z_][A-Z0-9_]{0,10}", fullmatch=True).filter(lambda n: n not in OWNED_ENV)


@st.composite
def deployment_configs(draw):
    count = draw(st.integers(1, 3))
    models = tuple(draw(model_configs(i)) for i in range(count))
    general = draw(general_configs())
    return DeploymentConfig(
        models=models,
        instance=InstanceConfig(name=draw(nonempty_text), project=draw(nonempty_text), queue=draw(text),
                                gateway_route=draw(text)),
        general=general,
        env=tuple(sorted(draw(st.dictionaries(env_names, text, max_size=4)).items())),
        idle=IdleConfig(time_limit_hours=draw(st.floats(0, 1000)), report_interval_seconds=draw(st.integers(1, 86400))),
        auth=draw(auth_configs(models, general)),
    )


PROPERTY_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(deployment_configs())
def test_export_then_import_is_the_identity_minus_secrets(config):
    assert parse_config(to_mapping(config)) == config.without_secrets()
    assert parse_config_text(to_json(config)) == to_mapping(config)  # the file is exactly the mapping
    assert parse_config(parse_config_text(to_json(config))) == config.without_secrets()


@PROPERTY_SETTINGS
@given(deployment_configs())
def test_hyperparameters_as_strings_read_back_to_the_same_config(config):
    params = {h.name: h.value for h in to_hyperparameters(config)}
    assert all(isinstance(v, str) for v in params.values())
    assert load_config(hyperparameters=params) == config


@PROPERTY_SETTINGS
@given(deployment_configs())
def test_export_never_contains_a_secret(config):
    exported = to_json(config)
    for secret in config.secrets:
        assert secret not in exported


def test_ui_edited_strings_are_read_through_the_schema():
    # what a user types in the ClearML UI: ClearML's own spellings of booleans, spaces, empty for "default"
    params = {
        "Models/0/model": " Qwen/Qwen2.5-0.5B-Instruct ",
        "Models/0/gpus": "2",
        "Models/0/replicas": "",
        "Models/0/lora/enable": "True",
        "Models/0/lora/modules": "sql=org/sql-lora, chat=org/chat-lora",
        "Models/0/context-length": "8k",
        "General/debug": "False",
        "General/max-running-requests": "64",
        "General/schedule-policy": "lpm",
        "Environment/NCCL_DEBUG": "WARN",
        "Idle/time_limit_hours": "0.5",
        "Args/unrelated": "kept out",
        "properties/status": "active",
    }
    config = load_config(hyperparameters=params)
    model = config.models[0]
    assert model.model == "Qwen/Qwen2.5-0.5B-Instruct"
    assert (model.gpus, model.replicas) == (2, 1)
    assert [str(m) for m in model.lora.modules] == ["sql=org/sql-lora", "chat=org/chat-lora"]
    assert model.flags == (("context-length", 8000),)
    assert config.general.flags == (("max-running-requests", 64), ("schedule-policy", "lpm"))
    assert config.env == (("NCCL_DEBUG", "WARN"),)
    assert config.idle.time_limit_hours == 0.5


def test_set_overrides_spell_the_same_config_as_a_file(tmp_path):
    path = tmp_path / "deploy.json"
    path.write_text(json.dumps({"models": [{"model": "org/a", "gpus": 2, "lora": {"enable": True,
                                                                                  "modules": ["x=org/x"]}}],
                                "general": {"max-running-requests": 8}, "env": {"A": "1"}}))
    from_file = load_config(path)
    from_set = load_config(overrides=["models[0].model=org/a", "models.0.gpus=2", "models.0.lora.enable=true",
                                      "models.0.lora.modules=x=org/x", "general.max-running-requests=8", "env.A=1"])
    assert from_file == from_set
    assert load_config(path, overrides=["models.0.gpus=4"]).models[0].gpus == 4
