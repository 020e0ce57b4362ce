"""Standard streams for the command line: a reader that goes away (``| head``) ends no command.

When the reader of a pipe exits, the next write raises ``BrokenPipeError`` (EPIPE; Python ignores
SIGPIPE). Left alone, that becomes a traceback -- or click's blanket exit 1 -- and, at interpreter
exit, a failed flush turns the exit code into 120. :func:`guard_standard_streams` wraps stdout and
stderr so that, after the first EPIPE, the stream's descriptor points at ``/dev/null`` and the
command finishes with its own exit code (a run still records its outcome, ``validate | head -3``
still exits 0). Only the command line calls it; the Python API leaves the streams alone.
"""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO

__all__ = ["PipeSafeStream", "guard_standard_streams"]


class PipeSafeStream:
    """A text stream whose writes after the reader went away are dropped, not raised.

    Args:
        stream: the stream to wrap (``sys.stdout``/``sys.stderr``).

    Attributes:
        closed_pipe: the reader went away; everything since went to ``/dev/null``.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.closed_pipe = False

    def write(self, text: str) -> int:
        """Write ``text``; after EPIPE, drop it. Returns its length either way."""
        if not self.closed_pipe:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._reader_gone()
        return len(text)

    def flush(self) -> None:
        """Flush; after EPIPE, nothing."""
        if not self.closed_pipe:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._reader_gone()

    def _reader_gone(self) -> None:
        self.closed_pipe = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, self._stream.fileno())
            finally:
                os.close(devnull)
        except (OSError, ValueError):
            pass  # no descriptor to redirect: the writes are dropped here anyway

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def guard_standard_streams() -> None:
    """Wrap ``sys.stdout`` and ``sys.stderr`` in :class:`PipeSafeStream` (once)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, PipeSafeStream):
            setattr(sys, name, PipeSafeStream(stream))
