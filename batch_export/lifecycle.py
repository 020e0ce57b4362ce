"""The pure job lifecycle: states, the transition table, status classification and timing rules.

Nothing here does I/O or sleeps; the runner feeds facts in and acts on the answers (SPEC §4).
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import parse_qsl, urlsplit

from batch_export.errors import IllegalTransition
from batch_export.manifest import ExportSpec

__all__ = [
    "DEFAULT_FAILED_STATUSES",
    "DEFAULT_READY_STATUSES",
    "MAX_EMPTY_URL_ANSWERS",
    "MAX_URL_REFRESHES",
    "TRANSITIONS",
    "JobState",
    "StatusKind",
    "StatusVocabulary",
    "advance",
    "backoff_delay",
    "is_url_expired",
    "job_key",
    "next_poll_interval",
    "shard_of",
    "url_expiry",
]

#: Status vocabulary (SPEC §1; Pixxel's sibling endpoints use pending/ready and
#: created/in_progress/success/failed): compared case-insensitively.
DEFAULT_READY_STATUSES = frozenset(
    {"ready", "success", "succeeded", "completed", "complete", "done", "available"}
)
DEFAULT_FAILED_STATUSES = frozenset(
    {"failed", "failure", "error", "errored", "cancelled", "canceled", "rejected", "expired"}
)
#: A ready status with an empty ``signed_url`` this many times in a row fails the job.
MAX_EMPTY_URL_ANSWERS = 3
#: Fresh signed URLs a job may fetch after storage rejected one or it expired (SPEC §4).
MAX_URL_REFRESHES = 3


class JobState(enum.StrEnum):
    """The states of a job (SPEC §4)."""

    QUEUED = "queued"
    REQUESTING = "requesting"
    PREPARING = "preparing"
    READY = "ready"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    DONE = "done"
    FAILED = "failed"


_S = JobState
#: Every allowed transition (SPEC §4 table). Anything else raises :class:`IllegalTransition`.
TRANSITIONS: Mapping[JobState, frozenset[JobState]] = {
    _S.QUEUED: frozenset({_S.REQUESTING}),
    _S.REQUESTING: frozenset({_S.PREPARING, _S.READY, _S.FAILED}),
    _S.PREPARING: frozenset({_S.PREPARING, _S.READY, _S.FAILED}),
    _S.READY: frozenset({_S.DOWNLOADING, _S.REQUESTING}),
    _S.DOWNLOADING: frozenset({_S.VERIFYING, _S.DOWNLOADING, _S.REQUESTING, _S.FAILED}),
    _S.VERIFYING: frozenset({_S.DONE, _S.DOWNLOADING, _S.FAILED}),
    _S.FAILED: frozenset({_S.QUEUED}),
    _S.DONE: frozenset({_S.QUEUED}),
}
#: States a crashed run leaves behind; the next run sends them back to ``requesting``.
UNFINISHED = frozenset({_S.REQUESTING, _S.PREPARING, _S.READY, _S.DOWNLOADING, _S.VERIFYING})


def advance(current: JobState, to: JobState) -> JobState:
    """Return ``to`` if the lifecycle table allows ``current -> to``.

    Raises:
        IllegalTransition: the move is not in :data:`TRANSITIONS` (a bug, never a job failure).
    """
    if to not in TRANSITIONS[current]:
        raise IllegalTransition(f"illegal job transition {current} -> {to}")
    return to


def job_key(spec: ExportSpec) -> str:
    """Return the job key: sha256 hex of the canonical JSON of the job's identity (SPEC §4)."""
    identity = [spec.aoi_id, spec.insight_id, list(spec.inputs), list(spec.outputs), spec.relpath]
    canonical = json.dumps(identity, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def shard_of(key: str, shards: int) -> int:
    """Return the 0-based shard of a job key among ``shards``: ``int(key[:16], 16) % shards``."""
    return int(key[:16], 16) % shards


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
