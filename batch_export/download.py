"""Streaming a package from its signed URL to ``<final>.part``, verifying it, and committing it.

The rules (SPEC §4): GET the URL byte for byte, with no API header, never HEAD; no total timeout,
``read_timeout`` between bytes; no content decoding; pieces of at least 1 MiB; resume with
``Range``/``If-Range``; verify length, MD5 (``Content-MD5``, ``x-goog-hash``, plain-hex ``ETag``),
zip signature and every member's CRC; fsync, atomic rename, fsync the folder.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import errno
import functools
import hashlib
import os
import random
import re
import struct
import zipfile
import zlib
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

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
    VerificationError,
)
from batch_export.http import HttpSession, describe_failure
from batch_export.retry import RetryPolicy
from batch_export.urls import url_refusal

__all__ = [
    "CRC_BLOCK",
    "PIECE_SIZE",
    "Downloader",
    "Transfer",
    "commit_part",
    "discard_part",
    "part_path",
    "verify_package",
]

#: Bytes handed to the writer thread at once (SPEC §4: at least 1 MiB).
PIECE_SIZE = 1024 * 1024
#: Block size of the CRC-32s kept while streaming, from which members' CRCs are checked (bytes).
CRC_BLOCK = 1024 * 1024
#: Pieces of one download received but not yet written, at most.
_PIECES_IN_FLIGHT = 3
#: Threads that hash pieces while the writer threads write them (shared by all downloads).
_HASH_THREADS = 8
_hashers: ThreadPoolExecutor | None = None
#: Bytes written between two requests to start writeback (see ``_PartSink._start_writeback``).
_WRITEBACK_WINDOW = 32 * 1024 * 1024
_FADVISE: Callable[[int, int, int, int], None] | None = getattr(os, "posix_fadvise", None)
_MAX_REDIRECTS = 5
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
_HEX32 = re.compile(r"^[0-9a-fA-F]{32}$")
_ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")


def part_path(final: Path) -> Path:
    """Return the ``.part`` path beside ``final``."""
    return final.with_name(final.name + ".part")


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
    """

    size: int = 0
    sha256: str = ""
    md5: str = ""
    expected_size: int | None = None
    expected_md5: str | None = None
    etag: str | None = None
    resumed_from: int = 0
    block_crcs: list[int] | None = None


