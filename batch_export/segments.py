"""Which byte ranges of a segmented download are on disk, and which one a connection takes next.

Pure bookkeeping, no I/O (SPEC §4 "Segmented download"): the downloader asks :class:`Schedule` for
the next range to fetch, tells it what reached the disk, and hands :class:`SegmentState` snapshots to
its caller, which persists them (the ``segments`` table of the state store) so a crash, a reset of
one connection, or an expired URL costs only the missing ranges.

Ranges are half-open ``(start, stop)`` byte offsets. Ranges are handed out in file order (the first
missing byte first; only a download's second connection starts with the last unit), so the contiguous prefix (which the SHA-256/MD5 follow) grows steadily, and
with *guided* sizes: a claim takes ``remaining / (2 × connections)`` bytes, never less than
``unit_min``, so the last ranges are small and no connection is left with a long tail while the
others idle. Sizes are multiples of ``align`` (the CRC block), so every piece a connection writes
covers whole CRC blocks.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

__all__ = ["UNIT_MIN", "Ranges", "Schedule", "SegmentState", "add_range", "missing_ranges"]

#: Smallest range one request fetches (bytes): at 20 MB/s a connection spends 0.4 s on it, so a
#: 50 ms first byte costs at most an eighth of it.
UNIT_MIN = 8 * 1024 * 1024

Ranges = tuple[tuple[int, int], ...]
"""Sorted, disjoint, non-adjacent half-open byte ranges ``((start, stop), ...)``."""


@dataclass(frozen=True, slots=True)
class SegmentState:
    """The durable progress of a segmented download.

    Attributes:
        total: size of the entity (bytes), from ``Content-Range``.
        done: the byte ranges already written to the ``.part`` (:data:`Ranges`).
    """

    total: int
    done: Ranges = ()

    @property
    def done_bytes(self) -> int:
        """Bytes on disk (bytes)."""
        return sum(stop - start for start, stop in self.done)

    @property
    def complete(self) -> bool:
        """Every byte of the entity is on disk."""
        return self.done == ((0, self.total),) or self.total == 0

    def prefix(self) -> int:
        """Length of the contiguous run of bytes from offset 0 (bytes)."""
        return self.done[0][1] if self.done and self.done[0][0] == 0 else 0


def add_range(ranges: Ranges, start: int, stop: int) -> Ranges:
    """Return ``ranges`` with ``[start, stop)`` added, merged with what it touches or overlaps."""
    if stop <= start:
        return ranges
    items = list(ranges)
    i = bisect.bisect_left(items, (start, start))
    if i > 0 and items[i - 1][1] >= start:
        i -= 1
    j = i
    while j < len(items) and items[j][0] <= stop:
        start = min(start, items[j][0])
        stop = max(stop, items[j][1])
        j += 1
    items[i:j] = [(start, stop)]
    return tuple(items)


def missing_ranges(total: int, done: Ranges) -> Ranges:
    """Return the ranges of ``[0, total)`` not in ``done``."""
    gaps: list[tuple[int, int]] = []
    position = 0
    for start, stop in done:
        if start > position:
            gaps.append((position, min(start, total)))
        position = max(position, stop)
    if position < total:
        gaps.append((position, total))
    return tuple(gap for gap in gaps if gap[0] < gap[1])


class Schedule:
    """Hands out ranges to fetch, in file order, and keeps what is done (mutable; no I/O).

    Args:
        state: what is already on disk.
        connections: connections that will claim ranges (sizes a claim).
        unit_min: smallest claim (bytes), unless less is left; at most half the entity, so an
            entity worth splitting is always fetched over at least two ranges.
        align: claims start and end on multiples of this (bytes), except at the entity's end.
    """

    def __init__(
        self, state: SegmentState, *, connections: int, unit_min: int = UNIT_MIN, align: int = 1
    ) -> None:
        self.total = state.total
        self._done: Ranges = state.done
        self._free: Ranges = missing_ranges(state.total, state.done)
        self._connections = max(1, connections)
        half = -(-state.total // 2)
        self._unit = max(align, min(unit_min, -(-half // align) * align))
        self._align = align

    @property
    def state(self) -> SegmentState:
        """A snapshot of the progress, to persist."""
        return SegmentState(self.total, self._done)

    @property
    def complete(self) -> bool:
        """Every byte is on disk."""
        return self.state.complete

    @property
    def unclaimed(self) -> int:
        """Bytes neither on disk nor claimed (bytes)."""
        return sum(stop - start for start, stop in self._free)

    def claim(self) -> tuple[int, int] | None:
        """Take the next range to fetch (the first unclaimed bytes), or None if nothing is left."""
        if not self._free:
            return None
        start, stop = self._free[0]
        size = max(self._unit, -(-self.unclaimed // (2 * self._connections)))
        size = -(-size // self._align) * self._align
        end = start + size
        if stop - end < self._unit // 2:  # no sliver too small to be worth its own request
            end = stop
        end = min(end, stop)
        self._free = ((end, stop), *self._free[1:]) if end < stop else self._free[1:]
        return start, end

    def claim_tail(self) -> tuple[int, int] | None:
        """Take the last unit of the unclaimed bytes (``None`` if nothing is left).

        The second connection of a download starts here, at the far end, so the first one,
        whose answer to ``bytes=0-`` runs on to the end, can keep reading (:meth:`extend`)
        instead of stopping where the next range begins: where one connection is already as
        fast as the process can go, the download is then one long stream plus one short range.
        """
        if not self._free:
            return None
        start, stop = self._free[-1]
        begin = max(start, (stop - self._unit) // self._align * self._align)
        if begin - start < self._unit // 2:  # no sliver left behind
            begin = start
        self._free = (*self._free[:-1], (start, begin)) if begin > start else self._free[:-1]
        return begin, stop

    def extend(self, position: int) -> int | None:
        """Claim the next range if it starts at ``position``; return its end (else ``None``).

        For a connection whose answer goes on past the end of its claim (``bytes=0-``).
        """
        if not self._free or self._free[0][0] != position:
            return None
        claim = self.claim()
        assert claim is not None
        return claim[1]

    def release(self, start: int, stop: int) -> None:
        """Give back the unfetched rest ``[start, stop)`` of a claim (its connection failed)."""
        self._free = add_range(self._free, start, stop)

    def progress(self, start: int, stop: int) -> None:
        """Record that ``[start, stop)`` is on disk."""
        self._done = add_range(self._done, start, stop)
