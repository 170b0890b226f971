"""Keys as tenants, the configuration: `NAME=TOKEN` entries and `auth.limits`, as a user writes them in a file, the
form, a hyperparameter or `--set`, and every problem with them, said at once and without a token's text."""

from __future__ import annotations

import dataclasses
import json

import pytest

from app.clearml.wizard import wizard_entries
from app.config import (
    AuthConfig,
    check_key_names,
    load_config,
    parse_config,
    schema,
    to_hyperparameters,
    to_json,
    to_mapping,
)
from app.errors import ConfigError
from app.keys import NO_LIMITS, KeyLimits
from tests.conftest import run_cli

ALICE = "sk-alice-" + "Qx7" * 8  # shaped like real tokens, distinctive enough that finding one means a leak
BOB = "sk-bob-" + "Wv4" * 8
CAROL = "sk-carol-" + "Zj2" * 8
DAVE = "sk-dave-" + "Hn5" * 8
TOKENS = (ALICE, BOB, CAROL, DAVE)

MODELS = [{"model": "Qwen/Qwen2.5-0.5B-Instruct", "endpoint_name": "qwen"},
          {"model": "meta-llama/Llama-3.2-1B-Instruct", "endpoint_name": "llama",
           "lora": {"enable": True, "modules": ["sql=org/sql-lora"]}}]


def config_with(auth: dict, **sections) -> dict:
    return {"models": MODELS, "auth": auth, **sections}


