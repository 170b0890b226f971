"""Why an engine failed, from its last log lines: the message a user gets names the cause and the knob."""

from __future__ import annotations

import pytest

from app.serving.failures import CrashEvidence, RestartPolicy, classify_failure, oom_kill_count


@pytest.mark.parametrize("line, kind", [
    ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", "out_of_memory"),
    ("RuntimeError: Not enough memory. Please try to increase --mem-fraction-static.", "out_of_memory"),
    ("OSError: [Errno 98] Address already in use", "port_in_use"),
    ("huggingface_hub.errors.RepositoryNotFoundError: 404 Client Error. Repository Not Found for url", "missing_model"),
    ("OSError: org/nope is not a local folder and is not a valid model identifier", "missing_model"),
    ("sglang serve: error: argument --tp-size: invalid int value: 'x'", "bad_argument"),
    ("Something else entirely", "other"),
])
def test_classify_failure_from_the_log_tail(line, kind):
    cause = classify_failure(1, ["Loading weights", line, "Exception in thread"])
    assert cause.kind == kind
    assert cause.hint


def test_kv_cache_advice_is_not_the_weights_advice():
    kv = classify_failure(1, ["RuntimeError: Not enough memory. Please try to increase --mem-fraction-static."])
    weights = classify_failure(1, ["torch.OutOfMemoryError: CUDA out of memory."])
    assert "raise mem-fraction-static" in kv.hint
    assert "more GPUs" in weights.hint


def test_exit_codes_without_a_telling_line():
    assert classify_failure(2, ["usage: ..."]).kind == "bad_argument"
    assert "signal 9" in classify_failure(-9, []).hint
    assert classify_failure(1, []).hint == "the engine exited with code 1; see its log lines above"


def test_a_signal_without_evidence_is_unknown_not_a_guess():
    hint = classify_failure(-9, [], CrashEvidence(oom_kills=0)).hint
    assert "signal 9 (SIGKILL)" in hint and "no OOM kill is recorded" in hint and "unknown" in hint
    assert "memory?" not in hint
    unreadable = classify_failure(-9, [], CrashEvidence(oom_kills=None)).hint
    assert "not readable" in unreadable and "unknown" in unreadable


def test_the_kernels_oom_record_names_host_memory():
    cause = classify_failure(-9, ["INFO: some line"], CrashEvidence(oom_kills=1))
    assert cause.kind == "out_of_memory" and "OOM killer" in cause.hint


def test_a_dead_sglang_process_is_named():
    died = "SGLang's sglang::scheduler process (pid 4242)"
    cause = classify_failure(-9, ["Uvicorn running"], CrashEvidence(died=died, oom_kills=0))
    assert died in cause.hint and "unknown" in cause.hint
    # SGLang's own last words win over the evidence around them
    assert classify_failure(-9, ["torch.OutOfMemoryError: CUDA out of memory."],
                            CrashEvidence(died=died, oom_kills=0)).kind == "out_of_memory"


def test_restarts_are_a_rate_not_a_lifetime_count():
    policy = RestartPolicy(budget=3, window_s=100.0, backoff_s=(1.0, 2.0, 4.0))
    crashes: list[float] = []
    delays = []
    for t in (0.0, 10.0, 20.0):
        crashes.append(t)
        delays.append(policy.delay(crashes, t))
    assert delays == [1.0, 2.0, 4.0]
    assert policy.delay([*crashes, 30.0], 30.0) is None  # a fourth within the window: give up
    # the same four crashes spread out: the old ones are forgotten, and the backoff with them
    assert policy.delay([0.0, 150.0, 300.0, 450.0], 450.0) == 1.0
    assert policy.delay([0.0, 150.0, 160.0], 160.0) == 2.0


def test_oom_kill_count_reads_a_kernel_counter():
    count = oom_kill_count()
    assert count is None or count >= 0
