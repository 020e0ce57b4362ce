"""The ``batch-export`` command line: a thin layer over the run of :mod:`batch_export.app`.

It parses options, sets up logging on stderr, owns the process-wide parts (signals through
:class:`~batch_export.signals.SignalRelay`, the exit code through ``sys.exit``, the allocator's
thresholds through :func:`~batch_export.allocator.keep_freed_memory`) and prints errors
as one line. Exit codes: :class:`batch_export.types.ExitCode` (SPEC §2).
"""

from __future__ import annotations

import logging
import sys
from importlib import resources
from pathlib import Path

import anyio
import click

from batch_export import __version__
from batch_export.allocator import keep_freed_memory
from batch_export.app import run_export
from batch_export.config import RunOptions, parse_output_url, parse_shard
from batch_export.errors import BatchExportError, LockHeldError, ManifestError
from batch_export.logs import configure_logging
from batch_export.manifest import (
    DiscoverSelector,
    ExportSpec,
    Manifest,
    limit_bounds,
    load_manifest,
)
from batch_export.plan import plan_lines
from batch_export.redact import Redactor
from batch_export.report import new_run_id
from batch_export.sandbox.cli import sandbox_command
from batch_export.signals import Interrupted, SignalRelay
from batch_export.stop import StopController
from batch_export.streams import guard_standard_streams
from batch_export.types import ExitCode
from batch_export.units import parse_duration

__all__ = ["main"]

_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
#: Every ``run`` option can also be set as BATCH_EXPORT_<OPTION> (``--in-flight`` ->
#: ``BATCH_EXPORT_IN_FLIGHT``, flags ``1``/``0``); the command line wins.
_RUN_CONTEXT = {**_CONTEXT, "auto_envvar_prefix": "BATCH_EXPORT"}


@click.group(context_settings=_CONTEXT)
@click.version_option(__version__, prog_name="batch-export")
def main() -> None:
    """Export Pixxel insight packages in bulk: manifest -> PUT -> poll -> verified files on disk.

    \b
    Exit codes: 0 every job done; 1 some job failed (see the report); 2 usage or
    manifest error, nothing requested; 3 stopped by --max-runtime with jobs left;
    75 another run holds the lock on the state dir; 130/143/129 interrupted by
    SIGINT/SIGTERM/SIGHUP (work checkpointed, the next run resumes).
    """
    guard_standard_streams()  # `batch-export validate m.yaml | head` ends quietly, exit code kept
    keep_freed_memory()  # process-wide, so here and not in the library (see allocator.py)


