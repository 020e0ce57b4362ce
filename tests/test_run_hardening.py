"""One job's trouble stays that job's (issue 10): the real Runner against the sandbox on loopback.

Only conditions of the whole disk (full, read-only, over quota) stop other downloads; a job's own
path problem fails that job alone; running out of file descriptors is a passing condition of the
process (back off and retry, never a failed or "corrupt" package); a state store failing mid-run
stops the run cleanly instead of failing jobs or crashing the task group.
"""

from __future__ import annotations

import errno
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from batch_export import partfile, runner
from batch_export.errors import LocalIOError
from batch_export.manifest import ExportSpec
from batch_export.runner import Job, JobResult, Outcome, Runner, RunResult, Settings
from batch_export.sandbox import Sandbox, SandboxConfig
from batch_export.store import MemoryStore
from tests.fakes import FakeClock

pytestmark = pytest.mark.anyio

KEY = "hardening-key-0b7c"


class Quiet:
    def job_state(self, job: Job) -> None:
        pass

    def job_bytes(self, job: Job, count: int) -> None:
        pass

    def job_finished(self, result: JobResult) -> None:
        pass


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    async with Sandbox(SandboxConfig(keys=(KEY,), asset_size=5000, rate=None)) as sb:
        yield sb


def specs(sandbox: Sandbox, count: int, first_name: str = "job000") -> list[ExportSpec]:
    pairs = [(aoi, ins) for aoi in sandbox.catalog.aois for ins in aoi.insights]
    out = []
    for n in range(count):
        aoi, ins = pairs[n]
        name = first_name if n == 0 else f"job{n:03d}"
        relpath = f"{aoi.id}/{ins.id}/{name}.zip"
        out.append(ExportSpec(aoi.id, ins.id, (), (ins.outputs[0],), name, relpath))
    return out


async def run(
    sandbox: Sandbox, out: Path, jobs: list[ExportSpec], *, store: Any = None, **kw: Any
) -> RunResult:
    settings = Settings(
        api_url=sandbox.api_url,
        out_dir=out,
        state_dir=out / ".batch-export",
        rate=1000.0,
        poll_interval=0.01,
        poll_max_interval=0.02,
        retries=2,
        backoff_base=0.005,
        backoff_cap=0.01,
        downloads=1,
        connections=1,
    )
    return await Runner(
        settings,
        jobs,
        api_key=KEY,
        store=store or MemoryStore(),
        observer=Quiet(),
        **kw,
    ).run()


def served(sandbox: Sandbox, spec: ExportSpec) -> str:
    return sandbox.package_bytes_sha256(spec.aoi_id, spec.insight_id, spec.inputs, spec.outputs)


def assert_downloaded(sandbox: Sandbox, out: Path, spec: ExportSpec, result: JobResult) -> None:
    assert result.outcome is Outcome.DOWNLOADED, (result.error_code, result.error_message)
    data = (out / spec.relpath).read_bytes()
    assert hashlib.sha256(data).hexdigest() == served(sandbox, spec) == result.sha256


