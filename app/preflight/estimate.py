"""What a model needs, from its files' metadata alone (pure): the weights' bytes from the safetensors headers, the KV
cache's bytes per token from `config.json`, and whether they fit an engine's share of memory.

Weights: the sum over tensors of elements x the dtype's size, as the headers say (a quantized checkpoint's packed
integers and scales count as stored). KV cache per token, as SGLang's pools allocate it
(`sglang/srt/mem_cache/memory_pool.py`): for multi-head and grouped-query attention, layers x KV heads x head
dimension x 2 (K and V) x the KV dtype's size, the KV heads split over the tensor-parallel ranks (each rank holds at
least one); for multi-head latent attention (DeepSeek V2/V3's `kv_lora_rank`) layers x (kv_lora_rank +
qk_rope_head_dim) x the dtype's size on every rank. Models with sliding-window or linear-attention layers keep less,
their own way: "not estimated" for them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

GIB = 1024**3

# Bytes per element of the safetensors dtypes (https://github.com/huggingface/safetensors, `Dtype`).
DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
               "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I8": 1, "U8": 1, "BOOL": 1, "F4": 0.5, "F6_E2M3": 0.75,
               "F6_E3M2": 0.75}
# A `torch_dtype` / `dtype` of config.json, or SGLang's `--kv-cache-dtype`, as bytes per element.
TORCH_DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "fp8_e4m3": 1, "fp8_e5m2": 1,
                     "float8_e4m3fn": 1, "float8_e5m2": 1, "fp4_e2m1": 0.5}


def weights_bytes(tensors: dict[str, tuple[str, list[int]]]) -> int:
    """The bytes of a checkpoint's tensors: {name: (dtype, shape)} from its safetensors headers."""
    return int(sum(DTYPE_BYTES.get(dtype, 2) * math.prod(shape) for dtype, shape in tensors.values()))


@dataclass(frozen=True)
class KvEstimate:
    bytes_per_token: int | None  # on one tensor-parallel rank; None: not estimated
    why_not: str = ""  # when not estimated, in words


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's part of a config (a multimodal model's `text_config`, else the config itself)."""
    inner = config.get("text_config")
    return {**config, **inner} if isinstance(inner, dict) else config


def kv_bytes_per_token(config: dict[str, Any], *, tp: int = 1, kv_cache_dtype: str = "auto") -> KvEstimate:
    """The KV cache one token takes on one of `tp` ranks (`kv_cache_dtype`: SGLang's flag; auto: the model's)."""
    c = text_config(config)
    layers = c.get("num_hidden_layers") or c.get("n_layer") or c.get("num_layers")
    if not isinstance(layers, int) or layers <= 0:
        return KvEstimate(None, "config.json does not say the number of layers (num_hidden_layers)")
    if _windowed(c):
        return KvEstimate(None, "its sliding-window or linear-attention layers keep less than a full KV cache, "
                                "as SGLang sizes them its own way")
    dtype = kv_cache_dtype if kv_cache_dtype not in ("auto", "", None) else str(
        c.get("torch_dtype") or c.get("dtype") or "bfloat16")
    size = TORCH_DTYPE_BYTES.get(dtype.replace("torch.", ""), 2)
    if c.get("kv_lora_rank"):  # multi-head latent attention: one compressed vector per token and layer, every rank
        return KvEstimate(int(layers * (c["kv_lora_rank"] + (c.get("qk_rope_head_dim") or 0)) * size))
    heads = c.get("num_attention_heads") or c.get("n_head")
    kv_heads = c.get("num_key_value_heads") or heads
    head_dim = c.get("head_dim") or (c.get("hidden_size") // heads if heads and c.get("hidden_size") else None)
    if not (isinstance(kv_heads, int) and isinstance(head_dim, int)):
        return KvEstimate(None, "config.json does not say its attention heads (num_attention_heads, hidden_size)")
    per_rank = max(1, kv_heads // max(1, tp))
    return KvEstimate(int(layers * per_rank * head_dim * 2 * size))


def _windowed(c: dict[str, Any]) -> bool:
    layer_types = c.get("layer_types")
    if isinstance(layer_types, list) and any(t != "full_attention" for t in layer_types):
        return True
    if c.get("sliding_window") and c.get("use_sliding_window", True) and c.get("model_type") not in ("mistral",):
        return bool(c.get("sliding_window_pattern") or c.get("model_type", "").startswith(("gemma2", "gemma3")))
    return bool(c.get("mamba_d_state") or c.get("linear_attn_config") or c.get("full_attention_interval"))


def context_length(config: dict[str, Any], flag: int | None) -> int | None:
    """The longest context an engine serves: `--context-length`, else the model's own (`max_position_embeddings`)."""
    if flag:
        return int(flag)
    c = text_config(config)
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        if isinstance(c.get(key), int):
            return int(c[key])
    return None


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
