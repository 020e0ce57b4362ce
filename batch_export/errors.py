"""The error tree of batch-export.

Every error the tool raises on purpose derives from :class:`BatchExportError`. Foreign errors (aiohttp,
OS, SQLite) are translated at the boundary where they enter, so that no library message carrying a
signed URL or a key reaches a log line; network failures through one table,
:func:`batch_export.http.describe_failure` (codes ``network_error``, ``dns_error``, ``proxy_error``,
``timeout``, ``tls_error``, ``truncated``, ``too_many_open_files``; the message names ``host:port``)::

    BatchExportError                 code: str, a stable identifier that reaches the report
    ├── UsageError                   bad command line or settings (exit 2)
    ├── ManifestError                one or more manifest problems, each FILE:LINE:COL (exit 2)
    ├── LockHeldError                another run holds the state-dir lock (exit 75)
    ├── IllegalTransition            a job state change the lifecycle table forbids: a bug
    └── JobError                     one job failed or must change course; carries job_key
        ├── ApiError                 the API answered 400/403 (error envelope) or a failed status
        ├── RetriesExhausted         429/5xx/network errors outlasted the retry budget or deadline
        ├── PollTimeout              the package stayed pending past ``poll_timeout``
        ├── StorageError             the storage host (signed URL) misbehaved
        │   ├── UrlRejected          storage said 400/401/403: fetch a fresh signed URL
        │   └── TransferError        network error / bad answer while streaming: retry or resume
        ├── VerificationError        the bytes on disk are not the package (length, MD5, zip CRC)
        ├── LocalIOError             disk full, unwritable output dir: stops new downloads
        └── ObjectStoreError         the object store of an ``s3://`` output failed (code store_error)
            ├── StoreAuthError       it refused the credentials (store_auth): opens the run's breaker
            └── StoreNotFound        the bucket is missing (store_not_found)
"""

from __future__ import annotations

__all__ = [
    "UNREACHABLE_CODES",
    "ApiError",
    "BatchExportError",
    "IllegalTransition",
    "JobError",
    "LocalIOError",
    "LockHeldError",
    "ManifestError",
    "ObjectStoreError",
    "PollTimeout",
    "RetriesExhausted",
    "StorageError",
    "StoreAuthError",
    "StoreNotFound",
    "TransferError",
    "UrlRejected",
    "UsageError",
    "VerificationError",
]

#: Error codes meaning "the host could not be reached or did not answer" (one table:
#: :func:`batch_export.http.describe_failure`): what a run-wide breaker counts as an unreachable
#: API (SPEC §9), never the job's own fault.
UNREACHABLE_CODES = frozenset({"network_error", "dns_error", "proxy_error", "timeout"})


class BatchExportError(Exception):
    """Root of every error batch-export raises on purpose.

    Attributes:
        code: stable snake_case identifier written to reports (e.g. ``"poll_timeout"``).
    """

    code: str = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        """The human-readable message (never holds a key or a signed-URL query)."""
        return str(self.args[0]) if self.args else ""


class UsageError(BatchExportError):
    """Raised when the command line or the settings are unusable (exit code 2)."""

    code = "usage"


class ManifestError(BatchExportError):
    """Raised when a manifest is invalid; ``problems`` holds every ``FILE:LINE:COL: PATH: msg`` line."""

    code = "manifest"

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class LockHeldError(BatchExportError):
    """Raised when another run holds the lock on the state dir (exit code 75)."""

    code = "locked"


class IllegalTransition(BatchExportError):
    """Raised when a job state change is not in the lifecycle table: always a bug."""

    code = "illegal_transition"


class JobError(BatchExportError):
    """Raised when one job fails (or must change course); never stops the other jobs.

    Attributes:
        job_key: the job's key (sha256 hex), when known.
        http_status: the HTTP status behind the error, when there was one.
    """

    code = "job_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        http_status: int | None = None,
        job_key: str | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.http_status = http_status
        self.job_key = job_key


class ApiError(JobError):
    """Raised when the API answers 400/403 (``code``/``message`` from its error envelope)."""

    code = "api_error"


class RetriesExhausted(JobError):
    """Raised when retryable errors (429, 5xx, network) outlast the retry budget or the deadline."""

    code = "retries_exhausted"


class PollTimeout(JobError):
    """Raised when a package stays pending longer than ``poll_timeout`` seconds."""

    code = "poll_timeout"


class StorageError(JobError):
    """Raised when the storage host behind a signed URL misbehaves."""

    code = "storage_error"


class UrlRejected(StorageError):
    """Raised when storage answers 400/401/403 (expired or bad signature): get a fresh signed URL."""

    code = "url_rejected"


class TransferError(StorageError):
    """Raised on a network error or unexpected answer mid-download; retryable, maybe resumable."""

    code = "transfer_error"


class VerificationError(JobError):
    """Raised when downloaded bytes fail a check (length, MD5/ETag, zip signature or CRC)."""

    code = "verification_failed"


class LocalIOError(JobError):
    """Raised when the local disk fails us (full, read-only, permission): stops new downloads."""

    code = "local_io"


class ObjectStoreError(JobError):
    """Raised when the object store of an ``s3://`` output fails (5xx, network, a refused part).

    Attributes:
        retryable: True for 5xx, network errors and refused parts (retried with backoff).
    """

    code = "store_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        http_status: int | None = None,
        job_key: str | None = None,
        retryable: bool = True,
    ) -> None:
        super().__init__(message, code=code, http_status=http_status, job_key=job_key)
        self.retryable = retryable


class StoreAuthError(ObjectStoreError):
    """Raised when the object store refuses the credentials (401/403): never retried."""

    code = "store_auth"


class StoreNotFound(ObjectStoreError):
    """Raised when the bucket (or container) of the output does not exist: never retried."""

    code = "store_not_found"