class _PartSink:
    """The ``.part`` file plus running hashes; every method runs in a worker thread.

    SHA-256 always; MD5 only once a server promised one (:meth:`want_md5` catches up on the bytes
    already written), since it costs more CPU than the rest of the download path together. A piece
    is hashed on a helper thread while this thread writes it (both release the GIL), so it costs
    the longer of the two, not their sum.
    """

    def __init__(self, path: Path, resume_from: int, *, md5: bool = True) -> None:
        self.path = path
        self._sha = hashlib.sha256()
        self._md5: Any = hashlib.md5(usedforsecurity=False) if md5 else None
        self.size = 0
        self._written_back = 0
        self._crcs: list[int] = []  # CRC-32 of each complete CRC_BLOCK
        self._crc = 0  # CRC-32 of the incomplete block at the end
        self._crc_fill = 0  # bytes in that block
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: BinaryIO = open(path, "r+b" if resume_from and path.exists() else "w+b")
        if resume_from:
            self._rehash(resume_from)

    def _rehash(self, upto: int) -> None:
        self._file.seek(0)
        while self.size < upto:
            block = self._file.read(min(PIECE_SIZE * 4, upto - self.size))
            if not block:
                break
            self._hash(block)
            self.size += len(block)
        self._file.seek(self.size)
        self._file.truncate()
        self._written_back = self.size

    def want_md5(self) -> None:
        """Keep an MD5 from now on, first hashing the bytes already in the file."""
        if self._md5 is not None:
            return
        md5 = hashlib.md5(usedforsecurity=False)
        self._file.flush()
        with open(self.path, "rb") as handle:
            left = self.size
            while left > 0:
                block = handle.read(min(PIECE_SIZE * 4, left))
                if not block:
                    raise OSError(errno.EIO, f"{self.path} is shorter than the bytes written")
                md5.update(block)
                left -= len(block)
        self._md5 = md5

    def reset(self) -> None:
        """Throw away the bytes so far and start again from 0."""
        self._file.seek(0)
        self._file.truncate()
        self._sha, self.size, self._written_back = hashlib.sha256(), 0, 0
        self._crcs, self._crc, self._crc_fill = [], 0, 0
        if self._md5 is not None:
            self._md5 = hashlib.md5(usedforsecurity=False)

    def _hash(self, data: bytes) -> None:
        self._sha.update(data)
        self._crc_update(data)
        if self._md5 is not None:
            self._md5.update(data)

    def _crc_update(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            take = CRC_BLOCK - self._crc_fill
            self._crc = zlib.crc32(view[:take], self._crc)
            self._crc_fill += min(take, len(view))
            view = view[take:]
            if self._crc_fill == CRC_BLOCK:
                self._crcs.append(self._crc)
                self._crc, self._crc_fill = 0, 0

    def block_crcs(self) -> list[int]:
        """CRC-32 of each :data:`CRC_BLOCK`-byte block written so far (the last may be short)."""
        return [*self._crcs, self._crc] if self._crc_fill else list(self._crcs)

    def write(self, data: bytes) -> None:
        """Append ``data`` and hash it, the hashing on helper threads meanwhile."""
        global _hashers
        if _hashers is None:
            _hashers = ThreadPoolExecutor(_HASH_THREADS, thread_name_prefix="batch-export-hash")
        hashing = [_hashers.submit(self._sha.update, data)]
        if self._md5 is not None:
            hashing.append(_hashers.submit(self._md5.update, data))
        try:
            self._file.write(data)
            self._crc_update(data)  # the cheapest digest, here: the piece costs the same on both
        finally:
            for job in hashing:
                job.result()  # never leave one running, even when the write failed
        self.size += len(data)
        if self.size - self._written_back >= _WRITEBACK_WINDOW:
            self._start_writeback()

    def _start_writeback(self) -> None:
        """Ask the kernel to start writing the bytes so far to disk, without waiting.

        Then the fsync at the end finds little left to write, and a long download never piles up
        gigabytes of dirty pages (Linux ``POSIX_FADV_DONTNEED`` starts writeback of dirty pages
        and leaves them cached).
        """
        if _FADVISE is None:
            return
        self._file.flush()
        start, self._written_back = self._written_back, self.size
        try:
            _FADVISE(self._file.fileno(), start, self.size - start, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass  # advice only

    def finish(self) -> tuple[str, str]:
        """Flush and fsync the file; return ``(sha256, md5)`` hex digests (md5 "" if not kept)."""
        self._file.flush()
        os.fsync(self._file.fileno())
        return self._sha.hexdigest(), "" if self._md5 is None else self._md5.hexdigest()

    def close(self) -> None:
        """Close the file (idempotent; never raises).

        After :meth:`finish` there is nothing left to flush. On a failed transfer a flush error
        here (disk full again) only loses bytes at the end; what is on disk stays a prefix.
        """
        try:
            self._file.close()
        except OSError:
            pass

    def discard_if_empty(self) -> None:
        """Remove the ``.part`` if no byte was ever written to it (nothing to resume)."""
        if self.size == 0:
            self.close()
            try:
                self.path.unlink()
            except OSError:
                pass


@dataclass(slots=True)
class _SinkHolder:
    """The open ``.part`` of one transfer, kept across its attempts (closed at the end)."""

    sink: _PartSink | None = None


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
    ) -> None:
        self._session = session
        self._clock = clock
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
    ) -> Transfer:
        """Stream ``url`` into ``part``, resuming it when ``etag`` says its bytes are still valid.

        Args:
            url: the signed URL, used byte for byte.
            part: the ``.part`` path; kept on failure for a later resume.
            etag: ETag of the bytes already in ``part`` (``None``: start from 0).
            job_key: for error attribution.
            url_expired: returns True when the URL is known to be expired (checked before retries).
            on_attempt: awaited with ``(offset, etag, total bytes or None)`` once a response is accepted, before its
                body is written, so the caller can record the state and the ETag.
            on_bytes: called with each piece's size in bytes (progress).

        Returns:
            The :class:`Transfer`, with the ``.part`` complete as far as the server said.

        Raises:
            UrlRejected: storage answered 400/401/403, or the URL expired before a retry.
            RetriesExhausted: retryable errors beyond the budget.
            StorageError: a non-retryable answer (404, 410, …).
            LocalIOError: the disk failed us.
        """
        state = Transfer(etag=etag)
        holder = _SinkHolder()
        budget = self._retry.budget(job_key)
        try:
            while True:
                offset = await self._resume_offset(part, state, holder.sink)
                try:
                    sink = await self._attempt(
                        url, part, state, holder, offset, on_attempt, on_bytes
                    )
                    state.sha256, state.md5 = await _local(sink.finish)
                    state.size = sink.size
                    state.block_crcs = sink.block_crcs()
                    return state
                except _Retry as exc:
                    if exc.restart:
                        state.etag = None
                    # The server's own wait (0-900 s) wins over the backoff.
                    await budget.spend(exc, retry_after=exc.retry_after, backoff=exc.delay)
                    if url_expired():
                        raise UrlRejected(
                            "signed URL expired before the download could resume",
                            code="url_expired",
                            job_key=job_key,
                        ) from None
                except JobError as exc:
                    exc.job_key = job_key
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

    async def _resume_offset(self, part: Path, state: Transfer, sink: _PartSink | None) -> int:
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
            raise _local_io_error(exc, "") from None

    async def _attempt(
        self,
        url: str,
        part: Path,
        state: Transfer,
        holder: _SinkHolder,
        offset: int,
        on_attempt: Callable[[int, str | None, int | None], Awaitable[None]],
        on_bytes: Callable[[int], None],
    ) -> _PartSink:
        headers = {"Accept-Encoding": "identity"}
        if offset > 0 and state.etag:
            headers["Range"] = f"bytes={offset}-"
            headers["If-Range"] = state.etag
        else:
            offset = 0
        try:
            async with self._get(url, headers) as resp:
                start = await self._accept(resp, state, offset)
                promised = state.expected_md5 is not None
                if holder.sink is None:
                    holder.sink = await _local(
                        functools.partial(_PartSink, part, start, md5=promised)
                    )
                elif holder.sink.size != start:
                    await _local(holder.sink.reset)
                sink = holder.sink
                if promised:
                    await _local(sink.want_md5)
                await on_attempt(start, state.etag, state.expected_size)
                await self._stream(resp, sink, on_bytes)
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
            fault = describe_failure(
                exc, url=url, origin="storage", proxy=self._session.proxies.proxy_for(url)
            )
            if not fault.retryable:
                raise StorageError(fault.message, code=fault.code) from None
            raise _Retry(fault.message, code=fault.code) from None

    def _get(self, url: str, headers: dict[str, str]) -> Any:
        return _RedirectingGet(self, url, headers)

    async def _accept(self, resp: aiohttp.ClientResponse, state: Transfer, offset: int) -> int:
        """Decide what the answer means; return the offset the body starts at."""
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
        self, resp: aiohttp.ClientResponse, sink: _PartSink, on_bytes: Callable[[int], None]
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
            await _local(sink.write, data)

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
                while writes:
                    await settle_oldest()  # the first failed write raises here
                if chunks:
                    data = b"".join(chunks)
                    await _local(sink.write, data)
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
    ) -> None:
        super().__init__(message, code=code, http_status=http_status)
        self.restart = restart
        self.delay = delay
        self.retry_after = retry_after


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
    """Describe a storage refusal from its S3/GCS/Azure XML ``Code``/``Message`` when present."""
    fields = {
        m.group(1).decode(): m.group(2).decode("utf-8", "replace")
        for m in _XML_FIELD.finditer(body)
    }
    detail = ": ".join(v for v in (fields.get("Code"), fields.get("Message")) if v)
    return f"storage refused the signed URL (HTTP {status})" + (f": {detail}" if detail else "")


