"""A full output disk (SPEC §9): one clear line per job, no traceback, no stray task exception."""

from __future__ import annotations

import asyncio
import errno
import gc
import json
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


def _tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` at ``mount`` for the test (root only; skipped elsewhere)."""
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (root only); skipped where mounting is not allowed."""
    yield from _tmpfs(tmp_path / "small", "1m")


def _manifest(sb: Any, folder: Path, limits: str, *, per_aoi: int) -> Path:
    """A manifest of ``per_aoi`` insights of each of the sandbox's first two AOIs."""
    lines = ["version: 1", f"limits: {{{limits}}}", "exports:"]
    for aoi in sb.catalog.aois[:2]:
        for ins in aoi.insights[:per_aoi]:
            lines.append(
                f'  - {{aoi_id: "{aoi.id}", insight_id: "{ins.id}", '
                f"inputs: {list(ins.inputs)!r}, outputs: {list(ins.outputs)!r}}}"
            )
    manifest = folder / "m.yaml"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


@pytest.mark.parametrize("log_format", ["text", "json"])
@pytest.mark.parametrize("quiet", [False, True], ids=["normal", "quiet"])
def test_a_full_disk_prints_no_traceback(
    small_disk: Path, tmp_path: Path, log_format: str, quiet: bool
) -> None:
    with sandbox_thread(SandboxConfig(keys=(KEY,), asset_size=400_000, rate=None)) as sb:
        manifest = _manifest(sb, tmp_path, "poll_interval: 0.05s, rate: 50", per_aoi=3)
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


# ------------------------------------------------------------------- the headroom left free


class _Stats:
    """An ``os.statvfs_result`` stand-in: a 1 GiB file system with ``free`` bytes available."""

    def __init__(self, free: int) -> None:
        self.f_frsize = 4096
        self.f_blocks = (1 << 30) // 4096
        self.f_bavail = free // 4096


def test_a_stream_stops_with_enospc_at_the_headroom(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = partfile.PartSink(tmp_path / "p.part", 0, md5=False, root=tmp_path)
    free = {"bytes": 100 * 1024 * 1024}
    monkeypatch.setattr(partfile.os, "fstatvfs", lambda fd: _Stats(free["bytes"]))
    sink.write(b"x" * 1024)  # 100 MiB free: above the headroom (min(64 MiB, 5 % of 1 GiB))
    free["bytes"] = int(51.3 * 1024 * 1024)  # the piece would leave less than 51.2 MiB
    with pytest.raises(OSError) as raised:
        sink.write(b"y" * 200 * 1024)
    sink.close()
    assert raised.value.errno == errno.ENOSPC
    assert (tmp_path / "p.part").read_bytes() == b"x" * 1024  # nothing of the refused piece


def test_a_segmented_part_that_would_leave_less_than_the_headroom_is_given_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batch_export.segments import SegmentState

    if partfile._FALLOCATE is None:
        pytest.skip("no fallocate here: nothing is reserved")
    monkeypatch.setattr(partfile.os, "fstatvfs", lambda fd: _Stats(10 * 1024 * 1024))
    part = tmp_path / "r.part"
    with pytest.raises(OSError) as raised:
        partfile.RangeSink(part, tmp_path, SegmentState(8 * 1024 * 1024), md5=False)
    assert raised.value.errno == errno.ENOSPC
    assert part.stat().st_size == 0  # the reservation was given back


@pytest.fixture
def shared_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs for the output and the state dir both (root only)."""
    yield from _tmpfs(tmp_path / "shared", "8m")


@pytest.mark.parametrize("connections", [1, 8])
def test_a_disk_shared_with_the_state_store_fills_into_disk_full_not_a_dead_store(
    shared_disk: Path, tmp_path: Path, connections: int
) -> None:
    # 8 packages of ~4.8 MB onto an 8 MiB disk that also holds the state store: some fit, the
    # rest fail as disk_full while the store can still record it (before, the store ran out of
    # space first and the run died with state_store, no job failed), and a re-run still opens
    # the store and records the same.
    with sandbox_thread(SandboxConfig(keys=(KEY,), asset_size=800_000, rate=None)) as sb:
        # One download at a time: on a disk this small, 5 % (410 KiB) is less than two
        # streams' pieces written between two checks (on a real disk the 64 MiB is more than
        # downloads x connections pieces).
        limits = (
            "poll_interval: 0.05s, rate: 50, downloads: 1, "
            f"connections: {connections}, segment_min: 1MiB"
        )
        manifest = _manifest(sb, tmp_path, limits, per_aoi=4)
        argv = [
            *(sys.executable, "-m", "batch_export", "run", str(manifest)),
            *("--api-url", sb.api_url, "--out", str(shared_disk / "out")),
            *("--report", str(tmp_path / "report.json")),
        ]
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            env=clean_env(PIXXEL_API_KEY=KEY),
            timeout=120,
            check=False,
        )
        again = subprocess.run(
            [*argv[:-2], "--report", str(tmp_path / "again.json")],
            capture_output=True,
            text=True,
            env=clean_env(PIXXEL_API_KEY=KEY),
            timeout=120,
            check=False,
        )
    assert proc.returncode == 1, proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    codes = sorted({job["error"]["code"] for job in report["jobs"] if job.get("error")})
    assert codes == ["disk_full"], proc.stderr
    outcomes = [job["outcome"] for job in report["jobs"]]
    assert "downloaded" in outcomes and outcomes.count("failed") >= 1
    assert "state_store" not in proc.stderr
    assert again.returncode == 1, again.stderr  # the store still opens and records
    assert "state_store" not in again.stderr
