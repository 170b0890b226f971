"""The CPU development mode's KV pool, sized from the model (`app.sglang.pool`): what `clearml-sglang args` shows for
a model fabricated locally (its real config.json, a safetensors file of known size), and the sizing's bounds."""

from __future__ import annotations

import io
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

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



# config.json files built to hurt (or broken): the plan, `args`, `check` and `run` read them; none may crash on them.
HOSTILE = {
    "nested past the parser's depth": "[" * 200_000,
    "heads as a string": json.dumps({**SMOLLM2, "num_attention_heads": "9"}),
    "a negative context": json.dumps({**SMOLLM2, "max_position_embeddings": -5}),
    "an absurd context": json.dumps({**SMOLLM2, "max_position_embeddings": 10**30}),
    "true as a count": json.dumps({**SMOLLM2, "num_hidden_layers": True}),
    "a latent rank as a list": json.dumps({**SMOLLM2, "kv_lora_rank": [1]}),
    "a model type as a number": json.dumps({**SMOLLM2, "model_type": 5, "sliding_window": 4096,
                                            "layer_types": None}),
}


@pytest.mark.parametrize("text", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_hostile_config_json_leaves_the_pool_to_sglang_and_check_says_it_plainly(tmp_path, text):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(text)
    (folder / "chat_template.jinja").write_bytes(b"\xff\xfe not utf-8")
    engine = args_of(f"models.0.model={folder}")
    pool = flag(engine["argv"], "--max-total-tokens")
    assert pool is None or 0 < int(pool) <= CPU_CONTEXTS * 2**31, pool
    if pool is None:
        assert "KV pool: SGLang sizes it from the available RAM" in " ".join(engine["notes"])
    out, err = io.StringIO(), io.StringIO()
    try:
        code = main(["check", "--set", f"models.0.model={folder}", "--set", "general.device=cpu"], out, err)
    except SystemExit as exc:
        code = exc.code
    assert code in (0, 2) and "Traceback" not in out.getvalue() + err.getvalue()


@given(st.dictionaries(st.sampled_from(["num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                        "head_dim", "hidden_size", "kv_lora_rank", "qk_rope_head_dim",
                                        "max_position_embeddings", "torch_dtype", "model_type", "sliding_window",
                                        "layer_types", "text_config"]),
                       st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                                    lambda inner: st.lists(inner, max_size=3)
                                    | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)))
def test_any_json_values_in_a_config_size_a_whole_pool_or_none(config):
    pool = cpu_pool(config, weights_bytes=0, available_bytes=64 * GIB)
    assert pool is None or (pool.tokens > 0 and pool.kv_bytes_per_token > 0)
