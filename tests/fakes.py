"""Test doubles and helpers: a fake clock, a sandbox in a thread, a clean environment, the CLI."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

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


def cli_process(*args: str, key: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m batch_export ARGS`` in a real process, with only ``key`` as the API key."""
    return subprocess.run(
        [sys.executable, "-m", "batch_export", *args],
        capture_output=True,
        text=True,
        env=clean_env(PIXXEL_API_KEY=key),
        cwd=cwd,
        timeout=300,
    )


@dataclass(frozen=True)
class CliResult:
    """What a CLI run gave: like :class:`subprocess.CompletedProcess` (text streams)."""

    returncode: int
    stdout: str
    stderr: str


def cli_in_process(args: list[str], *, env: dict[str, str], cwd: Path) -> CliResult:
    """``python -m batch_export ARGS`` in this process (click's ``CliRunner``), in ``cwd``.

    The same exit code, stdout and stderr as the subprocess, without its ~0.4 s interpreter start:
    for refusals that end before any run, and reads (``status``, ``discover``). The environment is
    :func:`clean_env` plus ``env``; the signal handlers and the loggers the CLI configures are put
    back afterwards. A test about the process itself (signals, a broken pipe, what reaches a real
    stderr) keeps the subprocess.
    """
    from click.testing import CliRunner

    from batch_export.cli import main

    unset: dict[str, str | None] = {
        k: None for k in os.environ if k.startswith(("PIXXEL_", "BATCH_EXPORT_"))
    }
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    handlers = {s: signal.getsignal(s) for s in signals}
    # The loggers the CLI configures (batch_export/logs.py configure_logging, the sandbox command).
    loggers = [logging.getLogger(n) for n in _CLI_LOGGERS]
    kept = [(lg.level, list(lg.handlers), lg.propagate) for lg in loggers]
    try:
        with contextlib.chdir(cwd):
            result = CliRunner().invoke(main, args, env=unset | env, catch_exceptions=False)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        for logger, (level, old_handlers, propagate) in zip(loggers, kept, strict=True):
            logger.setLevel(level)
            logger.handlers[:] = old_handlers
            logger.propagate = propagate
    return CliResult(result.exit_code, result.stdout, result.stderr)


_CLI_LOGGERS = ("batch_export", "batch_export.sandbox", "aiohttp", "asyncio")
