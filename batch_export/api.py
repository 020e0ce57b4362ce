"""The Pixxel API client: the download PUT, its error envelope, retries and the shared rate limit.

``PUT {api_url}/v0/aoi/{aoi_id}/insights/{insight_id}/download`` with
``{"inputs": [...], "outputs": [...]}``; 200 -> ``{"id", "status", "signed_url"}``; 400/403 ->
``{"error": {"code", "details", "message"}}`` (SPEC §1). Polling is re-sending the identical PUT.
"""

from __future__ import annotations

import json
import math
import random
import re
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote

import aiohttp
import anyio
from yarl import URL

from batch_export.clock import Clock
from batch_export.errors import ApiError, JobError, PollTimeout
from batch_export.http import HttpSession, describe_failure
from batch_export.manifest import ExportSpec
from batch_export.ratelimit import MAX_RETRY_AFTER, RateLimiter
from batch_export.redact import Redactor
from batch_export.retry import RetryPolicy

__all__ = [
    "API_CONNECTIONS",
    "MAX_JSON_DEPTH",
    "ApiAnswer",
    "PackageStatus",
    "PixxelClient",
    "encode_segment",
    "parse_retry_after",
]

_MAX_BODY = 1024 * 1024  # an API answer bigger than 1 MiB is not a status document
#: Default bound on simultaneous API requests (and the API session's connections): enough for
#: hundreds of requests/s at sub-second latency, far below a process's descriptor limit.
API_CONNECTIONS = 64


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
    listener: Callable[[int], None] | None = None  # told every status (the run-wide breaker)

    def count(self, status: int) -> None:
        """Count one answer with ``status``, and tell the listener."""
        self.sent += 1
        if self.by_status is None:
            self.by_status = {}
        self.by_status[status] = self.by_status.get(status, 0) + 1
        if status == 429:
            self.throttled += 1
        if self.listener is not None:
            self.listener(status)


def encode_segment(value: str) -> str:
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


@dataclass(frozen=True, slots=True)
class ApiAnswer:
    """A usable (2xx, JSON) answer of the API.

    Attributes:
        status: the HTTP status (2xx).
        doc: the parsed JSON document (dict, list, str, number, bool or None), nested at most
            :data:`MAX_JSON_DEPTH` levels.
        headers: the answer's headers.
        server_time: the server's clock when it answered (``Date`` header; else local), epoch seconds.
        local_time: the local wall clock when the answer arrived, epoch seconds.
    """

    status: int
    doc: Any
    headers: Mapping[str, str]
    server_time: float
    local_time: float


