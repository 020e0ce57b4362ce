"""SIGINT/SIGTERM outside the event loop: turn them into an exception the CLI maps to 130/143.

While jobs run, :mod:`batch_export.app` watches the signals inside the event loop and asks the runner
to checkpoint and stop; before and after that (manifest parsing, opening the store, writing the
report) these handlers make sure the process still exits with 130/143 by ``sys.exit``, not by the
signal, and never as click's "Aborted!" (SPEC §2).
"""

from __future__ import annotations

import signal
from types import FrameType

__all__ = ["SIGNAL_NAMES", "Interrupted", "install_handlers"]

SIGNAL_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


class Interrupted(BaseException):
    """Raised in the main thread by SIGINT/SIGTERM outside the event loop.

    Attributes:
        signum: the signal number; the exit code is ``128 + signum`` (130 or 143).
    """

    def __init__(self, signum: int) -> None:
        super().__init__(SIGNAL_NAMES.get(signal.Signals(signum), str(signum)))
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum


def _raise(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


def install_handlers() -> None:
    """Make SIGINT and SIGTERM raise :class:`Interrupted` (call from the main thread)."""
    for signum in SIGNAL_NAMES:
        signal.signal(signum, _raise)
