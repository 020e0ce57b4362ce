"""From a manifest and command-line options to a finished run: settings, key, lock, store, report.

The command line (:mod:`batch_export.cli`) only parses; everything it asks for happens here.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import anyio

from batch_export.api import PixxelClient
from batch_export.errors import BatchExportError, UsageError
from batch_export.http import check_environment
from batch_export.lifecycle import job_key, shard_of
from batch_export.lock import StateLock
from batch_export.logs import configure_logging
from batch_export.manifest import ExportSpec, Manifest
from batch_export.metrics import write_metrics
from batch_export.pace import Tally
from batch_export.progress import FanOut, LogObserver, ProgressDisplay, ProgressLog
from batch_export.redact import Redactor, escape_controls
from batch_export.report import build_report, new_run_id, write_report
from batch_export.resolve import run_hook
from batch_export.runner import Runner
from batch_export.signals import SIGNAL_NAMES, Interrupted, install_handlers
from batch_export.store import SqliteStore
from batch_export.types import (
    DEFAULT_API_URL,
    DEFAULT_KEY_ENV,
    DEFAULT_RATE,
    KEY_FILE_ENV,
    REPORTS_DIR,
    STATE_DIR_NAME,
    STATE_ENTRIES,
    Discovered,
    Outcome,
    RunObserver,
    RunResult,
    Settings,
    StatusVocabulary,
)
from batch_export.urls import url_refusal

__all__ = [
    "DEFAULT_API_URL",
    "STATE_ENTRIES",
    "RunOptions",
    "execute_run",
    "plan_lines",
    "resolve_api_key",
    "resolve_dirs",
    "resolve_settings",
]

log = logging.getLogger("batch_export")


@dataclass(frozen=True, slots=True)
class RunOptions:
    """Command-line options of ``run``; ``None`` means "not given" (manifest or default applies)."""

    api_url: str | None = None
    out: Path | None = None
    state_dir: Path | None = None
    in_flight: int | None = None
    downloads: int | None = None
    connections: int | None = None
    rate: float | None = None
    force: bool = False
    dry_run: bool = False
    report: Path | None = None
    progress: bool | None = None
    verbosity: int = 0
    allow_http: bool = False
    max_runtime: float | None = None  # seconds
    shard: tuple[int, int] | None = None  # (K, N): only jobs with int(key[:16], 16) % N == K
    log_format: str = "text"  # or "json"
    metrics_file: Path | None = None
    api_key: str | None = None  # given directly (demo); otherwise from the environment
    progress_interval: float = 60.0  # seconds between progress lines when stderr is no terminal


def resolve_settings(manifest: Manifest, options: RunOptions) -> Settings:
    """Merge command line > manifest > defaults into :class:`Settings`.

    Raises:
        UsageError: the API URL is not allowed (plain http to a non-loopback host without
            ``--allow-http``), or a number is out of range.
    """
    limits = manifest.limits
    api_url = options.api_url or manifest.api.url or DEFAULT_API_URL
    refusal = url_refusal(api_url, allow_http=options.allow_http, what="API URL")
    if refusal:
        raise UsageError(refusal)
    out_dir, state_dir = resolve_dirs(manifest, out=options.out, state_dir=options.state_dir)
    defaults = Settings(api_url="", out_dir=out_dir, state_dir=state_dir)

    def pick(cli: float | int | None, man: float | int | None, default: float | int) -> float | int:
        return cli if cli is not None else man if man is not None else default

    settings = Settings(
        api_url=api_url.rstrip("/"),
        out_dir=out_dir,
        state_dir=state_dir,
        in_flight=int(pick(options.in_flight, limits.in_flight, defaults.in_flight)),
        downloads=int(pick(options.downloads, limits.downloads, defaults.downloads)),
        connections=int(pick(options.connections, limits.connections, defaults.connections)),
        segment_min=int(pick(None, limits.segment_min, defaults.segment_min)),
        rate=float(pick(options.rate, limits.rate, defaults.rate)),
        poll_interval=float(pick(None, limits.poll_interval, defaults.poll_interval)),
        poll_max_interval=float(pick(None, limits.poll_max_interval, defaults.poll_max_interval)),
        poll_timeout=float(pick(None, limits.poll_timeout, defaults.poll_timeout)),
        retries=int(pick(None, limits.retries, defaults.retries)),
        read_timeout=float(pick(None, limits.read_timeout, defaults.read_timeout)),
        vocabulary=StatusVocabulary.from_lists(
            manifest.api.ready_statuses, manifest.api.failed_statuses
        ),
        allow_http=options.allow_http,
        force=options.force,
    )
    if settings.poll_max_interval < settings.poll_interval:
        settings = replace(settings, poll_max_interval=settings.poll_interval)
    if settings.in_flight < 1 or settings.downloads < 1 or settings.rate <= 0:
        raise UsageError("--in-flight and --downloads must be >= 1 and --rate > 0")
    if settings.connections < 1 or settings.segment_min < 1:
        raise UsageError("--connections and limits.segment_min must be >= 1")
    clash = state_dir_clash(
        manifest.exports, out_dir=settings.out_dir, state_dir=settings.state_dir
    )
    if clash:
        raise UsageError(clash)
    return settings


def resolve_dirs(
    manifest: Manifest, *, out: Path | None, state_dir: Path | None
) -> tuple[Path, Path]:
    """Return the run's ``(output dir, state dir)``, absolute (SPEC §2; ``status`` uses it too).

    ``out``: ``--out`` (relative to the working dir), else the manifest's ``output.dir`` (already
    resolved against the manifest's folder), else ``exports/`` beside the manifest. ``state_dir``:
    ``--state-dir``, else ``<out>/.batch-export``.
    """
    if out is not None:
        out_dir = out.absolute()
    elif manifest.output.dir is not None:
        out_dir = manifest.output.dir
    else:
        out_dir = manifest.path.absolute().parent / "exports"
    return out_dir, state_dir.absolute() if state_dir else out_dir / STATE_DIR_NAME


def state_dir_clash(specs: tuple[ExportSpec, ...], *, out_dir: Path, state_dir: Path) -> str | None:
    """Return why the state dir and some package path collide, or None (SPEC §3 collision check).

    A package (or its ``.part``) must not land on a state-dir entry, and the state dir must not lie
    on or under a package's path.
    """
    try:
        rel = PurePosixPath(state_dir.absolute().relative_to(out_dir.absolute()).as_posix())
    except ValueError:
        return None  # the state dir is outside the output dir
    # Compared as tuples of parts, one parse per path: 100,000 exports take 0.6 s, not 3 s.
    rel_parts = rel.parts
    depth = len(rel_parts) + 1  # every reserved entry is one name inside the state dir
    reserved = {(*rel_parts, entry) for entry in STATE_ENTRIES}
    for spec in specs:
        for path in (PurePosixPath(spec.relpath), PurePosixPath(spec.relpath + ".part")):
            parts = path.parts
            if parts[:depth] in reserved:  # a reserved entry, or under one
                return (
                    f"export {spec.aoi_id}/{spec.insight_id} ({spec.name}) would write "
                    f"{out_dir / path}, inside the state dir {state_dir}; choose another "
                    "--state-dir or output.path"
                )
            if parts == rel_parts[: len(parts)]:  # the state dir itself, or one of its parents
                return (
                    f"the state dir {state_dir} lies on the path of export {spec.aoi_id}/"
                    f"{spec.insight_id} ({spec.name}); choose another --state-dir"
                )
    return None


def resolve_api_key(manifest: Manifest, environ: dict[str, str] | None = None) -> str:
    """Return the API key from exactly one source (SPEC §2).

    Sources: the environment variable named by ``api.key_env`` (default ``PIXXEL_API_KEY``), the file
    named by ``api.key_file``, or the file named by ``PIXXEL_API_KEY_FILE`` (surrounding white space
    stripped). Never from the manifest text.

    Raises:
        UsageError: no source, more than one source, or an unreadable/empty key file.
    """
    env = os.environ if environ is None else environ
    key_env = manifest.api.key_env or DEFAULT_KEY_ENV
    sources: list[tuple[str, Callable[[], str]]] = []
    if env.get(key_env):
        sources.append((f"environment variable {key_env}", lambda: env[key_env]))
    if manifest.api.key_file is not None:
        path = manifest.api.key_file
        sources.append((f"key file {path} (api.key_file)", lambda: _read_key_file(path)))
    if env.get(KEY_FILE_ENV):
        env_path = Path(env[KEY_FILE_ENV])
        sources.append((f"key file {env_path} ({KEY_FILE_ENV})", lambda: _read_key_file(env_path)))
    if not sources:
        # Name the variable only if it looks like one: a key pasted into key_env must not echo.
        shown = (
            key_env if re.fullmatch(r"[A-Z][A-Z0-9_]{0,63}", key_env) else "named by api.key_env"
        )
        raise UsageError(
            f"no API key: set the environment variable {shown}, or name a key file in "
            f"api.key_file or {KEY_FILE_ENV}"
        )
    if len(sources) > 1:
        names = " and ".join(name for name, _ in sources)
        raise UsageError(f"the API key is set more than once ({names}); keep one")
    key = sources[0][1]().strip()
    if not key:
        raise UsageError(f"the API key from {sources[0][0]} is empty")
    if not re.fullmatch(r"[\x21-\x7e]+", key):
        # An HTTP header value: printable ASCII only (a line break would split the request).
        raise UsageError(
            f"the API key from {sources[0][0]} has characters other than printable ASCII"
        )
    return key


def _check_writable(option: str, path: Path) -> None:
    """Fail before any request if ``path`` cannot be written at the end of the run.

    Raises:
        UsageError: the folder cannot be created or written, or ``path`` is a folder.
    """
    folder = path.absolute().parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot create {folder}: {exc.strerror}") from None
    if path.is_dir():
        raise UsageError(f"{option} {path}: is a folder")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{option} {path}: {folder} is not writable")


def _counts(result: RunResult) -> dict[str, int]:
    return {
        "total": len(result.jobs),
        **{str(outcome): result.count(outcome) for outcome in Outcome},
    }


def _read_key_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise UsageError(f"cannot read the API key file {path}: {reason}") from None


def select_shard(
    specs: tuple[ExportSpec, ...], shard: tuple[int, int] | None
) -> tuple[ExportSpec, ...]:
    """Return the specs of shard ``K`` of ``N`` (all when ``shard`` is None), manifest order kept."""
    if shard is None:
        return specs
    index, count = shard
    return tuple(spec for spec in specs if shard_of(job_key(spec), count) == index)


def _human(seconds: float) -> str:
    """``5400`` -> ``"1h30m"``; ``42.5`` -> ``"42.5s"``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    parts = [
        f"{days}d" if days else "",
        f"{hours}h" if hours else "",
        f"{minutes}m" if minutes else "",
    ]
    if not days and not hours and secs:
        parts.append(f"{secs}s")
    return "".join(parts) or "0s"


