"""The Pixxel API client: the download PUT, its error envelope, retries and the shared rate limit.

``PUT {api_url}/v0/aoi/{aoi_id}/insights/{insight_id}/download`` with
``{"inputs": [...], "outputs": [...]}``; 200 -> ``{"id", "status", "signed_url"}``; 400/403 ->
``{"error": {"code", "details", "message"}}`` (SPEC §1). Polling is re-sending the identical PUT.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote

import aiohttp
from yarl import URL

from batch_export.clock import Clock
from batch_export.errors import ApiError, JobError, PollTimeout
from batch_export.manifest import ExportSpec
from batch_export.ratelimit import MAX_RETRY_AFTER, RateLimiter
from batch_export.retry import RetryPolicy, describe_network_error

__all__ = ["PackageStatus", "PixxelClient", "parse_retry_after"]

_MAX_BODY = 1024 * 1024  # an API answer bigger than 1 MiB is not a status document


@dataclass(frozen=True, slots=True)
class PackageStatus:
    """A 200 answer to the download PUT.

    Attributes:
        id: the ``id`` field (the insight id).
        status: the ``status`` field, as sent.
        signed_url: the ``signed_url`` field ("" while pending).
        server_time: the server's clock when it answered (``Date`` header; else local), epoch seconds.
        clock_offset: server clock minus local wall clock, seconds.
    """

    id: str
    status: str
    signed_url: str
    server_time: float
    clock_offset: float


@dataclass(slots=True)
class RequestStats:
    """Counters of API requests sent by one client (all jobs), by HTTP status (0 = network error)."""

    sent: int = 0
    throttled: int = 0
    by_status: dict[int, int] | None = None

    def count(self, status: int) -> None:
        """Count one answer with ``status``."""
        self.sent += 1
        if self.by_status is None:
            self.by_status = {}
        self.by_status[status] = self.by_status.get(status, 0) + 1
        if status == 429:
            self.throttled += 1


def _segment(value: str) -> str:
    """Percent-encode an id as one path segment; "." and ".." too, so no client folds them away."""
    if value.strip(".") == "":
        return "%2E" * len(value)
    return quote(value, safe="")


def parse_retry_after(headers: Any, *, now: float) -> float | None:
    """Return the wait a 429/503 asks for, in seconds, or ``None`` if absent or garbage.

    Understands ``Retry-After`` as seconds or as an HTTP date (relative to the answer's ``Date``,
    else ``now``), and millisecond headers (``Retry-After-Ms``, ``X-Ms-Retry-After-Ms``; Sentinel
    Hub and Azure style). Clamped to 0-900 s.
    """
    for name in ("Retry-After-Ms", "X-Ms-Retry-After-Ms"):
        value = headers.get(name)
        if value is not None:
            seconds = _number(value)
            if seconds is not None:
                return _clamp(seconds / 1000.0)
    value = headers.get("Retry-After")
    if value is None:
        return None
    seconds = _number(value)
    if seconds is not None:
        return _clamp(seconds)
    try:
        when = parsedate_to_datetime(value.strip()).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    reference = _http_date(headers.get("Date")) or now
    return _clamp(when - reference)


def _number(text: str) -> float | None:
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _clamp(seconds: float) -> float:
    return min(MAX_RETRY_AFTER, max(0.0, seconds))


def _http_date(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


class PixxelClient:
    """Sends the download PUT for one job, with retries, under the shared rate limit.

    Args:
        session: an ``aiohttp.ClientSession`` with NO default Authorization header.
        base_url: API base URL, no trailing slash (e.g. ``https://api.pixxel.space``).
        api_key: the raw key, sent as ``Authorization: <key>`` on API requests only.
        limiter: the run's shared :class:`RateLimiter`.
        clock: time source.
        retries: retry budget per request for 5xx, network errors and unusable answers.
        read_timeout: seconds without a byte before a request counts as a network error.
        backoff_base: seconds; the first retry waits up to this (full jitter), doubling each time.
        backoff_cap: seconds; no retry waits longer than this (unless Retry-After says so).
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        base_url: str,
        api_key: str,
        limiter: RateLimiter,
        clock: Clock,
        retries: int,
        read_timeout: float,
        backoff_base: float = 1.0,
        backoff_cap: float = 60.0,
        rng: random.Random | None = None,
    ) -> None:
        self._session = session
        self._base = base_url.rstrip("/")
        self._key = api_key
        self._limiter = limiter
        self._clock = clock
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=read_timeout, sock_read=read_timeout
        )
        self._retry = RetryPolicy(
            clock=clock,
            retries=retries,
            backoff_base=backoff_base,
            backoff_cap=backoff_cap,
            rng=rng or random.Random(),
        )
        self.stats = RequestStats()

    def url_for(self, spec: ExportSpec) -> str:
        """Return the download PUT URL for ``spec`` (ids percent-encoded as path segments)."""
        aoi, insight = _segment(spec.aoi_id), _segment(spec.insight_id)
        return f"{self._base}/v0/aoi/{aoi}/insights/{insight}/download"

    @staticmethod
    def body_for(spec: ExportSpec) -> dict[str, list[str]]:
        """Return the PUT body: both arrays always, in manifest order (deduplicated upstream)."""
        return {"inputs": list(spec.inputs), "outputs": list(spec.outputs)}

    async def request_package(
        self, spec: ExportSpec, *, deadline: float, job_key: str
    ) -> PackageStatus:
        """Send the PUT until it gets a usable answer.

        Args:
            spec: the export.
            deadline: monotonic time after which 429s stop being waited out (``poll_timeout``).
            job_key: for error attribution.

        Returns:
            The parsed 200 answer.

        Raises:
            ApiError: 400/401/403/404 or other non-retryable 4xx (server's ``error.code`` and
                ``error.message``).
            RetriesExhausted: 5xx / network / unusable answers beyond ``retries``.
            PollTimeout: 429s kept the job waiting past ``deadline``.
        """
        url = self.url_for(spec)
        payload = json.dumps(self.body_for(spec), separators=(",", ":")).encode()
        headers = {"Authorization": self._key, "Content-Type": "application/json"}
        budget = self._retry.budget(job_key)
        while True:
            if not await self._limiter.acquire(deadline=deadline):
                raise PollTimeout(
                    "gave up waiting for a turn to send: the rate limit (or a Retry-After pause) "
                    "outlasts poll_timeout",
                    job_key=job_key,
                )
            try:
                outcome = await self._send(url, payload, headers, job_key)
            except _Retryable as exc:
                await budget.spend(exc, retry_after=exc.retry_after)
                continue
            except _Throttled:
                if self._clock.monotonic() > deadline:
                    raise PollTimeout(
                        "gave up waiting: rate-limited past poll_timeout",
                        code="poll_timeout",
                        http_status=429,
                        job_key=job_key,
                    ) from None
                continue  # the limiter now holds everyone back; no retry budget spent
            return outcome

    async def _send(
        self, url: str, payload: bytes, headers: dict[str, str], job_key: str
    ) -> PackageStatus:
        try:
            async with self._session.put(
                URL(url, encoded=True),  # already encoded: "." and ".." ids must not be folded
                data=payload,
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
            ) as resp:
                body = await _read_capped(resp)
                status, resp_headers = resp.status, resp.headers
        except aiohttp.ClientSSLError as exc:
            # A certificate or TLS-protocol mismatch does not heal by retrying: fail at once.
            self.stats.count(0)
            raise ApiError(
                f"TLS error talking to the API: {describe_network_error(exc, timeout='timed out')} (check --api-url's scheme and host)",
                code="tls_error",
            ) from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self.stats.count(0)
            stalled = isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError)
            raise _Retryable(
                f"network error talking to the API: "
                f"{describe_network_error(exc, timeout='timed out waiting for data')}",
                code="timeout" if stalled else "network_error",
            ) from None
        self.stats.count(status)
        local_now = self._clock.wall()
        server_now = _http_date(resp_headers.get("Date")) or local_now
        if status == 429:
            retry_after = parse_retry_after(resp_headers, now=server_now)
            self._limiter.throttled(retry_after)
            raise _Throttled()
        if status >= 500 or status == 408:
            raise _Retryable(
                f"API answered HTTP {status}",
                code=f"http_{status}",
                http_status=status,
                retry_after=parse_retry_after(resp_headers, now=server_now),
            )
        if status != 200:
            code, message = _error_envelope(body, status)
            raise ApiError(message, code=code, http_status=status, job_key=job_key)
        if len(body) > _MAX_BODY:
            raise _Retryable(
                f"API answered 200 with more than {_MAX_BODY} bytes: not a status document",
                code="bad_response",
                http_status=200,
            )
        if resp_headers.get("Content-Type", "").lower().startswith("text/html"):
            raise _Retryable(
                "API answered 200 with an HTML page, not a status document",
                code="html_body",
                http_status=200,
            )
        return _parse_status(body, server_now=server_now, local_now=local_now)


