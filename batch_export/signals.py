"""SIGINT/SIGTERM/SIGHUP for the command line: the only process-wide signal handling there is.

:class:`SignalRelay` owns the three signals for the whole life of a ``batch-export run`` process, so
there is never a moment when a signal falls through to its default action (which would end the
process without a report, or with a code other than the one recorded):

* before the run (parsing the manifest): the handler raises :class:`Interrupted`; the CLI exits
  128 + signal number (130/143/129) and nothing was requested;
* while the run goes on (:meth:`SignalRelay.relay_to`): the signal becomes a stop request on the
  run's :class:`~batch_export.stop.StopController` (scheduled on the event loop); a second signal
  exits at once (every transition is already saved);
* once the outcome is being recorded, or after: the signal is ignored, so the process exits with
  the code its report, metrics and state store hold.

The Python API never uses this module (SPEC §10).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from types import FrameType
from typing import Final

from batch_export.stop import StopController

__all__ = ["SIGNAL_NAMES", "Interrupted", "SignalRelay"]

log = logging.getLogger("batch_export")

#: The signals a run is sent in normal operation (Ctrl-C, ``kill``, a closing terminal or ssh).
SIGNAL_NAMES: Final = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}


class Interrupted(BaseException):
    """Raised in the main thread by a signal before the run started.

    Attributes:
        signum: the signal number; the exit code is ``128 + signum`` (130, 143 or 129).
    """

    def __init__(self, signum: int) -> None:
        super().__init__(SIGNAL_NAMES.get(signal.Signals(signum), str(signum)))
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP."""
        return 128 + self.signum


class SignalRelay:
    """Owns SIGINT/SIGTERM/SIGHUP for the process (see the module docstring)."""

    def __init__(self) -> None:
        self._stop: StopController | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._signalled = False
        self._finishing = False

    def install(self) -> None:
        """Take the three signals (call from the main thread)."""
        for signum in SIGNAL_NAMES:
            signal.signal(signum, self._handle)

    def relay_to(self, stop: StopController) -> None:
        """From now on, signals ask ``stop`` to stop the run (call inside the running loop)."""
        self._loop = asyncio.get_running_loop()
        self._stop = stop

    def finishing(self) -> None:
        """From now on, signals are ignored: the exit code is decided and recorded."""
        self._finishing = True
        self._stop = None
        self._loop = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = SIGNAL_NAMES.get(signal.Signals(signum), str(signum))
        stop, loop = self._stop, self._loop
        if self._finishing or (stop is not None and stop.frozen):
            return
        if stop is None or loop is None:
            raise Interrupted(signum)
        if self._signalled:
            log.error("second %s: exiting now", name)
            os._exit(128 + signum)
        self._signalled = True
        loop.call_soon_threadsafe(stop.request, name)
