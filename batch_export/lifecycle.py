"""The pure job lifecycle: states, the transition table, the job machine and timing rules (SPEC §4).

Nothing here does I/O or sleeps. The job machine works as h11's ``_state.py`` does: the runner
(:mod:`batch_export.runner`) feeds it one *event* at a time (an answer arrived, bytes ended, a slot
is free, …) and :func:`step` returns the job's next value and the *actions* to perform, in order::

    step(JobValue, Event, Rules) -> (JobValue', tuple[Action, ...])

Every rule of SPEC §4 is a row of :data:`ROWS`, which :func:`step` looks up; the counters the rules
need (empty-URL answers, URL refreshes, verification failures, local retries, the poll interval, the
time used of ``poll_timeout``) live in the :class:`JobValue`, next to the durable
:class:`~batch_export.types.JobRecord` the runner saves.

Events (what happened) and the actions a row answers with:

==========================  =====================================================================
event                       rows (state -> state: actions)
==========================  =====================================================================
``Loaded``                  done with its file intact -> ``Skip``; failed/done/abandoned -> queued
                            (in memory); failed with its verified package still staged (object-store
                            output) -> uploading (in memory); unfinished -> marked for crash recovery
``Admitted``                queued/unfinished -> ``AwaitRequestSlot``; uploading (crash, or a
                            failed upload's staged file) -> ``Upload``
``RequestSlotFree``         queued/ready/downloading -> requesting (a new request cycle);
                            unfinished after a crash -> requesting (recovery, ``.part`` kept):
                            ``SendPut(after=0)``
``Answered``                requesting/preparing -> ready: ``AwaitDownloadSlot``; -> preparing:
                            ``SendPut(after=poll wait)`` or ``TimeOut`` at ``poll_timeout``; ->
                            failed (failed status, 3rd empty URL, URL not allowed)
``RequestFailed``           requesting/preparing -> failed (400/403, retries spent, …)
``PollDeadline``            preparing -> failed (``poll_timeout``)
``DownloadSlotFree``        ready/downloading -> downloading: ``Download``; URL known expired (≤3
                            refreshes) -> ``AwaitRequestSlot`` (then requesting)
``TransferStarted``         downloading -> downloading (resume; the ``.part``'s ETag recorded)
``StorageRefused``          downloading -> ``AwaitRequestSlot`` (≤3 refreshes) / failed
``TransferFailed``          downloading -> failed (``.part`` kept for a later resume)
``LocalFailed``             disk full/read-only -> failed, ``DiscardPart``, ``StopDownloads``; no
                            file descriptor left -> ``Wait``, then the same again (≤5); the job's
                            own path -> failed alone
``BytesEnded``              downloading -> verifying: ``Verify``
``Verified``                verifying -> done: ``Finish(downloaded)``; object-store output ->
                            uploading: ``Upload``
``VerifyFailed``            verifying -> downloading: ``DiscardPart``, ``AwaitDownloadSlot`` (once);
                            -> failed the second time
``Uploaded``                uploading -> done: ``Finish(downloaded)``
``UploadInterrupted``       uploading -> uploading: ``Upload`` (resume from the staged file)
``UploadFailed``            uploading -> failed
``Aborted``                 any -> failed (an error with no row of its own, e.g. a bug)
==========================  =====================================================================

An event that has no row in the job's state is a bug and raises :class:`IllegalTransition`; a
failure of a job is never an illegal transition.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final
from urllib.parse import parse_qsl, urlsplit

from batch_export.errors import IllegalTransition
from batch_export.types import (
    DEFAULT_FAILED_STATUSES,
    DEFAULT_GIVE_UP_AFTER,
    DEFAULT_POLL_INTERVAL,
    DEFAULT_POLL_MAX_INTERVAL,
    DEFAULT_POLL_TIMEOUT,
    DEFAULT_READY_STATUSES,
    JobRecord,
    JobState,
    Outcome,
    Problem,
    StatusKind,
    StatusVocabulary,
)
from batch_export.urls import url_refusal

if TYPE_CHECKING:
    from batch_export.manifest import ExportSpec

__all__ = [
    "DEFAULT_FAILED_STATUSES",
    "DEFAULT_READY_STATUSES",
    "DISK_WIDE_CODES",
    "LOCAL_RETRY_BASE",
    "MAX_EMPTY_URL_ANSWERS",
    "MAX_LOCAL_RETRIES",
    "MAX_URL_REFRESHES",
    "MAX_VERIFY_FAILURES",
    "PERMANENT_CODES",
    "RECOVERY",
    "ROWS",
    "TRANSIENT_LOCAL_CODES",
    "TRANSITIONS",
    "UNFINISHED",
    "Aborted",
    "Action",
    "Admitted",
    "Answered",
    "AwaitDownloadSlot",
    "AwaitRequestSlot",
    "BytesEnded",
    "DiscardPart",
    "Download",
    "DownloadSlotFree",
    "Event",
    "Finish",
    "Inform",
    "JobState",
    "JobValue",
    "Loaded",
    "LocalFailed",
    "PollDeadline",
    "RequestFailed",
    "RequestSlotFree",
    "Rules",
    "SendPut",
    "Skip",
    "StatusKind",
    "StatusVocabulary",
    "StopDownloads",
    "StorageRefused",
    "TimeOut",
    "TransferFailed",
    "TransferStarted",
    "Upload",
    "UploadFailed",
    "UploadInterrupted",
    "Uploaded",
    "Verified",
    "Verify",
    "VerifyFailed",
    "Wait",
    "advance",
    "backoff_delay",
    "is_permanent",
    "is_url_expired",
    "job_key",
    "next_poll_interval",
    "shard_of",
    "step",
    "uncounted",
    "url_expiry",
]

#: A ready status with an empty ``signed_url`` this many times in a row fails the job.
MAX_EMPTY_URL_ANSWERS: Final = 3
#: Fresh signed URLs a job may fetch after storage rejected one or it expired (SPEC §4).
MAX_URL_REFRESHES: Final = 3
#: Verification failures that fail the job: the first discards the ``.part`` and goes again from 0.
MAX_VERIFY_FAILURES: Final = 2
#: Local failures of the whole disk: they stop every other download of the run (SPEC §4, §9).
DISK_WIDE_CODES: Final = frozenset({"disk_full", "read_only_output"})
#: Local failures of the process, not of the disk or the package: back off and try again.
TRANSIENT_LOCAL_CODES: Final = frozenset({"too_many_open_files"})
#: Tries after a transient local failure, waiting ``LOCAL_RETRY_BASE * 2**n`` seconds (1 to 16 s).
MAX_LOCAL_RETRIES: Final = 5
LOCAL_RETRY_BASE: Final = 1.0

_S = JobState
#: Every allowed transition (SPEC §4 table). Anything else raises :class:`IllegalTransition`.
TRANSITIONS: Mapping[JobState, frozenset[JobState]] = {
    _S.QUEUED: frozenset({_S.REQUESTING}),
    _S.REQUESTING: frozenset({_S.PREPARING, _S.READY, _S.FAILED}),
    _S.PREPARING: frozenset({_S.PREPARING, _S.READY, _S.FAILED}),
    _S.READY: frozenset({_S.DOWNLOADING, _S.REQUESTING}),
    _S.DOWNLOADING: frozenset({_S.VERIFYING, _S.DOWNLOADING, _S.REQUESTING, _S.FAILED}),
    _S.VERIFYING: frozenset({_S.DONE, _S.UPLOADING, _S.DOWNLOADING, _S.FAILED}),
    _S.UPLOADING: frozenset({_S.DONE, _S.UPLOADING, _S.FAILED}),
    _S.FAILED: frozenset({_S.QUEUED, _S.UPLOADING, _S.ABANDONED}),
    _S.DONE: frozenset({_S.QUEUED}),
    _S.ABANDONED: frozenset({_S.QUEUED}),
}
#: Crash recovery (SPEC §4): what a state a crashed run left behind becomes in the next run.
#: Signed URLs are never stored, so a fresh PUT comes first; an upload resumes from its staged file.
RECOVERY: Mapping[JobState, JobState] = {
    _S.REQUESTING: _S.REQUESTING,
    _S.PREPARING: _S.REQUESTING,
    _S.READY: _S.REQUESTING,
    _S.DOWNLOADING: _S.REQUESTING,
    _S.VERIFYING: _S.REQUESTING,
    _S.UPLOADING: _S.UPLOADING,
}
#: States a crashed run leaves behind; the next run sends them back to ``requesting``.
UNFINISHED = frozenset(s for s, to in RECOVERY.items() if to is _S.REQUESTING)


def advance(current: JobState, to: JobState) -> JobState:
    """Return ``to`` if the lifecycle table allows ``current -> to``.

    Raises:
        IllegalTransition: the move is not in :data:`TRANSITIONS` (a bug, never a job failure).
    """
    if to not in TRANSITIONS[current]:
        raise IllegalTransition(f"illegal job transition {current} -> {to}")
    return to


# ------------------------------------------------------------------------------------- machine


@dataclass(frozen=True, slots=True)
class Rules:
    """The settings the machine decides by. Durations in seconds.

    Attributes:
        poll_interval, poll_max_interval: first and largest wait between polls.
        poll_timeout: a job pending longer than this (over all its request cycles in a run) fails.
        vocabulary: which statuses mean ready and failed.
        allow_http: allow plain-http signed URLs on non-loopback hosts.
        object_store: the output is an object store: a verified package is uploaded (SPEC §8).
        give_up_after: consecutive runs failing with the same code no retry can fix before the job
            is abandoned (SPEC §9); 0: never.
        retry_abandoned: request abandoned jobs again (``--retry-abandoned``).
        rng: the source of poll-interval jitter (the only impurity; seed it in tests).
    """

    poll_interval: float = DEFAULT_POLL_INTERVAL
    poll_max_interval: float = DEFAULT_POLL_MAX_INTERVAL
    poll_timeout: float = DEFAULT_POLL_TIMEOUT
    vocabulary: StatusVocabulary = field(default_factory=StatusVocabulary)
    allow_http: bool = False
    object_store: bool = False
    give_up_after: int = DEFAULT_GIVE_UP_AFTER
    retry_abandoned: bool = False
    rng: random.Random = field(default_factory=random.Random)


@dataclass(frozen=True, slots=True)
class JobValue:
    """A job as the machine sees it: its durable record and the counters of this run.

    Attributes:
        record: the durable record (state, attempts, polls, part ETag, result, last error).
        recovering: left unfinished by a crashed run; its next request cycle is the recovery row.
        empty_urls: ready answers without a ``signed_url`` in a row (this request cycle).
        answers: answers received in this request cycle (the first is not a poll).
        poll_wait: the last wait between polls (seconds), None before the first.
        last_status: the last ``status`` the API gave (for the ``poll_timeout`` message).
        refreshes: fresh signed URLs fetched in this run.
        verify_failures: packages that failed verification in this run.
        local_retries: transient local failures (no file descriptor left) retried in this run.
        pending_seconds: time spent requesting/polling in earlier request cycles of this run.
        cycle_started: monotonic seconds when the current request cycle began.
        deadline: monotonic seconds when the current cycle runs out of ``poll_timeout``.
    """

    record: JobRecord
    recovering: bool = False
    empty_urls: int = 0
    answers: int = 0
    poll_wait: float | None = None
    last_status: str = ""
    refreshes: int = 0
    verify_failures: int = 0
    local_retries: int = 0
    pending_seconds: float = 0.0
    cycle_started: float = 0.0
    deadline: float = 0.0

    @property
    def state(self) -> JobState:
        """The job's state."""
        return self.record.state


