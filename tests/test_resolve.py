"""Resolving discover: selectors into a run's jobs (batch_export.resolve) with a scripted fetcher."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from batch_export.errors import ApiError
from batch_export.lifecycle import job_key, shard_of
from batch_export.manifest import parse_manifest
from batch_export.pace import Tally
from batch_export.resolve import discover
from batch_export.types import DEFAULT_READY_STATUSES, DiscoveryEntry, Problem

pytestmark = pytest.mark.anyio

NOW = dt.datetime(2026, 12, 1, 3, 0, tzinfo=dt.UTC)


def insight(ident: str, status: str = "completed", **extra: Any) -> dict[str, Any]:
    return {
        "id": ident,
        "name": extra.pop("name", f"ndvi-{ident}"),
        "status": status,
        "created_at": "2026-11-30T22:10:04Z",
        "deleted_at": extra.pop("deleted_at", None),
        "input": extra.pop("input", [{"name": "scene_1", "format": "GeoTIFF"}]),
        "output": extra.pop("output", ["ndvi"]),
        **extra,
    }


LISTINGS: dict[str, Any] = {
    "a1": [
        insight("i1"),
        insight("i2", "running"),
        insight("i3", deleted_at="2026-11-30T23:00:00Z"),
        insight("i4", input=[], output=[]),
    ],
    "a2": [insight("i5", name="other-5"), insight("i6")],
}


class Api:
    def __init__(self, errors: Mapping[str, Exception] | None = None) -> None:
        self.errors = dict(errors or {})
        self.calls: list[str] = []

    async def __call__(
        self, path: str, params: Mapping[str, str], validate: Callable[[Any], None]
    ) -> Any:
        self.calls.append(path)
        if path in self.errors:
            raise self.errors[path]
        if path == "/v0/aois":
            aois = [{"aoi_id": a} for a in LISTINGS]
            doc: Any = {"aois": aois, "pagination": {"limit": 100, "offset": 0, "total": 2}}
        else:
            doc = {"insights": LISTINGS[path.split("/")[3]]}
        validate(doc)
        return doc


def manifest(text: str) -> Any:
    return parse_manifest("version: 1\n" + text, path=Path("/srv/m.yaml"))


async def test_jobs_entries_and_preset_failures() -> None:
    m = manifest(
        """exports:
  - {aoi_id: a2, insight_id: i6, outputs: [ndvi]}
discover:
  - aois: all
    name_glob: "ndvi-*"
    inputs: all
    outputs: all
  - aois: [a2, a9]
    outputs: all
"""
    )
    api = Api({"/v0/aoi/a9/insights": ApiError("no", code="permission_denied", http_status=403)})
    found = await discover(
        api, m, explicit=m.exports, now=NOW, ready_statuses=DEFAULT_READY_STATUSES
    )
    jobs = found.discovered
    assert [(s.source, s.aoi_id, s.insight_id) for s in jobs.specs] == [
        ("discover[0]", "a1", "i1"),
        ("discover[0]", "a1", "i4"),
        ("discover[0]", "a2", "i6"),
        ("discover[1]", "a2", "i5"),
    ]
    assert jobs.sources == ("discover[0]", "discover[0]", "discover[0]", "discover[1]")
    assert {i: p.code for i, p in jobs.failures.items()} == {
        1: "no_listed_assets",  # a1/i4 lists no assets
        2: "path_clash",  # a2/i6 has the explicit entry's path with another selection
    }
    # discover[1]'s a2/i6 is the explicit entry itself (same selection and path): merged, no job
    assert jobs.entries == (
        DiscoveryEntry(0, "a1", listed=4, selected=2),
        DiscoveryEntry(0, "a2", listed=2, selected=1),
        DiscoveryEntry(1, "a2", listed=2, selected=2),
        DiscoveryEntry(1, "a9", error=Problem("permission_denied", "no", 403)),
    )
    assert sorted(api.calls) == sorted(
        ["/v0/aois", "/v0/aoi/a1/insights", "/v0/aoi/a2/insights", "/v0/aoi/a9/insights"]
    )
    actions = [[str(r.action) for r in v.insights] for v in found.views]
    assert actions == [
        ["export", "not_ready", "deleted", "export"],
        ["filtered_out", "export"],
        ["export", "export"],
        [],
    ]


async def test_a_paging_failure_is_an_entry_without_an_aoi() -> None:
    m = manifest("discover:\n  - {aois: all, outputs: all}\n")
    api = Api({"/v0/aois": ApiError("bad key", code="invalid_api_key", http_status=403)})
    found = await discover(api, m, explicit=(), now=NOW, ready_statuses=DEFAULT_READY_STATUSES)
    assert found.discovered.specs == ()
    assert found.discovered.entries == (
        DiscoveryEntry(0, None, error=Problem("invalid_api_key", "bad key", 403)),
    )
    assert api.calls == ["/v0/aois"]


async def test_keep_takes_one_shard() -> None:
    m = manifest("discover:\n  - {aois: all, outputs: all}\n")
    every = await discover(Api(), m, explicit=(), now=NOW, ready_statuses=DEFAULT_READY_STATUSES)
    shards = []
    for index in range(2):
        found = await discover(
            Api(),
            m,
            explicit=(),
            now=NOW,
            ready_statuses=DEFAULT_READY_STATUSES,
            keep=lambda spec, k=index: shard_of(job_key(spec), 2) == k,
        )
        shards.append({job_key(s) for s in found.discovered.specs})
    assert shards[0] | shards[1] == {job_key(s) for s in every.discovered.specs}
    assert not shards[0] & shards[1]


def test_progress_tally_counts_discovered_jobs_as_queued() -> None:
    tally = Tally(total=1, clock=lambda: 0.0, request_rate=lambda: 1.0)
    tally.add_jobs(3)
    assert tally.snapshot().counts["queued"] == 4
