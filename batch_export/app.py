"""One run, from a validated manifest and options to its recorded outcome: lock, store, jobs, report.

Both faces of the tool call :func:`run_export`: the Python API (:mod:`batch_export.exporter`) and the
command line (:mod:`batch_export.cli`). Nothing here is process-wide: no signal handler, no
``sys.exit``, no logging set-up (log lines go to the ``batch_export`` logger only). Stops come from
the :class:`~batch_export.stop.StopController` the caller hands in.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from batch_export.api import PixxelClient
from batch_export.config import (
    RunOptions,
    check_writable,
    key_files,
    output_file_clash,
    package_file_clash,
    package_file_clashes,
    resolve_api_key,
    resolve_settings,
    select_shard,
    state_dir_links,
)
from batch_export.discovery import PATH_CLASH
from batch_export.errors import BatchExportError, UsageError
from batch_export.http import check_environment
from batch_export.lifecycle import job_key, shard_of
from batch_export.localfs import check_local_staging, check_local_state_dir
from batch_export.lock import StateLock
from batch_export.manifest import ExportSpec, Manifest
from batch_export.metrics import write_metrics
from batch_export.pace import Tally
from batch_export.plan import plan_lines
from batch_export.progress import FanOut, LogObserver, ProgressDisplay, ProgressLog
from batch_export.redact import Redactor
from batch_export.report import build_report, outcome_counts, write_report
from batch_export.resolve import run_hook
from batch_export.runner import Runner
from batch_export.stop import StopController
from batch_export.store import SqliteStore
from batch_export.types import (
    REPORTS_DIR,
    Discovered,
    ExportResult,
    Problem,
    RunObserver,
    RunResult,
    Settings,
)

if TYPE_CHECKING:
    from batch_export.objectstore import ObjectUploader

__all__ = ["run_export"]

log = logging.getLogger("batch_export")


async def run_export(
    manifest: Manifest,
    options: RunOptions,
    *,
    stop: StopController,
    redactor: Redactor,
    run_id: str,
) -> ExportResult:
    """Run ``manifest`` with ``options`` and return what happened (the report's facts).

    Args:
        manifest: the validated manifest.
        options: the run options (``None`` fields: manifest or default).
        stop: where signals, ``--max-runtime`` and cancellation ask the run to stop.
        redactor: scrubs the key (added here once known) from everything written.
        run_id: the run's id (report file name).

    Returns:
        The :class:`~batch_export.types.ExportResult`; for ``dry_run`` only its ``plan``.

    Raises:
        UsageError: bad settings, no usable API key, an unwritable ``--report``/``--metrics-file``,
            or a state store that cannot be used; nothing was requested (exit 2).
        LockHeldError: another run holds the state dir (exit 75).
    """
    for warning in manifest.warnings:
        log.warning("%s", warning, extra={"event": "manifest_warning"})
    settings = resolve_settings(manifest, options)
    if options.dry_run:
        check_own_files(manifest, settings)
        specs = select_shard(manifest.exports, options.shard)
        return ExportResult(
            exit_code=0, run_id=run_id, plan=tuple(plan_lines(manifest, settings, specs))
        )
    api_key = options.api_key or resolve_api_key(manifest)
    check_environment(
        redactor=redactor, api_url=settings.api_url
    )  # proxy/CA variables: a bad one is a usage error
    files = {
        option: path
        for option, path in (("--report", options.report), ("--metrics-file", options.metrics_file))
        if path is not None
    }
    clash = output_file_clash(
        files, specs=manifest.exports, settings=settings, manifest_path=manifest.path
    )
    if clash:
        raise UsageError(clash)
    check_own_files(manifest, settings)
    for option, path in files.items():
        check_writable(option, path)
    if settings.out_url is None and settings.out_dir.exists() and not settings.out_dir.is_dir():
        raise UsageError(
            f"the output dir {settings.out_dir} is a file, not a folder (--out or output.dir)"
        )
    check_local_state_dir(settings.state_dir)  # SQLite and the flock need a local disk
    if settings.out_url is not None:  # packages are verified there before the upload
        check_local_staging(settings.out_dir)
    staging = settings.state_dir / "staging"
    state_dir_links(settings.state_dir, also=(staging,) if settings.out_dir == staging else ())
    redactor.add(api_key)
    reports = settings.state_dir / REPORTS_DIR
    if reports.is_symlink() or (reports.exists() and not reports.is_dir()):
        raise UsageError(f"{reports} is not a folder of the state dir (a symlink?); remove it")
    async with _object_output(settings, redactor) as uploader:  # checks the store (SPEC §8)
        with StateLock(settings.state_dir):
            async with _open_store(settings) as store:
                return await _run_locked(
                    manifest, settings, options, api_key, redactor, run_id, store, stop, uploader
                )


def check_own_files(manifest: Manifest, settings: Settings) -> None:
    """Refuse a package (or its ``.part``) onto the manifest or the API key file.

    Raises:
        UsageError: one would be (one line naming the export and the file).
    """
    clash = package_file_clash(_own_files(manifest), specs=manifest.exports, settings=settings)
    if clash:
        raise UsageError(clash)


def _own_files(manifest: Manifest) -> list[tuple[str, Path]]:
    """The files the run reads that no package may overwrite: the manifest, the API key file."""
    return [("the manifest", manifest.path)] + [
        ("the API key file", path) for path in key_files(manifest)
    ]


@asynccontextmanager
async def _object_output(
    settings: Settings, redactor: Redactor
) -> AsyncIterator[ObjectUploader | None]:
    """The uploader of an object-store output, its store checked; None for a folder output."""
    if settings.out_url is None:
        yield None
        return
    from batch_export.objectstore import open_output  # botocore: loaded for s3:// outputs only

    async with open_output(
        settings.out_url,
        redactor=redactor,
        retries=settings.retries,
        backoff_base=settings.backoff_base,
        backoff_cap=settings.backoff_cap,
        read_timeout=settings.read_timeout,
        downloads=settings.downloads,
        check_existing=settings.check_existing,
    ) as uploader:
        log.info(
            "object store %s: bucket found, credentials accepted; staging in %s",
            settings.out_url,
            settings.out_dir,
            extra={"event": "store_checked"},
        )
        yield uploader


@asynccontextmanager
async def _open_store(settings: Settings) -> AsyncIterator[SqliteStore]:
    store = await SqliteStore.open(settings.state_dir)
    try:
        yield store
    finally:
        with anyio.CancelScope(shield=True):
            try:
                await store.close()
            except BatchExportError as exc:  # the outcome is recorded elsewhere already
                log.error("%s", exc.message, extra={"event": "run_error", "error_code": exc.code})


async def _run_locked(
    manifest: Manifest,
    settings: Settings,
    options: RunOptions,
    api_key: str,
    redactor: Redactor,
    run_id: str,
    store: SqliteStore,
    stop: StopController,
    uploader: ObjectUploader | None = None,
) -> ExportResult:
    started_at = time.time()
    specs = select_shard(manifest.exports, options.shard)
    try:
        await store.record_run_start(run_id, started_at, os.getpid())
    except BatchExportError as exc:  # unusable before anything was requested: exit 2
        raise UsageError(f"{exc.message}; nothing was requested") from None
    observers: list[RunObserver] = [LogObserver()]
    progress = options.progress if options.progress is not None else sys.stderr.isatty()
    # The progress line: stderr is not a terminal, and the log level is info (SPEC §9).
    unattended = not sys.stderr.isatty() and options.verbosity >= 0
    display: ProgressDisplay | None = None
    if progress and options.verbosity >= 0:
        display = ProgressDisplay(total=len(specs), limiter=lambda: runner.limiter.stats)
        observers.append(display)
    ticker = None
    tally: Tally | None = None
    if display is None and unattended and options.progress_interval > 0:
        tally = Tally(
            total=len(specs), clock=time.monotonic, request_rate=lambda: runner.limiter.stats.rate
        )
        observers.append(tally)
        ticker = ProgressLog(tally, interval=options.progress_interval, sleep=anyio.sleep)
    runner = Runner(
        settings,
        specs,
        api_key=api_key,
        store=store,
        observer=FanOut(observers),
        redactor=redactor,
        max_runtime=options.max_runtime,
        stop=stop,
        discover=_discover_hook(manifest, settings, specs, options.shard, [display, tally]),
        uploader=uploader,
    )
    log.info(
        "run %s: %d job(s) from %s into %s",
        run_id,
        len(specs),
        manifest.path,
        settings.out_url or settings.out_dir,
        extra={"event": "run_started"},
    )
    if display is not None:
        with display.live():
            result = await runner.run()
    else:
        async with anyio.create_task_group() as lines:
            if ticker is not None:
                lines.start_soon(ticker.run)
            result = await runner.run()
            lines.cancel_scope.cancel()
    # From here the outcome is fixed: a late signal changes nothing, so the code recorded below is
    # the code the process exits with.
    reason = stop.freeze()
    if reason != result.stopped_by:
        result = replace(result, stopped_by=reason)
    return await _record(result, settings, options, redactor, run_id, started_at, store)


async def _record(
    result: RunResult,
    settings: Settings,
    options: RunOptions,
    redactor: Redactor,
    run_id: str,
    started_at: float,
    store: SqliteStore,
) -> ExportResult:
    """Record the outcome: state store, run report, metrics, summary line."""
    exit_code = result.exit_code
    counts = outcome_counts(result)
    last_success: float | None = None
    with anyio.CancelScope(shield=True):
        try:
            await store.record_run_end(run_id, time.time(), exit_code, counts)
            runs = await store.last_runs(100)
        except BatchExportError as exc:  # the report and metrics still tell the outcome
            log.error(
                "cannot record the end of the run in the state store: %s",
                exc.message,
                extra={"event": "run_error", "error_code": exc.code},
            )
        else:
            last_success = next((run["finished_at"] for run in runs if run["exit_code"] == 0), None)
    finished_at = time.time()
    report = build_report(
        run_id=run_id,
        started_at=started_at,
        finished_at=finished_at,
        exit_code=exit_code,
        result=result,
    )
    report_path = settings.state_dir / REPORTS_DIR / f"{run_id}.json"
    # Each file on its own (checked up front; a disk can still fail, a link appear, at the end).
    written = _write_end_file(
        "the report",
        report_path,
        lambda: write_report(report, report_path, redactor=redactor, root=settings.state_dir),
    )
    if options.report is not None:
        path = options.report.absolute()
        _write_end_file("--report", path, lambda: write_report(report, path, redactor=redactor))
    if options.metrics_file is not None:
        metrics = options.metrics_file.absolute()
        _write_end_file(
            "--metrics-file",
            metrics,
            lambda: write_metrics(
                metrics,
                result=result,
                exit_code=exit_code,
                finished_at=finished_at,
                last_success_at=last_success,
            ),
        )
    _log_summary(result, exit_code, report_path if written else None)
    return ExportResult(
        exit_code=exit_code,
        run_id=run_id,
        counts=report["counts"],
        jobs=tuple(report["jobs"]),
        report=report,
        report_path=report_path,
        result=result,
    )


def _discover_hook(
    manifest: Manifest,
    settings: Settings,
    explicit: tuple[ExportSpec, ...],
    shard: tuple[int, int] | None,
    counters: list[ProgressDisplay | Tally | None],
) -> Callable[[PixxelClient], Awaitable[Discovered]] | None:
    """The runner's discovery step when the manifest has ``discover:`` selectors (SPEC §7).

    ``counters``: progress displays whose job total grows by the discovered jobs.
    """
    if not manifest.discover:
        return None
    keep = None
    if shard is not None:
        index, count = shard
        keep = lambda spec: shard_of(job_key(spec), count) == index  # noqa: E731

    def on_jobs(count: int) -> None:
        for counter in counters:
            if counter is not None:
                counter.add_jobs(count)

    listed = run_hook(manifest, settings, explicit=explicit, keep=keep, on_jobs=on_jobs)
    own = _own_files(manifest)

    async def hook(client: PixxelClient) -> Discovered:
        found = await listed(client)
        # A discovered name can land on the manifest too ({insight_name} beside it): path_clash.
        clashes = package_file_clashes(own, specs=found.specs, settings=settings)
        failures = {i: Problem(PATH_CLASH, m) for i, m in clashes.items()} | dict(found.failures)
        return replace(found, failures=failures) if clashes else found

    return hook


def _write_end_file(what: str, path: Path, write: Callable[[], None]) -> bool:
    """Run ``write``; on an ``OSError`` log one line naming ``what`` and ``path``; say if written."""
    try:
        write()
    except OSError as exc:
        reason = exc.strerror if isinstance(exc.strerror, str) else str(exc) or type(exc).__name__
        log.error("cannot write %s %s: %s", what, path, reason, extra={"event": "run_error"})
        return False
    return True


def _log_summary(result: RunResult, exit_code: int, report_path: Path | None) -> None:
    counts = outcome_counts(result)
    summary = (
        f"summary: {len(result.jobs)} job(s): {counts['downloaded']} downloaded, "
        f"{counts['skipped']} skipped, {counts['failed']} failed, "
        f"{counts['pending']} pending, {counts['abandoned']} abandoned in "
        f"{result.wall_seconds:.1f} s; "
        f"{result.api_requests} API request(s) ({result.throttled} throttled), "
        f"{result.storage_requests} storage request(s); exit {exit_code}; "
        + (f"report {report_path}" if report_path else "report not written (see the error above)")
    )
    extra = {
        "event": "run_summary",
        "counts": counts,
        "exit_code": exit_code,
        "api_requests": result.api_requests,
        "throttled": result.throttled,
        "seconds": round(result.wall_seconds, 3),
        "path": None if report_path is None else str(report_path),
    }
    log.log(logging.WARNING if exit_code else logging.INFO, "%s", summary, extra=extra)
