"""The JSON run report (SPEC §5): ``<state-dir>/reports/<run-id>.json`` and ``--report PATH``."""

from __future__ import annotations

import json
import logging
import os
import secrets
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from batch_export.clock import utc_timestamp
from batch_export.redact import Redactor
from batch_export.safepath import open_dir, replace_in, unlink_in
from batch_export.types import DiscoveryEntry, JobResult, Outcome, RunResult

__all__ = ["build_report", "new_run_id", "outcome_counts", "utc_timestamp", "write_report"]

log = logging.getLogger("batch_export")


def new_run_id(now: float | None = None) -> str:
    """Return a run id: UTC start time plus 6 random hex digits (``20261129T030000Z-1a2b3c``)."""
    stamp = datetime.fromtimestamp(now if now is not None else time.time(), UTC)
    return f"{stamp:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def outcome_counts(result: RunResult | None) -> dict[str, int]:
    """Return ``{"total": n, "downloaded": …, "skipped": …, "failed": …, "pending": …, "abandoned": …}``."""
    jobs = result.jobs if result else ()
    counts = {"total": len(jobs)} | {str(outcome): 0 for outcome in Outcome}
    for job in jobs:
        counts[str(job.outcome)] += 1
    return counts


def build_report(
    *, run_id: str, started_at: float, finished_at: float, exit_code: int, result: RunResult | None
) -> dict[str, Any]:
    """Return the run report document (SPEC §5)."""
    jobs = result.jobs if result else ()
    counts = outcome_counts(result)
    return {
        "run_id": run_id,
        "started_at": utc_timestamp(started_at),
        "finished_at": utc_timestamp(finished_at),
        "exit_code": exit_code,
        "counts": counts,
        "requests": {
            "api": result.api_requests if result else 0,
            "storage": result.storage_requests if result else 0,
            "store": result.store_requests if result else 0,
            "throttled": result.throttled if result else 0,
        },
        "jobs": [_job_entry(job) for job in jobs],
        "discovery": [_discovery_entry(entry) for entry in (result.discovery if result else ())],
        "breaker": dict(result.breaker) if result and result.breaker else None,
    }


def _discovery_entry(entry: DiscoveryEntry) -> dict[str, Any]:
    error = entry.error
    return {
        "selector": entry.selector,
        "aoi_id": entry.aoi_id,
        "listed": entry.listed,
        "selected": entry.selected,
        "error": None
        if error is None
        else {"code": error.code, "message": error.message, "http_status": error.http_status},
        "warning": None
        if entry.warning is None
        else {"code": entry.warning.code, "message": entry.warning.message},
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
        "source": job.source,
    }
    entry["error"] = (
        {"code": job.error_code, "message": job.error_message, "http_status": job.error_http_status}
        if job.outcome in (Outcome.FAILED, Outcome.ABANDONED)  # the last error of both
        else None
    )
    return entry


def write_report(
    report: dict[str, Any], path: Path, *, redactor: Redactor, root: Path | None = None
) -> None:
    """Write ``report`` as JSON to ``path`` atomically (temp file, fsync, rename), redacted.

    ``root``: a folder ``path`` is inside (the state dir) below which no component may be a
    symlink, checked when writing, not only at start (:mod:`~batch_export.safepath`: every folder
    opened with ``O_NOFOLLOW``, the temp file made and renamed relative to its folder). None: the
    operator's own path (``--report``), written as given.

    Raises:
        OSError: the folder cannot be created or written; :class:`~batch_export.safepath.PathProblem`
            (an ``OSError``) when a component below ``root`` is a symlink.
    """
    text = json.dumps(redactor.redact_values(report), indent=2, ensure_ascii=False) + "\n"
    if root is not None:
        _write_below(root, path, text)
        return
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


def _write_below(root: Path, path: Path, text: str) -> None:
    """``write_report`` below ``root``: never through a symlink (see there)."""
    dir_fd = open_dir(path.parent, root)
    try:
        tmp = f".report-{secrets.token_hex(8)}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o644, dir_fd=dir_fd)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            replace_in(dir_fd, tmp, path.name)
        except BaseException:
            unlink_in(dir_fd, tmp)
            raise
    finally:
        os.close(dir_fd)
