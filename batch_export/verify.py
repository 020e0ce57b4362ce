"""Verifying a downloaded ``.part`` against what the server promised and against the zip format.

Size (``Content-Length`` / ``Content-Range`` total), MD5 when the server promised one, the zip
signature, and every member's CRC-32 (SPEC §4 "Verify and commit"): stored members from the block
CRCs kept while streaming (:mod:`batch_export.partfile`), the others by reading them.
"""

from __future__ import annotations

import errno
import os
import struct
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO

from batch_export.errors import VerificationError
from batch_export.partfile import CRC_BLOCK, PIECE_SIZE, local_io_error, read_part
from batch_export.types import Transfer

__all__ = ["verify_package"]

_ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")
#: Read errors that are the disk's or the process's, not the zip's (an ``EINVAL`` seek is the zip's).
_READ_ERRNOS = frozenset({errno.EIO, errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EACCES})


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
        archive_file, handle = read_part(part), read_part(part)
    except OSError as exc:
        raise local_io_error(exc, "") from None
    with archive_file, handle:
        try:
            signature = handle.read(4)
        except OSError as exc:
            raise local_io_error(exc, "") from None
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
                raise local_io_error(exc, "") from None
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
