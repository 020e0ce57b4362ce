"""The sandbox's listing endpoints (SPEC §7) and its admin routes for changing the catalog.

Listing, with the documented shapes (Pixxel's published OpenAPI)::

    GET /v0/aois?offset=0&limit=100[&project_ids=p1,p2]          Authorization: <raw key>
    200 {"aois": [{"aoi_id", "name", "project_id", "status", "created_at"}],
         "pagination": {"limit": 100, "offset": 0, "total": 250}}
    GET /v0/aoi/{aoi_id}/insights                                  Authorization: <raw key>
    200 {"insights": [{"id", "name", "status", "aoi_id", "project_id", "type", "created_at",
                       "deleted_at", "input": [<asset>], "output": [<asset>]}]}

``limit`` defaults to 100 and is capped at 100; a bad ``offset``/``limit`` is a 400 envelope. AOIs
the key may not see (``denied_aois``) are left out of the pages and answer 403 to an insight
listing; an unknown AOI answers 404. An ``<asset>`` is a DataType object
``{"name", "format", "type", "value"}`` or, for insights with ``plain_assets``, a plain string.
Both routes check the key and take a token from the key's bucket like the PUT, and pass the fault
hooks :meth:`~batch_export.sandbox.faults.Faults.listing_plan` and ``listing_response``.

Admin routes (key checked, no rate limit, so a test or an operator can change the catalog while
it runs)::

    POST  /_sandbox/insights                {"aoi_id"?, "status"?, "name"?}  -> 201 <insight>
    PATCH /_sandbox/insights/{insight_id}   {"status"?, "deleted"?: bool}    -> 200 <insight>

``aoi_id`` defaults to the first AOI the key may see, ``status`` to ``completed``. With
``SandboxConfig.new_insight_every`` set, a new completed insight also appears every that many
seconds (of the sandbox clock) on the visible AOIs in turn, counted from the sandbox's start.
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, Protocol

from aiohttp import web

from batch_export.sandbox.catalog import LISTING_STATUSES, Aoi, Catalog, Insight, rfc3339
from batch_export.sandbox.config import SandboxConfig
from batch_export.sandbox.faults import Faults, ListingContext, ScriptedResponse
from batch_export.sandbox.wire import send_scripted

__all__ = ["MAX_LIMIT", "ListingRoutes", "aoi_record", "insight_record"]

MAX_LIMIT = 100
"""Largest page the AOI listing serves (and its default ``limit``)."""


class _Host(Protocol):
    """What the listing routes need from the sandbox."""

    config: SandboxConfig
    catalog: Catalog
    faults: Faults


def _envelope(status: int, code: str, message: str, details: Any = None) -> web.Response:
    body = {"error": {"code": code, "details": details, "message": message}}
    return web.json_response(body, status=status)


def _asset(aoi_id: str, insight_id: str, asset_id: str, *, plain: bool) -> object:
    if plain:
        return asset_id
    scene = asset_id.startswith("scene_")
    return {
        "name": asset_id,
        "format": "GeoTIFF" if scene else "COG",
        "type": "input" if scene else "output",
        "value": f"s3://pixxel-insights/{aoi_id}/{insight_id}/{asset_id}.tif",
    }


def aoi_record(aoi: Aoi) -> dict[str, Any]:
    """The AOI as the page lists it."""
    first = min((i.created_at for i in aoi.insights), default="2026-10-01T00:00:00Z")
    return {
        "aoi_id": aoi.id,
        "name": aoi.name,
        "project_id": aoi.project_id,
        "status": "active",
        "created_at": first,
    }


def insight_record(aoi: Aoi, insight: Insight) -> dict[str, Any]:
    """The insight as ``GET /v0/aoi/{aoi_id}/insights`` lists it."""
    plain = insight.plain_assets
    return {
        "id": insight.id,
        "name": insight.name,
        "status": insight.status,
        "aoi_id": aoi.id,
        "project_id": aoi.project_id,
        "type": insight.kind,
        "created_at": insight.created_at,
        "deleted_at": insight.deleted_at,
        "input": [_asset(aoi.id, insight.id, a, plain=plain) for a in insight.inputs],
        "output": [_asset(aoi.id, insight.id, a, plain=plain) for a in insight.outputs],
    }


def _query_int(request: web.Request, name: str, default: int) -> int | web.Response:
    text = request.query.get(name)
    if text is None or text == "":
        return default
    if not text.isdigit():
        return _envelope(
            400,
            "invalid_query",
            f"{name!r} must be a whole number >= 0",
            {"field": name},
        )
    return int(text)


Admit = Callable[[web.Request], Awaitable["str | web.Response"]]


class ListingRoutes:
    """The listing and admin routes of one sandbox; also the Python way to change its catalog.

    Args:
        host: The sandbox (its ``config``, ``catalog`` — replaced on every change — and
            ``faults``).
        admit: Checks the key and the rate limit: the key, or the response to send instead.
    """

    def __init__(self, host: _Host, admit: Admit) -> None:
        self._host = host
        self._admit = admit
        self._number = 0
        self._added = 0
        self._auto_added = 0
        self._started: float | None = None

    def add_routes(self, app: web.Application) -> None:
        """Register the listing and admin routes on the API ``app``."""
        app.router.add_get("/v0/aois", self._aois)
        app.router.add_get("/v0/aoi/{aoi_id}/insights", self._insights)
        app.router.add_post("/_sandbox/insights", self._admin_add)
        app.router.add_patch("/_sandbox/insights/{insight_id}", self._admin_update)

    def start(self) -> None:
        """Start the ``new_insight_every`` clock (the sandbox calls this when it starts)."""
        self._started = self._host.config.clock()

    # -- changing the catalog ------------------------------------------------------------------

    def add_insight(
        self, aoi_id: str | None = None, *, status: str = "completed", name: str | None = None
    ) -> tuple[str, Insight]:
        """Add a new insight (created now) to AOI ``aoi_id`` (default: the first visible AOI).

        Returns:
            ``(aoi_id, insight)``: the PUT accepts the insight's asset ids from now on.

        Raises:
            KeyError: no AOI ``aoi_id``.
        """
        host = self._host
        target = aoi_id if aoi_id is not None else self._visible("")[0].id
        self._added += 1
        insight = host.catalog.new_insight(
            target, self._added, now=host.config.clock(), status=status, name=name
        )
        host.catalog = host.catalog.with_insight(target, insight)
        return target, insight

    def update_insight(
        self, insight_id: str, *, status: str | None = None, deleted: bool | None = None
    ) -> tuple[str, Insight]:
        """Change an insight's listing status and/or mark it deleted (now) or not deleted.

        Returns:
            ``(aoi_id, insight)`` after the change.

        Raises:
            KeyError: no insight ``insight_id``.
        """
        host = self._host
        for aoi in host.catalog.aois:
            found = aoi.insight(insight_id)
            if found is None:
                continue
            changed = found
            if status is not None:
                changed = replace(changed, status=status)
            if deleted is not None:
                stamp = rfc3339(host.config.clock()) if deleted else None
                changed = replace(changed, deleted_at=stamp)
            host.catalog = host.catalog.with_insight(aoi.id, changed)
            return aoi.id, changed
        raise KeyError(insight_id)

    def _catch_up(self) -> None:
        """Add the insights ``new_insight_every`` says should exist by now."""
        every = self._host.config.new_insight_every
        if every is None or self._started is None:
            return
        due = math.floor((self._host.config.clock() - self._started) / every + 1e-9)
        while self._auto_added < due:
            visible = self._visible("")
            if not visible:
                return
            aoi = visible[self._auto_added % len(visible)]
            self._auto_added += 1
            self.add_insight(aoi.id)

    def _visible(self, key: str) -> list[Aoi]:
        faults = self._host.faults
        return [a for a in self._host.catalog.aois if not faults.denies(key, a.id, "")]

    # -- listing -------------------------------------------------------------------------------

    async def _answer(
        self, request: web.Request, ctx: ListingContext, document: dict[str, Any]
    ) -> web.StreamResponse:
        body = json.dumps(document).encode()
        injected = self._host.faults.listing_response(ctx, body)
        if isinstance(injected, ScriptedResponse):
            return await send_scripted(request, injected, now=self._host.config.clock())
        if injected is not None:
            return injected
        return web.Response(body=body, content_type="application/json")

    async def _aois(self, request: web.Request) -> web.StreamResponse:
        key = await self._admit(request)
        if not isinstance(key, str):
            return key
        self._catch_up()
        offset = _query_int(request, "offset", 0)
        if not isinstance(offset, int):
            return offset
        limit = _query_int(request, "limit", MAX_LIMIT)
        if not isinstance(limit, int):
            return limit
        limit = max(1, min(MAX_LIMIT, limit))
        aois = self._visible(key)
        projects = request.query.get("project_ids")
        if projects:
            wanted = {p.strip() for p in projects.split(",") if p.strip()}
            aois = [a for a in aois if a.project_id in wanted]
        self._number += 1
        ctx = ListingContext(request, key, "aois", "", offset, limit, self._number)
        plan = self._host.faults.listing_plan(ctx)
        start = max(0, offset - plan.offset_shift)
        document = {
            "aois": [aoi_record(a) for a in aois[start : start + limit]],
            "pagination": {
                "limit": limit,
                "offset": offset,
                "total": len(aois) + plan.total_delta,
            },
        }
        return await self._answer(request, ctx, document)

    async def _insights(self, request: web.Request) -> web.StreamResponse:
        key = await self._admit(request)
        if not isinstance(key, str):
            return key
        self._catch_up()
        aoi_id = request.match_info["aoi_id"]
        aoi = self._host.catalog.aoi(aoi_id)
        if aoi is not None and self._host.faults.denies(key, aoi_id, ""):
            return _envelope(
                403, "permission_denied", f"no permission for AOI {aoi_id!r}", {"aoi_id": aoi_id}
            )
        if aoi is None:
            return _envelope(404, "not_found", f"no AOI {aoi_id!r}", {"aoi_id": aoi_id})
        self._number += 1
        ctx = ListingContext(request, key, "insights", aoi_id, 0, 0, self._number)
        self._host.faults.listing_plan(ctx)
        document = {"insights": [insight_record(aoi, i) for i in aoi.insights]}
        return await self._answer(request, ctx, document)

    # -- admin ---------------------------------------------------------------------------------

    def _key_ok(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") in self._host.config.keys

    async def _admin_body(self, request: web.Request) -> dict[str, Any] | web.Response:
        if not self._key_ok(request):
            return _envelope(403, "invalid_api_key", "missing or unknown API key")
        raw = await request.read()
        try:
            data = json.loads(raw) if raw.strip() else {}
        except (ValueError, UnicodeDecodeError):
            return _envelope(400, "invalid_json", "request body is not valid JSON")
        if not isinstance(data, dict):
            return _envelope(400, "invalid_body", "request body must be a JSON object")
        status = data.get("status")
        if status is not None and status not in LISTING_STATUSES:
            return _envelope(
                400, "invalid_body", f"status must be one of {', '.join(LISTING_STATUSES)}"
            )
        for name in ("aoi_id", "name"):
            if data.get(name) is not None and not isinstance(data[name], str):
                return _envelope(400, "invalid_body", f"{name!r} must be a string")
        if data.get("deleted") is not None and not isinstance(data["deleted"], bool):
            return _envelope(400, "invalid_body", "'deleted' must be true or false")
        return data

    async def _admin_add(self, request: web.Request) -> web.StreamResponse:
        data = await self._admin_body(request)
        if isinstance(data, web.Response):
            return data
        self._catch_up()
        try:
            aoi_id, insight = self.add_insight(
                data.get("aoi_id"), status=data.get("status") or "completed", name=data.get("name")
            )
        except (KeyError, IndexError):
            return _envelope(404, "not_found", "no such AOI", {"aoi_id": data.get("aoi_id")})
        aoi = self._host.catalog.aoi(aoi_id)
        assert aoi is not None
        return web.json_response(insight_record(aoi, insight), status=201)

    async def _admin_update(self, request: web.Request) -> web.StreamResponse:
        data = await self._admin_body(request)
        if isinstance(data, web.Response):
            return data
        insight_id = request.match_info["insight_id"]
        try:
            aoi_id, insight = self.update_insight(
                insight_id, status=data.get("status"), deleted=data.get("deleted")
            )
        except KeyError:
            return _envelope(
                404, "not_found", f"no insight {insight_id!r}", {"insight_id": insight_id}
            )
        aoi = self._host.catalog.aoi(aoi_id)
        assert aoi is not None
        return web.json_response(insight_record(aoi, insight))