class PixxelClient:
    """Sends API requests, with retries, under the shared rate limit.

    :meth:`request_json` is the one way a request reaches the API (the download PUT, and the
    listing GETs of discovery): the shared limiter, the retry budget, the total time bound, the
    error envelope and the redaction of everything the server says are applied there.

    Args:
        session: the run's API :class:`~batch_export.http.HttpSession` (no default Authorization).
        base_url: API base URL, no trailing slash (e.g. ``https://api.pixxel.space``).
        api_key: the raw key, sent as ``Authorization: <key>`` on API requests only.
        limiter: the run's shared :class:`RateLimiter`.
        clock: time source.
        retries: retry budget per request for 5xx, network errors and unusable answers.
        read_timeout: seconds without a byte before a request counts as a network error; a whole
            request (connect, send, answer) is bounded by twice this, and never outlasts the
            caller's deadline.
        backoff_base: seconds; the first retry waits up to this (full jitter), doubling each time.
        backoff_cap: seconds; no retry waits longer than this (unless Retry-After says so).
        redactor: removes the key (and what else the run must hide) from server text; default:
            a redactor of ``api_key``.
        connections: most requests in flight at once (the API session's connection limit should
            be the same, so that no request waits for a connection inside its time bound).
    """

    def __init__(
        self,
        session: HttpSession,
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
        redactor: Redactor | None = None,
        connections: int = API_CONNECTIONS,
    ) -> None:
        self._session = session
        self._base = base_url.rstrip("/")
        self._key = api_key
        self._limiter = limiter
        self._clock = clock
        self._read_timeout = read_timeout
        self._redact = redactor or Redactor([api_key])
        self._slots = anyio.Semaphore(max(1, connections))
        self._retry = RetryPolicy(
            clock=clock,
            retries=retries,
            backoff_base=backoff_base,
            backoff_cap=backoff_cap,
            rng=rng or random.Random(),
        )
        self.stats = RequestStats()

    @property
    def clock(self) -> Clock:
        """The client's time source: every ``deadline`` it is given is on its ``monotonic``."""
        return self._clock

    def url_for(self, spec: ExportSpec) -> str:
        """Return the download PUT URL for ``spec`` (ids percent-encoded as path segments)."""
        return self._base + self.path_for(spec)

    @staticmethod
    def path_for(spec: ExportSpec) -> str:
        """Return the download PUT path for ``spec``, ids percent-encoded as path segments."""
        aoi, insight = encode_segment(spec.aoi_id), encode_segment(spec.insight_id)
        return f"/v0/aoi/{aoi}/insights/{insight}/download"

    @staticmethod
    def body_for(spec: ExportSpec) -> dict[str, list[str]]:
        """Return the PUT body: both arrays always, in manifest order (deduplicated upstream)."""
        return {"inputs": list(spec.inputs), "outputs": list(spec.outputs)}

    async def request_package(
        self, spec: ExportSpec, *, deadline: float, job_key: str
    ) -> PackageStatus:
        """Send the download PUT until it gets a usable answer.

        Args:
            spec: the export.
            deadline: monotonic time after which 429s stop being waited out (``poll_timeout``).
            job_key: for error attribution.

        Returns:
            The parsed 200 answer.

        Raises:
            ApiError: 400/401/403/404 or other non-retryable 4xx (server's ``error.code`` and
                ``error.message``, redacted), a TLS or proxy-credential failure.
            RetriesExhausted: 5xx / network / unusable answers beyond ``retries``.
            PollTimeout: 429s (or slow answers) kept the job waiting past ``deadline``.
        """
        answer = await self.request_json(
            "PUT",
            self.path_for(spec),
            body=self.body_for(spec),
            deadline=deadline,
            job_key=job_key,
            validate=_check_status,
        )
        return _parse_status(answer)

    async def request_json(
        self,
        method: str,
        path: str,
        *,
        body: object = None,
        params: Mapping[str, str] | None = None,
        deadline: float,
        job_key: str = "",
        validate: Callable[[Any], None] | None = None,
    ) -> ApiAnswer:
        """Send one API request until it gets a usable 2xx JSON answer.

        Args:
            method: ``"GET"``, ``"PUT"``, …
            path: the path under the base URL, starting with ``/``, already percent-encoded (use
                :func:`encode_segment` for ids); never folded or re-encoded.
            body: a JSON-serialisable body, or None for none.
            params: query parameters (percent-encoded here).
            deadline: monotonic time (seconds) after which no turn is waited for and no request
                is started or kept running (``poll_timeout``).
            job_key: for error attribution ("" for requests of no one job).
            validate: called with each 2xx answer's parsed document; raises
                ``ValueError(reason)`` when the caller cannot use it (retried like a 5xx, code
                ``bad_response``, message ``API answered <status> <reason>``).

        Returns:
            The answer; ``doc`` is the parsed JSON (an empty body is ``None``).

        Raises:
            ApiError: a non-retryable 4xx (the server's ``error.code``/``error.message`` when it
                sent an envelope, redacted), or a TLS / proxy-credential failure.
            RetriesExhausted: 5xx, 408, network errors or unusable answers beyond ``retries``.
            PollTimeout: the rate limit, 429s or slow answers kept the request past ``deadline``.
        """
        url = URL(self._base + path, encoded=True)  # "." and ".." ids must not be folded
        if params:
            url = url.update_query(dict(params))
        payload = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        headers = {"Authorization": self._key}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        _refuse_key_in_clear(url, self._session, job_key)
        budget = self._retry.budget(job_key)
        while True:
            if not await self._limiter.acquire(deadline=deadline):
                raise PollTimeout(
                    "gave up waiting for a turn to send: the rate limit (or a Retry-After pause) "
                    "outlasts poll_timeout",
                    job_key=job_key,
                )
            try:
                answer = await self._send(method, url, payload, headers, deadline, job_key)
                if validate is not None:
                    _validated(answer, validate)
                return answer
            except _Retryable as exc:
                if self._clock.monotonic() >= deadline:
                    raise PollTimeout(
                        f"{exc.message}; gave up: past poll_timeout",
                        code="poll_timeout",
                        http_status=exc.http_status,
                        job_key=job_key,
                    ) from None
                await budget.spend(exc, retry_after=exc.retry_after, deadline=deadline)
            except _Throttled:
                if self._clock.monotonic() > deadline:
                    raise PollTimeout(
                        "gave up waiting: rate-limited past poll_timeout",
                        code="poll_timeout",
                        http_status=429,
                        job_key=job_key,
                    ) from None
                # the limiter now holds everyone back; no retry budget spent

    def _timeout(self, deadline: float) -> aiohttp.ClientTimeout:
        """Between bytes ``read_timeout``; in all ``2 × read_timeout``, never past ``deadline``."""
        left = deadline - self._clock.monotonic()
        total = max(0.001, min(2 * self._read_timeout, left))
        return aiohttp.ClientTimeout(
            total=total, sock_connect=self._read_timeout, sock_read=self._read_timeout
        )

    async def _send(
        self,
        method: str,
        url: URL,
        payload: bytes | None,
        headers: dict[str, str],
        deadline: float,
        job_key: str,
    ) -> ApiAnswer:
        async with self._slots:
            timeout = self._timeout(deadline)
            try:
                async with self._session.request(
                    method,
                    url,
                    data=payload,
                    headers=headers,
                    timeout=timeout,
                    allow_redirects=False,
                ) as resp:
                    body = await _read_capped(resp)
                    status, resp_headers = resp.status, resp.headers
            except (aiohttp.ClientError, OSError, ssl.SSLError) as exc:
                self.stats.count(0)
                raise self._network_failure(exc, url, timeout, job_key) from None
        return self._answer(status, resp_headers, body, job_key)

    def _network_failure(
        self, exc: BaseException, url: URL, timeout: aiohttp.ClientTimeout, job_key: str
    ) -> JobError:
        waited = "timed out waiting for data"
        if timeout.total is not None and timeout.total < 2 * self._read_timeout:
            waited = "timed out: the answer did not arrive before poll_timeout"
        elif isinstance(exc, TimeoutError) and not isinstance(exc, aiohttp.ServerTimeoutError):
            waited = f"no complete answer within {2 * self._read_timeout:g} s"
        fault = describe_failure(
            exc,
            url=url,
            origin="the API",
            proxy=self._session.proxies.proxy_for(url),
            timeout=waited,
        )
        message = self._redact(fault.message)
        if not fault.retryable:
            return ApiError(message, code=fault.code, job_key=job_key)
        return _Retryable(message, code=fault.code)

    def _answer(
        self, status: int, resp_headers: Mapping[str, str], body: bytes, job_key: str
    ) -> ApiAnswer:
        """Judge one answer: usable, throttled, retryable or refused."""
        self.stats.count(status)
        local_now = self._clock.wall()
        server_now = _http_date(resp_headers.get("Date")) or local_now
        if status == 429:
            self._limiter.throttled(parse_retry_after(resp_headers, now=server_now))
            raise _Throttled()
        if status >= 500 or status == 408:
            raise _Retryable(
                f"API answered HTTP {status}",
                code=f"http_{status}",
                http_status=status,
                retry_after=parse_retry_after(resp_headers, now=server_now),
            )
        if not 200 <= status < 300:
            code, message = _error_envelope(body, status, self._redact)
            raise ApiError(message, code=code, http_status=status, job_key=job_key)
        if len(body) > _MAX_BODY:
            raise _Retryable(
                f"API answered {status} with more than {_MAX_BODY} bytes: not a status document",
                code="bad_response",
                http_status=status,
            )
        if resp_headers.get("Content-Type", "").lower().startswith("text/html"):
            raise _Retryable(
                f"API answered {status} with an HTML page, not a status document",
                code="html_body",
                http_status=status,
            )
        doc = _parse_json(body, status) if body.strip() else None
        return ApiAnswer(
            status=status,
            doc=doc,
            headers=resp_headers,
            server_time=server_now,
            local_time=local_now,
        )


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


