"""The async shell: runs every job of a manifest on a worker pool, under the shared rate limit.

The shell decides nothing about a job. For each job it feeds events to the job machine
(:func:`batch_export.lifecycle.step`), saves the value the machine returns to the
:class:`~batch_export.store.JobStore` before anything else happens, and then performs the actions
the machine asked for, each of which ends in the next event::

    event -> step -> save -> actions -> (I/O) -> event -> ...

Resources are the shell's: a job holds an *in-flight* slot while it is requested and polled, then a
*download* slot while it streams, verifies and uploads (a polling job holds no download slot).
A failing job fails alone: its errors are caught inside its own task and never cancel the task group.

Hooks for what builds on it: :meth:`Runner._make_downloader` (segmented downloads), the
``uploader`` (object-store output; the machine's ``uploading`` rows), and per-job ``sources``
(``"exports[3]"``, ``"discover[0]"``) that reach :class:`~batch_export.types.JobResult`.
"""

from __future__ import annotations

import functools
import logging
import os
import random
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final, Protocol

import anyio

from batch_export.api import API_CONNECTIONS, PackageStatus, PixxelClient
from batch_export.breaker import Breaker, Verdict, interleave_by_aoi
from batch_export.clock import Clock, SystemClock
from batch_export.download import Downloader
from batch_export.errors import (
    BatchExportError,
    IllegalTransition,
    JobError,
    LocalIOError,
    UrlRejected,
    VerificationError,
)
from batch_export.http import HttpSession, SessionFactory, open_sessions
from batch_export.lifecycle import (
    Aborted,
    Action,
    Admitted,
    Answered,
    AwaitDownloadSlot,
    AwaitRequestSlot,
    BytesEnded,
    DiscardPart,
    Download,
    DownloadSlotFree,
    Event,
    Finish,
    Inform,
    JobValue,
    Loaded,
    LocalFailed,
    PollDeadline,
    RequestFailed,
    RequestSlotFree,
    Rules,
    SendPut,
    Skip,
    StopDownloads,
    StorageRefused,
    TimeOut,
    TransferFailed,
    TransferStarted,
    Upload,
    Uploaded,
    UploadFailed,
    Verified,
    Verify,
    VerifyFailed,
    Wait,
    is_url_expired,
    job_key,
    step,
    uncounted,
    url_expiry,
)
from batch_export.manifest import ExportSpec
from batch_export.ownership import index_paths, stored_clash
from batch_export.partfile import commit_part, discard_part, local_io_error, part_path
from batch_export.partlock import PartBusy, part_held
from batch_export.ratelimit import RateLimiter
from batch_export.redact import Redactor
from batch_export.segments import SegmentState
from batch_export.stop import StopController
from batch_export.store import JobStore
from batch_export.types import (
    Discovered,
    Job,
    JobRecord,
    JobResult,
    JobState,
    Outcome,
    Problem,
    RunObserver,
    RunResult,
    Settings,
    Transfer,
)
from batch_export.verify import verify_package

__all__ = [
    "Job",
    "JobResult",
    "Outcome",
    "RunObserver",
    "RunResult",
    "Runner",
    "Settings",
    "Uploader",
]

log = logging.getLogger("batch_export")

#: The error code of the state store failing (``store.SqliteStore``): the run stops, no job fails.
STATE_STORE = "state_store"


class Uploader(Protocol):
    """Uploads a staged, verified package to the object store (SPEC §8)."""

    async def upload(
        self, job: Job, staged: Path, on_bytes: Callable[[int], None] | None = None
    ) -> None:
        """Upload ``staged`` as ``job``'s object; return once the store confirmed it.

        ``on_bytes(n)``: ``n`` more bytes confirmed by the store (progress).

        Raises:
            JobError: the upload failed (the job fails with its code).
        """
        ...

    def location(self, relpath: str) -> str:
        """Return where the package at output path ``relpath`` ends up (``s3://bucket/key``)."""
        ...

    async def confirm(self, records: list[JobRecord]) -> set[str]:
        """Return the keys of the done jobs whose objects still count as present.

        Raises nothing for a missing object: it is simply not in the set (and is exported again).
        """
        ...

    async def staged_intact(self, record: JobRecord, staged: Path) -> bool:
        """Tell whether a failed job's staged file is still its verified package (size, sha256)."""
        ...

    @property
    def requests_sent(self) -> int:
        """Requests sent to the object store so far (every attempt)."""
        ...


