"""The plan of a run (``validate``, ``--dry-run``): one line per job, then totals and a time estimate."""

from __future__ import annotations

from pathlib import Path

from batch_export.lifecycle import job_key
from batch_export.manifest import ExportSpec, Manifest
from batch_export.redact import escape_controls
from batch_export.types import DEFAULT_RATE, Settings

__all__ = ["plan_lines"]


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
        dest: object = settings.out_dir / spec.relpath if settings else Path(spec.relpath)
        if settings is not None and settings.out_url is not None:  # staged, then uploaded here
            dest = f"{settings.out_url}/{spec.relpath}"
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