# -- events


@dataclass(frozen=True, slots=True)
class Loaded:
    """The run found the job's record (or made a new one).

    ``file_intact``: a done job's file is present with the recorded size; ``force``: redo done jobs;
    ``staged_intact``: (object-store output) a failed job's staged file is present with the
    recorded size and sha256, so its upload can be tried again without a new download.
    """

    file_intact: bool
    force: bool
    staged_intact: bool = False


@dataclass(frozen=True, slots=True)
class Admitted:
    """The run admitted the job (once per run)."""


@dataclass(frozen=True, slots=True)
class RequestSlotFree:
    """An in-flight slot is held; ``now`` in monotonic seconds."""

    now: float


@dataclass(frozen=True, slots=True)
class Answered:
    """The API answered the PUT with 200 (``status``, ``signed_url``); ``now`` monotonic seconds."""

    status: str
    signed_url: str
    now: float


@dataclass(frozen=True, slots=True)
class RequestFailed:
    """The PUT failed for good (400/403 envelope, retries spent, bad answer, …)."""

    problem: Problem


@dataclass(frozen=True, slots=True)
class PollDeadline:
    """The wait of a :class:`TimeOut` ended: ``poll_timeout`` is used up."""


@dataclass(frozen=True, slots=True)
class DownloadSlotFree:
    """A download slot is held; ``url_expired``: the signed URL is known to be expired (SPEC §4)."""

    url_expired: bool


