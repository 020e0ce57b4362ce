"""Value types and defaults of batch-export, each defined once; this module imports nothing of the project.

Reporters (:mod:`~batch_export.report`, :mod:`~batch_export.metrics`, :mod:`~batch_export.progress`,
:mod:`~batch_export.status`) and the core (:mod:`~batch_export.lifecycle`) depend on these types, never on
the async shell (:mod:`~batch_export.runner`).

Contents:
    * defaults: the API URL, the limits, the file names of the state dir;
    * the exit-code table (:class:`ExitCode`) and its precedence;
    * job states (:class:`JobState`), the durable :class:`JobRecord`, a failure's :class:`Problem`;
    * the status vocabulary (:class:`StatusVocabulary`);
    * run values: :class:`Settings`, :class:`Job`, :class:`JobResult`, :class:`Outcome`,
      :class:`RunResult`, and the :class:`RunObserver` protocol.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

if TYPE_CHECKING:  # typing only: the manifest is not imported at run time (this module is a leaf)
    from batch_export.manifest import ExportSpec

__all__ = [
    "DEFAULT_API_URL",
    "DEFAULT_BACKOFF_BASE",
    "DEFAULT_BACKOFF_CAP",
    "DEFAULT_CONNECTIONS",
    "DEFAULT_DOWNLOADS",
    "DEFAULT_FAILED_STATUSES",
    "DEFAULT_GIVE_UP_AFTER",
    "DEFAULT_IN_FLIGHT",
    "DEFAULT_KEY_ENV",
    "DEFAULT_POLL_INTERVAL",
    "DEFAULT_POLL_MAX_INTERVAL",
    "DEFAULT_POLL_TIMEOUT",
    "DEFAULT_RATE",
    "DEFAULT_READY_STATUSES",
    "DEFAULT_READ_TIMEOUT",
    "DEFAULT_RETRIES",
    "DEFAULT_SEGMENT_MIN",
    "EXIT_PRECEDENCE",
    "KEY_FILE_ENV",
    "LOCK_FILE",
    "REPORTS_DIR",
    "STATE_DIR_NAME",
    "STATE_ENTRIES",
    "STATE_FILE",
    "STOP_EXIT_CODES",
    "Discovered",
    "DiscoveryEntry",
    "ExitCode",
    "ExportResult",
    "Job",
    "JobRecord",
    "JobResult",
    "JobState",
    "Outcome",
    "Problem",
    "RunObserver",
    "RunResult",
    "Settings",
    "StatusKind",
    "StatusVocabulary",
    "Transfer",
]

# ------------------------------------------------------------------------------------ defaults

#: API base URL when neither ``--api-url``/``BATCH_EXPORT_API_URL`` nor ``api.url`` is given (SPEC §1).
DEFAULT_API_URL: Final = "https://api.pixxel.space"
#: Environment variable holding the API key unless ``api.key_env`` names another (SPEC §2).
DEFAULT_KEY_ENV: Final = "PIXXEL_API_KEY"
#: Environment variable naming a file that holds the API key (Docker/Kubernetes secrets).
KEY_FILE_ENV: Final = "PIXXEL_API_KEY_FILE"

#: Jobs being requested/polled at once.
DEFAULT_IN_FLIGHT: Final = 32
#: Simultaneous downloads.
DEFAULT_DOWNLOADS: Final = 4
#: Parallel range connections per download (SPEC §4 segmented download).
DEFAULT_CONNECTIONS: Final = 8
#: Smallest package (bytes) fetched over several connections: 32 MiB.
DEFAULT_SEGMENT_MIN: Final = 32 * 1024 * 1024
#: API requests per second, all jobs together, polls included.
DEFAULT_RATE: Final = 2.0
#: First wait between polls (seconds); grows x1.5 with jitter up to the maximum.
DEFAULT_POLL_INTERVAL: Final = 5.0
#: Largest wait between polls (seconds).
DEFAULT_POLL_MAX_INTERVAL: Final = 60.0
#: A job pending longer than this (seconds) fails with ``poll_timeout``: 2 h.
DEFAULT_POLL_TIMEOUT: Final = 7200.0
#: Retries per request for 5xx/network errors (429s do not count).
DEFAULT_RETRIES: Final = 6
#: Seconds without a byte before a response counts as broken.
DEFAULT_READ_TIMEOUT: Final = 60.0
#: Consecutive runs failing with the same non-retryable code before a job is abandoned (SPEC §9).
DEFAULT_GIVE_UP_AFTER: Final = 3
#: Retry backoff with full jitter: ``uniform(0, min(cap, base * 2**attempt))`` seconds.
DEFAULT_BACKOFF_BASE: Final = 1.0
DEFAULT_BACKOFF_CAP: Final = 60.0

#: Name of the state dir inside the output dir (``<out>/.batch-export``).
STATE_DIR_NAME: Final = ".batch-export"
#: The SQLite state store's file name inside the state dir.
STATE_FILE: Final = "state.sqlite3"
#: The lock file's name inside the state dir.
LOCK_FILE: Final = "lock"
#: The folder of run reports inside the state dir.
REPORTS_DIR: Final = "reports"
#: What a state dir holds; no package (or its .part) may land on or under one of these.
STATE_ENTRIES: Final = (
    STATE_FILE,
    f"{STATE_FILE}-wal",
    f"{STATE_FILE}-shm",
    f"{STATE_FILE}-journal",
    LOCK_FILE,
    REPORTS_DIR,
)

#: Status vocabulary (SPEC §1; Pixxel's sibling endpoints use pending/ready and
#: created/in_progress/success/failed): compared case-insensitively.
DEFAULT_READY_STATUSES: Final = frozenset(
    {"ready", "success", "succeeded", "completed", "complete", "done", "available"}
)
DEFAULT_FAILED_STATUSES: Final = frozenset(
    {"failed", "failure", "error", "errored", "cancelled", "canceled", "rejected", "expired"}
)


# ---------------------------------------------------------------------------------- exit codes


class ExitCode(enum.IntEnum):
    """The process exit codes (SPEC §2); cron wrappers and CI branch on these."""

    OK = 0  #: every selected job is done
    FAILED = 1  #: the run finished, at least one job failed (or was left pending)
    USAGE = 2  #: usage or manifest error; nothing was requested
    MAX_RUNTIME = 3  #: stopped by --max-runtime with jobs left
    LOCKED = 75  #: another run holds the lock on this state dir (EX_TEMPFAIL)
    SIGHUP = 129  #: interrupted by SIGHUP (128 + 1)
    SIGINT = 130  #: interrupted by SIGINT (128 + 2)
    SIGTERM = 143  #: interrupted by SIGTERM (128 + 15)


#: When several codes apply, the first in this order wins (SPEC §2).
EXIT_PRECEDENCE: Final = (
    ExitCode.USAGE,
    ExitCode.LOCKED,
    ExitCode.SIGINT,
    ExitCode.SIGTERM,
    ExitCode.SIGHUP,
    ExitCode.MAX_RUNTIME,
    ExitCode.FAILED,
    ExitCode.OK,
)


# ---------------------------------------------------------------------------------- job values


class JobState(enum.StrEnum):
    """The states of a job (SPEC §4)."""

    QUEUED = "queued"
    REQUESTING = "requesting"
    PREPARING = "preparing"
    READY = "ready"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    UPLOADING = "uploading"
    DONE = "done"
    FAILED = "failed"
    ABANDONED = "abandoned"


@dataclass(frozen=True, slots=True)
class JobRecord:
    """The durable facts about one job. Never holds a signed URL or the API key.

    Attributes:
        key: job key (sha256 hex, see :func:`batch_export.lifecycle.job_key`).
        aoi_id, insight_id, name, relpath: identity, for status listings.
        state: lifecycle state.
        attempts: times the job entered ``requesting`` (all runs).
        polls: PUTs after the first of each request cycle (all runs).
        part_etag: ETag of the bytes in the ``.part``, for ``If-Range`` on resume.
        bytes: size of the finished file (bytes), once done.
        sha256: hex digest of the finished file, once done.
        error_code, error_message, error_http_status: why it last failed.
        failure_runs: consecutive runs that failed it with ``error_code``, a code no retry can fix
            (0: its last failure, if any, was of another kind); at ``give_up_after`` it is
            abandoned (SPEC §9).
    """

    key: str
    aoi_id: str
    insight_id: str
    name: str
    relpath: str
    state: JobState = JobState.QUEUED
    attempts: int = 0
    polls: int = 0
    part_etag: str | None = None
    bytes: int | None = None
    sha256: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    error_http_status: int | None = None
    failure_runs: int = 0

    def evolve(self, **changes: object) -> JobRecord:
        """Return a copy with ``changes`` applied."""
        return replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Problem:
    """Why a job failed or changed course, as the report shows it (already redacted).

    Attributes:
        code: stable snake_case error code (``"poll_timeout"``, ``"disk_full"``, …).
        message: one human-readable line, free of keys and signed-URL queries.
        http_status: the HTTP status behind it, when there was one.
    """

    code: str
    message: str
    http_status: int | None = None


class StatusKind(enum.Enum):
    """What a 200 answer to the PUT means for the job."""

    PENDING = "pending"
    READY = "ready"
    READY_WITHOUT_URL = "ready_without_url"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class StatusVocabulary:
    """Which ``status`` strings mean ready and which mean failed; all others are pending."""

    ready: frozenset[str] = DEFAULT_READY_STATUSES
    failed: frozenset[str] = DEFAULT_FAILED_STATUSES

    @classmethod
    def from_lists(
        cls, ready: Iterable[str] | None, failed: Iterable[str] | None
    ) -> StatusVocabulary:
        """Build a vocabulary, falling back to the defaults where a list is ``None``."""
        return cls(
            ready=frozenset(s.lower() for s in ready)
            if ready is not None
            else DEFAULT_READY_STATUSES,
            failed=(
                frozenset(s.lower() for s in failed)
                if failed is not None
                else DEFAULT_FAILED_STATUSES
            ),
        )

    def classify(self, status: str, signed_url: str) -> StatusKind:
        """Classify a ``status`` (case-insensitive) and whether ``signed_url`` is usable."""
        folded = status.strip().lower()
        if folded in self.failed:
            return StatusKind.FAILED
        if folded in self.ready:
            return StatusKind.READY if signed_url.strip() else StatusKind.READY_WITHOUT_URL
        return StatusKind.PENDING


# ---------------------------------------------------------------------------------- run values


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a run needs besides the manifest's exports. Durations in seconds.

    Attributes:
        api_url: API base URL, no trailing slash.
        out_dir: output root; packages go to ``out_dir / spec.relpath``.
        state_dir: state store, lock and reports.
        in_flight: jobs being requested/polled at once.
        downloads: simultaneous downloads.
        connections: parallel range connections per download (SPEC §4 segmented download).
        segment_min: smallest package (bytes) fetched over several connections.
        rate: API requests/s for all jobs together, polls included.
        poll_interval, poll_max_interval: first and largest wait between polls.
        poll_timeout: a job pending longer than this fails (``poll_timeout``).
        retries: per request, for 5xx/network errors (429s do not count).
        read_timeout: seconds without a byte before a response counts as broken.
        vocabulary: which statuses mean ready and failed.
        allow_http: allow plain http to non-loopback hosts.
        force: redo jobs already done.
        backoff_base, backoff_cap: retry backoff (full jitter) parameters.
        out_url: the object-store output (``s3://bucket/prefix``), or None for a folder; with one,
            ``out_dir`` is the local staging dir where packages are verified before the upload.
        check_existing: ``--check-existing``: HEAD done objects before skipping them.
        give_up_after: consecutive runs failing with the same code no retry can fix before a job
            is abandoned (``limits.give_up_after``; SPEC §9).
        retry_abandoned: request abandoned jobs again (``--retry-abandoned``).
    """

    api_url: str
    out_dir: Path
    state_dir: Path
    in_flight: int = DEFAULT_IN_FLIGHT
    downloads: int = DEFAULT_DOWNLOADS
    connections: int = DEFAULT_CONNECTIONS
    segment_min: int = DEFAULT_SEGMENT_MIN
    rate: float = DEFAULT_RATE
    poll_interval: float = DEFAULT_POLL_INTERVAL
    poll_max_interval: float = DEFAULT_POLL_MAX_INTERVAL
    poll_timeout: float = DEFAULT_POLL_TIMEOUT
    retries: int = DEFAULT_RETRIES
    read_timeout: float = DEFAULT_READ_TIMEOUT
    vocabulary: StatusVocabulary = field(default_factory=StatusVocabulary)
    allow_http: bool = False
    force: bool = False
    backoff_base: float = DEFAULT_BACKOFF_BASE
    backoff_cap: float = DEFAULT_BACKOFF_CAP
    out_url: str | None = None
    check_existing: bool = False
    give_up_after: int = DEFAULT_GIVE_UP_AFTER
    retry_abandoned: bool = False


