"""``batch-export status``: what the state store says about the jobs and the last runs."""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import anyio
from rich.console import Console
from rich.table import Table

from batch_export.clock import utc_timestamp
from batch_export.errors import UsageError
from batch_export.lifecycle import job_key
from batch_export.manifest import DiscoverSelector, ExportSpec
from batch_export.redact import escape_controls, redact_patterns
from batch_export.store import RunInfo, SqliteStore
from batch_export.types import STATE_FILE, JobRecord, JobState

__all__ = ["STALE", "read_status", "render_status"]


#: The state shown for a stored job whose manifest entry is gone or was edited (SPEC §9).
STALE = "stale"

#: The states ``--failed`` lists.
_FAILURES = frozenset({"failed", "abandoned"})


def read_status(
    state_dir: Path,
    *,
    specs: Sequence[ExportSpec] | None = None,
    selectors: Sequence[DiscoverSelector] = (),
    failed_only: bool = False,
    runs: int = 5,
) -> dict[str, Any]:
    """Return the status document: counts by state, the job records, the last ``runs`` runs.

    Args:
        state_dir: the state dir (as ``run`` resolves it).
        specs: the manifest's exports, when a manifest was given: only their jobs count (a job of
            the manifest that no run has touched yet is ``queued``); every other stored job is
            listed with state ``stale`` (its entry is gone or was edited: a new entry is a new
            job) and counted under ``counts.stale`` only, not in ``total``. ``None``: every stored
            job counts.
        selectors: the manifest's ``discover:`` selectors: a stored job of an AOI they cover is
            the manifest's (what they resolve to is known only at run time, from the API).
        failed_only: list only the jobs that failed (``failed``, ``abandoned``).
        runs: how many of the last runs to list.

    Shape: ``{"state_dir", "counts": {<state>: n, ..., "total": n, "stale": n}, "jobs": [...],
    "runs": [...]}``; each job is a :class:`JobRecord` as a dict, ``state`` a string.

    Raises:
        UsageError: there is no state store in ``state_dir`` and no manifest was given (with a
            manifest, no store yet means no run yet: every job of the manifest is ``queued``).
    """
    exists = (state_dir / STATE_FILE).is_file()
    if not exists and specs is None:
        raise UsageError(
            f"no state store in {state_dir} (has a run used this manifest / --out / --state-dir?)"
        )

    async def load() -> tuple[list[JobRecord], list[RunInfo]]:
        store = await SqliteStore.open(state_dir)
        try:
            return await store.all_records(), await store.last_runs(runs)
        finally:
            await store.close()

    records, last_runs = anyio.run(load) if exists else ([], [])
    jobs, stale = _split(records, specs, selectors)
    counts = Counter(str(record.state) for record in jobs)
    docs = [_job(record) for record in jobs] + [_job(record, stale=True) for record in stale]
    if failed_only:
        docs = [doc for doc in docs if doc["state"] in _FAILURES]
    return {
        "state_dir": str(state_dir),
        "counts": {str(state): counts.get(str(state), 0) for state in JobState}
        | {"total": len(jobs), STALE: len(stale)},
        "jobs": docs,
        "runs": [_run(run) for run in last_runs],
    }


def _split(
    records: list[JobRecord],
    specs: Sequence[ExportSpec] | None,
    selectors: Sequence[DiscoverSelector],
) -> tuple[list[JobRecord], list[JobRecord]]:
    """Return ``(the manifest's jobs, stale jobs)``; the explicit entries first, in manifest order."""
    if specs is None:
        return records, []
    by_key = {record.key: record for record in records}
    mine: dict[str, JobRecord] = {}
    for spec in specs:
        key = job_key(spec)
        mine[key] = by_key.get(key) or JobRecord(
            key=key,
            aoi_id=spec.aoi_id,
            insight_id=spec.insight_id,
            name=spec.name,
            relpath=spec.relpath,
        )
    every_aoi = any(selector.aois is None for selector in selectors)  # aois: all, or projects
    listed = {aoi for selector in selectors for aoi in selector.aois or ()}
    jobs, stale = list(mine.values()), list[JobRecord]()
    for record in records:
        if record.key in mine:
            continue
        discovered = every_aoi or record.aoi_id in listed
        (jobs if discovered else stale).append(record)
    return jobs, stale


def _run(run: RunInfo) -> dict[str, Any]:
    doc: dict[str, Any] = dict(run)
    for field in ("started_at", "finished_at"):  # ISO 8601 UTC, as in the run reports
        if doc.get(field) is not None:
            doc[field] = utc_timestamp(doc[field])
    return doc


def _job(record: JobRecord, *, stale: bool = False) -> dict[str, Any]:
    doc = asdict(record)
    if record.error_message:  # server text: never a signed-URL query or credentials, even from
        doc["error_message"] = redact_patterns(record.error_message)  # an older version's store
    doc["state"] = STALE if stale else str(record.state)
    if stale:
        doc["last_state"] = str(record.state)  # what the store last recorded
    return doc


def render_status(doc: dict[str, Any], *, as_json: bool, failed_only: bool = False) -> None:
    """Print the status document as JSON (for scripts) or as tables (for people) on stdout.

    ``failed_only``: print only the failures (the document already holds only those jobs).
    """
    if as_json:
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    console = Console(file=sys.stdout, width=None if sys.stdout.isatty() else 160)
    console.print(f"state store: {doc['state_dir']}", markup=False, highlight=False)
    if not failed_only:
        _print_counts(console, doc["counts"])
    failures = [job for job in doc["jobs"] if job["state"] in _FAILURES]
    for state, title in (
        ("failed", "failed jobs (tried again by the next run)"),
        (
            "abandoned",
            "abandoned jobs (not tried again until the entry changes or --retry-abandoned)",
        ),
    ):
        _print_failures(console, title, [job for job in failures if job["state"] == state])
    if failed_only:
        if not failures:
            console.print("no failed jobs", highlight=False)
        return
    if doc["counts"].get(STALE):
        console.print(
            f"{doc['counts'][STALE]} stale job(s) in the store: their manifest entry is gone or was "
            "edited (an edited entry is a new job)",
            markup=False,
            highlight=False,
        )
    if doc["runs"]:
        runs = Table(title="last runs", title_justify="left")
        for column in ("run_id", "started", "finished", "exit", "counts"):
            runs.add_column(column, overflow="fold")
        for run in doc["runs"]:
            finished = run.get("finished_at")
            runs.add_row(
                run["run_id"],
                run["started_at"],
                finished or "(running or killed)",
                "" if run.get("exit_code") is None else str(run["exit_code"]),
                ", ".join(f"{v} {k}" for k, v in (run.get("counts") or {}).items() if v),
            )
        console.print(runs)


def _print_counts(console: Console, counts: dict[str, int]) -> None:
    states = Table(title="jobs by state", title_justify="left")
    states.add_column("state")
    states.add_column("jobs", justify="right")
    for state, count in counts.items():
        if count or state in ("done", "failed", "total"):
            states.add_row(state, str(count))
    console.print(states)


def _print_failures(console: Console, title: str, jobs: list[dict[str, Any]]) -> None:
    if not jobs:
        return
    table = Table(title=title, title_justify="left")
    for column in ("aoi_id", "insight_id", "name", "code", "http", "message"):
        table.add_column(column, overflow="fold")
    for job in jobs:
        status = job["error_http_status"]
        cells = (
            job["aoi_id"],
            job["insight_id"],
            job["name"],
            job["error_code"] or "",
            str(status) if status is not None else "",
            job["error_message"] or "",
        )
        table.add_row(*(escape_controls(cell) for cell in cells))
    console.print(table)