def _duration(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _shard(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        return parse_shard(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _load(path: Path) -> Manifest:
    try:
        return load_manifest(path)
    except ManifestError as exc:
        for line in exc.problems:
            click.echo(line, err=True)
        count = len(exc.problems)
        click.echo(f"batch-export: {count} problem(s) in {path}; nothing was requested", err=True)
        sys.exit(2)


@main.command(context_settings=_RUN_CONTEXT)
@click.argument("manifest", type=click.Path(path_type=Path))
@click.option(
    "--api-url",
    envvar="BATCH_EXPORT_API_URL",
    metavar="URL",
    help="API base URL [env BATCH_EXPORT_API_URL; default: manifest api.url, else https://api.pixxel.space].",
)
@click.option(
    "--out",
    metavar="DIR|s3://BUCKET/PREFIX",
    help="Output root (relative to the working dir) or object store [default: manifest output.dir, else exports/ beside the manifest].",
)
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="State store, lock and reports [default: <out>/.batch-export; for s3:// .batch-export/s3/<bucket>/<prefix> beside the manifest].",
)
@click.option(
    "--staging-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="With --out s3://...: local folder where packages are verified before the upload [default: <state-dir>/staging].",
)
@click.option(
    "--check-existing",
    is_flag=True,
    help="Also confirm done objects still exist (HEAD: size and sha256) before skipping them.",
)
@click.option(
    "--in-flight",
    type=click.IntRange(*limit_bounds("in_flight")),
    metavar="N",
    help="Jobs being requested/polled at once; raise to hundreds for big migrations [default 32].",
)
@click.option(
    "--downloads",
    type=click.IntRange(*limit_bounds("downloads")),
    metavar="N",
    help="Simultaneous downloads [default 4].",
)
@click.option(
    "--connections",
    type=click.IntRange(*limit_bounds("connections")),
    metavar="N",
    help="Parallel range connections per download (1: a single stream) [default 8].",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0.0, min_open=True),
    metavar="R",
    help="API requests per second, all jobs together, polls included [default 2].",
)
@click.option(
    "--max-runtime",
    callback=_duration,
    metavar="DURATION",
    help="Stop taking new work at this age (90s, 15m, 2h, 1h30m), checkpoint, exit 3.",
)
@click.option(
    "--shard",
    callback=_shard,
    metavar="K/N",
    help="Only the jobs whose key hashes to shard K of N (0-based); give each shard its own state dir.",
)
@click.option("--force", is_flag=True, help="Redo jobs already done.")
@click.option("--dry-run", is_flag=True, help="Print what would be requested; send nothing.")
@click.option(
    "--report",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Also write the JSON run report here.",
)
@click.option(
    "--metrics-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write Prometheus text-format metrics here at the end (node_exporter textfile collector).",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Human lines or JSON lines (one object per line) on stderr.",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress display on stderr [default: on only when stderr is a terminal].",
)
@click.option(
    "-q",
    "--quiet",
    is_flag=True,
    help="Warnings only; the summary only when the exit code is not 0.",
)
@click.option("-v", "--verbose", is_flag=True, help="More detail (every state change).")
@click.option(
    "--progress-interval",
    callback=_duration,
    default="60s",
    show_default=True,
    metavar="DURATION",
    help="Seconds between progress lines when stderr is not a terminal (0: none).",
)
@click.option(
    "--allow-http",
    is_flag=True,
    help="Allow plain-http API and signed URLs on non-loopback hosts (loopback is always allowed).",
)
@click.option(
    "--retry-abandoned",
    is_flag=True,
    help="Request abandoned jobs again (they failed with one permanent error in give_up_after runs).",
)
def run(
    manifest: Path,
    api_url: str | None,
    out: str | None,
    state_dir: Path | None,
    staging_dir: Path | None,
    check_existing: bool,
    in_flight: int | None,
    downloads: int | None,
    connections: int | None,
    rate: float | None,
    max_runtime: float | None,
    shard: tuple[int, int] | None,
    force: bool,
    dry_run: bool,
    report: Path | None,
    metrics_file: Path | None,
    log_format: str,
    progress: bool | None,
    quiet: bool,
    verbose: bool,
    progress_interval: float,
    allow_http: bool,
    retry_abandoned: bool,
) -> None:
    """Export every package the MANIFEST lists.

    The API key comes from the environment variable named by the manifest's api.key_env (default
    PIXXEL_API_KEY), or from a file named by api.key_file or PIXXEL_API_KEY_FILE.
    """
    relay = SignalRelay()
    relay.install()  # from here on SIGINT/SIGTERM/SIGHUP end in exit 130/143/129, never a traceback
    if quiet and verbose:
        raise click.UsageError("--quiet and --verbose exclude each other")
    try:
        loaded = _load(manifest)
    except Interrupted as exc:
        sys.exit(exc.exit_code)
    out_dir, out_url = _out(out)
    options = RunOptions(
        api_url=api_url,
        out=out_dir,
        out_url=out_url,
        staging_dir=staging_dir,
        check_existing=check_existing,
        state_dir=state_dir,
        in_flight=in_flight,
        downloads=downloads,
        connections=connections,
        rate=rate,
        max_runtime=max_runtime,
        shard=shard,
        force=force,
        dry_run=dry_run,
        report=report,
        metrics_file=metrics_file,
        log_format=log_format,
        progress=progress,
        verbosity=-1 if quiet else 1 if verbose else 0,
        allow_http=allow_http,
        retry_abandoned=retry_abandoned,
        progress_interval=progress_interval,
    )
    sys.exit(_execute(loaded, options, relay))


@main.command(context_settings=_CONTEXT)
@click.argument("manifest", type=click.Path(path_type=Path))
def validate(manifest: Path) -> None:
    """Check the MANIFEST and print the plan; requests nothing. Exit 0 if valid, 2 if not."""
    from batch_export.app import check_own_files
    from batch_export.config import resolve_settings

    loaded = _load(manifest)
    for warning in loaded.warnings:
        click.echo(f"warning: {warning}", err=True)
    try:  # with the manifest's own settings, as a run without options resolves them
        check_own_files(loaded, resolve_settings(loaded, RunOptions()))
    except BatchExportError as exc:
        click.echo(f"batch-export: {exc.message}", err=True)
        sys.exit(2)
    for line in plan_lines(loaded, None):
        click.echo(line)


@main.command(context_settings=_CONTEXT)
@click.argument("manifest", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option(
    "--emit-manifest",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Also write the resolved jobs as a plain exports: manifest (review, then run it).",
)
@click.option(
    "--api-url",
    envvar="BATCH_EXPORT_API_URL",
    metavar="URL",
    help="API base URL [default: manifest api.url, else https://api.pixxel.space].",
)
@click.option(
    "--out",
    metavar="DIR|s3://BUCKET/PREFIX",
    help="The output root run uses (to tell done jobs), as given to run [default: as run "
    "resolves it].",
)
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="The state dir run uses (to tell done jobs).",
)
@click.option("--allow-http", is_flag=True, help="Allow plain http to non-loopback hosts.")
def discover(
    manifest: Path,
    as_json: bool,
    emit_manifest: Path | None,
    api_url: str | None,
    out: str | None,
    state_dir: Path | None,
    allow_http: bool,
) -> None:
    """List what the MANIFEST's discover: selectors find and what a run would do with each insight.

    Sends only listing requests (no PUT, no download): per selector and AOI, every listed insight
    with its action (export, done, not_ready, deleted, filtered_out; fail: the run fails it before
    any request, e.g. path_clash; abandoned). Exit 0, or 1 when a listing failed, 2 on a usage or
    manifest error.
    """
    from batch_export.discover_command import DiscoverOptions, execute_discover

    loaded = _load(manifest)
    out_dir, out_url = _out(out)
    options = DiscoverOptions(
        api_url=api_url,
        out=out_dir,
        out_url=out_url,
        state_dir=state_dir,
        as_json=as_json,
        emit_manifest=emit_manifest,
        allow_http=allow_http,
    )
    sys.exit(execute_discover(loaded, options))


@main.command(context_settings=_CONTEXT)
@click.option(
    "--out",
    default="demo-exports",
    show_default=True,
    metavar="DIR|s3://BUCKET/PREFIX",
    help="Where the demo packages go (s3://: its state goes to demo-s3-state).",
)
@click.option("--progress/--no-progress", default=None, help="Progress display [default: auto].")
def demo(out: str, progress: bool | None) -> None:
    """Start the sandbox in-process and run the bundled manifests/demo.yaml against it."""
    from anyio.from_thread import start_blocking_portal

    from batch_export.sandbox import DEMO_KEY, Sandbox, SandboxConfig

    source = resources.files("batch_export") / "manifests" / "demo.yaml"
    with resources.as_file(source) as manifest_path:
        loaded = _load(manifest_path)
    config = SandboxConfig(prepare_seconds=1.0, asset_size=512 * 1024)
    logging.getLogger("batch_export.sandbox").setLevel(
        logging.WARNING
    )  # its access log is noise here
    relay = SignalRelay()
    relay.install()
    with start_blocking_portal(backend="asyncio") as portal:
        sandbox = Sandbox(config)
        portal.call(sandbox.start)
        click.echo(f"sandbox API at {sandbox.api_url}, storage at {sandbox.storage_url}", err=True)
        out_dir, out_url = _out(out)
        # The bundled manifest lies in the installed package: keep an object store's state here.
        state_dir = Path("demo-s3-state") if out_url else None
        try:
            code = _execute(
                loaded,
                RunOptions(
                    api_url=sandbox.api_url,
                    out=out_dir,
                    out_url=out_url,
                    state_dir=state_dir,
                    api_key=DEMO_KEY,
                    progress=progress,
                ),
                relay,
            )
        finally:
            portal.call(sandbox.close)
    if code in (ExitCode.USAGE, ExitCode.LOCKED):  # nothing ran: there are no packages to show
        pass
    elif out_dir is not None:
        where, state = out_dir.absolute(), out_dir.absolute() / ".batch-export"
        click.echo(f"packages are in {where} (report under {state}/reports)")
    elif state_dir is not None:
        click.echo(f"packages are in {out} (state and report under {state_dir.absolute()})")
    sys.exit(code)


@main.command(context_settings=_CONTEXT)
@click.argument("manifest", type=click.Path(path_type=Path), required=False)
@click.option(
    "--out",
    metavar="DIR|s3://BUCKET/PREFIX",
    help="The output root a run used, as given to run [default: from MANIFEST as run resolves it; "
    "without MANIFEST: exports].",
)
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="The state dir a run used (if it was given --state-dir).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--failed", "failed_only", is_flag=True, help="List only the failed jobs.")
def status(
    manifest: Path | None,
    out: str | None,
    state_dir: Path | None,
    as_json: bool,
    failed_only: bool,
) -> None:
    """Show job states, failures with reasons, and the last runs from the state store.

    With MANIFEST the state dir is found exactly as run finds it, and only that manifest's jobs
    count; stored jobs whose entry is gone or was edited show as "stale". Reads only; safe while a
    run is going on.
    """
    from batch_export.config import resolve_dirs
    from batch_export.status import read_status, render_status

    specs: tuple[ExportSpec, ...] | None = None
    selectors: tuple[DiscoverSelector, ...] = ()
    out_dir, out_url = _out(out)
    if manifest is not None:
        loaded = _load(manifest)
        specs, selectors = loaded.exports, loaded.discover
        try:
            directory = resolve_dirs(loaded, out=out_dir, state_dir=state_dir, out_url=out_url)[1]
        except BatchExportError as exc:
            click.echo(f"batch-export: {exc.message}", err=True)
            sys.exit(2)
    elif out is not None and state_dir is not None:
        raise click.UsageError("give --out or --state-dir, not both (or the MANIFEST)")
    elif out_url is not None:
        raise click.UsageError(
            "with --out s3://... give the MANIFEST too (its folder holds the state dir), "
            "or --state-dir"
        )
    else:
        directory = (
            state_dir if state_dir is not None else (out_dir or Path("exports")) / ".batch-export"
        )
    try:
        doc = read_status(directory, specs=specs, selectors=selectors, failed_only=failed_only)
    except BatchExportError as exc:
        click.echo(f"batch-export: {exc.message}", err=True)
        sys.exit(2)
    render_status(doc, as_json=as_json, failed_only=failed_only)


