"""Segmented downloads (SPEC §4) against the sandbox on real loopback sockets; counts at the sandbox."""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import random
import time
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from batch_export import partfile
from batch_export.download import Downloader
from batch_export.errors import UrlRejected
from batch_export.http import HttpSession, open_sessions
from batch_export.partfile import CRC_BLOCK, PIECE_SIZE
from batch_export.sandbox import (
    Catalog,
    Ending,
    Fault,
    FaultScript,
    Rule,
    Sandbox,
    SandboxConfig,
    SegmentFault,
    StoragePlan,
)
from batch_export.segments import Schedule, SegmentState, add_range, missing_ranges
from batch_export.types import Transfer
from batch_export.verify import verify_package
from tests.fakes import FakeClock

pytestmark = pytest.mark.anyio

KEY = "seg-test-key"
CATALOG = Catalog.generate(0)
AOI = CATALOG.aois[0]
INSIGHT = AOI.insights[0]
MIB = 1024 * 1024
ASSET = 3 * MIB  # 6 members: a package of ~18 MiB
SEGMENT_MIN = MIB  # so that ranges of 1 MiB are allowed and 16 connections all get work


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    async with Sandbox(SandboxConfig(keys=(KEY,), asset_size=ASSET, rate=None)) as sb:
        yield sb


@pytest.fixture
async def session() -> AsyncIterator[HttpSession]:
    async with open_sessions(api_connections=4, storage_connections=64, environ={}) as sessions:
        yield sessions.storage


async def signed_url(session: HttpSession, sandbox: Sandbox) -> str:
    body = {"inputs": list(INSIGHT.inputs), "outputs": list(INSIGHT.outputs)}
    url = f"{sandbox.api_url}/v0/aoi/{AOI.id}/insights/{INSIGHT.id}/download"
    async with aiohttp.ClientSession() as api:
        for _ in range(5):
            async with api.put(url, json=body, headers={"Authorization": KEY}) as resp:
                answer = await resp.json()
            if answer["signed_url"]:
                sandbox.requests.clear()
                return str(answer["signed_url"])
    raise AssertionError("never ready")


def package(sandbox: Sandbox) -> bytes:
    return sandbox.package_bytes(AOI.id, INSIGHT.id, INSIGHT.inputs, INSIGHT.outputs)


class Calls:
    """What the downloader told its caller."""

    def __init__(self) -> None:
        self.attempts: list[tuple[int, str | None, int | None]] = []
        self.states: list[SegmentState | None] = []
        self.bytes = 0

    async def on_attempt(self, offset: int, etag: str | None, total: int | None) -> None:
        self.attempts.append((offset, etag, total))

    async def on_segments(self, state: SegmentState | None) -> None:
        self.states.append(state)

    def on_bytes(self, count: int) -> None:
        self.bytes += count


async def fetch(
    session: HttpSession,
    url: str,
    part: Path,
    calls: Calls,
    *,
    connections: int,
    etag: str | None = None,
    segments: SegmentState | None = None,
    read_timeout: float = 5.0,
    retries: int = 3,
    ramp: bool = False,
) -> Transfer:
    downloader = Downloader(
        session,
        clock=FakeClock(),
        retries=retries,
        read_timeout=read_timeout,
        rng=random.Random(1),
        ramp=ramp,
    )
    return await downloader.transfer(
        url,
        part,
        etag=etag,
        job_key="k" * 64,
        url_expired=lambda: False,
        on_attempt=calls.on_attempt,
        on_bytes=calls.on_bytes,
        connections=connections,
        segment_min=SEGMENT_MIN,
        segments=segments,
        on_segments=calls.on_segments,
        root=part.parent,
    )


def gets(sandbox: Sandbox) -> list[Any]:
    return sandbox.requests_to("storage", "GET")


def served(sandbox: Sandbox) -> int:
    return sum(r.bytes_sent for r in gets(sandbox))


def ranges_asked(sandbox: Sandbox) -> list[tuple[int, int | None]]:
    out = []
    for r in gets(sandbox):
        header = r.header("Range")
        if header is None:
            continue
        first, _, last = header.removeprefix("bytes=").partition("-")
        out.append((int(first), int(last) + 1 if last else None))
    return out


