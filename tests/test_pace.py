"""The progress tally and line (SPEC §9): counts per state, bytes, measured rates, the ETA; a fake clock."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from batch_export.logs import JsonFormatter
from batch_export.manifest import ExportSpec
from batch_export.pace import Tally, human_duration, human_size, progress_line
from batch_export.progress import ProgressLog
from batch_export.redact import Redactor
from batch_export.types import Job, JobRecord, JobResult, JobState, Outcome
from tests.fakes import FakeClock


def make_job(n: int) -> Job:
    spec = ExportSpec(f"a{n}", f"i{n}", (), ("o",), f"n{n}", f"a{n}/i{n}/n{n}.zip")
    record = JobRecord(f"k{n}", spec.aoi_id, spec.insight_id, spec.name, spec.relpath)
    return Job(spec=spec, final=Path("/out") / spec.relpath, record=record)


class Run:
    """Drives a tally as the runner's events would, on a fake clock."""

    def __init__(self, total: int, rate: float = 2.0) -> None:
        self.clock = FakeClock(start=0.0)
        self.jobs = [make_job(n) for n in range(total)]
        self.tally = Tally(total=total, clock=self.clock.monotonic, request_rate=lambda: rate)

    def to(self, n: int, state: JobState, **changes: object) -> Job:
        job = self.jobs[n]
        job.record = job.record.evolve(state=state, **changes)
        self.tally.job_state(job)
        return job

    def at(self, seconds: float) -> None:
        self.clock.now = seconds


def test_counts_per_state_and_eta_unknown_until_measurable() -> None:
    run = Run(total=5)
    assert progress_line(run.tally.snapshot()) == (
        "progress: queued 5 requesting 0 preparing 0 downloading 0 done 0 failed 0 "
        "| 0 B at 0 B/s | ETA unknown"
    )
    run.to(0, JobState.REQUESTING, attempts=1)
    run.to(1, JobState.REQUESTING, attempts=1)
    run.to(0, JobState.PREPARING)
    run.to(1, JobState.FAILED, error_code="x")
    snapshot = run.tally.snapshot()
    assert snapshot.eta is None  # nothing ready yet: the requests a job takes are not measured
    assert progress_line(snapshot) == (
        "progress: queued 3 requesting 0 preparing 1 downloading 0 done 0 failed 1 "
        "| 0 B at 0 B/s | ETA unknown"
    )


def test_eta_is_the_slower_pipeline_of_measured_rates() -> None:
    run = Run(total=4, rate=0.5)
    # Job 0: one request, then two polls -> ready; its request cycle took 3 requests.
    run.to(0, JobState.REQUESTING, attempts=1)
    run.to(0, JobState.PREPARING)
    run.to(0, JobState.PREPARING, polls=1)
    run.to(0, JobState.READY, polls=2)
    run.at(10.0)
    job = run.jobs[0]
    job.bytes_total = 100_000_000
    run.to(0, JobState.DOWNLOADING)
    run.at(12.0)
    job.bytes_done = 50_000_000
    run.tally.job_bytes(job, 50_000_000)  # 50 MB in 2 s of downloading: 25 MB/s
    run.to(1, JobState.REQUESTING, attempts=1)  # one request sent of the ~3 its cycle will take
    snapshot = run.tally.snapshot()
    assert snapshot.rate == 25_000_000
    # requests: 2 unseen x 3 + job 1's 3 - 1 = 8 at 0.5/s = 16 s;
    # bytes: job 0's 50 MB left + 3 x 100 MB (mean size) = 350 MB at 25 MB/s = 14 s.
    assert snapshot.eta == pytest.approx(16.0)
    assert progress_line(snapshot) == (
        "progress: queued 2 requesting 1 preparing 0 downloading 1 done 0 failed 0 "
        "| 50 MB at 25 MB/s | ETA 16s"
    )
    # Downloads paused (no job downloading) do not dilute the measured rate.
    run.to(0, JobState.VERIFYING)
    run.at(100.0)
    assert run.tally.snapshot().rate == 25_000_000
    run.to(0, JobState.DONE, bytes=100_000_000)
    run.tally.job_finished(
        JobResult("k0", "a0", "i0", "n0", Outcome.DOWNLOADED, "/p", 100_000_000, "s", 1, 2, 1.0)
    )
    line = progress_line(run.tally.snapshot())
    assert line.startswith("progress: queued 2 requesting 1 preparing 0 downloading 0 done 1 ")
    assert line.endswith("| 50 MB at 25 MB/s | ETA 16s")


