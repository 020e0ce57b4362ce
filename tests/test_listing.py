"""The listing client's paging rules and per-AOI errors (SPEC §7), with a scripted fetcher."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pytest

from batch_export.errors import ApiError, RetriesExhausted
from batch_export.listing import (
    AoiListing,
    AoiPager,
    ListingError,
    PagingError,
    SelectorListing,
    check_aoi_page,
    check_insights,
    list_selectors,
)

pytestmark = pytest.mark.anyio


@dataclass(frozen=True)
class Sel:
    index: int
    aois: tuple[str, ...] | None = None
    all_aois: bool = False
    projects: tuple[str, ...] | None = None


def page(ids: list[str], total: int, offset: int = 0) -> dict[str, Any]:
    return {
        "aois": [{"aoi_id": i, "name": i} for i in ids],
        "pagination": {"limit": 100, "offset": offset, "total": total},
    }


class Api:
    """A scripted listing API: AOIs in pages, insights per AOI, errors by path."""

    def __init__(self, aois: list[str], **overrides: Any) -> None:
        self.aois = aois
        self.calls: list[tuple[str, dict[str, str]]] = []
        self.page_override: Callable[[int, int], Any] | None = overrides.get("page")
        self.errors: dict[str, Exception] = overrides.get("errors", {})

    async def __call__(
        self, path: str, params: Mapping[str, str], validate: Callable[[Any], None]
    ) -> Any:
        self.calls.append((path, dict(params)))
        if path in self.errors:
            raise self.errors[path]
        if path == "/v0/aois":
            offset, limit = int(params["offset"]), int(params["limit"])
            number = sum(1 for p, _ in self.calls if p == "/v0/aois")
            doc = (
                self.page_override(number, offset)
                if self.page_override
                else page(self.aois[offset : offset + limit], len(self.aois), offset)
            )
        else:
            aoi = path.split("/")[3]
            doc = {"insights": [{"id": f"{aoi}-i1", "name": "n"}]}
        validate(doc)
        return doc


AOIS = [f"aoi-{n:03d}" for n in range(250)]


def encode(value: str) -> str:
    return value


async def test_pages_until_total_then_lists_each_aoi_once() -> None:
    api = Api(AOIS)
    result = await list_selectors(
        api,
        [Sel(0, all_aois=True), Sel(1, aois=("aoi-001", "aoi-001", "x")), Sel(2, all_aois=True)],
        encode=encode,
    )
    pages = [c for c in api.calls if c[0] == "/v0/aois"]
    assert pages == [
        ("/v0/aois", {"offset": "0", "limit": "100"}),
        ("/v0/aois", {"offset": "100", "limit": "100"}),
        ("/v0/aois", {"offset": "200", "limit": "100"}),
    ]
    insight_calls = [c[0] for c in api.calls if c[0] != "/v0/aois"]
    assert sorted(insight_calls) == sorted(f"/v0/aoi/{a}/insights" for a in [*AOIS, "x"])
    assert [a.aoi_id for a in result[0].aois] == AOIS
    assert result[1] == SelectorListing(
        1,
        (
            AoiListing("aoi-001", ({"id": "aoi-001-i1", "name": "n"},)),
            AoiListing("x", ({"id": "x-i1", "name": "n"},)),
        ),
    )
    assert result[2].error is None and len(result[2].aois) == 250


async def test_explicit_aois_send_no_page_and_projects_are_passed() -> None:
    api = Api(AOIS[:3])
    await list_selectors(api, [Sel(0, aois=("a",))], encode=encode)
    assert api.calls == [("/v0/aoi/a/insights", {})]
    api = Api(AOIS[:3])
    await list_selectors(api, [Sel(0, projects=("p1", "p2"))], encode=encode)
    assert api.calls[0] == (
        "/v0/aois",
        {"offset": "0", "limit": "100", "project_ids": "p1,p2"},
    )


async def test_an_empty_page_ends_the_listing() -> None:
    api = Api([], page=lambda n, offset: page(AOIS[:100] if n == 1 else [], 1000, offset))
    result = await list_selectors(api, [Sel(0, all_aois=True)], encode=encode)
    assert len([c for c in api.calls if c[0] == "/v0/aois"]) == 2
    assert result[0].error is None and len(result[0].aois) == 100


@pytest.mark.parametrize(
    ("override", "code", "kept"),
    [
        (lambda n, offset: page(AOIS[:100], 250, offset), "paging_repeat", 100),
        (
            lambda n, offset: page(AOIS[offset : offset + 100], 250 + n, offset),
            "paging_total_changed",
            100,
        ),
    ],
)
async def test_paging_defences_keep_the_pages_read(
    override: Callable[[int, int], Any], code: str, kept: int
) -> None:
    api = Api([], page=override)
    result = await list_selectors(api, [Sel(0, all_aois=True)], encode=encode)
    assert result[0].error is not None and result[0].error.code == code
    assert len([c for c in api.calls if c[0] == "/v0/aois"]) == 2
    assert [a.aoi_id for a in result[0].aois] == AOIS[:kept]


async def test_runaway_paging_stops_at_max_pages() -> None:
    endless = lambda n, offset: page([f"a{offset + i}" for i in range(100)], 10**9, offset)  # noqa: E731
    api = Api([], page=endless)
    result = await list_selectors(api, [Sel(0, all_aois=True)], encode=encode, max_pages=5)
    assert len([c for c in api.calls if c[0] == "/v0/aois"]) == 5
    assert result[0].error == ListingError(
        "paging_runaway", "the AOI listing did not end after 5 pages (500 of 1000000000 AOIs)"
    )
    assert len(result[0].aois) == 500


def test_pager_default_bound_is_ten_thousand_pages() -> None:
    pager = AoiPager()
    for n in range(10_000):
        assert pager.offset == n * 100
        if n == 9_999:
            with pytest.raises(PagingError):
                pager.take(page([f"a{n}-{i}" for i in range(100)], 10**9))
        else:
            pager.take(page([f"a{n}-{i}" for i in range(100)], 10**9))
    assert pager.pages == 10_000 and pager.offset is None


async def test_failures_are_per_selector_and_per_aoi() -> None:
    api = Api(
        AOIS[:3],
        errors={
            "/v0/aoi/aoi-001/insights": ApiError(
                "no permission", code="permission_denied", http_status=403
            )
        },
    )
    result = await list_selectors(api, [Sel(0, all_aois=True)], encode=encode)
    assert result[0].error is None
    assert [a.error for a in result[0].aois] == [
        None,
        ListingError("permission_denied", "no permission", 403),
        None,
    ]
    api = Api(
        AOIS[:3],
        errors={
            "/v0/aois": RetriesExhausted("API answered HTTP 503", code="http_503", http_status=503)
        },
    )
    result = await list_selectors(api, [Sel(0, all_aois=True), Sel(1, aois=("z",))], encode=encode)
    assert result[0] == SelectorListing(
        0, (), ListingError("http_503", "API answered HTTP 503", 503)
    )
    assert result[1].aois[0].error is None


@pytest.mark.parametrize(
    "doc",
    [
        [],
        {"aois": {}},
        {"aois": [{"id": "x"}], "pagination": {"total": 1}},
        {"aois": [{"aoi_id": ""}], "pagination": {"total": 1}},
        {"aois": [], "pagination": {"total": "3"}},
        {"aois": [], "pagination": {"total": True}},
        {"aois": []},
    ],
)
def test_aoi_page_shape(doc: Any) -> None:
    with pytest.raises(ValueError):
        check_aoi_page(doc)


@pytest.mark.parametrize(
    "doc", [None, {"insights": None}, {"insights": ["ins-1"]}, {"insights": [{"id": 3}]}]
)
def test_insight_listing_shape(doc: Any) -> None:
    with pytest.raises(ValueError):
        check_insights(doc)
    check_insights({"insights": [{"id": "x"}]})


@pytest.mark.parametrize(
    ("error", "opens"),
    [
        (RetriesExhausted("cannot connect to api:443", code="network_error"), True),
        (ApiError("key refused", code="unauthorized", http_status=401), True),
    ],
)
async def test_the_breaker_stops_listing_an_unreachable_api(error: Exception, opens: bool) -> None:
    ids = tuple(f"a{n}" for n in range(20))
    api = Api([], errors={f"/v0/aoi/{a}/insights": error for a in ids})
    result = await list_selectors(api, [Sel(0, aois=ids)], encode=encode, concurrency=1)
    errors = [a.error for a in result[0].aois]
    assert all(e is not None and e.code == error.code for e in errors)
    assert len(api.calls) == (3 if opens else 20)
    if opens:
        assert errors[3] is not None and errors[3].message.startswith(
            "not listed: the last 3 listings failed the same way"
        )


async def test_403s_of_one_code_across_aois_are_a_rejected_key() -> None:
    # The job breaker's rule (SPEC §9): 5 in a row across at least 2 AOIs, no success between.
    # Before, a bad key over an aois: [ids] list of 10,000 AOIs sent 10,000 listings.
    refused = ApiError("missing or unknown API key", code="invalid_api_key", http_status=403)
    ids = tuple(f"a{n}" for n in range(20))
    api = Api([], errors={f"/v0/aoi/{a}/insights": refused for a in ids})
    result = await list_selectors(api, [Sel(0, aois=ids)], encode=encode, concurrency=1)
    errors = [a.error for a in result[0].aois]
    assert len(api.calls) == 5
    assert all(
        e is not None and (e.code, e.http_status) == ("invalid_api_key", 403) for e in errors
    )
    assert errors[4] is not None and errors[4].message == "missing or unknown API key"
    assert errors[5] is not None and errors[5].message == (
        "not listed: the last 5 listings across 5 AOIs were refused with HTTP 403 "
        "invalid_api_key, no success between: the API rejects the key? "
        "(missing or unknown API key)"
    )


@pytest.mark.parametrize(
    "between",
    [None, ApiError("no such AOI", code="not_found", http_status=404)],
    ids=["a-success", "a-404"],
)
async def test_an_answer_accepting_the_key_breaks_the_403_streak(between: Exception | None) -> None:
    denied = ApiError("no permission", code="permission_denied", http_status=403)
    other = ApiError("another refusal", code="other_code", http_status=403)
    ids = ("d0", "d1", "d2", "d3", "mid", "d4", "d5", "d6", "x7", "d8", "d9")
    errors: dict[str, Exception] = {f"/v0/aoi/{a}/insights": denied for a in ids if a[0] == "d"}
    errors["/v0/aoi/x7/insights"] = other  # another code: the count starts again
    if between is not None:
        errors["/v0/aoi/mid/insights"] = between
    api = Api([], errors=errors)
    result = await list_selectors(api, [Sel(0, aois=ids)], encode=encode, concurrency=1)
    assert len(api.calls) == len(ids)  # never 5 of one code in a row: every AOI asked
    assert [a.error is None for a in result[0].aois].count(True) == (1 if between is None else 0)


async def test_a_success_between_failures_keeps_the_breaker_closed() -> None:
    down = RetriesExhausted("cannot connect", code="network_error")
    ids = ("a0", "a1", "ok", "a2", "a3", "a4", "a5")
    errors = {f"/v0/aoi/{a}/insights": down for a in ids if a != "ok"}
    api = Api([], errors=errors)
    await list_selectors(api, [Sel(0, aois=ids)], encode=encode, concurrency=1)
    assert len(api.calls) == 6  # a0 a1 ok a2 a3 a4: three in a row after "ok", then no more
