"""The ``.part`` file of a download: opened safely and locked, written and hashed, committed.

Two sinks write it (SPEC §4): :class:`PartSink` appends one stream, hashing each piece on helper
threads while it is written; :class:`RangeSink` takes the pieces of a segmented download at their
offsets into a preallocated file, the SHA-256/MD5 following the contiguous prefix. Both keep the
CRC-32 of every :data:`CRC_BLOCK` block, from which :mod:`batch_export.verify` checks the zip
members' CRCs without reading the file again. :func:`commit_part` renames a verified ``.part``
onto its final path atomically; every path is opened without following symlinks
(:mod:`batch_export.safepath`). OS errors become :class:`~batch_export.errors.LocalIOError` with
a stable code (:func:`local_io_error`).
"""

from __future__ import annotations

import collections
import ctypes
import errno
import hashlib
import itertools
import os
import threading
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import anyio

from batch_export.errors import LocalIOError
from batch_export.partlock import lock_part
from batch_export.safepath import PathProblem, open_dir, open_file, replace_in, unlink_in
from batch_export.segments import Ranges, SegmentState, add_range

__all__ = [
    "CRC_BLOCK",
    "DISK_HEADROOM",
    "PIECE_SIZE",
    "PartSink",
    "RangeSink",
    "check_headroom",
    "commit_part",
    "discard_part",
    "local_io_error",
    "open_part",
    "part_path",
    "read_part",
    "run_local",
]

#: Bytes handed to the writer thread at once (SPEC §4: at least 1 MiB).
PIECE_SIZE = 1024 * 1024
#: Block size of the CRC-32s kept while streaming, from which members' CRCs are checked (bytes).
CRC_BLOCK = 1024 * 1024
#: Threads that hash pieces while the writer threads write them (shared by all downloads).
_HASH_THREADS = 8
_hashers: ThreadPoolExecutor | None = None
_hashers_lock = threading.Lock()
#: Bytes written between two requests to start writeback (see ``PartSink._start_writeback``).
_WRITEBACK_WINDOW = 32 * 1024 * 1024
_FADVISE: Callable[[int, int, int, int], None] | None = getattr(os, "posix_fadvise", None)
#: A download stops with ``disk_full`` while this much of its file system is still free (bytes;
#: at most 5 % of the file system): the state store is often on the same disk, and it must
#: still be able to record the failure (SQLite's WAL grows by pages at each commit).
DISK_HEADROOM = 64 * 1024 * 1024


