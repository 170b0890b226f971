"""What a model needs, from its files' metadata alone (pure): the weights' bytes from the safetensors headers, the KV
cache's bytes per token from `config.json` (`app.sglang.pool`), and whether they fit an engine's share of memory.

Weights: the sum over tensors of elements x the dtype's size, as the headers say (a quantized checkpoint's packed
integers and scales count as stored).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from app.sglang.pool import KvEstimate, context_length, kv_bytes_per_token, text_config

__all__ = ["GIB", "Fit", "KvEstimate", "context_length", "gib", "gpu_share_bytes", "kv_bytes_per_token", "text_config",
           "weights_bytes"]

GIB = 1024**3

# Bytes per element of the safetensors dtypes (https://github.com/huggingface/safetensors, `Dtype`).
DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
               "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I8": 1, "U8": 1, "BOOL": 1, "F4": 0.5, "F6_E2M3": 0.75,
               "F6_E3M2": 0.75}


def weights_bytes(tensors: dict[str, tuple[str, list[int]]]) -> int:
    """The bytes of a checkpoint's tensors: {name: (dtype, shape)} from its safetensors headers."""
    return int(sum(DTYPE_BYTES.get(dtype, 2) * math.prod(shape) for dtype, shape in tensors.values()))


# SGLang's default `mem-fraction-static` leaves this much of a GPU for activations and CUDA graphs
# (`sglang/srt/arg_groups/memory_hook.py`, `handle_gpu_memory_settings`: 512 MiB + 1.5 MiB per token of a prefill
# chunk, 128 MiB per rank, the graphs' buffers; at least 10 GiB on a GPU over 60 GiB); approximated here.
def default_reserve_gib(gpu_memory_gib: float, tp: int) -> float:
    reserve_mib = 512 + 1.5 * 8192 + tp * 128 + 1024
    if gpu_memory_gib > 60:
        reserve_mib = max(reserve_mib, 10 * 1024)
    return min(reserve_mib / 1024, gpu_memory_gib * 0.5)


@dataclass(frozen=True)
class Fit:
    """How a model's weights and KV cache fit one engine's share of memory."""

    share_bytes: int  # weights + KV pool, over every rank
    weights_bytes: int
    kv_bytes_per_token: int | None  # over every rank
    context_tokens: int | None
    max_running: int | None  # the user's max-running-requests, if set

    @property
    def left_bytes(self) -> int:
        return self.share_bytes - self.weights_bytes

    @property
    def contexts(self) -> float | None:
        """Full contexts the KV pool holds (None: not estimated)."""
        if not self.kv_bytes_per_token or not self.context_tokens:
            return None
        return max(0, self.left_bytes) / (self.kv_bytes_per_token * self.context_tokens)

    @property
    def fits(self) -> bool:
        contexts = self.contexts
        return self.left_bytes > 0 and (contexts is None or contexts >= 1)


def gpu_share_bytes(gpu_memory_gib: float, tp: int, mem_fraction: float | None) -> int:
    """Weights + KV pool of an engine on `tp` GPUs of `gpu_memory_gib` each: `mem-fraction-static` of each, or
    what SGLang's default leaves."""
    reserve = gpu_memory_gib * (1 - mem_fraction) if mem_fraction else default_reserve_gib(gpu_memory_gib, tp)
    return int((gpu_memory_gib - reserve) * GIB * tp)


def gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"
