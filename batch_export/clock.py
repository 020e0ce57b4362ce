"""The clock seam: the runner reads time and sleeps only through a :class:`Clock`.

Tests inject a fake clock so that nothing depends on real sleeps.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol

import anyio

__all__ = ["Clock", "SystemClock", "utc_timestamp"]


class Clock(Protocol):
    """Monotonic time in seconds and an awaitable sleep."""

    def monotonic(self) -> float:
        """Return monotonic seconds (only differences are meaningful)."""
        ...

    def wall(self) -> float:
        """Return wall-clock seconds since the epoch."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` (0 or more)."""
        ...


class SystemClock:
    """The real clock: :func:`time.monotonic`, :func:`time.time`, :func:`anyio.sleep`."""

    def monotonic(self) -> float:
        """Return :func:`time.monotonic`."""
        return time.monotonic()

    def wall(self) -> float:
        """Return :func:`time.time`."""
        return time.time()

    async def sleep(self, seconds: float) -> None:
        """Sleep with :func:`anyio.sleep`."""
        await anyio.sleep(max(0.0, seconds))


def utc_timestamp(epoch: float) -> str:
    """Return ``epoch`` seconds as ``2026-11-29T03:00:00Z`` (UTC, whole seconds)."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
