"""Discovery's pure core (SPEC §7): listed insights + a selector -> what a run does with each one.

No I/O: the listing client (:mod:`batch_export.listing`) fetches, this module decides, the runner acts.

:func:`resolve` takes one selector, one AOI id and that AOI's insight listing exactly as the API
returned it (``GET /v0/aoi/{aoi_id}/insights``: JSON objects with ``id``, ``name``, ``status``,
``created_at``, ``deleted_at``, ``input``, ``output``; an asset is an object with a string ``name`` —
Pixxel's DataType — or, in older answers, a plain string) and returns one :class:`Resolved` per listed
insight, in listing order. The rules, in the order they are applied:

1. an entry that is not a JSON object or has no non-empty string ``id`` is ``invalid``;
2. ``deleted_at`` other than ``null``/``""`` (whatever its type) is ``deleted`` — never exported;
3. ``created_after`` (inclusive: ``created_at >= created_after``; an age counts back from ``now``)
   and ``name_glob`` (:func:`fnmatch.fnmatchcase` on ``name``) that do not pass are
   ``filtered_out``; so is an insight whose ``created_at``/``name`` is missing or unusable while
   the selector filters on it;
4. a status (case-insensitive) outside the selector's ``status`` list is ``filtered_out`` when it is
   a ready status (the insight is finished, the selector does not want it) and ``not_ready``
   otherwise (a later run picks it up); a missing status is ``not_ready``;
5. everything else is ``export``, with an :class:`ExportSpec` of the same shape as an explicit
   entry's (so the job key, state and report rules are the same): ``inputs``/``outputs`` are the
   selector's lists, or for ``all`` the listed assets' names in listing order, deduplicated (entries
   that are neither a non-empty string nor an object with one as ``name`` are skipped); the name
   comes from the selector's ``name`` template; the path from ``output.path``, sanitised as in §3.
   When both sides are empty the export carries the :class:`Failure` ``no_listed_assets``: the
   runner records the job as failed with that code without sending anything. When the name or the
   path cannot be made (``{created_date}`` without a usable ``created_at``, a component longer than
   255 bytes, …) the insight is ``invalid`` with the reason.

Template values: ``{insight_name}`` is the listed ``name`` when it is a non-empty string, else the
insight id; ``{created_date}`` is ``YYYY-MM-DD`` of ``created_at`` in UTC.

:func:`merge` then puts the discovered exports beside the explicit entries: an explicit entry wins a
path clash (the discovered job fails with ``path_clash`` naming the other), an earlier discovered job
wins over a later one, and a discovered job identical to another (same AOI, insight, selection and
path, hence the same job key) is merged into it.

Hostile listing data never raises: every odd value becomes a per-insight result whose ``reason``
quotes at most 60 characters of it.
"""

from __future__ import annotations

import datetime as _dt
import enum
import fnmatch
import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

from batch_export.manifest import (
    ALL,
    AssetChoice,
    DiscoverSelector,
    ExportSpec,
    path_conflicts,
    render_name,
    render_relpath,
    template_fields,
)

__all__ = [
    "NO_LISTED_ASSETS",
    "PATH_CLASH",
    "Action",
    "Failure",
    "Merged",
    "Planned",
    "Resolved",
    "merge",
    "resolve",
]

#: Error code of a discovered job whose request would carry no inputs and no outputs (SPEC §7).
NO_LISTED_ASSETS: Final = "no_listed_assets"
#: Error code of a discovered job whose output path another job already has (SPEC §7).
PATH_CLASH: Final = "path_clash"

#: Longest piece of a listed value quoted in a reason.
_SHOWN_CHARS: Final = 60


class Action(enum.StrEnum):
    """What a run does with a listed insight (the ``action`` of ``discover --json``, SPEC §7)."""

    EXPORT = "export"  # a job of this run
    DONE = "done"  # a job already done (decided by the runner from the state store, not here)
    NOT_READY = "not_ready"  # not in an exportable status yet; a later run picks it up
    DELETED = "deleted"  # deleted_at is set: never exported
    FILTERED_OUT = "filtered_out"  # the selector does not want it
    INVALID = "invalid"  # the listing entry cannot become a job (no id, no usable path, ...)
    FAIL = "fail"  # a job the run fails before any request (path_clash, no_listed_assets)
    ABANDONED = "abandoned"  # a job given up on in earlier runs (from the state store, not here)


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a discovered job fails without a request: a stable ``code`` and a one-line message."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Resolved:
    """One listed insight and what to do with it.

    Attributes:
        position: Index of the insight in the listing (0-based).
        insight_id: The listed ``id`` when it is a non-empty string, else ``None``.
        name: The listed ``name`` when it is a string, else ``None`` (for display; not escaped).
        status: The listed ``status`` when it is a string, else ``None`` (for display).
        action: See :class:`Action`; never ``done`` here.
        reason: One line saying why (empty for a plain ``export``).
        spec: The job for ``export`` (with ``source`` = ``discover[N]``), else ``None``.
        failure: For ``export``: ``no_listed_assets`` when the job must fail without a request,
            else ``None``.
    """

    position: int
    insight_id: str | None
    name: str | None
    status: str | None
    action: Action
    reason: str = ""
    spec: ExportSpec | None = None
    failure: Failure | None = None


