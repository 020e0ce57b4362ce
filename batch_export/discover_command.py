"""``batch-export discover MANIFEST [--json] [--emit-manifest FILE]`` (SPEC §7).

Sends only listing requests (``GET /v0/aois`` pages and one ``GET /v0/aoi/{id}/insights`` per AOI,
under the manifest's rate limit and retries) and shows, per selector and AOI, every listed insight
and what a run would do with it: ``export``, ``done`` (already done, from the state store, read
only), ``not_ready``, ``deleted``, ``filtered_out`` (and ``invalid`` for a listing entry that cannot
become a job, ``fail`` for a job the run fails before any request — ``no_listed_assets``, or a
``path_clash`` with an explicit entry or with another insight's file in the state store — and
``abandoned`` for one given up on in earlier runs). ``--json`` prints::

    {"selectors": [{"selector": 0, "aois": [{"aoi_id": "...", "error": null | {...},
      "insights": [{"id", "name", "status", "action", "reason"}]}]}]}

(a failed AOI paging is an entry with ``"aoi_id": null``). ``--emit-manifest FILE`` writes the jobs
a run would have — explicit entries and discovered ones — as a plain ``exports:`` manifest with the
same API, limits and output settings (``output.dir`` absolute), checked to give the same job keys.
Exit codes: 0 every listing answered, 1 some listing failed, 2 usage or manifest error.
"""

from __future__ import annotations

import datetime as _dt
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import anyio
import yaml

from batch_export.api import API_CONNECTIONS, PixxelClient
from batch_export.clock import SystemClock
from batch_export.config import RunOptions, resolve_api_key, resolve_settings
from batch_export.discovery import Action
from batch_export.errors import BatchExportError, ManifestError
from batch_export.http import open_sessions
from batch_export.lifecycle import job_key
from batch_export.listing import api_fetch
from batch_export.manifest import ExportSpec, Manifest, parse_manifest
from batch_export.ownership import index_paths, stored_clash
from batch_export.ratelimit import RateLimiter
from batch_export.redact import Redactor, escape_controls
from batch_export.resolve import Resolution, discover
from batch_export.store import SqliteStore
from batch_export.types import STATE_FILE, JobRecord, JobState, Settings

__all__ = ["DiscoverOptions", "execute_discover", "plain_manifest"]


@dataclass(frozen=True, slots=True)
class DiscoverOptions:
    """Command-line options of ``discover`` (``None``: manifest or default)."""

    api_url: str | None = None
    out: Path | None = None
    out_url: str | None = None  # --out s3://bucket/prefix (then ``out`` is None)
    state_dir: Path | None = None
    as_json: bool = False
    emit_manifest: Path | None = None
    allow_http: bool = False