def test_other_states_show_when_not_zero_and_skipped_jobs_count_as_done() -> None:
    run = Run(total=3)
    run.to(0, JobState.REQUESTING, attempts=1)
    run.to(0, JobState.READY)
    run.tally.job_finished(JobResult("k2", "a", "i", "n", Outcome.SKIPPED, "/p", 1, "s", 1, 0, 0.0))
    assert progress_line(run.tally.snapshot()).startswith(
        "progress: queued 1 requesting 0 preparing 0 ready 1 downloading 0 done 1 failed 0 |"
    )


def test_eta_zero_when_nothing_is_left() -> None:
    run = Run(total=1)
    run.tally.job_finished(JobResult("k0", "a", "i", "n", Outcome.SKIPPED, "/p", 1, "s", 1, 0, 0.0))
    assert progress_line(run.tally.snapshot()).endswith("| ETA 0s")


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (1_500, "1.5 kB"),
        (61_000_000, "61 MB"),
        (9_800_000_000, "9.8 GB"),
        (999_999, "1.0 MB"),
        (12_340_000_000_000, "12 TB"),
    ],
)
def test_human_size(count: int, text: str) -> None:
    assert human_size(count) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (42.4, "42s"), (845, "14m05s"), (8040, "2h14m"), (93_600, "1d02h")],
)
def test_human_duration(seconds: float, text: str) -> None:
    assert human_duration(seconds) == text


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "event", None) == "progress":
            self.records.append(record)


@pytest.fixture
def lines_logged() -> Iterator[Lines]:
    logger = logging.getLogger("batch_export")
    handler, level = Lines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.mark.anyio
async def test_progress_log_every_interval_text_and_json(lines_logged: Lines) -> None:
    run = Run(total=2)
    lines = ProgressLog(run.tally, interval=60.0, sleep=run.clock.sleep)
    lines.emit()
    (record,) = lines_logged.records
    assert record.levelno == logging.INFO
    assert record.getMessage() == (
        "progress: queued 2 requesting 0 preparing 0 downloading 0 done 0 failed 0 "
        "| 0 B at 0 B/s | ETA unknown"
    )
    doc = json.loads(JsonFormatter(redactor=Redactor([]), run_id="r1").format(record))
    assert doc["event"] == "progress"
    assert doc["message"] == record.getMessage()
    assert doc["counts"] == {
        "queued": 2,
        "requesting": 0,
        "preparing": 0,
        "ready": 0,
        "downloading": 0,
        "verifying": 0,
        "uploading": 0,
        "done": 0,
        "failed": 0,
        "abandoned": 0,
    }
    assert (doc["bytes"], doc["bytes_per_second"], doc["eta_seconds"]) == (0, None, None)

    lines_logged.records.clear()
    async with anyio.create_task_group() as tg:
        tg.start_soon(lines.run)
        while len(run.clock.sleeps) < 4:  # the fake clock's sleep returns at once
            await anyio.sleep(0)
        tg.cancel_scope.cancel()
    assert run.clock.sleeps[:4] == [60.0, 60.0, 60.0, 60.0]
    assert run.clock.now == 240.0
    assert len(lines_logged.records) == 3  # one per interval ended: after 60, 120 and 180 s


def test_terminal_display_shows_the_same_counts_and_eta() -> None:
    from rich.console import Console

    from batch_export.progress import ProgressDisplay
    from batch_export.ratelimit import LimiterStats

    clock = FakeClock(start=0.0)
    console = Console(record=True, width=160, force_terminal=False)
    stats = LimiterStats(rate=2.0, target_rate=2.0, paused_for=0.0, throttled=0, granted=1)
    display = ProgressDisplay(
        total=3, limiter=lambda: stats, console=console, clock=clock.monotonic
    )
    job = make_job(0)
    job.record = job.record.evolve(state=JobState.REQUESTING, attempts=1)
    display.job_state(job)
    console.print(display)
    assert (
        "queued 2 requesting 1 preparing 0 downloading 0 done 0 failed 0 | 0 B at 0 B/s | ETA unknown"
        in console.export_text()
    )


def test_bytes_the_object_store_confirmed_are_on_the_progress_line() -> None:
    run = Run(total=1)
    job = run.to(0, JobState.UPLOADING)
    run.tally.job_uploaded(job, 3 * 1024 * 1024)
    run.tally.job_uploaded(job, 1024 * 1024)
    snapshot = run.tally.snapshot()
    assert snapshot.uploaded == 4 * 1024 * 1024
    assert progress_line(snapshot).split(" | ")[1:3] == [
        "0 B at 0 B/s",
        "uploaded 4.2 MB",
    ]  # SI units, as the byte count