@dataclass(frozen=True, slots=True)
class Planned:
    """A discovered job after :func:`merge`: its spec and, when it must fail at once, why."""

    spec: ExportSpec
    failure: Failure | None = None


@dataclass(frozen=True, slots=True)
class Merged:
    """The result of :func:`merge`.

    Attributes:
        jobs: The discovered jobs to add to the explicit ones, in the order given, each at most once.
        merged: ``(spec, source)`` for each discovered job identical to one already there (an
            explicit entry's ``exports[N]`` or an earlier selector's ``discover[M]``); not in ``jobs``.
    """

    jobs: tuple[Planned, ...]
    merged: tuple[tuple[ExportSpec, str], ...]


# --------------------------------------------------------------------------------------------------
# Resolving one AOI's listing.


def resolve(
    selector: DiscoverSelector,
    aoi_id: str,
    insights: Iterable[Any],
    *,
    now: _dt.datetime,
    path_template: str,
    ready_statuses: Collection[str],
) -> tuple[Resolved, ...]:
    """Decide, for every insight one AOI's listing holds, what a run does with it (SPEC §7).

    Args:
        selector: The ``discover:`` selector that named the AOI.
        aoi_id: The AOI whose listing this is.
        insights: The ``insights`` array of ``GET /v0/aoi/{aoi_id}/insights`` as parsed JSON, in
            order; any value is accepted (odd ones become ``invalid`` results).
        now: The current time (UTC; a naive value is taken as UTC), for ages such as ``30d``.
        path_template: The manifest's ``output.path``.
        ready_statuses: The ready status words, lower-cased (the selector's default ``status``).

    Returns:
        One :class:`Resolved` per listed insight, in listing order.
    """
    cutoff = _cutoff(selector, _utc(now))
    wanted = frozenset(selector.statuses) if selector.statuses is not None else None
    ready = frozenset(status.lower() for status in ready_statuses)
    try:
        uses_date = "created_date" in template_fields(path_template) or (
            "created_date" in template_fields(selector.name, name=True)
        )
    except ValueError as exc:  # a template the manifest validator would have refused
        return tuple(
            Resolved(i, None, None, None, Action.INVALID, str(exc)) for i, _ in enumerate(insights)
        )
    rules = _Rules(selector, aoi_id, cutoff, wanted, ready, path_template, uses_date)
    return tuple(rules.one(position, insight) for position, insight in enumerate(insights))


def _utc(when: _dt.datetime) -> _dt.datetime:
    return when.replace(tzinfo=_dt.UTC) if when.tzinfo is None else when.astimezone(_dt.UTC)


def _cutoff(selector: DiscoverSelector, now: _dt.datetime) -> _dt.datetime | None:
    if selector.created_after is not None:
        return _utc(selector.created_after)
    if selector.created_within is not None:
        try:
            return now - _dt.timedelta(seconds=selector.created_within)
        except OverflowError:
            return _dt.datetime.min.replace(tzinfo=_dt.UTC)  # an age beyond year 1: everything
    return None


