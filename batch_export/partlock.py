"""An exclusive lock on each ``.part`` while it is written (SPEC §9).

Two runs with different state dirs over one output dir may pick the same package; the state-dir
lock (:mod:`batch_export.lock`) does not see that. Each writer therefore holds a non-blocking
exclusive ``flock`` on the open ``.part`` for as long as it has it open: the kernel drops the lock
when the file is closed or the process dies (``kill -9`` included), so a stale lock never blocks a
later run. A writer that finds the lock taken gets :class:`PartBusy` before it changes a byte.
The writer takes the lock again (:func:`part_held`) while it verifies the complete ``.part`` and
renames it onto the final path, so no other process empties it in between.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from batch_export.errors import JobError

__all__ = ["PartBusy", "lock_part", "part_held"]

#: ``errno`` of a file system that has no locks.
_NO_LOCKS = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL})


class PartBusy(JobError):
    """Raised when another process holds the lock of the ``.part`` this job would write.

    Not a failure of the job: the runner leaves it ``pending`` (the next run takes it up), and
    other downloads go on.
    """

    code = "part_busy"


def lock_part(fd: int, part: Path) -> None:
    """Take the exclusive lock of the open ``.part`` ``fd`` without waiting.

    A file system without locks (``ENOLCK``, ``EOPNOTSUPP``: some network and FUSE file systems)
    is written without one, as before: the lock guards a rare mistake, and must not stop a run.

    Raises:
        PartBusy: another process (or another open of the file) holds it.
        OSError: the lock failed for another reason.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in _NO_LOCKS:
            return
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        raise PartBusy(
            f"{part} is being written by another batch-export process (another state dir over "
            "the same output dir?); left for the next run",
            code="part_busy",
        ) from None


@contextmanager
def part_held(part: Path) -> Iterator[None]:
    """Hold the lock of the complete ``.part`` for the block (its verification and commit).

    A ``.part`` that cannot be opened is not locked: the verification reports what is wrong.

    Raises:
        PartBusy: another process holds it.
    """
    try:
        fd: int | None = os.open(part, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NOCTTY)
    except OSError:
        fd = None
    try:
        if fd is not None:
            lock_part(fd, part)
        yield
    finally:
        if fd is not None:
            os.close(fd)
