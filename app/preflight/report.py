"""Pre-flight's report in words (`clearml-sglang check`), and the target machine it judges against."""

from __future__ import annotations

from collections.abc import Sequence

from app.config.types import DeploymentConfig
from app.preflight.checks import ModelCheck, Target
from app.preflight.estimate import GIB


def target_of(config: DeploymentConfig, gpu_count: int | None, gpu_memory_gib: float | None) -> Target:
    """The machine to judge against: the one described (`--gpu-count`, `--gpu-memory-gib`), else this one (its GPUs
    through NVML; on the CPU its free memory)."""
    if config.general.device == "cpu":
        import psutil

        return Target("cpu", free_ram_bytes=psutil.virtual_memory().available)
    if gpu_count is None or gpu_memory_gib is None:
        from app.serving.gpus import detect_gpus

        gpus = detect_gpus()
        gpu_count = gpu_count if gpu_count is not None else len(gpus) or None
        gpu_memory_gib = gpu_memory_gib or (min(g.memory_gib for g in gpus) if gpus else None)
    return Target("cuda", gpu_count, gpu_memory_gib)


def render(checks: Sequence[ModelCheck]) -> list[str]:
    """A few lines a model: what was found and estimated, its warnings, and "ok" or how many problems it has (they
    are told once, with every other, as the command's error: `app.preflight.problems_of`)."""
    lines = []
    for check in checks:
        head = f"{check.endpoint} ({check.reference}): {check.found or 'not found'}"
        lines.append(head + (f"; {check.architecture}" if check.architecture else ""))
        sizes = []
        if check.weights_bytes is not None:
            sizes.append(f"weights {check.weights_bytes / GIB:.2f} GiB")
        if check.kv_bytes_per_token is not None:
            sizes.append(f"KV cache {check.kv_bytes_per_token:,} bytes a token")
            if check.context_tokens:
                sizes.append(f"one {check.context_tokens:,}-token context "
                             f"{check.kv_bytes_per_token * check.context_tokens / GIB:.2f} GiB")
        if check.share_bytes is not None:
            sizes.append(f"memory for both {check.share_bytes / GIB:.1f} GiB")
        if sizes:
            lines.append("  " + "; ".join(sizes))
        if check.parsers:
            lines.append(f"  parsers: {check.parsers}")
        lines += [f"  warning: {f}" for f in check.findings if not f.problem]
        problems = sum(f.problem for f in check.findings)
        lines.append(f"  {problems} problem{'s' * (problems != 1)} (below)" if problems else "  ok")
    return lines
