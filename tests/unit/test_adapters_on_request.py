"""Adapters on request: the config's rules, references to sources, the files checked before the engine is asked,
the unloading policy, and one model's loads (one shared, the least recently used idle one unloaded) against an
engine that records what it is asked. The real SGLang does the same in tests/engine/test_adapters_on_request.py."""

from __future__ import annotations

import asyncio
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from app.config import load_config
from app.config.types import LoraConfig, LoraModule
from app.errors import ConfigError
from app.gateway.adapters import AdapterRefused, requested_adapter
from app.serving.adapter_files import Fetcher, adapter_root, inspect
from app.serving.adapter_references import CLEARML, HF, LOCAL, Identity, Source, identify, source_of
from app.serving.adapters import Entry, OnRequestAdapters, room
from app.serving.models import ModelNotFound, describe
from app.sglang.api import AdapterCallError
from app.sglang.command import build_engine_commands
from app.states import AdapterState

BASE = ["models.0.model=org/base", "models.0.endpoint_name=m", "models.0.lora.max_lora_rank=8",
        "models.0.lora-target-modules=all"]


def write_adapter(path: Path, rank: int = 8, weights: bytes | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 16,
                                                          "target_modules": ["q_proj", "v_proj"]}))
    header = json.dumps({"a.lora_A.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (path / "adapter_model.safetensors").write_bytes(
        weights if weights is not None else struct.pack("<Q", len(header)) + header + b"\0\0\0\0")
    return path


def problems(*overrides: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(overrides=[*BASE, *overrides])
    return str(caught.value)


# ----- the config -----

def test_on_request_is_a_set_of_sources_and_the_directories_a_list():
    config = load_config(overrides=[*BASE, "models.0.lora.enable=true", "models.0.lora.on_request=local, hf, local",
                                    "models.0.lora.on_request_dirs=/data/adapters"])
    lora = config.models[0].lora
    assert lora.on_request == ("local", "hf") and lora.on_request_dirs == ("/data/adapters",)
    assert "models[0].lora.on_request: 's3' is not a list of the choices (write some of: clearml, hf, local)" in \
        problems("models.0.lora.enable=true", "models.0.lora.on_request=s3")


@pytest.mark.parametrize(("overrides", "says"), [
    (["models.0.lora.on_request=hf"], "models[0].lora.on_request: is set but LoRA is off (set lora.enable: true)"),
    (["models.0.lora.enable=true", "models.0.lora.on_request=hf", "models.0.replicas=2"],
     "needs one copy of the model, not 2 replicas"),
    (["models.0.lora.enable=true", "models.0.lora.on_request=local"],
     "models[0].lora.on_request_dirs: is empty, so no local adapter could be loaded"),
    (["models.0.lora.enable=true", "models.0.lora.on_request=local", "models.0.lora.on_request_dirs=adapters"],
     "models[0].lora.on_request_dirs[0]: 'adapters' is not an absolute path"),
    (["models.0.lora.enable=true", "models.0.lora.on_request=local", "models.0.lora.on_request_dirs=/"],
     "is the root directory, which would allow any path"),
    (["models.0.lora.enable=true", "models.0.lora.on_request=hf", "models.0.lora.modules=a=org/a,b=org/b",
      "models.0.lora.max_loras=2", "models.0.lora.max_cpu_loras=2"],
     "models[0].lora.max_cpu_loras: 2 leaves no room for adapters on request beside the 2 modules (set "
     "max_cpu_loras to 3 or more)"),
])
def test_on_request_rules_name_the_field_and_the_fix(overrides, says):
    assert says in problems(*overrides)


def test_the_engine_is_given_one_adapter_slot_more_than_the_app_keeps_loaded():
    config = load_config(overrides=[*BASE, "models.0.lora.enable=true", "models.0.lora.on_request=hf",
                                    "models.0.lora.max_loras=2"])
    assert config.models[0].lora.loaded_cap == 2
    (command,) = build_engine_commands(config, describe(config), [30000])
    argv = command.argv
    assert argv[argv.index("--max-loaded-loras") + 1] == "3"


# ----- references -----

@pytest.fixture
def allowed(tmp_path) -> Path:
    root = tmp_path / "adapters"
    write_adapter(root / "sql")
    write_adapter(tmp_path / "elsewhere")
    (root / "escape").symlink_to(tmp_path / "elsewhere")
    return root


def lora(allowed: Path, *sources: str) -> LoraConfig:
    return LoraConfig(enable=True, modules=(LoraModule("a", "/x"),), on_request=sources,
                      on_request_dirs=(str(allowed),))


def refusal(reference: str, config: LoraConfig) -> AdapterRefused:
    with pytest.raises(AdapterRefused) as caught:
        identify(source_of(reference, "m", config), config)
    return caught.value


def test_references_name_their_source_by_shape(allowed):
    config = lora(allowed, CLEARML, HF, LOCAL)
    assert source_of(str(allowed / "sql"), "m", config) == Source(LOCAL, str(allowed / "sql"))
    assert source_of("sql", "m", config) == Source(LOCAL, "sql")  # a folder's name
    assert source_of("org/sql-lora", "m", config) == Source(HF, "org/sql-lora")
    assert source_of("0123456789ABCDEF0123456789abcdef", "m", config) == Source(
        CLEARML, "0123456789abcdef0123456789abcdef")


def test_every_spelling_of_a_folder_is_one_adapter_under_one_name(allowed):
    config = lora(allowed, LOCAL)
    real = str((allowed / "sql").resolve())
    spellings = ["sql", f"{allowed}/sql", f"{allowed}//sql", f"{allowed}/./sql", f"{allowed}/sql/",
                 f"{allowed}/../adapters/sql", f"{allowed}/escape/../sql"]
    assert {identify(source_of(s, "m", config), config) for s in spellings} == {Identity(f"local:{real}", "sql", real)}
    nested = allowed / "team" / "sql"  # not found by its folder's name: listed by its path
    write_adapter(nested)
    found = identify(source_of(f"{allowed}/team//sql", "m", config), config)
    assert found.name == f"{allowed}/team/sql" and found.path == str(nested.resolve())


def test_a_path_written_outside_is_refused_before_anything_is_looked_up(allowed):
    # the oracle: /proc/self/cwd/.. led to 200 or 403 depending on where the process ran; written outside, it is 403
    # without a look at the disk, and so is every other path that only resolves inside
    config = lora(allowed, LOCAL)
    for reference in ("/proc/self/cwd/../adapters/sql", "/proc/self/root" + str(allowed / "sql"),
                      f"{allowed}/../elsewhere", "/etc/passwd", f"{allowed}x/sql"):
        with pytest.raises(AdapterRefused) as caught:
            source_of(reference, "m", config)
        assert (caught.value.status, caught.value.code) == (403, "adapter_path_not_allowed"), reference


@pytest.mark.parametrize(("reference", "status", "code"), [
    ("{root}/../elsewhere", 403, "adapter_path_not_allowed"),  # out by ..
    ("{root}/escape", 403, "adapter_path_not_allowed"),  # out by a symlink
    ("{root}", 403, "adapter_path_not_allowed"),  # the directory itself is no adapter
    ("/etc/does-not-exist", 403, "adapter_path_not_allowed"),  # outside: its existence is not even looked at
    ("{root}/missing", 404, "adapter_not_found"),
    ("missing", 404, "adapter_not_found"),
    ("escape", 404, "adapter_not_found"),  # a name that leads outside is not there
    (" sql", 400, "invalid_adapter_reference"),
    ("sql\nx", 400, "invalid_adapter_reference"),
    ("a:b", 400, "invalid_adapter_reference"),
    ("", 400, "invalid_adapter_reference"),
    ("x" * 2000, 400, "invalid_adapter_reference"),
])
def test_a_local_reference_is_served_only_from_inside_the_adapter_directories(allowed, reference, status, code):
    refused = refusal(reference.format(root=allowed), lora(allowed, LOCAL))
    assert (refused.status, refused.code) == (status, code)
    assert refused.reply().status == status


def test_a_source_not_allowed_is_403_and_a_mistyped_name_404_listing_the_adapters(allowed):
    refused = refusal("org/sql-lora", lora(allowed, LOCAL))
    assert (refused.status, refused.code) == (403, "adapter_source_not_allowed")
    assert "does not load adapters from HuggingFace repos on request (it loads from: the adapter directories)" in \
        refused.message
    refused = refusal("sqll", lora(allowed, HF))
    assert (refused.status, refused.code) == (404, "model_not_found")
    assert refused.message == "The model m:sqll does not exist: 'm' has the adapters a"


def test_the_gateway_asks_only_for_references_that_are_not_configured_adapters():
    class Loader:
        def configured(self, name: str) -> bool:
            return name == "a"

    loader = Loader()
    assert requested_adapter("m:/data/x", "m", loader) == "/data/x"
    assert requested_adapter("m:a", "m", loader) is None
    assert requested_adapter("m", "m", loader) is None
    assert requested_adapter("other:/data/x", "m", loader) is None
    assert requested_adapter("m:/data/x", "m", None) is None


# ----- the files -----

@pytest.mark.parametrize(("damage", "says", "code"), [
    (lambda p: (p / "adapter_config.json").unlink(), "has no adapter_config.json", "invalid_adapter"),
    (lambda p: (p / "adapter_config.json").write_text("{ no"), "unreadable adapter_config.json", "invalid_adapter"),
    (lambda p: (p / "adapter_config.json").write_text("[1]"), "not a JSON object", "invalid_adapter"),
    (lambda p: (p / "adapter_config.json").write_text('{"r": 8}'), "without a rank (r) and target_modules",
     "invalid_adapter"),
    (lambda p: (p / "adapter_config.json").write_text('{"peft_type": "IA3", "r": 8, "target_modules": ["k"]}'),
     "is a IA3 adapter", "invalid_adapter"),
    (lambda p: (p / "adapter_model.safetensors").unlink(), "has no weights", "invalid_adapter"),
    (lambda p: (p / "adapter_model.safetensors").write_bytes(b"\xff" * 64), "corrupt weights", "invalid_adapter"),
    (lambda p: (p / "adapter_model.safetensors").write_bytes((p / "adapter_model.safetensors").read_bytes()[:-2]),
     "corrupt weights", "invalid_adapter"),
    (lambda p: (p / "adapter_config.json").write_text('{"r": 64, "target_modules": ["q_proj"]}'),
     "has rank 64, above this model's max_lora_rank 8", "adapter_incompatible"),
])
def test_an_adapter_s_files_are_checked_before_the_engine_is_asked(tmp_path, damage, says, code):
    path = write_adapter(tmp_path / "x")
    inspect(str(path), "x", 8, [str(tmp_path)])
    damage(path)
    with pytest.raises(AdapterRefused) as caught:
        inspect(str(path), "x", 8, [str(tmp_path)])
    assert caught.value.status == 400 and caught.value.code == code and says in caught.value.message


def test_a_registry_archive_unpacked_into_one_folder_is_looked_into(tmp_path):
    write_adapter(tmp_path / "download" / "my-adapter")
    assert adapter_root(str(tmp_path / "download")) == str(tmp_path / "download" / "my-adapter")
    assert adapter_root(str(tmp_path / "download" / "my-adapter")) == str(tmp_path / "download" / "my-adapter")


def test_clearml_adapters_come_through_the_model_registry(tmp_path):
    class Registry:
        def get_local_copy(self, model_id: str) -> str:
            if model_id == "0" * 32:
                return str(write_adapter(tmp_path / "copy"))
            if model_id == "1" * 32:
                raise OSError(28, "No space left on device")
            raise ModelNotFound("the server does not know it")

    fetch = Fetcher(Registry())
    assert fetch(CLEARML, "0" * 32).path == str(tmp_path / "copy")
    with pytest.raises(AdapterRefused) as caught:
        fetch(CLEARML, "2" * 32)
    assert (caught.value.status, caught.value.code) == (404, "adapter_not_found")
    with pytest.raises(AdapterRefused) as caught:
        fetch(CLEARML, "1" * 32)
    assert caught.value.status == 502 and caught.value.code == "adapter_download_failed"


# ----- the policy -----

def entry(name: str, last_used: float, in_use: int = 0, state=AdapterState.LOADED) -> Entry:
    return Entry(name, state, last_used, in_use)


def test_room_unloads_the_least_recently_used_idle_adapters_and_never_a_busy_one():
    a, b, c = entry("a", 1.0), entry("b", 2.0), entry("c", 3.0)
    assert room([a, b, c], cap=4, configured=0) == (0, [])
    assert room([c, a, b], cap=3, configured=0) == (1, [a])
    assert room([a, b, c], cap=3, configured=1) == (2, [a, b])  # configured ones take slots too
    a.in_use = 1
    assert room([a, b, c], cap=3, configured=0) == (1, [b])
    b.in_use = c.in_use = 1
    assert room([a, b, c], cap=3, configured=0) == (1, [])  # nothing may go
    assert room([entry("d", 0.0, state=AdapterState.LOADING)], cap=1, configured=0) == (0, [])  # not loaded yet


# ----- one model's loads -----

class RecordingEngine:
    """An engine's LoRA API that records its calls; a load waits for `gate` and answers `reasons[name]`."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.reasons: dict[str, str] = {}
        self.unreachable = False

    async def load(self, name: str, path: str) -> str | None:
        self.calls.append(("load", name))
        await self.gate.wait()
        if self.unreachable:
            raise AdapterCallError("POST /load_lora_adapter failed: connection refused")
        return self.reasons.get(name)

    async def unload(self, name: str) -> str | None:
        self.calls.append(("unload", name))
        return None


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def model(tmp_path):
    root = tmp_path / "adapters"
    for name in ("a", "b", "c", "d"):
        write_adapter(root / name)
    engine = RecordingEngine()
    config = LoraConfig(enable=True, max_loras=1, max_cpu_loras=2, max_lora_rank=8, on_request=(LOCAL,),
                        on_request_dirs=(str(root),))
    return OnRequestAdapters("m", config, engine=engine, fetch=Fetcher(registry=None), clock=Clock()), engine


def test_ten_requests_arriving_together_share_one_load(model):
    adapters, engine = model

    async def scenario():
        engine.gate.clear()
        waiting = [asyncio.create_task(adapters.acquire("a")) for _ in range(10)]
        while not engine.calls:
            await asyncio.sleep(0)
        assert adapters.cards() == [("a", "loading")]
        engine.gate.set()
        return await asyncio.gather(*waiting)

    leases = asyncio.run(scenario())
    assert engine.calls == [("load", "a")]
    assert len({id(lease) for lease in leases}) == 1 and leases[0].in_use == 10
    assert adapters.cards() == [("a", "loaded")] and adapters.stats.loads["m"] == 1
    assert len(adapters.stats.load_ms) == 1


def test_past_the_cap_the_new_adapter_loads_first_then_the_least_recently_used_idle_one_goes(model):
    adapters, engine = model

    async def scenario():
        a = await adapters.acquire("a")
        b = await adapters.acquire("b")
        b.release(100.0)
        a.release(200.0)  # b is now the least recently used
        await adapters.acquire("c")
        return {name for name, _ in adapters.cards()}

    assert asyncio.run(scenario()) == {"a", "c"}
    assert engine.calls == [("load", "a"), ("load", "b"), ("load", "c"), ("unload", "b")]


def test_an_adapter_with_a_request_in_flight_is_never_unloaded_and_when_all_are_busy_the_answer_is_503(model):
    adapters, engine = model

    async def scenario():
        a = await adapters.acquire("a")
        await adapters.acquire("b")  # held
        a.release(0.5)  # a idle, and older than b
        await adapters.acquire("c")  # a goes
        with pytest.raises(AdapterRefused) as caught:
            await adapters.acquire("d")  # b and c are held
        return caught.value

    refused = asyncio.run(scenario())
    assert (refused.status, refused.code, refused.retry_after_s) == (503, "adapter_slots_busy", 5)
    assert engine.calls == [("load", "a"), ("load", "b"), ("load", "c"), ("unload", "a")]  # d never reached it
    assert {name for name, _ in adapters.cards()} == {"b", "c"}


def test_a_load_the_engine_refuses_costs_no_other_adapter_and_is_tried_again_on_the_next_request(model):
    adapters, engine = model
    engine.reasons["c"] = "LoRA adapter c with rank 8 is incompatible with the current LoRA memory pool\nmore"

    async def scenario():
        for name in ("a", "b"):
            (await adapters.acquire(name)).release(0.0)
        with pytest.raises(AdapterRefused) as caught:
            await adapters.acquire("c")
        del engine.reasons["c"]
        await adapters.acquire("c")
        return caught.value

    refused = asyncio.run(scenario())
    assert (refused.status, refused.code) == (400, "adapter_load_failed")
    assert refused.message == ("The engine could not load the adapter 'c': LoRA adapter c with rank 8 is incompatible "
                               "with the current LoRA memory pool")
    assert engine.calls == [("load", "a"), ("load", "b"), ("load", "c"), ("load", "c"), ("unload", "a")]


def test_an_engine_that_cannot_be_asked_is_503_and_a_restart_forgets_every_adapter_loaded_on_request(model):
    adapters, engine = model

    async def scenario():
        engine.unreachable = True
        with pytest.raises(AdapterRefused) as caught:
            await adapters.acquire("a")
        engine.unreachable = False
        await adapters.acquire("a")
        adapters.forget()
        assert adapters.cards() == []
        await adapters.acquire("a")
        return caught.value

    refused = asyncio.run(scenario())
    assert (refused.status, refused.code) == (503, "engine_unavailable")
    assert engine.calls == [("load", "a")] * 3


def test_a_client_that_leaves_while_its_adapter_loads_holds_it_no_more(model):
    adapters, engine = model

    async def scenario():
        engine.gate.clear()
        leaving = asyncio.create_task(adapters.acquire("a"))
        staying = asyncio.create_task(adapters.acquire("a"))
        while not engine.calls:
            await asyncio.sleep(0)
        leaving.cancel()
        engine.gate.set()
        return await staying

    lease = asyncio.run(scenario())
    assert lease.in_use == 1


def test_the_clearml_source_is_the_real_sdk_s_model_registry(tmp_path):
    """The SDK's Model.get_local_copy takes what the registry passes (archives extracted, errors raised), and in offline
    mode an adapter's Model ID gets a 404 that says why."""
    import inspect as signatures

    from clearml import Model

    parameters = signatures.signature(Model.get_local_copy).parameters
    assert {"extract_archive", "raise_on_error"} <= set(parameters)
    code = (
        "from app.clearml.task import ClearMLModelRegistry\n"
        "from app.gateway.adapters import AdapterRefused\n"
        "from app.serving.adapter_files import Fetcher\n"
        "try:\n"
        "    Fetcher(ClearMLModelRegistry())('clearml', '0123456789abcdef0123456789abcdef')\n"
        "except AdapterRefused as refused:\n"
        "    print(refused.status, refused.code, refused.message)\n"
    )
    env = {**os.environ, "CLEARML_OFFLINE_MODE": "1", "CLEARML_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("404 adapter_not_found ClearML model 0123456789abcdef0123456789abcdef was not found "
                                 "(ClearML runs in offline mode here")


def test_a_registry_download_that_fails_is_a_502_not_a_crash(tmp_path, caplog):
    """The SDK says a download failed with ValueError (`raise_on_error=True`): the registry turns it into OSError,
    which a configured model reports as a problem and an adapter on request as a 502."""
    from app.clearml.task import ClearMLModelRegistry

    class ServerModel:  # what the SDK's Model answers for a known ID whose files cannot be fetched
        name = "sql-adapter"

        def __init__(self, model_id: str):
            self.id = model_id

        def get_local_copy(self, extract_archive=None, raise_on_error=False, force_download=False) -> str:
            assert extract_archive is True and raise_on_error is True
            raise ValueError("Could not retrieve a local copy of model weights s3://bucket/sql.zip")

    fetch = Fetcher(ClearMLModelRegistry(ServerModel, offline=lambda: False))
    with pytest.raises(AdapterRefused) as caught:
        fetch(CLEARML, "0" * 32)
    assert (caught.value.status, caught.value.code) == (502, "adapter_download_failed")
    assert "the download failed: Could not retrieve a local copy of model weights s3://bucket/sql.zip" in caplog.text
    assert "s3://" not in caught.value.message and "the deployment's console says why" in caught.value.message
