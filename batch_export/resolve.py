"""Discovery at run time (SPEC §7): list every selector's AOIs, resolve their insights, merge.

The I/O shell around :mod:`batch_export.discovery` (the pure rules): :func:`discover` lists through
a :class:`~batch_export.listing.Fetch` (in a run, the API client: shared limiter, retries,
redaction, request counts), hands each AOI's listing to :func:`batch_export.discovery.resolve`,
puts the discovered exports beside the explicit entries with :func:`batch_export.discovery.merge`,
and returns both what a run adds (:class:`~batch_export.types.Discovered`: jobs with source
``discover[N]``, their preset failures ``no_listed_assets``/``path_clash``, the report's
``discovery`` entries) and, for ``batch-export discover``, every listed insight with its action.

A failed listing fails that selector's AOI (or, for paging, the rest of the selector's AOIs) alone:
its entry carries the error, and everything else goes ahead.
"""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass

from batch_export.api import PixxelClient, encode_segment
from batch_export.discovery import Action, Resolved, merge, resolve
from batch_export.listing import Fetch, ListingError, api_fetch, list_selectors
from batch_export.manifest import DiscoverSelector, ExportSpec, Manifest
from batch_export.types import Discovered, DiscoveryEntry, Problem, Settings

__all__ = ["NO_AOIS", "AoiView", "Resolution", "discover", "run_hook"]

log = logging.getLogger("batch_export")


@dataclass(frozen=True, slots=True)
class AoiView:
    """One selector's AOI as ``batch-export discover`` shows it.

    Attributes:
        selector: The selector's index in ``discover:``.
        aoi_id: The AOI, or ``None`` for the selector's AOI paging (then only ``error`` is set).
        error: Why its listing failed, or ``None``.
        insights: Every listed insight with its action, in listing order.
        warning: For the paging entry (``aoi_id`` ``None``): why it is worth a look although
            nothing failed (``no_aois``), or ``None``.
    """

    selector: int
    aoi_id: str | None
    error: ListingError | None = None
    insights: tuple[Resolved, ...] = ()
    warning: Problem | None = None


@dataclass(frozen=True, slots=True)
class Resolution:
    """What discovery found.

    Attributes:
        views: Per selector and AOI, every listed insight and its action (``export`` for a job
            of this run, whatever the state store says; ``batch-export discover`` tells ``done``).
        discovered: What a run adds to the explicit jobs.
    """

    views: tuple[AoiView, ...]
    discovered: Discovered


def _problem(error: ListingError | None) -> Problem | None:
    return None if error is None else Problem(error.code, error.message, error.http_status)


async def discover(
    fetch: Fetch,
    manifest: Manifest,
    *,
    explicit: Sequence[ExportSpec],
    now: _dt.datetime,
    ready_statuses: Collection[str],
    keep: Callable[[ExportSpec], bool] | None = None,
    concurrency: int = 8,
) -> Resolution:
    """Resolve the manifest's ``discover:`` selectors into jobs.

    Args:
        fetch: Sends one listing GET (see :mod:`batch_export.listing`).
        manifest: The manifest (its ``discover`` selectors and ``output.path``).
        explicit: The explicit jobs of this run (they win path clashes).
        now: The current time, UTC, for ages such as ``created_after: 30d``.
        ready_statuses: The ready status words, lower-cased (a selector's default ``status``).
        keep: Which discovered jobs this run takes (``--shard``); default all.
        concurrency: Most insight listings in flight at once.

    Returns:
        The :class:`Resolution`; a failed listing is in its entries, never raised.
    """
    selectors = manifest.discover
    listings = await list_selectors(
        fetch, selectors, encode=encode_segment, concurrency=concurrency
    )
    views: list[AoiView] = []
    entries: list[DiscoveryEntry] = []
    resolved: list[Resolved] = []
    for selector, listing in zip(selectors, listings, strict=True):
        for aoi in listing.aois:
            results: tuple[Resolved, ...] = ()
            if aoi.error is None:
                results = resolve(
                    selector,
                    aoi.aoi_id,
                    aoi.insights,
                    now=now,
                    path_template=manifest.output.path,
                    ready_statuses=ready_statuses,
                )
            resolved.extend(results)
            views.append(AoiView(selector.index, aoi.aoi_id, aoi.error, results))
            entries.append(
                DiscoveryEntry(
                    selector=selector.index,
                    aoi_id=aoi.aoi_id,
                    listed=len(aoi.insights),
                    selected=sum(1 for r in results if r.action is Action.EXPORT),
                    error=_problem(aoi.error),
                )
            )
        if listing.error is not None:
            views.append(AoiView(selector.index, None, listing.error))
            entries.append(DiscoveryEntry(selector.index, None, error=_problem(listing.error)))
        elif not listing.aois and selector.aois is None:  # paged, answered, and nothing there
            warning = _no_aois(selector)
            views.append(AoiView(selector.index, None, warning=warning))
            entries.append(DiscoveryEntry(selector.index, None, warning=warning))
    merged = merge(explicit, resolved)
    jobs = [job for job in merged.jobs if keep is None or keep(job.spec)]
    failures = {
        index: Problem(job.failure.code, job.failure.message)
        for index, job in enumerate(jobs)
        if job.failure is not None
    }
    discovered = Discovered(
        specs=tuple(job.spec for job in jobs),
        sources=tuple(job.spec.source for job in jobs),
        failures=failures,
        entries=tuple(entries),
    )
    return Resolution(tuple(views), discovered)


