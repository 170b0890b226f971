"""The idle policy: idle time counts from the end of the last response, never while anything is in flight."""

from __future__ import annotations

import pytest

from app.serving.idle import ACTIVE, IDLE, IdleTracker

HOUR = 3600.0


def test_idle_counts_from_readiness_before_any_request():
    tracker = IdleTracker(limit_seconds=HOUR, active_window_seconds=60, now=0)
    tracker.reset(now=100)
    decision = tracker.decide(now=160)
    assert (decision.state, decision.idle_for_s, decision.stop) == (IDLE, 60, False)
    assert tracker.decide(now=100 + HOUR).stop


def test_a_long_stream_in_flight_is_never_idle():
    tracker = IdleTracker(limit_seconds=HOUR, active_window_seconds=60, now=0)
    tracker.request_started(now=10)
    for now in (10 + HOUR, 10 + 5 * HOUR, 10 + 48 * HOUR):
        decision = tracker.decide(now)
        assert (decision.stop, decision.idle_for_s, decision.in_flight, decision.state) == (False, 0.0, 1, ACTIVE)
    tracker.request_finished(now=10 + 48 * HOUR)
    decision = tracker.decide(now=10 + 48 * HOUR + 30)
    assert (decision.stop, decision.idle_for_s, decision.state) == (False, 30, ACTIVE)


def test_idle_counts_from_the_end_of_the_last_response_not_its_start():
    tracker = IdleTracker(limit_seconds=100, active_window_seconds=10, now=0)
    tracker.request_started(now=0)
    tracker.request_started(now=5)
    tracker.request_finished(now=50)   # the first ends; the second is still running
    assert not tracker.decide(now=149).stop
    tracker.request_finished(now=90)
    assert tracker.decide(now=189).idle_for_s == 99
    assert not tracker.decide(now=189).stop
    assert tracker.decide(now=190).stop


def test_active_within_the_window_then_idle():
    tracker = IdleTracker(limit_seconds=None, active_window_seconds=60, now=0)
    tracker.request_started(now=1)
    tracker.request_finished(now=2)
    assert tracker.decide(now=61).state == ACTIVE
    assert tracker.decide(now=62).state == IDLE


def test_no_limit_never_stops():
    tracker = IdleTracker(limit_seconds=None, active_window_seconds=60, now=0)
    assert not tracker.decide(now=10**9).stop


def test_a_late_clock_reading_does_not_move_activity_back():
    tracker = IdleTracker(limit_seconds=100, active_window_seconds=10, now=0)
    tracker.request_started(now=50)
    tracker.request_finished(now=40)  # readings taken on different tasks may arrive out of order
    assert tracker.decide(now=60).idle_for_s == 10


def test_unbalanced_finish_is_a_bug_not_a_negative_count():
    tracker = IdleTracker(limit_seconds=100, active_window_seconds=10, now=0)
    with pytest.raises(RuntimeError):
        tracker.request_finished(now=1)


def test_limit_must_be_positive():
    with pytest.raises(ValueError):
        IdleTracker(limit_seconds=0, active_window_seconds=10, now=0)
