"""The state store seam: where job records live between steps (and, durably, between runs).

Every transition the runner makes is saved through :class:`JobStore` before the next step starts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

from batch_export.lifecycle import JobState

__all__ = ["JobRecord", "JobStore", "MemoryStore"]


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

    def evolve(self, **changes: object) -> JobRecord:
        """Return a copy with ``changes`` applied."""
        return replace(self, **changes)  # type: ignore[arg-type]


class JobStore(Protocol):
    """Where job records are kept. ``save`` returns only once the record is committed."""

    async def load(self, key: str) -> JobRecord | None:
        """Return the stored record for ``key``, if any."""
        ...

    async def save(self, record: JobRecord) -> None:
        """Commit ``record`` (replacing the one with its key)."""
        ...

    async def close(self) -> None:
        """Release resources; further calls are errors."""
        ...


class MemoryStore:
    """A :class:`JobStore` in memory: nothing survives the process (tests, ``--dry-run``)."""

    def __init__(self) -> None:
        self.records: dict[str, JobRecord] = {}
        self.saves = 0

    async def load(self, key: str) -> JobRecord | None:
        """Return the record for ``key``, if any."""
        return self.records.get(key)

    async def save(self, record: JobRecord) -> None:
        """Keep ``record``."""
        self.records[record.key] = record
        self.saves += 1

    async def close(self) -> None:
        """Nothing to release."""
