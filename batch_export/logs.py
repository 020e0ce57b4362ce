"""Log lines on stderr: text for people, JSON lines for machines; always redacted.

JSON lines (``--log-format json``) are one object per line with these stable fields::

    ts          "2026-11-29T03:00:01.123Z" (UTC)
    level       "debug" | "info" | "warning" | "error"
    event       what happened: job_state, job_downloaded, job_skipped, job_failed, job_pending,
                verify_retry, run_started, run_stopping, run_summary, run_error, manifest_warning,
                progress, breaker_open, job_abandoned, part_busy, log
    message     the human-readable text (the same as the text format's)
    run_id      the run's id
    key, aoi_id, insight_id, job_name, state, attempt, bytes, path, error_code, http_status
                job fields, present on job events
    counts, exit_code, api_requests, throttled, seconds
                on run_summary
    counts, bytes, bytes_per_second, eta_seconds
                on progress (jobs per state; bytes this run; measured rate and ETA, null: unknown)

The key and signed-URL query strings are removed from every field (:mod:`batch_export.redact`).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from rich.console import Console

from batch_export.redact import RedactingFilter, Redactor

__all__ = ["EXTRA_FIELDS", "JsonFormatter", "configure_logging", "set_console"]

#: Fields a log call may pass in ``extra`` that JSON lines carry (in this order).
EXTRA_FIELDS = (
    "key",
    "aoi_id",
    "insight_id",
    "job_name",
    "state",
    "attempt",
    "bytes",
    "path",
    "error_code",
    "http_status",
    "counts",
    "exit_code",
    "api_requests",
    "throttled",
    "seconds",
    "bytes_per_second",
    "eta_seconds",
)


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object (see the module docstring for the fields)."""

    def __init__(self, *, redactor: Redactor, run_id: str | None) -> None:
        super().__init__()
        self._redact = redactor
        self.run_id = run_id

    def format(self, record: logging.LogRecord) -> str:
        """Return the JSON line for ``record`` (no trailing newline)."""
        stamp = datetime.fromtimestamp(record.created, UTC)
        doc: dict[str, Any] = {
            "ts": stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z",
            "level": record.levelname.lower(),
            "event": getattr(record, "event", "log"),
            "message": record.getMessage(),
            "run_id": self.run_id,
        }
        for name in EXTRA_FIELDS:
            if hasattr(record, name):
                doc[name] = getattr(record, name)
        if record.exc_text:
            doc["exception"] = record.exc_text
        return json.dumps(_redacted(doc, self._redact), ensure_ascii=False, default=str)


def _redacted(value: Any, redact: Redactor) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: _redacted(item, redact) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_redacted(item, redact) for item in value]
    return value


class _StderrHandler(logging.Handler):
    """Writes lines to stderr, or through the rich console while a progress display is live."""

    def __init__(self) -> None:
        super().__init__()
        self.console: Console | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            if self.console is not None:
                self.console.print(line, markup=False, highlight=False, soft_wrap=True)
            else:
                sys.stderr.write(line + "\n")
                sys.stderr.flush()
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


_HANDLER = _StderrHandler()


def set_console(console: Console | None) -> None:
    """Route log lines through ``console`` (a live progress display) or, with None, to stderr."""
    _HANDLER.console = console


def configure_logging(
    *, verbosity: int, redactor: Redactor, log_format: str = "text", run_id: str | None = None
) -> None:
    """Send ``batch_export`` log lines to stderr, redacted.

    Args:
        verbosity: -1 quiet (warnings only), 0 normal (one line per job outcome), 1 verbose.
        redactor: removes the key and signed-URL queries from every line.
        log_format: ``"text"`` or ``"json"`` (one JSON object per line).
        run_id: the run's id, carried by JSON lines.
    """
    logger = logging.getLogger("batch_export")
    logger.handlers[:] = [_HANDLER]
    logger.propagate = False
    _HANDLER.filters[:] = [RedactingFilter(redactor)]
    if log_format == "json":
        _HANDLER.setFormatter(JsonFormatter(redactor=redactor, run_id=run_id))
    else:
        _HANDLER.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s"))
    level = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}[max(-1, min(1, verbosity))]
    logger.setLevel(level)
    # Library loggers may print URLs: errors only, through the same redacting handler.
    for name in ("aiohttp", "asyncio"):
        other = logging.getLogger(name)
        other.handlers[:] = [_HANDLER]
        other.propagate = False
        other.setLevel(logging.ERROR)