async def _read_capped(resp: aiohttp.ClientResponse) -> bytes:
    """Read the whole body, but no more than ``_MAX_BODY + 1`` bytes.

    ``StreamReader.read(n)`` returns what has arrived so far, not n bytes: a status document
    split across TCP segments would look truncated. A body that ends before its
    ``Content-Length`` raises ``ClientPayloadError`` here (a network error, retried).
    """
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():
        chunks.append(chunk)
        size += len(chunk)
        if size > _MAX_BODY:
            break
    return b"".join(chunks)[: _MAX_BODY + 1]


class _Throttled(Exception):
    """A 429: flow control, handled by the limiter."""


class _Retryable(JobError):
    """A retryable failure of one request (5xx, network error, unusable 200)."""

    def __init__(
        self,
        message: str,
        *,
        code: str,
        http_status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, code=code, http_status=http_status)
        self.retry_after = retry_after


def _error_envelope(body: bytes, status: int) -> tuple[str, str]:
    """Return ``(code, message)`` from an error envelope, or generic ones if it is not one."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        doc = None
    error = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(error, dict):
        code = error.get("code")
        message = error.get("message")
        return (
            str(code)[:200] if code not in (None, "") else f"http_{status}",
            str(message)[:1000] if message not in (None, "") else f"API answered HTTP {status}",
        )
    return f"http_{status}", f"API answered HTTP {status}"


def _parse_status(body: bytes, *, server_now: float, local_now: float) -> PackageStatus:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise _Retryable(
            "API answered 200 with a body that is not JSON", code="bad_response", http_status=200
        ) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("status"), str):
        raise _Retryable(
            "API answered 200 without a string 'status'", code="bad_response", http_status=200
        )
    signed_url = doc.get("signed_url")
    if signed_url is None:
        signed_url = ""
    if not isinstance(signed_url, str):
        raise _Retryable(
            "API answered 200 with a non-string 'signed_url'", code="bad_response", http_status=200
        )
    return PackageStatus(
        id=str(doc.get("id", "")),
        status=doc["status"],
        signed_url=signed_url,
        server_time=server_now,
        clock_offset=server_now - local_now,
    )
