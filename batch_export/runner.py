"""The async shell: runs every job of a manifest on a worker pool, under the shared rate limit.

Data flow: jobs are admitted in manifest order; each job holds an *in-flight* slot while it is
requested and polled, then a *download* slot while it streams (a polling job holds no download
slot). Every state change goes through :func:`batch_export.lifecycle.advance` and is saved to the
:class:`~batch_export.store.JobStore` before the next step. A failing job fails alone: its errors are
caught inside its own task and never cancel the task group.
"""

from __future__ import annotations

import enum
import logging
import os
import random
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import anyio

from batch_export.api import API_CONNECTIONS, PackageStatus, PixxelClient
from batch_export.clock import Clock, SystemClock
from batch_export.download import Downloader, commit_part, discard_part, part_path, verify_package
from batch_export.errors import (
    ApiError,
    JobError,
    LocalIOError,
    PollTimeout,
    UrlRejected,
    VerificationError,
)
from batch_export.http import open_sessions
from batch_export.lifecycle import (
    MAX_EMPTY_URL_ANSWERS,
    MAX_URL_REFRESHES,
    UNFINISHED,
    JobState,
    StatusKind,
    StatusVocabulary,
    advance,
    is_url_expired,
    job_key,
    next_poll_interval,
    url_expiry,
)
from batch_export.manifest import ExportSpec
from batch_export.ratelimit import RateLimiter
from batch_export.redact import Redactor
from batch_export.store import JobRecord, JobStore
from batch_export.urls import url_refusal

__all__ = ["Job", "JobResult", "Outcome", "RunObserver", "RunResult", "Runner", "Settings"]

