"""One model behind the gateway (`ModelRoute`): its engine (or router), the engine's own key and connections, its
adapters, how requests wait for it, and what it can take; with the gateway's answers about models that need no
engine: a prompt too long for the model's context, a model that cannot answer yet, the model cards."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from app.gateway import routes as paths
from app.gateway.adapters import AdapterLoader
from app.gateway.bodies import json_object, lora_paths, model_field, text_bytes
from app.gateway.errors import Reply, error_reply
from app.gateway.keys import KeyState
from app.gateway.messages import Request
from app.gateway.relay import RETRY_AFTER_SECONDS, failed_before_answering
from app.gateway.upstream import Upstream
from app.states import ASLEEP, AdapterState, EngineState, ModelState, model_state

UPSTREAM_CONNECT_TIMEOUT_SECONDS = 10.0
# How long a request its engine failed before answering waits for the crash to be noticed, and how often it looks.
CRASH_NOTICE_SECONDS = 3.0
CRASH_NOTICE_POLL_SECONDS = 0.05
# How long a request for a restarting model is held before 503 (the deployment's config sets it).
RESTART_HOLD_SECONDS = 120.0
# A prompt's text takes at least one token per this many bytes of its JSON (the densest real text: a long word, a run
# of spaces or dashes, an emoji escaped as two \\u escapes in 12 bytes). A body whose text is longer than its model's
# context at this rate cannot fit, and is refused before the engine tokenizes it: SGLang tokenizes a whole prompt
# before it checks its length, and meanwhile serves nobody (30 MB took it 125 s).
MAX_PROMPT_BYTES_PER_TOKEN = 32
# Most model names a 404 lists.
MAX_NAMES_SHOWN = 20
# A request for a model in these states waits for it to wake.
WAITS_FOR_WAKE = ASLEEP


class EngineHandle(Protocol):
    """What the gateway needs of an engine (`app.serving.engine.Engine` has it; tests pass simple objects)."""

    url: str

    @property
    def state(self) -> EngineState: ...

    async def wait_serving(self, deadline_s: float) -> bool:
        """Until the engine serves again after a crash (True), it failed for good, or the deadline passed."""
        ...


class Residency(Protocol):
    """Models sharing GPUs (`app.serving.residency.Residency`): a request enters a resident model at once, or
    waits while it wakes; the model cannot sleep until every request that entered has left."""

    def enter(self, endpoint: str) -> bool: ...

    async def wait_resident(self, endpoint: str, deadline_s: float) -> bool: ...

    def leave(self, endpoint: str, now: float) -> None: ...

    def describe(self) -> dict[str, dict[str, object]]: ...

    def state(self, endpoint: str) -> ModelState: ...


@dataclass
class ModelRoute:
    """One model behind the gateway: its engine (or router), the engine's own key, its adapters, and how requests
    wait for it. `connect` (when the gateway starts) opens its pool of connections to the engine."""

    endpoint: str
    engine: EngineHandle
    api_key: str | None = None  # the engine's own key, sent upstream instead of the client's token
    adapters: tuple[str, ...] = ()
    adapter_loader: AdapterLoader | None = field(default=None, repr=False)  # with adapters on request
    residency: Residency | None = field(default=None, repr=False)  # when models share GPUs by sleeping
    wake_deadline_s: float = 120.0
    restart_hold_s: float = RESTART_HOLD_SECONDS
    upstream: Upstream | None = field(default=None, repr=False)
    context_tokens: int | None = None  # its context length, once its engine has said (the deployment asks it)
    held: int = 0  # requests waiting for it to wake or come back
    host: bytes = field(default=b"", repr=False)
    authorization: bytes | None = field(default=None, repr=False)
    transparent = False  # (an engine's errors are answered in the one shape: `app.gateway.relay`)

    def connect(self, loop: asyncio.AbstractEventLoop) -> None:
        parts = urlsplit(self.engine.url)
        self.upstream = Upstream(parts.hostname or "127.0.0.1", parts.port or 80,
                                 connect_timeout_s=UPSTREAM_CONNECT_TIMEOUT_SECONDS, loop=loop)
        self.host = parts.netloc.encode()
        self.authorization = f"Bearer {self.api_key}".encode() if self.api_key else None

    @property
    def state(self) -> ModelState:
        """The model's availability, composed (`app.states.model_state`): the residency's where models share GPUs
        (an engine just up is `loading` until it has been measured and can take requests), else its engine's."""
        residency = self.residency
        return model_state(self.engine.state, residency.state(self.endpoint) if residency is not None else None)

    def leave(self, now: float) -> None:
        if self.residency is not None:
            self.residency.leave(self.endpoint, now)

    async def after_failure(self) -> Reply | None:
        """A request its engine failed before answering: held like one that arrived during the restart once the
        crash is noticed (`CRASH_NOTICE_SECONDS` at most: SGLang's processes are watched, its launcher's exit is
        seen at once), then None to send it once more; an engine still serving failed that request alone: 502."""
        end = time.monotonic() + CRASH_NOTICE_SECONDS
        while self.engine.state == EngineState.RESIDENT and time.monotonic() < end:
            await asyncio.sleep(CRASH_NOTICE_POLL_SECONDS)
        if self.state != ModelState.RESTARTING:
            return failed_before_answering(self.endpoint)
        return await self.wait(ModelState.RESTARTING)

    async def wait(self, state: ModelState) -> Reply | None:
        """Hold a request while the model wakes (one wake-up for all) or restarts after a crash (`state`), at most
        its deadline: None once it serves again (the request has entered it), else the 503 to answer."""
        self.held += 1
        try:
            if state == ModelState.RESTARTING:
                deadline = self.restart_hold_s
                ready = await self.engine.wait_serving(deadline)
                if ready and self.residency is not None:
                    ready = self.residency.enter(self.endpoint)
            else:
                assert self.residency is not None
                deadline = self.wake_deadline_s
                ready = await self.residency.wait_resident(self.endpoint, deadline)
        finally:
            self.held -= 1
        if ready:
            return None
        if state != ModelState.RESTARTING:
            return unavailable(self, ModelState.WAKING, waited_s=deadline)
        if self.state == ModelState.RESTARTING:
            return unavailable(self, ModelState.RESTARTING, waited_s=deadline)
        return unavailable(self, self.state)  # it failed for good, or the deployment is stopping


