"""Subscribers to job events: outcome lines, a live display, the unattended progress line.

A log line per job outcome (:class:`LogObserver`), a live display on a terminal
(:class:`ProgressDisplay`), and the progress line every ``--progress-interval`` when stderr is not a
terminal (:class:`ProgressLog`). The observers implement :class:`batch_export.types.RunObserver`; :class:`FanOut` hands every event to several.
The display is drawn by :mod:`rich` on stderr; log lines print above it (through
:func:`batch_export.logs.set_console`) so neither tears the other.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich import filesize
from rich.console import Console, Group
from rich.live import Live
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TransferSpeedColumn,
)
from rich.text import Text

from batch_export.logs import set_console
from batch_export.pace import Tally, progress_line
from batch_export.ratelimit import LimiterStats
from batch_export.types import Job, JobResult, JobState, Outcome, RunObserver

__all__ = ["FanOut", "LogObserver", "ProgressDisplay", "ProgressLog", "job_fields"]

log = logging.getLogger("batch_export")


def job_fields(result: JobResult) -> dict[str, Any]:
    """Return the structured log fields of a job outcome (``extra`` for JSON lines)."""
    fields: dict[str, Any] = {
        "key": result.key,
        "aoi_id": result.aoi_id,
        "insight_id": result.insight_id,
        "job_name": result.name,
        "state": str(result.outcome),
        "attempt": result.attempts,
        "bytes": result.bytes,
        "path": result.path,
    }
    if result.outcome in (Outcome.FAILED, Outcome.ABANDONED):
        fields["error_code"] = result.error_code
        fields["http_status"] = result.error_http_status
    return fields


class FanOut:
    """A :class:`RunObserver` that forwards every event to each of ``observers``."""

    def __init__(self, observers: Sequence[RunObserver]) -> None:
        self._observers = list(observers)

    def job_state(self, job: Job) -> None:
        """Forward."""
        for observer in self._observers:
            observer.job_state(job)

    def job_bytes(self, job: Job, count: int) -> None:
        """Forward."""
        for observer in self._observers:
            observer.job_bytes(job, count)

    def job_uploaded(self, job: Job, count: int) -> None:
        """Forward to the observers that have ``job_uploaded`` (an optional method)."""
        for observer in self._observers:
            uploaded = getattr(observer, "job_uploaded", None)
            if uploaded is not None:
                uploaded(job, count)

    def job_finished(self, result: JobResult) -> None:
        """Forward."""
        for observer in self._observers:
            observer.job_finished(result)


class LogObserver:
    """One log line per job outcome (info; failures as warnings), state changes at debug."""

    def job_state(self, job: Job) -> None:
        """Log the state change at debug level."""
        if log.isEnabledFor(logging.DEBUG):
            record = job.record
            log.debug(
                "job %s %s/%s -> %s",
                job.key[:12],
                record.aoi_id,
                record.insight_id,
                record.state,
                extra={
                    "event": "job_state",
                    "key": job.key,
                    "aoi_id": record.aoi_id,
                    "insight_id": record.insight_id,
                    "state": str(record.state),
                    "attempt": record.attempts,
                },
            )

    def job_bytes(self, job: Job, count: int) -> None:
        """Nothing: bytes are not worth a line each."""

    def job_finished(self, result: JobResult) -> None:
        """Log the outcome line."""
        ident = f"{result.aoi_id}/{result.insight_id} ({result.name})"
        fields = job_fields(result)
        if result.outcome is Outcome.FAILED:
            status = f" HTTP {result.error_http_status}" if result.error_http_status else ""
            log.warning(
                "failed      %s: %s%s: %s",
                ident,
                result.error_code,
                status,
                result.error_message,
                extra={"event": "job_failed", **fields},
            )
        elif result.outcome is Outcome.DOWNLOADED:
            log.info(
                "downloaded  %s -> %s (%s bytes)",
                ident,
                result.path,
                result.bytes,
                extra={"event": "job_downloaded", **fields},
            )
        elif result.outcome is Outcome.ABANDONED:
            status = f" HTTP {result.error_http_status}" if result.error_http_status else ""
            # A warning in the run that gives up on it (cron mails it once), info afterwards.
            log.log(
                logging.WARNING if result.abandoned_now else logging.INFO,
                "abandoned   %s: %s%s: %s (the same error in limits.give_up_after runs in a row; "
                "not requested again until its entry changes or --retry-abandoned)",
                ident,
                result.error_code,
                status,
                result.error_message,
                extra={"event": "job_abandoned", **fields},
            )
        elif result.outcome is Outcome.SKIPPED:
            log.info(
                "skipped     %s: already done at %s",
                ident,
                result.path,
                extra={"event": "job_skipped", **fields},
            )
        else:
            log.info(
                "pending     %s: left for the next run",
                ident,
                extra={"event": "job_pending", **fields},
            )


class ProgressDisplay:
    """Live terminal display of a run.

    Shows jobs done/failed/to go, bytes and rate, what the rate limiter is doing (rate, Retry-After
    pause, 429s), the jobs per state with the ETA (the unattended progress line's fields, from a
    :class:`~batch_export.pace.Tally`), and one bar per active download.

    Args:
        total: number of jobs in the run.
        limiter: returns the shared limiter's :class:`LimiterStats` (None: not shown).
        console: where to draw (default: stderr).
        clock: monotonic seconds (default :func:`time.monotonic`).
    """

    def __init__(
        self,
        *,
        total: int,
        limiter: Callable[[], LimiterStats] | None = None,
        console: Console | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.console = console or Console(stderr=True)
        self._total = total
        self._limiter = limiter
        self.tally = Tally(
            total=total,
            clock=clock,
            request_rate=(lambda: limiter().rate) if limiter is not None else (lambda: 0.0),
        )
        self._counts = {outcome: 0 for outcome in Outcome}
        self._bytes = 0
        self._uploaded = 0  # bytes the object store confirmed
        self._started = time.monotonic()
        self._active: dict[str, TaskID] = {}
        self._downloads = Progress(
            TextColumn("  {task.description}", justify="left"),
            BarColumn(bar_width=30),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=self.console,
        )

    def add_jobs(self, count: int) -> None:
        """``count`` more jobs joined the run (discovered at run time)."""
        self._total += count
        self.tally.add_jobs(count)

    def __rich__(self) -> Group:
        """The whole display, rebuilt at each refresh."""
        line = progress_line(self.tally.snapshot()).removeprefix("progress: ")
        return Group(self._header(), Text(line), self._downloads)

    def _header(self) -> Text:
        done = self._counts[Outcome.DOWNLOADED] + self._counts[Outcome.SKIPPED]
        failed = self._counts[Outcome.FAILED]
        pending = self._total - done - failed - self._counts[Outcome.PENDING]
        elapsed = max(1e-6, time.monotonic() - self._started)
        text = Text()
        text.append(f"jobs {done}/{self._total} done", style="bold green")
        text.append(f" · {failed} failed", style="bold red" if failed else "")
        text.append(f" · {pending} to go")
        text.append(f" | {_size(self._bytes)} at {_size(self._bytes / elapsed)}/s")
        if self._uploaded:
            text.append(f" · {_size(self._uploaded)} uploaded")
        if self._limiter is not None:
            stats = self._limiter()
            text.append(f" | API {_num(stats.rate)}/{_num(stats.target_rate)} req/s")
            if stats.paused_for > 0:
                text.append(f" · paused {stats.paused_for:.0f} s (Retry-After)", style="yellow")
            if stats.throttled:
                text.append(f" · {stats.throttled}×429", style="yellow")
        return text

    @contextmanager
    def live(self) -> Iterator[None]:
        """Draw the display for the duration of the block; log lines print above it."""
        with Live(self, console=self.console, refresh_per_second=4, transient=True):
            set_console(self.console)
            try:
                yield
            finally:
                set_console(None)

    def job_state(self, job: Job) -> None:
        """Add a bar when a download starts; drop it when the job leaves downloading."""
        self.tally.job_state(job)
        state = job.record.state
        task = self._active.get(job.key)
        if state is JobState.DOWNLOADING:
            if task is None:
                label = f"{job.record.aoi_id}/{job.record.name}"[:40]
                self._active[job.key] = self._downloads.add_task(
                    label, total=job.bytes_total, completed=job.bytes_done
                )
            else:
                self._downloads.update(task, total=job.bytes_total, completed=job.bytes_done)
        elif task is not None and state is not JobState.VERIFYING:
            self._downloads.remove_task(task)
            del self._active[job.key]

    def job_bytes(self, job: Job, count: int) -> None:
        """Advance the job's bar and the byte counter."""
        self.tally.job_bytes(job, count)
        self._bytes += count
        task = self._active.get(job.key)
        if task is not None:
            self._downloads.update(task, completed=job.bytes_done, total=job.bytes_total)

    def job_uploaded(self, job: Job, count: int) -> None:
        """Count ``count`` more bytes the object store confirmed."""
        self.tally.job_uploaded(job, count)
        self._uploaded += count

    def job_finished(self, result: JobResult) -> None:
        """Count the outcome; drop the job's bar."""
        self.tally.job_finished(result)
        self._counts[result.outcome] += 1
        task = self._active.pop(result.key, None)
        if task is not None:
            self._downloads.remove_task(task)