def _error_envelope(body: bytes, status: int, redact: Redactor) -> tuple[str, str]:
    """Return ``(code, message)`` from an error envelope, or generic ones if it is not one.

    Both are server text: redacted here. A code that is not an identifier (``[A-Za-z0-9_.:-]``,
    at most 100 characters) is replaced by ``http_<status>`` and shown in the message instead.
    """
    try:
        doc = _parse_json(body, status)
    except _Retryable:
        doc = None
    error = doc.get("error") if isinstance(doc, dict) else None
    generic = f"http_{status}"
    if not isinstance(error, dict):
        return generic, f"API answered HTTP {status}"
    raw_code, raw_message = error.get("code"), error.get("message")
    code = redact(_text(raw_code)[:200]) if raw_code not in (None, "") else generic
    message = (
        redact(_text(raw_message)[:1000])
        if raw_message not in (None, "")
        else f"API answered HTTP {status}"
    )
    if not _CODE.fullmatch(code):
        message = f"{message} (error code {code!r})"
        code = generic
    return code, message


_CODE = re.compile(r"[A-Za-z0-9_.:-]{1,100}")


def _text(value: object) -> str:
    """A JSON value as text (strings as they are; anything else as compact JSON)."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


#: Deepest JSON nesting accepted from a server (a status document needs 2).
MAX_JSON_DEPTH = 64


def _parse_json(body: bytes, status: int) -> Any:
    """Parse a server's JSON, bounded: undecodable, malformed or too deep -> ``bad_response``."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise _Retryable(
            f"API answered {status} with a body that is not JSON",
            code="bad_response",
            http_status=status,
        ) from None
    except RecursionError:
        doc = None
        deep = True
    else:
        deep = _deeper_than(doc, MAX_JSON_DEPTH)
    if deep:
        raise _Retryable(
            f"API answered {status} with JSON nested deeper than {MAX_JSON_DEPTH} levels",
            code="bad_response",
            http_status=status,
        )
    return doc