def assert_exact(part: Path, transfer: Transfer, data: bytes) -> None:
    assert part.read_bytes() == data
    assert transfer.size == len(data)
    assert transfer.sha256 == hashlib.sha256(data).hexdigest()
    assert transfer.md5 == hashlib.md5(data, usedforsecurity=False).hexdigest()  # ETag is MD5
    blocks = [zlib.crc32(data[i : i + CRC_BLOCK]) for i in range(0, len(data), CRC_BLOCK)]
    assert transfer.block_crcs == blocks
    verify_package(part, transfer)


# ------------------------------------------------------------------------------- pure schedule


def test_add_range_merges_touching_and_overlapping_ranges() -> None:
    ranges = add_range((), 10, 20)
    ranges = add_range(ranges, 30, 40)
    assert ranges == ((10, 20), (30, 40))
    assert add_range(ranges, 20, 30) == ((10, 40),)
    assert add_range(ranges, 0, 5) == ((0, 5), (10, 20), (30, 40))
    assert add_range(ranges, 15, 35) == ((10, 40),)
    assert add_range(ranges, 5, 10) == ((5, 20), (30, 40))
    assert add_range(ranges, 50, 50) == ranges
    assert missing_ranges(50, ranges) == ((0, 10), (20, 30), (40, 50))
    assert missing_ranges(40, ((0, 40),)) == ()


def test_schedule_hands_out_ranges_in_order_shrinking_to_the_minimum() -> None:
    schedule = Schedule(SegmentState(100 * MIB), connections=4, unit_min=2 * MIB, align=MIB)
    claims = []
    while (claim := schedule.claim()) is not None:
        claims.append(claim)
    starts = [c[0] for c in claims]
    assert starts == sorted(starts) and claims[0][0] == 0 and claims[-1][1] == 100 * MIB
    assert all(a[1] == b[0] for a, b in itertools.pairwise(claims))  # no gap
    sizes = [stop - start for start, stop in claims]
    assert sizes[0] == 13 * MIB  # ceil(100 MiB / 8), rounded up to whole MiB
    assert sizes == sorted(sizes, reverse=True)  # guided: the last ones are the smallest
    assert min(sizes) >= 2 * MIB
    assert all(size % MIB == 0 for size in sizes)


def test_schedule_gives_a_released_rest_out_first_and_keeps_progress() -> None:
    schedule = Schedule(SegmentState(10 * MIB), connections=2, unit_min=MIB, align=MIB)
    first = schedule.claim()
    second = schedule.claim()
    assert first == (0, 3 * MIB) and second == (3 * MIB, 5 * MIB)
    schedule.progress(0, MIB)
    schedule.release(MIB, 3 * MIB)  # its connection broke after 1 MiB
    assert schedule.claim() == (MIB, 3 * MIB)
    assert schedule.state == SegmentState(10 * MIB, ((0, MIB),))


def test_a_package_just_over_the_minimum_still_gets_two_ranges() -> None:
    schedule = Schedule(SegmentState(3 * MIB), connections=8, unit_min=32 * MIB, align=MIB)
    assert schedule.claim() == (0, 2 * MIB)
    assert schedule.claim() == (2 * MIB, 3 * MIB)
    assert schedule.claim() is None


def test_the_tail_claim_takes_the_last_unit_and_the_lead_extends_through_the_rest() -> None:
    schedule = Schedule(SegmentState(10 * MIB + 5), connections=2, unit_min=MIB, align=MIB)
    assert schedule.claim() == (0, 3 * MIB)
    assert schedule.claim_tail() == (9 * MIB, 10 * MIB + 5)  # aligned start, the entity's end
    assert schedule.extend(2 * MIB) is None  # not where the unclaimed bytes begin
    reached = 3 * MIB
    while (stop := schedule.extend(reached)) is not None:
        assert stop > reached and stop % MIB == 0
        reached = stop
    assert reached == 9 * MIB and schedule.unclaimed == 0
    assert schedule.claim() is None and schedule.claim_tail() is None


def test_a_tail_claim_leaves_no_sliver_in_front_of_it() -> None:
    schedule = Schedule(SegmentState(4 * MIB), connections=8, unit_min=2 * MIB, align=MIB)
    assert schedule.claim() == (0, 2 * MIB)
    assert schedule.claim_tail() == (2 * MIB, 4 * MIB)
    assert schedule.unclaimed == 0


