"""LoRA adapters loaded on request by the real SGLang server on this CPU, behind the real gateway.

One deployment for the module, two models on the tiny Llama: `static` serves adapter `a` from its start; `dyn` has no
adapter configured and loads local ones on request from one directory, at most two at a time. What SGLang itself
holds is read from its own `/v1/models` (with the engine's key), not from the app's bookkeeping.
"""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import struct
import time
from pathlib import Path

import pytest

pytest.importorskip("sglang")

import requests  # noqa: E402

from app.config import load_config  # noqa: E402
from app.demo.tiny_model import make_tiny_models  # noqa: E402
from tests.engine.test_real_engine import AUTH, TOKEN, Served  # noqa: E402
from tests.floods import health_sampler  # noqa: E402

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> Path:
    """The allowed directory: copies of the tiny adapters, a third one, one with corrupt weights, one of too high a
    rank, one for modules the engine did not reserve memory for, and a link that leads outside."""
    root = Path(tmp_path_factory.mktemp("lora"))
    models = make_tiny_models(root / "tiny")
    allowed = root / "adapters"
    allowed.mkdir()
    for name, source in (("one", 0), ("two", 1), ("three", 0), ("broken", 0), ("wide", 0), ("mlp", 0)):
        shutil.copytree(models.adapters[source], allowed / name)
    weights = allowed / "broken" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # cut short
    config = json.loads((allowed / "wide" / "adapter_config.json").read_text())
    (allowed / "wide" / "adapter_config.json").write_text(json.dumps({**config, "r": 16}))
    # modules the engine reserved no memory for: only SGLang can judge that
    (allowed / "mlp" / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["gate_proj"]}))
    (allowed / "notes").mkdir()
    (allowed / "notes" / "adapter_config.json").write_text("{ this is not json")
    shutil.copytree(models.adapters[0], root / "outside")
    (allowed / "link").symlink_to(root / "outside")
    (allowed / "base").symlink_to(models.base)
    make_traps(allowed, root / "outside")
    return allowed


def make_traps(allowed: Path, outside: Path) -> None:
    """Adapters built to hurt (issue 21): each looks like an adapter, and each once cost a hang, the event loop or
    memory."""
    config = (allowed / "one" / "adapter_config.json").read_text()
    for name in ("nested-config", "deep-config", "nested-header", "huge-header", "sparse", "linked-weights"):
        shutil.copytree(allowed / "one", allowed / name)
    (allowed / "nested-config" / "adapter_config.json").write_text("[" * 200_000 + "]" * 200_000)
    (allowed / "deep-config" / "adapter_config.json").write_text("[" * 30_000 + "]" * 30_000)
    header = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    (allowed / "nested-header" / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    with open(allowed / "huge-header" / "adapter_model.safetensors", "wb") as file:  # an 89 MB header (sparse)
        file.write(struct.pack("<Q", 89 * 2**20))
        file.truncate(8 + 89 * 2**20)
    with open(allowed / "sparse" / "adapter_model.safetensors", "r+b") as file:  # 2 GB of holes after its tensors
        file.truncate(2 * 1024**3)
    weights = allowed / "linked-weights" / "adapter_model.safetensors"
    weights.unlink()
    weights.symlink_to(outside / "adapter_model.safetensors")
    assert json.loads(config)


@pytest.fixture(scope="module")
def served(adapters, tmp_path_factory):
    base = str((adapters / "base").resolve())
    static_adapter = str(adapters / "one")
    common = ["lora.enable=true", "lora.max_loras=2", "lora.max_lora_rank=8", "max-total-tokens=65536"]
    config = load_config(overrides=[
        f"models.0.model={base}", "models.0.endpoint_name=static", f"models.0.lora.modules=a={static_adapter}",
        *[f"models.0.{o}" for o in common],
        f"models.1.model={base}", "models.1.endpoint_name=dyn", "models.1.lora.on_request=local",
        f"models.1.lora.on_request_dirs={adapters}", "models.1.lora.max_cpu_loras=2",
        "models.1.lora-target-modules=q_proj,k_proj,v_proj,o_proj", *[f"models.1.{o}" for o in common],
        "general.device=cpu", f"auth.tokens={TOKEN}", "idle.report_interval_seconds=2",
    ])
    with Served.serving(config) as server:
        yield server


def chat(served: Served, model: str) -> requests.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 12,
            "temperature": 0}
    return requests.post(served.base + "/v1/chat/completions", json=body, headers=AUTH, timeout=300)


