"""The ``.part`` sink's streaming digests and the zip check from block CRCs (no server needed)."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import random
import time
import zipfile
import zlib
from pathlib import Path
from typing import Any

import anyio
import pytest

from batch_export import download, partfile, verify
from batch_export.errors import LocalIOError, VerificationError
from batch_export.partfile import CRC_BLOCK
from batch_export.types import Transfer
from batch_export.verify import verify_package

B = CRC_BLOCK


def blocks_of(data: bytes) -> list[int]:
    return [zlib.crc32(data[i : i + B]) for i in range(0, len(data), B)]


def write_in_random_pieces(sink: partfile.PartSink, data: bytes, seed: int) -> None:
    rng = random.Random(seed)
    position = 0
    while position < len(data):
        count = rng.randint(1, 3 * B)
        sink.write(data[position : position + count])
        position += count


@pytest.mark.parametrize("size", [0, 1, B - 1, B, B + 1, 3 * B + 4321])
def test_sink_keeps_sha256_and_block_crcs_of_what_it_wrote(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    sink = partfile.PartSink(tmp_path / "x.part", 0, md5=False)
    write_in_random_pieces(sink, data, size)
    sha256, md5 = sink.finish()
    sink.close()
    assert (tmp_path / "x.part").read_bytes() == data
    assert sha256 == hashlib.sha256(data).hexdigest()
    assert md5 == ""  # not promised, not computed
    assert sink.block_crcs() == blocks_of(data)


def test_resumed_sink_rehashes_the_prefix_and_md5_catches_up(tmp_path: Path) -> None:
    data = os.urandom(2 * B + 999)
    cut = B + 17
    (tmp_path / "x.part").write_bytes(data[:cut] + b"garbage past the resume point")
    sink = partfile.PartSink(tmp_path / "x.part", cut, md5=False)
    sink.write(data[cut : cut + 5000])
    sink.want_md5()  # a later answer promised an MD5: hash what is already on disk first
    sink.write(data[cut + 5000 :])
    sha256, md5 = sink.finish()
    sink.close()
    assert (tmp_path / "x.part").read_bytes() == data
    assert (sha256, md5) == (hashlib.sha256(data).hexdigest(), hashlib.md5(data).hexdigest())
    assert sink.block_crcs() == blocks_of(data)


def test_reset_starts_every_digest_again(tmp_path: Path) -> None:
    sink = partfile.PartSink(tmp_path / "x.part", 0, md5=True)
    sink.write(os.urandom(B + 3))
    sink.reset()
    data = os.urandom(B // 2)
    sink.write(data)
    assert sink.finish() == (hashlib.sha256(data).hexdigest(), hashlib.md5(data).hexdigest())
    sink.close()
    assert sink.block_crcs() == blocks_of(data)


@pytest.mark.parametrize(
    ("start", "end"), [(0, 0), (0, 5 * B + 7), (7, 3 * B + 5), (B, 3 * B), (B - 1, B + 1), (5, 9)]
)
def test_range_crc_from_blocks_equals_zlib(start: int, end: int) -> None:
    data = os.urandom(5 * B + 7)
    handle = io.BytesIO(data)
    assert verify._range_crc(handle, blocks_of(data), start, end) == zlib.crc32(data[start:end])


def make_zip(members: list[tuple[str, int, int]]) -> bytes:
    """A zip of (name, size, compression) members with random content."""
    out = io.BytesIO()
    rng = random.Random(7)
    with zipfile.ZipFile(out, "w") as archive:
        for name, size, compression in members:
            archive.writestr(
                zipfile.ZipInfo(name, (2026, 11, 29, 0, 0, 0)),
                rng.randbytes(size),
                compress_type=compression,
            )
    return out.getvalue()


MEMBERS = [
    ("a/stored-big.tif", 2 * B + 100, zipfile.ZIP_STORED),
    ("b/deflated.tif", 50_000, zipfile.ZIP_DEFLATED),
    ("c/stored-small.tif", 1000, zipfile.ZIP_STORED),
    ("d/empty.tif", 0, zipfile.ZIP_STORED),
    ("e/stored-mid.tif", B, zipfile.ZIP_STORED),
]


def data_offset(data: bytes, name: str) -> int:
    info = zipfile.ZipFile(io.BytesIO(data)).getinfo(name)
    name_len, extra_len = (
        int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little"),
        int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little"),
    )
    return info.header_offset + 30 + name_len + extra_len


def verdict(tmp_path: Path, data: bytes, *, streamed: bool) -> str | None:
    """The error code verify_package gives ``data`` (None if it passes)."""
    part = tmp_path / "p.zip.part"
    part.write_bytes(data)
    transfer = Transfer(size=len(data), block_crcs=blocks_of(data) if streamed else None)
    try:
        verify_package(part, transfer)
    except VerificationError as exc:
        return exc.code
    return None


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x40]) + data[at + 1 :]


def corruptions() -> list[tuple[str, bytes]]:
    good = make_zip(MEMBERS)
    big = data_offset(good, "a/stored-big.tif")
    small = data_offset(good, "c/stored-small.tif")
    deflated = data_offset(good, "b/deflated.tif")
    header = zipfile.ZipFile(io.BytesIO(good)).getinfo("c/stored-small.tif").header_offset
    return [
        ("intact", good),
        ("stored member, first block", flip(good, big + 10)),
        ("stored member, a whole block inside", flip(good, big + B + 10)),
        ("stored member, last partial block", flip(good, big + 2 * B + 50)),
        ("small stored member", flip(good, small + 3)),
        ("deflated member", flip(good, deflated + 100)),
        ("local header name", flip(good, header + 30)),
        ("local header signature", flip(good, header)),
        ("truncated before the central directory", good[: big + 3 * B]),
    ]


@pytest.mark.parametrize(("case", "data"), corruptions(), ids=[c for c, _ in corruptions()])
def test_block_crc_check_agrees_with_reading_every_member(
    tmp_path: Path, case: str, data: bytes
) -> None:
    streamed = verdict(tmp_path, data, streamed=True)
    read = verdict(tmp_path, data, streamed=False)
    assert streamed == read
    assert (streamed is None) == (case == "intact")


def test_member_running_past_the_end_is_a_bad_zip(tmp_path: Path) -> None:
    good = make_zip(MEMBERS[:1])
    info = zipfile.ZipFile(io.BytesIO(good)).getinfo("a/stored-big.tif")
    # Grow the central directory's sizes past the end of the file.
    central = good.rindex(b"PK\x01\x02")
    sizes = (info.compress_size + 10 * B).to_bytes(4, "little")
    bad = good[: central + 20] + sizes + sizes + good[central + 28 :]
    assert verdict(tmp_path, bad, streamed=True) == "bad_zip"
    assert verdict(tmp_path, bad, streamed=False) == "bad_zip"


def test_block_crcs_of_other_bytes_are_not_trusted(tmp_path: Path) -> None:
    data = make_zip(MEMBERS)
    part = tmp_path / "p.zip.part"
    part.write_bytes(data)
    # Fewer blocks than the file has: ignored, the members are read instead (and pass).
    verify_package(part, Transfer(size=len(data), block_crcs=blocks_of(data)[:-1]))


class FakeBody:
    """An aiohttp-like response whose body arrives in the given chunks."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.content = self
        self._chunks = chunks

    async def iter_any(self) -> Any:
        for chunk in self._chunks:
            await anyio.sleep(0)
            yield chunk