@dataclass(frozen=True, slots=True)
class TransferStarted:
    """Storage's answer was accepted; the bytes of ``etag`` go to the ``.part`` (None: no ETag)."""

    etag: str | None


@dataclass(frozen=True, slots=True)
class StorageRefused:
    """Storage said 400/401/403, or the URL expired before a retry: a fresh URL may help."""

    problem: Problem


@dataclass(frozen=True, slots=True)
class TransferFailed:
    """The download failed for good (retries spent, 404, …); the ``.part`` stays for a resume."""

    problem: Problem


@dataclass(frozen=True, slots=True)
class LocalFailed:
    """A local file operation failed.

    ``during`` is ``"transfer"`` (writing), ``"verify"`` (reading back or committing) or ``"path"``
    (preparing the job's own path). ``output_writable``: the output dir itself can still be
    written (tells a job's own ``permission_denied`` from an unwritable output dir).
    """

    problem: Problem
    during: str
    output_writable: bool = True


@dataclass(frozen=True, slots=True)
class BytesEnded:
    """All bytes the server announced are in the ``.part``."""


@dataclass(frozen=True, slots=True)
class Verified:
    """The ``.part`` passed every check and sits at its final path (local output) or is staged."""

    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class VerifyFailed:
    """The ``.part`` failed a check (length, MD5, zip)."""

    problem: Problem


