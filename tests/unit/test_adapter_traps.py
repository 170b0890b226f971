"""Adapters on request against files and requests built to hurt (issue 21): every trap is a refusal in the one error
shape, in bounded time and memory, and a load always ends whatever goes wrong in it."""

from __future__ import annotations

import asyncio
import json
import os
import struct
import time
from pathlib import Path

import pytest

from app.config.types import LoraConfig
from app.gateway.adapters import AdapterRefused, hold_named
from app.gateway.bodies import lora_paths, model_field, with_model
from app.serving.adapter_files import (
    MAX_SAFETENSORS_HEADER_BYTES,
    Fetcher,
    inspect,
    max_weight_bytes,
    safetensors_problem,
)
from app.serving.adapter_references import LOCAL
from app.serving.adapters import OnRequestAdapters
from tests.unit.test_adapters_on_request import Clock, RecordingEngine, write_adapter

TINY_LLAMA = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
              "vocab_size": 256}


def safetensors(tensors: dict[str, tuple[str, list[int]]], extra: bytes = b"") -> bytes:
    """A safetensors file of zeros with these tensors (name -> dtype, shape), and `extra` bytes after its data."""
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        size = {"F32": 4, "F16": 2, "BF16": 2}[dtype] * (shape[0] * shape[1] if len(shape) == 2 else shape[0])
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + b"\0" * offset + extra


def refused_by(path: Path, root: Path, base: dict | None = None) -> AdapterRefused:
    with pytest.raises(AdapterRefused) as caught:
        inspect(str(path), "x", 8, [str(root)], base)
    return caught.value


# ----- the files -----

def test_a_nested_adapter_config_is_a_400_not_a_recursion_error(tmp_path):
    path = write_adapter(tmp_path / "x")
    (path / "adapter_config.json").write_text("[" * 200_000 + "]" * 200_000)  # 400 KB: over the config's budget
    assert "has an adapter_config.json over 64 KiB" in refused_by(path, tmp_path).message
    (path / "adapter_config.json").write_text("[" * 30_000 + "]" * 30_000)  # within it: deep enough to recurse
    refused = refused_by(path, tmp_path)
    assert (refused.status, refused.code) == (400, "invalid_adapter") and "nested too deeply" in refused.message


