"""Test doubles and helpers: a fake clock, a sandbox in a thread, a clean environment."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import anyio
from anyio.from_thread import start_blocking_portal

from batch_export.sandbox import Sandbox, SandboxConfig


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


class SandboxClock:
    """The sandbox's wall clock (a callable giving epoch seconds), moved by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@contextmanager
def sandbox_thread(config: SandboxConfig) -> Iterator[Sandbox]:
    """A sandbox on its own event loop in a thread, for tests that run the CLI as a subprocess."""
    with start_blocking_portal(backend="asyncio") as portal:
        sandbox = Sandbox(config)
        portal.call(sandbox.start)
        try:
            yield sandbox
        finally:
            portal.call(sandbox.close)


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any PIXXEL_*/BATCH_EXPORT_* variable, plus ``extra``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PIXXEL_", "BATCH_EXPORT_"))}
    return base | extra
