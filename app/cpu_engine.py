"""CPU development mode (DESIGN section 6): what the real SGLang server needs to run without a GPU.

PyPI's `sglang-kernel` is CUDA-only, so `import sgl_kernel` fails without libcuda; SGLang's LoRA code also asks
for pinned memory, which needs a CUDA driver. `app/cpu_shim/` holds a small pure-Python stand-in for the
`sgl_kernel` import and a `sitecustomize` that drops `pin_memory` (reference/sglang.md Part B). It is put first on
the engine's PYTHONPATH only for `general.device: cpu`. It is an unsupported development aid: small dense Llama-type
models, torch-native kernels, no memory saver.
"""

from __future__ import annotations

from pathlib import Path

from app import constants

SHIM_DIR = Path(__file__).resolve().parent / "cpu_shim"


def cpu_engine_env() -> dict[str, str]:
    """Environment additions for an SGLang server running on the CPU."""
    return {
        constants.SGLANG_CPU_ENGINE_ENV: "1",  # SGLang's own switch; `--device cpu` alone is not enough
        "SGLANG_CPU_SHIM_UNPIN": "1",
        "PYTHONPATH": str(SHIM_DIR),
    }