class ProgressLog:
    """The unattended progress line, every ``interval`` seconds (SPEC §9).

    For runs whose stderr is not a terminal: an info line ``progress: queued 812 requesting 3 …
    | 9.8 GB at 61 MB/s | ETA 2h14m``; under JSON logs an ``event: progress`` line with the same
    facts as fields (``counts``, ``bytes``, ``bytes_per_second``, ``eta_seconds``; None: unknown).

    Args:
        tally: the run's :class:`~batch_export.pace.Tally` (it must receive the job events).
        interval: seconds between lines (> 0).
        sleep: the run clock's sleep (tests pass a fake clock's).
    """

    def __init__(
        self, tally: Tally, *, interval: float, sleep: Callable[[float], Awaitable[None]]
    ) -> None:
        self.tally = tally
        self._interval = interval
        self._sleep = sleep

    def emit(self) -> None:
        """Log one progress line now."""
        snapshot = self.tally.snapshot()
        log.info(
            "%s",
            progress_line(snapshot),
            extra={
                "event": "progress",
                "counts": snapshot.counts,
                "bytes": snapshot.bytes,
                "bytes_per_second": None if snapshot.rate is None else round(snapshot.rate),
                "eta_seconds": None if snapshot.eta is None else round(snapshot.eta),
                "uploaded_bytes": snapshot.uploaded,
            },
        )

    async def run(self) -> None:
        """Log a line every ``interval`` seconds until cancelled (the first after one interval)."""
        while True:
            await self._sleep(self._interval)
            self.emit()


def _num(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


def _size(count: float) -> str:
    return filesize.decimal(int(count))  # the same units as rich's download bars
