"""Sandbox configuration and the record of what reached it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["DEMO_KEY", "VOCABULARIES", "RecordedRequest", "SandboxConfig"]

DEMO_KEY = "sandbox-demo-key"
"""The API key a sandbox accepts when none is configured."""

VOCABULARIES = ("pending/ready", "CREATED/IN_PROGRESS/SUCCESS/FAILED")
"""Status vocabularies the sandbox can speak (``SandboxConfig.vocabulary``)."""


@dataclass
class SandboxConfig:
    """How a sandbox behaves. Mutable: tests may change fault fields between phases of a test.

    Attributes:
        keys: API keys accepted in the ``Authorization`` header (raw, no ``Bearer``).
        seed: Seeds the catalog and the package content.
        vocabulary: ``"pending/ready"`` (``pending`` … ``ready``/``failed``) or
            ``"CREATED/IN_PROGRESS/SUCCESS/FAILED"`` (``CREATED``, ``IN_PROGRESS`` …
            ``SUCCESS``/``FAILED``).
        ready_after_puts: The Nth identical PUT (and every later one) reports the package ready.
        prepare_seconds: ...and only once at least this long (seconds) has passed since the first PUT.
        rate: Per-key token bucket refill rate (requests/s); ``None`` means unlimited.
        burst: Token bucket capacity (requests).
        asset_size: Content of each asset member of a package zip (bytes).
        url_lifetime: Validity of each signed URL (seconds); becomes ``X-Amz-Expires``.
        cut_after_bytes: Storage fault: the first ``cut_times`` GETs of each package announce the
            full ``Content-Length``, send this many body bytes, then close the connection.
        cut_times: How many GETs of each package are cut (see ``cut_after_bytes``).
        storage_rate: Bandwidth cap of each storage response, i.e. of each connection (bytes/s,
            real time), as object stores cap each connection; ``None``: no cap.
        corrupt_insights: Insight ids whose packages have one flipped byte inside a member's data;
            ``Content-Length`` and the MD5 ``ETag`` describe the corrupted bytes, so only the zip
            CRC check catches it.
        fail_insights: Insight ids whose packages end in ``failed``/``FAILED`` instead of ready.
        denied_aois: AOI ids every key gets 403 (permission) for; the AOI listing leaves them out.
        aoi_count: Catalog size: at least this many AOIs (the seeded 3 to 5 first, then more
            with 1 to 3 insights each); ``None``: the seeded ones only. Read once, at start.
        new_insight_every: Listing: a new completed insight appears every this many seconds
            (sandbox clock, from the start) on the visible AOIs in turn; ``None``: never.
        clock: Wall clock (seconds since the epoch) for ``Date`` headers, ``X-Amz-Date``, URL
            expiry, preparation time and the token bucket; inject one so tests never sleep.
    """

    keys: tuple[str, ...] = (DEMO_KEY,)
    seed: int = 0
    vocabulary: str = "pending/ready"
    ready_after_puts: int = 2
    prepare_seconds: float = 0.0
    rate: float | None = 10.0
    burst: int = 2
    asset_size: int = 64 * 1024
    url_lifetime: float = 3600.0
    cut_after_bytes: int | None = None
    cut_times: int = 1
    storage_rate: float | None = None
    corrupt_insights: frozenset[str] = frozenset()
    fail_insights: frozenset[str] = frozenset()
    denied_aois: frozenset[str] = frozenset()
    aoi_count: int | None = None
    new_insight_every: float | None = None
    clock: Callable[[], float] = field(default=time.time)

    def __post_init__(self) -> None:
        if self.vocabulary not in VOCABULARIES:
            raise ValueError(f"vocabulary must be one of {VOCABULARIES}, got {self.vocabulary!r}")
        if self.asset_size < 0:
            raise ValueError("asset_size must be >= 0 bytes")
        if self.burst < 1:
            raise ValueError("burst must be >= 1 request")
        if self.aoi_count is not None and self.aoi_count < 0:
            raise ValueError("aoi_count must be >= 0 AOIs")
        if self.new_insight_every is not None and self.new_insight_every <= 0:
            raise ValueError("new_insight_every must be > 0 seconds, or None for never")
        if self.rate is not None and self.rate <= 0:
            raise ValueError("rate must be > 0 requests/s, or None for unlimited")
        if self.storage_rate is not None and self.storage_rate <= 0:
            raise ValueError("storage_rate must be > 0 bytes/s, or None for no cap")


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request as it reached the sandbox, and the status it got.

    Attributes:
        origin: ``"api"`` or ``"storage"``.
        method: HTTP method.
        path: Raw path as received, without the query.
        query: Raw query string exactly as received (no ``?``).
        headers: Every header as received, in order.
        body: Request body (bytes).
        status: HTTP status sent (0 while the request is still being answered, and when the
            connection was reset before any status line was sent).
        at: ``config.clock()`` when the request arrived (seconds since the epoch).
        response_body: Body of the answer when it was not streamed (JSON and XML answers; empty
            for package bytes).
        fault: Name of the fault a hook injected into this request (see
            :func:`~batch_export.sandbox.faults.note_fault`); ``""`` for none.
        bytes_sent: Package bytes handed to the connection for this answer (bytes; what a
            storage bill counts).
    """

    origin: str
    method: str
    path: str
    query: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    status: int
    at: float
    response_body: bytes = b""
    fault: str = ""
    bytes_sent: int = 0

    def header(self, name: str) -> str | None:
        """Return the first value of header ``name`` (case-insensitive), or ``None``."""
        wanted = name.lower()
        for key, value in self.headers:
            if key.lower() == wanted:
                return value
        return None
