"""CPU-only stand-in for the CUDA-only `sgl_kernel` package (development use; see ../README.md).

Makes the real package's Python submodules importable without running its `__init__` (which loads CUDA
libraries). Any other top-level name is a stub that raises NotImplementedError when called.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
_log = logging.getLogger(__name__)


def _real_dir() -> str | None:
    """The installed sgl_kernel: the first one on sys.path that is not this shim."""
    for entry in sys.path:
        candidate = os.path.join(os.path.abspath(entry or os.curdir), "sgl_kernel")
        if candidate != _HERE and os.path.isfile(os.path.join(candidate, "__init__.py")):
            return candidate
    return None


_REAL = _real_dir()
__path__ = [_HERE] + ([_REAL] if _REAL else [])
__version__ = importlib.import_module(f"{__name__}.version").__version__ if _REAL else "0+cpu-shim"


def _is_python_module(name: str) -> bool:
    path = os.path.join(_REAL or "", name)
    return _REAL is not None and (os.path.isfile(path + ".py") or os.path.isfile(os.path.join(path, "__init__.py")))


def _stub(name: str) -> Callable[..., Any]:
    def stub(*args: Any, **kwargs: Any) -> Any:
        _log.warning("sgl_kernel CPU shim: stub %s called", name)
        raise NotImplementedError(f"sgl_kernel.{name} is not available in the CPU shim")

    stub.__name__ = stub.__qualname__ = name
    return stub


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # A Python submodule of the real package (never its .so extensions), else a stub; cached either way.
    value = importlib.import_module(f"{__name__}.{name}") if _is_python_module(name) else _stub(name)
    globals()[name] = value
    return value