def _deeper_than(doc: Any, limit: int) -> bool:
    """Return True if ``doc`` nests lists/dicts more than ``limit`` levels (iterative, no recursion)."""
    stack: list[tuple[Any, int]] = [(doc, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth >= limit:
                return True
            items = value.values() if isinstance(value, dict) else value
            stack.extend((item, depth + 1) for item in items)
    return False


def _refuse_key_in_clear(url: URL, session: HttpSession, job_key: str) -> None:
    """Refuse to send the key through a proxy outside a TLS tunnel (plain-http API URL).

    Raises:
        ApiError: code ``proxy_plain_http``.
    """
    proxy = session.proxies.proxy_for(url)
    if proxy is not None and url.scheme == "http":
        raise ApiError(
            f"the API URL is plain http and {proxy.source} sends it through the proxy "
            f"{proxy.address}: the key would reach the proxy in clear; use https, or list the "
            "API host in NO_PROXY",
            code="proxy_plain_http",
            job_key=job_key,
        )


def _validated(answer: ApiAnswer, validate: Callable[[Any], None]) -> None:
    try:
        validate(answer.doc)
    except ValueError as exc:
        raise _Retryable(
            f"API answered {answer.status} {exc}", code="bad_response", http_status=answer.status
        ) from None


def _check_status(doc: Any) -> None:
    """Raise ValueError unless ``doc`` is a status document (string status and signed_url)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("status"), str):
        raise ValueError("without a string 'status'")
    if doc.get("signed_url") is not None and not isinstance(doc["signed_url"], str):
        raise ValueError("with a non-string 'signed_url'")


def _parse_status(answer: ApiAnswer) -> PackageStatus:
    doc = answer.doc
    signed_url = doc.get("signed_url")
    return PackageStatus(
        id=str(doc.get("id", "")),
        status=doc["status"],
        signed_url="" if signed_url is None else signed_url,
        server_time=answer.server_time,
        clock_offset=answer.server_time - answer.local_time,
    )
