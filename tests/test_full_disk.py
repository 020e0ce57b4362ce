"""A full output disk (SPEC §9): one clear line per job, no traceback, no stray task exception."""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from batch_export import partfile
from batch_export.runner import Outcome
from batch_export.sandbox import Sandbox, SandboxConfig
from tests.fakes import clean_env, sandbox_thread
from tests.test_breaker_runs import KEY, run, specs


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    # Packages of several pieces, so that writes queue up behind the one that fails.
    async with Sandbox(SandboxConfig(keys=(KEY,), asset_size=8_000_000, rate=None)) as sb:
        yield sb


@pytest.mark.anyio
async def test_a_write_failing_behind_queued_writes_leaves_no_task_unobserved(
    sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = partfile.PartSink.write
    calls = {"n": 0}

    def full_after_one_piece(self: Any, data: bytes) -> None:
        calls["n"] += 1
        time.sleep(0.05)  # a slow disk: the next pieces arrive and queue behind this one
        if calls["n"] >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, data)

    monkeypatch.setattr(partfile.PartSink, "write", full_after_one_piece)
    unobserved: list[str] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: unobserved.append(str(context.get("message"))))
    try:
        result = await run(sandbox.api_url, specs(sandbox, 1), tmp_path, connections=1)
        gc.collect()  # a task whose exception nobody retrieved reports it when collected
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert calls["n"] == 2  # the pieces queued behind the failing write were never written
    (job,) = result.jobs
    assert (job.outcome, job.error_code) == (Outcome.FAILED, "disk_full")
    assert unobserved == []


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (root only); skipped where mounting is not allowed."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("log_format", ["text", "json"])
@pytest.mark.parametrize("quiet", [False, True], ids=["normal", "quiet"])
def test_a_full_disk_prints_no_traceback(
    small_disk: Path, tmp_path: Path, log_format: str, quiet: bool
) -> None:
    with sandbox_thread(SandboxConfig(keys=(KEY,), asset_size=400_000, rate=None)) as sb:
        lines = ["version: 1", "limits: {poll_interval: 0.05s, rate: 50}", "exports:"]
        for aoi in sb.catalog.aois[:2]:
            for ins in aoi.insights[:3]:
                lines.append(
                    f'  - {{aoi_id: "{aoi.id}", insight_id: "{ins.id}", '
                    f"inputs: {list(ins.inputs)!r}, outputs: {list(ins.outputs)!r}}}"
                )
        manifest = tmp_path / "m.yaml"
        manifest.write_text("\n".join(lines) + "\n")
        proc = subprocess.run(
            [
                *(sys.executable, "-m", "batch_export", "run", str(manifest)),
                *("--api-url", sb.api_url, "--out", str(small_disk / "out")),
                *("--state-dir", str(tmp_path / "state"), "--log-format", log_format),
                *(["-q"] if quiet else []),
            ],
            capture_output=True,
            text=True,
            env=clean_env(PIXXEL_API_KEY=KEY),
            timeout=120,
            check=False,
        )
    assert proc.returncode == 1
    assert "disk_full" in proc.stderr
    for needle in ("Traceback", "Task exception", "never retrieved", 'File "'):
        assert needle not in proc.stderr, proc.stderr