def plan_lines(
    manifest: Manifest, settings: Settings | None, specs: tuple[ExportSpec, ...] | None = None
) -> list[str]:
    """Return the plan as text lines: one per job, then totals and the rate-limit estimate."""
    lines = []
    specs = manifest.exports if specs is None else specs
    for spec in specs:
        dest = settings.out_dir / spec.relpath if settings else Path(spec.relpath)
        lines.append(
            escape_controls(
                f"{job_key(spec)[:12]}  PUT /v0/aoi/{spec.aoi_id}/insights/{spec.insight_id}/download"
                f"  inputs={list(spec.inputs)} outputs={list(spec.outputs)}  -> {dest}"
            )
        )
    jobs = len(specs)
    rate = settings.rate if settings else manifest.limits.rate or DEFAULT_RATE
    lines.append(
        f"{jobs} job(s); at least {jobs} API request(s), {2 * jobs} when the first answer is "
        f"pending; at {rate:g} requests/s that takes at least {_human(jobs / rate)}, "
        f"{_human(2 * jobs / rate)} with one poll each"
    )
    if manifest.discover:
        lines.append(
            f"{len(manifest.discover)} discover: selector(s), resolved from the API's listings at "
            "run time (their jobs are not counted above; validate sends nothing)"
        )
    return lines


