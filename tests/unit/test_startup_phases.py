"""Startup phases read from SGLang's own console lines, the summary at ready, and the console's traffic line."""

from __future__ import annotations

import logging

from app.gateway.messages import Request
from app.gateway.stats import RequestRecord, RequestStats
from app.serving.startup import EnginePhases, Span, StartupTimeline
from app.sglang.logs import MAX_INFO_CHARS, ConsoleLevels, Phase, startup_phase

# Lines as SGLang 0.5.23 printed them on this machine's CPU (the demo's engine), in order, with others between.
SGLANG_STARTUP = [
    "[2026-12-02 15:39:53] server_args={'model_path': '/m', 'tokenizer_path': '/m'}",
    "[2026-12-02 15:40:08] Init parallel begin.",
    "[2026-12-02 15:40:10] Load weight begin. avail mem=19.11 GB",
    "[2026-12-02 15:40:10] Load weight end. elapsed=0.03 s, type=LlamaForCausalLM, avail mem=19.11 GB",
    "[2026-12-02 15:40:11] KV Cache is allocated. dtype: torch.bfloat16, #tokens: 65536",
    "[2026-12-02 15:40:11] INFO:     Uvicorn running on http://127.0.0.1:43327 (Press CTRL+C to quit)",
    '[2026-12-02 15:40:13] INFO:     127.0.0.1:48646 - "POST /generate HTTP/1.1" 200 OK',
    "[2026-12-02 15:40:13] The server is fired up and ready to roll!",
]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_sglang_lines_move_an_engine_through_its_phases_in_order():
    assert [startup_phase(line) for line in SGLANG_STARTUP] == [
        None, None, Phase.LOADING_WEIGHTS, Phase.PREPARING, None, Phase.WARMING_UP, None, Phase.READY]
    assert startup_phase("[2026-12-02 10:00:00 TP0] Capture cuda graph begin. This can take up to several "
                         "minutes. avail mem=70.1 GB") == Phase.CAPTURING_GRAPHS
    assert startup_phase("[2026-12-02 10:00:00] Capture cpu graph bs [1, 2, 4]") == Phase.CAPTURING_GRAPHS
    # uvicorn's own line is gone with --log-level-http warning: the scheduler's timings line says the same
    assert startup_phase("[2026-12-02 15:53:23] Engine startup timings (s): load_weight=0.15, "
                         "kv_cache_allocation=0.71") == Phase.WARMING_UP


def test_the_summary_names_each_phase_and_the_apps_own_time():
    clock, told = Clock(), []
    phases = EnginePhases("m", clock, on_phase=lambda endpoint, phase, left: told.append((endpoint, phase, left)))
    timeline = StartupTimeline(process_started=99.5, app_spans=[Span("fetching the demo model", 30.0)])
    clock.now = 130.0
    timeline.fetched(0.2)
    clock.now = 130.5
    phases.spawned()
    for step, line in zip((9.0, 1.0, 0.5, 2.0, 0.5, 0.5, 0.25), SGLANG_STARTUP[1:], strict=True):
        clock.now += step
        phases.saw(line)
    assert phases.saw(SGLANG_STARTUP[2]) is None  # (another rank's line for an earlier phase: never goes back)

    class Engine:
        def __init__(self) -> None:
            self.phases, self.ready_at = phases, clock.now + 0.1  # the gateway serves it 0.1 s after "ready to roll"

    summary = timeline.all_ready([Engine()], clock.now + 0.15)
    assert [p for _, p, _ in told] == [Phase.STARTING, Phase.LOADING_WEIGHTS, Phase.PREPARING, Phase.WARMING_UP,
                                       Phase.READY]
    assert told[1][2] == Span("starting SGLang", 10.0)
    assert [str(s) for s in summary.engines["m"]] == [
        "starting SGLang 10.0 s", "loading weights 0.5 s", "allocating memory 2.5 s", "warming up 0.8 s"]
    # ours: process start -> spawn (31.0 s) less fetching (30.2 s), plus "ready to roll" -> serving (0.1 s)
    assert round(summary.own_s, 2) == 0.9
    assert round(summary.total_s, 2) == round(clock.now + 0.15 - 99.5, 2)
    assert summary.text().startswith("fetching the demo model 30.0 s; fetching models 0.2 s; m: starting SGLang")
    assert summary.lines()[0].startswith(f"Ready in {summary.total_s:.1f} s, of which the app's own 0.9 s")