@dataclass(frozen=True, slots=True)
class _Rules:
    selector: DiscoverSelector
    aoi_id: str
    cutoff: _dt.datetime | None
    wanted: frozenset[str] | None  # the selector's statuses, or None: the ready ones
    ready: frozenset[str]
    path_template: str
    uses_date: bool  # the name or path template uses {created_date}

    def one(self, position: int, insight: Any) -> Resolved:
        if not isinstance(insight, Mapping):
            return Resolved(
                position, None, None, None, Action.INVALID, "the listing entry is not a JSON object"
            )
        raw_id, raw_name, raw_status = (insight.get(k) for k in ("id", "name", "status"))
        insight_id = raw_id if isinstance(raw_id, str) and raw_id else None
        name = raw_name if isinstance(raw_name, str) else None
        status = raw_status if isinstance(raw_status, str) else None

        def result(action: Action, reason: str = "", **more: Any) -> Resolved:
            return Resolved(position, insight_id, name, status, action, reason, **more)

        if insight_id is None:
            return result(Action.INVALID, f"the listing gives no usable id ({_what(raw_id)})")
        deleted_at = insight.get("deleted_at")
        if deleted_at is not None and deleted_at != "":
            return result(Action.DELETED, f"deleted_at is {_what(deleted_at)}")
        created = _parse_time(insight.get("created_at"))
        reason = self.filtered(created, insight.get("created_at"), raw_name)
        if reason:
            return result(Action.FILTERED_OUT, reason)
        unwanted = self.not_exportable(status, raw_status)
        if unwanted is not None:
            action = (
                Action.FILTERED_OUT if status and status.lower() in self.ready else Action.NOT_READY
            )
            return result(action, unwanted)
        created_date = created.date().isoformat() if created is not None else None
        try:
            spec = self.spec(insight, insight_id, name, created_date)
        except ValueError as exc:
            return result(Action.INVALID, str(exc))
        failure = None
        if not spec.inputs and not spec.outputs:
            failure = Failure(
                NO_LISTED_ASSETS,
                "the request would carry no inputs and no outputs: the listing names no assets "
                f"for this insight where {self.selector.source} asks for all",
            )
        return result(Action.EXPORT, spec=spec, failure=failure)

    def filtered(self, created: _dt.datetime | None, raw_created: Any, raw_name: Any) -> str:
        """Return why the selector's created_after/name_glob drops the insight, or ``""``."""
        cutoff = self.cutoff
        if cutoff is not None:
            if created is None:
                return f"created_at is {_what(raw_created)}, so created_after cannot be checked"
            if created < cutoff:
                return f"created {_iso(created)}, before {_iso(cutoff)} (created_after)"
        glob = self.selector.name_glob
        if glob is not None:
            if not isinstance(raw_name, str):
                return f"name is {_what(raw_name)}, so name_glob cannot match it"
            if not fnmatch.fnmatchcase(raw_name, glob):
                return f"name {_shown(raw_name)} does not match name_glob {_shown(glob)}"
        return ""

    def not_exportable(self, status: str | None, raw_status: Any) -> str | None:
        """Return why the status is not one to export, or ``None`` when it is."""
        if status is None:
            return f"status is {_what(raw_status)}"
        wanted = self.ready if self.wanted is None else self.wanted
        if status.lower() in wanted:
            return None
        if self.wanted is None:
            return f"status {_shown(status)} is not a ready status"
        return f"status {_shown(status)} is not in the selector's status list"

    def spec(
        self,
        insight: Mapping[str, Any],
        insight_id: str,
        name: str | None,
        created_date: str | None,
    ) -> ExportSpec:
        """Build the export; raise ValueError (the reason) when its name or path cannot be made."""
        selector = self.selector
        insight_name = name if name else insight_id
        if created_date is None and self.uses_date:
            raise ValueError(
                f"created_at is {_what(insight.get('created_at'))}, and the name or path template "
                "uses {created_date}"
            )
        try:
            job_name = render_name(
                selector.name,
                aoi_id=self.aoi_id,
                insight_id=insight_id,
                insight_name=insight_name,
                created_date=created_date,
            )
            relpath = render_relpath(
                self.path_template,
                aoi_id=self.aoi_id,
                insight_id=insight_id,
                name=job_name,
                insight_name=insight_name,
                created_date=created_date,
            )
        except ValueError as exc:
            raise ValueError(f"no output path can be made for it: {exc}") from None
        return ExportSpec(
            aoi_id=self.aoi_id,
            insight_id=insight_id,
            inputs=_assets(selector.inputs, insight.get("input")),
            outputs=_assets(selector.outputs, insight.get("output")),
            name=job_name,
            relpath=relpath,
            line=selector.line,
            source=selector.source,
        )


def _assets(choice: AssetChoice, listed: Any) -> tuple[str, ...]:
    """The asset ids to request: the selector's list, or for ``all`` the listed assets' names."""
    if choice != ALL:
        assert not isinstance(choice, str)
        return choice
    if not isinstance(listed, list):
        return ()
    names: dict[str, None] = {}
    for asset in listed:
        if isinstance(asset, Mapping):
            asset = asset.get("name")
        if isinstance(asset, str) and asset:
            names.setdefault(asset, None)
    return tuple(names)


