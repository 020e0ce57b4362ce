"""The state-dir lock: one run per state dir at a time (SPEC §5).

An exclusive, non-blocking ``flock`` on ``<state-dir>/lock``. The kernel drops it when the holder
dies, so a crashed run never blocks the next one. The file is opened without truncating, locked,
and only then overwritten with the holder's pid and start time (so a loser can name the holder).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from pathlib import Path
from types import TracebackType

from batch_export.errors import LockHeldError, UsageError

__all__ = ["StateLock"]


class StateLock:
    """Context manager holding the lock on ``state_dir`` (created if needed).

    Raises:
        LockHeldError: another process holds it (its pid and start time are in the message).
        UsageError: the state dir cannot be created or the lock file opened.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "lock"
        self._fd: int | None = None

    def __enter__(self) -> StateLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # O_NOFOLLOW: a symlink planted at the lock's name must not make us truncate its target.
            flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
            fd = os.open(self.path, flags, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UsageError(
                    f"{self.path} is a symlink; refusing to use it as the lock (remove it)"
                ) from None
            raise UsageError(
                f"cannot use the state dir {self.path.parent}: {exc.strerror}"
            ) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise UsageError(f"{self.path} is not a regular file; refusing to use it as the lock")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise LockHeldError(
                f"another run holds the lock on {self.path.parent} ({holder}); nothing was done"
            ) from None
        os.ftruncate(fd, 0)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        os.write(fd, f"pid {os.getpid()} started {stamp}\n".encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock; the file stays (no unlink race)
            self._fd = None


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "holder unknown"
