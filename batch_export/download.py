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
import ctypes
import errno
import functools
import hashlib
import itertools
import logging
import os
import random
import re
import struct
import threading
import time
import zipfile
import zlib
from collections.abc import Awaitable, Callable, Sequence
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
from batch_export.partlock import lock_part
from batch_export.redact import redact_patterns
from batch_export.retry import RetryPolicy
from batch_export.safepath import PathProblem, open_dir, open_file, replace_in, unlink_in
from batch_export.segments import UNIT_MIN, Ranges, Schedule, SegmentState, add_range
from batch_export.urls import url_refusal

__all__ = [
    "CRC_BLOCK",
    "PIECE_SIZE",
    "SEGMENT_MIN",
    "Downloader",
    "Transfer",
    "commit_part",
    "discard_part",
    "local_io_error",
    "part_path",
    "verify_package",
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
#: Bytes handed to the writer thread at once (SPEC §4: at least 1 MiB).
PIECE_SIZE = 1024 * 1024
#: Block size of the CRC-32s kept while streaming, from which members' CRCs are checked (bytes).
CRC_BLOCK = 1024 * 1024
#: Pieces of one download received but not yet written, at most.
_PIECES_IN_FLIGHT = 3
#: Threads that hash pieces while the writer threads write them (shared by all downloads).
_HASH_THREADS = 8
_hashers: ThreadPoolExecutor | None = None
_hashers_lock = threading.Lock()


#: Bytes written between two requests to start writeback (see ``_PartSink._start_writeback``).
_WRITEBACK_WINDOW = 32 * 1024 * 1024
_FADVISE: Callable[[int, int, int, int], None] | None = getattr(os, "posix_fadvise", None)
_MAX_REDIRECTS = 5
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
_HEX32 = re.compile(r"^[0-9a-fA-F]{32}$")
_ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")
#: Read errors that are the disk's or the process's, not the zip's (an ``EINVAL`` seek is the zip's).
_READ_ERRNOS = frozenset({errno.EIO, errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EACCES})


def _hash_pool() -> ThreadPoolExecutor:
    """The process's pool of hashing threads (made on first use, shared by every download)."""
    global _hashers
    with _hashers_lock:
        if _hashers is None:
            _hashers = ThreadPoolExecutor(_HASH_THREADS, thread_name_prefix="batch-export-hash")
        return _hashers


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


class _PartSink:
    """The ``.part`` file plus running hashes; every method runs in a worker thread.

    SHA-256 always; MD5 only once a server promised one (:meth:`want_md5` catches up on the bytes
    already written), since it costs more CPU than the rest of the download path together. A piece
    is hashed on a helper thread while this thread writes it (both release the GIL), so it costs
    the longer of the two, not their sum.
    """

    def __init__(
        self, path: Path, resume_from: int, *, md5: bool = True, root: Path | None = None
    ) -> None:
        self.path = path
        self._sha = hashlib.sha256()
        self._md5: Any = hashlib.md5(usedforsecurity=False) if md5 else None
        self.size = 0
        self._written_back = 0
        self._crcs: list[int] = []  # CRC-32 of each complete CRC_BLOCK
        self._crc = 0  # CRC-32 of the incomplete block at the end
        self._crc_fill = 0  # bytes in that block
        fd, kept = _open_part(path, root, keep=resume_from > 0)
        self._file: BinaryIO = os.fdopen(fd, "r+b")
        if resume_from and kept:
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
        fd, position = self._file.fileno(), 0
        while position < self.size:
            block = os.pread(fd, min(PIECE_SIZE * 4, self.size - position), position)
            if not block:
                raise OSError(errno.EIO, f"{self.path} is shorter than the bytes written")
            md5.update(block)
            position += len(block)
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
        pool = _hash_pool()
        hashing = [pool.submit(self._sha.update, data)]
        if self._md5 is not None:
            hashing.append(pool.submit(self._md5.update, data))
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
                    state.sha256, state.md5 = await _local(done.finish)
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
        self, job: _Job, state: Transfer, holder: _SinkHolder, offset: int
    ) -> _PartSink | Transfer:
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
                    holder.sink = await _local(
                        functools.partial(_PartSink, job.part, start, md5=promised, root=job.root)
                    )
                    if holder.sink.size != start:  # what was there is not ours to resume
                        raise _Retry(
                            "the .part was replaced; starting again from 0",
                            code="part_replaced",
                            restart=True,
                            delay=False,
                        )
                elif holder.sink.size != start:
                    await _local(holder.sink.reset)
                sink = holder.sink
                if promised:
                    await _local(sink.want_md5)
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


