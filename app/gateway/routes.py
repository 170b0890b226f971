"""Which requests the endpoint serves, decided on the request's method and path alone (pure, default deny).

SGLang 0.5.23 registers 90 routes (`app/data/sglang_routes.json`, read from its FastAPI app by
`scripts/dump_sglang_routes.py`). Most are the operator's: memory and weights, LoRA loading, cache flushing,
aborting, profiling, sessions, server information (which holds the engine's key and command line), its own
metrics and API docs, shutdown-like controls. The gateway relays only the *inference* routes below, each for its own
methods, and answers everything else itself: `404` for a path it does not serve, `405` for a served path with
another method. A path is compared as it arrived, byte for byte: an encoded, doubled or dotted spelling of a route
is not that route, and what goes to the engine is the route's own spelling.

Relayed (`/<endpoint>/<route>`; the `/v1/` routes and Ollama's chat and generate also without the prefix, routed by
the body's `model`):

| route (methods) | why a client calls it |
| --- | --- |
| `/v1/chat/completions`, `/v1/completions` (POST) | OpenAI chat and text completions |
| `/v1/embeddings` (POST) | OpenAI embeddings (embedding models) |
| `/v1/responses` (POST), `/v1/responses/{id}` (GET), `.../cancel` (POST) | OpenAI Responses API |
| `/v1/messages`, `/v1/messages/count_tokens` (POST) | Anthropic's Messages API (Claude clients and SDKs) |
| `/v1/tokenize`, `/v1/detokenize` (POST) | token counting for prompts that must fit the context |
| `/v1/score`, `/v1/rerank` (POST, PUT), `/v1/classify`, `/v1/decisions` | reward, reranker, classifier models |
| `/v1/audio/transcriptions` (POST) | Whisper-type models (a multipart body) |
| `/generate`, `/encode`, `/classify` (POST, PUT), `/tokenize`, `/detokenize` | SGLang's native API |
| `/api/chat`, `/api/generate`, `/api/show` (POST), `/api/tags` (GET) | Ollama's API (Ollama clients) |

Not relayed, though they are not the operator's: `/invocations` and `/vertex_generate` (the serving contracts of
SageMaker and Vertex AI, called by those platforms, not by clients), `/v1/systemone` (a vendor-specific decision
API), `/separate_reasoning` and `/parse_function_call` (parsing helpers, not inference), `/v1/loads` (the engine's
load, an operator's view), the health and readiness routes (the gateway's `/healthz` and `/readyz` say more), and
`/model_info` (it names the model's path on the server: the gateway's `/v1/models/{id}` does not).
The gateway's own: `GET /v1/models`, `GET /v1/models/{id}` (also under `/<endpoint>/`), `GET /metrics`,
`GET /ui/api/status` (the page's data), and the open `GET /healthz`, `GET /readyz`, and the page (`GET /`,
`/ui/app.js`, `/ui/app.css`, `/favicon.ico`: static, the same for everyone, no data in them).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

GET, POST, PUT = "GET", "POST", "PUT"

# path -> the methods relayed for it. Every path here is one SGLang 0.5.23 registers with those methods
# (tests/unit/test_routes.py checks it against app/data/sglang_routes.json).
INFERENCE: dict[str, frozenset[str]] = {
    "/v1/chat/completions": frozenset({POST}),
    "/v1/completions": frozenset({POST}),
    "/v1/embeddings": frozenset({POST}),
    "/v1/responses": frozenset({POST}),
    "/v1/responses/{response_id}": frozenset({GET}),
    "/v1/responses/{response_id}/cancel": frozenset({POST}),
    "/v1/messages": frozenset({POST}),
    "/v1/messages/count_tokens": frozenset({POST}),
    "/v1/tokenize": frozenset({POST}),
    "/v1/detokenize": frozenset({POST}),
    "/v1/score": frozenset({POST}),
    "/v1/rerank": frozenset({POST, PUT}),
    "/v1/classify": frozenset({POST}),
    "/v1/decisions": frozenset({POST}),
    "/v1/audio/transcriptions": frozenset({POST}),
    "/generate": frozenset({POST, PUT}),
    "/encode": frozenset({POST, PUT}),
    "/classify": frozenset({POST, PUT}),
    "/tokenize": frozenset({POST}),
    "/detokenize": frozenset({POST}),
    "/api/chat": frozenset({POST}),
    "/api/generate": frozenset({POST}),
    "/api/show": frozenset({POST}),
    "/api/tags": frozenset({GET}),
}
# Relayed without the endpoint prefix too, to the model the JSON body names.
BY_MODEL_FIELD = frozenset(p for p in INFERENCE if p.startswith("/v1/")) | {"/api/chat", "/api/generate",
                                                                            "/api/show"}
# Bodies that are not one JSON object (the gateway checks the others are).
NOT_JSON = frozenset({"/v1/audio/transcriptions"})
# Bodies that hold one prompt (one conversation), every text in them part of it; the others may hold several (a list
# of prompts or inputs), each of which must fit the context on its own.
ONE_PROMPT = frozenset({"/v1/chat/completions", "/v1/messages", "/v1/messages/count_tokens", "/v1/responses",
                        "/api/chat", "/api/generate"})

OPEN = frozenset({"/healthz", "/readyz"})  # answered without a token
# the endpoint's page: without a token too (it holds no data); a browser asks for /favicon.ico on its own
PAGE = frozenset({"/", "/ui/app.js", "/ui/app.css", "/favicon.ico"})
PAGE_STATUS = "/ui/api/status"  # what the page shows: models, states, counters (with a token)
MODELS = "/v1/models"
METRICS = "/metrics"

# A path parameter: SGLang's response ids (`resp_<hex>`), model ids (`endpoint`, `endpoint:adapter`).
_PARAM = re.compile(r"[A-Za-z0-9._:-]{1,256}\Z")


@dataclass(frozen=True)
class Route:
    """What to do with a request, judged on its method and path. `kind`:

    - `open`: `/healthz`, `/readyz`;  `page`: the endpoint's page and its assets (no token either);
      `page_status`: the page's data;  `metrics`;  `models` (`model_id` set for one model);
    - `relay`: to an engine — `endpoint` from the path, or None to route by the body's `model`; `target` the
      route's path as the engine spells it (`path` the allowlist entry);
    - `not_found`, `method_not_allowed` (`allowed`: the methods that are).
    """

    kind: str
    endpoint: str | None = None
    path: str = ""
    target: str = ""
    model_id: str | None = None
    allowed: frozenset[str] = frozenset()

    def takes_json(self, method: str) -> bool:
        """A relayed request whose body must be one JSON object."""
        return self.kind == "relay" and method != GET and self.path not in NOT_JSON

    @property
    def one_prompt(self) -> bool:
        """Every text of its body is one prompt's (not a batch of them)."""
        return self.path in ONE_PROMPT