def execute_run(manifest: Manifest, options: RunOptions) -> int:
    """Run ``manifest`` and return the exit code (SPEC §2). Prints errors; raises nothing expected."""
    run_id = new_run_id()
    redactor = Redactor([options.api_key] if options.api_key else [])
    configure_logging(
        verbosity=options.verbosity, redactor=redactor, log_format=options.log_format, run_id=run_id
    )
    for warning in manifest.warnings:
        log.warning("%s", warning, extra={"event": "manifest_warning"})
    try:
        settings = resolve_settings(manifest, options)
        if options.dry_run:
            for line in plan_lines(
                manifest, settings, select_shard(manifest.exports, options.shard)
            ):
                print(line)
            return 0
        api_key = options.api_key or resolve_api_key(manifest)
        check_environment()  # proxy and CA variables: a bad one is a usage error
        for option, path in (
            ("--report", options.report),
            ("--metrics-file", options.metrics_file),
        ):
            if path is not None:
                _check_writable(option, path)
    except UsageError as exc:
        _say(options, f"batch-export: {redactor(exc.message)}")
        return 2
    redactor.add(api_key)
    try:
        with StateLock(settings.state_dir):
            return _run_locked(manifest, settings, options, api_key, redactor, run_id)
    except Interrupted as exc:  # outside the event loop's own watcher: nothing ran, or all saved
        _say(options, f"batch-export: interrupted by {exc}")
        return exc.exit_code
    except BatchExportError as exc:
        _say(options, f"batch-export: {redactor(exc.message)}")
        return 75 if exc.code == "locked" else 2


