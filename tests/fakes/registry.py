"""A model registry for deployments whose models are HF names or paths: asked for a ClearML ID, it says no."""

from app.serving.models import ModelNotFound


class NoRegistry:
    def get_local_copy(self, model_id: str) -> str:
        raise ModelNotFound("no ClearML registry in this test")
