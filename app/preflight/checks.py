"""Pre-flight's judgements, one model at a time (pure, given what was read): it can be found, SGLang runs its
architecture, its weights and one full context fit its engine's share, its adapters fit it. Each finding names the
field and the fix, like a config problem; a problem stops a launch, a warning is told."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from app.preflight.estimate import GIB, Fit, context_length, gib, gpu_share_bytes, kv_bytes_per_token, weights_bytes
from app.preflight.files import FOUND, GATED, NOT_FOUND, UNREACHABLE, Lookup
from app.preflight.settings import EngineSettings

# Tensor-parallel sizes suggested when a model does not fit (the GPUs of one machine).
TP_SIZES = (1, 2, 4, 8)


@dataclass(frozen=True)
class Finding:
    field: str
    message: str
    fix: str = ""
    problem: bool = True  # False: a warning

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" + (f" ({self.fix})" if self.fix else "")


@dataclass(frozen=True)
class Target:
    """The machine the engines will run on: its GPUs (count and memory of each) or, on the CPU, its free RAM."""

    device: str = "cuda"
    gpu_count: int | None = None
    gpu_memory_gib: float | None = None
    free_ram_bytes: int | None = None


@dataclass
class ModelCheck:
    """What pre-flight found of one model."""

    endpoint: str
    reference: str
    found: str = ""
    architecture: str | None = None
    weights_bytes: int | None = None
    kv_bytes_per_token: int | None = None
    share_bytes: int | None = None
    context_tokens: int | None = None
    parsers: str = ""  # the tool-call and reasoning parsers chosen for its family (`app.sglang.parsers`), in words
    findings: list[Finding] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "model": self.reference, "found": self.found,
                "architecture": self.architecture, "weights_gib": _gib(self.weights_bytes),
                "kv_bytes_per_token": self.kv_bytes_per_token, "share_gib": _gib(self.share_bytes),
                "context_tokens": self.context_tokens, "parsers": self.parsers,
                "problems": [str(f) for f in self.findings if f.problem],
                "warnings": [str(f) for f in self.findings if not f.problem]}


def _gib(n: int | None) -> float | None:
    return round(n / GIB, 2) if n is not None else None


def found_findings(where: str, name: str, lookup: Lookup, has_token: bool) -> list[Finding]:
    """Whether the model can be found, in the app's words."""
    field_ = f"{where}.model"
    if lookup.outcome == FOUND:
        return []
    if lookup.outcome == GATED:
        fix = (f"the token in general.hf_token has no access to it: ask on https://huggingface.co/{name}" if has_token
               else f"ask for access on https://huggingface.co/{name}, then put a token that has it in "
                    "general.hf_token")
        return [Finding(field_, f"{name} {lookup.detail}", fix)]
    mean = f"did you mean {lookup.similar!r} (in the local cache)?" if lookup.similar else ""
    if lookup.outcome == NOT_FOUND:
        return [Finding(field_, f"{name}: {lookup.detail}", mean or "check the name on https://huggingface.co")]
    if lookup.outcome == UNREACHABLE:
        return [Finding(field_, f"{name} not verified: {lookup.detail}; the engine will try", mean, problem=False)]
    return [Finding(field_, lookup.detail, "point it at a folder that holds the model's config.json, weights and "
                                           "tokenizer")]


def architecture_findings(where: str, config: dict[str, Any], supported: frozenset[str] | None,
                          transformers_knows: Callable[[str], bool | None]) -> tuple[str | None, list[Finding]]:
    """The architecture SGLang will run, and a finding where it runs none of the model's."""
    archs = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    first = archs[0] if archs else None
    if supported is None:
        return first, [Finding(f"{where}.model", "architecture not verified: SGLang is not installed here",
                               "install the `engine` extra to check it", problem=False)]
    native = [a for a in archs if a in supported]
    if native:
        return native[0], []
    model_type = str(config.get("model_type") or "")
    shown = ", ".join(archs) or "none named in config.json"
    if model_type and transformers_knows(model_type):
        return first, [Finding(f"{where}.model", f"SGLang has no implementation of its architecture ({shown}): it "
                               f"will run it through its Transformers fallback, slower",
                               "choose a model SGLang implements for full speed", problem=False)]
    return first, [Finding(f"{where}.model", f"SGLang cannot run its architecture ({shown}; model_type "
                           f"{model_type or 'unset'}): neither SGLang nor the installed transformers implements it",
                           "choose a model of an architecture SGLang supports (docs/deploying.md, \"Pre-flight\"), or "
                           "a newer SGLang")]


def parallel_findings(where: str, config: dict[str, Any], tp: int) -> list[Finding]:
    """SGLang splits attention heads over the tensor-parallel ranks: they must divide evenly."""
    heads = config.get("num_attention_heads")
    if tp > 1 and isinstance(heads, int) and heads % tp:
        return [Finding(f"{where}.gpus", f"tensor-parallel size {tp} does not divide its {heads} attention heads",
                        "use a tp-size that divides them (gpus)")]
    return []


