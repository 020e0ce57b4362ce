"""One writer per ``.part`` (SPEC §9): a ``.part`` another process holds is left alone, its job pending."""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from batch_export.partfile import part_path
from batch_export.partlock import PartBusy, lock_part
from batch_export.runner import Outcome
from batch_export.sandbox import Sandbox, SandboxConfig
from tests.test_breaker_runs import KEY, run, specs


@contextmanager
def held(path: Path) -> Iterator[None]:
    """Hold ``path``'s lock as another batch-export process would (an open file description)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)


def test_lock_part_refuses_a_held_part_and_takes_a_free_one(tmp_path: Path) -> None:
    part = tmp_path / "x.zip.part"
    with held(part):
        fd = os.open(part, os.O_RDWR)
        try:
            with pytest.raises(PartBusy) as caught:
                lock_part(fd, part)
        finally:
            os.close(fd)
    assert caught.value.code == "part_busy"
    assert str(part) in caught.value.message
    fd = os.open(part, os.O_RDWR)
    try:
        lock_part(fd, part)  # free now: the holder closed it
    finally:
        os.close(fd)


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    async with Sandbox(SandboxConfig(keys=(KEY,), asset_size=5_000, rate=None)) as sb:
        yield sb


@pytest.mark.anyio
@pytest.mark.parametrize("connections", [1, 4])
async def test_a_part_held_elsewhere_leaves_its_job_pending_and_others_go_on(
    sandbox: Sandbox, tmp_path: Path, connections: int
) -> None:
    jobs = specs(sandbox, 4)
    busy = part_path(tmp_path / jobs[1].relpath)
    busy.parent.mkdir(parents=True, exist_ok=True)
    busy.write_bytes(b"the other process's bytes")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("batch_export")
    logger.addHandler(handler)
    try:
        with held(busy):
            result = await run(
                sandbox.api_url, jobs, tmp_path, connections=connections, segment_min=1
            )
    finally:
        logger.removeHandler(handler)
    outcomes = [job.outcome for job in result.jobs]
    assert outcomes == [Outcome.DOWNLOADED, Outcome.PENDING, Outcome.DOWNLOADED, Outcome.DOWNLOADED]
    assert busy.read_bytes() == b"the other process's bytes"  # not a byte changed
    assert not (tmp_path / jobs[1].relpath).exists()
    assert result.jobs[1].error_code is None and result.exit_code == 1
    lines = [r.getMessage() for r in records if getattr(r, "event", "") == "part_busy"]
    assert len(lines) == 1
    assert f"{busy} is being written by another batch-export process" in lines[0]
    assert not [r for r in records if getattr(r, "error_code", "") == "local_io"]


@pytest.mark.anyio
async def test_a_part_taken_before_verification_is_not_committed(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    from batch_export.runner import Runner
    from batch_export.store import MemoryStore
    from batch_export.types import Job, JobState
    from tests.test_breaker_runs import settings

    jobs = specs(sandbox, 2)
    taken: list[int] = []

    class TakeAtVerify:
        """Another process grabs job 0's .part the moment its bytes are complete."""

        def job_state(self, job: Job) -> None:
            if job.record.state is JobState.VERIFYING and job.spec is jobs[0] and not taken:
                fd = os.open(part_path(job.final), os.O_RDWR)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                taken.append(fd)

        def job_bytes(self, job: Job, count: int) -> None: ...

        def job_finished(self, result: object) -> None: ...

    runner = Runner(
        settings(sandbox.api_url, tmp_path),
        jobs,
        api_key=KEY,
        store=MemoryStore(),
        observer=TakeAtVerify(),
    )
    try:
        result = await runner.run()
        assert [job.outcome for job in result.jobs] == [Outcome.PENDING, Outcome.DOWNLOADED]
        assert not (tmp_path / jobs[0].relpath).exists()  # not committed under the other's lock
        assert part_path(tmp_path / jobs[0].relpath).exists()  # nor removed
    finally:
        for fd in taken:
            os.close(fd)
