"""The states things have, one type and one writer each; every value is also the plain string users see (JSON, the
dashboard).

- `EngineState`: an SGLang server process, written only by `app.serving.engine.Engine` (its supervisor asks it to
  mark a restart or a failure: `restart_pending`, `give_up`). A model that sleeps keeps its process up, and its
  engine stays resident meanwhile.
- `ModelState`: a model as requests find it, read by the gateway, `/readyz` and the reports. Where models share GPUs
  the residency (`app.serving.residency.Residency`) writes its own for each model: it adds sleeping and waking, says
  loading until a started engine has been measured, and takes on its engine's restarting, failed or stopped as the
  supervisor tells it. `model_state` composes the two: the residency's where it has one for the model, else its
  engine's.
- `AdapterState`: a LoRA adapter loaded on request, written by `app.serving.adapters.OnRequestAdapters`.
- `Status`: the deployment as the dashboard shows it, written only by the deployment's lifecycle.
- `Outcome`: how the ClearML task ends (`app/run.py` judges it from the exit code; `app.clearml.task` sets it).
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


class Outcome(_Text):
    """The task's final status, in ClearML's words."""

    COMPLETED = "completed"
    STOPPED = "stopped"
    FAILED = "failed"


# A model asleep, or waking for a request: its process is up, its memory given back.
ASLEEP = frozenset({ModelState.SLEEPING, ModelState.WAKING})

_MODEL_STATE = {state: ModelState(state.value) for state in EngineState}


def model_state(engine: EngineState, shared: ModelState | None = None) -> ModelState:
    """A model's state as requests find it: `shared`, the residency's state for it where models share GPUs, else its
    engine's (every engine state is a model state of the same name)."""
    return shared if shared is not None else _MODEL_STATE[engine]