def test_resumed_schedule_claims_only_what_is_missing() -> None:
    done = ((0, 4 * MIB), (6 * MIB, 8 * MIB))
    schedule = Schedule(SegmentState(10 * MIB, done), connections=1, unit_min=MIB, align=MIB)
    claims = []
    while (claim := schedule.claim()) is not None:
        claims.append(claim)
    covered: tuple[tuple[int, int], ...] = ()
    for start, stop in claims:
        covered = add_range(covered, start, stop)
    assert covered == ((4 * MIB, 6 * MIB), (8 * MIB, 10 * MIB))


# ------------------------------------------------------------------------------- range sink


def test_range_sink_hashes_in_order_whatever_order_pieces_arrive(tmp_path: Path) -> None:
    data = os.urandom(9 * CRC_BLOCK + 777)
    part = tmp_path / "x.part"
    sink = partfile.RangeSink(part, tmp_path, SegmentState(len(data)), md5=True)
    pieces = [(i, min(len(data), i + CRC_BLOCK)) for i in range(0, len(data), CRC_BLOCK)]
    random.Random(5).shuffle(pieces)
    for start, stop in pieces:
        sink.write(start, memoryview(data[start:stop]))
    sha256, md5 = sink.finish()
    crcs = sink.block_crcs()
    sink.close()
    assert part.read_bytes() == data
    assert sha256 == hashlib.sha256(data).hexdigest()
    assert md5 == hashlib.md5(data, usedforsecurity=False).hexdigest()
    assert crcs == [zlib.crc32(data[i : i + CRC_BLOCK]) for i in range(0, len(data), CRC_BLOCK)]


def test_range_sink_hashes_pieces_in_file_order_from_memory_without_reading_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(5 * CRC_BLOCK + 123)
    part = tmp_path / "x.part"
    sink = partfile.RangeSink(part, tmp_path, SegmentState(len(data)), md5=True)
    read_back: list[tuple[int, int]] = []
    monkeypatch.setattr(sink, "_read_back", lambda a, b: read_back.append((a, b)))
    for start in range(0, len(data), CRC_BLOCK):
        sink.write(start, memoryview(data[start : start + CRC_BLOCK]))
    sha256, md5 = sink.finish()
    sink.close()
    assert read_back == []  # every piece extended the prefix: hashed while it was written
    assert sha256 == hashlib.sha256(data).hexdigest()
    assert md5 == hashlib.md5(data, usedforsecurity=False).hexdigest()


def test_a_failed_write_at_the_prefix_leaves_the_sink_unable_to_finish(tmp_path: Path) -> None:
    data = os.urandom(2 * CRC_BLOCK)
    part = tmp_path / "x.part"
    sink = partfile.RangeSink(part, tmp_path, SegmentState(len(data)), md5=False)
    fd = sink._fd
    sink._fd = os.open(os.devnull, os.O_RDONLY)  # the write fails (EBADF) after hashing began
    with pytest.raises(OSError):
        sink.write(0, memoryview(data[:CRC_BLOCK]))
    os.close(sink._fd)
    sink._fd = fd
    sink.write(CRC_BLOCK, memoryview(data[CRC_BLOCK:]))  # read back is impossible: not on disk
    with pytest.raises(OSError, match=r"a write to the \.part failed"):
        sink.finish()  # the SHA-256 took bytes that never reached the disk: never trusted
    sink.close()


def _aligned_piece(data: bytes) -> memoryview:
    import mmap

    buffer = memoryview(mmap.mmap(-1, max(len(data), 1)))
    buffer[: len(data)] = data
    return buffer[: len(data)]


def test_range_sink_writes_aligned_pieces_past_the_page_cache_and_the_tail_buffered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(3 * CRC_BLOCK + 777)
    part = tmp_path / "x.part"
    sink = partfile.RangeSink(part, tmp_path, SegmentState(len(data)), md5=True)
    if sink._direct < 0:
        sink.close()
        pytest.skip("this file system takes no O_DIRECT")
    used: list[tuple[str, int, int]] = []
    real_pwrite, real_pwritev = os.pwrite, os.pwritev

    def pwrite(fd: int, view: Any, offset: int) -> int:
        used.append(("direct" if fd == sink._direct else "buffered", offset, len(view)))
        return real_pwrite(fd, view, offset)

    def pwritev(fd: int, views: Any, offset: int) -> int:
        used.append(("direct" if fd == sink._direct else "buffered", offset, sum(map(len, views))))
        return real_pwritev(fd, views, offset)

    monkeypatch.setattr(partfile.os, "pwrite", pwrite)
    monkeypatch.setattr(partfile.os, "pwritev", pwritev)
    for start in range(0, len(data), CRC_BLOCK):
        sink.write(start, _aligned_piece(data[start : start + CRC_BLOCK]))
    sha256, md5 = sink.finish()
    sink.close()
    assert used == [
        ("direct", 0, CRC_BLOCK),
        ("direct", CRC_BLOCK, CRC_BLOCK),
        ("direct", 2 * CRC_BLOCK, CRC_BLOCK),
        ("buffered", 3 * CRC_BLOCK, 777),  # the entity's last bytes: not a whole block
    ]
    assert part.read_bytes() == data
    assert sha256 == hashlib.sha256(data).hexdigest()
    assert md5 == hashlib.md5(data, usedforsecurity=False).hexdigest()