@dataclass(frozen=True, slots=True)
class Uploaded:
    """The object store confirmed the upload (SPEC §8)."""


@dataclass(frozen=True, slots=True)
class UploadInterrupted:
    """The upload broke off in a way worth another try from the staged file."""

    problem: Problem


@dataclass(frozen=True, slots=True)
class UploadFailed:
    """The upload failed for good (retries spent, refused)."""

    problem: Problem


@dataclass(frozen=True, slots=True)
class Aborted:
    """An error without a row of its own (a bug, the state store failing): fail the job with it."""

    problem: Problem


Event = (
    Loaded
    | Admitted
    | RequestSlotFree
    | Answered
    | RequestFailed
    | PollDeadline
    | DownloadSlotFree
    | TransferStarted
    | StorageRefused
    | TransferFailed
    | LocalFailed
    | BytesEnded
    | Verified
    | VerifyFailed
    | Uploaded
    | UploadInterrupted
    | UploadFailed
    | Aborted
)

# -- actions


@dataclass(frozen=True, slots=True)
class Skip:
    """Nothing to do this run: the job is done and its file intact (outcome ``skipped``)."""


@dataclass(frozen=True, slots=True)
class AwaitRequestSlot:
    """Wait for an in-flight slot (releasing a download slot); answer :class:`RequestSlotFree`."""


@dataclass(frozen=True, slots=True)
class SendPut:
    """Wait ``after`` seconds, then send the PUT; the client gives up at ``deadline`` (monotonic s).

    Answer :class:`Answered` or :class:`RequestFailed`.
    """

    after: float
    deadline: float


@dataclass(frozen=True, slots=True)
class TimeOut:
    """Wait ``after`` seconds, then answer :class:`PollDeadline`."""

    after: float


@dataclass(frozen=True, slots=True)
class AwaitDownloadSlot:
    """Hold a download slot (releasing the in-flight slot); answer :class:`DownloadSlotFree`."""


@dataclass(frozen=True, slots=True)
class Download:
    """Stream the signed URL into the ``.part``, resuming the bytes of ``etag`` (None: from 0).

    Answer :class:`TransferStarted` per accepted response, then :class:`BytesEnded`,
    :class:`StorageRefused`, :class:`TransferFailed` or :class:`LocalFailed`.
    """

    etag: str | None


@dataclass(frozen=True, slots=True)
class Verify:
    """Check the ``.part`` and commit it.

    Answer :class:`Verified`, :class:`VerifyFailed` or :class:`LocalFailed`.
    """


@dataclass(frozen=True, slots=True)
class Upload:
    """Upload the staged, verified package (SPEC §8).

    Answer :class:`Uploaded`, :class:`UploadInterrupted` or :class:`UploadFailed`.
    """


@dataclass(frozen=True, slots=True)
class Wait:
    """Wait ``after`` seconds (then go on with the next action)."""

    after: float


@dataclass(frozen=True, slots=True)
class DiscardPart:
    """Remove the job's ``.part`` (a failure to remove it is only logged)."""


@dataclass(frozen=True, slots=True)
class StopDownloads:
    """Start no new download in this run (the disk is full or read-only)."""


@dataclass(frozen=True, slots=True)
class Inform:
    """Log ``message`` about the job at info level (``event``: the JSON-lines event name)."""

    message: str
    event: str | None = None
    code: str | None = None


@dataclass(frozen=True, slots=True)
class Finish:
    """The job reached its outcome for this run."""

    outcome: Outcome


Action = (
    Skip
    | AwaitRequestSlot
    | SendPut
    | TimeOut
    | AwaitDownloadSlot
    | Download
    | Verify
    | Upload
    | Wait
    | DiscardPart
    | StopDownloads
    | Inform
    | Finish
)
Step = tuple[JobValue, tuple[Action, ...]]

_FAILED_JOB = (Finish(Outcome.FAILED),)


def _move(value: JobValue, to: JobState, **changes: object) -> JobValue:
    """``value`` in state ``to`` (checked against the table), with record ``changes``."""
    advance(value.state, to)
    return replace(value, record=value.record.evolve(state=to, **changes))


def _fail(value: JobValue, problem: Problem, *actions: Action, give_up_after: int = 0) -> Step:
    """Fail the job with ``problem``; ``actions`` come before :class:`Finish`.

    ``give_up_after`` > 0: ``problem`` is one no retry can fix (:func:`is_permanent`); the job
    counts the consecutive runs failing with its code and is abandoned at the ``give_up_after``-th
    (SPEC §9). A failure of another kind resets the count.
    """
    if value.state in (_S.QUEUED, _S.READY):  # no direct edge: through requesting, as a PUT would
        value = _start_cycle_state(value)
    runs = 0
    if give_up_after > 0:
        record = value.record  # its error is the last run's, if it failed then
        same = record.failure_runs > 0 and record.error_code == problem.code
        runs = record.failure_runs + 1 if same else 1
    failed = _move(
        value,
        _S.FAILED,
        error_code=problem.code,
        error_message=problem.message,
        error_http_status=problem.http_status,
        failure_runs=runs,
    )
    if give_up_after > 0 and runs >= give_up_after:
        return _move(failed, _S.ABANDONED), (*actions, Finish(Outcome.ABANDONED))
    return failed, (*actions, *_FAILED_JOB)


