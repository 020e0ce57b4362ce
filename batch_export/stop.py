"""The one stop controller of a run: signals, ``--max-runtime`` and cancellation end a run alike.

Whoever wants a run to stop calls :meth:`StopController.request` with a reason; the runner, bound to
the controller, then admits no new job and cancels the running ones at their current step (every
transition is already saved and ``.part`` files are kept, so the next run resumes). The controller
itself is process-neutral: it installs no signal handler. The command line relays SIGINT/SIGTERM/
SIGHUP to it (:mod:`batch_export.signals`); the Python API (:mod:`batch_export.exporter`) relays the
cancellation of its task.

Once the outcome is being recorded (:meth:`StopController.freeze`), further requests change nothing:
the exit code recorded in the report, the metrics and the state store is the one the process exits
with.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

__all__ = ["StopController"]

log = logging.getLogger("batch_export")


class StopController:
    """Collects stop requests for one run.

    The first request wins, except that any other outranks the time budget (exit 130/143/129
    before 3; see :data:`batch_export.types.STOP_EXIT_CODES`), and a signal or a cancellation
    outranks the breaker (exit 1).

    Attributes:
        reason: why the run stops (``"SIGINT"``, ``"SIGTERM"``, ``"SIGHUP"``, ``"max_runtime"``,
            ``"cancelled"``, ``"breaker"``: the run-wide circuit breaker opened), or None.
        frozen: the outcome is being recorded; requests are only logged now.
    """

    def __init__(self) -> None:
        self.reason: str | None = None
        self.frozen = False
        self._listeners: list[Callable[[], None]] = []

    def request(self, reason: str) -> None:
        """Ask the run to stop for ``reason``; harmless when repeated or after :meth:`freeze`."""
        if self.frozen:
            log.warning(
                "%s while the run's outcome is recorded: finishing as planned",
                reason,
                extra={"event": "run_stopping"},
            )
            return
        outranks = (self.reason == "max_runtime" and reason != "max_runtime") or (
            self.reason == "breaker" and reason not in ("max_runtime", "breaker")
        )  # a signal outranks the time budget and the breaker (exit 130/143/129 before 3 and 1)
        if self.reason is None or outranks:
            self.reason = reason
            if reason != "breaker":  # the breaker logs its own line, naming the cause
                # The time budget is a planned stop (the summary's exit 3 says it): info, so that
                # -q prints only the summary; a signal or a cancellation is worth a warning.
                log.log(
                    logging.INFO if reason == "max_runtime" else logging.WARNING,
                    "stopping (%s): in-flight work is checkpointed for the next run",
                    reason,
                    extra={"event": "run_stopping"},
                )
        for listener in list(self._listeners):
            listener()

    def on_stop(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` at each request (at once if one was made already)."""
        self._listeners.append(listener)
        if self.reason is not None:
            listener()

    def freeze(self) -> str | None:
        """Stop taking requests into account (the outcome is being recorded); return the reason."""
        self.frozen = True
        return self.reason

    @property
    def requested(self) -> bool:
        """A stop was requested."""
        return self.reason is not None
