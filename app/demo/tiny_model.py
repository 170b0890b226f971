"""Make a tiny random Llama model, its tokenizer and two LoRA adapters for CPU tests, offline and deterministically.

    python scripts/make_tiny_model.py OUT_DIR          # or: make_tiny_models(Path(OUT_DIR)) from code

Writes OUT_DIR/tiny-llama (LlamaForCausalLM, bfloat16, safetensors, byte-level BPE tokenizer with a ChatML chat
template) and OUT_DIR/tiny-lora-a, OUT_DIR/tiny-lora-b (PEFT-format LoRA adapters, rank 8, attention projections).
The weights are random: the model produces gibberish, but greedy outputs are reproducible and each adapter changes
them. Does nothing when OUT_DIR already holds a complete set made by the same recipe version.
Needs torch, safetensors, tokenizers and transformers (the `engine` install); no network.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, PreTrainedTokenizerFast

from app.demo import install, made_by

log = logging.getLogger(__name__)

RECIPE_VERSION = 1
MARKER = "tiny-recipe.json"
BASE_DIR, LORA_DIRS = "tiny-llama", {"tiny-lora-a": 1001, "tiny-lora-b": 2002}
MODEL_SEED = 1234

VOCAB_SIZE = 512
HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2
HEAD_DIM = HIDDEN // HEADS
MAX_POSITIONS = 2048
DTYPE = torch.bfloat16  # served as-is by SGLang's dtype "auto" (a float32 config would be cast to float16)

LORA_RANK, LORA_ALPHA = 8, 16
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")

BOS, EOS, PAD, IM_START, IM_END = "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, IM_END]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CORPUS = """\
The quick brown fox jumps over the lazy dog. A model is served behind a gateway that checks every request.
Hello, how are you today? I am fine, thank you. What is the capital of France? The capital of France is Paris.
Large language models predict the next token from the tokens before it. Each token is a piece of a word.
The server reads the request, runs the model on the prompt, and streams the answer back to the client.
A small model is useful for tests: it loads in a second, fits in memory, and gives the same answer every time.
Adapters change a few weights of the model so that one base model can serve many tasks at once.
import os
import sys

def main(argv: list[str]) -> int:
    for index, value in enumerate(argv):
        print(index, value)
    return 0

