"""Errors a client can act on, as the OpenAI SDK raises them: our code and a message that says what to change, the
same on `/v1` and on `/<endpoint>/v1`; never SGLang's Python reprs, tracebacks or file paths."""

from __future__ import annotations

import pytest

from tests.harness import AUTH, TOKEN, run_async, running

openai = pytest.importorskip("openai")


def adapters(tmp_path) -> tuple[str, str]:
    (tmp_path / "a").mkdir()
    return "models.0.lora.enable=true", f"models.0.lora.modules=a={tmp_path / 'a'}"


def not_found(model: str) -> dict:
    return {"message": f"The model '{model}' does not exist; available: m, m:a", "type": "invalid_request_error",
            "param": "model", "code": "model_not_found"}


@pytest.mark.parametrize(("base", "model"), [("/m/v1", "gpt-4"), ("/m/v1", "m:nonexistent"),
                                             ("/v1", "m:nonexistent"), ("/v1", "gpt-4")])
def test_a_model_or_adapter_that_is_not_there_is_404_model_not_found(tmp_path, base, model):
    async def scenario():
        async with running(*adapters(tmp_path)) as run:
            client = openai.AsyncOpenAI(base_url=run.url(base), api_key=TOKEN, max_retries=0)
            with pytest.raises(openai.NotFoundError) as raised:
                await client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                                     max_tokens=4)
            assert raised.value.body == not_found(model)
            answer = await client.chat.completions.create(model="m:a", messages=[{"role": "user", "content": "hi"}],
                                                          max_tokens=4)  # (what is there is served)
            assert answer.model == "m:a"
    run_async(scenario())


@pytest.mark.parametrize(("body", "message"), [
    (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}',
     "The request body is not valid JSON: it ends after 61 characters where more is expected (expecting ',' "
     "delimiter); was it cut short?"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": tru}',
     "The request body is not valid JSON: expecting value at character 75"),
    (b'{"model": "m",\n "messages": [{"role": "user", "content": "hi"}],\n "max_tokens": 4,,\n}',
     "The request body is not valid JSON: expecting property name enclosed in double quotes at line 3, column 18"),
    (b"", "The request body must be one JSON object"),
    (b"[1, 2]", "The request body must be one JSON object"),
])
def test_every_body_that_is_not_json_is_400_invalid_json_saying_where(body, message):
    async def scenario():
        async with running() as run:
            for path in ("/v1/chat/completions", "/m/v1/chat/completions"):
                async with run.session.post(run.url(path), data=body,
                                            headers={**AUTH, "Content-Type": "application/json"}) as response:
                    assert response.status == 400
                    assert await response.json() == {"error": {"message": message, "type": "invalid_request_error",
                                                               "param": None, "code": "invalid_json"}}
    run_async(scenario())


def test_an_adapter_named_in_lora_path_that_is_not_there_is_refused_in_words():
    async def scenario():
        async with running() as run:
            client = openai.AsyncOpenAI(base_url=run.url("/v1"), api_key=TOKEN, max_retries=0)
            with pytest.raises(openai.BadRequestError) as raised:
                await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                     max_tokens=4, extra_body={"lora_path": "nonexistent"})
            assert raised.value.body["message"] == ("lora_path names 'nonexistent', which is no adapter of 'm' loaded "
                                                    'now: ask for it as "model": "m:<adapter>"')
    run_async(scenario())