#: Codes no retry can fix, besides the API's own 4xx answers (SPEC §7, §9).
PERMANENT_CODES: Final = frozenset({"no_listed_assets", "path_clash"})


def is_permanent(problem: Problem, *, from_api: bool) -> bool:
    """Whether ``problem`` is one no retry can fix: a 400-class API answer, or a permanent code.

    ``from_api``: the problem is the API's answer to the PUT (an unknown asset, a 403 permission);
    408 and 429 are flow control, not answers about the job.
    """
    if problem.code in PERMANENT_CODES:
        return True
    status = problem.http_status
    return from_api and status is not None and 400 <= status < 500 and status not in (408, 429)


def uncounted(value: JobValue) -> JobValue:
    """``value``'s failure of this run, not counted toward abandoning the job (SPEC §9 extended).

    For a 401/403 in a run where no answer accepted the key (the breaker's ``key_proven``): a
    bad or expired key and a forbidden AOI look the same, so the run neither counts nor abandons.
    The job stays ``failed`` (an ``abandoned`` verdict of this run is taken back: the step is
    revised, not a transition) with one run fewer; ``failure_runs`` never goes below 0.
    """
    record = value.record
    if record.state not in (_S.FAILED, _S.ABANDONED):
        return value
    runs = max(record.failure_runs - 1, 0)
    return replace(value, record=record.evolve(state=_S.FAILED, failure_runs=runs))


def _give_up(problem: Problem, rules: Rules, *, from_api: bool) -> int:
    """``rules.give_up_after`` when ``problem`` counts toward abandoning the job, else 0."""
    return rules.give_up_after if is_permanent(problem, from_api=from_api) else 0


def _start_cycle_state(value: JobValue) -> JobValue:
    """``value`` moved to requesting: the recovery row after a crash, else a table edge."""
    if value.recovering:
        return replace(value, recovering=False, record=value.record.evolve(state=_S.REQUESTING))
    return _move(value, _S.REQUESTING)


def _unexpected(value: JobValue, event: Event) -> IllegalTransition:
    return IllegalTransition(f"no row for {type(event).__name__} in state {value.state}")


def step(value: JobValue, event: Event, rules: Rules) -> Step:
    """Return the job's next value and the actions to perform, in order (SPEC §4).

    Pure: no I/O, no clock (times come in the events), no randomness except the poll jitter drawn
    from ``rules.rng``. The rows are :data:`ROWS`: the states where an event has a row, and the
    function that decides it.

    Raises:
        IllegalTransition: ``event`` has no row in the job's state (a bug in the caller).
    """
    states, row = ROWS[type(event)]
    if value.state in states:
        result = row(value, event, rules)
        if result is not None:
            return result
    raise _unexpected(value, event)


def _on_loaded(value: JobValue, event: Loaded, rules: Rules) -> Step:
    """A new run found the job: skip it, queue it again, or mark it for crash recovery."""
    state = value.state
    if state is _S.DONE and event.file_intact and not event.force:
        return value, (Skip(),)
    if state is _S.ABANDONED and not rules.retry_abandoned:
        return value, (Finish(Outcome.ABANDONED),)
    if state is _S.FAILED and event.staged_intact and rules.object_store and not event.force:
        # An upload that failed for good left its verified package staged: upload it again, with
        # no new PUT and no new download (SPEC §8).
        return replace(_move(value, _S.UPLOADING), recovering=True), ()
    if state in (_S.FAILED, _S.DONE, _S.ABANDONED):
        return _move(value, _S.QUEUED), ()
    if state in RECOVERY:
        return replace(value, recovering=True), ()
    return value, ()


def _on_admitted(value: JobValue, event: Admitted, rules: Rules) -> Step | None:
    """Admitted: wait for an in-flight slot, or (an upload a crash interrupted) upload again."""
    if value.recovering and RECOVERY[value.state] is _S.UPLOADING:
        return replace(value, recovering=False), (Upload(),)
    if value.state is _S.QUEUED or value.recovering:
        return value, (AwaitRequestSlot(),)
    return None