NOT_FOUND = Route("not_found")


def classify(method: str, path: str, endpoints: frozenset[str]) -> Route:
    """The route of `method path` (the path as it arrived, undecoded) for a gateway serving `endpoints`: a short
    path's remembered (`_judged`: traffic asks a few routes again and again), a long one's judged afresh."""
    if len(path) <= MAX_REMEMBERED_PATH:
        return _judged(method, path, endpoints)
    return _classify(method, path, endpoints)


def _classify(method: str, path: str, endpoints: frozenset[str]) -> Route:
    if path in OPEN:
        return _only(method, Route("open", path=path), frozenset({GET}))
    if path in PAGE:
        return _only(method, Route("page", path=path), frozenset({GET}))
    if path == PAGE_STATUS:
        return _only(method, Route("page_status", path=path), frozenset({GET}))
    if path == METRICS:
        return _only(method, Route("metrics", path=path), frozenset({GET}))
    endpoint = None
    rest = path
    first, sep, tail = path[1:].partition("/")
    if first in endpoints and sep:
        endpoint, rest = first, "/" + tail
    models = _models_route(rest)
    if models is not None:
        return _only(method, models if endpoint is None else Route(
            "models", endpoint=endpoint, path=models.path, model_id=models.model_id), frozenset({GET}))
    matched = _match(rest)
    if matched is None or (endpoint is None and matched[0] not in BY_MODEL_FIELD):
        return NOT_FOUND
    pattern, target = matched
    return _only(method, Route("relay", endpoint=endpoint, path=pattern, target=target), INFERENCE[pattern])


# Routes remembered, by method, path and endpoints (a Route is immutable), and the longest path remembered: anyone
# chooses the path, before any token is checked, so what is remembered is bounded (~1 MiB at most; remembering heads'
# paths whole, up to 32 KiB each, would let a stranger make the gateway hold 4,096 of them: 128 MiB).
MAX_REMEMBERED_ROUTES = 1024
MAX_REMEMBERED_PATH = 256
_judged = functools.lru_cache(maxsize=MAX_REMEMBERED_ROUTES)(_classify)


def _only(method: str, route: Route, methods: frozenset[str]) -> Route:
    """`route` for its methods (and HEAD where GET is: the answer without its body, for the gateway's own)."""
    allowed = methods | ({"HEAD"} if GET in methods and route.kind != "relay" else frozenset())
    if method in allowed:
        return Route(route.kind, route.endpoint, route.path, route.target, route.model_id, methods)
    return Route("method_not_allowed", route.endpoint, route.path, allowed=allowed)


def _models_route(path: str) -> Route | None:
    if path == MODELS:
        return Route("models", path=MODELS)
    if path.startswith(MODELS + "/"):  # (an id no model can have is one that does not exist: 404 model_not_found)
        return Route("models", path=MODELS + "/{model}", model_id=_decode_model_id(path[len(MODELS) + 1:]))
    return None


def _decode_model_id(raw: str) -> str:
    """A model id in the path; clients encode the `:` of `endpoint:adapter` (`%3A`) or not."""
    text = raw.replace("%3A", ":").replace("%3a", ":")
    return text if _PARAM.match(text) else raw[:200]


def _match(path: str) -> tuple[str, str] | None:
    """(allowlist entry, path to send) for a path; None when it is none of them."""
    if path in INFERENCE and "{" not in path:
        return path, path
    if path.startswith("/v1/responses/"):
        response_id, _, cancel = path[len("/v1/responses/"):].partition("/")
        if _PARAM.match(response_id) and ":" not in response_id:
            if not cancel and "/" not in path[len("/v1/responses/"):]:
                return "/v1/responses/{response_id}", path
            if cancel == "cancel":
                return "/v1/responses/{response_id}/cancel", path
    return None