class _Stop(Exception):
    """Downloads were stopped (local disk failure): leave the job pending."""


@dataclass(slots=True)
class _Context:
    """What the shell keeps about a job between actions: facts for I/O, never for decisions."""

    part: Path
    package: PackageStatus | None = None
    expiry: tuple[float, float] | None = None
    transfer: Transfer | None = None


class _Slots:
    """The one slot a job holds at a time: in-flight (requesting, polling) or download."""

    def __init__(self) -> None:
        self.held: anyio.Semaphore | None = None

    async def take(self, slot: anyio.Semaphore) -> bool:
        """Hold ``slot`` (releasing the other one); True if it had to be acquired."""
        if self.held is slot:
            return False
        self.release()
        await slot.acquire()
        self.held = slot
        return True

    def release(self) -> None:
        if self.held is not None:
            self.held.release()
            self.held = None


class Runner:
    """Runs a list of exports to completion.

    Args:
        settings: the run's :class:`Settings`.
        specs: the exports (from the manifest; already sharded if sharding).
        api_key: the raw API key (never logged; only sent to the API origin).
        store: where job records are saved.
        observer: progress receiver.
        redactor: scrubs secrets from every message before it reaches the store or a log.
        clock: time source (tests inject one).
        rng: randomness for jitter (tests seed one).
        max_runtime: seconds after which the run stops taking work and checkpoints (exit 3).
        sources: per spec, where it came from (``"exports[3]"``); default: each spec's own
            ``source`` (the manifest's index, kept through sharding and merging).
        uploader: uploads verified packages (object-store output); None: local output.
        discover: called with the run's API client once the sessions are open, before any job
            starts (SPEC §7): its jobs follow ``specs``, its failures fail without a request, its
            entries go to ``RunResult.discovery``. None: no discovery.
        sessions: opens the run's HTTP sessions (default :func:`~batch_export.http.open_sessions`;
            tests pass a fake transport).
        stop: the run's stop controller (signals, cancellation); a fresh one by default.
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
        sources: Sequence[str] | None = None,
        uploader: Uploader | None = None,
        discover: Callable[[PixxelClient], Awaitable[Discovered]] | None = None,
        sessions: SessionFactory | None = None,
        stop: StopController | None = None,
    ) -> None:
        self.settings = settings
        self.specs = list(specs)
        self.sources = (
            list(sources)
            if sources is not None
            else [spec.source or f"exports[{n}]" for n, spec in enumerate(self.specs)]
        )
        self._key = api_key
        self._store = store
        self._observer = _Guarded(observer)
        self._redact = redactor or Redactor([api_key])
        self._clock = clock or SystemClock()
        self._rng = rng or random.Random()
        self._uploader = uploader
        self._discover = discover
        self._open_sessions = sessions or open_sessions
        self._discovered = Discovered()
        self._preset: dict[int, Problem] = {}  # index into specs -> fails without a request
        self._rules = Rules(
            poll_interval=settings.poll_interval,
            poll_max_interval=settings.poll_max_interval,
            poll_timeout=settings.poll_timeout,
            vocabulary=settings.vocabulary,
            allow_http=settings.allow_http,
            object_store=uploader is not None,
            give_up_after=settings.give_up_after,
            retry_abandoned=settings.retry_abandoned,
            rng=self._rng,
        )
        self._abandoned_before: set[str] = set()  # keys abandoned when the run started
        self._breaker = Breaker()
        self._held: dict[str, _Held] = {}  # jobs whose outcome waits for the breaker's verdict
        self._limiter = _GatedLimiter(settings.rate, clock=self._clock, breaker=self._breaker)
        self._in_flight = anyio.Semaphore(settings.in_flight)
        self._download_slots = anyio.Semaphore(settings.downloads)
        self._stop_downloads = False
        self._values: dict[str, JobValue] = {}
        self._fatal: Problem | None = None  # the state store failed: the run stopped
        self._max_runtime = max_runtime
        self._jobs_scope: anyio.CancelScope | None = None  # made inside the event loop
        self._discovery_scope: anyio.CancelScope | None = None  # while the listings go on
        self._listings_stopped = False  # a stop ended the listings (their jobs are unknown)
        self.stop = stop or StopController()
        self.stop.on_stop(self._cancel_jobs)
        self.jobs: list[Job] = []

    @property
    def stopped_by(self) -> str | None:
        """Why the run stopped early (see :class:`~batch_export.stop.StopController`), or None."""
        return self.stop.reason

    @property
    def limiter(self) -> RateLimiter:
        """The shared rate limiter (for progress displays)."""
        return self._limiter

    async def run(self) -> RunResult:
        """Run every job; return when each has an outcome. Never raises for a job's failure."""
        started = self._clock.monotonic()
        async with self._open_sessions(
            api_connections=min(self.settings.in_flight, API_CONNECTIONS),
            # SPEC §4: downloads x connections storage connections at most
            storage_connections=max(4, self.settings.downloads * self.settings.connections),
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
            self._client.stats.listener = self._api_answered
            self._downloader = self._make_downloader(storage_session)
            async with anyio.create_task_group() as watchers:
                if self._max_runtime is not None:  # the listings count toward it too
                    watchers.start_soon(self._stop_at, started + self._max_runtime)
                await self._discover_jobs()
                await self._prepare_jobs()
                await self._run_all()
                watchers.cancel_scope.cancel()
            await self._settle_held()
        return RunResult(
            jobs=tuple(self._result(job) for job in self.jobs),
            api_requests=self._client.stats.sent,
            storage_requests=self._downloader.requests_sent,
            throttled=self._client.stats.throttled,
            wall_seconds=self._clock.monotonic() - started,
            stopped_by=self.stopped_by,
            fatal=self._fatal,
            api_by_status=dict(self._client.stats.by_status or {}),
            breaker=self._breaker_report(),
            discovery=self._discovered.entries,
            store_requests=self._uploader.requests_sent if self._uploader is not None else 0,
            listings_stopped=self._listings_stopped,
        )

    def _make_downloader(self, session: HttpSession) -> Downloader:
        """The storage side: one :class:`Downloader` for every job of the run."""
        return Downloader(
            session,
            clock=self._clock,
            retries=self.settings.retries,
            read_timeout=self.settings.read_timeout,
            allow_http=self.settings.allow_http,
            backoff_base=self.settings.backoff_base,
            backoff_cap=self.settings.backoff_cap,
            rng=self._rng,
        )

    async def _run_all(self) -> None:
        """Admit jobs (bounded) round-robin over their AOIs, until all ran or a stop was requested.

        Round-robin (:func:`~batch_export.breaker.interleave_by_aoi`) so that a bad key shows as
        403s across AOIs within the first few requests, whatever the manifest's order.
        """
        admission = anyio.Semaphore(self.settings.in_flight + self.settings.downloads)
        self._jobs_scope = anyio.CancelScope()
        if self.stop.requested:
            self._jobs_scope.cancel()
        with self._jobs_scope:
            async with anyio.create_task_group() as tg:
                for job in interleave_by_aoi(self.jobs, lambda job: job.spec.aoi_id):
                    if job.outcome in (Outcome.SKIPPED, Outcome.FAILED, Outcome.ABANDONED):
                        continue
                    await admission.acquire()
                    tg.start_soon(self._run_job, job, admission)

    async def _discover_jobs(self) -> None:
        """Add the discover: selectors' jobs; a stop (signal, time budget) ends the listings.

        Stopped, the run has no discovered job (they are known only once the listings end); its
        explicit jobs are left pending like every job a stop leaves, and the next run lists again.
        """
        if self._discover is None:
            return
        with anyio.CancelScope() as scope:
            self._discovery_scope = scope
            if self.stop.requested:
                scope.cancel()
            discovered = await self._discover(self._client)
        self._discovery_scope = None
        self._sent_all("")  # the listings' attempts hold no probe place
        if scope.cancelled_caught:
            self._listings_stopped = True
            log.info("stopped during the discover: listings; the next run lists again")
            return
        self._discovered = discovered
        first = len(self.specs)
        self._preset = {first + i: p for i, p in discovered.failures.items()}
        self.specs.extend(discovered.specs)
        self.sources.extend(discovered.sources)

    def request_stop(self, reason: str) -> None:
        """Stop for ``reason`` (see :meth:`StopController.request`)."""
        self.stop.request(reason)

    def _cancel_jobs(self) -> None:
        """Admit no new job and cancel the running ones at their current step.

        Every transition is already saved and ``.part`` files are kept, so the next run resumes.
        """
        if self._jobs_scope is not None:
            self._jobs_scope.cancel()
        if self._discovery_scope is not None:
            self._discovery_scope.cancel()

    async def _stop_at(self, deadline: float) -> None:
        await self._clock.sleep(max(0.0, deadline - self._clock.monotonic()))
        self.stop.request("max_runtime")

    # ----------------------------------------------------------------- set-up

    async def _prepare_jobs(self) -> None:
        """Load or create each job's record and let the machine decide what this run does with it.

        A failed/done job re-queued here is kept in memory only: a crash before its next (saved)
        step leaves it failed/done, which the next run re-queues the same way. Saving 100,000 of
        these one by one would cost minutes.
        """
        keys = [job_key(spec) for spec in self.specs]
        try:
            stored = await self._store.load_many(keys)
            owners = index_paths(await self._store.all_records())  # earlier runs' paths
        except JobError as exc:
            if exc.code != STATE_STORE:
                raise
            self._store_failed(None, exc)  # nothing will run: every job stays pending
            stored, owners = {}, {}
        run_keys = frozenset(keys)
        force = self.settings.force
        confirmed = None  # object-store output: done objects the uploader takes as present
        if self._uploader is not None and not force:
            done = [record for record in stored.values() if record.state is JobState.DONE]
            confirmed = await self._uploader.confirm(done)
        for index, (spec, key, source) in enumerate(
            zip(self.specs, keys, self.sources, strict=True)
        ):
            final = self.settings.out_dir / spec.relpath
            record = stored.get(key) or JobRecord(
                key=key,
                aoi_id=spec.aoi_id,
                insight_id=spec.insight_id,
                name=spec.name,
                relpath=spec.relpath,
            )
            job = Job(spec=spec, final=final, record=record, source=source)
            self.jobs.append(job)
            intact = (
                record.state is JobState.DONE
                and not force
                and (key in confirmed if confirmed is not None else _intact(job))
            )
            staged = (
                self._uploader is not None
                and record.state is JobState.FAILED
                and not force
                and await self._uploader.staged_intact(record, final)
            )
            value, actions = step(JobValue(record), Loaded(intact, force, staged), self._rules)
            self._values[key] = value
            if Skip() in actions:
                job.outcome = Outcome.SKIPPED
                self._observer.job_finished(self._result(job))
            elif Finish(Outcome.ABANDONED) in actions:  # given up on in an earlier run
                job.outcome = Outcome.ABANDONED
                self._abandoned_before.add(key)
                self._observer.job_finished(self._result(job))
            elif index in self._preset:  # discovered, but cannot run (no_listed_assets, path_clash)
                await self._abort(job, self._preset[index])
                self._observer.job_finished(self._result(job))
            elif clash := stored_clash(
                spec.relpath,
                key=key,
                aoi_id=spec.aoi_id,
                insight_id=spec.insight_id,
                stored=owners,
                run_keys=run_keys,
            ):  # another job's file in the state store: never replaced
                await self._abort(job, clash)
                self._observer.job_finished(self._result(job))
            elif value.record is not record:
                job.record = value.record
                self._observer.job_state(job)

    # ----------------------------------------------------------------- one job

    async def _run_job(self, job: Job, admission: anyio.Semaphore) -> None:
        job.started = self._clock.monotonic()
        _CURRENT_JOB.set(job.key)  # this task's API attempts are this job's (the breaker's gate)
        try:
            job.outcome = await self._drive(job)
        except _Stop:
            job.outcome = Outcome.PENDING
        except JobError as exc:
            if exc.code == STATE_STORE:
                self._store_failed(job, exc)
            else:
                await self._abort(job, self._problem(exc))
        except Exception as exc:  # a bug: this job fails, the run goes on
            log.error(
                "internal error in job %s: %s",
                job.key[:12],
                self._redact(f"{type(exc).__name__}: {exc}"),
            )
            await self._abort(job, Problem("internal_error", "internal error (a bug)"))
        finally:
            job.seconds = self._clock.monotonic() - job.started
            admission.release()
            self._sent_all(job.key)
            held = self._held.get(job.key)
            if held is not None:  # its outcome waits for the breaker's verdict
                held.finished = True
            else:
                self._observer.job_finished(self._result(job))

    async def _drive(self, job: Job) -> Outcome:
        """Feed the job's events to the machine and perform its actions, until an outcome."""
        context = _Context(part=part_path(job.final))
        slots = _Slots()
        try:
            actions = deque(await self._step(job, Admitted()))
            while actions:
                action = actions.popleft()
                if isinstance(action, Finish):
                    return action.outcome
                event = await self._perform(job, action, context, slots)
                if event is not None:
                    actions.extend(await self._step(job, event))
            raise IllegalTransition(f"the machine left job {job.key[:12]} without an outcome")
        finally:
            slots.release()

    async def _step(self, job: Job, event: Event) -> tuple[Action, ...]:
        """One machine step; a changed record is redacted, saved, then announced."""
        before = self._values[job.key]
        value, actions = step(before, event, self._rules)
        if value.record is not before.record:
            message = value.record.error_message
            if message is not None and message != before.record.error_message:
                redacted = self._redact(message)
                if redacted != message:
                    value = replace(value, record=value.record.evolve(error_message=redacted))
            self._values[job.key] = value
            job.record = value.record
            await self._store.save(value.record)
            self._observer.job_state(job)
        else:
            self._values[job.key] = value
        return actions

    async def _perform(
        self, job: Job, action: Action, context: _Context, slots: _Slots
    ) -> Event | None:
        """Carry out one action; return the event it ended in (None: nothing to report)."""
        match action:
            case AwaitRequestSlot():
                slots.release()
                if self._stop_downloads:
                    raise _Stop()
                await slots.take(self._in_flight)
                return RequestSlotFree(now=self._clock.monotonic())
            case SendPut(after=after, deadline=deadline):
                if after > 0:
                    await self._clock.sleep(after)
                    if self._stop_downloads:  # nothing could be downloaded: stop polling
                        raise _Stop()
                return await self._send_put(job, context, deadline)
            case TimeOut(after=after):
                await self._clock.sleep(after)
                return PollDeadline()
            case Wait(after=after):
                await self._clock.sleep(after)
                return None
            case AwaitDownloadSlot():
                if await slots.take(self._download_slots) and self._stop_downloads:
                    raise _Stop()
                return DownloadSlotFree(url_expired=self._url_expired(context))
            case Download(etag=etag):
                return await self._download(job, context, etag)
            case Verify():
                return await self._verify(job, context)
            case Upload():
                await slots.take(self._download_slots)
                return await self._upload(job, context)
            case DiscardPart():
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(_discard_quietly, context.part, self._write_root)
                    await self._store.save_segments(job.key, None)
                return None
            case StopDownloads():
                self._stop_downloads = True
                return None
            case Inform(message=message, event=name, code=code):
                extra = {"event": name, "key": job.key, "error_code": code} if name else None
                log.info("job %s: %s", job.key[:12], message, extra=extra)
                return None
        raise IllegalTransition(f"{type(action).__name__} cannot be performed")

    # ----------------------------------------------------------------- actions

    async def _send_put(self, job: Job, context: _Context, deadline: float) -> Event:
        try:
            package = await self._client.request_package(
                job.spec, deadline=deadline, job_key=job.key
            )
        except JobError as exc:
            problem = self._problem(exc)
            self._heed(
                job,
                self._breaker.request_failed(
                    job.key,
                    aoi=job.spec.aoi_id,
                    http_status=problem.http_status,
                    code=problem.code,
                    message=problem.message,
                ),
            )
            return RequestFailed(problem)
        context.package = package
        context.expiry = url_expiry(package.signed_url, received_at=package.server_time)
        return Answered(package.status, package.signed_url, now=self._clock.monotonic())

    def _url_expired(self, context: _Context) -> bool:
        """The signed URL is known to be expired, judged on the server's clock (SPEC §4)."""
        if context.package is None:
            return False
        server_now = self._clock.wall() + context.package.clock_offset
        return is_url_expired(context.expiry, server_now=server_now)

    async def _download(self, job: Job, context: _Context, etag: str | None) -> Event:
        try:
            await anyio.to_thread.run_sync(self._check_inside_out_dir, job.final)
        except LocalIOError as exc:
            return await self._local_failed(exc, "path")
        except OSError as exc:
            return await self._local_failed(local_io_error(exc), "path")
        assert context.package is not None  # a download follows a ready answer

        async def on_attempt(offset: int, etag: str | None, total: int | None) -> None:
            job.bytes_done = offset
            job.bytes_total = total
            await self._step(job, TransferStarted(etag))

        def on_bytes(count: int) -> None:
            job.bytes_done += count
            self._observer.job_bytes(job, count)

        async def on_segments(state: SegmentState | None) -> None:
            await self._store.save_segments(job.key, state)

        try:
            segments = await self._store.load_segments(job.key) if etag is not None else None
            context.transfer = await self._downloader.transfer(
                context.package.signed_url,
                context.part,
                etag=etag,
                job_key=job.key,
                url_expired=lambda: self._url_expired(context),
                on_attempt=on_attempt,
                on_bytes=on_bytes,
                connections=self.settings.connections,
                segment_min=self.settings.segment_min,
                segments=segments,
                on_segments=on_segments,
                root=self._write_root,
            )
        except PartBusy as exc:  # another process writes this .part: not this job's failure
            self._part_busy(job, exc)
            raise _Stop() from None
        except UrlRejected as exc:
            return StorageRefused(self._problem(exc))
        except LocalIOError as exc:
            return await self._local_failed(exc, "transfer")
        except JobError as exc:
            return TransferFailed(self._problem(exc))
        return BytesEnded()

    async def _verify(self, job: Job, context: _Context) -> Event:
        transfer = context.transfer
        assert transfer is not None  # verification follows the transfer
        try:
            with part_held(context.part):  # no other process empties it while it is checked
                await anyio.to_thread.run_sync(verify_package, context.part, transfer)
                await anyio.to_thread.run_sync(
                    functools.partial(commit_part, context.part, job.final, root=self._write_root)
                )
            await self._store.save_segments(job.key, None)
        except PartBusy as exc:
            self._part_busy(job, exc)
            raise _Stop() from None
        except VerificationError as exc:
            return VerifyFailed(self._problem(exc))
        except LocalIOError as exc:
            return await self._local_failed(exc, "verify")
        except OSError as exc:  # the disk failed us after the bytes arrived
            return await self._local_failed(local_io_error(exc), "verify")
        return Verified(size=transfer.size, sha256=transfer.sha256)

    def _part_busy(self, job: Job, exc: PartBusy) -> None:
        """Another process holds the job's ``.part``: one line naming it; the job stays pending."""
        log.warning(
            "pending     %s/%s (%s): %s",
            job.spec.aoi_id,
            job.spec.insight_id,
            job.spec.name,
            self._redact(exc.message),
            extra={"event": "part_busy", "key": job.key, "error_code": exc.code},
        )

    async def _upload(self, job: Job, context: _Context) -> Event:
        if self._uploader is None:
            raise IllegalTransition("an upload was asked for, but the output is local")
        try:
            await self._uploader.upload(
                job, job.final, lambda count: self._observer.job_uploaded(job, count)
            )
        except JobError as exc:
            problem = self._problem(exc)
            if problem.code == "store_auth":  # the credentials, not this job (SPEC §8, §9)
                self._heed(job, self._breaker.store_refused(job.key, message=problem.message))
            return UploadFailed(problem)
        return Uploaded()

    async def _local_failed(self, exc: LocalIOError, during: str) -> LocalFailed:
        """The event of a local failure, with the fact the machine needs to judge whose it is.

        Raises:
            LocalIOError: ``exc`` itself when it is the state store's (the run stops, see
                :meth:`_store_failed`), not the package's.
        """
        if exc.code == STATE_STORE:
            raise exc
        writable = True
        if exc.code == "permission_denied":
            writable = await anyio.to_thread.run_sync(os.access, self.settings.out_dir, os.W_OK)
        return LocalFailed(self._problem(exc), during=during, output_writable=writable)

    def _store_failed(self, job: Job | None, exc: JobError) -> None:
        """The state store failed mid-run (its disk full, an I/O error): stop the run cleanly.

        Nothing more can be recorded, so nothing more is done: the job stays pending (its last
        committed state is what the next run resumes), and the run ends with exit code 1, writing
        the report and metrics wherever their own paths still work.
        """
        if job is not None:
            job.outcome = Outcome.PENDING
        if self._fatal is None:
            self._fatal = Problem(STATE_STORE, self._redact(exc.message))
            log.error(
                "the state store failed: %s; stopping the run (the next run resumes from what was "
                "saved)",
                self._fatal.message,
                extra={"event": "run_error", "error_code": STATE_STORE},
            )
        self.stop.request(STATE_STORE)

    @property
    def _write_root(self) -> Path:
        """The folder below which no path component may be a symlink when packages are written.

        The output dir (the operator's; it may itself be a link), except for the default staging
        folder of an object-store output, ``<state-dir>/staging``: it is the state dir's, checked
        for a link at start and, through this root, at every write (a link made mid-run).
        """
        settings = self.settings
        if settings.out_url is not None and settings.out_dir == settings.state_dir / "staging":
            return settings.state_dir
        return settings.out_dir

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

    # ----------------------------------------------------------------- breaker

    def _api_answered(self, status: int) -> None:
        """Every API attempt's outcome (HTTP status; 0: no answer), from the client's counters."""
        if status == 0:
            self._breaker.no_answer(_CURRENT_JOB.get())
        else:
            self._heed(None, self._breaker.answered(status))
        self._limiter.changed()

    def _sent_all(self, job: str) -> None:
        """``job`` (``""``: the discover: listings) sends no more API requests: free its probe."""
        self._breaker.done(job)
        self._limiter.changed()

    def _heed(self, job: Job | None, verdict: Verdict) -> None:
        """Act on the breaker's verdict: hold ``job``'s outcome, release others, or stop the run."""
        if verdict.held and job is not None:
            self._held[job.key] = _Held(job, self._values[job.key])
        for key in verdict.released:
            held = self._held.pop(key, None)
            if held is not None and held.finished:
                self._observer.job_finished(self._result(held.job))
        if verdict.opened is not None:
            log.error(
                "circuit breaker open: %s; no more requests are sent, unfinished jobs are left "
                "pending for the next run",
                verdict.opened.describe(),
                extra={"event": "breaker_open", "error_code": verdict.opened.code},
            )
            self.request_stop("breaker")
        self._limiter.changed()

    async def _settle_held(self) -> None:
        """The held jobs: pending, as before their failing step, if the breaker opened; else failed.

        Undoing the step is the breaker's one rule: the failure was not the job's, so the job is
        left as it stood before it (``requesting``/``preparing``, or ``uploading``), which the next
        run resumes like the state an interrupted run leaves.
        A held 401/403 failure of a run in which no answer accepted the key fails without counting
        toward abandoning the job (:func:`~batch_export.lifecycle.uncounted`).
        """
        await self._prove_key()
        held, self._held = self._held, {}
        doubted = 0
        for entry in held.values():
            job = entry.job
            if self._breaker.opened is not None:
                await self._revise(job, entry.before, Outcome.PENDING)
            elif self._key_in_doubt(self._values[job.key]):
                await self._revise(job, uncounted(self._values[job.key]), Outcome.FAILED)
                doubted += 1
            if entry.finished:
                self._observer.job_finished(self._result(job))
        if doubted:
            log.warning(
                "%d job(s) failed with HTTP 401/403 and no answer of this run accepted the API key: "
                "check the key; these failures do not count toward abandoning the jobs",
                doubted,
            )

    async def _prove_key(self) -> None:
        """Held 401/403 failures and no answer accepted the key: ask the API once, cheaply.

        One ``GET /v0/aois?offset=0&limit=1`` (SPEC §7's listing; one request, counted as every
        other): a 200 proves the key, so the breaker releases the held jobs and their 403s count
        as their own (a forbidden AOI is abandoned in time); any failure leaves them in doubt.
        Not when the breaker opened or the run is being stopped.
        """
        if self._breaker.opened is not None or self._breaker.key_proven or self.stop.requested:
            return
        if not any(self._key_in_doubt(self._values[key]) for key in self._held):
            return
        with anyio.CancelScope(shield=True):
            try:
                await self._client.request_json(
                    "GET",
                    "/v0/aois",
                    params={"offset": "0", "limit": "1"},
                    deadline=self._clock.monotonic() + _KEY_PROBE_SECONDS,
                )
            except BatchExportError as exc:
                log.debug("the key check GET /v0/aois failed: %s", exc.message)

    def _key_in_doubt(self, value: JobValue) -> bool:
        """A 401/403 failure in a run where no answer accepted the key: maybe the key, not the job."""
        record = value.record
        return (
            not self._breaker.key_proven
            and record.state in (JobState.FAILED, JobState.ABANDONED)
            and record.error_http_status in (401, 403)
        )

    async def _revise(self, job: Job, value: JobValue, outcome: Outcome) -> None:
        """Replace the held job's last step with ``value`` (the breaker's verdict), and save it."""
        self._values[job.key] = value
        job.record = value.record
        job.outcome = outcome
        with anyio.CancelScope(shield=True):
            try:
                await self._store.save(job.record)
            except JobError as exc:
                log.error("job %s: cannot record it %s: %s", job.key[:12], outcome, exc.message)

    def _breaker_report(self) -> dict[str, object] | None:
        """The report's ``breaker`` entry: why it opened and what it cost; None while closed."""
        opened = self._breaker.opened
        if opened is None:
            return None
        return {
            "cause": str(opened.cause),
            "code": opened.code,
            "http_status": opened.http_status,
            "jobs_in_a_row": opened.jobs,
            "aois": opened.aois,
            "message": opened.message,
            "api_requests": self._client.stats.sent,
            "pending": sum(1 for job in self.jobs if job.outcome is Outcome.PENDING),
        }

    # ----------------------------------------------------------------- helpers

    def _problem(self, exc: JobError) -> Problem:
        """The report's view of ``exc``, redacted."""
        return Problem(exc.code, self._redact(exc.message), exc.http_status)

    async def _abort(self, job: Job, problem: Problem) -> None:
        """Fail ``job`` with an error that has no row of its own; a store failure is logged.

        The machine may abandon it instead (a code no retry can fix, ``give_up_after`` runs).
        """
        job.outcome = Outcome.FAILED
        try:
            actions = await self._step(job, Aborted(problem))
            job.outcome = next(
                (action.outcome for action in actions if isinstance(action, Finish)),
                Outcome.FAILED,
            )
        except JobError as store_error:  # the state store itself failed: stop, don't crash
            log.error("job %s: cannot record its failure: %s", job.key[:12], store_error.message)
            self._store_failed(job, store_error)

    def _result(self, job: Job) -> JobResult:
        record = job.record
        failed = job.outcome in (Outcome.FAILED, Outcome.ABANDONED)  # both with their last error
        return JobResult(
            key=record.key,
            aoi_id=record.aoi_id,
            insight_id=record.insight_id,
            name=record.name,
            outcome=job.outcome,
            path=self._uploader.location(job.spec.relpath) if self._uploader else str(job.final),
            bytes=record.bytes,
            sha256=record.sha256,
            attempts=record.attempts,
            polls=record.polls,
            seconds=round(job.seconds, 3),
            error_code=record.error_code if failed else None,
            error_message=record.error_message if failed else None,
            error_http_status=record.error_http_status if failed else None,
            source=job.source,
            abandoned_now=job.outcome is Outcome.ABANDONED
            and job.key not in self._abandoned_before,
        )


#: At most this long (seconds) for the one key check at the end of a run (:meth:`Runner._prove_key`).
_KEY_PROBE_SECONDS: Final = 30.0

#: The job whose task is running (each job runs in its own task): names API attempts for the breaker.
_CURRENT_JOB: ContextVar[str] = ContextVar("batch_export_job", default="")


@dataclass(slots=True)
class _Held:
    """A job whose failure counts toward opening the breaker; its value before that failure."""

    job: Job
    before: JobValue
    finished: bool = False  # its task ended; its outcome is not yet announced


class _GatedLimiter(RateLimiter):
    """The shared limiter, with the breaker's gate in front of every API request (SPEC §9).

    A request waits while the breaker keeps its job back (the API looks unreachable and the job is
    not one of the probes), and is never sent once the breaker is open; the gate is asked again
    after the limiter's turn, so requests queued before the API went quiet are held back too.
    """

    def __init__(self, rate: float, *, clock: Clock, breaker: Breaker) -> None:
        super().__init__(rate, clock=clock)
        self._breaker = breaker
        self._changed: anyio.Event | None = None

    def changed(self) -> None:
        """The breaker's state changed: waiters look again."""
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def acquire(self, *, deadline: float | None = None) -> bool:
        """Wait for the gate, then for the turn (see :meth:`RateLimiter.acquire`)."""
        job = _CURRENT_JOB.get()
        while True:
            while not self._breaker.may_send(job):
                if self._changed is None:
                    self._changed = anyio.Event()
                await self._changed.wait()
            if not await super().acquire(deadline=deadline):
                return False
            if self._breaker.may_send(job):
                return True


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

    def job_uploaded(self, job: Job, count: int) -> None:
        # Optional (object-store output): observers without it are not told (SPEC §8).
        try:
            uploaded = getattr(self._inner, "job_uploaded", None)
            if uploaded is not None:
                uploaded(job, count)
        except Exception as exc:  # pragma: no cover
            log.error("progress observer failed: %s: %s", type(exc).__name__, exc)

    def job_finished(self, result: JobResult) -> None:
        try:
            self._inner.job_finished(result)
        except Exception as exc:  # pragma: no cover
            log.error("progress observer failed: %s: %s", type(exc).__name__, exc)


def _discard_quietly(part: Path, root: Path | None = None) -> None:
    try:
        discard_part(part, root=root)
    except (LocalIOError, OSError):
        pass  # the disk is failing: the next run removes or resumes it


def _intact(job: Job) -> bool:
    """A done job's file is present with the recorded size."""
    try:
        return job.final.stat().st_size == job.record.bytes
    except OSError:
        return False