def _on_request_slot(value: JobValue, event: RequestSlotFree, rules: Rules) -> Step | None:
    """A new request cycle: requesting, one more attempt, the PUT at once.

    ``poll_timeout`` counts over every request cycle of the run, not per cycle.
    """
    if value.state not in (_S.QUEUED, _S.READY, _S.DOWNLOADING) and not value.recovering:
        return None
    moved = _start_cycle_state(value)
    deadline = event.now + max(0.0, rules.poll_timeout - value.pending_seconds)
    cycle = replace(
        moved,
        record=moved.record.evolve(attempts=moved.record.attempts + 1),
        empty_urls=0,
        answers=0,
        poll_wait=None,
        cycle_started=event.now,
        deadline=deadline,
    )
    return cycle, (SendPut(after=0.0, deadline=deadline),)


def _on_failure(value: JobValue, event: TransferFailed | UploadFailed, rules: Rules) -> Step:
    """A step failed for good: the job fails with the problem (a ``.part`` is kept)."""
    return _fail(value, event.problem)


def _on_request_failed(value: JobValue, event: RequestFailed, rules: Rules) -> Step:
    """The PUT failed for good; an answer no retry can fix counts toward abandoning the job."""
    problem = event.problem
    return _fail(value, problem, give_up_after=_give_up(problem, rules, from_api=True))


def _on_poll_deadline(value: JobValue, event: PollDeadline, rules: Rules) -> Step:
    """``poll_timeout`` is used up while the package is still pending."""
    message = (
        f"package still {value.last_status[:64]!r} after poll_timeout ({rules.poll_timeout:g} s)"
    )
    return _fail(value, Problem("poll_timeout", message, 200))


def _on_download_slot(value: JobValue, event: DownloadSlotFree, rules: Rules) -> Step:
    """A download slot: download (resuming the ``.part``), unless the URL is known expired."""
    if event.url_expired and value.refreshes < MAX_URL_REFRESHES:
        return replace(value, refreshes=value.refreshes + 1), (AwaitRequestSlot(),)
    if value.state is _S.READY:
        value = _move(value, _S.DOWNLOADING)
    return value, (Download(etag=value.record.part_etag),)


def _on_transfer_started(value: JobValue, event: TransferStarted, rules: Rules) -> Step:
    """Storage's answer accepted: record the ETag of the bytes going into the ``.part``."""
    return _move(value, _S.DOWNLOADING, part_etag=event.etag), ()


def _on_storage_refused(value: JobValue, event: StorageRefused, rules: Rules) -> Step:
    """Storage refused the URL: a fresh one (at most :data:`MAX_URL_REFRESHES`), then fail."""
    if value.refreshes >= MAX_URL_REFRESHES:
        return _fail(value, event.problem)
    note = Inform(f"{event.problem.message}; fetching a fresh signed URL")
    return replace(value, refreshes=value.refreshes + 1), (note, AwaitRequestSlot())


def _on_local_failed(value: JobValue, event: LocalFailed, rules: Rules) -> Step | None:
    """A local failure where one can happen (see :func:`_local_failed`)."""
    if (event.during, value.state) not in _LOCAL_STAGES:
        return None
    return _local_failed(value, event)


def _on_bytes_ended(value: JobValue, event: BytesEnded, rules: Rules) -> Step:
    """All bytes are in: verify them."""
    return _move(value, _S.VERIFYING), (Verify(),)


def _on_verified(value: JobValue, event: Verified, rules: Rules) -> Step:
    """Verified: done (local output), or upload it (object-store output)."""
    if rules.object_store:
        staged = _move(value, _S.UPLOADING, bytes=event.size, sha256=event.sha256, part_etag=None)
        return staged, (Upload(),)
    return _done(value, size=event.size, sha256=event.sha256)


def _on_verify_failed(value: JobValue, event: VerifyFailed, rules: Rules) -> Step:
    """A bad package: discard the ``.part`` and download again from 0 once; then fail."""
    problem = event.problem
    counted = replace(value, verify_failures=value.verify_failures + 1)
    if counted.verify_failures >= MAX_VERIFY_FAILURES:
        return _fail(counted, problem, DiscardPart())
    again = _move(counted, _S.DOWNLOADING, part_etag=None)
    note = Inform(f"{problem.message}; downloading it again from 0", "verify_retry", problem.code)
    return again, (DiscardPart(), note, AwaitDownloadSlot())


def _on_uploaded(value: JobValue, event: Uploaded, rules: Rules) -> Step:
    """The store confirmed the upload: done."""
    return _done(value, size=value.record.bytes, sha256=value.record.sha256)


def _on_upload_interrupted(value: JobValue, event: UploadInterrupted, rules: Rules) -> Step:
    """Upload again, from the staged file."""
    return _move(value, _S.UPLOADING), (Upload(),)


