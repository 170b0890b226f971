"""Which tool-call and reasoning parsers a model gets when the user set neither (pure): a model family's, as SGLang's
documentation names them, where SGLang 0.5.23's own `auto` detection has no rule for it
(`sglang/srt/parser/template_detection.py` has none for Llama 3 or Qwen 2.5: without a parser their tool calls come
back as plain text), and only parsers the pinned SGLang has (`--tool-call-parser`'s and `--reasoning-parser`'s
choices in `app/data/sglang_server_args.json`). The table is in docs/sglang.md, "Parsers".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Parsers:
    tool_call: str | None = None
    reasoning: str | None = None
    family: str = ""  # what it was chosen for, in words

    def __bool__(self) -> bool:
        return bool(self.tool_call or self.reasoning)


NONE = Parsers()

# (family, test on (model_type, chat template, name), tool-call parser, reasoning parser): the first that holds
FAMILIES: tuple[tuple[str, Any, str | None, str | None], ...] = (
    ("gpt-oss", lambda t, tpl, n: t == "gpt_oss", "gpt-oss", "gpt-oss"),
    ("DeepSeek-R1", lambda t, tpl, n: "deepseek-r1" in n and t.startswith("deepseek"), "deepseekv3", "deepseek-r1"),
    ("DeepSeek-V3", lambda t, tpl, n: t == "deepseek_v3", "deepseekv3", None),
    ("a DeepSeek-R1 distillation", lambda t, tpl, n: "deepseek-r1" in n, None, "deepseek-r1"),
    ("Qwen3", lambda t, tpl, n: t in ("qwen3", "qwen3_moe"), "qwen", "qwen3"),
    ("Qwen2.5", lambda t, tpl, n: t == "qwen2" and "<tool_call>" in tpl, "qwen25", None),
    ("Llama 3.1+", lambda t, tpl, n: t == "llama" and "<|start_header_id|>" in tpl and (
        "<|python_tag|>" in tpl or "ipython" in tpl or "tools" in tpl), "llama3", None),
    ("Mistral", lambda t, tpl, n: "[TOOL_CALLS]" in tpl or "[AVAILABLE_TOOLS]" in tpl, "mistral", None),
)


def choose_parsers(config: dict[str, Any], chat_template: str, name: str, *, tool_choices: frozenset[str],
                   reasoning_choices: frozenset[str]) -> Parsers:
    """The parsers for a model from its config.json, its chat template and its name (NONE: no family known)."""
    model_type = str(config.get("model_type") or "").lower()
    for family, holds, tool, reasoning in FAMILIES:
        if holds(model_type, chat_template, name.lower()):
            return Parsers(tool if tool in tool_choices else None,
                           reasoning if reasoning in reasoning_choices else None, family)
    return NONE


def chat_template_of(tokenizer_config: dict[str, Any] | None, template_file: str | None = None) -> str:
    """A model's chat template: `chat_template.jinja` where it has one, else tokenizer_config.json's (a string, or
    named templates: all of them)."""
    if template_file:
        return template_file
    value = (tokenizer_config or {}).get("chat_template")
    if isinstance(value, list):
        return "\n".join(str(t.get("template", "")) for t in value if isinstance(t, dict))
    return value if isinstance(value, str) else ""