def test_range_sink_falls_back_to_buffered_writes_where_direct_ones_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(2 * CRC_BLOCK)
    part = tmp_path / "x.part"
    sink = partfile.RangeSink(part, tmp_path, SegmentState(len(data)), md5=False)
    if sink._direct < 0:
        sink.close()
        pytest.skip("this file system takes no O_DIRECT")
    direct, real_pwrite = sink._direct, os.pwrite

    def pwrite(fd: int, view: Any, offset: int) -> int:
        if fd == direct:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, view, offset)

    monkeypatch.setattr(partfile.os, "pwrite", pwrite)
    for start in range(0, len(data), CRC_BLOCK):
        sink.write(start, _aligned_piece(data[start : start + CRC_BLOCK]))
    assert sink._direct == -1  # given up after the first refusal
    sha256, _ = sink.finish()
    sink.close()
    assert part.read_bytes() == data
    assert sha256 == hashlib.sha256(data).hexdigest()


def test_range_sink_resumes_ranges_left_by_an_earlier_run(tmp_path: Path) -> None:
    data = os.urandom(6 * CRC_BLOCK)
    part = tmp_path / "x.part"
    part.write_bytes(data[: 2 * CRC_BLOCK] + bytes(2 * CRC_BLOCK) + data[4 * CRC_BLOCK :])
    state = SegmentState(len(data), ((0, 2 * CRC_BLOCK), (4 * CRC_BLOCK, 6 * CRC_BLOCK)))
    sink = partfile.RangeSink(part, tmp_path, state, md5=False)
    assert sink.kept
    sink.write(2 * CRC_BLOCK, memoryview(data[2 * CRC_BLOCK : 4 * CRC_BLOCK]))
    sha256, _ = sink.finish()
    crcs = sink.block_crcs()
    sink.close()
    assert sha256 == hashlib.sha256(data).hexdigest()
    assert crcs == [zlib.crc32(data[i : i + CRC_BLOCK]) for i in range(0, len(data), CRC_BLOCK)]


# ------------------------------------------------------------------------------- against the sandbox


@pytest.mark.parametrize("connections", [1, 4, 16])
async def test_byte_exact_over_1_4_and_16_connections(
    sandbox: Sandbox, session: HttpSession, tmp_path: Path, connections: int
) -> None:
    url = await signed_url(session, sandbox)
    data = package(sandbox)
    calls = Calls()
    part = tmp_path / "pkg.zip.part"
    transfer = await fetch(session, url, part, calls, connections=connections)
    await sandbox.idle()
    assert_exact(part, transfer, data)
    requests = gets(sandbox)
    assert all(r.status in (200, 206) for r in requests)
    if connections == 1:
        assert len(requests) == 1 and requests[0].header("Range") is None
        assert calls.states == []
        assert served(sandbox) == len(data)
        return
    assert requests[0].header("Range") == "bytes=0-" and requests[0].header("If-Range") is None
    etag = requests[0].header("If-Range") or calls.attempts[0][1]
    assert calls.attempts == [(0, etag, len(data))]
    assert all(r.header("If-Range") == etag for r in requests[1:])
    asked = ranges_asked(sandbox)
    later = sorted((start, stop) for start, stop in asked[1:] if stop is not None)
    # the later ranges tile [end of the first range, total) exactly: nothing fetched twice
    assert later[0][0] == later[0][0] // CRC_BLOCK * CRC_BLOCK > 0
    assert all(a[1] == b[0] for a, b in itertools.pairwise(later))
    assert later[-1][1] == len(data)
    assert len(requests) >= connections  # every connection had a range
    assert transfer.connections == connections
    assert calls.states[0] == SegmentState(len(data))
    assert calls.states[-1] == SegmentState(len(data), ((0, len(data)),))
    assert calls.bytes == len(data)
    # Only the first GET (bytes=0-, cut short at its range's end) may have sent bytes not used.
    assert sum(r.bytes_sent for r in requests[1:]) == len(data) - later[0][0]


