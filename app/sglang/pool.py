"""How SGLang sizes an engine's KV cache, from the model's `config.json` (pure): the bytes one token takes, the
context an engine serves, and, in the CPU development mode, how many tokens the pool should hold.

KV cache per token, as SGLang's pools allocate it (`sglang/srt/mem_cache/memory_pool.py`): for multi-head and
grouped-query attention, layers x KV heads x head dimension x 2 (K and V) x the KV dtype's size, the KV heads split
over the tensor-parallel ranks (each rank holds at least one); for multi-head latent attention (DeepSeek V2/V3's
`kv_lora_rank`) layers x (kv_lora_rank + qk_rope_head_dim) x the dtype's size on every rank. Models with
sliding-window or linear-attention layers keep less, their own way: "not estimated" for them.

On the CPU, SGLang sizes its pool from the machine's available RAM whatever the model (`mem-fraction-static` of it,
reference/sglang.md Part B): a tiny model got a pool of gigabytes, which its scheduler's resident memory grew into as
its prefix cache filled (20 GB beside another deployment, then the kernel's OOM killer). `cpu_pool` sizes it from the
model instead: `max-running-requests` full contexts (CPU_CONTEXTS where it is not set), at most CPU_RAM_SHARE of the
available RAM shared by the deployment's CPU engines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GIB = 1024**3

# A `torch_dtype` / `dtype` of config.json, or SGLang's `--kv-cache-dtype`, as bytes per element.
TORCH_DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "fp8_e4m3": 1, "fp8_e5m2": 1,
                     "float8_e4m3fn": 1, "float8_e5m2": 1, "fp4_e2m1": 0.5}


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
    layers = count(c, "num_hidden_layers", "n_layer", "num_layers")
    if layers is None:
        return KvEstimate(None, "config.json does not say the number of layers (num_hidden_layers)")
    if _windowed(c):
        return KvEstimate(None, "its sliding-window or linear-attention layers keep less than a full KV cache, "
                                "as SGLang sizes them its own way")
    dtype = kv_cache_dtype if kv_cache_dtype not in ("auto", "", None) else str(
        c.get("torch_dtype") or c.get("dtype") or "bfloat16")
    size = TORCH_DTYPE_BYTES.get(dtype.replace("torch.", ""), 2)
    if c.get("kv_lora_rank"):  # multi-head latent attention: one compressed vector per token and layer, every rank
        rank = count(c, "kv_lora_rank")
        if rank is None:
            return KvEstimate(None, "config.json's kv_lora_rank is not a whole number")
        return KvEstimate(int(layers * (rank + (count(c, "qk_rope_head_dim") or 0)) * size))
    heads = count(c, "num_attention_heads", "n_head")
    kv_heads = count(c, "num_key_value_heads") or heads
    hidden = count(c, "hidden_size")
    head_dim = count(c, "head_dim") or (hidden // heads if heads and hidden else None)
    if not (kv_heads and head_dim):
        return KvEstimate(None, "config.json does not say its attention heads (num_attention_heads, hidden_size)")
    per_rank = max(1, kv_heads // max(1, tp))
    return KvEstimate(int(layers * per_rank * head_dim * 2 * size))


def _windowed(c: dict[str, Any]) -> bool:
    layer_types = c.get("layer_types")
    if isinstance(layer_types, list) and any(t != "full_attention" for t in layer_types):
        return True
    if c.get("sliding_window") and c.get("use_sliding_window", True) and c.get("model_type") not in ("mistral",):
        return bool(c.get("sliding_window_pattern") or str(c.get("model_type") or "").startswith(("gemma2", "gemma3")))
    return bool(c.get("mamba_d_state") or c.get("linear_attn_config") or c.get("full_attention_interval"))


def context_length(config: dict[str, Any], flag: int | None) -> int | None:
    """The longest context an engine serves: `--context-length`, else the model's own (`max_position_embeddings`)."""
    if flag:
        return int(flag)
    return count(text_config(config), "max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


# Larger figures in a config.json are not a model's (a file built to hurt, or broken): "not said".
MAX_COUNT = 2**31 - 1


def count(c: dict[str, Any], *keys: str) -> int | None:
    """The first of `keys` that holds a whole number from 1 to MAX_COUNT (a config.json is read as it comes: a string,
    a float, true, a negative or an absurd number says nothing)."""
    for key in keys:
        value = c.get(key)
        if type(value) is int and 0 < value <= MAX_COUNT:
            return value
    return None


# Full contexts a CPU engine's pool holds where `max-running-requests` is not set (SGLang's own default there, 4096,
# sizes nothing): a CPU decodes a few sequences at a time, and shorter requests share the pool.
CPU_CONTEXTS = 8
# The most of the available RAM the deployment's CPU engines' pools take together.
CPU_RAM_SHARE = 0.25
# SGLang's own resident memory on the CPU besides weights and pool, summed over its processes (tokenizer manager,
# scheduler, detokenizer: each imports torch, and each counts the libraries they share): 3.39 GiB at ready with the
# tiny test model on SGLang 0.5.23, 3.45-3.57 GiB at most under a benchmark at concurrency 8 (bench/cpu_pool.py).
CPU_RUNTIME_BYTES = int(3.5 * GIB)


@dataclass(frozen=True)
class CpuPool:
    """A CPU engine's KV pool, sized from its model, and what the engine is expected to hold resident."""

    tokens: int
    kv_bytes_per_token: int
    context_tokens: int
    wanted_contexts: int
    capped: bool  # the available RAM, not the contexts, set its size
    weights_bytes: int

    @property
    def pool_bytes(self) -> int:
        return self.tokens * self.kv_bytes_per_token

    @property
    def resident_bytes(self) -> int:
        """What the engine's processes are expected to hold: SGLang's runtime, the weights, the whole pool."""
        return CPU_RUNTIME_BYTES + self.weights_bytes + self.pool_bytes

    def note(self) -> str:
        held = f"{self.tokens // self.context_tokens} full contexts" if self.capped else \
            f"{self.wanted_contexts} contexts of {self.context_tokens:,} tokens"
        why = f", capped by {CPU_RAM_SHARE:.0%} of the available RAM" if self.capped else ""
        return (f"KV pool {self.tokens:,} tokens ({held}{why}): {size(self.pool_bytes)}; expected resident "
                f"{size(self.resident_bytes)} (weights {size(self.weights_bytes)}, SGLang's runtime "
                f"~{size(CPU_RUNTIME_BYTES)}); max-total-tokens sets it")


def size(n: int) -> str:
    """Bytes in words: GiB from one, else MiB."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 1024**2:.1f} MiB"


def cpu_pool(config: dict[str, Any], *, weights_bytes: int, available_bytes: int, engines: int = 1,
             running: int | None = None, context_flag: int | None = None,
             kv_cache_dtype: str = "auto") -> CpuPool | None:
    """The pool for a CPU engine of this model (None: its KV cache or context is not known; SGLang sizes it).
    `engines`: the deployment's CPU engines sharing `available_bytes`; `running`: the user's max-running-requests."""
    per_token = kv_bytes_per_token(config, kv_cache_dtype=kv_cache_dtype).bytes_per_token
    context = context_length(config, context_flag)
    if not per_token or not context:
        return None
    wanted = running or CPU_CONTEXTS
    budget = int(available_bytes * CPU_RAM_SHARE / max(1, engines))
    tokens = min(wanted * context, max(context, budget // per_token))
    return CpuPool(tokens, per_token, context, wanted, tokens < wanted * context, weights_bytes)