def find_model(routes: dict[str, ModelRoute], route: paths.Route, request: Request) -> ModelRoute | Reply:
    """The model a relayed request goes to: the path's, or the one its JSON body names; a 404 where the body names
    a model or an adapter that is not there (on `/<endpoint>/v1` too: another name is not served by this one)."""
    if route.takes_json(request.method) and not json_object(request.body):
        return error_reply(400, "The request body must be one JSON object", "invalid_json")
    model = model_field(request.body)
    if route.endpoint is not None:
        found = routes[route.endpoint]
    elif model is None:
        if len(routes) == 1:
            return next(iter(routes.values()))
        return error_reply(400, "The request names no model: set \"model\" to one of "
                           + ", ".join(sorted(routes)), "model_required", param="model")
    else:
        found = routes.get(model if model in routes else model.split(":", 1)[0])
    if model is not None and (found is None or not serves(found, model)):
        return no_model(model, routes if route.endpoint is None else {route.endpoint: routes[route.endpoint]})
    assert found is not None
    return found


def serves(route: ModelRoute, model: str) -> bool:
    """Whether `model` names this model or one of its adapters (any, where adapters load on request: the loader
    finds it or says it cannot)."""
    if model == route.endpoint:
        return True
    base, colon, adapter = model.partition(":")
    return bool(colon) and base == route.endpoint and (adapter in route.adapters or route.adapter_loader is not None)


def unavailable(route: ModelRoute, state: ModelState, waited_s: float | None = None) -> Reply:
    message = (f"Model {route.endpoint!r} is still {state} after {waited_s:g} s; retry shortly"
               if waited_s is not None else f"Model {route.endpoint!r} is {state}; retry shortly")
    return error_reply(503, message, str(state), retry_after_s=RETRY_AFTER_SECONDS)