def _on_aborted(value: JobValue, event: Aborted, rules: Rules) -> Step:
    """An error with no row of its own fails the job; after its outcome, the state is kept."""
    problem = event.problem
    if value.state in (_S.DONE, _S.FAILED, _S.ABANDONED):
        # Its outcome was decided but could not be saved: report the error, keep the state.
        record = value.record.evolve(
            error_code=problem.code,
            error_message=problem.message,
            error_http_status=problem.http_status,
        )
        return replace(value, record=record), _FAILED_JOB
    return _fail(value, problem, give_up_after=_give_up(problem, rules, from_api=False))


#: Where a local failure can happen: (``during``, state).
_LOCAL_STAGES = frozenset(
    {("path", _S.DOWNLOADING), ("transfer", _S.DOWNLOADING), ("verify", _S.VERIFYING)}
)


def _local_failed(value: JobValue, event: LocalFailed) -> Step:
    """The rows of a local failure: whose problem is it, the disk's, the process's or the job's?

    * the whole disk (full, read-only, over quota; or the output dir itself unwritable): the job
      fails, its ``.part`` goes, and no other download starts in this run;
    * the process (no file descriptor left): a passing condition; wait and do the same again, up to
      :data:`MAX_LOCAL_RETRIES` times (then the job fails alone, its ``.part`` kept);
    * anything else is the job's own path (a folder where the package goes, a name too long, a
      ``.part`` that vanished): that job fails alone.
    """
    problem, during = event.problem, event.during
    if problem.code in TRANSIENT_LOCAL_CODES:
        if value.local_retries >= MAX_LOCAL_RETRIES:
            return _fail(value, problem)
        wait = LOCAL_RETRY_BASE * 2.0**value.local_retries
        again: Action = Verify() if during == "verify" else Download(etag=value.record.part_etag)
        note = Inform(f"{problem.message}; trying again in {wait:g} s", "local_retry", problem.code)
        return replace(value, local_retries=value.local_retries + 1), (note, Wait(wait), again)
    disk_wide = problem.code in DISK_WIDE_CODES or (
        problem.code == "permission_denied" and not event.output_writable
    )
    if disk_wide:
        return _fail(value, problem, StopDownloads(), DiscardPart())
    if during == "path":
        return _fail(value, problem)
    return _fail(value, problem, DiscardPart())


def _answered(value: JobValue, event: Answered, rules: Rules) -> Step:
    """The rows of a 200 answer to the PUT: ready, failed, or poll again (or time out)."""
    polls = value.record.polls + (1 if value.answers else 0)
    value = replace(
        value,
        answers=value.answers + 1,
        last_status=event.status,
        record=value.record.evolve(polls=polls),
    )
    kind = rules.vocabulary.classify(event.status, event.signed_url)
    if kind is StatusKind.FAILED:
        return _fail(
            value,
            Problem("package_failed", f"the API reports the package as {event.status[:64]!r}", 200),
        )
    if kind is StatusKind.READY:
        refusal = url_refusal(event.signed_url, allow_http=rules.allow_http, what="signed URL")
        if refusal:
            return _fail(value, Problem("url_not_allowed", refusal))
        ready = replace(
            _move(value, _S.READY),
            pending_seconds=value.pending_seconds + (event.now - value.cycle_started),
        )
        return ready, (AwaitDownloadSlot(),)
    empty = value.empty_urls + 1 if kind is StatusKind.READY_WITHOUT_URL else 0
    if empty >= MAX_EMPTY_URL_ANSWERS:
        return _fail(
            value,
            Problem(
                "ready_without_url",
                f"status {event.status[:64]!r} came {MAX_EMPTY_URL_ANSWERS} times without a signed_url",
                200,
            ),
        )
    wait = next_poll_interval(
        value.poll_wait, first=rules.poll_interval, maximum=rules.poll_max_interval, rng=rules.rng
    )
    preparing = replace(_move(value, _S.PREPARING), empty_urls=empty, poll_wait=wait)
    if event.now + wait > value.deadline:
        return preparing, (TimeOut(after=max(0.0, value.deadline - event.now)),)
    return preparing, (SendPut(after=wait, deadline=value.deadline),)


def _done(value: JobValue, *, size: int | None, sha256: str | None) -> Step:
    done = _move(
        value,
        _S.DONE,
        bytes=size,
        sha256=sha256,
        part_etag=None,
        error_code=None,
        error_message=None,
        error_http_status=None,
        failure_runs=0,
    )
    return done, (Finish(Outcome.DOWNLOADED),)


_ANY: Final = frozenset(JobState)
_POLLING: Final = frozenset({_S.REQUESTING, _S.PREPARING})


def _row(*states: JobState) -> frozenset[JobState]:
    return frozenset(states)


