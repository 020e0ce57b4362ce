"""Streaming a package from its signed URL into ``<final>.part``: one stream, or segments.

The rules (SPEC §4): GET the URL byte for byte, with no API header, never HEAD; no total timeout,
``read_timeout`` between bytes; no content decoding; pieces of at least 1 MiB; resume with
``Range``/``If-Range``; a package above ``segment_min`` with a strong ETag over up to
``connections`` range connections. Writing and hashing the ``.part`` is
:mod:`batch_export.partfile`'s; verifying it, :mod:`batch_export.verify`'s.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import functools
import logging
import mmap
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import anyio
from yarl import URL

from batch_export.api import parse_retry_after
from batch_export.clock import Clock
from batch_export.errors import (
    JobError,
    LocalIOError,
    StorageError,
    UrlRejected,
)
from batch_export.http import HttpSession, describe_failure
from batch_export.partfile import (
    CRC_BLOCK,
    PIECE_SIZE,
    PartSink,
    RangeSink,
    local_io_error,
    run_local,
)
from batch_export.redact import redact_patterns
from batch_export.retry import RetryPolicy
from batch_export.segments import UNIT_MIN, Schedule, SegmentState
from batch_export.types import Transfer
from batch_export.urls import url_refusal

__all__ = [
    "FAST_CONNECTION",
    "FAST_PROCESS",
    "SEGMENT_MIN",
    "Downloader",
]

log = logging.getLogger(__name__)

#: Default of ``limits.segment_min``: a package must be larger than this to be segmented (bytes).
SEGMENT_MIN = 32 * 1024 * 1024
#: Connections a segmented download opens at once; the others follow when the event loop has
#: time for them (see ``_Segmented._ramp``).
_FIRST_CONNECTIONS = 2
#: Seconds (real time) over which the first connections' rates are measured.
_RAMP_PROBE = 0.15
#: A connection at least this fast (bytes/s) is not capped: no more are opened.
FAST_CONNECTION = 64 * 1024 * 1024
#: A process moving at least this much (bytes/s, all downloads) keeps its event loop busy.
FAST_PROCESS = 256 * 1024 * 1024
#: Pieces of one download received but not yet written, at most.
_PIECES_IN_FLIGHT = 3
_MAX_REDIRECTS = 5
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
_HEX32 = re.compile(r"^[0-9a-fA-F]{32}$")


@dataclass(slots=True)
class _SinkHolder:
    """The open ``.part`` of one transfer, kept across its attempts (closed at the end)."""

    sink: PartSink | None = None


class Downloader:
    """Streams signed URLs into ``.part`` files, with retries and Range resume.

    Args:
        session: the run's storage :class:`~batch_export.http.HttpSession`: no default headers,
            ``auto_decompress=False`` so the bytes on disk are the bytes served.
        clock: time source.
        retries: retry budget for one URL (5xx, network errors, truncation, stalls, HTML pages).
        read_timeout: seconds without a byte before the connection counts as stalled.
        allow_http: allow plain-http URLs/redirects to non-loopback hosts.
        backoff_base: seconds (first retry waits up to this, full jitter, doubling).
        backoff_cap: seconds.
        ramp: open a segmented download's connections two first, the rest once those show
            they are capped (``False``: all at once, e.g. in tests that count them).
        fast_connection: bytes/s of a connection that is not capped (see ``ramp``).
        fast_process: bytes/s of all downloads together above which no connection is added.

    Attributes:
        requests_sent: storage GETs so far.
        bytes_received: body bytes received for ``.part`` files so far (all transfers).
    """

    def __init__(
        self,
        session: HttpSession,
        *,
        clock: Clock,
        retries: int,
        read_timeout: float,
        allow_http: bool = False,
        backoff_base: float = 1.0,
        backoff_cap: float = 60.0,
        rng: random.Random | None = None,
        ramp: bool = True,
        fast_connection: float = FAST_CONNECTION,
        fast_process: float = FAST_PROCESS,
    ) -> None:
        self._session = session
        self._clock = clock
        self.ramp = ramp
        self.fast_connection = fast_connection
        self.fast_process = fast_process
        self.bytes_received = 0
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=read_timeout, sock_read=read_timeout
        )
        self._allow_http = allow_http
        self._retry = RetryPolicy(
            clock=clock,
            retries=retries,
            backoff_base=backoff_base,
            backoff_cap=backoff_cap,
            rng=rng or random.Random(),
        )
        self.requests_sent = 0

    async def transfer(
        self,
        url: str,
        part: Path,
        *,
        etag: str | None,
        job_key: str,
        url_expired: Callable[[], bool],
        on_attempt: Callable[[int, str | None, int | None], Awaitable[None]],
        on_bytes: Callable[[int], None] = lambda n: None,
        connections: int = 1,
        segment_min: int = SEGMENT_MIN,
        segments: SegmentState | None = None,
        on_segments: Callable[[SegmentState | None], Awaitable[None]] | None = None,
        root: Path | None = None,
    ) -> Transfer:
        """Stream ``url`` into ``part``, resuming it when ``etag`` says its bytes are still valid.

        With ``connections`` above 1 the first GET asks ``Range: bytes=0-``; a 206 with a strong
        ETag and a total above ``segment_min`` bytes is then fetched over up to ``connections``
        connections (SPEC §4 "Segmented download"), its progress handed to ``on_segments``.

        Args:
            url: the signed URL, used byte for byte.
            part: the ``.part`` path; kept on failure for a later resume.
            etag: ETag of the bytes already in ``part`` (``None``: start from 0).
            job_key: for error attribution.
            url_expired: returns True when the URL is known to be expired (checked before retries).
            on_attempt: awaited with ``(offset, etag, total bytes or None)`` once a response is
                accepted, before its body is written, so the caller can record the state and
                the ETag (``offset``: bytes already in the ``.part``).
            on_bytes: called with each piece's size in bytes (progress).
            connections: parallel connections for one package (1: a single stream).
            segment_min: a package must be larger than this (bytes) to be segmented.
            segments: the durable progress of an earlier segmented attempt with ``etag``
                (from the state store); ``None``: none.
            on_segments: awaited with each new :class:`SegmentState` to persist (coalesced: at
                most one call at a time, the latest state wins), and with ``None`` when the
                ``.part`` is no longer segmented (persist nothing).
            root: the output dir: no folder below it is followed through a symlink.

        Returns:
            The :class:`Transfer`, with the ``.part`` complete as far as the server said.

        Raises:
            UrlRejected: storage answered 400/401/403, or the URL expired before a retry.
            RetriesExhausted: retryable errors beyond the budget.
            StorageError: a non-retryable answer (404, 410, …).
            LocalIOError: the disk failed us.
        """
        job = _Job(
            url=url,
            part=part,
            root=root,
            job_key=job_key,
            url_expired=url_expired,
            on_attempt=on_attempt,
            on_bytes=on_bytes,
            connections=max(1, connections),
            segment_min=segment_min,
            on_segments=on_segments or _ignore_segments,
        )
        state = Transfer(etag=etag)
        holder = _SinkHolder()
        budget = self._retry.budget(job_key)
        try:
            if segments is not None and etag is not None:
                try:
                    return await _Segmented(self, job, state, segments).run(None)
                except _Retry as exc:  # the entity changed: one stream from 0
                    await self._fall_back(job, state, exc, budget)
            while True:
                offset = await self._resume_offset(part, state, holder.sink)
                try:
                    done = await self._attempt(job, state, holder, offset)
                    if isinstance(done, Transfer):
                        return done
                    state.sha256, state.md5 = await run_local(done.finish)
                    state.size = done.size
                    state.block_crcs = done.block_crcs()
                    return state
                except _Retry as exc:
                    if exc.single:
                        await self._fall_back(job, state, exc, budget)
                        continue
                    if exc.restart:
                        state.etag = None
                    # The server's own wait (0-900 s) wins over the backoff.
                    await budget.spend(exc, retry_after=exc.retry_after, backoff=exc.delay)
                    self._check_expiry(job)
        except JobError as exc:
            exc.job_key = job_key
            if holder.sink is not None:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(holder.sink.discard_if_empty)
            raise
        except BaseException:
            if holder.sink is not None:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(holder.sink.discard_if_empty)
            raise
        finally:
            if holder.sink is not None:
                with anyio.CancelScope(shield=True):  # flush what we have for a later resume
                    await anyio.to_thread.run_sync(holder.sink.close)

    async def _fall_back(self, job: _Job, state: Transfer, exc: _Retry, budget: Any) -> None:
        """Segments disagreed: forget them; the rest of this transfer is one stream from 0."""
        log.info("job %s: %s; one stream from 0", job.job_key[:12], exc.message)
        job.connections = 1
        state.etag = None
        state.expected_size = None
        await job.on_segments(None)
        await budget.spend(exc, backoff=False)
        self._check_expiry(job)

    @staticmethod
    def _check_expiry(job: _Job) -> None:
        if job.url_expired():
            raise UrlRejected(
                "signed URL expired before the download could resume",
                code="url_expired",
                job_key=job.job_key,
            )

    async def _resume_offset(self, part: Path, state: Transfer, sink: PartSink | None) -> int:
        if state.etag is None:
            return 0
        if sink is not None:
            return sink.size
        try:
            return (await anyio.Path(part).stat()).st_size
        except FileNotFoundError:
            state.etag = None
            return 0
        except OSError as exc:
            raise local_io_error(exc, "") from None

    async def _attempt(
        self, job: _Job, state: Transfer, holder: _SinkHolder, offset: int
    ) -> PartSink | Transfer:
        headers = {"Accept-Encoding": "identity"}
        if offset > 0 and state.etag:
            headers["Range"] = f"bytes={offset}-"
            headers["If-Range"] = state.etag
        else:
            offset = 0
            if job.connections > 1:
                headers["Range"] = "bytes=0-"  # a 206 says ranges are served (SPEC §4)
        try:
            async with self._get(job.url, headers) as resp:
                start = await self._accept(
                    resp, state, offset, whole=headers.get("Range") == "bytes=0-"
                )
                if resp.status == 206 and start == 0 and self._splits(job, state):
                    total = state.expected_size
                    assert total is not None
                    await job.on_attempt(0, state.etag, total)
                    await job.on_segments(SegmentState(total))
                    return await _Segmented(self, job, state, SegmentState(total)).run(resp)
                promised = state.expected_md5 is not None
                if holder.sink is None:
                    holder.sink = await run_local(
                        functools.partial(PartSink, job.part, start, md5=promised, root=job.root)
                    )
                    if holder.sink.size != start:  # what was there is not ours to resume
                        raise _Retry(
                            "the .part was replaced; starting again from 0",
                            code="part_replaced",
                            restart=True,
                            delay=False,
                        )
                elif holder.sink.size != start:
                    await run_local(holder.sink.reset)
                sink = holder.sink
                if promised:
                    await run_local(sink.want_md5)
                await job.on_attempt(start, state.etag, state.expected_size)
                await self._stream(resp, sink, job.on_bytes)
                if state.expected_size is not None and sink.size > state.expected_size:
                    raise _Retry(
                        f"storage sent {sink.size} bytes of a {state.expected_size}-byte entity",
                        code="too_long",
                        restart=True,
                    )
                if state.expected_size is not None and sink.size != state.expected_size:
                    raise _Retry(
                        f"storage sent {sink.size} of {state.expected_size} bytes",
                        code="truncated",
                    )
                return sink
        except _Retry:
            raise
        except JobError:
            raise
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise _Retry(
                "no data from storage for read_timeout (stalled)", code="stalled"
            ) from None
        except aiohttp.ClientPayloadError:
            raise _Retry("connection broke mid-body", code="truncated") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise self._network_failure(exc, job.url) from None

    def _network_failure(self, exc: BaseException, url: str) -> JobError:
        """A network error as a retryable ``_Retry`` or a final :class:`StorageError`."""
        fault = describe_failure(
            exc, url=url, origin="storage", proxy=self._session.proxies.proxy_for(url)
        )
        if not fault.retryable:
            return StorageError(fault.message, code=fault.code)
        return _Retry(fault.message, code=fault.code)

    @staticmethod
    def _splits(job: _Job, state: Transfer) -> bool:
        """A whole-entity 206 worth splitting: strong ETag, total above ``segment_min``."""
        total = state.expected_size
        return (
            job.connections > 1
            and total is not None
            and total > job.segment_min
            and state.etag is not None
        )

    def _get(self, url: str, headers: dict[str, str]) -> Any:
        return _RedirectingGet(self, url, headers)

    async def _accept(
        self, resp: aiohttp.ClientResponse, state: Transfer, offset: int, *, whole: bool = False
    ) -> int:
        """Decide what the answer means; return the offset the body starts at.

        ``whole``: the request asked ``bytes=0-`` (a 206 of the whole entity is then fine).
        """
        status = resp.status
        if status in (400, 401, 403):
            body = await resp.content.read(16384)
            raise UrlRejected(_storage_error_text(status, body), http_status=status)
        if status == 416:
            raise _Retry(
                "storage refused the Range (416)",
                code="range_not_satisfiable",
                restart=True,
                delay=False,
            )
        if status >= 500 or status in (408, 429):
            raise _Retry(
                f"storage answered HTTP {status}",
                code=f"http_{status}",
                http_status=status,
                retry_after=parse_retry_after(resp.headers, now=self._clock.wall()),
            )
        if status not in (200, 206):
            raise StorageError(
                f"storage answered HTTP {status}", code=f"storage_http_{status}", http_status=status
            )
        content_type = resp.headers.get("Content-Type", "").lower()
        if content_type.startswith("text/html"):
            raise _Retry(
                "storage answered an HTML page, not the package",
                code="html_body",
                http_status=status,
            )
        etag = resp.headers.get("ETag")
        if status == 206 and whole:  # our "bytes=0-": the whole entity, as a 206
            entity = _whole_range(resp)
            if entity is None:
                raise _Retry(
                    "storage answered bytes=0- with another range",
                    code="bad_range",
                    restart=True,
                    delay=False,
                    single=True,
                )
            state.expected_size = entity
            state.expected_md5 = _promised_md5(resp, full=True)
            state.etag = etag if etag and not etag.startswith("W/") else None
            state.resumed_from = 0
            return 0
        if status == 206:
            total = _fitting_range(resp, offset, etag, state)
            if total is None:
                raise _Retry(
                    "storage answered a Range that does not fit the .part",
                    code="bad_range",
                    restart=True,
                    delay=False,
                )
            state.expected_size = total
            state.expected_md5 = _promised_md5(resp, full=False)
            state.resumed_from = offset
            return offset
        # 200: the whole entity, from byte 0 (also when we asked for a Range).
        length = resp.headers.get("Content-Length")
        state.expected_size = int(length) if length and length.isdigit() else None
        state.expected_md5 = _promised_md5(resp, full=True)
        # Only a strong validator makes a later Range resume safe (RFC 9110 §13.1.5).
        state.etag = etag if etag and not etag.startswith("W/") else None
        state.resumed_from = 0
        return 0

    async def _stream(
        self, resp: aiohttp.ClientResponse, sink: PartSink, on_bytes: Callable[[int], None]
    ) -> None:
        """Copy the body into ``sink`` in pieces of at least :data:`PIECE_SIZE` bytes.

        Pieces are written (in worker threads, one after the other, in order) while the next ones
        are received, so the network and the disk work at the same time; at most
        :data:`_PIECES_IN_FLIGHT` pieces wait for the disk. A piece whose write failed fails
        every later one without writing it.
        """
        chunks: list[bytes] = []
        gathered = 0
        writes: collections.deque[tuple[asyncio.Task[None], int]] = collections.deque()

        async def write_after(previous: asyncio.Task[None] | None, data: bytes) -> None:
            if previous is not None:
                await asyncio.shield(previous)
            await run_local(sink.write, data)

        async def settle_oldest() -> None:
            task, size = writes[0]
            try:
                await asyncio.shield(task)  # a cancelled stream still lets the write finish
            finally:
                if task.done():
                    writes.popleft()
            on_bytes(size)

        try:
            async for chunk in resp.content.iter_any():
                chunks.append(chunk)
                gathered += len(chunk)
                self.bytes_received += len(chunk)
                if gathered >= PIECE_SIZE:
                    data = b"".join(chunks)
                    chunks.clear()
                    gathered = 0
                    if len(writes) >= _PIECES_IN_FLIGHT:
                        await settle_oldest()
                    previous = writes[-1][0] if writes else None
                    writes.append((asyncio.ensure_future(write_after(previous, data)), len(data)))
        finally:
            # Also on a broken connection: the bytes received so far are sound (same ETag,
            # checked offset) and a resume continues after them.
            with anyio.CancelScope(shield=True):  # also when a stop cancels us
                failure: Exception | None = None
                while writes:  # every write is awaited, so none is left to die unobserved
                    try:
                        await settle_oldest()
                    except Exception as exc:  # the first failed write; the later ones repeat it
                        failure = failure or exc
                if failure is not None:
                    raise failure
                if chunks:
                    data = b"".join(chunks)
                    await run_local(sink.write, data)
                    on_bytes(len(data))


def _fitting_range(
    resp: aiohttp.ClientResponse, offset: int, etag: str | None, state: Transfer
) -> int | None:
    """Return the entity size a 206 announces if it continues the ``.part`` exactly, else None.

    It must answer a Range we sent (``offset`` > 0) for the entity we hold (same strong ETag),
    start at ``offset``, end inside its total, agree with its own ``Content-Length``, and name
    the same total as the answer that began the ``.part`` (when that one is known).
    """
    match = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
    if not match or match.group(3) == "*" or offset == 0:
        return None
    if etag is None or etag != state.etag or etag.startswith("W/"):
        return None
    first, last, total = int(match.group(1)), int(match.group(2)), int(match.group(3))
    if first != offset or not first <= last < total:
        return None
    if state.expected_size is not None and total != state.expected_size:
        return None
    length = resp.headers.get("Content-Length")
    if length is not None and (not length.isdigit() or int(length) != last - first + 1):
        return None
    return total


def _whole_range(resp: aiohttp.ClientResponse) -> int | None:
    """Return the total of a 206 that holds the whole entity (``bytes 0-(n-1)/n``), else None."""
    match = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
    if not match or match.group(3) == "*":
        return None
    first, last, total = int(match.group(1)), int(match.group(2)), int(match.group(3))
    if first != 0 or last != total - 1:
        return None
    length = resp.headers.get("Content-Length")
    if length is not None and (not length.isdigit() or int(length) != total):
        return None
    return total


def _range_answer(
    resp: aiohttp.ClientResponse, start: int, stop: int, etag: str, total: int
) -> str | None:
    """Why a 206 does not answer ``bytes=start-(stop-1)`` of the ``total``-byte entity ``etag``.

    None if it does.
    """
    match = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
    if not match or match.group(3) == "*":
        return "no usable Content-Range"
    if int(match.group(3)) != total:
        return "the entity size changed between segments"
    if (int(match.group(1)), int(match.group(2)) + 1) != (start, stop):
        return f"a 206 for bytes {match.group(1)}-{match.group(2)}, not {start}-{stop - 1}"
    if resp.headers.get("ETag") != etag:
        return "the ETag changed between segments"
    length = resp.headers.get("Content-Length")
    if length is not None and (not length.isdigit() or int(length) != stop - start):
        return "a Content-Length that disagrees with its Content-Range"
    return None


class _RedirectingGet:
    """``async with``: GET a URL byte for byte, following up to 5 redirects to allowed URLs only."""

    def __init__(self, downloader: Downloader, url: str, headers: dict[str, str]) -> None:
        self._d = downloader
        self._url = url
        self._headers = headers
        self._resp: aiohttp.ClientResponse | None = None

    async def __aenter__(self) -> aiohttp.ClientResponse:
        url = self._url
        for _ in range(_MAX_REDIRECTS + 1):
            refusal = url_refusal(url, allow_http=self._d._allow_http, what="signed URL")
            if refusal:
                raise StorageError(refusal, code="url_not_allowed")
            self._d.requests_sent += 1
            try:
                resp = await self._d._session.get(
                    URL(url, encoded=True),
                    headers=self._headers,
                    timeout=self._d._timeout,
                    allow_redirects=False,
                )
            except ValueError:  # yarl/aiohttp refuse the URL (bad port, bad characters, …)
                raise StorageError("storage URL is not a valid URL", code="bad_url") from None
            if resp.status in (301, 302, 303, 307, 308) and resp.headers.get("Location"):
                location = resp.headers["Location"]
                resp.release()
                try:
                    url = str(URL(url, encoded=True).join(URL(location, encoded=True)))
                except ValueError:
                    raise StorageError(
                        "storage redirected to an invalid URL", code="bad_url"
                    ) from None
                continue
            self._resp = resp
            return resp
        raise StorageError("storage redirected more than 5 times", code="too_many_redirects")

    async def __aexit__(self, *exc: object) -> None:
        if self._resp is not None:
            self._resp.release()


class _Retry(JobError):
    """A retryable failure of one storage request."""

    def __init__(
        self,
        message: str,
        *,
        code: str,
        http_status: int | None = None,
        restart: bool = False,
        delay: bool = True,
        retry_after: float | None = None,
        single: bool = False,
    ) -> None:
        super().__init__(message, code=code, http_status=http_status)
        self.restart = restart or single
        self.delay = delay
        self.retry_after = retry_after
        self.single = single  # segments disagree: one stream from 0 for the rest


def _promised_md5(resp: aiohttp.ClientResponse, *, full: bool) -> str | None:
    """Return the hex MD5 the storage host vouches for, if any.

    ``Content-MD5`` (base64; full 200 answers only), ``x-goog-hash: md5=<base64>`` (GCS), or a
    plain 32-hex ``ETag`` (S3 single-part uploads), skipped under SSE-KMS or SSE-C, whose ETags are
    not MD5s (AWS S3 docs, "Checking object integrity").
    """
    headers = resp.headers
    if full and headers.get("Content-MD5"):
        digest = _b64_to_hex(headers["Content-MD5"])
        if digest:
            return digest
    for value in headers.getall("x-goog-hash", []):
        for item in value.split(","):
            name, _, b64 = item.strip().partition("=")
            if name.lower() == "md5":
                digest = _b64_to_hex(b64)
                if digest:
                    return digest
    sse = headers.get("x-amz-server-side-encryption", "").lower()
    sse_c = headers.get("x-amz-server-side-encryption-customer-algorithm")
    etag = (headers.get("ETag") or "").strip()
    if sse == "aws:kms" or sse.startswith("aws:kms") or sse_c or etag.startswith("W/"):
        return None
    etag = etag.strip('"')
    return etag.lower() if _HEX32.match(etag) else None


def _b64_to_hex(value: str) -> str | None:
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == 16 else None


_XML_FIELD = re.compile(rb"<(Code|Message)>([^<]{0,200})</\1>")


def _storage_error_text(status: int, body: bytes) -> str:
    """Describe a storage refusal from its S3/GCS/Azure XML ``Code``/``Message`` when present.

    Server text: redacted here, where it enters (signatures, credentials, userinfo).
    """
    fields = {
        m.group(1).decode(): m.group(2).decode("utf-8", "replace")
        for m in _XML_FIELD.finditer(body)
    }
    detail = ": ".join(v for v in (fields.get("Code"), fields.get("Message")) if v)
    return f"storage refused the signed URL (HTTP {status})" + (
        f": {redact_patterns(detail[:1000])}" if detail else ""
    )


# --------------------------------------------------------------------------- segmented download


@dataclass(slots=True)
class _Job:
    """One call of :meth:`Downloader.transfer`: what it fetches and whom it tells."""

    url: str
    part: Path
    root: Path | None
    job_key: str
    url_expired: Callable[[], bool]
    on_attempt: Callable[[int, str | None, int | None], Awaitable[None]]
    on_bytes: Callable[[int], None]
    connections: int
    segment_min: int
    on_segments: Callable[[SegmentState | None], Awaitable[None]]


async def _ignore_segments(state: SegmentState | None) -> None:
    """The default ``on_segments``: persist nothing."""


@dataclass(slots=True)
class _Claim:
    """A range one connection is fetching: ``[start, stop)``, on disk up to ``reached``."""

    start: int
    stop: int
    reached: int


#: Exceptions of a failed segmented download, most telling first (the one re-raised).
_PRIORITY: tuple[type[BaseException], ...] = (
    LocalIOError,
    UrlRejected,
    StorageError,
    JobError,
)


class _Segmented:
    """One segmented download: ranges of one URL over up to ``connections`` connections.

    Each connection claims the next missing range (:class:`~batch_export.segments.Schedule`),
    GETs it with ``If-Range``, checks the answer is that range of the same entity (ETag, total),
    and writes it at its offset. A connection that breaks or stalls gives the rest of its range
    back and retries (its own budget, refilled after each range it completes) while the others
    go on. A disagreement (200, other ETag or total, 416, wrong range) raises
    ``_Retry(single=True)``: the caller falls back to one stream from 0. Progress is handed to
    ``on_segments`` (coalesced) as pieces reach the disk, and once more at the end.
    """

    def __init__(
        self, downloader: Downloader, job: _Job, state: Transfer, progress: SegmentState
    ) -> None:
        self._d = downloader
        self._job = job
        self._state = state
        self._etag = state.etag or ""
        self._total = progress.total
        self._schedule = Schedule(
            progress,
            connections=job.connections,
            unit_min=min(UNIT_MIN, max(CRC_BLOCK, job.segment_min)),
            align=CRC_BLOCK,
        )
        self._sink: RangeSink | None = None
        self._sink_lock = anyio.Lock()
        # Pieces received but not yet written, all connections together: each connection holds
        # at most two (one arriving, one being written); this bounds the memory of a download.
        # Each is a reused PIECE_SIZE buffer: a piece is one contiguous, block-aligned write of
        # whole pages, and no piece allocates memory (fresh pages cost more than the copy).
        self._pieces = anyio.Semaphore(job.connections + 2)
        self._spare: list[memoryview] = []
        self._unsaved = 0  # bytes on disk since progress was last handed to ``on_segments``
        self._dirty = anyio.Event()
        self._saved: SegmentState | None = progress
        self._announced = False
        # Set once the ramp has judged the connections (at once without a ramp): until then a
        # connection other than the lead waits before it claims a second range.
        self._judged = anyio.Event()
        self._fast = False  # the last judgement: one connection already runs as fast as we can
        self._active = 0  # connections working now

    async def run(self, first: aiohttp.ClientResponse | None) -> Transfer:
        """Fetch every missing range; ``first`` is the open answer to ``bytes=0-``, if any.

        Raises:
            _Retry: ``single``: the segments disagree (fall back to one stream from 0).
            UrlRejected, RetriesExhausted, StorageError, LocalIOError: as for ``transfer``.
        """
        self._announced = first is not None
        self._received = 0
        try:
            try:
                async with anyio.create_task_group() as group:
                    group.start_soon(self._recorder)
                    async with anyio.create_task_group() as workers:
                        await self._start_workers(group, workers, first)
                    group.cancel_scope.cancel()
            except BaseExceptionGroup as group_error:
                raise _most_telling(group_error) from None
            if self._sink is None:  # nothing was missing: no request at all
                await self._ensure_sink()
            assert self._sink is not None
            if not self._schedule.complete:
                raise _Retry("segments left unfetched", code="truncated")
            sha256, md5 = await run_local(self._sink.finish)
        finally:
            with anyio.CancelScope(shield=True):
                await self._save()
                if self._sink is not None:
                    await anyio.to_thread.run_sync(self._sink.close)
        state = self._state
        state.size = state.expected_size = self._total
        state.sha256, state.md5 = sha256, md5
        state.block_crcs = self._sink.block_crcs()
        state.resumed_from = 0
        return state

    async def _start_workers(
        self,
        group: anyio.abc.TaskGroup,
        workers: anyio.abc.TaskGroup,
        first: aiohttp.ClientResponse | None,
    ) -> None:
        """Start the first connections (and the ramp that may add the others).

        With ``first`` (the open answer to ``bytes=0-``) its connection is the lead: it reads on
        through every range that nobody else took, and the second connection takes the last
        range (:meth:`~batch_export.segments.Schedule.claim_tail`), so where one stream already
        runs as fast as the process can go the download stays one stream plus one short range.
        """
        wanted = self._job.connections
        start_now = wanted if not self._d.ramp else min(wanted, _FIRST_CONNECTIONS)
        if first is not None:
            claim = self._schedule.claim()
            assert claim is not None and claim[0] == 0
            await self._ensure_sink()
            workers.start_soon(self._worker, first, _Claim(*claim, claim[0]), True)
            tail = self._schedule.claim_tail()
            if tail is not None:
                workers.start_soon(self._worker, None, _Claim(*tail, tail[0]), False)
            start_now -= 2
        else:
            workers.start_soon(self._worker, None, None, True)
            start_now -= 1
        for _ in range(start_now):
            workers.start_soon(self._worker, None, None, False)
        if self._d.ramp:
            group.start_soon(self._ramp, workers)
        else:
            self._judged.set()

    async def _ramp(self, workers: anyio.abc.TaskGroup) -> None:
        """Open the other connections once the first two show that more would help.

        Extra streams pay off where each connection is capped (object stores cap each one at
        tens of MB/s; long round trips cap a TCP stream). Where one stream is fast (a fast link),
        or this process already moves a lot (several downloads at once), the event loop thread
        is the limit and more streams only add wake-ups, smaller reads per MiB, writes racing
        for the file's lock and bytes read back for the hash (profiled, see
        ``benchmarks/RESULTS.md``). So over each :data:`_RAMP_PROBE` seconds (real time) the
        rate per working connection and the process's rate are measured; when both are below
        ``fast_connection`` and ``fast_process`` the other connections open at once (a window
        in which no byte came says nothing, and is not counted); else the download is judged
        fast (the second connection stops after its range, the lead reads on) and the check
        repeats while ranges are left.
        """
        downloader = self._d
        try:
            while self._schedule.unclaimed:
                mine, everyone = self._received, downloader.bytes_received
                wall = time.perf_counter()
                await anyio.sleep(_RAMP_PROBE)
                seconds = max(1e-9, time.perf_counter() - wall)
                if self._received == mine:
                    continue  # no byte yet (first-byte latency, a busy loop): no evidence
                per_connection = (self._received - mine) / seconds / max(1, self._active)
                process = (downloader.bytes_received - everyone) / seconds
                fast = per_connection >= downloader.fast_connection
                if not fast and process < downloader.fast_process:
                    self._fast = False
                    for _ in range(self._job.connections - self._active):
                        workers.start_soon(self._worker, None, None, False)
                    return
                self._fast = True
                self._judged.set()
        finally:
            self._judged.set()

    async def _recorder(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty = anyio.Event()
            await self._save()

    async def _save(self) -> None:
        snapshot = self._schedule.state
        if snapshot != self._saved:
            self._saved = snapshot
            await self._job.on_segments(snapshot)

    async def _ensure_sink(self) -> RangeSink:
        async with self._sink_lock:
            if self._sink is None:
                md5 = self._state.expected_md5 is not None
                progress = self._schedule.state
                sink = await run_local(
                    functools.partial(RangeSink, self._job.part, self._job.root, progress, md5=md5)
                )
                if progress.done and not sink.kept:
                    await anyio.to_thread.run_sync(sink.close)
                    raise _Retry(
                        "the .part was replaced", code="part_replaced", single=True, delay=False
                    )
                self._sink = sink
            return self._sink

    async def _worker(
        self, first: aiohttp.ClientResponse | None, claim: _Claim | None, lead: bool
    ) -> None:
        """One connection: fetch claimed ranges until none is left.

        A connection other than the lead also stops once the download is judged fast: then
        the lead alone reads on.
        """
        self._active += 1
        self._state.connections = max(self._state.connections, self._active)
        try:
            await self._work(first, claim, lead)
        finally:
            self._active -= 1

    async def _work(
        self, first: aiohttp.ClientResponse | None, claim: _Claim | None, lead: bool
    ) -> None:
        budget = self._d._retry.budget(self._job.job_key)
        while True:
            if claim is None:
                if not lead and not await self._wanted():
                    return
                taken = self._schedule.claim()
                if taken is None:
                    return
                claim = _Claim(*taken, taken[0])
            try:
                if first is not None:
                    response, first = first, None
                    try:
                        await self._copy(response, claim, open_ended=True)
                    finally:
                        response.release()
                else:
                    await self._fetch(claim)
            except _Retry as exc:
                self._schedule.release(claim.reached, claim.stop)
                claim = None
                if exc.single:
                    raise
                await budget.spend(exc, retry_after=exc.retry_after, backoff=exc.delay)
                Downloader._check_expiry(self._job)
                continue
            except BaseException:
                self._schedule.release(claim.reached, claim.stop)
                raise
            claim = None
            budget = self._d._retry.budget(self._job.job_key)

    async def _wanted(self) -> bool:
        """Whether a connection other than the lead should claim another range."""
        if not self._schedule.unclaimed:
            return False
        await self._judged.wait()
        return not self._fast

    async def _fetch(self, claim: _Claim) -> None:
        headers = {
            "Accept-Encoding": "identity",
            "Range": f"bytes={claim.reached}-{claim.stop - 1}",
            "If-Range": self._etag,
        }
        try:
            async with self._d._get(self._job.url, headers) as resp:
                await self._check(resp, claim.reached, claim.stop)
                await self._ensure_sink()
                if not self._announced:
                    self._announced = True
                    await self._job.on_attempt(
                        self._schedule.state.done_bytes, self._etag, self._total
                    )
                await self._copy(resp, claim)
        except (_Retry, JobError):
            raise
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise _Retry(
                "no data from storage for read_timeout (stalled)", code="stalled"
            ) from None
        except aiohttp.ClientPayloadError:
            raise _Retry("connection broke mid-body", code="truncated") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise self._d._network_failure(exc, self._job.url) from None

    async def _check(self, resp: aiohttp.ClientResponse, start: int, stop: int) -> None:
        """Raise unless ``resp`` is the 206 for ``[start, stop)`` of the entity begun with."""
        status = resp.status
        if status == 206:
            why = _range_answer(resp, start, stop, self._etag, self._total)
            if why is None and not resp.headers.get("Content-Type", "").lower().startswith(
                "text/html"
            ):
                if self._state.expected_md5 is None and self._sink is None:
                    self._state.expected_md5 = _promised_md5(resp, full=False)
                return
            if why is None:
                raise _Retry("storage answered an HTML page", code="html_body", http_status=206)
            raise _Retry(f"segments disagree: {why}", code="segment_mismatch", single=True)
        if status == 416:
            raise _Retry("storage refused a segment's range (416)", code="bad_range", single=True)
        if status == 200:
            raise _Retry(
                "storage answered a range request with the whole entity (changed, or no ranges)",
                code="range_ignored",
                single=True,
            )
        await self._d._accept(resp, Transfer(), start)  # raises for every other status
        raise _Retry(f"storage answered HTTP {status}", code=f"http_{status}", single=True)

    async def _copy(
        self, resp: aiohttp.ClientResponse, claim: _Claim, *, open_ended: bool = False
    ) -> None:
        """Write the body's bytes for ``[claim.reached, claim.stop)`` at their offsets.

        The received chunks are gathered into reused buffers of :data:`PIECE_SIZE` bytes (one
        CRC block), each written with one ``pwrite`` in a worker thread while the next piece
        arrives; the download's budget of buffers bounds how many exist at once. Stops reading at
        ``claim.stop``, unless the body runs on (``open_ended``: the answer to ``bytes=0-``) and
        the next range is still unclaimed: then the claim grows by it and reading goes on. On a
        failure, what was received is still written up to the last whole block (the rest is
        fetched again).
        """
        piece: memoryview | None = None  # the buffer being filled (its place in the budget)
        fill, piece_start = 0, claim.reached
        pending: asyncio.Task[None] | None = None
        ok = False
        try:
            async for chunk in resp.content.iter_any():
                view = memoryview(chunk)
                while view:
                    if piece is None:
                        piece = await self._take_buffer()
                    count = min(PIECE_SIZE - fill, len(view), claim.stop - piece_start - fill)
                    piece[fill : fill + count] = view[:count]
                    fill += count
                    self._received += count
                    self._d.bytes_received += count
                    view = view[count:]
                    if fill == PIECE_SIZE or piece_start + fill == claim.stop:
                        if pending is not None:
                            await asyncio.shield(pending)
                        full, piece = piece, None
                        pending = asyncio.ensure_future(self._put(claim, piece_start, full, fill))
                        piece_start, fill = piece_start + fill, 0
                        if open_ended and piece_start == claim.stop:
                            claim.stop = self._schedule.extend(claim.stop) or claim.stop
                    if piece_start == claim.stop:
                        break
                if piece_start == claim.stop:
                    break
            ok = piece_start == claim.stop
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    if pending is not None:
                        await pending  # a failed write raises here
                    end = piece_start + fill
                    keep = fill if end == self._total else fill - fill % CRC_BLOCK
                    if piece is not None and keep and not ok:
                        full, piece = piece, None
                        await self._put(claim, piece_start, full, keep)
                finally:
                    if piece is not None:
                        self._give_buffer(piece)
        if not ok:
            raise _Retry(
                f"storage sent {claim.reached - claim.start} of the "
                f"{claim.stop - claim.start} bytes of a segment",
                code="truncated",
            )

    async def _take_buffer(self) -> memoryview:
        """A :data:`PIECE_SIZE` buffer for the next piece, once the download's budget allows."""
        await self._pieces.acquire()
        # Anonymous mmap: page-aligned, so the sink can write it with O_DIRECT.
        return self._spare.pop() if self._spare else memoryview(mmap.mmap(-1, PIECE_SIZE))

    def _give_buffer(self, buffer: memoryview) -> None:
        self._spare.append(buffer)
        self._pieces.release()

    async def _put(self, claim: _Claim, offset: int, buffer: memoryview, count: int) -> None:
        """Write ``buffer``'s first ``count`` bytes at ``offset``, record it, free the buffer."""
        assert self._sink is not None
        try:
            await run_local(self._sink.write, offset, buffer[:count])
        finally:
            self._give_buffer(buffer)
        claim.reached = offset + count
        self._schedule.progress(offset, offset + count)
        self._job.on_bytes(count)
        self._unsaved += count
        # Each commit costs the store thread a wake-up: with fewer connections working than
        # allowed, the progress of the idle ones' share is committed at once, so a kill -9 still
        # costs at most ``connections`` pieces in all (in flight and not yet committed).
        idle = self._job.connections - self._active
        if self._unsaved >= PIECE_SIZE * max(1, idle):
            self._unsaved = 0
            self._dirty.set()


def _most_telling(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The exception of a failed task group to re-raise (a cancellation or bug wins)."""
    leaves: list[BaseException] = []

    def walk(error: BaseException) -> None:
        if isinstance(error, BaseExceptionGroup):
            for inner in error.exceptions:
                walk(inner)
        else:
            leaves.append(error)

    walk(group)
    for leaf in leaves:
        if not isinstance(leaf, JobError):
            return leaf
    for kind in _PRIORITY:
        for leaf in leaves:
            if isinstance(leaf, kind) and not (isinstance(leaf, _Retry) and not leaf.single):
                return leaf
    return leaves[0]