# SGLang 0.5.23's output while the demo starts on this CPU (the CI log of 2026-12-06), the server_args line cut short
DEMO_START = """\
/venv/lib/python3.11/site-packages/sglang/launch_server.py:71: UserWarning: 'python -m sglang.launch_server' is still \
supported, but 'sglang serve' is the recommended entrypoint.
  Example: sglang serve --model-path <model> [options]
  warnings.warn(
/venv/lib/python3.11/site-packages/sglang/srt/layers/quantization/awq/awq.py:53: UserWarning: Only CUDA, HIP and XPU \
support AWQ currently.
  warnings.warn(f"Only CUDA, HIP and XPU support AWQ currently.")
[2026-12-06 02:41:56] The current platform does not support Intel AMX, will fallback to torch_native backend.
[2026-12-06 02:41:57] Fail to set RLIMIT_NOFILE: current limit exceeds maximum limit
[2026-12-06 02:41:57] server_args={'model_path': '/root/.cache/clearml-sglang/smollm2/SmolLM2-135M-Instruct', \
'tokenizer_path': '/root/.cache/clearml-sglang/smollm2/SmolLM2-135M-Instruct', 'tokenizer_mode': 'auto'}
[2026-12-06 02:42:01] Using default HuggingFace chat template with detected content format: string
[2026-12-06 02:42:19] Init parallel begin.
[2026-12-06 02:42:22] Ignore import error when loading sglang.srt.models.grok: '_OpNamespace' 'sgl_kernel' object \
has no attribute 'fused_moe_router_cpu'
[2026-12-06 02:42:22] Load weight begin. avail mem=19.82 GB
Multi-thread loading shards:   0% Completed | 0/1 [00:00<?, ?it/s]Multi-thread loading shards: 100% Completed | 1/1
[2026-12-06 02:42:27] KV Cache is allocated. dtype: torch.bfloat16, #tokens: 16384, K size: 0.18 GB, V size: 0.18 GB
[2026-12-06 02:42:27] max_total_num_tokens=16384, chunked_prefill_size=4096, max_prefill_tokens=16384, \
max_running_requests=2048, context_len=8192, available_cpu_mem=19.31 GB
[2026-12-06 02:42:30] The server is fired up and ready to roll!
/venv/lib/python3.11/site-packages/sglang/srt/entrypoints/http_server.py:489: FastAPIDeprecationWarning: \
ORJSONResponse is deprecated
  return await original_handler(ORJSONRequest(request.scope, request.receive))
[2026-12-06 02:42:31] Prefill batch, #new-seq: 1, #new-token: 9, #cached-token: 0
"""


def test_an_engines_start_shows_at_info_level_only_its_problems_and_its_sizing():
    levels = ConsoleLevels()
    shown = [text for level, text in map(levels.classify, DEMO_START.splitlines()) if level == logging.INFO]
    assert shown == [
        "[2026-12-06 02:41:57] Fail to set RLIMIT_NOFILE: current limit exceeds maximum limit",
        "[2026-12-06 02:42:27] KV Cache is allocated. dtype: torch.bfloat16, #tokens: 16384, K size: 0.18 GB, "
        "V size: 0.18 GB",
        "[2026-12-06 02:42:27] max_total_num_tokens=16384, chunked_prefill_size=4096, max_prefill_tokens=16384, "
        "max_running_requests=2048, context_len=8192, available_cpu_mem=19.31 GB"]


def test_a_traceback_is_shown_whole_and_a_long_problem_line_cut_short():
    levels = ConsoleLevels()
    lines = ["[2026-12-06 02:42:22 TP0] Scheduler hit an exception: Traceback (most recent call last):",
             '  File "/venv/lib/python3.11/site-packages/sglang/srt/managers/scheduler.py", line 3100, in run',
             "    self.event_loop()",
             "torch.OutOfMemoryError: " + "x" * 400,
             "  warnings.warn(",  # an indented line after the traceback's end belongs to nothing shown
             "[2026-12-06 02:42:23] Received sigquit from a child process. It usually means the child failed. " * 3]
    classified = [levels.classify(line) for line in lines]
    assert [level for level, _ in classified] == [logging.INFO] * 4 + [logging.DEBUG, logging.INFO]
    assert classified[3][1] == lines[3]  # whole
    assert len(classified[5][1]) == MAX_INFO_CHARS and classified[5][1].endswith("…")


def test_a_window_with_traffic_is_one_console_line():
    stats = RequestStats()
    for status, latency in ((200, 0.1), (200, 0.3), (500, 0.2)):
        stats.record(RequestRecord("m", status, latency))
        stats.count_response(status, Request("POST", "/v1/chat/completions", b"", []))
    stats.count_response(401, Request("POST", "/v1/chat/completions", b"", []))
    stats.count_response(503, Request("GET", "/readyz", b"", []))  # a readiness check: not an error of serving
    line = stats.take_window().console_line(12.34)
    assert line == ("Traffic: 3 request(s) served; errors: 1 × 401, 1 × 500; 12.3 tokens/s generated; "
                    "latency p50 200 ms, p95 300 ms")
    stats.count_response(200, Request("GET", "/healthz", b"", []))
    assert stats.take_window().console_line(0.0) is None  # health checks alone: no line
