"""One shared API rate limit for every request of a run (first requests and polls alike).

A token bucket with burst 1 (requests spaced ``1/rate`` seconds apart), served first come, first
served, that a 429 pauses for its ``Retry-After`` and slows down: the rate is halved at most once per
pause, never below :data:`MIN_RATE`, then climbs back toward the configured rate while no 429 comes
(additive increase, multiplicative decrease), so a server whose real limit is below the configured
rate is followed instead of hammered (SPEC §4).

The climb remembers the rate that drew the last 429 (the *ceiling*): it returns quickly to just
below it, then probes above it slowly, since the server's limit is most likely right there; only past
the ceiling does it climb at the usual pace again. So a limit below the configured rate is followed
closely, and a single stray 429 (jitter) costs about its pause, not many seconds at half rate.

All time is the injected :class:`~batch_export.clock.Clock`'s: only the caller at the head of the
queue waits (``clock.sleep`` until its slot), so a fake clock drives the limiter entirely. A caller
queued behind it with a deadline is refused as soon as the earliest slot is past that deadline
(the earliest slot never moves earlier), not by a timer of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio

from batch_export.clock import Clock

__all__ = ["MAX_RETRY_AFTER", "MIN_RATE", "LimiterStats", "RateLimiter"]

#: Floor of the adaptive rate, requests/s.
MIN_RATE = 0.05
#: Longest pause a Retry-After can impose, seconds (SPEC §4: clamp to 0–900 s).
MAX_RETRY_AFTER = 900.0
#: Seconds without a 429 before the rate starts climbing back.
_CALM_SECONDS = 2.0
#: Per calm second, the climb adds this fraction of the configured rate (past the ceiling) ...
_CLIMB = 0.05
#: ... or, up to :data:`_NEAR_CEILING` of the ceiling, this fraction of the ceiling ...
_CLIMB_TO_CEILING = 0.5
#: ... or, from there on to the ceiling, this fraction of it (probing).
_PROBE = 0.01
_NEAR_CEILING = 0.9
#: Fraction of an interval a late grant may catch up on (see :meth:`RateLimiter.acquire`).
_CATCH_UP = 0.5


@dataclass(frozen=True, slots=True)
class LimiterStats:
    """A snapshot of the limiter: current rate (requests/s), pause left (seconds), 429s seen."""

    rate: float
    target_rate: float
    paused_for: float
    throttled: int
    granted: int


@dataclass(eq=False, slots=True)
class _Queued:
    """A caller with a deadline (monotonic seconds) waiting for the lock; cancelled when late."""

    deadline: float
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)


class RateLimiter:
    """Shared token bucket (burst 1) with Retry-After pauses and adaptive rate.

    Args:
        rate: target rate in requests/s (> 0).
        clock: time source; all waits go through ``clock.sleep``.
    """

    def __init__(self, rate: float, *, clock: Clock) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0 requests/s")
        self._target = rate
        self._rate = rate
        self._clock = clock
        self._lock = anyio.Lock()  # FIFO: waiters are served in arrival order
        self._next_slot = clock.monotonic()
        self._paused_until = 0.0
        self._halved_this_pause = False
        self._ceiling: float | None = None  # the rate that drew the last 429 (requests/s)
        self._last_429 = -1e18
        self._last_climb = clock.monotonic()
        self._throttled = 0
        self._granted = 0
        self._queued: set[_Queued] = set()  # deadline callers waiting for the lock

    @property
    def stats(self) -> LimiterStats:
        """Current state, for progress displays and metrics."""
        now = self._clock.monotonic()
        return LimiterStats(
            rate=self._rate,
            target_rate=self._target,
            paused_for=max(0.0, self._paused_until - now),
            throttled=self._throttled,
            granted=self._granted,
        )

    async def acquire(self, *, deadline: float | None = None) -> bool:
        """Wait for this caller's turn to send one API request (FIFO).

        Args:
            deadline: monotonic time (seconds) after which the caller no longer wants its turn
                (its ``poll_timeout``); ``None``: wait as long as it takes.

        Returns:
            True when the caller may send now; False (no slot taken) when its turn would come
            after ``deadline``, e.g. behind a long Retry-After pause, or the call comes at or past
            it. Decided on the injected clock only: the caller is refused as soon as that is
            known, never after a real-time timer.
        """
        queued = self._lock.locked()
        if deadline is None:
            await self._lock.acquire()
        elif not await self._lock_by(deadline):
            return False
        try:
            while True:
                now = self._clock.monotonic()
                self._climb(now)
                ready_at = self._ready_at()
                if ready_at <= now:
                    break
                if deadline is not None and ready_at > deadline:
                    return False
                queued = True
                await self._clock.sleep(ready_at - now)
            # A caller that waited for its slot is granted at the slot, not when it woke up: a
            # sleep ends a little late (timer granularity, a busy event loop), and adding that
            # lateness to every interval loses ~5 % of the rate at 50 requests/s. At most half an
            # interval of lateness is absorbed, so two grants are never closer than half an
            # interval. A caller that found the bucket idle starts the schedule afresh (burst 1).
            interval = 1.0 / self._rate
            start = max(ready_at, now - interval * _CATCH_UP) if queued else now
            self._next_slot = start + interval
            self._granted += 1
            self._refuse_late()
            return True
        finally:
            self._lock.release()

    async def _lock_by(self, deadline: float) -> bool:
        """Take the lock, or return False once the earliest slot is past ``deadline``.

        The earliest slot (``max(next slot, pause end)``) only moves later, so a caller whose
        deadline is before it can never be served in time: it is refused at once, on arrival or
        by :meth:`_refuse_late` when a grant or a 429 moves that slot. No timer runs. A caller
        arriving at or past its deadline is refused at once.
        """
        if self._clock.monotonic() >= deadline:
            return False
        if not self._lock.locked():
            await self._lock.acquire()  # the head: its own turn is judged in acquire's loop
            return True
        if self._ready_at() > deadline:
            return False
        waiter = _Queued(deadline)
        self._queued.add(waiter)
        try:
            with waiter.scope:
                await self._lock.acquire()
        finally:
            self._queued.discard(waiter)
        return not waiter.scope.cancelled_caught

    def _ready_at(self) -> float:
        """Monotonic seconds of the earliest slot anyone can be granted."""
        return max(self._next_slot, self._paused_until)

    def _refuse_late(self) -> None:
        """Cancel the lock wait of every queued caller whose deadline is before the earliest slot."""
        ready_at, now = self._ready_at(), self._clock.monotonic()
        for waiter in [w for w in self._queued if w.deadline < ready_at or w.deadline <= now]:
            self._queued.discard(waiter)
            waiter.scope.cancel()

    def throttled(self, retry_after: float | None) -> None:
        """Record a 429: pause everyone for ``retry_after`` seconds (clamped) and slow down.

        ``retry_after`` ``None`` (absent or garbage header) pauses for one slot at the new rate.
        """
        now = self._clock.monotonic()
        self._throttled += 1
        self._last_429 = now
        if now >= self._paused_until:
            self._halved_this_pause = False  # a new pause begins
        if not self._halved_this_pause:
            self._ceiling = self._rate
            self._rate = max(MIN_RATE, self._rate / 2.0)
            self._halved_this_pause = True
        pause = 1.0 / self._rate if retry_after is None else retry_after
        pause = min(MAX_RETRY_AFTER, max(0.0, pause))
        self._paused_until = max(self._paused_until, now + pause)
        self._next_slot = max(self._next_slot, self._paused_until)
        self._refuse_late()

    def _climb(self, now: float) -> None:
        # Additive increase once calm for _CALM_SECONDS: quickly back to just below the ceiling,
        # slowly on to it, then +5 % of the target per calm second.
        if self._rate >= self._target:
            self._last_climb = now
            return
        if now - self._last_429 < _CALM_SECONDS or now < self._paused_until:
            self._last_climb = now
            return
        elapsed = now - max(self._last_climb, self._last_429 + _CALM_SECONDS, self._paused_until)
        self._last_climb = now
        ceiling = self._ceiling
        if ceiling is not None and self._rate < _NEAR_CEILING * ceiling:
            rate = min(_NEAR_CEILING * ceiling, self._rate + _CLIMB_TO_CEILING * ceiling * elapsed)
        elif ceiling is not None and self._rate < ceiling:
            rate = self._rate + _PROBE * ceiling * elapsed
        else:
            rate = self._rate + _CLIMB * self._target * elapsed
        self._rate = min(self._target, rate)