async def test_a_server_that_ignores_range_gives_one_stream(
    sandbox: Sandbox, session: HttpSession, tmp_path: Path
) -> None:
    sandbox.faults.add(FaultScript([Rule(Fault.IGNORE_RANGE, "storage")]))
    url = await signed_url(session, sandbox)
    data = package(sandbox)
    calls = Calls()
    part = tmp_path / "pkg.zip.part"
    transfer = await fetch(session, url, part, calls, connections=8)
    await sandbox.idle()
    assert_exact(part, transfer, data)
    assert [(r.status, r.header("Range")) for r in gets(sandbox)] == [(200, "bytes=0-")]
    assert served(sandbox) == len(data)
    assert calls.states == []


async def test_an_etag_changing_between_segments_restarts_from_0_in_one_stream(
    sandbox: Sandbox, session: HttpSession, tmp_path: Path
) -> None:
    def other_entity(plan: StoragePlan) -> None:
        plan.etag = '"0123456789abcdef0123456789abcdef"'

    fault = SegmentFault(other_entity, nth=(3,))
    sandbox.faults.add(fault)
    url = await signed_url(session, sandbox)
    data = package(sandbox)
    calls = Calls()
    part = tmp_path / "pkg.zip.part"
    transfer = await fetch(session, url, part, calls, connections=4)
    await sandbox.idle()
    assert_exact(part, transfer, data)  # never a file stitched from two entities
    assert len(fault.hits) == 1
    requests = gets(sandbox)
    last = requests[-1]
    assert (last.status, last.header("Range"), last.bytes_sent) == (200, None, len(data))
    # after the mismatch, one stream only: no ranged GET started after the restart
    restart = max(i for i, r in enumerate(requests) if r.header("Range") is None)
    assert restart == len(requests) - 1
    assert calls.states[-1] is None  # the segments were forgotten
    assert calls.attempts[-1] == (0, calls.attempts[0][1], len(data))


async def test_one_segment_reset_midway_refetches_only_that_range(
    sandbox: Sandbox, session: HttpSession, tmp_path: Path
) -> None:
    def reset(plan: StoragePlan) -> None:
        plan.cut_after_bytes = CRC_BLOCK + 1000  # a whole block and a bit
        plan.ending = Ending.RESET

    fault = SegmentFault(reset, nth=(2,))
    sandbox.faults.add(fault)
    url = await signed_url(session, sandbox)
    data = package(sandbox)
    part = tmp_path / "pkg.zip.part"
    transfer = await fetch(session, url, part, Calls(), connections=4)
    await sandbox.idle()
    assert_exact(part, transfer, data)
    (hit,) = fault.hits
    start = int(hit.removeprefix("bytes=").partition("-")[0])
    asked = ranges_asked(sandbox)
    # the rest of the broken range, from its first missing whole block, was asked again
    assert any(first == start + CRC_BLOCK for first, _ in asked)
    requests = gets(sandbox)
    # the first GET (bytes=0-) was used up to the lowest range anyone else asked
    used_of_first = min((first for first, _ in asked[1:]), default=0)
    wasted = requests[0].bytes_sent - used_of_first
    segment = max((stop or 0) - first for first, stop in asked[1:])
    assert served(sandbox) - max(0, wasted) <= len(data) + segment
    assert served(sandbox) - max(0, wasted) == len(data) + 1000  # exactly the partial block