class _LocalFailure(LocalIOError):
    """A local file operation failed (disk full, read-only, permission)."""


async def _local(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a file operation in a worker thread, translating OSError into LocalIOError."""
    try:
        return await anyio.to_thread.run_sync(fn, *args)
    except OSError as exc:
        raise _local_io_error(exc, "") from None


#: ``errno`` -> error code of a local failure; anything else is ``local_io``.
_LOCAL_CODES = {
    errno.ENOSPC: "disk_full",
    errno.EDQUOT: "disk_full",
    errno.EROFS: "read_only_output",
    errno.EACCES: "permission_denied",
    errno.EPERM: "permission_denied",
    errno.EMFILE: "too_many_open_files",
    errno.ENFILE: "too_many_open_files",
    errno.ENAMETOOLONG: "path_too_long",
}


def _local_io_error(exc: OSError, job_key: str) -> LocalIOError:
    """Translate a local OS error; a :class:`PathProblem` keeps its own code and message.

    ``too_many_open_files`` (EMFILE/ENFILE) is a passing condition of the process, not of the
    package or the disk: callers may back off and try again.
    """
    if isinstance(exc, PathProblem):
        return LocalIOError(
            f"cannot write the package: {exc.strerror}", code=exc.code, job_key=job_key
        )
    code = _LOCAL_CODES.get(exc.errno or 0, "local_io")
    return LocalIOError(
        f"cannot write the package: {os.strerror(exc.errno) if exc.errno else type(exc).__name__}",
        code=code,
        job_key=job_key,
    )


def _open_part(part: Path, root: Path | None, *, keep: bool) -> tuple[int, bool]:
    """Open ``part`` read-write, never through a symlink (see :mod:`batch_export.safepath`).

    Returns ``(fd, kept)``: ``kept`` says whether its earlier bytes were kept. The ``.part`` is
    locked (:func:`batch_export.partlock.lock_part`) before a byte of it changes.

    Raises:
        PartBusy: another process holds its lock.
    """
    dir_fd = open_dir(part.parent, root)
    try:
        fd, kept = open_file(dir_fd, part.name, keep=True)  # emptied below, once it is ours
    finally:
        os.close(dir_fd)
    try:
        lock_part(fd, part)  # held until fd is closed (SPEC §9: one writer per .part)
        if not keep and kept:
            os.ftruncate(fd, 0)
            kept = False
    except BaseException:
        os.close(fd)
        raise
    return fd, kept


def _read_part(part: Path) -> BinaryIO:
    """Open ``part`` for reading, never through a symlink (its last component)."""
    fd = os.open(part, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NOCTTY)
    return os.fdopen(fd, "rb")


def local_io_error(exc: OSError) -> LocalIOError:
    """Translate a local OS error into :class:`LocalIOError` with its code (``disk_full``, …)."""
    return _local_io_error(exc, "")


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
    try:  # both handles first: a failure to open is about this process, never about the zip
        archive_file, handle = _read_part(part), _read_part(part)
    except OSError as exc:
        raise _local_io_error(exc, "") from None
    with archive_file, handle:
        try:
            signature = handle.read(4)
        except OSError as exc:
            raise _local_io_error(exc, "") from None
        if signature not in _ZIP_SIGNATURES:
            raise VerificationError("the body is not a zip package", code="not_a_zip")
        blocks = transfer.block_crcs
        if blocks is not None and len(blocks) != -(-transfer.size // CRC_BLOCK):
            blocks = None  # not the bytes in the file: read them instead
        try:
            with zipfile.ZipFile(archive_file) as archive:
                bad = _test_members(archive, handle, blocks)
        except OSError as exc:
            if exc.errno in _READ_ERRNOS:  # the disk or the process, not the bytes
                raise _local_io_error(exc, "") from None
            raise VerificationError(
                f"the zip package is unreadable ({type(exc).__name__})", code="bad_zip"
            ) from None
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


def commit_part(part: Path, final: Path, *, root: Path | None = None) -> None:
    """Fsync'ed ``.part`` -> ``final`` atomically, then fsync the folder (worker thread).

    No folder below ``root`` (the output dir) is followed through a symlink; a symlink at
    ``final`` is replaced, not followed.

    Raises:
        LocalIOError: the rename or the folder fsync failed.
    """
    try:
        dir_fd = open_dir(final.parent, root)
        try:
            replace_in(dir_fd, part.name, final.name)
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise _local_io_error(exc, "") from None


def discard_part(part: Path, *, root: Path | None = None) -> None:
    """Remove a ``.part`` (no error if it is gone); a symlink there is removed, not followed.

    Raises:
        LocalIOError: it is there and cannot be removed.
    """
    try:
        if not part.parent.is_dir():
            return
        dir_fd = open_dir(part.parent, root)
        try:
            unlink_in(dir_fd, part.name)
        finally:
            os.close(dir_fd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise _local_io_error(exc, "") from None


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


def _load_fallocate() -> Callable[[int, int], None] | None:
    """``fallocate(fd, 0, 0, size)`` from the C library (Linux), or None where there is none."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        native = libc.fallocate64
    except (OSError, AttributeError):
        return None
    native.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]

    def fallocate(fd: int, size: int) -> None:
        if native(fd, 0, 0, size) != 0:
            number = ctypes.get_errno()
            raise OSError(number, os.strerror(number))

    return fallocate


