"""The Python API: :func:`export` and :func:`export_async` for pipelines (Airflow, Dagster, Prefect).

A call does what ``batch-export run`` does and returns the report's facts as an
:class:`~batch_export.types.ExportResult`. It is a good citizen inside someone else's process: it
installs no signal handler, never calls ``sys.exit``/``os._exit``, leaves the root, ``aiohttp`` and
``asyncio`` loggers alone (its lines go to the ``batch_export`` logger, redacted, and from there to
whatever handlers the application configured), and raises instead of exiting:

* :class:`~batch_export.errors.ManifestError` for a bad manifest (the CLI's exit 2, with every
  ``FILE:LINE:COL: PATH: message`` line in ``problems``);
* :class:`~batch_export.errors.UsageError` for a bad option value (``rate=-1``) or anything else the
  CLI rejects with exit 2 before sending a request;
* :class:`~batch_export.errors.LockHeldError` when another run holds the state dir (exit 75).

A run that fails jobs does not raise: look at ``result.exit_code`` (1) and ``result.jobs``.
Cancelling the task (or Ctrl-C during the blocking :func:`export`) checkpoints like SIGINT does --
no new work, in-flight work saved, ``.part`` files kept, the report written with exit code 130 --
then re-raises the cancellation.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
from anyio.from_thread import start_blocking_portal

from batch_export.app import run_export
from batch_export.config import RunOptions, parse_output_url, parse_shard
from batch_export.errors import UsageError
from batch_export.manifest import Manifest, load_manifest
from batch_export.redact import RedactingFilter, Redactor
from batch_export.report import new_run_id
from batch_export.stop import StopController
from batch_export.types import ExportResult
from batch_export.units import parse_duration

__all__ = ["export", "export_async"]

PathArg = str | os.PathLike[str]


async def export_async(
    manifest: PathArg | Manifest,
    *,
    api_url: str | None = None,
    out: PathArg | None = None,
    state_dir: PathArg | None = None,
    in_flight: int | None = None,
    downloads: int | None = None,
    connections: int | None = None,
    segment_min: int | None = None,
    rate: float | None = None,
    max_runtime: float | str | None = None,
    shard: str | tuple[int, int] | None = None,
    force: bool = False,
    dry_run: bool = False,
    report: PathArg | None = None,
    metrics_file: PathArg | None = None,
    allow_http: bool = False,
    api_key: str | None = None,
    progress: bool = False,
    progress_interval: float | str = 60.0,
    staging_dir: PathArg | None = None,
    check_existing: bool = False,
    retry_abandoned: bool = False,
) -> ExportResult:
    """Export every package ``manifest`` lists; return the run's facts (inside a running loop).

    Args:
        manifest: the manifest's path, or a :class:`~batch_export.manifest.Manifest` already loaded.
        api_url: API base URL [default: the manifest's ``api.url``, else ``https://api.pixxel.space``].
        out: output root, or an object store ``"s3://bucket/prefix"`` [default: the manifest's
            ``output.dir``, else ``exports/`` beside it].
        state_dir: state store, lock and reports [default: ``<out>/.batch-export``].
        in_flight: jobs being requested/polled at once [default 32].
        downloads: simultaneous downloads [default 4].
        connections: parallel range connections per download [default 8].
        segment_min: smallest package (bytes) fetched over several connections [default 32 MiB].
        rate: API requests per second, polls included [default 2].
        max_runtime: stop taking new work after this many seconds (or ``"90s"``, ``"1h30m"``);
            then ``exit_code`` is 3 if jobs are left.
        shard: ``"K/N"`` or ``(K, N)``: only the jobs whose key hashes to shard K of N.
        force: redo jobs already done.
        dry_run: send nothing; ``result.plan`` holds what ``--dry-run`` prints.
        report: also write the JSON run report here.
        metrics_file: write Prometheus text-format metrics here.
        allow_http: allow plain-http API and signed URLs on non-loopback hosts.
        api_key: the API key itself [default: from ``PIXXEL_API_KEY`` / the manifest's
            ``api.key_env`` / ``api.key_file`` / ``PIXXEL_API_KEY_FILE``, as the CLI does].
        progress: draw the terminal progress display on stderr.
        progress_interval: seconds (or ``"5m"``) between progress log lines when stderr is not a
            terminal; 0: none.
        staging_dir: with an ``s3://`` ``out``: the local folder where packages are verified
            before the upload [default: ``<state_dir>/staging``].
        check_existing: also confirm done objects still exist (HEAD: size and ``sha256``).
        retry_abandoned: request abandoned jobs again (they are not, by default).

    Returns:
        The :class:`~batch_export.types.ExportResult` (``exit_code``, ``counts``, ``jobs``, …).

    Raises:
        ManifestError: the manifest is invalid.
        UsageError: an option value or the settings are unusable; nothing was requested.
        LockHeldError: another run holds the state dir.
    """
    out_url = parse_output_url(os.fspath(out)) if out is not None else None
    options = RunOptions(
        api_url=api_url,
        out=None if out_url is not None else _path(out),
        out_url=str(out_url) if out_url is not None else None,
        staging_dir=_path(staging_dir),
        check_existing=check_existing,
        state_dir=_path(state_dir),
        in_flight=_count("in_flight", in_flight),
        downloads=_count("downloads", downloads),
        connections=_count("connections", connections),
        segment_min=_count("segment_min", segment_min),
        rate=_rate(rate),
        max_runtime=_duration(max_runtime, "max_runtime"),
        shard=_shard(shard),
        force=force,
        dry_run=dry_run,
        report=_path(report),
        metrics_file=_path(metrics_file),
        allow_http=allow_http,
        api_key=api_key,
        progress=progress,
        progress_interval=_duration(progress_interval, "progress_interval") or 0.0,
        retry_abandoned=retry_abandoned,
    )
    if isinstance(manifest, Manifest):
        loaded = manifest
    else:
        loaded = await anyio.to_thread.run_sync(load_manifest, Path(manifest))
    redactor = Redactor([api_key] if api_key else [])
    stop = StopController()
    run = functools.partial(
        run_export, loaded, options, stop=stop, redactor=redactor, run_id=new_run_id()
    )
    with _redacting(redactor):
        return await _checkpointed(run, stop)


def export(manifest: PathArg | Manifest, **options: object) -> ExportResult:
    """Blocking :func:`export_async` (same arguments), on an event loop of its own.

    The loop runs in a thread of its own, so this works from a worker thread (Airflow's
    ``PythonOperator``), from the main thread, and even from inside a running event loop (which it
    blocks; prefer ``await export_async(...)`` there). Ctrl-C while it waits checkpoints the run,
    then the ``KeyboardInterrupt`` goes on.
    """
    call = functools.partial(export_async, manifest, **options)  # type: ignore[arg-type]
    with start_blocking_portal(backend="asyncio") as portal:
        return portal.call(call)


async def _checkpointed(
    run: Callable[[], Awaitable[ExportResult]], stop: StopController
) -> ExportResult:
    """Await ``run()``, checkpointing on cancellation.

    If the caller is cancelled, the run is stopped like SIGINT, records its outcome, and then the
    cancellation is re-raised.
    """
    outcome: list[ExportResult] = []
    failure: list[BaseException] = []
    finished = anyio.Event()

    async def body() -> None:
        with anyio.CancelScope(shield=True):  # cancellation reaches the run through ``stop``
            try:
                outcome.append(await run())
            except BaseException as exc:  # re-raised below, outside the task group
                failure.append(exc)
            finally:
                finished.set()

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(body)
        try:
            await finished.wait()
        except anyio.get_cancelled_exc_class():
            stop.request("cancelled")
            with anyio.CancelScope(shield=True):
                await finished.wait()
            raise
    if failure:
        raise failure[0]
    return outcome[0]


@contextmanager
def _redacting(redactor: Redactor) -> Iterator[None]:
    """Redact every ``batch_export`` log line for the duration (a filter on that logger only)."""
    logger = logging.getLogger("batch_export")
    scrub = RedactingFilter(redactor)
    logger.addFilter(scrub)
    try:
        yield
    finally:
        logger.removeFilter(scrub)


def _path(value: PathArg | None) -> Path | None:
    return None if value is None else Path(value)


def _count(name: str, value: int | None) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise UsageError(f"{name} must be a whole number >= 1, not {value!r}")
    return value


def _rate(value: float | None) -> float | None:
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int | float) or not value > 0
    ):
        raise UsageError(f"rate must be a number of requests per second > 0, not {value!r}")
    return None if value is None else float(value)


def _duration(value: float | str | None, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise UsageError(f"{name}: {exc}") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise UsageError(f"{name} must be seconds >= 0 or a duration such as '90s', not {value!r}")
    return float(value)


def _shard(value: str | tuple[int, int] | None) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return parse_shard(value)
        except ValueError as exc:
            raise UsageError(f"shard: {exc}") from None
    if (
        isinstance(value, tuple)
        and len(value) == 2
        and all(isinstance(n, int) and not isinstance(n, bool) for n in value)
        and 0 <= value[0] < value[1]
    ):
        return value
    raise UsageError(f"shard must be 'K/N' or (K, N) with 0 <= K < N, not {value!r}")
