"""The ClearML adapter: the only module of the app that imports `clearml`.

Nothing here runs at import time; the app's other modules receive these objects as collaborators, and tests hand
them fakes with the same methods instead.
"""

from __future__ import annotations

import logging

from clearml import Model, Task

from app.models import ModelNotFound

logger = logging.getLogger(__name__)


class ClearMLModelRegistry:
    """ClearML Model IDs -> local copies, through the SDK (which logs the download's progress)."""

    def get_local_copy(self, model_id: str) -> str:
        if Task.is_offline():
            raise ModelNotFound("ClearML runs in offline mode here, so a Model ID cannot be looked up")
        model = Model(model_id)
        try:
            name = model.name
        except Exception as exc:  # the SDK raises its own request errors for unknown or unreadable IDs
            raise ModelNotFound(f"the server does not know it: {type(exc).__name__}") from None
        if name is None:
            raise ModelNotFound("the server returned no model")
        logger.info("Downloading ClearML model %s (%s)", model_id, name)
        path = model.get_local_copy(raise_on_error=True)
        if not path:
            raise OSError(f"the SDK returned no local copy of model {model_id}")
        return path