def problems_of(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    return [str(p) for p in caught.value.problems]


def assert_no_token(*texts: str) -> None:
    for text in texts:
        for token in TOKENS:
            assert token not in text
            assert token[7:20] not in text  # not even a piece of one


# ----- tokens: TOKEN or NAME=TOKEN ---------------------------------------------------------------------------------

def test_named_and_plain_tokens_are_keys_with_names():
    config = parse_config(config_with({"tokens": [f"alice={ALICE}", BOB, f"ci.bot-1={CAROL}"]}))
    assert config.auth.tokens == (f"alice={ALICE}", BOB, f"ci.bot-1={CAROL}")  # as written
    assert config.auth.names == ("alice", "token-2", "ci.bot-1")
    assert set(config.secrets) == {ALICE, BOB, CAROL}  # the tokens, without their names


def test_a_token_ending_in_base64_padding_is_not_a_name():
    padded = "c2stcGFkZGVkLXRva2VuLXh4eA=="
    config = parse_config(config_with({"tokens": [padded]}))
    assert config.auth.names == ("token-1",) and config.secrets == (padded,)


def test_every_token_problem_at_once_naming_the_entry_never_the_token():
    tokens = [f"token-2={ALICE}", BOB, f"default={CAROL}", f"carol={ALICE}", f"a b={DAVE}", "bob=short-one",
              f"{DAVE} x"]
    with pytest.raises(ConfigError) as caught:
        parse_config(config_with({"tokens": tokens}))
    assert [str(p) for p in caught.value.problems] == [
        "auth.tokens[1]: is unnamed, so its key is 'token-2' (its position), already the name of auth.tokens[0]'s "
        "key (give each key its own name (NAME=TOKEN))",
        "auth.tokens[2]: names its key 'default', which auth.limits keeps for every key without limits of its own "
        "(choose another name)",
        "auth.tokens[3]: holds the same token as auth.tokens[0] (remove the repeat)",
        "auth.tokens[4]: has '=' inside, but the text before it is not a key name (write NAME=TOKEN with a name of "
        "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit; a token itself has no '=' but its "
        "base64 padding)",
        "auth.tokens[5]: the token of 'bob' is 9 characters long; a token needs at least 16 (generate one with: "
        "python -c 'import secrets; print(secrets.token_urlsafe(32))')",
        "auth.tokens[6]: contains spaces or characters a header cannot carry (generate one with: python -c 'import "
        "secrets; print(secrets.token_urlsafe(32))')",
    ]
    assert_no_token(str(caught.value), repr(caught.value))


def test_a_name_and_a_bare_token_holding_the_same_token_are_one_token_twice():
    assert problems_of(config_with({"tokens": [f"alice={ALICE}", ALICE]})) == [
        "auth.tokens[1]: holds the same token as auth.tokens[0] (remove the repeat)"]


# ----- limits ------------------------------------------------------------------------------------------------------

def test_limits_by_name_and_default():
    config = parse_config(config_with({
        "tokens": [f"alice={ALICE}", BOB, f"ci={CAROL}"],
        "limits": {"default": {"rpm": 60, "max_tokens": 512},
                   "alice": {"rpm": "600", "tpm": 100_000, "concurrent": 4, "priority": -3,
                             "models": ["qwen", "llama:sql", "qwen"]},
                   "ci": None}}))
    auth = config.auth
    assert [name for name, _ in auth.limits] == ["alice", "ci", "default"]  # sorted
    assert auth.limits_for("alice") == KeyLimits(rpm=600, tpm=100_000, concurrent=4, priority=-3,
                                                 models=("qwen", "llama:sql"))  # a repeat dropped
    assert auth.limits_for("ci") == KeyLimits()  # an entry of its own, empty: nothing of default's
    assert auth.limits_for("token-2") == KeyLimits(rpm=60, max_tokens=512)  # default's
    assert auth.uses_priorities
    assert AuthConfig(limits=(("alice", KeyLimits(rpm=1)),)).limits_for("bob") is NO_LIMITS
    assert not AuthConfig(limits=(("alice", KeyLimits(rpm=1)),)).uses_priorities


def test_limit_bounds_are_the_schemas():
    bounds = {f.key: (f.minimum, f.maximum) for f in schema.LIMIT_FIELDS}
    assert bounds == {"rpm": (1, 10**9), "tpm": (1, 10**9), "concurrent": (1, 10**9), "max_tokens": (1, 10**9),
                      "priority": (-10**9, 10**9), "models": (None, None)}
    # the schema describes exactly what the gateway reads
    assert [f.key for f in schema.LIMIT_FIELDS] == [f.name for f in dataclasses.fields(KeyLimits)]
    edges = {"rpm": 1, "tpm": 10**9, "concurrent": 1, "max_tokens": 10**9, "priority": -10**9}
    config = parse_config(config_with({"limits": {"alice": edges}}))
    assert config.auth.limits_for("alice") == KeyLimits(**edges)


def test_every_limit_problem_at_once_naming_its_field_and_fix():
    limits = {
        "alice": {"rpm": 0, "tpm": "fast", "concurrent": 1.5, "max_tokens": 10**9 + 1, "priority": True,
                  "max_token": 5},
        "bob": {"models": ["qwn", "qwen:", "llama:org/sql", "gpt:x"]},
        "carol": {"models": []},
        "dave": [60],
        "bad name": {"rpm": 1},
    }
    assert problems_of(config_with({"limits": limits})) == [
        "auth.limits.alice.rpm: 0 is out of range (use a value from 1 to 1000000000)",
        "auth.limits.alice.tpm: 'fast' takes a whole number (use a value from 1 to 1000000000)",
        "auth.limits.alice.concurrent: '1.5' takes a whole number (use a value from 1 to 1000000000)",
        "auth.limits.alice.max_tokens: 1000000001 is out of range (use a value from 1 to 1000000000)",
        "auth.limits.alice.priority: 'True' takes a whole number, not true/false (use a value from -1000000000 to "
        "1000000000)",
        "auth.limits.alice.max_token: is not a limit (did you mean max_tokens?)",
        "auth.limits.bob.models[0]: 'qwn' is not an endpoint of this config (did you mean qwen?)",
        "auth.limits.bob.models[1]: 'qwen:' names no adapter (write qwen:<adapter> for one adapter, or qwen for the "
        "model and its adapters)",
        "auth.limits.bob.models[2]: adapter name 'org/sql' is not valid (write llama:<adapter> with letters, digits, "
        "'.', '_' or '-')",
        "auth.limits.bob.models[3]: 'gpt' is not an endpoint of this config (endpoints: qwen, llama)",
        "auth.limits.carol.models: is empty, so the key could use no model (list the endpoints it may use, or leave "
        "models out for every one)",
        "auth.limits.dave: is a list, not a mapping (write its limits as a mapping, e.g. {rpm: 60, models: [qwen]})",
        "auth.limits.bad name: is not a key name (use default, or a key's name: 1-64 letters, digits, '.', '_' or "
        "'-', starting with a letter or digit)",
    ]


def test_limit_problems_come_with_the_rest_of_the_configs():
    raw = config_with({"tokens": ["short"], "limits": {"alice": {"rpm": -1}}}, general={"debug": "maybe"})
    assert [p.split(":")[0] for p in problems_of(raw)] == ["general.debug", "auth.tokens[0]", "auth.limits.alice.rpm"]


def test_adapters_on_request_may_be_named_by_their_reference():
    models = [{"model": "org/base", "endpoint_name": "base", "lora-target-modules": ["all"],
               "lora": {"enable": True, "max_lora_rank": 16, "on_request": ["hf"]}}]
    raw = {"models": models, "auth": {"limits": {"alice": {"models": ["base:org/some-adapter"]}}}}
    assert parse_config(raw).auth.limits_for("alice").models == ("base:org/some-adapter",)
    raw["auth"]["limits"]["alice"]["models"] = ["base:org/has space"]
    assert problems_of(raw) == ["auth.limits.alice.models[0]: adapter 'org/has space' contains spaces (write "
                                "base:<adapter>, its name or reference without spaces)"]


# ----- the same limits from every source --------------------------------------------------------------------------

LIMITS = {"default": {"rpm": 60}, "alice": {"tpm": 100000, "priority": 10, "models": ["qwen", "llama:sql"]}}
YAML_TEXT = "default: {rpm: 60}\nalice:\n  tpm: 100000\n  priority: 10\n  models: [qwen, 'llama:sql']\n"


@pytest.mark.parametrize("text", [YAML_TEXT, json.dumps(LIMITS), json.dumps(LIMITS, indent=2)],
                         ids=["yaml", "json", "json-lines"])
def test_limits_as_text_read_as_the_mapping(text):
    expected = parse_config(config_with({"limits": LIMITS}))
    assert parse_config(config_with({"limits": text})) == expected
    params = {"Models/models": json.dumps(MODELS), "Auth/limits": text}
    assert load_config(hyperparameters=params) == expected


def test_limits_by_set_as_text_or_key_by_key(tmp_path):
    path = tmp_path / "deploy.yaml"
    path.write_text(json.dumps(config_with({"limits": LIMITS})))
    expected = load_config(path)
    models = ["models.0.model=Qwen/Qwen2.5-0.5B-Instruct", "models.0.endpoint_name=qwen",
              "models.1.model=meta-llama/Llama-3.2-1B-Instruct", "models.1.endpoint_name=llama",
              "models.1.lora.enable=true", "models.1.lora.modules=sql=org/sql-lora"]
    assert load_config(overrides=[*models, "auth.limits=" + YAML_TEXT]) == expected
    key_by_key = ["auth.limits.default.rpm=60", "auth.limits.alice.tpm=100000", "auth.limits.alice.priority=10",
                  "auth.limits.alice.models=qwen,llama:sql"]
    assert load_config(overrides=[*models, *key_by_key]) == expected
    assert load_config(path, ["auth.limits.alice.rpm=5"]).auth.limits_for("alice").rpm == 5


@pytest.mark.parametrize(("text", "problem"), [
    ("alice: {rpm: 60", "auth.limits: 'alice: {rpm: 60' is not valid YAML or JSON (expected ',' or '}', but got "
                        "'<stream end>' at line 1, column 16) (write a YAML or JSON mapping, e.g. "
                        "{default: {rpm: 60}})"),
    ("[alice]", "auth.limits: '[alice]' holds a list, not a mapping (write a YAML or JSON mapping, e.g. "
                "{default: {rpm: 60}})"),
])
def test_limits_text_that_is_no_mapping(text, problem):
    assert problems_of(config_with({"limits": text})) == [problem]


def test_empty_limits_text_is_no_limits():
    for text in ("", "  ", "{}", "null"):
        assert parse_config(config_with({"limits": text})).auth.limits == ()


# ----- export, hyperparameters, the form ---------------------------------------------------------------------------

def full_config():
    return parse_config(config_with({"tokens": [f"alice={ALICE}", BOB], "limits": LIMITS}))


def test_export_writes_limits_but_no_token():
    config = full_config()
    exported = to_json(config)
    assert json.loads(exported)["auth"] == {"limits": {"alice": {"tpm": 100000, "priority": 10,
                                                                 "models": ["qwen", "llama:sql"]},
                                                       "default": {"rpm": 60}}}
    assert_no_token(exported)
    assert parse_config(json.loads(exported)) == config.without_secrets()
    assert config.without_secrets().auth.limits == config.auth.limits
    assert to_mapping(config, secrets=True)["auth"]["tokens"] == [f"alice={ALICE}", BOB]


def test_hyperparameters_carry_limits_as_json_text_and_read_back():
    config = full_config()
    params = {h.name: h for h in to_hyperparameters(config)}
    assert json.loads(params["Auth/limits"].value) == json.loads(json.dumps(to_mapping(config)["auth"]["limits"]))
    assert params["Auth/limits"].type == "dict"
    assert load_config(hyperparameters={name: h.value for name, h in params.items()}) == config


def test_the_form_has_limits_as_one_multiline_text_after_the_tokens():
    entries = [e["name"] for e in wizard_entries()]
    assert entries[-2:] == ["tokens", "limits"]
    (limits,) = [e for e in wizard_entries() if e["name"] == "limits"]
    field = {f.key: f for f in schema.AUTH_FIELDS}["limits"]
    assert limits["type"] == "multiline_text"
    assert limits["info"] == field.help and limits["title"] == "Key Limits"
    assert limits["target"] == {"field": "hyperparams", "section": "Auth", "name": "limits"}
    assert parse_config(config_with({"limits": limits["placeholder"]})).auth.limits  # the example is valid


def test_repr_shows_names_and_limits_never_tokens():
    config = full_config()
    assert "alice" in repr(config.auth) and "tpm=100000" in repr(config.auth)
    assert_no_token(repr(config), str(config))


# ----- names only the running app can judge ------------------------------------------------------------------------

def test_limits_for_names_no_key_has_are_listed_at_once():
    def auth(*names: str) -> AuthConfig:
        return parse_config(config_with({"tokens": [f"alice={ALICE}", BOB],
                                         "limits": {name: {} for name in names}})).auth

    check_key_names(auth("alice", "token-2", "default", "ci-bot"), ["ci-bot"])  # the environment's key ci-bot
    check_key_names(auth("alice", "token-2", "default"), [])  # the config's own keys count anyway
    with pytest.raises(ConfigError) as caught:
        check_key_names(auth("alice", "alcie", "ci-bot", "zed", "default"), ["alice", "token-2", "token-3"])
    fix = "name a key NAME=TOKEN in auth.tokens or CLEARML_SGLANG_API_TOKENS, or use default"
    assert [str(p) for p in caught.value.problems] == [
        "auth.limits.alcie: is the name of no key (did you mean alice? Otherwise " + fix + ")",
        "auth.limits.ci-bot: is the name of no key (" + fix + ")",
        "auth.limits.zed: is the name of no key (" + fix + ")",
    ]
    assert_no_token(str(caught.value))


# ----- priorities: SGLang's priority scheduling on every server ---------------------------------------------------

TWO_MODELS = ["--set", "models.0.model=org/a", "--set", "models.0.endpoint_name=a",
              "--set", "models.1.model=org/b", "--set", "models.1.endpoint_name=b"]
PRIORITY = ["--set", "auth.limits={alice: {priority: 10}}"]


def argv_by_endpoint(*args: str) -> dict[str, list[str]]:
    result = run_cli("args", *args)
    assert result.code == 0, result.err
    return {line["endpoint"]: line["argv"] for line in result.lines()}


def flag_values(argv: list[str], flag: str) -> list[list[str]]:
    """Each time `flag` is on the command line, with the values that follow it."""
    found = []
    for i, word in enumerate(argv):
        if word == flag:
            values = []
            for value in argv[i + 1:]:
                if value.startswith("--"):
                    break
                values.append(value)
            found.append(values)
    return found


def test_without_priorities_no_server_schedules_by_priority():
    limited = ["--set", "auth.limits={default: {rpm: 60, models: [a]}}"]
    for argv in argv_by_endpoint(*TWO_MODELS, *limited, "--set", "models.1.cli=--tp-size 2").values():
        assert flag_values(argv, "--enable-priority-scheduling") == []
        assert flag_values(argv, "--default-priority-value") == []


def test_a_users_default_priority_value_is_kept():
    argv = argv_by_endpoint(*TWO_MODELS, *PRIORITY, "--set", "general.default-priority-value=5",
                            "--set", "models.1.cli=--default-priority-value -2 --enable-priority-scheduling")
    assert flag_values(argv["a"], "--default-priority-value") == [["5"]]
    assert flag_values(argv["a"], "--enable-priority-scheduling") == [[]]
    assert flag_values(argv["b"], "--default-priority-value") == [["-2"]]
    assert flag_values(argv["b"], "--enable-priority-scheduling") == [[]]


def test_priorities_take_fcfs_or_lof_where_a_model_would_inherit_another_policy():
    # general's policy reaches no model here: each form model has its own, the raw command line takes none of it
    argv = argv_by_endpoint(*TWO_MODELS, *PRIORITY, "--set", "general.schedule-policy=lpm",
                            "--set", "models.0.schedule-policy=lof", "--set", "models.1.cli=--tp-size 2")
    assert flag_values(argv["a"], "--schedule-policy") == [["lof"]]
    assert flag_values(argv["b"], "--schedule-policy") == []


def test_every_schedule_policy_sglang_refuses_with_priorities_at_once():
    result = run_cli("args", *TWO_MODELS, "--set", "models.2.model=org/c", "--set", "models.2.endpoint_name=c",
                     "--set", "auth.limits={default: {priority: 1}}",
                     "--set", "general.schedule-policy=lpm", "--set", "general.schedule-low-priority-values-first=true",
                     "--set", "models.0.schedule-policy=random",
                     "--set", "models.0.schedule-low-priority-values-first=true",
                     "--set", "models.2.cli=--schedule-policy dfs-weight --schedule-low-priority-values-first")
    assert result.code == 2 and result.out == ""
    why = "auth.limits sets priorities, and SGLang schedules by priority with schedule-policy fcfs or lof only"
    fix = "set schedule-policy to fcfs (SGLang's default) or lof, or take priority out of auth.limits"
    low = ("auth.limits sets priorities, higher first, and this flag would make SGLang run lower values first (remove "
           "it; give the keys to run first the higher priorities instead)")
    assert result.err.splitlines()[1:] == [
        f"  - general.schedule-policy: is 'lpm', but {why} ({fix})",  # models[1] inherits it
        f"  - general.schedule-low-priority-values-first: is set, but {low}",
        f"  - models[0].schedule-policy: is 'random', but {why} ({fix})",
        f"  - models[0].schedule-low-priority-values-first: is set, but {low}",
        f"  - models[2].cli: sets --schedule-policy 'dfs-weight', but {why} ({fix})",
        f"  - models[2].cli: sets --schedule-low-priority-values-first, but {low}",
    ]
    assert result.err.splitlines()[0] == "invalid configuration (6 problems):"
