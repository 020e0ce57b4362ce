"""The sandbox's listing endpoints and admin routes (SPEC §7) over real loopback sockets."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from batch_export.sandbox import (
    DEMO_KEY,
    Catalog,
    Fault,
    FaultScript,
    Rule,
    Sandbox,
    SandboxConfig,
)
from tests.fakes import SandboxClock

pytestmark = pytest.mark.anyio

T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z
KEY = {"Authorization": DEMO_KEY}


@pytest.fixture
def clock() -> SandboxClock:
    return SandboxClock(T0)


@pytest.fixture
def make_config(clock: SandboxClock) -> Callable[..., SandboxConfig]:
    def make(**overrides: Any) -> SandboxConfig:
        values: dict[str, Any] = {"asset_size": 1024, "rate": None, "clock": clock}
        values.update(overrides)
        return SandboxConfig(**values)

    return make


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def get_json(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    async with session.get(url, headers=KEY if headers is None else headers) as response:
        body = await response.read()
        if response.content_type == "application/json":
            return response.status, json.loads(body)
        return response.status, body


async def all_pages(session: aiohttp.ClientSession, sandbox: Sandbox, query: str = "") -> list[Any]:
    pages = []
    offset = 0
    while True:
        status, page = await get_json(
            session, f"{sandbox.api_url}/v0/aois?offset={offset}&limit=100{query}"
        )
        assert status == 200
        pages.append(page)
        offset += len(page["aois"])
        if not page["aois"] or offset >= page["pagination"]["total"]:
            return pages


def test_catalog_ids_of_a_seed_do_not_change_when_it_grows() -> None:
    small, big = Catalog.generate(0), Catalog.generate(0, 250)
    assert len(big.aois) == 250
    assert [(a.id, a.insights) for a in big.aois[: len(small.aois)]] == [
        (a.id, a.insights) for a in small.aois
    ]
    ids = [i.id for a in big.aois for i in a.insights] + [a.id for a in big.aois]
    assert len(ids) == len(set(ids))
    statuses = {i.status for a in big.aois for i in a.insights}
    assert statuses == {"completed", "running", "queued", "failed"}
    assert any(i.deleted_at for a in big.aois for i in a.insights)
    assert any(i.plain_assets for a in big.aois for i in a.insights)
    assert len(big.project_ids) == 4


async def test_aoi_pages_cover_every_aoi_once(
    make_config: Callable[..., SandboxConfig], session: aiohttp.ClientSession
) -> None:
    async with Sandbox(make_config(aoi_count=250)) as sandbox:
        pages = await all_pages(session, sandbox)
        assert len(pages) == 3
        assert [p["pagination"] for p in pages] == [
            {"limit": 100, "offset": o, "total": 250} for o in (0, 100, 200)
        ]
        listed = [a["aoi_id"] for p in pages for a in p["aois"]]
        assert listed == [a.id for a in sandbox.catalog.aois]
        first = sandbox.catalog.aois[0]
        assert pages[0]["aois"][0] == {
            "aoi_id": first.id,
            "name": first.name,
            "project_id": first.project_id,
            "status": "active",
            "created_at": min(i.created_at for i in first.insights),
        }
        # limit is capped at 100; past the end comes an empty page
        status, page = await get_json(session, f"{sandbox.api_url}/v0/aois?offset=0&limit=500")
        assert (status, len(page["aois"]), page["pagination"]["limit"]) == (200, 100, 100)
        status, page = await get_json(session, f"{sandbox.api_url}/v0/aois?offset=300")
        assert (status, page["aois"]) == (200, [])
        status, page = await get_json(session, f"{sandbox.api_url}/v0/aois?offset=-1")
        assert status == 400 and page["error"]["code"] == "invalid_query"


async def test_project_filter_and_denied_aois(
    make_config: Callable[..., SandboxConfig], session: aiohttp.ClientSession
) -> None:
    catalog = Catalog.generate(0, 20)
    denied = catalog.aois[1].id
    project = catalog.aois[0].project_id
    async with Sandbox(make_config(aoi_count=20, denied_aois=frozenset({denied}))) as sandbox:
        pages = await all_pages(session, sandbox, f"&project_ids={project},prj-none")
        listed = [a["aoi_id"] for p in pages for a in p["aois"]]
        assert listed == [a.id for a in catalog.aois if a.project_id == project]
        everything = [a["aoi_id"] for p in await all_pages(session, sandbox) for a in p["aois"]]
        assert everything == [a.id for a in catalog.aois if a.id != denied]
        status, body = await get_json(session, f"{sandbox.api_url}/v0/aoi/{denied}/insights")
        assert status == 403 and body["error"]["code"] == "permission_denied"
        status, body = await get_json(session, f"{sandbox.api_url}/v0/aoi/aoi-nope/insights")
        assert status == 404 and body["error"]["code"] == "not_found"
        status, body = await get_json(session, f"{sandbox.api_url}/v0/aois", headers={})
        assert status == 403 and body["error"]["code"] == "invalid_api_key"


async def test_insight_listing_shapes(
    make_config: Callable[..., SandboxConfig], session: aiohttp.ClientSession
) -> None:
    async with Sandbox(make_config(aoi_count=40)) as sandbox:
        plain_aoi, plain = next(
            (a, i) for a in sandbox.catalog.aois for i in a.insights if i.plain_assets
        )
        typed_aoi, typed = next(
            (a, i) for a in sandbox.catalog.aois for i in a.insights if not i.plain_assets
        )
        _, listing = await get_json(session, f"{sandbox.api_url}/v0/aoi/{typed_aoi.id}/insights")
        record = next(r for r in listing["insights"] if r["id"] == typed.id)
        assert record == {
            "id": typed.id,
            "name": typed.name,
            "status": typed.status,
            "aoi_id": typed_aoi.id,
            "project_id": typed_aoi.project_id,
            "type": typed.kind,
            "created_at": typed.created_at,
            "deleted_at": typed.deleted_at,
            "input": [
                {
                    "name": a,
                    "format": "GeoTIFF",
                    "type": "input",
                    "value": f"s3://pixxel-insights/{typed_aoi.id}/{typed.id}/{a}.tif",
                }
                for a in typed.inputs
            ],
            "output": [
                {
                    "name": a,
                    "format": "COG",
                    "type": "output",
                    "value": f"s3://pixxel-insights/{typed_aoi.id}/{typed.id}/{a}.tif",
                }
                for a in typed.outputs
            ],
        }
        _, listing = await get_json(session, f"{sandbox.api_url}/v0/aoi/{plain_aoi.id}/insights")
        record = next(r for r in listing["insights"] if r["id"] == plain.id)
        assert (record["input"], record["output"]) == (list(plain.inputs), list(plain.outputs))


async def test_admin_routes_add_and_finish_insights_the_put_accepts(
    make_config: Callable[..., SandboxConfig],
    session: aiohttp.ClientSession,
    clock: SandboxClock,
) -> None:
    async with Sandbox(make_config()) as sandbox:
        aoi = sandbox.catalog.aois[1]
        async with session.post(
            f"{sandbox.api_url}/_sandbox/insights",
            json={"aoi_id": aoi.id, "status": "running", "name": "ndvi-new"},
            headers=KEY,
        ) as response:
            assert response.status == 201
            added = await response.json()
        assert (added["name"], added["status"], added["deleted_at"]) == (
            "ndvi-new",
            "running",
            None,
        )
        assert added["created_at"] == "2027-01-15T08:00:00Z"
        _, listing = await get_json(session, f"{sandbox.api_url}/v0/aoi/{aoi.id}/insights")
        assert listing["insights"][-1] == added
        async with session.patch(
            f"{sandbox.api_url}/_sandbox/insights/{added['id']}",
            json={"status": "completed"},
            headers=KEY,
        ) as response:
            assert response.status == 200
            assert (await response.json())["status"] == "completed"
        async with session.patch(
            f"{sandbox.api_url}/_sandbox/insights/ins-none", json={}, headers=KEY
        ) as response:
            assert response.status == 404
        async with session.post(
            f"{sandbox.api_url}/_sandbox/insights", json={"status": "bogus"}, headers=KEY
        ) as response:
            assert response.status == 400
        async with session.post(f"{sandbox.api_url}/_sandbox/insights", json={}) as response:
            assert response.status == 403
        body = {
            "inputs": [a if isinstance(a, str) else a["name"] for a in added["input"]],
            "outputs": [a if isinstance(a, str) else a["name"] for a in added["output"]],
        }
        url = f"{sandbox.api_url}/v0/aoi/{aoi.id}/insights/{added['id']}/download"
        async with session.put(url, json=body, headers=KEY) as response:
            assert response.status == 200
        # Python API: delete it
        _, changed = sandbox.listing.update_insight(added["id"], deleted=True)
        assert changed.deleted_at == "2027-01-15T08:00:00Z"


async def test_new_insight_every_follows_the_sandbox_clock(
    make_config: Callable[..., SandboxConfig],
    session: aiohttp.ClientSession,
    clock: SandboxClock,
) -> None:
    async with Sandbox(make_config(new_insight_every=60.0)) as sandbox:
        before = [len(a.insights) for a in sandbox.catalog.aois]
        await get_json(session, f"{sandbox.api_url}/v0/aois")
        assert [len(a.insights) for a in sandbox.catalog.aois] == before
        clock.advance(150)
        await get_json(session, f"{sandbox.api_url}/v0/aois")
        grown = [len(a.insights) for a in sandbox.catalog.aois]
        assert grown == [before[0] + 1, before[1] + 1, *before[2:]]
        new = [sandbox.catalog.aois[0].insights[-1], sandbox.catalog.aois[1].insights[-1]]
        assert [(i.status, i.created_at) for i in new] == [
            ("completed", "2027-01-15T08:02:30Z"),
            ("completed", "2027-01-15T08:02:30Z"),
        ]


async def test_listing_faults(
    make_config: Callable[..., SandboxConfig], session: aiohttp.ClientSession
) -> None:
    script = FaultScript(
        [
            Rule(Fault.REPEAT_PAGE, "listing", route="aois", nth=(2,)),
            Rule(Fault.TOTAL_CHANGE, "listing", route="aois", nth=(3,), delta=7),
            Rule(Fault.HTML, "listing", route="aois", nth=(4,)),
            Rule(Fault.HTTP_ERROR, "listing", route="insights", status=502, nth=(1,)),
        ]
    )
    async with Sandbox(make_config(aoi_count=250)) as sandbox:
        sandbox.faults.add(script)
        base = f"{sandbox.api_url}/v0/aois?limit=100&offset="
        _, first = await get_json(session, base + "0")
        _, repeated = await get_json(session, base + "100")
        assert repeated["aois"] == first["aois"]
        assert repeated["pagination"]["offset"] == 100
        _, changed = await get_json(session, base + "200")
        assert changed["pagination"]["total"] == 257
        status, html = await get_json(session, base + "0")
        assert status == 200 and html.startswith(b"<!DOCTYPE html>")
        aoi = sandbox.catalog.aois[0].id
        status, _ = await get_json(session, f"{sandbox.api_url}/v0/aoi/{aoi}/insights")
        assert status == 502
        status, _ = await get_json(session, f"{sandbox.api_url}/v0/aoi/{aoi}/insights")
        assert status == 200
        assert [r.fault for r in sandbox.requests_to("api", "GET")] == [
            "",
            "repeat_page",
            "total_change",
            "html",
            "http_error",
            "",
        ]


def test_rule_checks_listing_fields() -> None:
    with pytest.raises(ValueError, match="route is for listing"):
        Rule(Fault.HTML, "api", route="aois")
    with pytest.raises(ValueError, match="for listing"):
        Rule(Fault.REPEAT_PAGE, "api")
    with pytest.raises(ValueError, match="AOI pages"):
        Rule(Fault.TOTAL_CHANGE, "listing", route="insights")
    assert FaultScript.from_dict(
        {"rules": [{"origin": "listing", "route": "aois", "fault": "repeat_page", "nth": 2}]}
    ).rules[0] == Rule(Fault.REPEAT_PAGE, "listing", route="aois", nth=(2,))


async def test_listing_shares_the_rate_limit(
    make_config: Callable[..., SandboxConfig], session: aiohttp.ClientSession
) -> None:
    async with Sandbox(make_config(rate=1.0, burst=1)) as sandbox:
        assert (await get_json(session, f"{sandbox.api_url}/v0/aois"))[0] == 200
        status, body = await get_json(session, f"{sandbox.api_url}/v0/aois")
        assert status == 429 and body["error"]["code"] == "rate_limited"
