"""The CPU development mode's KV pool, sized from the model (`app.sglang.pool`): what `clearml-sglang args` shows for
a model fabricated locally (its real config.json, a safetensors file of known size), and the sizing's bounds."""

from __future__ import annotations

import io
import json

import pytest

from app.cli import main
from app.sglang.pool import CPU_CONTEXTS, CPU_RAM_SHARE, CPU_RUNTIME_BYTES, GIB, cpu_pool
from tests.unit.test_preflight import fabricate

# SmolLM2-135M's shapes: 30 layers x 3 KV heads x 64 x 2 (K, V) x 2 bytes = 23,040 bytes a token; 8,192 positions.
SMOLLM2 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30,
           "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192,
           "torch_dtype": "bfloat16"}
PER_TOKEN, CONTEXT = 23_040, 8192


def args_of(*settings: str) -> dict:
    out = io.StringIO()
    argv = ["args", "--set", "general.device=cpu"]
    for setting in settings:
        argv += ["--set", setting]
    assert main(argv, out, io.StringIO()) == 0
    [engine] = [json.loads(line) for line in out.getvalue().splitlines()]
    return engine


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_a_cpu_engine_pool_holds_its_default_contexts_of_the_models_own_length(tmp_path):
    folder = fabricate(tmp_path / "smollm2", SMOLLM2)
    engine = args_of(f"models.0.model={folder}")
    assert flag(engine["argv"], "--max-total-tokens") == str(CPU_CONTEXTS * CONTEXT)
    [note] = [n for n in engine["notes"] if n.startswith("KV pool")]
    pool_gib = CPU_CONTEXTS * CONTEXT * PER_TOKEN / GIB
    assert f"KV pool {CPU_CONTEXTS * CONTEXT:,} tokens ({CPU_CONTEXTS} contexts of 8,192 tokens)" in note
    assert f"{pool_gib:.2f} GiB" in note and "expected resident" in note
    assert f"{args_of(f'models.0.model={folder}', 'models.0.context-length=512')['notes'][-1]}".startswith(
        "KV pool 4,096 tokens (8 contexts of 512 tokens): 90.0 MiB")  # (23,040 x 4,096 bytes)


def test_max_running_requests_and_context_length_size_it_and_max_total_tokens_replaces_it(tmp_path):
    folder = fabricate(tmp_path / "smollm2", SMOLLM2)
    sized = args_of(f"models.0.model={folder}", "models.0.max-running-requests=3", "models.0.context-length=2048")
    assert flag(sized["argv"], "--max-total-tokens") == str(3 * 2048)
    own = args_of(f"models.0.model={folder}", "models.0.max-total-tokens=1000")
    assert own["argv"].count("--max-total-tokens") == 1 and flag(own["argv"], "--max-total-tokens") == "1000"
    assert not any(n.startswith("KV pool") for n in own.get("notes", []))


def test_the_available_ram_caps_it_shared_by_the_deployments_cpu_engines():
    small = cpu_pool(SMOLLM2, weights_bytes=0, available_bytes=2 * GIB, engines=2)
    budget = int(2 * GIB * CPU_RAM_SHARE / 2)
    assert small.capped and small.tokens == budget // PER_TOKEN < CPU_CONTEXTS * CONTEXT
    assert small.pool_bytes <= budget and "capped by 25% of the available RAM" in small.note()
    roomy = cpu_pool(SMOLLM2, weights_bytes=0, available_bytes=64 * GIB, engines=2)
    assert not roomy.capped and roomy.tokens == CPU_CONTEXTS * CONTEXT


def test_it_never_holds_less_than_one_context_pre_flight_refuses_what_does_not_fit():
    tight = cpu_pool(SMOLLM2, weights_bytes=0, available_bytes=GIB // 100)
    assert tight.tokens == CONTEXT


def test_the_expected_resident_memory_is_runtime_weights_and_pool():
    pool = cpu_pool(SMOLLM2, weights_bytes=269_060_552, available_bytes=64 * GIB)
    assert pool.resident_bytes == CPU_RUNTIME_BYTES + 269_060_552 + CPU_CONTEXTS * CONTEXT * PER_TOKEN


@pytest.mark.parametrize("config", [{"architectures": ["X"]}, {**SMOLLM2, "max_position_embeddings": None},
                                    {**SMOLLM2, "layer_types": ["sliding_attention", "full_attention"]}])
def test_a_model_whose_kv_cache_or_context_is_not_known_is_left_to_sglang(config):
    assert cpu_pool(config, weights_bytes=0, available_bytes=64 * GIB) is None