async def test_a_stalled_segment_is_cut_by_read_timeout_and_fetched_again(
    sandbox: Sandbox, session: HttpSession, tmp_path: Path
) -> None:
    def stall(plan: StoragePlan) -> None:
        plan.cut_after_bytes = CRC_BLOCK
        plan.ending = Ending.STALL
        plan.stall_seconds = 5.0

    fault = SegmentFault(stall, nth=(1,))
    sandbox.faults.add(fault)
    url = await signed_url(session, sandbox)
    data = package(sandbox)
    part = tmp_path / "pkg.zip.part"
    transfer = await fetch(session, url, part, Calls(), connections=4, read_timeout=1.0)
    assert_exact(part, transfer, data)
    (hit,) = fault.hits
    start = int(hit.removeprefix("bytes=").partition("-")[0])
    stop = int(hit.partition("-")[2]) + 1
    assert stop - start > CRC_BLOCK  # the stall left part of the range unsent
    assert (start + CRC_BLOCK, stop) in ranges_asked(sandbox)  # the rest, asked again


async def test_an_interrupted_download_resumes_only_the_missing_ranges(
    sandbox: Sandbox, session: HttpSession, tmp_path: Path
) -> None:
    sandbox.config.storage_rate = 2 * MIB  # per connection: the download takes a while
    url = await signed_url(session, sandbox)
    data = package(sandbox)
    part = tmp_path / "pkg.zip.part"
    calls = Calls()
    with anyio.move_on_after(1.5):  # a crash, as far as this transfer can tell
        await fetch(session, url, part, calls, connections=8)
    await sandbox.idle()
    saved = calls.states[-1]
    assert saved is not None and 0 < saved.done_bytes < len(data)
    first_run = served(sandbox)
    sandbox.requests.clear()
    sandbox.config.storage_rate = None
    etag = calls.attempts[0][1]
    transfer = await fetch(session, url, part, Calls(), connections=8, etag=etag, segments=saved)
    await sandbox.idle()
    assert_exact(part, transfer, data)
    asked = ranges_asked(sandbox)
    assert all(stop is not None for _, stop in asked)  # only bounded ranges: nothing from 0
    covered: tuple[tuple[int, int], ...] = ()
    for start, stop in asked:
        assert stop is not None
        covered = add_range(covered, start, stop)
    assert covered == missing_ranges(len(data), saved.done)
    assert served(sandbox) == len(data) - saved.done_bytes
    # what the first run received but had not yet recorded: at most two pieces a connection
    assert first_run - saved.done_bytes <= 8 * 2 * PIECE_SIZE + 4 * MIB


async def test_an_expired_url_mid_download_then_a_fresh_one_fetches_the_missing_ranges(
    sandbox: Sandbox, session: HttpSession, tmp_path: Path
) -> None:
    sandbox.config.storage_rate = 2 * MIB
    url = await signed_url(session, sandbox)
    data = package(sandbox)
    part = tmp_path / "pkg.zip.part"
    calls = Calls()

    refused: list[UrlRejected] = []

    async def expire_soon() -> None:
        await anyio.sleep(0.5)
        sandbox.config.clock = lambda: time.time() + 7200  # the URL's hour is over

    async def download() -> None:
        try:
            await fetch(session, url, part, calls, connections=8)
        except UrlRejected as exc:
            refused.append(exc)

    async with anyio.create_task_group() as group:
        group.start_soon(expire_soon)
        group.start_soon(download)
    assert [exc.http_status for exc in refused] == [403]
    assert "Request has expired" in refused[0].message
    await sandbox.idle()
    saved = calls.states[-1]
    assert saved is not None and 0 < saved.done_bytes < len(data)
    sandbox.requests.clear()
    sandbox.config.storage_rate = None
    fresh = await signed_url(session, sandbox)
    etag = calls.attempts[0][1]
    transfer = await fetch(session, fresh, part, Calls(), connections=8, etag=etag, segments=saved)
    await sandbox.idle()
    assert_exact(part, transfer, data)
    assert served(sandbox) == len(data) - saved.done_bytes


async def test_a_symlink_planted_at_the_part_name_is_replaced_not_followed(
    sandbox: Sandbox, session: HttpSession, tmp_path: Path
) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"precious")
    out = tmp_path / "out"
    out.mkdir()
    part = out / "pkg.zip.part"
    part.symlink_to(outside)
    url = await signed_url(session, sandbox)
    data = package(sandbox)
    for connections in (1, 4):
        transfer = await fetch(session, url, part, Calls(), connections=connections)
        assert outside.read_bytes() == b"precious"
        assert not part.is_symlink()
        assert_exact(part, transfer, data)
        part.unlink()
        part.symlink_to(outside)