if __name__ == "__main__":
    sys.exit(main(sys.argv))
{"model": "tiny", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16, "stream": true}
One, two, three, four, five, six, seven, eight, nine, ten. 0 1 2 3 4 5 6 7 8 9 10 100 1000 2048 65536.
The weather is sunny in the morning and rainy in the evening. Please write a short poem about the sea.
user assistant system: You are a helpful assistant. Answer briefly and clearly.
"""


def train_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on CORPUS; it prepends BOS like Llama's."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tokenizer.token_to_id(BOS))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=MAX_POSITIONS
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def model_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    eos_ids = [tokenizer.convert_tokens_to_ids(EOS), tokenizer.convert_tokens_to_ids(IM_END)]
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
        architectures=["LlamaForCausalLM"],
        dtype="bfloat16",
    )


def _normal(gen: torch.Generator, shape: tuple[int, ...], std: float) -> torch.Tensor:
    return torch.randn(shape, generator=gen) * std


def model_weights(vocab: int) -> dict[str, torch.Tensor]:
    """Random weights with HF Llama names, scaled so that logits are well separated.

    The special tokens' lm_head rows are zero, so greedy decoding never picks them and runs to max_tokens.
    """
    gen = torch.Generator().manual_seed(MODEL_SEED)
    proj = HIDDEN**-0.5
    shapes = {
        "self_attn.q_proj": (HEADS * HEAD_DIM, HIDDEN),
        "self_attn.k_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
        "self_attn.v_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
        "self_attn.o_proj": (HIDDEN, HEADS * HEAD_DIM),
        "mlp.gate_proj": (INTERMEDIATE, HIDDEN),
        "mlp.up_proj": (INTERMEDIATE, HIDDEN),
        "mlp.down_proj": (HIDDEN, INTERMEDIATE),
    }
    weights = {"model.embed_tokens.weight": _normal(gen, (vocab, HIDDEN), 1.0)}
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}"
        for name, shape in shapes.items():
            weights[f"{prefix}.{name}.weight"] = _normal(gen, shape, shape[1] ** -0.5)
        weights[f"{prefix}.input_layernorm.weight"] = torch.ones(HIDDEN)
        weights[f"{prefix}.post_attention_layernorm.weight"] = torch.ones(HIDDEN)
    weights["model.norm.weight"] = torch.ones(HIDDEN)
    weights["lm_head.weight"] = _normal(gen, (vocab, HIDDEN), 4 * proj)
    weights["lm_head.weight"][: len(SPECIAL_TOKENS)] = 0.0  # the trainer gives special tokens the first ids
    return {name: tensor.to(DTYPE).contiguous() for name, tensor in weights.items()}


def lora_weights(seed: int, *, layers: int = LAYERS, hidden: int = HIDDEN, heads: int = HEADS,
                 kv_heads: int = KV_HEADS, head_dim: int = HEAD_DIM, b_std: float = 0.2) -> dict[str, torch.Tensor]:
    """PEFT-named LoRA A/B pairs for a Llama of these shapes; B is non-zero (unlike PEFT's init) so the adapter
    changes outputs, by as much as `b_std` says."""
    gen = torch.Generator().manual_seed(seed)
    out_dims = {"q_proj": heads * head_dim, "k_proj": kv_heads * head_dim, "v_proj": kv_heads * head_dim}
    weights: dict[str, torch.Tensor] = {}
    for layer in range(layers):
        for target in LORA_TARGETS:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{target}"
            in_dim = heads * head_dim if target == "o_proj" else hidden
            weights[f"{prefix}.lora_A.weight"] = _normal(gen, (LORA_RANK, in_dim), in_dim**-0.5)
            weights[f"{prefix}.lora_B.weight"] = _normal(gen, (out_dims.get(target, hidden), LORA_RANK), b_std)
    return {name: tensor.contiguous() for name, tensor in weights.items()}


def lora_config(base: str = BASE_DIR) -> dict[str, object]:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": LORA_RANK,
        "lora_alpha": LORA_ALPHA,
        "lora_dropout": 0.0,
        "target_modules": list(LORA_TARGETS),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, path, metadata={"format": "pt"})
    path.chmod(0o644)  # safetensors creates files 0600


def write_base(path: Path) -> None:
    tokenizer = train_tokenizer()
    config = model_config(tokenizer)
    path.mkdir(parents=True)
    tokenizer.save_pretrained(path)
    config.save_pretrained(path)
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    _save(model_weights(config.vocab_size), path / "model.safetensors")


def write_lora(path: Path, seed: int, base: str = BASE_DIR, **shape: Any) -> None:
    """A LoRA adapter for the tiny model, or (`shape`: `lora_weights`' arguments) for another Llama."""
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps(lora_config(base), indent=2) + "\n")
    _save(lora_weights(seed, **shape), path / "adapter_model.safetensors")


def is_complete(out_dir: Path) -> bool:
    needed = [f"{BASE_DIR}/config.json", f"{BASE_DIR}/model.safetensors", f"{BASE_DIR}/tokenizer.json"]
    needed += [f"{d}/{f}" for d in LORA_DIRS for f in ("adapter_config.json", "adapter_model.safetensors")]
    return made_by(out_dir, MARKER, RECIPE_VERSION, needed)


def build(out_dir: Path) -> None:
    """Write everything into a scratch directory beside OUT_DIR, then move it into place."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".build-") as tmp:
        scratch = Path(tmp)
        write_base(scratch / BASE_DIR)
        for name, seed in LORA_DIRS.items():
            write_lora(scratch / name, seed)
        install(scratch, out_dir, [BASE_DIR, *LORA_DIRS], MARKER, {"recipe_version": RECIPE_VERSION})


@dataclass(frozen=True)
class TinyModels:
    base: Path
    adapters: tuple[Path, ...]


def make_tiny_models(out_dir: Path) -> TinyModels:
    """Make (or find, when already made by this recipe) the tiny model and its adapters under `out_dir`."""
    out_dir = out_dir.resolve()
    if is_complete(out_dir):
        log.info("Tiny model up to date (recipe %d): %s", RECIPE_VERSION, out_dir)
    else:
        log.info("Making the tiny model and its LoRA adapters in %s", out_dir)
        torch.manual_seed(MODEL_SEED)
        build(out_dir)
    return TinyModels(out_dir / BASE_DIR, tuple(out_dir / name for name in LORA_DIRS))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="directory to write tiny-llama, tiny-lora-a and tiny-lora-b into")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    made = make_tiny_models(args.out_dir)
    sys.stderr.write(f"{made.base.parent}\n")
    return 0