#: Warning code of a paged selector whose listing holds no AOI (a typo in ``projects:``?).
NO_AOIS = "no_aois"


def _no_aois(selector: DiscoverSelector) -> Problem:
    if selector.projects is not None:
        named = ", ".join(selector.projects)
        return Problem(NO_AOIS, f"project(s) {named} list no AOI this key can see (a typo?)")
    return Problem(NO_AOIS, "the AOI listing holds no AOI this key can see")


def run_hook(
    manifest: Manifest,
    settings: Settings,
    *,
    explicit: Sequence[ExportSpec],
    keep: Callable[[ExportSpec], bool] | None = None,
    on_jobs: Callable[[int], None] | None = None,
) -> Callable[[PixxelClient], Awaitable[Discovered]]:
    """The runner's ``discover`` hook for ``manifest``: list with the run's client, then resolve.

    Listing requests wait for a turn at most ``poll_timeout`` seconds (429 pauses included). Each
    failed listing is logged as a warning (cron mails it under ``-q``). ``on_jobs(n)`` is told how
    many jobs discovery adds (progress displays count them).
    """

    async def hook(client: PixxelClient) -> Discovered:
        fetch = api_fetch(client, deadline=client.clock.monotonic() + settings.poll_timeout)
        resolution = await discover(
            fetch,
            manifest,
            explicit=explicit,
            now=_dt.datetime.now(_dt.UTC),
            ready_statuses=settings.vocabulary.ready,
            keep=keep,
            concurrency=min(settings.in_flight, 16),
        )
        for entry in resolution.discovered.entries:
            where = f"AOI {entry.aoi_id}" if entry.aoi_id is not None else "AOI listing"
            if entry.warning is not None:
                log.warning(
                    "discover[%d] %s: %s",
                    entry.selector,
                    where,
                    entry.warning.message,
                    extra={"event": "discover_warning", "error_code": entry.warning.code},
                )
            elif entry.error is not None:
                log.warning(
                    "discover[%d] %s: listing failed: %s: %s",
                    entry.selector,
                    where,
                    entry.error.code,
                    entry.error.message,
                    extra={"event": "discover_failed", "error_code": entry.error.code},
                )
            else:  # one line per AOI: -v only (hundreds of AOIs are listed every night)
                log.debug(
                    "discover[%d] %s: %d listed, %d selected",
                    entry.selector,
                    where,
                    entry.listed,
                    entry.selected,
                    extra={"event": "discover_listed"},
                )
        found = resolution.discovered
        log.info(
            "discovered %d job(s) from %d selector(s) over %d AOI listing(s)",
            len(found.specs),
            len(manifest.discover),
            len(found.entries),
            extra={"event": "discovered"},
        )
        if on_jobs is not None:
            on_jobs(len(found.specs))
        return found

    return hook