async def test_a_folder_where_the_package_goes_fails_that_job_alone(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    jobs = specs(sandbox, 3)
    (tmp_path / jobs[0].relpath).mkdir(parents=True)  # a folder at the package's own path
    result = await run(sandbox, tmp_path, jobs)
    first = result.jobs[0]
    assert first.outcome is Outcome.FAILED and first.error_code == "path_clash"
    for spec, job in zip(jobs[1:], result.jobs[1:], strict=True):
        assert_downloaded(sandbox, tmp_path, spec, job)
    assert result.exit_code == 1
    assert len(sandbox.requests_to("storage", "GET")) == 3  # the others were not stopped


async def test_a_name_too_long_once_part_is_appended_fails_that_job_alone(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    name = "n" * 251  # "<name>.zip" is 255 bytes, as validate allows; "<name>.zip.part" is 260
    jobs = specs(sandbox, 3, first_name=name)
    result = await run(sandbox, tmp_path, jobs)
    first = result.jobs[0]
    assert first.outcome is Outcome.FAILED and first.error_code == "path_too_long"
    for spec, job in zip(jobs[1:], result.jobs[1:], strict=True):
        assert_downloaded(sandbox, tmp_path, spec, job)


async def test_a_part_that_vanished_before_verification_fails_that_job_alone(
    sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = specs(sandbox, 3)
    real_verify = runner.verify_package

    def vanish_first(part: Path, transfer: Any) -> None:
        if part.name.startswith("job000"):
            part.unlink()
        real_verify(part, transfer)

    monkeypatch.setattr(runner, "verify_package", vanish_first)
    result = await run(sandbox, tmp_path, jobs)
    first = result.jobs[0]
    assert first.outcome is Outcome.FAILED and first.error_code == "local_io"
    for spec, job in zip(jobs[1:], result.jobs[1:], strict=True):
        assert_downloaded(sandbox, tmp_path, spec, job)


async def test_no_file_descriptor_left_is_retried_not_a_failure(
    sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = specs(sandbox, 2)
    real_verify = runner.verify_package
    refusals: list[str] = []

    def short_of_descriptors(part: Path, transfer: Any) -> None:
        if len(refusals) < 2:
            refusals.append(part.name)
            raise OSError(errno.EMFILE, "Too many open files")
        real_verify(part, transfer)

    monkeypatch.setattr(runner, "verify_package", short_of_descriptors)
    clock = FakeClock()
    result = await run(sandbox, tmp_path, jobs, clock=clock)
    for spec, job in zip(jobs, result.jobs, strict=True):
        assert_downloaded(sandbox, tmp_path, spec, job)
    assert len(refusals) == 2 and len(set(refusals)) == 1  # one job, refused twice, then fine
    assert [s for s in clock.sleeps if s >= 1.0] == [1.0, 2.0]  # backed off 1 s, then 2 s
    assert len(sandbox.requests_to("storage", "GET")) == 2  # verified again, not fetched again


async def test_descriptors_short_for_good_fail_the_job_alone_and_keep_its_part(
    sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = specs(sandbox, 2)
    real_verify = runner.verify_package

    def never_for_the_first(part: Path, transfer: Any) -> None:
        if part.name.startswith("job000"):
            raise OSError(errno.ENFILE, "Too many open files in system")
        real_verify(part, transfer)

    monkeypatch.setattr(runner, "verify_package", never_for_the_first)
    clock = FakeClock()
    result = await run(sandbox, tmp_path, jobs, clock=clock)
    first = result.jobs[0]
    assert first.outcome is Outcome.FAILED and first.error_code == "too_many_open_files"
    assert (tmp_path / (jobs[0].relpath + ".part")).exists()  # the bytes are fine: kept
    assert_downloaded(sandbox, tmp_path, jobs[1], result.jobs[1])
    assert [s for s in clock.sleeps if s >= 1.0] == [1.0, 2.0, 4.0, 8.0, 16.0]


async def test_disk_full_still_stops_the_other_downloads(
    sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(part: Path, transfer: Any) -> None:
        raise LocalIOError("cannot write the package: No space left on device", code="disk_full")

    monkeypatch.setattr(runner, "verify_package", full)
    result = await run(sandbox, tmp_path, specs(sandbox, 3))
    outcomes = [j.outcome for j in result.jobs]  # whichever job got the download slot first
    assert sorted(outcomes) == [Outcome.FAILED, Outcome.PENDING, Outcome.PENDING]
    assert len(sandbox.requests_to("storage", "GET")) == 1


class FailingStore(MemoryStore):
    """A MemoryStore whose disk fills after ``ok`` saves (every later save fails)."""

    def __init__(self, ok: int) -> None:
        super().__init__()
        self.ok = ok

    async def save(self, record: Any) -> None:
        if self.saves >= self.ok:
            self.saves += 1
            raise LocalIOError(
                "the state store /x/state.sqlite3 could not commit: database or disk is full",
                code="state_store",
                job_key=record.key,
            )
        await super().save(record)


@pytest.mark.parametrize("ok", [0, 3, 7])
async def test_a_state_store_failing_mid_run_stops_the_run_cleanly(
    sandbox: Sandbox, tmp_path: Path, ok: int
) -> None:
    store = FailingStore(ok)
    result = await run(sandbox, tmp_path, specs(sandbox, 3), store=store)  # no exception
    assert result.fatal is not None and result.fatal.code == "state_store"
    assert "database or disk is full" in result.fatal.message
    assert result.exit_code == 1
    assert Outcome.FAILED not in [job.outcome for job in result.jobs]  # nothing wrong with them
    assert result.stopped_by == "state_store"


async def test_a_state_store_unreadable_at_the_first_read_runs_nothing(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    class Unreadable(MemoryStore):
        async def load_many(self, keys: Any) -> Any:
            raise LocalIOError("reading the state store failed: disk I/O error", code="state_store")

    result = await run(sandbox, tmp_path, specs(sandbox, 2), store=Unreadable())
    assert [job.outcome for job in result.jobs] == [Outcome.PENDING, Outcome.PENDING]
    assert result.exit_code == 1 and sandbox.requests == []


def test_download_names_local_errors_the_runner_judges() -> None:
    assert partfile.local_io_error(OSError(errno.EMFILE, "x")).code == "too_many_open_files"
    assert partfile.local_io_error(OSError(errno.EDQUOT, "x")).code == "disk_full"
    assert partfile.local_io_error(OSError(errno.ENOENT, "x")).code == "local_io"