_FALLOCATE = _load_fallocate()


def _pwrite_all(fd: int, parts: list[memoryview], offset: int) -> int:
    """Write every part, in order, from ``offset`` (``pwritev``, retried after short writes).

    Returns the bytes written.
    """
    views = collections.deque(part for part in parts if len(part))
    total = 0
    while views:
        count = os.pwritev(fd, list(itertools.islice(views, 1024)), offset + total)  # IOV_MAX
        total += count
        while count:
            if count >= len(views[0]):
                count -= len(views.popleft())
            else:
                views[0] = views[0][count:]
                count = 0
    return total


def _preallocate(fd: int, size: int) -> None:
    """Give the file ``size`` bytes: reserved where the file system allows, else sparse."""
    if os.fstat(fd).st_size >= size:
        return
    if _FALLOCATE is not None:
        try:
            _FALLOCATE(fd, size)
            return
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise
    os.ftruncate(fd, size)


class _RangeSink:
    """The ``.part`` of a segmented download; every method runs in a worker thread.

    Connections write whole :data:`CRC_BLOCK` blocks at their offsets (``pwrite``), each block's
    CRC-32 computed by its writer. SHA-256 (and MD5 once promised) follow the contiguous prefix
    from byte 0 (SPEC §4): the writer whose piece extends the prefix hashes it from memory, and
    bytes that other connections wrote beyond the prefix are read back (from the page cache)
    once the prefix reaches them. One thread at a time hashes; the others keep writing.

    Args:
        part: the ``.part`` path.
        root: the output dir (no symlinked folder below it is followed).
        state: what an earlier attempt left on disk (kept only if the file is still ours).
        md5: keep an MD5 too.
    """

    def __init__(self, part: Path, root: Path | None, state: SegmentState, *, md5: bool) -> None:
        fd, kept = _open_part(part, root, keep=bool(state.done))
        self._fd = fd
        self.kept = kept
        self.total = state.total
        self._done: Ranges = state.done if kept else ()
        self._sha = hashlib.sha256()
        self._md5: Any = hashlib.md5(usedforsecurity=False) if md5 else None
        self._hashed = 0
        self._written_back = 0
        self._crcs: list[int | None] = [None] * -(-state.total // CRC_BLOCK)
        self._lock = threading.Lock()
        self._hashing = False
        self._poisoned = False  # a failed write left the digests ahead of the disk
        self._buffer: bytearray | None = None
        try:
            _preallocate(fd, state.total)
        except BaseException:
            os.close(fd)
            raise

    def write(self, offset: int, data: memoryview | Sequence[memoryview]) -> None:
        """Write ``data`` (whole CRC blocks, or the entity's last bytes) at ``offset``.

        ``data`` may be one buffer or the list of parts of a piece, written with one ``pwritev``
        (no copy gathers them first).
        """
        parts = [data] if isinstance(data, memoryview) else list(data)
        with self._lock:
            at_prefix = not self._hashing and self._hashed == offset and not self._poisoned
            if at_prefix:
                self._hashing = True
        if at_prefix:
            self._write_hashing(offset, parts)
            self._follow(offset, [], 0)  # and whatever other connections wrote beyond it
            return
        size = _pwrite_all(self._fd, parts, offset)
        self._block_crcs(offset, parts)
        with self._lock:
            self._done = add_range(self._done, offset, offset + size)
            if self._hashing:
                return  # the thread hashing now reaches these bytes (or reads them back)
            self._hashing = True
        self._follow(offset, parts, size)

    def _write_hashing(self, offset: int, parts: list[memoryview]) -> None:
        """Write a piece that starts where the hashed prefix ends, hashing it meanwhile.

        The digests run on the shared hashing threads while this one writes and takes the
        blocks' CRCs (all release the GIL), so the piece costs the longest of them, not their
        sum. The caller holds the hashing role; it is kept on success. If the write fails the
        digests have taken bytes that are not on disk: the sink is poisoned (``finish`` raises).
        """
        pool = _hash_pool()
        hashing = [pool.submit(self._sha_parts, parts)]
        if self._md5 is not None:
            hashing.append(pool.submit(self._md5_parts, parts))
        try:
            try:
                size = _pwrite_all(self._fd, parts, offset)
                self._block_crcs(offset, parts)
            finally:
                for job in hashing:
                    job.result()  # never leave one running, even when the write failed
        except BaseException:
            with self._lock:
                self._poisoned = True
                self._hashing = False
            raise
        with self._lock:
            self._hashed = offset + size
            self._done = add_range(self._done, offset, offset + size)
        self._write_back()

    def _sha_parts(self, parts: list[memoryview]) -> None:
        for part in parts:
            self._sha.update(part)

    def _md5_parts(self, parts: list[memoryview]) -> None:
        for part in parts:
            self._md5.update(part)

    def _block_crcs(self, offset: int, parts: list[memoryview]) -> None:
        """CRC-32 of each block the parts (from block-aligned ``offset``) complete."""
        crc, position = 0, offset
        for part in parts:
            view = part
            while view:
                take = view[: CRC_BLOCK - position % CRC_BLOCK]
                crc = zlib.crc32(take, crc)
                position += len(take)
                view = view[len(take) :]
                if position % CRC_BLOCK == 0 or position == self.total:
                    self._crcs[(position - 1) // CRC_BLOCK] = crc
                    crc = 0

    def catch_up(self) -> None:
        """Hash the prefix as far as it is on disk (e.g. what an earlier run left)."""
        with self._lock:
            if self._hashing:
                return
            self._hashing = True
        self._follow(0, [], 0)

    def _follow(self, offset: int, parts: list[memoryview], size: int) -> None:
        """Hash the prefix as far as it reaches; this thread holds the hashing role.

        The piece just written (``parts``, ``size`` bytes at ``offset``) is hashed from memory
        when it starts where the prefix ends; anything else is read back.
        """
        try:
            while True:
                with self._lock:
                    done = self._done
                    reach = done[0][1] if done and done[0][0] == 0 else 0
                    if reach <= self._hashed:
                        self._hashing = False
                        return
                start = self._hashed
                if size and start == offset:
                    for part in parts:
                        self._digest(part)
                    self._hashed = offset + size
                    size = 0
                else:
                    self._read_back(start, reach)
                self._write_back()
        except BaseException:
            with self._lock:
                self._hashing = False
            raise

    def _read_back(self, start: int, stop: int) -> None:
        if self._buffer is None:
            self._buffer = bytearray(2 * PIECE_SIZE)
        view = memoryview(self._buffer)
        position = start
        while position < stop:
            count = os.preadv(self._fd, [view[: min(len(view), stop - position)]], position)
            if count <= 0:
                raise OSError(errno.EIO, "the .part is shorter than the bytes written to it")
            chunk = view[:count]
            for i in range(0, count, CRC_BLOCK):
                index, at = divmod(position + i, CRC_BLOCK)
                block = chunk[i : i + CRC_BLOCK]
                whole = len(block) == CRC_BLOCK or position + i + len(block) == self.total
                if self._crcs[index] is None and at == 0 and whole:
                    self._crcs[index] = zlib.crc32(block)
            self._digest(chunk)
            position += count
            self._hashed = position

    def _digest(self, data: memoryview) -> None:
        self._sha.update(data)
        if self._md5 is not None:
            self._md5.update(data)

    def _write_back(self) -> None:
        """Start writeback of what is written and hashed (see ``_PartSink._start_writeback``)."""
        if _FADVISE is None or self._hashed - self._written_back < _WRITEBACK_WINDOW:
            return
        start, self._written_back = self._written_back, self._hashed
        try:
            _FADVISE(self._fd, start, self._hashed - start, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass  # advice only

    def finish(self) -> tuple[str, str]:
        """Hash what is left, fsync; return ``(sha256, md5)`` hex digests (md5 "" if not kept).

        Raises:
            OSError: the ``.part`` is not whole, or the fsync failed.
        """
        if self._poisoned:
            raise OSError(errno.EIO, "a write to the .part failed")
        self.catch_up()
        if self._hashed != self.total:
            raise OSError(errno.EIO, "the .part is not whole")
        os.fsync(self._fd)
        return self._sha.hexdigest(), "" if self._md5 is None else self._md5.hexdigest()

    def block_crcs(self) -> list[int] | None:
        """CRC-32 of each :data:`CRC_BLOCK` block; None if one is unknown (read them instead)."""
        if any(crc is None for crc in self._crcs):
            return None
        return [crc for crc in self._crcs if crc is not None]

    def close(self) -> None:
        """Close the file (idempotent; never raises)."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


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
        self._sink: _RangeSink | None = None
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
            sha256, md5 = await _local(self._sink.finish)
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
        ``fast_connection`` and ``fast_process`` the other connections open at once; else the
        download is judged fast (the second connection stops after its range, the lead reads
        on) and the check repeats while ranges are left.
        """
        downloader = self._d
        try:
            while self._schedule.unclaimed:
                mine, everyone = self._received, downloader.bytes_received
                wall = time.perf_counter()
                await anyio.sleep(_RAMP_PROBE)
                seconds = max(1e-9, time.perf_counter() - wall)
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

    async def _ensure_sink(self) -> _RangeSink:
        async with self._sink_lock:
            if self._sink is None:
                md5 = self._state.expected_md5 is not None
                progress = self._schedule.state
                sink = await _local(
                    functools.partial(_RangeSink, self._job.part, self._job.root, progress, md5=md5)
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
        return self._spare.pop() if self._spare else memoryview(bytearray(PIECE_SIZE))

    def _give_buffer(self, buffer: memoryview) -> None:
        self._spare.append(buffer)
        self._pieces.release()

    async def _put(self, claim: _Claim, offset: int, buffer: memoryview, count: int) -> None:
        """Write ``buffer``'s first ``count`` bytes at ``offset``, record it, free the buffer."""
        assert self._sink is not None
        try:
            await _local(self._sink.write, offset, buffer[:count])
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