main.add_command(sandbox_command)


def _out(text: str | None) -> tuple[Path | None, str | None]:
    """``--out``: ``(folder, None)``, ``(None, "s3://…")`` or ``(None, None)`` when not given.

    Raises:
        click.UsageError: an object-store URL this build cannot write (``gs://``, ``az://``, …).
    """
    if text is None:
        return None, None
    try:
        url = parse_output_url(text)
    except BatchExportError as exc:
        raise click.UsageError(exc.message) from None
    return (None, str(url)) if url is not None else (Path(text), None)


def _execute(manifest: Manifest, options: RunOptions, relay: SignalRelay) -> int:
    """Run ``manifest`` on an event loop of its own; return the exit code (SPEC §2)."""
    run_id = new_run_id()
    redactor = Redactor([options.api_key] if options.api_key else [])
    configure_logging(
        verbosity=options.verbosity, redactor=redactor, log_format=options.log_format, run_id=run_id
    )
    stop = StopController()

    async def run() -> int:
        relay.relay_to(stop)
        try:
            result = await run_export(
                manifest, options, stop=stop, redactor=redactor, run_id=run_id
            )
        except LockHeldError as exc:
            _say(options, f"batch-export: {redactor(exc.message)}")
            return ExitCode.LOCKED
        except BatchExportError as exc:
            _say(options, f"batch-export: {redactor(exc.message)}")
            return ExitCode.USAGE
        finally:
            relay.finishing()
        for line in result.plan:
            click.echo(line)
        return result.exit_code

    try:
        return anyio.run(run)
    except Interrupted as exc:  # before the loop relayed signals: nothing ran
        relay.finishing()
        _say(options, f"batch-export: interrupted by {exc}")
        return exc.exit_code


def _say(options: RunOptions, message: str) -> None:
    """An error before or around the run: a JSON line under --log-format json, else plain text."""
    if options.log_format == "json":
        logging.getLogger("batch_export").error("%s", message, extra={"event": "run_error"})
    else:
        click.echo(message, err=True)