def check_headroom(fd: int, incoming: int = 0) -> None:
    """Raise ``ENOSPC`` if the file system of ``fd`` would keep less than its headroom free.

    ``incoming``: bytes about to be written (they must fit above the headroom).

    The headroom is :data:`DISK_HEADROOM`, or 5 % of the file system where that is less (a
    small disk is still usable). File systems that report no size are not judged.

    Raises:
        OSError: ``ENOSPC``.
    """
    try:
        stats = os.fstatvfs(fd)
    except OSError:
        return
    size = stats.f_blocks * stats.f_frsize
    if size <= 0:
        return
    if stats.f_bavail * stats.f_frsize - incoming < min(DISK_HEADROOM, size // 20):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


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


async def run_local(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a file operation in a worker thread, translating OSError into LocalIOError."""
    try:
        return await anyio.to_thread.run_sync(fn, *args)
    except OSError as exc:
        raise local_io_error(exc, "") from None


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


def local_io_error(exc: OSError, job_key: str = "") -> LocalIOError:
    """Translate a local OS error into :class:`LocalIOError` with its code (``disk_full``, …).

    A :class:`PathProblem` keeps its own code and message.

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


def open_part(part: Path, root: Path | None, *, keep: bool) -> tuple[int, bool]:
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


def read_part(part: Path) -> BinaryIO:
    """Open ``part`` for reading, never through a symlink (its last component)."""
    fd = os.open(part, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NOCTTY)
    return os.fdopen(fd, "rb")


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
        raise local_io_error(exc, "") from None


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
        raise local_io_error(exc, "") from None


# ----------------------------------------------------------------------------------- sinks


class PartSink:
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
        fd, kept = open_part(path, root, keep=resume_from > 0)
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
        """Append ``data`` and hash it, the hashing on helper threads meanwhile.

        Raises:
            OSError: the write failed, or the disk is down to its headroom (``ENOSPC``, see
                :func:`check_headroom`).
        """
        check_headroom(self._file.fileno(), len(data))
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


#: Alignment of ``O_DIRECT`` writes: offset, length and buffer address (bytes; the page size
#: covers every logical block size in use).
_DIRECT_ALIGN = 4096


def _open_direct(fd: int) -> int:
    """A second descriptor of ``fd``'s file for ``O_DIRECT`` writes, or -1 where there is none.

    Reopened through ``/proc/self/fd`` (the same inode, no path looked up again), so the flag
    is this descriptor's alone: reads and the unaligned last bytes keep the buffered one. File
    systems without direct I/O (tmpfs, some FUSE) refuse the open: then everything is buffered.
    """
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return -1
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | flag | os.O_CLOEXEC)
    except OSError:
        return -1


def _aligned(view: memoryview) -> bool:
    """Whether ``view`` starts at a :data:`_DIRECT_ALIGN` address (False for read-only bytes)."""
    try:
        address = ctypes.addressof(ctypes.c_char.from_buffer(view))
    except (TypeError, ValueError):
        return False
    return address % _DIRECT_ALIGN == 0


def _preallocate(fd: int, size: int) -> bool:
    """Give the file ``size`` bytes: reserved where the file system allows, else sparse.

    Returns True if the blocks are reserved now (then no later write can run out of space).
    Where reserving them leaves the disk below its headroom (:func:`check_headroom`) the file is
    shrunk back and ``ENOSPC`` raised.
    """
    before = os.fstat(fd).st_size
    if before >= size:
        return False  # an earlier run's file: its blocks may be sparse
    if _FALLOCATE is not None:
        try:
            _FALLOCATE(fd, size)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                os.ftruncate(fd, before)
                raise
        else:
            try:
                check_headroom(fd)
            except OSError:
                os.ftruncate(fd, before)  # give the space back: nothing was written there
                raise
            return True
    os.ftruncate(fd, size)
    return False


class RangeSink:
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
        fd, kept = open_part(part, root, keep=bool(state.done))
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
        try:
            self._reserved = _preallocate(fd, state.total)
        except BaseException:
            os.close(fd)
            raise
        self._direct = _open_direct(fd)

    def _pwrite(self, parts: list[memoryview], offset: int) -> int:
        """Write ``parts`` at ``offset``: past the page cache where it can, else buffered.

        A piece in one aligned buffer (the downloader's pieces are page-aligned, whole CRC
        blocks at block offsets) goes with ``O_DIRECT``: straight from the buffer to the disk,
        no copy into the page cache and no writeback left for the fsync (on the benchmark VM,
        filling fresh page-cache pages cost 0.2-2.5 CPU s/GiB, a direct write 0.1). Anything
        else (the entity's last bytes, a file system that refuses) is buffered.
        """
        if self._direct >= 0 and len(parts) == 1:
            view = parts[0]
            if offset % _DIRECT_ALIGN == 0 and len(view) % _DIRECT_ALIGN == 0 and _aligned(view):
                try:
                    written = os.pwrite(self._direct, view, offset)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    os.close(self._direct)  # this file system takes no direct writes
                    self._direct = -1
                else:
                    if written == len(view):
                        return written
                    return written + _pwrite_all(self._fd, [view[written:]], offset + written)
        return _pwrite_all(self._fd, parts, offset)

    def write(self, offset: int, data: memoryview | Sequence[memoryview]) -> None:
        """Write ``data`` (whole CRC blocks, or the entity's last bytes) at ``offset``.

        ``data`` may be one buffer or the list of parts of a piece, written with one ``pwritev``
        (no copy gathers them first).
        """
        parts = [data] if isinstance(data, memoryview) else list(data)
        if not self._reserved:
            check_headroom(self._fd, sum(len(part) for part in parts))
        with self._lock:
            at_prefix = not self._hashing and self._hashed == offset and not self._poisoned
            if at_prefix:
                self._hashing = True
        if at_prefix:
            self._write_hashing(offset, parts)
            self._follow(offset, [], 0)  # and whatever other connections wrote beyond it
            return
        size = self._pwrite(parts, offset)
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
                size = self._pwrite(parts, offset)
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
        # One piece's buffer for this catch-up only: eight downloads' sinks keeping one each
        # held 16 MiB for nothing (they read back only the tail other connections wrote).
        view = memoryview(bytearray(min(PIECE_SIZE, stop - start)))
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
        """Start writeback of what is written and hashed (see ``PartSink._start_writeback``)."""
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
        for fd in (self._direct, self._fd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._fd = self._direct = -1