def execute_discover(manifest: Manifest, options: DiscoverOptions) -> int:
    """Resolve the selectors, print what a run would do, and optionally emit a plain manifest.

    Returns:
        The exit code: 0, 1 (a listing failed) or 2 (usage error; nothing was requested).
    """
    try:
        settings = resolve_settings(
            manifest,
            RunOptions(
                api_url=options.api_url,
                out=options.out,
                out_url=options.out_url,
                state_dir=options.state_dir,
                allow_http=options.allow_http,
            ),
        )
        api_key = resolve_api_key(manifest)
    except BatchExportError as exc:
        print(f"batch-export: {exc.message}", file=sys.stderr)
        return 2
    redactor = Redactor([api_key])
    if not manifest.discover:
        print(f"batch-export: {manifest.path} has no discover: selectors", file=sys.stderr)
    try:
        resolution = anyio.run(_resolve, manifest, settings, api_key, redactor)
    except BatchExportError as exc:
        print(f"batch-export: {redactor(exc.message)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("batch-export: interrupted by SIGINT", file=sys.stderr)
        return 130
    stored = _stored_actions(settings.state_dir, manifest, resolution)
    document = view_document(resolution, stored)
    if options.as_json:
        print(json.dumps(redactor.redact_values(document), indent=2, ensure_ascii=False))
    else:
        for line in view_lines(document, manifest):
            print(redactor(line))
    if options.emit_manifest is not None:
        code = _emit(manifest, settings, resolution, options.emit_manifest)
        if code:
            return code
    failed = any(aoi["error"] is not None for s in document["selectors"] for aoi in s["aois"])
    return 1 if failed else 0


async def _resolve(
    manifest: Manifest, settings: Settings, api_key: str, redactor: Redactor
) -> Resolution:
    connections = min(settings.in_flight, API_CONNECTIONS)
    async with open_sessions(
        api_connections=connections, storage_connections=1, redactor=redactor
    ) as sessions:
        clock = SystemClock()
        client = PixxelClient(
            sessions.api,
            base_url=settings.api_url,
            api_key=api_key,
            limiter=RateLimiter(settings.rate, clock=clock),
            clock=clock,
            retries=settings.retries,
            read_timeout=settings.read_timeout,
            backoff_base=settings.backoff_base,
            backoff_cap=settings.backoff_cap,
            redactor=redactor,
            connections=connections,
        )
        return await discover(
            api_fetch(client, deadline=clock.monotonic() + settings.poll_timeout),
            manifest,
            explicit=manifest.exports,
            now=_dt.datetime.now(_dt.UTC),
            ready_statuses=settings.vocabulary.ready,
            concurrency=min(settings.in_flight, 16),
        )


def _stored_actions(
    state_dir: Path, manifest: Manifest, resolution: Resolution
) -> dict[str, tuple[Action, str]]:
    """What the state store makes a run do with each discovered job: key -> (action, reason).

    Read only (no store: nothing). The run's own rules: a done job is skipped (``done``), an
    abandoned one is not requested (``abandoned``, its last error as the reason), and a job whose
    path another insight's package or download holds fails ``path_clash``
    (:func:`~batch_export.ownership.stored_clash`, with every job key of the run as the runner
    has them) — ``fail``, never ``export``.
    """
    if not (state_dir / STATE_FILE).is_file():
        return {}
    specs = list(
        {  # every exported insight, merged ones (an explicit entry's job) included
            job_key(item.spec): item.spec
            for view in resolution.views
            for item in view.insights
            if item.spec is not None
        }.items()
    )
    run_keys = frozenset(
        job_key(spec) for spec in (*manifest.exports, *resolution.discovered.specs)
    )

    async def load() -> tuple[dict[str, JobRecord], dict[str, list[JobRecord]]]:
        store = await SqliteStore.open(state_dir)
        try:
            records = await store.load_many([key for key, _ in specs])
            owners = index_paths(await store.all_records())
        finally:
            await store.close()
        return records, owners

    records, owners = anyio.run(load)
    actions: dict[str, tuple[Action, str]] = {}
    for key, spec in specs:
        record = records.get(key)
        if record is not None and record.state is JobState.DONE:
            actions[key] = (Action.DONE, "")
        elif record is not None and record.state is JobState.ABANDONED:
            actions[key] = (Action.ABANDONED, f"{record.error_code}: {record.error_message}")
        elif clash := stored_clash(
            spec.relpath,
            key=key,
            aoi_id=spec.aoi_id,
            insight_id=spec.insight_id,
            stored=owners,
            run_keys=run_keys,
        ):
            actions[key] = (Action.FAIL, f"{clash.code}: {clash.message}")
    return actions


def view_document(resolution: Resolution, stored: dict[str, tuple[Action, str]]) -> dict[str, Any]:
    """The ``--json`` document (SPEC §7 shape, plus a ``reason`` per insight).

    ``stored``: what the state store makes the run do with a job (:func:`_stored_actions`). A job
    the run fails before any request (the listing's ``no_listed_assets``, a ``path_clash``) shows
    as ``fail`` with the reason, not as ``export``.
    """
    failures = {
        id(spec): resolution.discovered.failures[i]
        for i, spec in enumerate(resolution.discovered.specs)
        if i in resolution.discovered.failures
    }
    selectors: dict[int, list[dict[str, Any]]] = {}
    for view in resolution.views:
        insights = []
        for item in view.insights:
            action = str(item.action)
            reason = item.reason
            if item.action is Action.EXPORT and item.spec is not None:
                # The run's order: done, then abandoned, then the failures before any request.
                problem = failures.get(id(item.spec))
                decided = stored.get(job_key(item.spec))
                if decided is not None and decided[0] in (Action.DONE, Action.ABANDONED):
                    action, reason = str(decided[0]), decided[1]
                elif problem is not None:
                    action, reason = str(Action.FAIL), f"{problem.code}: {problem.message}"
                elif decided is not None:
                    action, reason = str(decided[0]), decided[1]
            insights.append(
                {
                    "id": item.insight_id,
                    "name": item.name,
                    "status": item.status,
                    "action": action,
                    "reason": reason,
                }
            )
        error = view.error
        selectors.setdefault(view.selector, []).append(
            {
                "aoi_id": view.aoi_id,
                "error": None if error is None else error.to_dict(),
                "insights": insights,
            }
            | (
                {"warning": {"code": view.warning.code, "message": view.warning.message}}
                if view.warning is not None
                else {}
            )
        )
    return {"selectors": [{"selector": index, "aois": aois} for index, aois in selectors.items()]}


def _what(manifest: Manifest, index: int) -> str:
    selector = next((s for s in manifest.discover if s.index == index), None)
    if selector is None:
        return ""
    if selector.all_aois:
        return "aois: all"
    if selector.projects is not None:
        return "projects: " + ", ".join(selector.projects)
    return "aois: " + ", ".join(selector.aois or ())


def view_lines(document: dict[str, Any], manifest: Manifest) -> list[str]:
    """The readable table: per selector and AOI, one line per listed insight."""
    lines: list[str] = []
    for selector in document["selectors"]:
        index = selector["selector"]
        lines.append(f"discover[{index}] ({escape_controls(_what(manifest, index))})")
        for aoi in selector["aois"]:
            where = "AOI listing" if aoi["aoi_id"] is None else f"AOI {aoi['aoi_id']}"
            error = aoi["error"]
            if error is not None:
                status = f" (HTTP {error['http_status']})" if error["http_status"] else ""
                lines.append(
                    escape_controls(
                        f"  {where}: listing failed: {error['code']}{status}: {error['message']}"
                    )
                )
                continue
            warning = aoi.get("warning")
            if warning is not None:
                lines.append(escape_controls(f"  {where}: warning: {warning['message']}"))
                continue
            counts: dict[str, int] = {}
            for insight in aoi["insights"]:
                counts[insight["action"]] = counts.get(insight["action"], 0) + 1
            summary = ", ".join(f"{n} {action}" for action, n in counts.items()) or "no insights"
            lines.append(escape_controls(f"  {where}: {len(aoi['insights'])} listed ({summary})"))
            rows = [
                (
                    str(i["id"] or "?"),
                    str(i["name"] if i["name"] is not None else "-"),
                    str(i["status"] if i["status"] is not None else "-"),
                    i["action"],
                    i["reason"],
                )
                for i in aoi["insights"]
            ]
            widths = [max((len(row[c]) for row in rows), default=0) for c in range(4)]
            for row in rows:
                cells = [row[c].ljust(widths[c]) for c in range(4)]
                tail = f"  {row[4]}" if row[4] else ""
                lines.append(escape_controls("    " + "  ".join(cells) + tail).rstrip())
    return lines


# ----------------------------------------------------------------------- --emit-manifest


def plain_manifest(
    manifest: Manifest, settings: Settings, specs: Sequence[ExportSpec]
) -> dict[str, Any]:
    """A plain ``exports:`` manifest document for ``specs``, with the manifest's settings.

    ``output.dir`` is the run's output dir, absolute, so that the plain manifest shares the
    state store (done jobs stay done) wherever it is written.
    """
    api: dict[str, Any] = {"url": settings.api_url}
    if manifest.api.key_env is not None:
        api["key_env"] = manifest.api.key_env
    if manifest.api.key_file is not None:
        api["key_file"] = str(manifest.api.key_file)
    if manifest.api.ready_statuses is not None:
        api["ready_statuses"] = list(manifest.api.ready_statuses)
    if manifest.api.failed_statuses is not None:
        api["failed_statuses"] = list(manifest.api.failed_statuses)
    limits = {
        f.name: getattr(manifest.limits, f.name)
        for f in fields(manifest.limits)
        if getattr(manifest.limits, f.name) is not None
    }
    output: dict[str, Any] = {"dir": settings.out_url or str(settings.out_dir)}
    output["path"] = manifest.output.path
    document: dict[str, Any] = {"version": 1, "api": api}
    if limits:
        document["limits"] = limits
    document["output"] = output
    document["exports"] = [
        {
            "aoi_id": spec.aoi_id,
            "insight_id": spec.insight_id,
            "inputs": list(spec.inputs),
            "outputs": list(spec.outputs),
            "name": spec.name,
        }
        for spec in specs
    ]
    return document


def _emit(manifest: Manifest, settings: Settings, resolution: Resolution, path: Path) -> int:
    """Write the plain manifest to ``path``; 2 (and nothing written) if it cannot be made."""
    failures = resolution.discovered.failures
    specs = [*manifest.exports] + [
        spec for i, spec in enumerate(resolution.discovered.specs) if i not in failures
    ]
    left_out = len(failures)
    text = "# batch-export discover --emit-manifest of " + str(manifest.path.absolute()) + "\n"
    text += yaml.safe_dump(
        plain_manifest(manifest, settings, specs),
        sort_keys=False,
        allow_unicode=True,
        default_flow_style=None,
        width=100,
    )
    target = path.absolute()
    try:
        emitted = parse_manifest(text, path=target)
    except ManifestError as exc:
        print(
            f"batch-export: cannot write {path} as a plain manifest: {exc.problems[0]}",
            file=sys.stderr,
        )
        return 2
    if [job_key(s) for s in emitted.exports] != [job_key(s) for s in specs]:
        print(
            f"batch-export: cannot write {path} as a plain manifest giving the same jobs: "
            "output.path uses {insight_name} or {created_date}, which explicit entries cannot "
            "reproduce; put them in the selector's name template instead",
            file=sys.stderr,
        )
        return 2
    try:
        target.write_text(text, encoding="utf-8")
    except OSError as exc:
        print(f"batch-export: cannot write {path}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    note = f" ({left_out} failing job(s) left out: no_listed_assets/path_clash)" if left_out else ""
    print(f"wrote {len(specs)} export(s) to {path}{note}", file=sys.stderr)
    return 0