class _LocalFailure(LocalIOError):
    """A local file operation failed (disk full, read-only, permission)."""


async def _local(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a file operation in a worker thread, translating OSError into LocalIOError."""
    try:
        return await anyio.to_thread.run_sync(fn, *args)
    except OSError as exc:
        raise _local_io_error(exc, "") from None


def _local_io_error(exc: OSError, job_key: str) -> LocalIOError:
    code = {
        errno.ENOSPC: "disk_full",
        errno.EDQUOT: "disk_full",
        errno.EROFS: "read_only_output",
        errno.EACCES: "permission_denied",
        errno.EPERM: "permission_denied",
    }.get(exc.errno or 0, "local_io")
    return LocalIOError(
        f"cannot write the package: {os.strerror(exc.errno) if exc.errno else type(exc).__name__}",
        code=code,
        job_key=job_key,
    )


def verify_package(part: Path, transfer: Transfer) -> None:
    """Check the ``.part`` against what the server promised and against the zip format.

    Runs in a worker thread. Every member's CRC is checked: for stored members from the block
    CRCs kept while streaming (``transfer.block_crcs``), reading only their local headers and the
    partial blocks at their edges; for the others (or without block CRCs) by reading them, as
    :meth:`zipfile.ZipFile.testzip` does.

    Raises:
        VerificationError: ``size_mismatch``, ``md5_mismatch``, ``not_a_zip``, ``bad_zip`` or
            ``zip_crc``.
        LocalIOError: the ``.part`` cannot be read.
    """
    if transfer.expected_size is not None and transfer.size != transfer.expected_size:
        raise VerificationError(
            f"got {transfer.size} bytes, the server announced {transfer.expected_size}",
            code="size_mismatch",
        )
    if transfer.expected_md5 and transfer.md5 != transfer.expected_md5:
        raise VerificationError("MD5 of the bytes does not match the server's", code="md5_mismatch")
    try:
        with open(part, "rb") as handle:
            signature = handle.read(4)
    except OSError as exc:
        raise _local_io_error(exc, "") from None
    if signature not in _ZIP_SIGNATURES:
        raise VerificationError("the body is not a zip package", code="not_a_zip")
    blocks = transfer.block_crcs
    if blocks is not None and len(blocks) != -(-transfer.size // CRC_BLOCK):
        blocks = None  # not the bytes in the file: read them instead
    try:
        with zipfile.ZipFile(part) as archive, open(part, "rb") as handle:
            bad = _test_members(archive, handle, blocks)
    except Exception as exc:  # zipfile raises many types on hostile input
        raise VerificationError(
            f"the zip package is unreadable ({type(exc).__name__})", code="bad_zip"
        ) from None
    if bad is not None:
        raise VerificationError(f"CRC check failed for member {bad[:200]!r}", code="zip_crc")


def _test_members(
    archive: zipfile.ZipFile, handle: BinaryIO, blocks: list[int] | None
) -> str | None:
    """Return the name of the first member whose CRC is wrong, like ``testzip``; else None."""
    size = os.fstat(handle.fileno()).st_size
    for info in archive.infolist():
        if blocks is None or not _plain_stored(info):
            try:
                with archive.open(info) as member:
                    while member.read(PIECE_SIZE):
                        pass
            except zipfile.BadZipFile:
                return info.filename
            continue
        handle.seek(info.header_offset)
        header = handle.read(_LOCAL_HEADER.size)
        if len(header) != _LOCAL_HEADER.size:
            raise zipfile.BadZipFile("truncated local file header")
        fields = _LOCAL_HEADER.unpack(header)
        if fields[0] != b"PK\x03\x04":
            return info.filename  # as zipfile: "Bad magic number for file header"
        name = handle.read(fields[10])
        encoding = "utf-8" if fields[3] & 0x800 else "cp437"
        if name.decode(encoding) != info.orig_filename:
            return info.filename  # as zipfile: the names in directory and header differ
        start = info.header_offset + _LOCAL_HEADER.size + fields[10] + fields[11]
        end = start + info.compress_size
        if end > size:
            raise zipfile.BadZipFile(f"member {info.filename!r} runs past the end of the file")
        if _range_crc(handle, blocks, start, end) != info.CRC:
            return info.filename
    return None


def _plain_stored(info: zipfile.ZipInfo) -> bool:
    """A stored member without encryption or patch data, with equal sizes (CRC of its bytes)."""
    return (
        info.compress_type == zipfile.ZIP_STORED
        and not info.flag_bits & 0x61  # encrypted, compressed patched data, strong encryption
        and info.compress_size == info.file_size
    )


#: A zip local file header (APPNOTE 4.3.7): signature, versions, flags, method, time, date, CRC,
#: sizes, name length, extra length.
_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")


def _range_crc(handle: BinaryIO, blocks: list[int], start: int, end: int) -> int:
    """CRC-32 of bytes ``[start, end)``: whole blocks from ``blocks``, partial ones read."""
    crc = 0
    position = start
    while position < end:
        index, offset = divmod(position, CRC_BLOCK)
        if offset == 0 and position + CRC_BLOCK <= end:
            crc = _shift_crc(crc) ^ blocks[index]
            position += CRC_BLOCK
            continue
        count = min(end, (index + 1) * CRC_BLOCK) - position
        handle.seek(position)
        data = handle.read(count)
        if len(data) != count:
            raise zipfile.BadZipFile("the file ended inside a member")
        crc = zlib.crc32(data, crc)
        position += count
    return crc


_SHIFT_TABLES: tuple[list[int], ...] = ()


def _shift_crc(crc: int) -> int:
    """Advance a CRC-32 over :data:`CRC_BLOCK` bytes, so ``_shift_crc(crc(A)) ^ crc(B) == crc(AB)``.

    That is zlib's ``crc32_combine`` for a block: the advance is linear over GF(2), so it is
    tabulated per byte of the register from 32 basis images, each found with zlib itself as
    ``crc32(zeros, x) ^ crc32(zeros, 0)``.
    """
    global _SHIFT_TABLES
    if not _SHIFT_TABLES:  # built once; two threads building at once build the same tables
        zeros = bytes(CRC_BLOCK)
        base = zlib.crc32(zeros, 0)
        images = [zlib.crc32(zeros, 1 << bit) ^ base for bit in range(32)]
        tables = []
        for byte in range(4):
            table = [0] * 256
            for value in range(1, 256):
                low = value & -value
                table[value] = table[value ^ low] ^ images[8 * byte + low.bit_length() - 1]
            tables.append(table)
        _SHIFT_TABLES = tuple(tables)
    t0, t1, t2, t3 = _SHIFT_TABLES
    return t0[crc & 0xFF] ^ t1[(crc >> 8) & 0xFF] ^ t2[(crc >> 16) & 0xFF] ^ t3[crc >> 24]


def commit_part(part: Path, final: Path) -> None:
    """Fsync'ed ``.part`` -> ``final`` atomically, then fsync the folder (worker thread).

    Raises:
        LocalIOError: the rename or the folder fsync failed.
    """
    try:
        os.replace(part, final)
        fd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise _local_io_error(exc, "") from None


def discard_part(part: Path) -> None:
    """Remove a ``.part`` (no error if it is gone).

    Raises:
        LocalIOError: it is there and cannot be removed.
    """
    try:
        part.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise _local_io_error(exc, "") from None
