"""clearml-sglang: deploy LLMs with SGLang behind an authenticated, observable ClearML endpoint."""

__version__ = "0.1.0"