class Outcome(enum.StrEnum):
    """How a job ended in this run (report ``outcome``)."""

    DOWNLOADED = "downloaded"
    SKIPPED = "skipped"
    FAILED = "failed"
    PENDING = "pending"
    ABANDONED = "abandoned"  #: given up on (SPEC §9): not requested until its entry changes


@dataclass(slots=True)
class Job:
    """A job during a run: its spec, where it goes, and its current record.

    Attributes:
        spec: the export (from the manifest, or discovered).
        final: the package's final path.
        record: the job's durable record (as last saved).
        source: where the job came from, for the report: ``"exports[3]"``, ``"discover[0]"``.
        started: monotonic seconds when it was admitted in this run.
        seconds: how long it ran in this run.
        bytes_done, bytes_total: download progress (bytes), total when announced.
        outcome: its outcome in this run so far.
    """

    spec: ExportSpec
    final: Path
    record: JobRecord
    started: float | None = None
    seconds: float = 0.0
    bytes_done: int = 0
    bytes_total: int | None = None  # size of the package being downloaded, when announced
    outcome: Outcome = Outcome.PENDING
    source: str = ""

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
    source: str = ""
    abandoned_now: bool = False  # abandoned in this run (not already at its start)


@dataclass(frozen=True, slots=True)
class DiscoveryEntry:
    """One line of the report's ``discovery`` array (SPEC §7): a selector's AOI, or its paging.

    Attributes:
        selector: the selector's index in ``discover:``.
        aoi_id: the AOI, or None for an entry about the selector's AOI paging.
        listed: insights the API returned for the AOI, deleted and unready ones included.
        selected: those that became jobs.
        error: why the listing failed, or None.
        warning: something to look at that is no failure (``no_aois``: the selector's
            ``projects:``/``aois: all`` listed no AOI), or None.
    """

    selector: int
    aoi_id: str | None
    listed: int = 0
    selected: int = 0
    error: Problem | None = None
    warning: Problem | None = None


