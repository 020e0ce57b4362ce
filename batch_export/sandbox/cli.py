"""``batch-export sandbox``: serve the simulated Pixxel API until Ctrl-C or SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path

import click

from batch_export.sandbox.config import DEMO_KEY, VOCABULARIES, SandboxConfig
from batch_export.sandbox.script import Fault, FaultScript
from batch_export.sandbox.server import Sandbox, access_logger, loopback_host

__all__ = ["sandbox_command"]

DEFAULT_PORT = 8765


async def _serve(
    config: SandboxConfig,
    host: str,
    port: int,
    storage_port: int,
    show_catalog: bool,
    script: FaultScript | None = None,
    script_path: Path | None = None,
) -> None:
    sandbox = Sandbox(config)
    if script is not None:
        sandbox.faults.add(script)
    await sandbox.start(host, port, storage_port)
    try:
        lines = [
            "batch-export sandbox: simulated Pixxel insights API",
            f"  API URL:     {sandbox.api_url}",
            f"  storage URL: {sandbox.storage_url}",
            *(f"  API key:     {key}" for key in config.keys),
        ]
        if script is not None:
            lines.append(
                f"  faults:      {len(script.rules)} rule(s) from {script_path} (seed {script.seed})"
            )
        if show_catalog:
            lines.append(f"  catalog (seed {config.seed}):")
            lines.extend(f"    {line}" for line in sandbox.catalog.describe().splitlines())
        lines.append("Serving until Ctrl-C (SIGINT) or SIGTERM.")
        click.echo("\n".join(lines))
        sys.stdout.flush()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, stop.set)
        await stop.wait()
    finally:
        await sandbox.close()
    click.echo("sandbox stopped")
    sys.stdout.flush()


@click.command(name="sandbox")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Loopback address to bind (127.0.0.0/8, ::1 or localhost).",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=DEFAULT_PORT,
    show_default=True,
    help="API port (0 picks a free one).",
)
@click.option(
    "--storage-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Storage (signed URL) port.  [default: API port + 1, or a free one with --port 0]",
)
@click.option(
    "--key",
    "keys",
    multiple=True,
    help=f"Accepted API key; repeat for several.  [default: {DEMO_KEY}]",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Catalog and content seed.")
@click.option(
    "--vocabulary",
    type=click.Choice(VOCABULARIES),
    default=VOCABULARIES[0],
    show_default=True,
    help="Status words the PUT answers with.",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    help="Per-key rate limit in requests/s (token bucket); 0 = unlimited.",
)
@click.option(
    "--burst",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Token bucket size in requests.",
)
@click.option(
    "--prepare-seconds",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Seconds after the first PUT before a package can be ready.",
)
@click.option(
    "--ready-after-puts",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="The Nth identical PUT (and later ones) reports the package ready.",
)
@click.option(
    "--asset-size",
    type=click.IntRange(min=1),
    default=64 * 1024,
    show_default=True,
    help="Bytes of content per asset in a package zip (up to GBs; packages are built on disk).",
)
@click.option(
    "--url-lifetime",
    type=click.FloatRange(min=0),
    default=3600.0,
    show_default=True,
    help="Signed URL lifetime in seconds (X-Amz-Expires).",
)
@click.option(
    "--aois",
    "aoi_count",
    type=click.IntRange(min=0),
    default=None,
    help="Catalog size: at least this many AOIs (listed by GET /v0/aois, 100 per page).  "
    "[default: the seeded 3 to 5]",
)
@click.option(
    "--new-insight-every",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds between new completed insights appearing in the listing (on the AOIs in "
    "turn), to rehearse nightly discover runs; also POST /_sandbox/insights adds one and "
    'PATCH /_sandbox/insights/ID {"status": "completed"} finishes one.  [default: never]',
)
@click.option(
    "--faults",
    "faults_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help=(
        "Fault script (JSON if it ends in .json, else YAML) to rehearse a run against a "
        "misbehaving API: {seed: N, rules: [{origin: api|storage, fault: NAME, ...}]}. A rule "
        "selects by aoi_id/insight_id and picks the nth (number or list), every k-th, or with "
        "a seeded probability, at most 'times' times. Faults: "
        + ", ".join(Fault)
        + ". Parameters: status, empty_body, retry_after, retry_after_form "
        "(seconds|date|garbage|none), after_bytes, stall_seconds, delta, lifetime, "
        "content_type, filename. See batch_export/sandbox/script.py."
    ),
)
@click.option(
    "--show-catalog/--no-show-catalog",
    default=True,
    show_default=True,
    help="Print the AOIs, insights and asset ids on start.",
)
@click.option(
    "--access-log/--no-access-log",
    default=True,
    show_default=True,
    help="Log each request on stderr (query strings redacted).",
)
def sandbox_command(
    host: str,
    port: int,
    storage_port: int | None,
    keys: tuple[str, ...],
    seed: int,
    vocabulary: str,
    rate: float,
    burst: int,
    prepare_seconds: float,
    ready_after_puts: int,
    asset_size: int,
    url_lifetime: float,
    aoi_count: int | None,
    new_insight_every: float | None,
    faults_file: Path | None,
    show_catalog: bool,
    access_log: bool,
) -> None:
    """Serve the simulated Pixxel insights API on loopback until Ctrl-C.

    Two origins, as in production: the API (PUT
    /v0/aoi/{aoi_id}/insights/{insight_id}/download, raw key in Authorization; GET /v0/aois and
    GET /v0/aoi/{aoi_id}/insights list what the key can see) and a storage host
    serving the packages at S3-style presigned URLs on another port. Point a manifest's api.url at
    the printed API URL and export PIXXEL_API_KEY with the printed key.
    """
    try:
        host = loopback_host(host)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--host'") from exc
    if storage_port is None:
        storage_port = port + 1 if 0 < port < 65535 else 0
    if storage_port and storage_port == port:
        raise click.UsageError("--storage-port must differ from --port")
    try:
        config = SandboxConfig(
            keys=keys or (DEMO_KEY,),
            seed=seed,
            vocabulary=vocabulary,
            ready_after_puts=ready_after_puts,
            prepare_seconds=prepare_seconds,
            rate=rate or None,
            burst=burst,
            asset_size=asset_size,
            url_lifetime=url_lifetime,
            aoi_count=aoi_count,
            new_insight_every=new_insight_every,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    script = None
    if faults_file is not None:
        try:
            script = FaultScript.load(faults_file)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="'--faults'") from exc
    if access_log:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
        access_logger.addHandler(handler)
        access_logger.setLevel(logging.INFO)
        access_logger.propagate = False
    try:
        asyncio.run(_serve(config, host, port, storage_port, show_catalog, script, faults_file))
    except OSError as exc:
        raise click.ClickException(f"cannot serve on {host}: {exc.strerror or exc}") from exc
