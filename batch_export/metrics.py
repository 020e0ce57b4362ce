"""Prometheus text-format metrics for node_exporter's textfile collector (``--metrics-file``).

Written once at the end of a run, atomically, with ``prometheus_client`` (no hand formatting).
Every value describes the last run, except ``batch_export_last_success_timestamp_seconds``.
"""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

from batch_export.types import Outcome, RunResult

__all__ = ["write_metrics"]


def write_metrics(
    path: Path,
    *,
    result: RunResult | None,
    exit_code: int,
    finished_at: float,
    last_success_at: float | None,
) -> None:
    """Write the metrics file atomically (temp file + rename, by ``prometheus_client``).

    Args:
        path: the ``.prom`` file (node_exporter reads ``*.prom`` in its textfile directory).
        result: the run's result (None if the run never started its jobs).
        exit_code: the run's exit code.
        finished_at: epoch seconds.
        last_success_at: epoch seconds of the last run that exited 0 (this one included), or None.

    Raises:
        OSError: the file cannot be written.
    """
    registry = CollectorRegistry()
    jobs = Gauge(
        "batch_export_jobs", "Jobs of the last run by outcome.", ["outcome"], registry=registry
    )
    for outcome in Outcome:
        jobs.labels(outcome=str(outcome)).set(result.count(outcome) if result else 0)
    Gauge(
        "batch_export_downloaded_bytes",
        "Bytes of packages downloaded and verified by the last run.",
        registry=registry,
    ).set(
        sum(job.bytes or 0 for job in result.jobs if job.outcome is Outcome.DOWNLOADED)
        if result
        else 0
    )
    requests = Gauge(
        "batch_export_api_requests",
        "API requests sent by the last run, by HTTP status (0 = network error).",
        ["status"],
        registry=registry,
    )
    for status, count in sorted((result.api_by_status if result else {}).items()):
        requests.labels(status=str(status)).set(count)
    Gauge(
        "batch_export_throttled_requests",
        "API requests of the last run answered 429.",
        registry=registry,
    ).set(result.throttled if result else 0)
    Gauge(
        "batch_export_storage_requests",
        "Storage (signed URL) requests sent by the last run.",
        registry=registry,
    ).set(result.storage_requests if result else 0)
    Gauge("batch_export_run_duration_seconds", "Wall time of the last run.", registry=registry).set(
        result.wall_seconds if result else 0
    )
    Gauge("batch_export_last_exit_code", "Exit code of the last run.", registry=registry).set(
        exit_code
    )
    Gauge(
        "batch_export_last_run_timestamp_seconds",
        "When the last run finished (epoch seconds).",
        registry=registry,
    ).set(finished_at)
    Gauge(  # 0 before any success, so "time() - last success > 1 day" fires from the first night
        "batch_export_last_success_timestamp_seconds",
        "When the last run that exited 0 finished (epoch seconds; 0: none yet).",
        registry=registry,
    ).set(last_success_at if last_success_at is not None else 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(path), registry)