@dataclass(frozen=True, slots=True)
class Discovered:
    """What discovery adds to a run: jobs (after the explicit ones) and the report's entries.

    Attributes:
        specs: the discovered exports, in selector and listing order.
        sources: per spec, ``"discover[N]"``.
        failures: index into ``specs`` -> why that job fails without a request
            (``no_listed_assets``, ``path_clash``).
        entries: the report's ``discovery`` entries.
    """

    specs: tuple[ExportSpec, ...] = ()
    sources: tuple[str, ...] = ()
    failures: Mapping[int, Problem] = field(default_factory=dict)
    entries: tuple[DiscoveryEntry, ...] = ()


#: Stop reasons that decide the exit code by themselves (SPEC §2). ``"max_runtime"`` gives 3 only
#: when jobs are left; ``"cancelled"`` (the Python API's task was cancelled) checkpoints like SIGINT.
STOP_EXIT_CODES: Final = {
    "SIGINT": ExitCode.SIGINT,
    "SIGTERM": ExitCode.SIGTERM,
    "SIGHUP": ExitCode.SIGHUP,
    "cancelled": ExitCode.SIGINT,
}


@dataclass(frozen=True, slots=True)
class RunResult:
    """The end of a run: per-job results and request counts.

    Attributes:
        jobs: one result per job, in manifest order.
        api_requests, storage_requests: requests sent to the API and to storage.
        store_requests: requests sent to the object store (object-store output; 0 otherwise),
            every attempt counted, the start-up check included.
        throttled: API requests answered 429.
        wall_seconds: the run's wall time.
        stopped_by: ``"SIGINT"``, ``"SIGTERM"``, ``"SIGHUP"``, ``"max_runtime"``, ``"cancelled"``
            or None.
        api_by_status: HTTP status (0: network error) -> API requests.
        fatal: a run-wide failure that ended the run early (the state store failing), or None.
        breaker: the run-wide circuit breaker's opening (cause, code, counts), or None (SPEC §9).
        discovery: the report's ``discovery`` entries (SPEC §7); a failed listing makes the exit
            code at least 1.
        listings_stopped: a stop (signal, time budget) ended the discover: listings: their jobs
            are unknown, so work is left (exit 3 under ``--max-runtime``, never 0).
    """

    jobs: tuple[JobResult, ...]
    api_requests: int
    storage_requests: int
    throttled: int
    wall_seconds: float
    stopped_by: str | None = None
    api_by_status: dict[int, int] = field(default_factory=dict)
    fatal: Problem | None = None
    breaker: Mapping[str, object] | None = None
    discovery: tuple[DiscoveryEntry, ...] = ()
    store_requests: int = 0
    listings_stopped: bool = False

    def count(self, outcome: Outcome) -> int:
        """Number of jobs with ``outcome``."""
        return sum(1 for job in self.jobs if job.outcome is outcome)

    @property
    def exit_code(self) -> int:
        """The exit code (SPEC §2).

        130/143/129 on a signal, 3 when stopped by the time budget with jobs left, 1 when a job
        failed (or was left pending), 0 when every job is done or abandoned (SPEC §9).
        """
        pending = self.listings_stopped or any(job.outcome is Outcome.PENDING for job in self.jobs)
        if self.stopped_by in STOP_EXIT_CODES:
            return int(STOP_EXIT_CODES[self.stopped_by])
        if self.stopped_by == "max_runtime" and pending:
            return int(ExitCode.MAX_RUNTIME)
        ok = {Outcome.DOWNLOADED, Outcome.SKIPPED, Outcome.ABANDONED}
        listed = all(entry.error is None for entry in self.discovery)
        if self.fatal is None and listed and all(job.outcome in ok for job in self.jobs):
            return int(ExitCode.OK)
        return int(ExitCode.FAILED)