def _say(options: RunOptions, message: str) -> None:
    """An error before or around the run: a JSON line under --log-format json, else plain text."""
    if options.log_format == "json":
        log.error("%s", message, extra={"event": "run_error"})
    else:
        print(message, file=sys.stderr)


def _run_locked(
    manifest: Manifest,
    settings: Settings,
    options: RunOptions,
    api_key: str,
    redactor: Redactor,
    run_id: str,
) -> int:
    started_at = time.time()
    progress = options.progress if options.progress is not None else sys.stderr.isatty()
    # The progress line: stderr is not a terminal, and the log level is info (SPEC §9).
    unattended = not sys.stderr.isatty() and options.verbosity >= 0
    specs = select_shard(manifest.exports, options.shard)
    display: ProgressDisplay | None = None
    last_success: list[float | None] = [None]

    runner_box: list[Runner] = []
    early_stop: list[str] = []

    async def watch_signals() -> None:
        # From the first moment of the event loop: before the runner exists, remember the stop.
        with anyio.open_signal_receiver(*SIGNAL_NAMES) as signals:
            async for signum in signals:
                name = SIGNAL_NAMES[signal.Signals(signum)]
                if early_stop:
                    log.error("second %s: exiting now", name)
                    os._exit(128 + signum)
                early_stop.append(name)
                if runner_box:
                    runner_box[0].request_stop(name)

    async def main() -> RunResult:
        async with anyio.create_task_group() as watchers:
            watchers.start_soon(watch_signals)
            try:
                result = await run_jobs()
            finally:
                watchers.cancel_scope.cancel()
        return result

    async def run_jobs() -> RunResult:
        nonlocal display
        store = await SqliteStore.open(settings.state_dir)
        try:
            await store.record_run_start(run_id, started_at, os.getpid())
            observers: list[RunObserver] = [LogObserver()]
            if progress and options.verbosity >= 0:
                display = ProgressDisplay(total=len(specs), limiter=lambda: runner.limiter.stats)
                observers.append(display)
            ticker = None
            if display is None and unattended and options.progress_interval > 0:
                tally = Tally(
                    total=len(specs),
                    clock=time.monotonic,
                    request_rate=lambda: runner.limiter.stats.rate,
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
                discover=_discover_hook(manifest, settings, specs, options.shard),
            )
            runner_box.append(runner)
            if early_stop:
                runner.request_stop(early_stop[0])
            log.info(
                "run %s: %d job(s) from %s into %s",
                run_id,
                len(specs),
                manifest.path,
                settings.out_dir,
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
            with anyio.CancelScope(shield=True):
                await store.record_run_end(run_id, time.time(), result.exit_code, _counts(result))
                runs = await store.last_runs(100)
            last_success[0] = next(
                (run["finished_at"] for run in runs if run["exit_code"] == 0), None
            )
            return result
        finally:
            with anyio.CancelScope(shield=True):
                await store.close()

    late: list[int] = []
    try:
        result = anyio.run(main)
    finally:
        # asyncio put the default handlers back. While the report is written, a signal is only
        # remembered (an impatient second Ctrl-C must not lose the report); then it counts.
        for signum in SIGNAL_NAMES:
            signal.signal(signum, lambda number, frame: late.append(number))
    exit_code = result.exit_code
    finished_at = time.time()
    report = build_report(
        run_id=run_id,
        started_at=started_at,
        finished_at=finished_at,
        exit_code=exit_code,
        result=result,
    )
    report_path = settings.state_dir / REPORTS_DIR / f"{run_id}.json"
    try:
        write_report(report, report_path, redactor=redactor)
        if options.report is not None:
            write_report(report, options.report.absolute(), redactor=redactor)
        if options.metrics_file is not None:
            write_metrics(
                options.metrics_file.absolute(),
                result=result,
                exit_code=exit_code,
                finished_at=finished_at,
                last_success_at=last_success[0],
            )
    except OSError as exc:  # checked up front; the disk can still fail at the end
        log.error("cannot write the report or metrics: %s", exc.strerror or type(exc).__name__)
    _log_summary(result, exit_code, report_path)
    install_handlers()
    if late and exit_code not in (130, 143):
        return 128 + late[0]
    return exit_code


def _discover_hook(
    manifest: Manifest,
    settings: Settings,
    explicit: tuple[ExportSpec, ...],
    shard: tuple[int, int] | None,
) -> Callable[[PixxelClient], Awaitable[Discovered]] | None:
    """The runner's discovery step when the manifest has ``discover:`` selectors (SPEC §7)."""
    if not manifest.discover:
        return None
    keep = None
    if shard is not None:
        index, count = shard
        keep = lambda spec: shard_of(job_key(spec), count) == index  # noqa: E731
    return run_hook(manifest, settings, explicit=explicit, keep=keep)


def _log_summary(result: RunResult, exit_code: int, report_path: Path) -> None:
    counts = _counts(result)
    summary = (
        f"summary: {len(result.jobs)} job(s): {counts['downloaded']} downloaded, "
        f"{counts['skipped']} skipped, {counts['failed']} failed, "
        f"{counts['pending']} pending in {result.wall_seconds:.1f} s; "
        f"{result.api_requests} API request(s) ({result.throttled} throttled), "
        f"{result.storage_requests} storage request(s); exit {exit_code}; report {report_path}"
    )
    extra = {
        "event": "run_summary",
        "counts": counts,
        "exit_code": exit_code,
        "api_requests": result.api_requests,
        "throttled": result.throttled,
        "seconds": round(result.wall_seconds, 3),
        "path": str(report_path),
    }
    log.log(logging.WARNING if exit_code else logging.INFO, "%s", summary, extra=extra)
