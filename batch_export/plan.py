"""The plan of a run (``validate``, ``--dry-run``): one line per job, then totals and a time estimate."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from batch_export.lifecycle import job_key
from batch_export.manifest import DiscoverSelector, ExportSpec, Manifest
from batch_export.redact import escape_controls
from batch_export.types import DEFAULT_POLL_INTERVAL, DEFAULT_RATE, Settings

__all__ = ["listing_floor", "plan_lines"]


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
    poll = (
        settings.poll_interval
        if settings
        else manifest.limits.poll_interval or DEFAULT_POLL_INTERVAL
    )
    pages, insight_lists = listing_floor(manifest.discover)
    listings = pages + insight_lists
    fewest, polled = listings + jobs, listings + 2 * jobs
    shown = f" ({listings} of them listings)" if listings else ""
    lines.append(
        f"{jobs} job(s); at least {fewest} API request(s){shown}, {polled} when each first answer "
        f"is pending; at {rate:g} requests/s that takes at least {_human(fewest / rate)}, "
        f"{_human(max(polled / rate, poll if jobs else 0.0))} with one poll each "
        f"({_human(poll)} apart); lower bounds: more polls, retries and the downloads add to them"
    )
    if manifest.discover:
        lines.append(
            f"{len(manifest.discover)} discover: selector(s), resolved from the API's listings at "
            f"run time: at least {pages} AOI page(s) and {insight_lists} insight listing(s) "
            "(counted above); their jobs are known only then and are not counted "
            "(validate sends nothing)"
        )
    return lines


def listing_floor(selectors: Sequence[DiscoverSelector]) -> tuple[int, int]:
    """Return the fewest ``(AOI pages, insight listings)`` the selectors cost (requests).

    One page per distinct paged query (``aois: all``, or a ``projects:`` list), however many AOIs
    it lists; one insight listing per distinct AOI named in ``aois: [ids]`` (the AOIs a page lists
    add theirs at run time).
    """
    paged = {
        "*" if selector.all_aois else tuple(sorted(selector.projects or ()))
        for selector in selectors
        if selector.aois is None
    }
    named = {aoi for selector in selectors for aoi in selector.aois or ()}
    return len(paged), len(named)