class RunObserver(Protocol):
    """Receives progress of a run (logs, progress display). Must not block."""

    def job_state(self, job: Job) -> None:
        """``job.record.state`` just changed (already saved)."""

    def job_bytes(self, job: Job, count: int) -> None:
        """``count`` more bytes of ``job`` were written."""

    def job_finished(self, result: JobResult) -> None:
        """A job reached its outcome for this run."""


@dataclass(frozen=True, slots=True)
class ExportResult:
    """What a run did: the same facts as its JSON report (SPEC §5, §10).

    Attributes:
        exit_code: the run's exit code (SPEC §2), also recorded in the report and the metrics.
        run_id: the run's id (the report's file name).
        counts: ``{"total": …, "downloaded": …, "skipped": …, "failed": …, "pending": …}``.
        jobs: the report's job entries (``key``, ``outcome``, ``path``, ``sha256``, ``error``, …).
        report: the whole report document (None for a dry run).
        report_path: where the report was written (None for a dry run).
        plan: for a dry run, the plan lines that ``--dry-run`` prints.
        result: the runner's own :class:`RunResult` (None for a dry run).
    """

    exit_code: int
    run_id: str
    counts: dict[str, int] = field(default_factory=dict)
    jobs: tuple[dict[str, Any], ...] = ()
    report: dict[str, Any] | None = None
    report_path: Path | None = None
    plan: tuple[str, ...] = ()
    result: RunResult | None = None


@dataclass(slots=True)
class Transfer:
    """What was streamed into the ``.part`` and what the server promised about it.

    Attributes:
        size: bytes in the ``.part`` (bytes).
        sha256: hex digest of those bytes, computed while streaming.
        md5: hex digest of those bytes, computed while streaming.
        expected_size: ``Content-Length`` of a 200 or the total of ``Content-Range`` (bytes).
        expected_md5: hex MD5 promised by the server (see :func:`_promised_md5`), if any.
        etag: the entity's ``ETag``, for ``If-Range`` on a later resume.
        resumed_from: offset (bytes) the last successful request started at.
        block_crcs: CRC-32 of each :data:`CRC_BLOCK`-byte block of those bytes (the last one may
            be shorter), computed while streaming; ``None`` if not computed.
        connections: connections the last attempt used at most (1: a single stream).
    """

    size: int = 0
    sha256: str = ""
    md5: str = ""
    expected_size: int | None = None
    expected_md5: str | None = None
    etag: str | None = None
    resumed_from: int = 0
    block_crcs: list[int] | None = None
    connections: int = 1