def answer(served: Served, model: str) -> str:
    response = chat(served, model)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def engine(served: Served, endpoint: str):
    return next(e for e in served.deployment.supervisor.engines if e.endpoint == endpoint)


def held_by_sglang(served: Served) -> set[str]:
    """The adapters the `dyn` engine itself holds, from its own model list."""
    dyn = engine(served, "dyn")
    cards = requests.get(dyn.url + "/v1/models", headers={"Authorization": f"Bearer {dyn.command.api_key}"},
                         timeout=30).json()["data"]
    return {card["id"] for card in cards if card.get("parent") == "dyn"}


def test_an_adapter_on_request_answers_as_the_same_adapter_configured_statically(served, adapters):
    assert held_by_sglang(served) == set()
    reference = f"dyn:{adapters / 'one'}"
    on_request = answer(served, reference)
    assert on_request == answer(served, "static:a")
    assert on_request != answer(served, "dyn")  # the adapter changes the answer
    assert held_by_sglang(served) == {"one"}  # loaded under its folder's name, whatever the spelling asked for it
    cards = requests.get(served.base + "/v1/models", headers=AUTH, timeout=10).json()["data"]
    assert {"id": "dyn:one", "parent": "dyn", "state": "loaded"}.items() <= next(
        c for c in cards if c["id"] == "dyn:one").items()
    loads = served.deployment.built.adapter_stats.loads["dyn"]
    by_name = answer(served, "dyn:one")  # a folder's name in the allowed directory: the same adapter, no new load
    assert by_name == on_request and served.deployment.built.adapter_stats.loads["dyn"] == loads


def test_ten_concurrent_first_requests_cause_one_load(served, adapters):
    stats = served.deployment.built.adapter_stats
    before = stats.loads["dyn"]
    reference = f"dyn:{adapters / 'two'}"
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: answer(served, reference), range(10)))
    assert len(set(answers)) == 1
    assert stats.loads["dyn"] - before == 1
    assert held_by_sglang(served) == {"one", "two"}  # the cap is 2


def test_past_the_cap_the_least_recently_used_adapter_is_unloaded_and_reloaded_on_its_next_request(served, adapters):
    first_answer = answer(served, "dyn:one")  # "one" is now more recent than "two"
    answer(served, "dyn:three")
    assert held_by_sglang(served) == {"one", "three"}
    two = f"dyn:{adapters / 'two'}"
    loads = served.deployment.built.adapter_stats.loads["dyn"]
    assert answer(served, two) != first_answer
    assert held_by_sglang(served) == {"three", "two"}  # "one" was the least recently used
    assert answer(served, "dyn:one") == first_answer
    assert served.deployment.built.adapter_stats.loads["dyn"] == loads + 2


