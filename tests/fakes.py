"""Test doubles: a fake clock whose sleeps advance virtual time instantly."""

from __future__ import annotations

import anyio


class FakeClock:
    """Virtual time: ``sleep`` advances ``now`` and yields once; nothing really waits."""

    def __init__(self, start: float = 1000.0, wall_offset: float = 1_800_000_000.0) -> None:
        self.now = start
        self.wall_offset = wall_offset
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.now + self.wall_offset

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += max(0.0, seconds)
        await anyio.lowlevel.checkpoint()
