"""Whether a folder is on a local file system: Linux ``statfs(2)`` ``f_type`` (SPEC §5, §8).

A staging dir on a network or FUSE file system would hold the packages the run verifies and
uploads where another host (or a user-space daemon) may change them between the check and the
upload, and its renames and ``flock`` are not what a local disk gives. A state dir there would
hold the SQLite store, whose locks and write-ahead log need a local disk (SQLite's documentation,
"WAL mode": "WAL does not work over a network filesystem"), and the run's ``flock``. The magic numbers are
those of Linux's ``include/uapi/linux/magic.h`` (and ``statfs(2)``). Elsewhere than Linux
nothing is refused.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path
from typing import Final

from batch_export.errors import UsageError

__all__ = [
    "REMOTE_FILE_SYSTEMS",
    "check_local_staging",
    "check_local_state_dir",
    "remote_file_system",
]

#: ``statfs.f_type`` -> name, for the file systems a staging dir must not be on.
REMOTE_FILE_SYSTEMS: Final = {
    0x6969: "NFS",
    0x517B: "SMB",
    0xFF534D42: "CIFS",
    0xFE534D42: "SMB2",
    0x65735546: "FUSE",
    0x01021997: "9p",
    0x00C36400: "Ceph",
    0x5346414F: "AFS",
    0x6B414653: "AFS",
    0x73757245: "Coda",
    0x0BD00BD0: "Lustre",
    0x564C: "NCP",
}


def _f_type(path: Path) -> int | None:
    """Return ``statfs(path).f_type`` (unsigned 32 bits), or None where it cannot be asked."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    buffer = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    if libc.statfs(os.fsencode(path), buffer) != 0:
        return None
    # f_type is the first member (__fsword_t: a C long) on every Linux architecture.
    return ctypes.c_long.from_buffer(buffer).value & 0xFFFFFFFF


def remote_file_system(path: Path) -> str | None:
    """Return the name of the network/FUSE file system ``path`` is on, None when local.

    A folder not made yet is judged by its nearest existing parent (where it will be made).
    """
    probe = path.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    kind = _f_type(probe)
    return None if kind is None else REMOTE_FILE_SYSTEMS.get(kind)


def check_local_staging(staging: Path) -> None:
    """Refuse a staging dir on a network or FUSE file system (SPEC §8).

    Raises:
        UsageError: ``staging`` (or its nearest existing parent) is on one (exit 2, one line).
    """
    kind = remote_file_system(staging)
    if kind is not None:
        raise UsageError(
            f"the staging dir {staging} is on {kind}, not a local file system: packages are "
            "verified there before the upload (SPEC §8); choose a folder on a local disk "
            "(--staging-dir)"
        )


def check_local_state_dir(state_dir: Path) -> None:
    """Refuse a state dir on a network or FUSE file system (SPEC §5).

    Raises:
        UsageError: ``state_dir`` (or its nearest existing parent) is on one (exit 2, one line).
    """
    kind = remote_file_system(state_dir)
    if kind is not None:
        raise UsageError(
            f"the state dir {state_dir} is on {kind}, not a local file system: SQLite's locks "
            "and write-ahead log are unsafe there (SPEC §5); give --state-dir a folder on a "
            "local disk (the output may stay where it is)"
        )