def test_a_nested_safetensors_header_is_a_400(tmp_path):
    path = write_adapter(tmp_path / "x")
    header = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    (path / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    refused = refused_by(path, tmp_path)
    assert (refused.status, refused.code) == (400, "invalid_adapter") and "nested too deeply" in refused.message


def test_a_huge_safetensors_header_is_refused_from_its_length_alone(tmp_path):
    path = write_adapter(tmp_path / "x")
    length = 89 * 2**20  # the finding: an 89 MB valid header held the event loop for 34 s
    with open(path / "adapter_model.safetensors", "wb") as file:
        file.write(struct.pack("<Q", length))
        file.truncate(8 + length)  # (sparse: nothing of it is read)
    started = time.perf_counter()
    refused = refused_by(path, tmp_path)
    assert time.perf_counter() - started < 0.5
    assert f"at most {MAX_SAFETENSORS_HEADER_BYTES} are read" in refused.message


def test_sparse_weights_are_refused_without_being_read(tmp_path):
    path = write_adapter(tmp_path / "x")
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(safetensors({"a.lora_A.weight": ("F32", [8, 64])}))
    with open(weights, "r+b") as file:
        file.truncate(2 * 1024**3)  # 2 GB of holes after one small tensor
    started = time.perf_counter()
    refused = refused_by(path, tmp_path)
    assert "bytes no tensor holds" in refused.message or "not as long as its tensors" in refused.message
    over = refused_by(path, tmp_path, TINY_LLAMA)  # and with the base model known, from its size alone
    assert "more than a rank-8 LoRA of this model can have" in over.message
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize(("tensors", "says"), [
    ({"a": ("F32", [8, 64]), "b": ("I64", [2, 2])}, "of dtype 'I64'"),
    ({"a": ("F32", [8, 64])}, None),
])
def test_a_safetensors_file_must_be_exact(tmp_path, tensors, says):
    file = tmp_path / "w.safetensors"
    data = safetensors({k: v for k, v in tensors.items() if v[0] != "I64"})
    if says:  # a tensor of a dtype no LoRA weight has, described in the header
        header = json.loads(data[8:8 + struct.unpack("<Q", data[:8])[0]])
        header["b"] = {"dtype": "I64", "shape": [2, 2], "data_offsets": [2048, 2080]}
        encoded = json.dumps(header).encode()
        data = struct.pack("<Q", len(encoded)) + encoded + b"\0" * 2080
    file.write_bytes(data)
    problem = safetensors_problem(str(file), file.stat().st_size)
    assert (problem is None) if says is None else (says in problem)


def test_files_that_lead_outside_the_adapter_directories_are_refused(tmp_path):
    root = tmp_path / "adapters"
    path = write_adapter(root / "x")
    secret = write_adapter(tmp_path / "elsewhere")
    (path / "adapter_model.safetensors").unlink()
    (path / "adapter_model.safetensors").symlink_to(secret / "adapter_model.safetensors")
    refused = refused_by(path, root)
    assert (refused.status, refused.code) == (403, "adapter_path_not_allowed")
    (path / "adapter_model.safetensors").unlink()
    os.mkfifo(path / "adapter_model.safetensors")  # opening it would block for good
    assert "not a regular file" in refused_by(path, root).message


def test_the_weight_bound_follows_the_base_model_and_the_rank():
    small, large = max_weight_bytes(TINY_LLAMA, 8), max_weight_bytes(TINY_LLAMA, 64)
    assert small is not None and large is not None and large > small > 0
    real_rank_8 = 2 * 7 * 8 * (64 + 128) * 4  # every linear layer of both blocks, F32: well under the bound
    assert real_rank_8 < small < 2 * 1024**3
    assert max_weight_bytes({"architectures": ["X"]}, 8) is None
    moe = {**TINY_LLAMA, "num_local_experts": 8}
    assert max_weight_bytes(moe, 8) > small


# ----- fetching from the hub -----

class RecordingHub:
    def __init__(self, files: dict[str, int], folder: Path):
        self.files_listed, self.folder, self.asked = files, folder, []

    def files(self, repo: str, token: str | None) -> dict[str, int]:
        return self.files_listed

    def download(self, repo: str, names: list[str], token: str | None) -> str:
        self.asked.append(names)
        return str(write_adapter(self.folder / "snapshot"))


def test_an_hf_adapter_is_fetched_alone_and_within_its_size(tmp_path):
    hub = RecordingHub({"adapter_config.json": 500, "adapter_model.safetensors": 10 * 2**20, "README.md": 10,
                        "model-00001-of-00030.safetensors": 5 * 1024**3}, tmp_path)
    fetched = Fetcher(None, hub=hub)("hf", "org/sql-lora", 10 * 2**20)
    assert hub.asked == [["adapter_config.json", "adapter_model.safetensors"]] and fetched.path.endswith("snapshot")
    with pytest.raises(AdapterRefused) as caught:
        Fetcher(None, hub=hub)("hf", "org/sql-lora", 2**20)
    assert caught.value.code == "invalid_adapter" and "more than an adapter of this model can" in caught.value.message
    with pytest.raises(AdapterRefused) as caught:
        Fetcher(None, hub=RecordingHub({"model.safetensors": 10}, tmp_path))("hf", "org/base-model")
    assert "holds no PEFT LoRA adapter" in caught.value.message
    assert len(hub.asked) == 1  # nothing downloaded for either refusal


# ----- one model's loads -----

def on_request(root: Path, engine, fetch=None, **options) -> OnRequestAdapters:
    config = LoraConfig(enable=True, max_loras=1, max_cpu_loras=3, max_lora_rank=8, on_request=(LOCAL,),
                        on_request_dirs=(str(root),))
    return OnRequestAdapters("m", config, engine=engine, fetch=fetch or Fetcher(None), clock=Clock(), **options)


def test_every_spelling_of_one_folder_is_one_load(tmp_path):
    root = tmp_path / "adapters"
    write_adapter(root / "one")
    engine = RecordingEngine()
    adapters = on_request(root, engine)
    spellings = ["one", f"{root}/one", f"{root}//one", f"{root}/./one", f"{root}/one/", f"{root}/../adapters/one"]

    async def scenario():
        return [await adapters.acquire(spelling) for spelling in spellings * 5]

    leases = asyncio.run(scenario())
    assert engine.calls == [("load", "one")] and {lease.name for lease in leases} == {"one"}
    assert adapters.cards() == [("one", "loaded")]


def test_anything_a_load_raises_ends_it_with_a_refusal_and_clears_its_state(tmp_path):
    root = tmp_path / "adapters"
    write_adapter(root / "one")
    engine = RecordingEngine()

    def broken(*args):
        raise KeyError("a bug")

    adapters = on_request(root, engine, fetch=broken)

    async def scenario():
        engine.load = _raises(RuntimeError("surprise"))  # (an engine call that fails in a way nobody expected)
        with pytest.raises(AdapterRefused) as caught:
            await asyncio.wait_for(adapters.acquire("one"), 5)
        return caught.value

    refused = asyncio.run(scenario())
    assert (refused.status, refused.code) == (502, "adapter_load_failed") and adapters.cards() == []


def _raises(error: Exception):
    async def call(*args):
        raise error
    return call


def test_a_load_past_its_deadline_is_504_and_the_engine_is_told_to_drop_it(tmp_path):
    root = tmp_path / "adapters"
    write_adapter(root / "one")
    engine = RecordingEngine()
    adapters = on_request(root, engine, load_deadline_s=0.2)

    async def scenario():
        engine.gate.clear()  # the engine takes its time
        with pytest.raises(AdapterRefused) as caught:
            await adapters.acquire("one")
        engine.gate.set()
        while ("unload", "one") not in engine.calls:
            await asyncio.sleep(0.01)
        return caught.value

    refused = asyncio.run(asyncio.wait_for(scenario(), 5))
    assert (refused.status, refused.code) == (504, "adapter_load_timeout")
    assert engine.calls == [("load", "one"), ("unload", "one")] and adapters.cards() == []


# ----- lora_path in a body -----

def test_lora_path_may_name_only_adapters_the_gateway_lists_as_loaded(tmp_path):
    root = tmp_path / "adapters"
    write_adapter(root / "one")
    adapters = on_request(root, RecordingEngine())

    async def scenario():
        lease = await adapters.acquire("one")
        lease.release(0.0)
        held = hold_named(["one", "a"], "m", ("a",), adapters)  # loaded on request, and configured
        assert [entry.name for entry in held] == ["one"] and held[0].in_use == 1
        for name in ("two", f"{root}/one"):  # not loaded; loaded, but not under that name
            with pytest.raises(AdapterRefused) as caught:
                hold_named([name], "m", ("a",), adapters)
            assert (caught.value.status, caught.value.code, caught.value.param) == (
                400, "adapter_not_loaded", "lora_path")
        assert adapters.cards() == [("one", "loaded")]  # nothing was loaded for them

    asyncio.run(scenario())


def test_lora_path_and_model_are_read_and_rewritten_in_a_body():
    assert lora_paths(b'{"model": "m", "lora_path": "one"}') == ["one"]
    assert lora_paths(b'{"model": "m", "lora_path": ["one", null, "two"]}') == ["one", "two"]
    assert lora_paths(b'{"model": "m", "lora_path": null}') is None
    assert lora_paths(b'{"messages": [{"content": "what is \\"lora_path\\"?"}]}') is None
    with pytest.raises(ValueError):
        lora_paths(b'{"lora_path": {"a": 1}}')
    body = b'{"model": "m:/dir/./one", "messages": []}'
    assert model_field(with_model(body, "m:one")) == "m:one"
    twice = b'{"model": "m:/x", "messages": [{"content": "\\"model\\""}]}'
    assert json.loads(with_model(twice, "m:one"))["model"] == "m:one"
