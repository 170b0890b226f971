"""Pre-flight, as `clearml-sglang check` answers: models fabricated locally (their real config.json and safetensors
headers, no weights), the hub replaced by a recording stand-in at its one seam (`ModelFiles`)."""

from __future__ import annotations

import io
import json
import struct
import threading
import time
from pathlib import Path

import pytest

from app.cli import main
from app.config import parse_config
from app.errors import ModelNotFound
from app.preflight import Target, preflight, problems_of
from app.preflight.estimate import kv_bytes_per_token
from app.preflight.files import FOUND, NOT_FOUND, UNREACHABLE, Lookup, read_header, read_local
from app.preflight.registry import entry_classes, module_entry_classes, sglang_architectures
from app.serving.models import describe

LLAMA_70B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
             "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
             "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
             "torch_dtype": "bfloat16"}


def llama_tensors(c: dict) -> dict[str, tuple[str, list[int]]]:
    h, i, v, kv = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_key_value_heads"]
    head_dim = h // c["num_attention_heads"]
    tensors = {"model.embed_tokens.weight": ("BF16", [v, h]), "lm_head.weight": ("BF16", [v, h]),
               "model.norm.weight": ("BF16", [h])}
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        tensors.update({p + "self_attn.q_proj.weight": ("BF16", [h, h]),
                        p + "self_attn.k_proj.weight": ("BF16", [kv * head_dim, h]),
                        p + "self_attn.v_proj.weight": ("BF16", [kv * head_dim, h]),
                        p + "self_attn.o_proj.weight": ("BF16", [h, h]),
                        p + "mlp.gate_proj.weight": ("BF16", [i, h]), p + "mlp.up_proj.weight": ("BF16", [i, h]),
                        p + "mlp.down_proj.weight": ("BF16", [h, i]),
                        p + "input_layernorm.weight": ("BF16", [h]),
                        p + "post_attention_layernorm.weight": ("BF16", [h])})
    return tensors


