"""``batch-export status``: what the state store says about the jobs and the last runs."""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import anyio
from rich.console import Console
from rich.table import Table

from batch_export.clock import utc_timestamp
from batch_export.errors import UsageError
from batch_export.redact import escape_controls
from batch_export.store import RunInfo, SqliteStore
from batch_export.types import STATE_FILE, JobRecord, JobState

__all__ = ["read_status", "render_status"]


def read_status(state_dir: Path, *, runs: int = 5) -> dict[str, Any]:
    """Return the status document: counts by state, every job record, the last ``runs`` runs.

    Raises:
        UsageError: there is no state store in ``state_dir``.
    """
    if not (state_dir / STATE_FILE).is_file():
        raise UsageError(
            f"no state store in {state_dir} (has a run used this --out / --state-dir?)"
        )

    async def load() -> tuple[list[JobRecord], list[RunInfo]]:
        store = await SqliteStore.open(state_dir)
        try:
            return await store.all_records(), await store.last_runs(runs)
        finally:
            await store.close()

    records, last_runs = anyio.run(load)
    counts = Counter(str(record.state) for record in records)
    return {
        "state_dir": str(state_dir),
        "counts": {str(state): counts.get(str(state), 0) for state in JobState}
        | {"total": len(records)},
        "jobs": [_job(record) for record in records],
        "runs": [_run(run) for run in last_runs],
    }


def _run(run: RunInfo) -> dict[str, Any]:
    doc: dict[str, Any] = dict(run)
    for field in ("started_at", "finished_at"):  # ISO 8601 UTC, as in the run reports
        if doc.get(field) is not None:
            doc[field] = utc_timestamp(doc[field])
    return doc


def _job(record: JobRecord) -> dict[str, Any]:
    doc = asdict(record)
    doc["state"] = str(record.state)
    return doc


def render_status(doc: dict[str, Any], *, as_json: bool) -> None:
    """Print the status document as JSON (for scripts) or as tables (for people) on stdout."""
    if as_json:
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    console = Console(file=sys.stdout, width=None if sys.stdout.isatty() else 160)
    console.print(f"state store: {doc['state_dir']}", markup=False, highlight=False)
    states = Table(title="jobs by state", title_justify="left")
    states.add_column("state")
    states.add_column("jobs", justify="right")
    for state, count in doc["counts"].items():
        if count or state in ("done", "failed", "total"):
            states.add_row(state, str(count))
    console.print(states)
    failed = [job for job in doc["jobs"] if job["state"] == "failed"]
    if failed:
        table = Table(title="failed jobs (tried again by the next run)", title_justify="left")
        for column in ("aoi_id", "insight_id", "name", "code", "http", "message"):
            table.add_column(column, overflow="fold")
        for job in failed:
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
