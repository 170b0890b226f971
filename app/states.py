"""The states things have, one type each; every value is also the plain string users see (JSON, the dashboard).

- `EngineState`: an SGLang server process, written by `app.serving.engine.Engine` (its supervisor asks it to mark a
  restart or a failure). Where models share GPUs the residency mirrors a sleeping or waking model onto its engine
  (`app.serving.residency`); the process is up all the while.
- `ModelState`: a model as requests find it, read by the gateway and `/readyz`: its engine's state, or where models
  share GPUs the residency's (`app.serving.residency`), which adds sleeping and waking.
- `AdapterState`: a LoRA adapter loaded on request, written by `app.serving.adapters.OnRequestAdapters`.
- `Status`: the deployment as the dashboard shows it, written only by the deployment's lifecycle.
"""

from __future__ import annotations

import enum


class _Text(str, enum.Enum):
    """An enum whose members are their values wherever text is made of them."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return self.value.__format__(spec)


class EngineState(_Text):
    LOADING = "loading"
    RESIDENT = "resident"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPED = "stopped"


class ModelState(_Text):
    LOADING = "loading"
    RESIDENT = "resident"
    SLEEPING = "sleeping"
    WAKING = "waking"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPED = "stopped"


class AdapterState(_Text):
    LOADING = "loading"
    LOADED = "loaded"


class Status(_Text):
    LOADING = "loading"
    ACTIVE = "active"
    IDLE = "idle"
    STOPPED = "stopped"
    FAILED = "failed"