#: The rows of the machine: event type -> (states where it has a row, the function deciding it).
#: A function may still find no row (None) for a particular value, e.g. ``Admitted`` of a job
#: that is neither queued nor left unfinished by a crash.
ROWS: Final[Mapping[type, tuple[frozenset[JobState], Callable[..., Step | None]]]] = {
    Loaded: (_ANY, _on_loaded),
    Admitted: (_row(_S.QUEUED, *RECOVERY), _on_admitted),
    RequestSlotFree: (_row(_S.QUEUED, *RECOVERY), _on_request_slot),
    Answered: (_POLLING, _answered),
    RequestFailed: (_POLLING, _on_request_failed),
    PollDeadline: (_row(_S.PREPARING), _on_poll_deadline),
    DownloadSlotFree: (_row(_S.READY, _S.DOWNLOADING), _on_download_slot),
    TransferStarted: (_row(_S.DOWNLOADING), _on_transfer_started),
    StorageRefused: (_row(_S.DOWNLOADING), _on_storage_refused),
    TransferFailed: (_row(_S.DOWNLOADING), _on_failure),
    LocalFailed: (_row(_S.DOWNLOADING, _S.VERIFYING), _on_local_failed),
    BytesEnded: (_row(_S.DOWNLOADING), _on_bytes_ended),
    Verified: (_row(_S.VERIFYING), _on_verified),
    VerifyFailed: (_row(_S.VERIFYING), _on_verify_failed),
    Uploaded: (_row(_S.UPLOADING), _on_uploaded),
    UploadInterrupted: (_row(_S.UPLOADING), _on_upload_interrupted),
    UploadFailed: (_row(_S.UPLOADING), _on_failure),
    Aborted: (_ANY, _on_aborted),
}


# ------------------------------------------------------------------------------- pure helpers


def job_key(spec: ExportSpec) -> str:
    """Return the job key: sha256 hex of the canonical JSON of the job's identity (SPEC §4)."""
    identity = [spec.aoi_id, spec.insight_id, list(spec.inputs), list(spec.outputs), spec.relpath]
    canonical = json.dumps(identity, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def shard_of(key: str, shards: int) -> int:
    """Return the 0-based shard of a job key among ``shards``: ``int(key[:16], 16) % shards``."""
    return int(key[:16], 16) % shards


def next_poll_interval(
    previous: float | None, *, first: float, maximum: float, rng: random.Random
) -> float:
    """Return the wait before the next poll, in seconds.

    The first wait is ``first``; each later one is the previous x1.5, capped at ``maximum``, with
    ±10 % jitter so that many jobs started together spread out.
    """
    base = first if previous is None else min(maximum, previous * 1.5)
    return max(0.0, min(maximum, base * rng.uniform(0.9, 1.1)))


def backoff_delay(attempt: int, *, base: float, cap: float, rng: random.Random) -> float:
    """Return a retry delay in seconds: exponential backoff with full jitter.

    ``delay = uniform(0, min(cap, base * 2**attempt))`` for ``attempt`` = 0, 1, 2, …
    (AWS Architecture Blog, "Exponential Backoff And Jitter").
    """
    return rng.uniform(0.0, min(cap, base * (2.0 ** min(attempt, 30))))


_AMZ_DATE = re.compile(r"^\d{8}T\d{6}Z$")


def url_expiry(url: str, *, received_at: float) -> tuple[float, float] | None:
    """Return ``(expires_at, lifetime)`` in server-clock epoch seconds if the URL carries its expiry.

    Understands S3 (``X-Amz-Date`` + ``X-Amz-Expires``), GCS (``X-Goog-Date`` + ``X-Goog-Expires``),
    CloudFront-style ``Expires=<epoch>`` and Azure SAS ``se=<ISO time>``. For the absolute forms
    the lifetime counts from ``received_at`` (server clock). Returns ``None`` when unknown.
    """
    query = {k.lower(): v for k, v in parse_qsl(urlsplit(url).query, keep_blank_values=True)}
    for prefix in ("x-amz-", "x-goog-"):
        date, expires = query.get(prefix + "date"), query.get(prefix + "expires")
        if date and expires and _AMZ_DATE.match(date) and expires.isdigit():
            start = datetime.strptime(date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
            return start + int(expires), float(int(expires))
    absolute: float | None = None
    if query.get("expires", "").isdigit():
        absolute = float(query["expires"])
    elif query.get("se"):
        try:
            absolute = datetime.fromisoformat(query["se"].replace("Z", "+00:00")).timestamp()
        except ValueError:
            absolute = None
    if absolute is None or not math.isfinite(absolute):
        return None
    return absolute, max(0.0, absolute - received_at)


def is_url_expired(expiry: tuple[float, float] | None, *, server_now: float) -> bool:
    """Return True if a URL is "known to be expired" (SPEC §4).

    That is: less than ``min(30 s, half the URL's own lifetime)`` left, judged on the server's clock.
    A URL of unknown lifetime is never known to be expired.
    """
    if expiry is None:
        return False
    expires_at, lifetime = expiry
    margin = min(30.0, lifetime / 2.0)
    return expires_at - server_now < margin