def _parse_time(value: Any) -> _dt.datetime | None:
    """An aware UTC datetime from an ISO 8601 / RFC 3339 string (naive: UTC), else ``None``."""
    if not isinstance(value, str) or not 10 <= len(value) <= 40:
        return None
    try:
        when = _dt.datetime.fromisoformat(value.strip().replace("z", "Z"))
    except ValueError:
        return None
    try:
        return _utc(when)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00
        return None


def _iso(when: _dt.datetime) -> str:
    return when.isoformat().replace("+00:00", "Z")


def _shown(text: str) -> str:
    """Quote ``text`` as JSON, cut to :data:`_SHOWN_CHARS` characters."""
    if len(text) <= _SHOWN_CHARS:
        return json.dumps(text, ensure_ascii=False)
    return json.dumps(text[:_SHOWN_CHARS], ensure_ascii=False) + f"… ({len(text):,} characters)"


def _what(value: Any) -> str:
    """Describe a listed value for a reason, never quoting more than :data:`_SHOWN_CHARS` of it."""
    if value is None:
        return "missing or null"
    if isinstance(value, str):
        return "empty" if not value else _shown(value)
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int | float):
        text = repr(value)
        return f"the number {text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + '…'}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return f"a {type(value).__name__}"


# --------------------------------------------------------------------------------------------------
# Discovered jobs beside the explicit ones.


def merge(explicit: Sequence[ExportSpec], discovered: Iterable[Resolved]) -> Merged:
    """Put the discovered exports beside the explicit entries (SPEC §7).

    Args:
        explicit: The manifest's validated ``exports`` (their paths are distinct already).
        discovered: Resolved insights in run order (selector order, then AOI, then listing order);
            only ``export`` results are taken.

    Returns:
        The discovered jobs, each at most once: a path taken by an explicit entry, or by an earlier
        discovered job, makes the later job fail with ``path_clash`` naming the other's source and
        path; so does a path that is a folder of another's, or another's ``.part`` file. A job
        identical to one already there (same AOI, insight, inputs, outputs and path) is merged.
    """
    owners: dict[str, ExportSpec] = {spec.relpath: spec for spec in explicit}
    jobs: list[Planned] = []
    merged: list[tuple[ExportSpec, str]] = []
    for item in discovered:
        spec = item.spec
        if item.action is not Action.EXPORT or spec is None:
            continue
        other = owners.get(spec.relpath)
        if other is None:
            owners[spec.relpath] = spec
            jobs.append(Planned(spec, item.failure))
        elif _identity(other) == _identity(spec):
            merged.append((spec, other.source))
        else:
            jobs.append(Planned(spec, _clash(spec, other, "is also the output path of")))
    return Merged(_folder_clashes(jobs, owners), tuple(merged))


def _identity(spec: ExportSpec) -> tuple[Any, ...]:
    """What the job key covers (SPEC §4)."""
    return (spec.aoi_id, spec.insight_id, spec.inputs, spec.outputs, spec.relpath)


def _clash(spec: ExportSpec, other: ExportSpec, how: str) -> Failure:
    return Failure(
        PATH_CLASH,
        f"output path {_shown(spec.relpath)} {how} {other.source} (aoi {_shown(other.aoi_id)}, "
        f"insight {_shown(other.insight_id)}); set a distinct name template or output.path",
    )


#: How a losing path relates to the winner's: (kind from path_conflicts, the loser is path i).
_CONFLICT_WORDS: Final = {
    ("folder", True): "is a folder in the output path of",
    ("folder", False): "lies inside the output path of",
    ("part-folder", True): "with .part is a folder in the output path of",
    ("part-folder", False): "lies inside the download file (.part) of",
    ("part", True): "is the download file (.part) of",
    ("part", False): "has its download file (.part) at the output path of",
}


def _folder_clashes(jobs: list[Planned], owners: dict[str, ExportSpec]) -> tuple[Planned, ...]:
    """Fail discovered jobs whose path is a folder of another path or another's ``.part``."""
    specs = list(owners.values())  # explicit first, then discovered, in order; distinct paths
    first_discovered = {id(job.spec) for job in jobs}
    failures: dict[int, Failure] = {}
    for i, j, kind in path_conflicts([spec.relpath for spec in specs]):
        if kind == "case":
            continue
        # The later of the two loses; an explicit entry never does.
        loser, winner = (specs[i], specs[j]) if i > j else (specs[j], specs[i])
        if id(loser) not in first_discovered or id(loser) in failures:
            continue
        how = _CONFLICT_WORDS[kind, loser is specs[i]]
        failures[id(loser)] = _clash(loser, winner, how)
    return tuple(
        replace(job, failure=failures[id(job.spec)]) if id(job.spec) in failures else job
        for job in jobs
    )
