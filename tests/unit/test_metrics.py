"""Parsing SGLang's Prometheus text and turning its token counters into tokens per second."""

from __future__ import annotations

from app.sglang.metrics import TokenRate, TokenTotals, parse_prometheus

SAMPLE = """\
# HELP sglang:prompt_tokens_total Number of prefill tokens processed.
# TYPE sglang:prompt_tokens_total counter
sglang:prompt_tokens_total{engine_type="unified",is_streaming="false",model_name="tiny"} 41.0
sglang:prompt_tokens_total{engine_type="unified",is_streaming="true",model_name="tiny"} 9.0
sglang:generation_tokens_total{engine_type="unified",is_streaming="false",model_name="tiny"} 128.0
sglang:time_to_first_token_seconds_bucket{le="+Inf",model_name="tiny"} 3.0
sglang:num_running_reqs{model_name="tiny",tp_rank="0"} 2.0
not a sample line
sglang:cache_hit_rate{model_name="tiny"} NaN
"""


def test_parse_sums_label_sets_and_skips_what_is_not_a_number():
    metrics = parse_prometheus(SAMPLE)
    assert metrics["sglang:prompt_tokens_total"] == 50.0
    assert metrics["sglang:generation_tokens_total"] == 128.0
    assert metrics["sglang:num_running_reqs"] == 2.0
    assert "sglang:cache_hit_rate" not in metrics
    assert TokenTotals.from_metrics(metrics) == TokenTotals(128.0, 50.0)


def test_rate_between_readings_and_after_an_engine_restart():
    rate = TokenRate()
    assert rate.update(0.0, TokenTotals(0, 0)) is None
    assert rate.update(10.0, TokenTotals(500, 100)) == TokenTotals(50.0, 10.0)
    assert rate.update(20.0, TokenTotals(600, 100)) == TokenTotals(10.0, 0.0)
    assert rate.update(30.0, TokenTotals(40, 20)) == TokenTotals(4.0, 2.0)  # counters began again
    assert rate.update(30.0, TokenTotals(50, 20)) is None  # no time has passed
