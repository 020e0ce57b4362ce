"""Opening, renaming and removing paths under the output dir without ever following a symlink.

A symlink (or a hard link, a FIFO, a socket) planted at a ``.part`` name or at a folder below the
output dir must never make the downloader write outside the output dir (issue 10). So every folder
below ``root`` is opened component by component with ``O_NOFOLLOW`` (``openat``), files are opened
relative to their folder's descriptor with ``O_NOFOLLOW``, and renames/removals use the folder's
descriptor too, so no component is resolved twice. A ``.part`` that is not a plain file of ours
(a symlink, a hard link to something else, a FIFO or socket) is removed and created afresh; a
folder where a file should be, or a file or symlink where a folder should be, fails the job.

Every function here is blocking (run it in a worker thread) and raises :class:`OSError` for the
caller to translate, except for the path problems above, which raise :class:`PathProblem`.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

__all__ = ["PathProblem", "open_dir", "open_file", "replace_in", "unlink_in"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
_FILE_FLAGS = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK


class PathProblem(OSError):
    """A path under the output dir is not what it must be (raised by this module only).

    Attributes:
        code: ``"path_escape"`` (a symlink where a folder must be) or ``"path_clash"`` (a file
            where a folder must be, or a folder where a file must be).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(errno.ELOOP if code == "path_escape" else errno.EEXIST, message)
        self.code = code


def open_dir(folder: Path, root: Path | None) -> int:
    """Return a descriptor of ``folder``, creating it (and its parents) as needed.

    Below ``root`` no component may be a symlink; ``root`` itself (the user's output dir) may be.
    With ``root`` None the folder is created and opened as given (no check).

    Raises:
        PathProblem: a component below ``root`` is a symlink or not a folder, or ``folder`` is
            not under ``root``.
        OSError: creating or opening failed.
    """
    if root is None:
        folder.mkdir(parents=True, exist_ok=True)
        return os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        parts = folder.relative_to(root).parts
    except ValueError:
        raise PathProblem("path_escape", f"{folder} is not inside {root}") from None
    if ".." in parts:
        raise PathProblem("path_escape", f"{folder} climbs out of {root}")
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in parts:
            fd = _step(fd, name, folder)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _step(fd: int, name: str, folder: Path) -> int:
    """Open (creating if missing) folder ``name`` inside ``fd``; close ``fd``; return the new one."""
    for _ in range(2):
        try:
            child = os.open(name, _DIR_FLAGS, dir_fd=fd)
        except FileNotFoundError:
            try:
                os.mkdir(name, 0o777, dir_fd=fd)
            except FileExistsError:
                pass  # made meanwhile (or a dangling symlink: the next open says which)
            continue
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                kind = _kind(fd, name)
                code = "path_escape" if kind == "symlink" else "path_clash"
                raise PathProblem(code, f"{folder}: {name!r} is a {kind}, not a folder") from None
            raise
        os.close(fd)
        return child
    raise PathProblem("path_escape", f"{folder}: {name!r} is a dangling symlink")


def _kind(fd: int, name: str) -> str:
    try:
        mode = os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode
    except OSError:
        return "missing entry"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "folder"
    return "file" if stat.S_ISREG(mode) else "special file"


def open_file(dir_fd: int, name: str, *, keep: bool) -> tuple[int, bool]:
    """Open ``name`` in folder ``dir_fd`` for reading and writing; return ``(fd, kept)``.

    Never through a symlink. Anything there that is not a plain file of ours alone (a symlink, a
    FIFO, a socket, a device, a file with other hard links) is removed and a fresh file created.
    ``keep`` False empties the file; ``kept`` says whether earlier bytes were kept.

    Raises:
        PathProblem: ``path_clash``: a folder is in the way.
        OSError: opening or creating failed.
    """
    for _ in range(3):
        try:
            fd = os.open(name, _FILE_FLAGS | os.O_CREAT, 0o644, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno == errno.EISDIR:
                raise PathProblem("path_clash", f"{name!r} is a folder") from None
            if exc.errno not in (errno.ELOOP, errno.ENXIO, errno.EOPNOTSUPP):
                raise
            _remove_foreign(dir_fd, name)
            keep = False
            continue
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
            os.close(fd)
            _remove_foreign(dir_fd, name)
            keep = False
            continue
        os.set_blocking(fd, True)
        if not keep and info.st_size:
            os.ftruncate(fd, 0)
        return fd, keep and info.st_size > 0
    raise PathProblem("path_clash", f"{name!r} keeps being replaced by something else")


def _remove_foreign(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        raise PathProblem("path_clash", f"{name!r} is a folder") from None


def replace_in(dir_fd: int, source: str, target: str) -> None:
    """Rename ``source`` onto ``target`` inside folder ``dir_fd`` (atomic).

    A symlink at ``target`` is replaced, not followed.

    Raises:
        PathProblem: ``path_clash``: a folder is at ``target``.
        OSError: the rename failed.
    """
    try:
        os.replace(source, target, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except IsADirectoryError:
        raise PathProblem("path_clash", f"{target!r} is a folder") from None


def unlink_in(dir_fd: int, name: str) -> None:
    """Remove ``name`` from folder ``dir_fd``: the entry itself, never what a symlink names.

    Nothing happens if it is gone or is a folder.

    Raises:
        OSError: the removal failed.
    """
    try:
        os.unlink(name, dir_fd=dir_fd)
    except (FileNotFoundError, IsADirectoryError):
        pass
    except PermissionError as exc:  # Linux says EPERM for unlink() of a folder
        if exc.errno == errno.EPERM and _kind(dir_fd, name) == "folder":
            return
        raise