log = logging.getLogger("batch_export")


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a run needs besides the manifest's exports. Durations in seconds.

    Attributes:
        api_url: API base URL, no trailing slash.
        out_dir: output root; packages go to ``out_dir / spec.relpath``.
        state_dir: state store, lock and reports.
        in_flight: jobs being requested/polled at once.
        downloads: simultaneous downloads.
        rate: API requests/s for all jobs together, polls included.
        poll_interval, poll_max_interval: first and largest wait between polls.
        poll_timeout: a job pending longer than this fails (``poll_timeout``).
        retries: per request, for 5xx/network errors (429s do not count).
        read_timeout: seconds without a byte before a response counts as broken.
        vocabulary: which statuses mean ready and failed.
        allow_http: allow plain http to non-loopback hosts.
        force: redo jobs already done.
        backoff_base, backoff_cap: retry backoff (full jitter) parameters.
    """

    api_url: str
    out_dir: Path
    state_dir: Path
    in_flight: int = 32
    downloads: int = 4
    rate: float = 2.0
    poll_interval: float = 5.0
    poll_max_interval: float = 60.0
    poll_timeout: float = 7200.0
    retries: int = 6
    read_timeout: float = 60.0
    vocabulary: StatusVocabulary = field(default_factory=StatusVocabulary)
    allow_http: bool = False
    force: bool = False
    backoff_base: float = 1.0
    backoff_cap: float = 60.0


class Outcome(enum.StrEnum):
    """How a job ended in this run (report ``outcome``)."""

    DOWNLOADED = "downloaded"
    SKIPPED = "skipped"
    FAILED = "failed"
    PENDING = "pending"


@dataclass(slots=True)
class Job:
    """A job during a run: its spec, where it goes, and its current record."""

    spec: ExportSpec
    final: Path
    record: JobRecord
    started: float | None = None
    seconds: float = 0.0
    bytes_done: int = 0
    bytes_total: int | None = None  # size of the package being downloaded, when announced
    outcome: Outcome = Outcome.PENDING
    recovering: bool = False  # left unfinished by a crashed run
    verify_failures: int = 0  # packages that failed verification in this run
    pending_seconds: float = 0.0  # time spent requesting/polling in this run (poll_timeout)

    @property
    def key(self) -> str:
        """The job key."""
        return self.record.key


@dataclass(frozen=True, slots=True)
class JobResult:
    """One line of the run report (SPEC §5)."""

    key: str
    aoi_id: str
    insight_id: str
    name: str
    outcome: Outcome
    path: str
    bytes: int | None
    sha256: str | None
    attempts: int
    polls: int
    seconds: float
    error_code: str | None = None
    error_message: str | None = None
    error_http_status: int | None = None


@dataclass(frozen=True, slots=True)
class RunResult:
    """The end of a run: per-job results and request counts."""

    jobs: tuple[JobResult, ...]
    api_requests: int
    storage_requests: int
    throttled: int
    wall_seconds: float
    stopped_by: str | None = None  # "SIGINT", "SIGTERM", "max_runtime" or None
    api_by_status: dict[int, int] = field(default_factory=dict)  # HTTP status (0: network) -> count

    def count(self, outcome: Outcome) -> int:
        """Number of jobs with ``outcome``."""
        return sum(1 for job in self.jobs if job.outcome is outcome)

    @property
    def exit_code(self) -> int:
        """The exit code (SPEC §2).

        130/143 on a signal, 3 when stopped by the time budget with jobs left, 1 when a job failed
        (or was left pending), 0 when every job is done.
        """
        pending = any(job.outcome is Outcome.PENDING for job in self.jobs)
        if self.stopped_by == "SIGINT":
            return 130
        if self.stopped_by == "SIGTERM":
            return 143
        if self.stopped_by == "max_runtime" and pending:
            return 3
        ok = {Outcome.DOWNLOADED, Outcome.SKIPPED}
        return 0 if all(job.outcome in ok for job in self.jobs) else 1


class RunObserver(Protocol):
    """Receives progress of a run (logs, progress display). Must not block."""

    def job_state(self, job: Job) -> None:
        """``job.record.state`` just changed (already saved)."""

    def job_bytes(self, job: Job, count: int) -> None:
        """``count`` more bytes of ``job`` were written."""

    def job_finished(self, result: JobResult) -> None:
        """A job reached its outcome for this run."""


class _Stop(Exception):
    """Downloads were stopped (local disk failure): leave the job pending."""


class Runner:
    """Runs a list of exports to completion.

    Args:
        settings: the run's :class:`Settings`.
        specs: the exports (from the manifest; already sharded if sharding).
        api_key: the raw API key (never logged; only sent to the API origin).
        store: where job records are saved.
        observer: progress receiver.
        clock: time source (tests inject one).
        rng: randomness for jitter (tests seed one).
        max_runtime: seconds after which the run stops taking work and checkpoints (exit 3).
        handle_signals: turn SIGINT/SIGTERM into a checkpointed stop (exit 130/143); a second
            signal exits at once.
    """

    def __init__(
        self,
        settings: Settings,
        specs: Sequence[ExportSpec],
        *,
        api_key: str,
        store: JobStore,
        observer: RunObserver,
        redactor: Redactor | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        max_runtime: float | None = None,
        handle_signals: bool = False,
    ) -> None:
        self.settings = settings
        self.specs = list(specs)
        self._key = api_key
        self._store = store
        self._observer = _Guarded(observer)
        self._redact = redactor or Redactor([api_key])
        self._clock = clock or SystemClock()
        self._rng = rng or random.Random()
        self._limiter = RateLimiter(settings.rate, clock=self._clock)
        self._in_flight = anyio.Semaphore(settings.in_flight)
        self._download_slots = anyio.Semaphore(settings.downloads)
        self._stop_downloads = False
        self._refreshes: dict[str, int] = {}
        self._max_runtime = max_runtime
        self._handle_signals = handle_signals
        self._jobs_scope: anyio.CancelScope | None = None  # made inside the event loop
        self.stopped_by: str | None = None
        self.jobs: list[Job] = []

    @property
    def limiter(self) -> RateLimiter:
        """The shared rate limiter (for progress displays)."""
        return self._limiter

    async def run(self) -> RunResult:
        """Run every job; return when each has an outcome. Never raises for a job's failure."""
        started = self._clock.monotonic()
        async with open_sessions(
            api_connections=min(self.settings.in_flight, API_CONNECTIONS),
            storage_connections=max(4, self.settings.downloads * 2),
            redactor=self._redact,
        ) as sessions:
            api_session, storage_session = sessions.api, sessions.storage
            self._client = PixxelClient(
                api_session,
                base_url=self.settings.api_url,
                api_key=self._key,
                limiter=self._limiter,
                clock=self._clock,
                retries=self.settings.retries,
                read_timeout=self.settings.read_timeout,
                backoff_base=self.settings.backoff_base,
                backoff_cap=self.settings.backoff_cap,
                rng=self._rng,
                redactor=self._redact,
                connections=min(self.settings.in_flight, API_CONNECTIONS),
            )
            self._downloader = Downloader(
                storage_session,
                clock=self._clock,
                retries=self.settings.retries,
                read_timeout=self.settings.read_timeout,
                allow_http=self.settings.allow_http,
                backoff_base=self.settings.backoff_base,
                backoff_cap=self.settings.backoff_cap,
                rng=self._rng,
            )
            await self._prepare_jobs()
            async with anyio.create_task_group() as watchers:
                if self._max_runtime is not None:
                    watchers.start_soon(self._stop_at, started + self._max_runtime)
                if self._handle_signals:
                    watchers.start_soon(self._watch_signals)
                await self._run_all()
                watchers.cancel_scope.cancel()
        return RunResult(
            jobs=tuple(self._result(job) for job in self.jobs),
            api_requests=self._client.stats.sent,
            storage_requests=self._downloader.requests_sent,
            throttled=self._client.stats.throttled,
            wall_seconds=self._clock.monotonic() - started,
            stopped_by=self.stopped_by,
            api_by_status=dict(self._client.stats.by_status or {}),
        )

    async def _run_all(self) -> None:
        """Admit jobs in order (bounded), until all ran or a stop was requested."""
        admission = anyio.Semaphore(self.settings.in_flight + self.settings.downloads)
        self._jobs_scope = anyio.CancelScope()
        if self.stopped_by is not None:
            self._jobs_scope.cancel()
        with self._jobs_scope:
            async with anyio.create_task_group() as tg:
                for job in self.jobs:
                    if job.outcome is Outcome.SKIPPED:
                        continue
                    await admission.acquire()
                    tg.start_soon(self._run_job, job, admission)

    def request_stop(self, reason: str) -> None:
        """Stop: admit no new job and cancel the running ones at their current step.

        Every transition is already saved and ``.part`` files are kept, so the next run resumes.
        ``reason`` is ``"SIGINT"``, ``"SIGTERM"`` or ``"max_runtime"`` (the first one wins).
        """
        if self.stopped_by is None or (
            self.stopped_by == "max_runtime" and reason != "max_runtime"
        ):  # a signal outranks the time budget (exit 130/143 before 3)
            self.stopped_by = reason
            log.warning(
                "stopping (%s): in-flight work is checkpointed for the next run",
                reason,
                extra={"event": "run_stopping"},
            )
        if self._jobs_scope is not None:
            self._jobs_scope.cancel()

    async def _stop_at(self, deadline: float) -> None:
        await self._clock.sleep(max(0.0, deadline - self._clock.monotonic()))
        self.request_stop("max_runtime")

    async def _watch_signals(self) -> None:
        names = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}
        with anyio.open_signal_receiver(*names) as signals:
            async for signum in signals:
                if self.stopped_by in names.values():
                    log.error("second %s: exiting now", names[signum])
                    os._exit(128 + signum)
                self.request_stop(names[signum])

    # ----------------------------------------------------------------- set-up

    async def _prepare_jobs(self) -> None:
        """Load or create each job's record and decide what this run must do with it."""
        keys = [job_key(spec) for spec in self.specs]
        stored = await self._store.load_many(keys)
        for spec, key in zip(self.specs, keys, strict=True):
            final = self.settings.out_dir / spec.relpath
            record = stored.get(key) or JobRecord(
                key=key,
                aoi_id=spec.aoi_id,
                insight_id=spec.insight_id,
                name=spec.name,
                relpath=spec.relpath,
            )
            job = Job(spec=spec, final=final, record=record)
            self.jobs.append(job)
            if record.state is JobState.DONE and not self.settings.force and _intact(job):
                job.outcome = Outcome.SKIPPED
                self._observer.job_finished(self._result(job))
            elif record.state in UNFINISHED:
                # Left by a crashed run: recovery (not a lifecycle step) sends it to requesting.
                job.recovering = True
            elif record.state is not JobState.QUEUED:
                # failed/done -> queued is kept in memory only: a crash before the job's next
                # (saved) step leaves it failed/done, which the next run re-queues the same way.
                # Saving 100,000 of these one by one would cost minutes.
                await self._set(job, JobState.QUEUED, save=False)

    # ----------------------------------------------------------------- one job

    async def _run_job(self, job: Job, admission: anyio.Semaphore) -> None:
        job.started = self._clock.monotonic()
        try:
            await self._drive(job)
            job.outcome = Outcome.DOWNLOADED
        except _Stop:
            job.outcome = Outcome.PENDING
        except JobError as exc:
            await self._fail(job, exc)
        except Exception as exc:  # a bug: this job fails, the run goes on
            log.error(
                "internal error in job %s: %s",
                job.key[:12],
                self._redact(f"{type(exc).__name__}: {exc}"),
            )
            await self._fail(job, JobError("internal error (a bug)", code="internal_error"))
        finally:
            job.seconds = self._clock.monotonic() - job.started
            admission.release()
            self._observer.job_finished(self._result(job))

    async def _drive(self, job: Job) -> None:
        while True:
            if self._stop_downloads:
                raise _Stop()
            async with self._in_flight:
                package = await self._request_until_ready(job)
            async with self._download_slots:
                if self._stop_downloads:
                    raise _Stop()
                if await self._download(job, package):
                    return

    async def _request_until_ready(self, job: Job) -> PackageStatus:
        """``requesting`` -> (``preparing`` …) -> ``ready``; returns the ready answer."""
        await self._set(job, JobState.REQUESTING, attempts=job.record.attempts + 1)
        started = self._clock.monotonic()
        try:
            return await self._poll_until_ready(job, started)
        finally:
            job.pending_seconds += self._clock.monotonic() - started

    async def _poll_until_ready(self, job: Job, started: float) -> PackageStatus:
        # poll_timeout bounds the job's pending time over all its request cycles in this run
        # (a refresh after a long download does not start a new budget, nor fail for it).
        deadline = started + max(0.0, self.settings.poll_timeout - job.pending_seconds)
        interval: float | None = None
        empty_url_answers = 0
        first = True
        while True:
            package = await self._client.request_package(
                job.spec, deadline=deadline, job_key=job.key
            )
            if not first:
                job.record = job.record.evolve(polls=job.record.polls + 1)
            first = False
            kind = self.settings.vocabulary.classify(package.status, package.signed_url)
            if kind is StatusKind.FAILED:
                raise ApiError(
                    f"the API reports the package as {package.status[:64]!r}",
                    code="package_failed",
                    http_status=200,
                )
            if kind is StatusKind.READY:
                refusal = url_refusal(
                    package.signed_url, allow_http=self.settings.allow_http, what="signed URL"
                )
                if refusal:
                    raise JobError(refusal, code="url_not_allowed")
                await self._set(job, JobState.READY)
                return package
            empty_url_answers = empty_url_answers + 1 if kind is StatusKind.READY_WITHOUT_URL else 0
            if empty_url_answers >= MAX_EMPTY_URL_ANSWERS:
                raise ApiError(
                    f"status {package.status[:64]!r} came {MAX_EMPTY_URL_ANSWERS} times without a signed_url",
                    code="ready_without_url",
                    http_status=200,
                )
            await self._set(job, JobState.PREPARING)
            interval = next_poll_interval(
                interval,
                first=self.settings.poll_interval,
                maximum=self.settings.poll_max_interval,
                rng=self._rng,
            )
            if self._clock.monotonic() + interval > deadline:
                await self._clock.sleep(max(0.0, deadline - self._clock.monotonic()))
                raise PollTimeout(
                    f"package still {package.status[:64]!r} after poll_timeout "
                    f"({self.settings.poll_timeout:g} s)",
                    http_status=200,
                )
            await self._clock.sleep(interval)
            if self._stop_downloads:  # nothing could be downloaded: stop polling
                raise _Stop()

    async def _download(self, job: Job, package: PackageStatus) -> bool:
        """``ready`` -> ``downloading`` -> ``verifying`` -> ``done``.

        A package that fails verification is discarded and downloaded once more from 0 with the
        same URL (``verifying`` -> ``downloading``); a second failure fails the job.
        Returns False when the job must go back to ``requesting`` for a fresh signed URL.
        """
        while True:
            done = await self._download_once(job, package)
            if done is not None:
                return done

    async def _download_once(self, job: Job, package: PackageStatus) -> bool | None:
        """One transfer + verification; None means "verification failed once: go again"."""
        expiry = url_expiry(package.signed_url, received_at=package.server_time)

        def expired() -> bool:
            server_now = self._clock.wall() + package.clock_offset
            return is_url_expired(expiry, server_now=server_now)

        if expired() and self._refresh_allowed(job):
            self._refreshes[job.key] = self._refreshes.get(job.key, 0) + 1
            return False  # ready -> requesting, done by the next request cycle
        part = part_path(job.final)
        if job.record.state is not JobState.DOWNLOADING:
            await self._set(job, JobState.DOWNLOADING)
        await anyio.to_thread.run_sync(self._check_inside_out_dir, job.final)

        async def on_attempt(offset: int, etag: str | None, total: int | None) -> None:
            job.bytes_done = offset
            job.bytes_total = total
            await self._set(job, JobState.DOWNLOADING, part_etag=etag)

        def on_bytes(count: int) -> None:
            job.bytes_done += count
            self._observer.job_bytes(job, count)

        try:
            transfer = await self._downloader.transfer(
                package.signed_url,
                part,
                etag=job.record.part_etag,
                job_key=job.key,
                url_expired=expired,
                on_attempt=on_attempt,
                on_bytes=on_bytes,
            )
        except UrlRejected as exc:
            if not self._refresh_allowed(job):
                raise
            log.info(
                "job %s: %s; fetching a fresh signed URL", job.key[:12], self._redact(exc.message)
            )
            self._refreshes[job.key] = self._refreshes.get(job.key, 0) + 1
            return False  # downloading -> requesting, done by the next request cycle
        except LocalIOError:
            self._stop_downloads = True
            await anyio.to_thread.run_sync(discard_part, part)
            raise
        await self._set(job, JobState.VERIFYING)
        try:
            await anyio.to_thread.run_sync(verify_package, part, transfer)
            await anyio.to_thread.run_sync(commit_part, part, job.final)
        except VerificationError as exc:
            await anyio.to_thread.run_sync(discard_part, part)
            job.verify_failures += 1
            if job.verify_failures >= 2:
                raise
            log.info(
                "job %s: %s; downloading it again from 0",
                job.key[:12],
                exc.message,
                extra={"event": "verify_retry", "key": job.key, "error_code": exc.code},
            )
            await self._set(job, JobState.DOWNLOADING, part_etag=None)
            return None
        except (LocalIOError, OSError) as exc:
            # The disk failed us after the bytes arrived: same policy as during the transfer.
            self._stop_downloads = True
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_discard_quietly, part)
            if isinstance(exc, LocalIOError):
                raise
            raise LocalIOError(
                f"cannot read back or commit the package: {exc.strerror or type(exc).__name__}",
                code="local_io",
            ) from None
        await self._set(
            job,
            JobState.DONE,
            bytes=transfer.size,
            sha256=transfer.sha256,
            part_etag=None,
            error_code=None,
            error_message=None,
            error_http_status=None,
        )
        return True

    def _check_inside_out_dir(self, final: Path) -> None:
        """Refuse a final path that a symlink inside the output dir would send elsewhere.

        Raises:
            LocalIOError: ``path_escape``.
        """
        out_dir = self.settings.out_dir
        parent = final.parent
        # The nearest folder that exists, never above the output dir (which may not exist yet).
        while not parent.exists() and parent != out_dir and parent != parent.parent:
            parent = parent.parent
        if parent.exists() and not parent.resolve().is_relative_to(out_dir.resolve()):
            raise LocalIOError(
                f"{final.parent} leads outside the output dir (a symlink?); refusing to write",
                code="path_escape",
            )

    def _refresh_allowed(self, job: Job) -> bool:
        return self._refreshes.get(job.key, 0) < MAX_URL_REFRESHES

    # ----------------------------------------------------------------- helpers

    async def _set(
        self, job: Job, state: JobState, *, save: bool = True, **changes: object
    ) -> None:
        """Advance ``job`` to ``state`` (checked against the table), then save it."""
        if job.recovering and state is JobState.REQUESTING:
            job.recovering = False  # crash recovery: unfinished -> requesting, keep the .part
        else:
            advance(job.record.state, state)
        job.record = job.record.evolve(state=state, **changes)
        if save:
            await self._store.save(job.record)
        self._observer.job_state(job)

    async def _fail(self, job: Job, exc: JobError) -> None:
        job.outcome = Outcome.FAILED
        message = self._redact(exc.message)
        try:
            if job.record.state in (JobState.QUEUED, JobState.READY):
                await self._set(job, JobState.REQUESTING)
            await self._set(
                job,
                JobState.FAILED,
                error_code=exc.code,
                error_message=message,
                error_http_status=exc.http_status,
            )
        except JobError as store_error:  # the state store itself failed: report, don't crash
            log.error("job %s: cannot record its failure: %s", job.key[:12], store_error.message)
            job.record = job.record.evolve(
                error_code=exc.code, error_message=message, error_http_status=exc.http_status
            )

    def _result(self, job: Job) -> JobResult:
        record = job.record
        return JobResult(
            key=record.key,
            aoi_id=record.aoi_id,
            insight_id=record.insight_id,
            name=record.name,
            outcome=job.outcome,
            path=str(job.final),
            bytes=record.bytes,
            sha256=record.sha256,
            attempts=record.attempts,
            polls=record.polls,
            seconds=round(job.seconds, 3),
            error_code=record.error_code if job.outcome is Outcome.FAILED else None,
            error_message=record.error_message if job.outcome is Outcome.FAILED else None,
            error_http_status=record.error_http_status if job.outcome is Outcome.FAILED else None,
        )


class _Guarded:
    """Wraps an observer so that its bugs are logged and never stop a job."""

    def __init__(self, inner: RunObserver) -> None:
        self._inner = inner

    def job_state(self, job: Job) -> None:
        try:
            self._inner.job_state(job)
        except Exception as exc:  # pragma: no cover - a display bug must not fail the export
            log.error("progress observer failed: %s: %s", type(exc).__name__, exc)

    def job_bytes(self, job: Job, count: int) -> None:
        try:
            self._inner.job_bytes(job, count)
        except Exception as exc:  # pragma: no cover
            log.error("progress observer failed: %s: %s", type(exc).__name__, exc)

    def job_finished(self, result: JobResult) -> None:
        try:
            self._inner.job_finished(result)
        except Exception as exc:  # pragma: no cover
            log.error("progress observer failed: %s: %s", type(exc).__name__, exc)


def _discard_quietly(part: Path) -> None:
    try:
        discard_part(part)
    except OSError:
        pass  # the disk is failing: the next run removes or resumes it


def _intact(job: Job) -> bool:
    """A done job's file is present with the recorded size."""
    try:
        return job.final.stat().st_size == job.record.bytes
    except OSError:
        return False