def fit_findings(where: str, check: ModelCheck, config: dict[str, Any], tensors: dict | None,
                 settings: EngineSettings, target: Target) -> list[Finding]:
    """Whether the weights and one full context fit the engine's share, with the numbers and the fix."""
    if tensors is None:
        return [Finding(f"{where}.model", "memory not estimated: no safetensors headers could be read", "",
                        problem=False)]
    check.weights_bytes = weights_bytes(tensors)
    check.context_tokens = _context(config, settings)
    if target.device == "cpu":
        return _cpu_fit(where, check, config, settings, target)
    if not target.gpu_memory_gib:
        return [Finding(f"{where}.model", "memory not checked: the GPUs' memory is unknown here",
                        "give `check --gpu-memory-gib G` for the target machine", problem=False)]
    fit = _gpu_fit(check, config, settings, target.gpu_memory_gib, settings.tp)
    check.share_bytes, check.kv_bytes_per_token = fit.share_bytes, fit.kv_bytes_per_token
    if fit.fits:
        return _running_warning(where, fit)
    fits_at = next((tp for tp in TP_SIZES if tp > settings.tp and _gpu_fit(
        check, config, settings, target.gpu_memory_gib, tp).fits), None)
    bigger = f"tp-size {fits_at} ({fits_at} GPUs) would fit" if fits_at else "it does not fit 8 such GPUs"
    share = (f"the {gib(fit.share_bytes)} its {settings.tp} GPU(s) of {target.gpu_memory_gib:g} GiB hold for weights "
             f"and KV cache (mem-fraction-static {_fraction(settings, target)})")
    if fit.left_bytes <= 0:
        return [Finding(f"{where}.model", f"its weights alone take {gib(fit.weights_bytes)}, more than {share}",
                        f"{bigger}; or a quantized checkpoint")]
    return [Finding(f"{where}.model", f"after its weights ({gib(fit.weights_bytes)}) {share} leave "
                    f"{gib(fit.left_bytes)} for the KV cache: {_tokens(fit)} tokens at "
                    f"{fit.kv_bytes_per_token:,} bytes a token, less than one full context of "
                    f"{fit.context_tokens:,} tokens", f"{bigger}; or a lower context-length (at most "
                    f"{_tokens(fit)}); or a higher mem-fraction-static")]


def _context(config: dict[str, Any], settings: EngineSettings) -> int | None:
    return context_length(config, settings.context_length)


def _gpu_fit(check: ModelCheck, config: dict[str, Any], settings: EngineSettings, gpu_gib: float, tp: int) -> Fit:
    kv = kv_bytes_per_token(config, tp=tp, kv_cache_dtype=settings.kv_cache_dtype).bytes_per_token
    return Fit(gpu_share_bytes(gpu_gib, tp, settings.mem_fraction), check.weights_bytes or 0,
               kv * tp if kv else None, check.context_tokens, settings.max_running_requests)


def _fraction(settings: EngineSettings, target: Target) -> str:
    if settings.mem_fraction:
        return f"{settings.mem_fraction:g}"
    share = gpu_share_bytes(target.gpu_memory_gib or 0, settings.tp, None) / settings.tp / GIB
    return f"SGLang's default, about {share / (target.gpu_memory_gib or 1):.2f}"


def _tokens(fit: Fit) -> str:
    return f"{max(0, fit.left_bytes) // (fit.kv_bytes_per_token or 1):,}"


def _running_warning(where: str, fit: Fit) -> list[Finding]:
    contexts = fit.contexts
    if contexts is None or fit.max_running is None or contexts >= fit.max_running:
        return []
    return [Finding(f"{where}.max-running-requests", f"its KV cache holds {contexts:.1f} full contexts of "
                    f"{fit.context_tokens:,} tokens, fewer than max-running-requests {fit.max_running}: long "
                    "requests will wait", "a lower context-length, or more GPUs", problem=False)]


def _cpu_fit(where: str, check: ModelCheck, config: dict[str, Any], settings: EngineSettings,
             target: Target) -> list[Finding]:
    kv = kv_bytes_per_token(config, kv_cache_dtype=settings.kv_cache_dtype).bytes_per_token
    check.kv_bytes_per_token = kv
    if target.free_ram_bytes is None:
        return []
    check.share_bytes = target.free_ram_bytes
    fit = Fit(target.free_ram_bytes, check.weights_bytes or 0, kv, check.context_tokens, None)
    if fit.left_bytes <= 0:
        return [Finding(f"{where}.model", f"its weights take {gib(fit.weights_bytes)}, more than the "
                        f"{gib(fit.share_bytes)} of free memory here",
                        "a smaller model, or a machine with more memory")]
    return []


def adapter_findings(where: str, adapters: Iterable[tuple[str, Lookup]], base_tensors: dict | None,
                     max_rank: int | None) -> list[Finding]:
    """Each LoRA adapter's rank within `max_lora_rank`, its target modules in the base model."""
    findings: list[Finding] = []
    modules = {part for name in base_tensors or {} for part in name.split(".")}
    for j, (name, lookup) in enumerate(adapters):
        field_ = f"{where}.lora.modules[{j}]"
        if lookup.outcome != FOUND:
            findings += [Finding(field_, f"adapter {name}: {f.message}", f.fix, f.problem)
                         for f in found_findings(where, name, lookup, False)]
            continue
        rank = lookup.config.get("r")
        if max_rank is not None and isinstance(rank, int) and rank > max_rank:
            findings.append(Finding(field_, f"adapter {name} has rank {rank}, above max_lora_rank {max_rank}",
                                    f"set lora.max_lora_rank to {rank} or more"))
        targets = lookup.config.get("target_modules")
        if isinstance(targets, list) and modules:
            missing = sorted(t for t in targets if isinstance(t, str) and t not in modules)
            if missing:
                findings.append(Finding(field_, f"adapter {name} targets modules its base model does not have: "
                                        f"{', '.join(missing)}", "use an adapter trained for this base model"))
    return findings