@pytest.mark.parametrize(("reference", "status", "code", "says"), [
    ("{root}/../outside", 403, "adapter_path_not_allowed", "outside the adapter directories"),
    ("{root}/link", 403, "adapter_path_not_allowed", "outside the adapter directories"),
    ("org/some-lora", 403, "adapter_source_not_allowed", "HuggingFace"),
    ("0123456789abcdef0123456789abcdef", 403, "adapter_source_not_allowed", "ClearML"),
    ("{root}/missing", 404, "adapter_not_found", "No adapter"),
    ("notes", 400, "invalid_adapter", "adapter_config.json"),
    ("broken", 400, "invalid_adapter", "corrupt weights"),
    ("mlp", 400, "adapter_load_failed", "could not load"),
    ("wide", 400, "adapter_incompatible", "rank 16, above this model's max_lora_rank 8"),
])
def test_a_reference_that_cannot_be_served_gets_a_4xx_that_says_why_and_the_engine_serves_on(
        served, adapters, reference, status, code, says):
    held = held_by_sglang(served)
    response = chat(served, "dyn:" + reference.format(root=adapters))
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["param"] == "model" and says in error["message"]
    assert held_by_sglang(served) == held
    assert answer(served, "dyn")
    assert engine(served, "dyn").restarts == 0


def listed(served: Served) -> set[str]:
    """The adapters the gateway lists as loaded on request for `dyn`."""
    cards = requests.get(served.base + "/v1/models", headers=AUTH, timeout=10).json()["data"]
    return {c["id"].split(":", 1)[1] for c in cards if c.get("parent") == "dyn" and c["state"] == "loaded"}


def test_adapter_traps_are_refused_in_seconds_with_the_event_loop_never_held(served, adapters):
    """Each trap of the flood review, against the real SGLang: answered in the one error shape within 5 s, a 20 Hz
    /healthz never waiting 250 ms, one load per folder whatever its spelling, and after every step SGLang holds
    exactly what the gateway lists."""
    sampler = health_sampler(served.deployment.gateway.port)
    sampler.start()
    traps = [
        ("nested-config", 400, "invalid_adapter", "over 64 KiB"),
        ("deep-config", 400, "invalid_adapter", "nested too deeply"),
        ("nested-header", 400, "invalid_adapter", "nested too deeply"),
        ("huge-header", 400, "invalid_adapter", "more than a rank-8 LoRA of this model can have"),
        ("sparse", 400, "invalid_adapter", "more than a rank-8 LoRA of this model can have"),
        ("linked-weights", 403, "adapter_path_not_allowed", "leads outside"),
        ("/proc/self/cwd/../" + adapters.name + "/one", 403, "adapter_path_not_allowed", "outside"),
        (f"{adapters}/../{adapters.name}/link", 403, "adapter_path_not_allowed", "outside"),
    ]
    for reference, status, code, says in traps:
        started = time.monotonic()
        response = chat(served, "dyn:" + reference)
        assert time.monotonic() - started <= 5.0, reference
        assert response.status_code == status, (reference, response.text)
        error = response.json()["error"]
        assert error["code"] == code and says in error["message"], (reference, error)
        assert held_by_sglang(served) == listed(served), reference
    loads = served.deployment.built.adapter_stats.loads["dyn"]
    spellings = ["three", f"{adapters}/three", f"{adapters}//three", f"{adapters}/./three", f"{adapters}/three/",
                 f"{adapters}/../{adapters.name}/three"]
    answers = {answer(served, "dyn:" + spelling) for spelling in spellings * 2}
    assert len(answers) == 1 and served.deployment.built.adapter_stats.loads["dyn"] <= loads + 1
    assert "three" in held_by_sglang(served) == listed(served)
    # lora_path: only for an adapter loaded now (SGLang would reload one it once had, behind the gateway's back)
    body = {"model": "dyn", "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 4,
            "temperature": 0}
    held = requests.post(served.base + "/v1/chat/completions", json={**body, "lora_path": "three"}, headers=AUTH,
                         timeout=300)
    assert held.status_code == 200, held.text
    for name in ("never-loaded", f"{adapters}/three"):
        refused = requests.post(served.base + "/v1/chat/completions", json={**body, "lora_path": name},
                                headers=AUTH, timeout=300)
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "adapter_not_loaded", refused.text
    assert held_by_sglang(served) == listed(served)
    timings = sampler.stop()
    assert not timings.failures and timings.worst < 0.25, timings.summary()
    assert engine(served, "dyn").restarts == 0
