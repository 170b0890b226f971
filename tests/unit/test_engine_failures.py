"""Why an engine failed, from its last log lines: the message a user gets names the cause and the knob."""

from __future__ import annotations

import pytest

from app.engine import classify_failure


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
