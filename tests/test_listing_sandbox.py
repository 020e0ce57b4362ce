"""The listing client against the sandbox over loopback: counts at the server, paging faults."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from batch_export.api import PixxelClient, encode_segment
from batch_export.clock import SystemClock
from batch_export.http import open_sessions
from batch_export.listing import SelectorListing, api_fetch, list_selectors
from batch_export.ratelimit import RateLimiter
from batch_export.sandbox import Catalog, Fault, FaultScript, Rule, Sandbox, SandboxConfig

pytestmark = pytest.mark.anyio

KEY = "listing-key-9d2f"
CATALOG = Catalog.generate(0, 250)
DENIED = CATALOG.aois[7].id


@dataclass(frozen=True)
class Sel:
    index: int
    aois: tuple[str, ...] | None = None
    all_aois: bool = False
    projects: tuple[str, ...] | None = None


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    config = SandboxConfig(keys=(KEY,), rate=None, aoi_count=250, denied_aois=frozenset({DENIED}))
    async with Sandbox(config) as sb:
        yield sb


async def run_listing(
    sandbox: Sandbox, selectors: list[Sel], *, retries: int = 2
) -> tuple[tuple[SelectorListing, ...], int]:
    clock = SystemClock()
    async with open_sessions(api_connections=8, storage_connections=1, environ={}) as sessions:
        client = PixxelClient(
            sessions.api,
            base_url=sandbox.api_url,
            api_key=KEY,
            limiter=RateLimiter(1000.0, clock=clock),
            clock=clock,
            retries=retries,
            read_timeout=5.0,
            backoff_base=0.001,
            backoff_cap=0.005,
        )
        fetch = api_fetch(client, deadline=clock.monotonic() + 60)
        result = await list_selectors(fetch, selectors, encode=encode_segment)
    await sandbox.idle()
    return result, client.stats.sent


async def test_three_selectors_list_each_aoi_once_and_every_request_counts(
    sandbox: Sandbox,
) -> None:
    project = CATALOG.aois[0].project_id
    selectors = [
        Sel(0, aois=(CATALOG.aois[0].id, DENIED)),
        Sel(1, all_aois=True),
        Sel(2, projects=(project,)),
    ]
    result, sent = await run_listing(sandbox, selectors)
    gets = sandbox.requests_to("api", "GET")
    assert sent == len(gets) == len(sandbox.requests)
    pages = [r for r in gets if r.path == "/v0/aois"]
    in_project = [a for a in CATALOG.aois if a.project_id == project and a.id != DENIED]
    assert [r.query for r in pages] == [
        "offset=0&limit=100",
        "offset=100&limit=100",
        "offset=200&limit=100",
        f"offset=0&limit=100&project_ids={project}",
    ]
    assert len(in_project) <= 100
    listed = sorted(r.path for r in gets if r.path != "/v0/aois")
    assert listed == sorted(f"/v0/aoi/{a.id}/insights" for a in CATALOG.aois)  # once each
    assert [a.aoi_id for a in result[1].aois] == [a.id for a in CATALOG.aois if a.id != DENIED]
    assert [a.aoi_id for a in result[2].aois] == [a.id for a in in_project]
    first, denied = result[0].aois
    assert first.error is None and [i["id"] for i in first.insights] == [
        i.id for i in CATALOG.aois[0].insights
    ]
    assert denied.insights == () and denied.error is not None
    assert (denied.error.code, denied.error.http_status) == ("permission_denied", 403)
    assert all(s.error is None for s in result)


@pytest.mark.parametrize(
    ("rule", "code", "kept", "pages"),
    [
        (Rule(Fault.REPEAT_PAGE, "listing", route="aois", nth=(2,)), "paging_repeat", 100, 2),
        (
            Rule(Fault.TOTAL_CHANGE, "listing", route="aois", nth=(3,), delta=3),
            "paging_total_changed",
            200,
            3,
        ),
        (
            Rule(Fault.HTTP_ERROR, "listing", route="aois", status=503, nth=(2, 3, 4)),
            "http_503",
            100,
            4,
        ),
        (Rule(Fault.HTML, "listing", route="aois", nth=(2, 3, 4)), "html_body", 100, 4),
    ],
)
async def test_paging_faults_end_as_one_clear_selector_error(
    sandbox: Sandbox, rule: Rule, code: str, kept: int, pages: int
) -> None:
    sandbox.faults.add(FaultScript([rule]))
    result, sent = await run_listing(sandbox, [Sel(0, all_aois=True), Sel(1, aois=("x",))])
    listing = result[0]
    assert listing.error is not None and listing.error.code == code, listing.error
    assert len(listing.aois) == kept  # the pages read before the fault are still listed
    assert all(a.error is None for a in listing.aois)
    page_requests = [r for r in sandbox.requests_to("api", "GET") if r.path == "/v0/aois"]
    assert len(page_requests) == pages
    assert sent == len(sandbox.requests)
    assert result[1].aois[0].error is not None  # unknown AOI: its own error, not the paging's
    assert result[1].aois[0].error.code == "not_found"
