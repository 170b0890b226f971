"""The idle policy: when is the deployment active, idle, or due to shut down. Pure: the clock is passed in.

Idle time counts from the end of the last response. A request or stream in flight means "not idle", however long
it runs, so a long generation is never cut by the idle limit (anchors.md pain point 1). Before the first request,
idle time counts from when the deployment became ready.

Example::

    tracker = IdleTracker(limit_seconds=3600, active_window_seconds=60, now=clock())
    tracker.request_started(clock()); ...; tracker.request_finished(clock())
    decision = tracker.decide(clock())        # IdleDecision(stop=False, idle_for_s=..., in_flight=0, ...)
"""

from __future__ import annotations

from dataclasses import dataclass

from app.states import Status

ACTIVE, IDLE = Status.ACTIVE, Status.IDLE


@dataclass(frozen=True)
class IdleDecision:
    stop: bool  # the idle limit is reached: stop accepting, drain, shut down
    idle_for_s: float  # 0 while anything is in flight
    in_flight: int
    state: Status  # ACTIVE (served within the active window, or serving now) or IDLE
    last_activity: float  # the clock's time of the last request start or response end


class IdleTracker:
    """Counts requests in flight and remembers when the last one ended."""

    def __init__(self, limit_seconds: float | None, active_window_seconds: float, now: float):
        if limit_seconds is not None and limit_seconds <= 0:
            raise ValueError("limit_seconds must be positive, or None for never")
        self.limit_seconds = limit_seconds
        self.active_window_seconds = active_window_seconds
        self._in_flight = 0
        self._last_activity = now
        self._served_any = False

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def reset(self, now: float) -> None:
        """Start counting from now (the deployment just became ready)."""
        self._last_activity = now

    def request_started(self, now: float) -> None:
        self._in_flight += 1
        self._last_activity = max(self._last_activity, now)

    def request_finished(self, now: float) -> None:
        if self._in_flight <= 0:
            raise RuntimeError("request_finished without request_started")
        self._in_flight -= 1
        self._served_any = True
        self._last_activity = max(self._last_activity, now)

    def reported(self, started: int, finished: int, now: float) -> None:
        """Requests another process began and ended (a gateway worker's report), the latest of them at `now`."""
        if finished > self._in_flight + started:
            raise RuntimeError("more requests finished than started")
        self._in_flight += started - finished
        self._served_any = self._served_any or bool(finished)
        if started or finished:
            self._last_activity = max(self._last_activity, now)

    def decide(self, now: float) -> IdleDecision:
        if self._in_flight:
            return IdleDecision(False, 0.0, self._in_flight, ACTIVE, self._last_activity)
        idle_for = max(0.0, now - self._last_activity)
        active = self._served_any and idle_for < self.active_window_seconds
        stop = self.limit_seconds is not None and idle_for >= self.limit_seconds
        return IdleDecision(stop, idle_for, 0, ACTIVE if active else IDLE, self._last_activity)