def fabricate(folder: Path, config: dict, tensors: dict | None = None) -> Path:
    """A model's folder: its config.json and one safetensors file holding only its header (offsets as if the data
    followed)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    header, offset = {}, 0
    for name, (dtype, shape) in (tensors or {}).items():
        size = 2
        for d in shape:
            size *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    return folder


class FakeHub:
    """The hub as a dict of names to lookups; records what was asked."""

    def __init__(self, answers: dict[str, Lookup] | None = None, default: Lookup | None = None):
        self.answers, self.default, self.asked = answers or {}, default, []

    def lookup(self, name, files=("config.json",)):
        self.asked.append((name, files))
        return self.answers.get(name, self.default or Lookup(NOT_FOUND, detail="no such model on the hub"))


def check(raw: dict, target: Target, hub: FakeHub | None = None, supported=frozenset({"LlamaForCausalLM"})):
    config = parse_config(raw)
    checks = preflight(config, describe(config), target, hub or FakeHub(), supported=supported,
                       knows=lambda model_type: model_type == "llama")
    return checks, [str(p) for p in problems_of(checks)]


GPU_80 = Target("cuda", gpu_count=1, gpu_memory_gib=80)


def test_a_70b_llama_on_one_80_gib_gpu_is_refused_with_the_figures_and_the_tp_size_that_fits(tmp_path):
    folder = fabricate(tmp_path / "llama-70b", LLAMA_70B, llama_tensors(LLAMA_70B))
    checks, problems = check({"models": [{"model": str(folder), "gpus": 1}]}, GPU_80)
    assert checks[0].weights_bytes == 70_553_706_496 * 2  # Llama 3 70B's parameters, in bf16
    assert len(problems) == 1
    assert "weights alone take 131.4 GiB" in problems[0] and "tp-size 4 (4 GPUs) would fit" in problems[0]


def test_the_same_70b_llama_with_tp_size_4_passes(tmp_path):
    folder = fabricate(tmp_path / "llama-70b", LLAMA_70B, llama_tensors(LLAMA_70B))
    checks, problems = check({"models": [{"model": str(folder), "gpus": 4}]}, Target("cuda", 4, 80))
    assert problems == []
    assert checks[0].kv_bytes_per_token == 80 * 8 * 128 * 2 * 2  # layers x KV heads x head dim x K,V x bf16


def test_tp_size_2_leaves_too_little_for_one_context_and_says_how_many_tokens_fit(tmp_path):
    folder = fabricate(tmp_path / "llama-70b", LLAMA_70B, llama_tensors(LLAMA_70B))
    _, problems = check({"models": [{"model": str(folder), "gpus": 2}]}, Target("cuda", 2, 80))
    assert len(problems) == 1
    assert "less than one full context of 8,192 tokens" in problems[0]
    assert "tp-size 4 (4 GPUs) would fit" in problems[0] and "lower context-length (at most" in problems[0]



def test_models_sharing_a_gpu_are_judged_against_the_share_the_plan_gives_each(tmp_path):
    """A 30-layer Llama (51.7 GiB of weights) fits one 80 GiB GPU alone, not beside another model: the plan splits the
    card (mem-fraction-static 0.44 each), and pre-flight judges each against its part."""
    config = {**LLAMA_70B, "num_hidden_layers": 30}
    folder = fabricate(tmp_path / "llama-30-layers", config, llama_tensors(config))
    models = [{"model": str(folder), "endpoint_name": f"m{i}", "gpus": 1} for i in range(2)]
    assert check({"models": models[:1]}, GPU_80)[1] == []
    _, shared = check({"models": models}, GPU_80)
    assert len(shared) == 2 and all("mem-fraction-static 0.44" in p and "weights alone take 51.7 GiB" in p
                                    for p in shared), shared


def test_models_that_cannot_be_placed_are_a_problem_of_check_too(tmp_path):
    folder = fabricate(tmp_path / "llama-70b", LLAMA_70B, llama_tensors(LLAMA_70B))
    _, problems = check({"models": [{"model": str(folder), "gpus": 2}]}, GPU_80)
    assert any("needs 2 GPUs; this machine has 1" in p for p in problems), problems

def test_a_folder_without_config_json_is_named_with_the_fix(tmp_path):
    (tmp_path / "empty").mkdir()
    _, problems = check({"models": [{"model": str(tmp_path / "empty")}]}, GPU_80)
    assert problems == [f"models[0].model: {tmp_path / 'empty'} holds no readable config.json (point it at a folder "
                        "that holds the model's config.json, weights and tokenizer)"]


def test_an_architecture_neither_sglang_nor_transformers_runs_is_refused(tmp_path):
    folder = fabricate(tmp_path / "odd", {**LLAMA_70B, "architectures": ["OddForCausalLM"], "model_type": "odd"})
    _, problems = check({"models": [{"model": str(folder)}]}, GPU_80)
    assert len(problems) == 1 and "SGLang cannot run its architecture (OddForCausalLM; model_type odd)" in problems[0]


def test_an_architecture_only_transformers_knows_is_a_warning_about_the_fallback(tmp_path):
    folder = fabricate(tmp_path / "t", {**LLAMA_70B, "architectures": ["LlamaLikeForCausalLM"]})
    checks, problems = check({"models": [{"model": str(folder)}]}, GPU_80)
    assert problems == []
    assert any("Transformers fallback" in f.message and not f.problem for f in checks[0].findings)


def test_a_typo_offline_is_a_warning_with_the_cached_name_it_likely_meant():
    hub = FakeHub(default=Lookup(UNREACHABLE, detail="the hub cannot be reached from here (ConnectError)",
                                 similar="Qwen/Qwen2.5-0.5B-Instruct"))
    checks, problems = check({"models": [{"model": "Qwen/Qwen2.5-0.5B-Instruc"}]}, GPU_80, hub)
    assert problems == []
    assert str(checks[0].findings[0]) == (
        "models[0].model: Qwen/Qwen2.5-0.5B-Instruc not verified: the hub cannot be reached from here (ConnectError); "
        "the engine will try (did you mean 'Qwen/Qwen2.5-0.5B-Instruct' (in the local cache)?)")


def test_a_name_the_hub_does_not_have_is_a_problem():
    _, problems = check({"models": [{"model": "org/no-such-model"}]}, GPU_80)
    assert problems == ["models[0].model: org/no-such-model: no such model on the hub (check the name on "
                        "https://huggingface.co)"]


def adapter_problems(tmp_path: Path, adapter_config: dict, **lora) -> list[str]:
    """The problems of a one-layer Llama base on 4 GPUs with one adapter `sql` of this adapter_config.json."""
    base = fabricate(tmp_path / "base", LLAMA_70B, llama_tensors({**LLAMA_70B, "num_hidden_layers": 1}))
    adapter = tmp_path / "sql"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(adapter_config))
    raw = {"models": [{"model": str(base), "gpus": 4,
                       "lora": {"enable": True, "modules": [f"sql={adapter}"], **lora}}]}
    return check(raw, Target("cuda", 4, 80))[1]


def test_an_adapter_of_rank_64_with_max_lora_rank_8_is_refused(tmp_path):
    problems = adapter_problems(tmp_path, {"r": 64, "target_modules": ["q_proj", "v_proj"]}, max_lora_rank=8)
    assert problems == ["models[0].lora.modules[0]: adapter sql has rank 64, above max_lora_rank 8 (set "
                        "lora.max_lora_rank to 64 or more)"]


def test_an_adapter_for_modules_the_base_lacks_is_refused(tmp_path):
    problems = adapter_problems(tmp_path, {"r": 8, "target_modules": ["query_key_value"]})
    assert problems == ["models[0].lora.modules[0]: adapter sql targets modules its base model does not have: "
                        "query_key_value (use an adapter trained for this base model)"]


def test_kv_per_token_of_latent_attention_and_windowed_models():
    deepseek = {"num_hidden_layers": 61, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "torch_dtype": "bfloat16"}
    assert kv_bytes_per_token(deepseek, tp=8).bytes_per_token == 61 * 576 * 2  # every rank holds it whole
    gemma = {"model_type": "gemma3_text", "num_hidden_layers": 26, "sliding_window": 512,
             "layer_types": ["sliding_attention", "full_attention"]}
    assert kv_bytes_per_token(gemma).bytes_per_token is None and "sliding-window" in kv_bytes_per_token(gemma).why_not
    assert kv_bytes_per_token({**LLAMA_70B}, tp=16).bytes_per_token == 80 * 1 * 128 * 2 * 2  # a KV head a rank


def test_registry_names_follow_aliases_and_lists():
    import ast

    tree = ast.parse("from x import Real as Alias\nclass A: pass\nB = A\nEntryClass = [Alias, B]\n")
    assert entry_classes(tree) == ["Real", "A"]


@pytest.mark.parametrize("source, names", [
    ("class A: pass\nEntryClass = A\n", ["A"]),
    ("class A: pass\nclass B: pass\nEntryClass = [\n    A,\n    B,\n]\n", ["A", "B"]),
    ("class A: pass\nEntryClass = (A,)  # the one\n", ["A"]),
    ("from x import Real as A\nEntryClass = A\n", ["Real"]),  # (imported under another name: parsed)
    ("class A: pass\nB = A\nEntryClass = [A, B]\n", ["A", "A"]),
    ("class A: pass\nEntryClass = [A,  # the first\n    Other]\n", ["A", "Other"]),  # (a comment in the list)
    ("if True:\n    class A: pass\nEntryClass = A\n", ["A"]),  # (not at the top level: parsed)
    ("class A: pass\n", []),
])
def test_a_modules_entry_classes_read_by_pattern_are_what_parsing_it_finds(source, names):
    import ast

    assert module_entry_classes(source) == entry_classes(ast.parse(source)) == names


def test_the_installed_sglang_registry_read_by_pattern_is_what_parsing_it_finds():
    pytest.importorskip("sglang")
    import ast

    from app.preflight.registry import models_dir

    parsed, read = set(), set()
    for module in models_dir().glob("*.py"):
        source = module.read_text(encoding="utf-8")
        parsed.update(entry_classes(ast.parse(source)))
        read.update(module_entry_classes(source))
    assert read == parsed and len(read) > 200


def test_the_installed_sglang_registry_is_read_in_seconds_without_importing_it():
    pytest.importorskip("sglang")
    import sys

    sglang_architectures.cache_clear()
    started = time.monotonic()
    names = sglang_architectures()
    assert time.monotonic() - started < 5
    assert {"LlamaForCausalLM", "Qwen2ForCausalLM", "DeepseekV3ForCausalLM"} <= names
    assert "sglang.srt.models.llama" not in sys.modules


def test_check_prints_a_report_and_exits_2_with_every_problem(tmp_path):
    big = fabricate(tmp_path / "llama-70b", LLAMA_70B, llama_tensors(LLAMA_70B))
    (tmp_path / "empty").mkdir()
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"models": [{"model": str(big), "gpus": 1}, {"model": str(tmp_path / "empty")}]}))
    out, err = io.StringIO(), io.StringIO()
    code = main(["check", "--config", str(cfg), "--gpu-count", "1", "--gpu-memory-gib", "80"], out, err)
    assert code == 2
    assert "llama-70b (" in out.getvalue() and "weights 131.42 GiB" in out.getvalue()
    assert out.getvalue().count("1 problem (below)") == 2
    assert "2 problems" in err.getvalue() and "tp-size 4" in err.getvalue() and "config.json" in err.getvalue()


def test_check_json_is_one_object_a_model(tmp_path):
    folder = fabricate(tmp_path / "m", LLAMA_70B, llama_tensors({**LLAMA_70B, "num_hidden_layers": 2}))
    out = io.StringIO()
    code = main(["check", "--set", f"models.0.model={folder}", "--gpu-count", "1", "--gpu-memory-gib", "80",
                 "--json"], out, io.StringIO())
    assert code == 0
    [report] = [json.loads(line) for line in out.getvalue().splitlines()]
    assert report["found"] == "local folder" and report["problems"] == [] and report["weights_gib"] > 0


def test_read_local_reads_headers_only(tmp_path):
    folder = fabricate(tmp_path / "m", {"architectures": ["LlamaForCausalLM"]}, {"w": ("F32", [3, 4])})
    found = read_local(folder)
    assert found.outcome == FOUND and found.tensors == {"w": ("F32", [3, 4])}


def hf_cache(root: Path, name: str, config: dict) -> Path:
    """A HuggingFace cache holding one model's config.json, laid out as huggingface_hub lays it out."""
    repo = root / ("models--" + name.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    blob = repo / "blobs" / "config"
    blob.write_text(json.dumps(config))
    (snapshot / "config.json").symlink_to(blob)
    return root


def test_the_hub_seam_finds_a_cached_model_and_suggests_it_for_a_typo_within_seconds(tmp_path):
    from app.preflight.files import HubFiles

    cache = hf_cache(tmp_path / "hub", "Qwen/Qwen2.5-0.5B-Instruct", {"architectures": ["Qwen2ForCausalLM"]})
    hub = HubFiles(cache_dir=cache, endpoint="http://127.0.0.1:9")  # a hub that cannot be reached, wherever this runs
    found = hub.lookup("Qwen/Qwen2.5-0.5B-Instruct")
    assert (found.outcome, found.where, found.config["architectures"]) == (FOUND, "local cache", ["Qwen2ForCausalLM"])
    started = time.monotonic()
    typo = hub.lookup("Qwen/Qwen2.5-0.5B-Instruc")
    assert time.monotonic() - started < 5
    assert (typo.outcome, typo.similar) == (UNREACHABLE, "Qwen/Qwen2.5-0.5B-Instruct")


QWEN25_TEMPLATE = ("{%- if tools %}<|im_start|>system\n# Tools\n<tools>{{ tools }}</tools>\nFor each function call, "
                   "return a json object within <tool_call></tool_call> XML tags{%- endif %}<|im_start|>")
LLAMA3_TEMPLATE = ("{{- bos_token }}{%- if tools is not none %}Environment: ipython\n{%- endif %}"
                   "<|start_header_id|>system<|end_header_id|>{{ content }}<|eot_id|>")


@pytest.mark.parametrize("model_type, arch, template, parser", [
    ("qwen2", "Qwen2ForCausalLM", QWEN25_TEMPLATE, "qwen25"),
    ("llama", "LlamaForCausalLM", LLAMA3_TEMPLATE, "llama3"),
])
def test_args_gives_a_family_its_documented_tool_parser(tmp_path, model_type, arch, template, parser):
    folder = fabricate(tmp_path / "m", {"architectures": [arch], "model_type": model_type})
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    out = io.StringIO()
    assert main(["args", "--set", f"models.0.model={folder}"], out, io.StringIO()) == 0
    [line] = [json.loads(x) for x in out.getvalue().splitlines()]
    argv = line["argv"]
    assert argv[argv.index("--tool-call-parser") + 1] == parser and "--reasoning-parser" not in argv
    assert any(note.startswith("parsers for ") for note in line["notes"])


def test_the_users_own_parser_wins(tmp_path):
    folder = fabricate(tmp_path / "m", {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"})
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": QWEN25_TEMPLATE}))
    out = io.StringIO()
    main(["args", "--set", f"models.0.model={folder}", "--set", "models.0.tool-call-parser=hermes"], out,
         io.StringIO())
    argv = json.loads(out.getvalue())["argv"]
    assert argv.count("--tool-call-parser") == 1 and argv[argv.index("--tool-call-parser") + 1] == "hermes"


def test_a_model_of_no_known_family_gets_no_parser(tmp_path):
    folder = fabricate(tmp_path / "m", {"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    out = io.StringIO()
    main(["args", "--set", f"models.0.model={folder}"], out, io.StringIO())
    assert "--tool-call-parser" not in json.loads(out.getvalue())["argv"]


class Registry:
    """ClearML's model registry at its seam: names by ID; `hold` keeps it from answering."""

    def __init__(self, names: dict[str, str], hold: threading.Event | None = None):
        self.names, self.hold = names, hold

    def name_of(self, model_id: str) -> str:
        if self.hold is not None:
            self.hold.wait()
        if model_id not in self.names:
            raise ModelNotFound("the server does not know it: ValueError")
        return self.names[model_id]


MODEL_ID = "0123456789abcdef0123456789abcdef"


def clearml_check(registry, timeout_s: float = 4.0):
    config = parse_config({"models": [{"model": MODEL_ID, "endpoint_name": "m"}]})
    [checked] = preflight(config, describe(config), GPU_80, FakeHub(), supported=frozenset(), registry=registry,
                          clearml_timeout_s=timeout_s)
    return checked, [str(f) for f in checked.findings]


def test_a_clearml_model_id_is_asked_of_the_registry_by_name_only():
    checked, findings = clearml_check(Registry({MODEL_ID: "llama-finetune"}))
    assert checked.found == "ClearML model 'llama-finetune'" and problems_of([checked]) == []
    assert findings == ["models[0].model: its files are checked when `run` fetches it"]
    checked, findings = clearml_check(Registry({}))
    assert [str(p) for p in problems_of([checked])] == [
        f"models[0].model: no ClearML model {MODEL_ID} (the server does not know it: ValueError) (copy the ID from "
        "the model's page in the ClearML web app (Models))"]


def test_a_clearml_model_id_without_a_server_or_an_answer_is_not_verified_a_warning():
    _, findings = clearml_check(None)
    assert findings == ["models[0].model: not verified: no ClearML server is configured here; its files are checked "
                        "when `run` fetches it"]
    hold = threading.Event()
    began = time.monotonic()
    checked, findings = clearml_check(Registry({MODEL_ID: "x"}, hold), timeout_s=0.2)
    hold.set()
    assert time.monotonic() - began < 2 and problems_of([checked]) == []
    assert findings[0].startswith("models[0].model: not verified: the ClearML server did not answer in 0.2 s")


def test_check_says_a_clearml_model_id_is_not_verified_where_no_server_is_configured(monkeypatch, tmp_path):
    for name in ("CLEARML_API_HOST", "CLEARML_TASK_ID", "CLEARML_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # (no ~/clearml.conf)
    out = io.StringIO()
    assert main(["check", "--set", f"models.0.model={MODEL_ID}", "--set", "models.0.endpoint_name=m",
                 "--gpu-count", "1", "--gpu-memory-gib", "80"], out, io.StringIO()) == 0
    assert "not verified: no ClearML server is configured here" in out.getvalue()


@pytest.mark.parametrize("header", [b"[" * 100_000, b"[1, 2]", b'{"w": {"dtype": "BF16", "shape": ["8"]}}',
                                    b'{"w": {"dtype": 7, "shape": [8]}}', b'{"w": {"dtype": "BF16", "shape": [-8]}}'])
def test_a_safetensors_header_built_to_hurt_is_not_read_not_a_crash(tmp_path, header):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    assert read_header(path) is None


def test_a_clearml_server_that_errors_is_not_verified_at_once():
    class Failing:
        def name_of(self, model_id: str) -> str:
            raise RuntimeError("connection refused")

    began = time.monotonic()
    checked, findings = clearml_check(Failing())
    assert time.monotonic() - began < 2 and problems_of([checked]) == []
    assert findings[0].startswith("models[0].model: not verified: the ClearML server could not be asked (RuntimeError)")
