"""CPU development mode (docs/sglang.md, "CPU mode"): what the real SGLang server needs to run without a GPU.

PyPI's `sglang-kernel` is CUDA-only, so `import sgl_kernel` fails without libcuda; SGLang's LoRA code also asks
for pinned memory, which needs a CUDA driver. `app/sglang/cpu_shim/` holds a small pure-Python stand-in for the
`sgl_kernel` import and a `sitecustomize` that drops `pin_memory` (docs/sglang.md, "CPU mode"). It is put first on
the engine's PYTHONPATH only for `general.device: cpu`. It is an unsupported development aid: small dense Llama-type
models, torch-native kernels, no memory saver.
"""

from __future__ import annotations

import os
from pathlib import Path

from app import constants

SHIM_DIR = Path(__file__).resolve().parent / "cpu_shim"


# Set so that SGLang cannot load the NCCL of the CUDA build of torch: with it, tensor parallelism on the CPU builds
# an NCCL communicator for a CPU device and fails ("Expected a cuda device, but got: cpu"); without it, SGLang says
# so once and uses gloo. Found by running it (SGLang 0.5.23); not a documented switch.
NO_NCCL = "/nonexistent/libnccl.so.2"


def cpu_engine_env(ranks: int = 1, local_ranks: int = 1, first_rank: int = 0) -> dict[str, str]:
    """Environment additions for an SGLang server running on the CPU. With several ranks (tensor or data
    parallelism, or a model spanning nodes: `ranks` in all, `local_ranks` of them here, from `first_rank`) SGLang
    needs each local rank's cores (`SGLANG_CPU_OMP_THREADS_BIND`, one list per rank, `|`-separated: it refuses to
    start without it when there are more ranks than NUMA nodes), and tensor parallelism over gloo, not NCCL.
    Ranks take cores round robin by their global number, so nodes on one machine (tests) do not share a core."""
    env = {
        constants.SGLANG_CPU_ENGINE_ENV: "1",  # SGLang's own switch; `--device cpu` alone is not enough
        "SGLANG_CPU_SHIM_UNPIN": "1",
        "PYTHONPATH": str(SHIM_DIR),
    }
    if ranks > 1:
        cores = os.cpu_count() or 1
        env["SGLANG_CPU_OMP_THREADS_BIND"] = "|".join(str((first_rank + i) % cores) for i in range(local_ranks))
        env["SGLANG_NCCL_SO_PATH"] = NO_NCCL
    return env
