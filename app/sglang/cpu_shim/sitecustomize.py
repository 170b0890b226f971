"""CPU shim, part 2 (development use; see README.md): with SGLANG_CPU_SHIM_UNPIN=1 and no CUDA, pinned memory is off.

SGLang's LoRA code asks for pinned host memory unconditionally, which needs a CUDA driver. When torch is imported,
its tensor factories are wrapped to drop `pin_memory=True` and `Tensor.pin_memory()` returns the tensor itself.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

_FACTORIES = "arange empty empty_like empty_strided full ones ones_like tensor zeros zeros_like".split()


def _unpinned(factory: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(factory)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return factory(*args, **kwargs)

    return wrapper


def _unpin(torch: ModuleType) -> None:
    if torch.cuda.is_available():
        return
    for name in _FACTORIES:
        setattr(torch, name, _unpinned(getattr(torch, name)))
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self


class _AfterTorchImport(importlib.abc.MetaPathFinder):
    """Finds torch with the other finders, then patches it once its import has run."""

    def find_spec(self, name: str, path: Sequence[str] | None, target: ModuleType | None = None) -> ModuleSpec | None:
        if name != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_and_unpin(module: ModuleType) -> None:
                exec_module(module)
                _unpin(module)

            spec.loader.exec_module = exec_and_unpin  # type: ignore[method-assign]
        return spec


if os.environ.get("SGLANG_CPU_SHIM_UNPIN") == "1":
    if "torch" in sys.modules:
        _unpin(sys.modules["torch"])
    else:
        sys.meta_path.insert(0, _AfterTorchImport())
