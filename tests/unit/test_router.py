"""sglang-router in front of replica servers: its command line, reading its per-worker counts, and what the
dashboard gets from them."""

from __future__ import annotations

from app.sglang.router import requests_per_worker, router_command

METRICS = """# TYPE smg_worker_cb_outcomes_total counter
smg_worker_cb_outcomes_total{worker="http://127.0.0.1:5001",outcome="success"} 7
smg_worker_cb_outcomes_total{worker="http://127.0.0.1:5001",outcome="failure"} 2
smg_worker_cb_outcomes_total{worker="http://127.0.0.1:5002",outcome="success"} 5
smg_worker_selection_total{worker_type="regular",connection_mode="http",model="tiny",policy="round_robin"} 14
"""


def test_the_router_listens_on_loopback_with_the_engine_key_and_the_forms_policy():
    command = router_command("tiny", port=31000, metrics_port=31001,
                             worker_urls=["http://127.0.0.1:5001", "http://127.0.0.1:5002"], api_key="k" * 48,
                             load_balance_method="round_robin", python="python")
    assert command.masked_argv() == [
        "python", "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", "31000",
        "--policy", "round_robin", "--prometheus-host", "127.0.0.1", "--prometheus-port", "31001",
        "--worker-urls", "http://127.0.0.1:5001", "http://127.0.0.1:5002"]
    assert command.port == 31000 and command.api_key == "k" * 48
    assert command.secret_args == {"--api-key": "k" * 48}  # launched off the command line (app.sglang.launch)


def test_without_a_load_balance_method_the_router_keeps_its_cache_aware_default():
    argv = router_command("tiny", port=1, metrics_port=2, worker_urls=[], api_key=None, python="python").argv
    assert argv[argv.index("--policy") + 1] == "cache_aware" and "--worker-urls" not in argv


def test_requests_per_worker_counts_the_answers_each_worker_gave():
    assert requests_per_worker(METRICS) == {"http://127.0.0.1:5001": 7.0, "http://127.0.0.1:5002": 5.0}
    assert requests_per_worker("") == {}
