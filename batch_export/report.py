"""What a run tells people and scripts: log lines, a progress line, the JSON run report.

Log lines go to stderr through :mod:`logging` with a :class:`~batch_export.redact.RedactingFilter`;
the progress display (a terminal only) is drawn by :mod:`rich` on the same stream, so log lines
print above it without tearing it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)

from batch_export.redact import RedactingFilter, Redactor
from batch_export.runner import Job, JobResult, Outcome, RunResult

__all__ = [
    "ConsoleObserver",
    "build_report",
    "configure_logging",
    "new_run_id",
    "utc_timestamp",
    "write_report",
]

log = logging.getLogger("batch_export")


def new_run_id(now: float | None = None) -> str:
    """Return a run id: UTC start time plus 6 random hex digits (``20261129T030000Z-1a2b3c``)."""
    stamp = datetime.fromtimestamp(now if now is not None else time.time(), UTC)
    return f"{stamp:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def utc_timestamp(epoch: float) -> str:
    """Return ``epoch`` seconds as ``2026-11-29T03:00:00Z``."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _StderrHandler(logging.Handler):
    """Writes log lines to stderr, or through the rich console while a progress bar is live."""

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


def configure_logging(*, verbosity: int, redactor: Redactor) -> None:
    """Send ``batch_export`` log lines to stderr, redacted.

    Args:
        verbosity: -1 quiet (warnings only), 0 normal (one line per job outcome), 1 verbose.
        redactor: removes the key and signed-URL queries from every line.
    """
    logger = logging.getLogger("batch_export")
    logger.handlers[:] = [_HANDLER]
    logger.propagate = False
    _HANDLER.filters[:] = [RedactingFilter(redactor)]
    _HANDLER.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s"))
    level = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}[max(-1, min(1, verbosity))]
    logger.setLevel(level)
    # aiohttp's own loggers may print URLs: keep them quiet and redacted.
    for name in ("aiohttp", "asyncio"):
        other = logging.getLogger(name)
        other.handlers[:] = [_HANDLER]
        other.propagate = False
        other.setLevel(logging.ERROR)


class ConsoleObserver:
    """Logs one line per job outcome; draws a progress line when ``progress`` is on."""

    def __init__(self, *, total: int, progress: bool) -> None:
        self._progress: Progress | None = None
        self._task: Any = None
        self._total = total
        self._finished = 0
        if progress:
            console = Console(file=sys.stderr)
            self._progress = Progress(
                TextColumn("[bold]{task.fields[jobs]}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeElapsedColumn(),
                console=console,
                transient=True,
            )
            self._task = self._progress.add_task("export", total=None, jobs=self._jobs_text())

    @contextmanager
    def live(self) -> Iterator[None]:
        """Show the progress display (if any) for the duration of the block."""
        if self._progress is None:
            yield
            return
        _HANDLER.console = self._progress.console
        try:
            with self._progress:
                yield
        finally:
            _HANDLER.console = None

    def _jobs_text(self) -> str:
        return f"{self._finished}/{self._total} jobs"

    def job_state(self, job: Job) -> None:
        """Log state changes at debug level."""
        log.debug(
            "job %s %s/%s -> %s",
            job.key[:12],
            job.spec.aoi_id,
            job.spec.insight_id,
            job.record.state,
        )

    def job_bytes(self, job: Job, count: int) -> None:
        """Advance the byte counter."""
        if self._progress is not None:
            self._progress.update(self._task, advance=count)

    def job_finished(self, result: JobResult) -> None:
        """Log the job's outcome line."""
        self._finished += 1
        if self._progress is not None:
            self._progress.update(self._task, jobs=self._jobs_text())
        ident = f"{result.aoi_id}/{result.insight_id} ({result.name})"
        if result.outcome is Outcome.FAILED:
            status = f" HTTP {result.error_http_status}" if result.error_http_status else ""
            log.warning(
                "failed      %s: %s%s: %s", ident, result.error_code, status, result.error_message
            )
        elif result.outcome is Outcome.DOWNLOADED:
            log.info("downloaded  %s -> %s (%s bytes)", ident, result.path, result.bytes)
        elif result.outcome is Outcome.SKIPPED:
            log.info("skipped     %s: already done at %s", ident, result.path)
        else:
            log.info("pending     %s: left for the next run", ident)


def build_report(
    *, run_id: str, started_at: float, finished_at: float, exit_code: int, result: RunResult | None
) -> dict[str, Any]:
    """Return the run report document (SPEC §5)."""
    jobs = result.jobs if result else ()
    counts = {
        "total": len(jobs),
        "downloaded": sum(1 for j in jobs if j.outcome is Outcome.DOWNLOADED),
        "skipped": sum(1 for j in jobs if j.outcome is Outcome.SKIPPED),
        "failed": sum(1 for j in jobs if j.outcome is Outcome.FAILED),
        "pending": sum(1 for j in jobs if j.outcome is Outcome.PENDING),
    }
    return {
        "run_id": run_id,
        "started_at": utc_timestamp(started_at),
        "finished_at": utc_timestamp(finished_at),
        "exit_code": exit_code,
        "counts": counts,
        "requests": {
            "api": result.api_requests if result else 0,
            "storage": result.storage_requests if result else 0,
            "throttled": result.throttled if result else 0,
        },
        "jobs": [_job_entry(job) for job in jobs],
    }


def _job_entry(job: JobResult) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "key": job.key,
        "aoi_id": job.aoi_id,
        "insight_id": job.insight_id,
        "name": job.name,
        "outcome": str(job.outcome),
        "path": job.path,
        "bytes": job.bytes,
        "sha256": job.sha256,
        "attempts": job.attempts,
        "polls": job.polls,
        "seconds": job.seconds,
    }
    if job.outcome is Outcome.FAILED:
        entry["error"] = {
            "code": job.error_code,
            "message": job.error_message,
            "http_status": job.error_http_status,
        }
    return entry


def write_report(report: dict[str, Any], path: Path, *, redactor: Redactor) -> None:
    """Write ``report`` as JSON to ``path`` atomically (temp file, fsync, rename), redacted.

    Raises:
        OSError: the folder cannot be created or written.
    """
    text = redactor(json.dumps(report, indent=2, ensure_ascii=False)) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".report-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