def chunked(data: bytes, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    out, position = [], 0
    while position < len(data):
        count = rng.randint(1, 300_000)
        out.append(data[position : position + count])
        position += count
    return out


def downloader() -> download.Downloader:
    return download.Downloader(None, clock=None, retries=0, read_timeout=1.0)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_pieces_in_flight_reach_the_file_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(9 * B + 12345)
    original = partfile.PartSink.write
    rng = random.Random(3)

    def slow_write(self: partfile.PartSink, piece: bytes) -> None:
        time.sleep(rng.random() / 200)  # finish out of step with the receiving side
        original(self, piece)

    monkeypatch.setattr(partfile.PartSink, "write", slow_write)
    sink = partfile.PartSink(tmp_path / "x.part", 0, md5=False)
    counted: list[int] = []
    await downloader()._stream(FakeBody(chunked(data, 1)), sink, counted.append)  # type: ignore[arg-type]
    sha256, _ = sink.finish()
    sink.close()
    assert (tmp_path / "x.part").read_bytes() == data
    assert sha256 == hashlib.sha256(data).hexdigest()
    assert sum(counted) == len(data)
    assert all(n >= partfile.PIECE_SIZE for n in counted[:-1])  # SPEC §4: pieces of >= 1 MiB


@pytest.mark.anyio
async def test_a_failed_piece_stops_every_later_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(6 * B)
    original = partfile.PartSink.write
    calls: list[int] = []

    def failing_write(self: partfile.PartSink, piece: bytes) -> None:
        calls.append(len(piece))
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        original(self, piece)

    monkeypatch.setattr(partfile.PartSink, "write", failing_write)
    sink = partfile.PartSink(tmp_path / "x.part", 0, md5=False)
    counted: list[int] = []
    with pytest.raises(LocalIOError) as caught:
        await downloader()._stream(FakeBody(chunked(data, 2)), sink, counted.append)  # type: ignore[arg-type]
    sink.close()
    assert caught.value.code == "disk_full"
    assert len(calls) == 2  # nothing after the failed piece was written
    assert counted == calls[:1]
    assert (tmp_path / "x.part").read_bytes() == data[: calls[0]]