def prompt_too_long(model: ModelRoute, route: paths.Route, request: Request) -> Reply | None:
    """413 for a body whose text cannot fit the model's context (`MAX_PROMPT_BYTES_PER_TOKEN`): all of it where the
    body is one prompt, any one text where it may hold several. Looked at only when the body is long enough."""
    limit = model.context_tokens * MAX_PROMPT_BYTES_PER_TOKEN if model.context_tokens else None
    if limit is None or len(request.body) <= limit or not route.takes_json(request.method):
        return None
    total, longest = text_bytes(request.body)
    size = total if route.one_prompt else longest
    if size <= limit:
        return None
    return error_reply(413, f"The prompt is too long for model {model.endpoint!r}: {size} bytes of text, where its "
                       f"context of {model.context_tokens} tokens holds at most {limit} (at "
                       f"{MAX_PROMPT_BYTES_PER_TOKEN} bytes a token); shorten it", "context_length_exceeded",
                       param="messages" if route.one_prompt else None)


def model_cards(routes: dict[str, ModelRoute], endpoint: str | None = None) -> list[dict[str, Any]]:
    """Model cards: every model and adapter (or one endpoint's), with its state and no file path."""
    created = int(time.time())
    data = []
    for name, route in routes.items():
        if endpoint is not None and name != endpoint:
            continue
        state = route.state
        context = {"max_model_len": route.context_tokens} if route.context_tokens else {}  # (SGLang's name)
        data.append({"id": name, "object": "model", "created": created, "owned_by": "clearml-sglang",
                     "state": state, **context})
        adapters: list[tuple[str, ModelState | AdapterState]] = [(adapter, state) for adapter in route.adapters]
        if route.adapter_loader is not None:
            adapters += route.adapter_loader.cards()
        data += [{"id": f"{name}:{adapter}", "object": "model", "created": created, "owned_by": "clearml-sglang",
                  "parent": name, "state": adapter_state, **context} for adapter, adapter_state in adapters]
    return data


def cards_for(routes: dict[str, ModelRoute], key: KeyState | None, endpoint: str | None = None) -> list[dict[str, Any]]:
    """The model cards a key sees: the models and adapters it may use."""
    cards = model_cards(routes, endpoint)
    if key is None or key.grants is None:
        return cards
    return [c for c in cards if key.may_use(c.get("parent") or c["id"],
                                            [c["id"].split(":", 1)[1]] if "parent" in c else [])]


def no_model(model: str, visible: dict[str, ModelRoute]) -> Reply:
    """The 404 for a model that does not exist for the caller (whether or not it exists for another key), naming
    those that do: the models and their configured adapters (GET /v1/models lists adapters loaded on request)."""
    names = [n for name in sorted(visible) for n in (name, *(f"{name}:{a}" for a in visible[name].adapters))]
    shown = ", ".join(names[:MAX_NAMES_SHOWN]) + (f" and {len(names) - MAX_NAMES_SHOWN} more (GET /v1/models)"
                                                  if len(names) > MAX_NAMES_SHOWN else "")
    return error_reply(404, f"The model {model[:200]!r} does not exist; available: {shown or 'none'}",
                       "model_not_found", param="model")


def named_adapters(body: bytes, endpoint: str) -> list[str]:
    """The adapters of `endpoint` a request names: in its `model` (`endpoint:adapter`) and SGLang's `lora_path`."""
    model = model_field(body)
    named = [model[len(endpoint) + 1:]] if model is not None and model.startswith(endpoint + ":") else []
    try:
        named += lora_paths(body) or []
    except ValueError:
        pass  # (not a list of names: the engine refuses it)
    return named


def models_answer(cards: list[dict[str, Any]], route: paths.Route) -> Reply:
    """`GET /v1/models` (the list), or `/v1/models/{id}` (one card, or 404)."""
    if route.model_id is None:
        return Reply(200, json.dumps({"object": "list", "data": cards}).encode())
    for card in cards:
        if route.model_id == card["id"] or (route.endpoint is not None
                                             and f"{route.endpoint}:{route.model_id}" == card["id"]):
            return Reply(200, json.dumps(card).encode())
    return error_reply(404, f"The model {route.model_id!r} does not exist", "model_not_found", param="model")