async def test_connections_open_two_first_and_the_rest_when_the_event_loop_has_time(
    sandbox: Sandbox, session: HttpSession, tmp_path: Path
) -> None:
    sandbox.config.storage_rate = 2 * MIB  # capped connections: the event loop idles
    url = await signed_url(session, sandbox)
    part = tmp_path / "pkg.zip.part"
    transfer = await fetch(session, url, part, Calls(), connections=8, ramp=True)
    assert_exact(part, transfer, package(sandbox))
    assert transfer.connections == 8


async def test_connections_that_are_not_capped_stay_at_two(
    sandbox: Sandbox, session: HttpSession, tmp_path: Path
) -> None:
    sandbox.config.storage_rate = 4 * MIB
    url = await signed_url(session, sandbox)
    part = tmp_path / "pkg.zip.part"
    downloader = Downloader(
        session,
        clock=FakeClock(),
        retries=3,
        read_timeout=5.0,
        fast_connection=MIB // 8,  # 4 MiB/s a connection is fast here, even on a busy machine
    )
    calls = Calls()
    transfer = await downloader.transfer(
        url,
        part,
        etag=None,
        job_key="k" * 64,
        url_expired=lambda: False,
        on_attempt=calls.on_attempt,
        connections=8,
        segment_min=SEGMENT_MIN,
        on_segments=calls.on_segments,
        root=tmp_path,
    )
    data = package(sandbox)
    assert_exact(part, transfer, data)
    assert transfer.connections == 2  # SPEC §4: more than one, always
    assert downloader.bytes_received >= transfer.size
    # The second connection took the last range and stopped; the first read on through the
    # rest of its bytes=0- answer: two GETs in all, the second exactly the tail.
    tail = (len(data) - MIB) // MIB * MIB
    assert ranges_asked(sandbox) == [(0, None), (tail, len(data))]
    assert gets(sandbox)[1].bytes_sent == len(data) - tail
    # With one connection of eight working, progress is committed every 6-7 pieces, not each.
    assert calls.states[-1] == SegmentState(len(data), ((0, len(data)),))
    assert len(calls.states) <= 2 + -(-len(data) // (6 * MIB))


# ------------------------------------------------------------------------------- whole runs (CLI)


def _stored_segments(state_dir: Path) -> SegmentState | None:
    import json
    import sqlite3

    db = sqlite3.connect(state_dir / "state.sqlite3", timeout=5)
    try:
        rows = db.execute("SELECT total, done FROM segments").fetchall()
    except sqlite3.OperationalError:
        return None  # not created yet
    finally:
        db.close()
    if not rows:
        return None
    total, done = rows[0]
    return SegmentState(total, tuple((a, b) for a, b in json.loads(done)))


def test_kill_9_during_a_16_connection_download_then_the_rerun_fetches_only_missing_ranges(
    tmp_path: Path,
) -> None:
    import signal
    import subprocess
    import sys

    from tests.fakes import clean_env, sandbox_thread

    config = SandboxConfig(keys=(KEY,), asset_size=12 * MIB, rate=None, ready_after_puts=1)
    config.storage_rate = 1.5 * MIB  # per connection: 16 of them move ~24 MiB/s
    with sandbox_thread(config) as sandbox:
        ins = INSIGHT
        manifest = tmp_path / "m.yaml"
        manifest.write_text(
            "version: 1\nlimits: {poll_interval: 0.05s, connections: 16, segment_min: 1048576}\n"
            f'exports:\n  - {{aoi_id: "{AOI.id}", insight_id: "{ins.id}", '
            f'outputs: ["{ins.outputs[0]}", "{ins.outputs[1]}", "{ins.outputs[2]}"]}}\n'
        )
        argv = [sys.executable, "-m", "batch_export", "run", str(manifest)]
        argv += ["--api-url", sandbox.api_url, "-q"]
        environ = clean_env(PIXXEL_API_KEY=KEY)
        state_dir = tmp_path / "exports" / ".batch-export"
        proc = subprocess.Popen(argv, env=environ, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            saved = _stored_segments(state_dir) if state_dir.exists() else None
            if saved is not None and saved.done_bytes > 8 * MIB:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        saved = _stored_segments(state_dir)
        assert saved is not None and 0 < saved.done_bytes < saved.total
        settle = time.monotonic() + 10
        while sandbox._active and time.monotonic() < settle:  # handlers of the dead connections
            time.sleep(0.01)
        first = [r for r in sandbox.requests_to("storage", "GET")]
        first_served = sum(r.bytes_sent for r in first)
        assert len(first) >= 16
        sandbox.requests.clear()
        sandbox.config.storage_rate = None
        second = subprocess.run(argv, env=environ, capture_output=True, text=True, timeout=120)
        assert second.returncode == 0, second.stderr
        gets_now = sandbox.requests_to("storage", "GET")
        covered: tuple[tuple[int, int], ...] = ()
        for request in gets_now:
            first_byte, _, last = (
                (request.header("Range") or "").removeprefix("bytes=").partition("-")
            )
            assert last, "the re-run asked an open range: it fetched from scratch"
            covered = add_range(covered, int(first_byte), int(last) + 1)
        assert covered == missing_ranges(saved.total, saved.done)
        assert sum(r.bytes_sent for r in gets_now) == saved.total - saved.done_bytes
        # bytes the killed run received but had not recorded: about two pieces per connection
        # (one being gathered, one being written), plus what the first GET sent past its range
        assert first_served - saved.done_bytes <= 16 * 2 * PIECE_SIZE + 4 * MIB
        final = tmp_path / "exports" / AOI.id / ins.id / f"{ins.id}.zip"
        digest = hashlib.sha256(final.read_bytes()).hexdigest()
        assert digest == sandbox.package_bytes_sha256(AOI.id, ins.id, (), tuple(ins.outputs[:3]))
        assert _stored_segments(state_dir) is None  # forgotten once done


async def test_url_expiry_mid_download_costs_one_fresh_put_then_only_the_missing_ranges(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    from batch_export.manifest import ExportSpec
    from batch_export.runner import Runner
    from batch_export.store import MemoryStore
    from batch_export.types import Outcome, Settings

    sandbox.config.storage_rate = 2 * MIB
    sandbox.config.ready_after_puts = 1
    spec = ExportSpec(AOI.id, INSIGHT.id, INSIGHT.inputs, INSIGHT.outputs, "pkg", "pkg.zip")
    settings = Settings(
        api_url=sandbox.api_url,
        out_dir=tmp_path,
        state_dir=tmp_path / ".state",
        connections=8,
        segment_min=SEGMENT_MIN,
        rate=100.0,
        poll_interval=0.01,
        retries=3,
        read_timeout=5.0,
        backoff_base=0.01,
        backoff_cap=0.02,
    )
    store = MemoryStore()
    at_expiry: list[SegmentState | None] = []

    def progress() -> int:
        state = next(iter(store.segments.values()), None)
        return 0 if state is None else state.done_bytes

    async def expire_soon() -> None:
        with anyio.fail_after(30):
            while progress() < 4 * MIB:
                await anyio.sleep(0.01)
        at_expiry.append(next(iter(store.segments.values())))
        sandbox.config.clock = lambda: time.time() + 7200  # the URL's hour is over

    class Quiet:
        def job_state(self, job: Any) -> None: ...
        def job_bytes(self, job: Any, count: int) -> None: ...
        def job_finished(self, result: Any) -> None: ...

    async with anyio.create_task_group() as group:
        group.start_soon(expire_soon)
        result = await Runner(settings, [spec], api_key=KEY, store=store, observer=Quiet()).run()
    await sandbox.idle()
    assert [job.outcome for job in result.jobs] == [Outcome.DOWNLOADED]
    data = package(sandbox)
    assert (tmp_path / "pkg.zip").read_bytes() == data
    requests = sandbox.requests
    refused = [i for i, r in enumerate(requests) if r.origin == "storage" and r.status == 403]
    assert refused, "the URL never expired mid-download"
    puts = [i for i, r in enumerate(requests) if r.origin == "api"]
    assert len([i for i in puts if i > refused[0]]) == 1  # one fresh PUT
    after = [r for r in requests[puts[-1] :] if r.origin == "storage"]
    asked: tuple[tuple[int, int], ...] = ()
    for r in after:
        first, _, last = (r.header("Range") or "").removeprefix("bytes=").partition("-")
        assert last, "a fetch from scratch after the refresh"
        asked = add_range(asked, int(first), int(last) + 1)
    fetched_before = len(data) - sum(stop - start for start, stop in asked)
    assert at_expiry[0] is not None and fetched_before >= at_expiry[0].done_bytes > 0
    assert sum(r.bytes_sent for r in after) == sum(stop - start for start, stop in asked)
    assert store.segments == {}  # forgotten once done
