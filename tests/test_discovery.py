"""Discovery's pure core: listed insights + a selector -> actions and jobs; path clashes (SPEC §7)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batch_export.discovery import (
    NO_LISTED_ASSETS,
    PATH_CLASH,
    Action,
    Failure,
    Merged,
    Planned,
    Resolved,
    merge,
    resolve,
)
from batch_export.lifecycle import job_key
from batch_export.manifest import (
    ALL,
    DEFAULT_PATH_TEMPLATE,
    DiscoverSelector,
    ExportSpec,
    parse_manifest,
)

UTC = dt.UTC
NOW = dt.datetime(2026, 12, 1, 3, 0, tzinfo=UTC)
READY = ("ready", "completed", "success")


def insight(**fields: Any) -> dict[str, Any]:
    """A listed insight as the API documents it; ``fields`` replace or add keys."""
    base: dict[str, Any] = {
        "id": "ins-1",
        "name": "ndvi-north",
        "status": "completed",
        "aoi_id": "aoi-1",
        "created_at": "2026-11-30T22:10:04Z",
        "deleted_at": None,
        "input": [{"name": "scene_a", "format": "tif", "type": "raster", "value": None}],
        "output": [{"name": "ndvi"}, {"name": "cloud_mask"}],
    }
    base.update(fields)
    return base


def selector(**fields: Any) -> DiscoverSelector:
    values: dict[str, Any] = {"index": 0, "all_aois": True, "inputs": ALL, "outputs": ALL}
    values.update(fields)
    return DiscoverSelector(**values)


def one(item: Any, sel: DiscoverSelector | None = None, **kwargs: Any) -> Resolved:
    options: dict[str, Any] = {
        "now": NOW,
        "path_template": DEFAULT_PATH_TEMPLATE,
        "ready_statuses": READY,
    }
    options.update(kwargs)
    (result,) = resolve(sel or selector(), "aoi-1", [item], **options)
    return result


# -- the rules, one row each -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sel", "item", "action", "reason"),
    [
        (selector(), insight(), Action.EXPORT, ""),
        (selector(), insight(status="COMPLETED"), Action.EXPORT, ""),
        (selector(), insight(status="Ready"), Action.EXPORT, ""),
        (
            selector(),
            insight(status="running"),
            Action.NOT_READY,
            'status "running" is not a ready status',
        ),
        (
            selector(),
            insight(status="failed"),
            Action.NOT_READY,
            'status "failed" is not a ready status',
        ),
        (selector(), insight(status=None), Action.NOT_READY, "status is missing or null"),
        (
            selector(),
            {k: v for k, v in insight().items() if k != "status"},
            Action.NOT_READY,
            "status is missing or null",
        ),
        (selector(), insight(status=3), Action.NOT_READY, "status is the number 3"),
        (
            selector(statuses=("done",)),
            insight(status="DONE"),
            Action.EXPORT,
            "",
        ),
        (
            selector(statuses=("done",)),
            insight(status="completed"),
            Action.FILTERED_OUT,
            'status "completed" is not in the selector\'s status list',
        ),
        (
            selector(statuses=("done",)),
            insight(status="running"),
            Action.NOT_READY,
            'status "running" is not in the selector\'s status list',
        ),
        (
            selector(),
            insight(deleted_at="2026-11-30T23:00:00Z"),
            Action.DELETED,
            'deleted_at is "2026-11-30T23:00:00Z"',
        ),
        (selector(), insight(deleted_at=True), Action.DELETED, "deleted_at is the boolean true"),
        (selector(), insight(deleted_at={}), Action.DELETED, "deleted_at is an object"),
        (selector(), insight(deleted_at=0), Action.DELETED, "deleted_at is the number 0"),
        (selector(), insight(deleted_at=""), Action.EXPORT, ""),
        (
            selector(),
            insight(status="running", deleted_at="x"),
            Action.DELETED,
            'deleted_at is "x"',
        ),
        (
            selector(created_after=dt.datetime(2026, 11, 30, 22, 10, 4, tzinfo=UTC)),
            insight(),
            Action.EXPORT,
            "",
        ),
        (
            selector(created_after=dt.datetime(2026, 11, 30, 22, 10, 5, tzinfo=UTC)),
            insight(),
            Action.FILTERED_OUT,
            "created 2026-11-30T22:10:04Z, before 2026-11-30T22:10:05Z (created_after)",
        ),
        (
            selector(created_within=5 * 3600.0),
            insight(created_at="2026-11-30T22:00:00Z"),
            Action.EXPORT,
            "",
        ),
        (
            selector(created_within=5 * 3600.0),
            insight(created_at="2026-11-30T21:59:59.999Z"),
            Action.FILTERED_OUT,
            "created 2026-11-30T21:59:59.999000Z, before 2026-11-30T22:00:00Z (created_after)",
        ),
        (
            selector(created_within=3600.0),
            insight(created_at="2026-12-01T04:30:00+02:00"),
            Action.EXPORT,
            "",
        ),
        (
            selector(created_within=3600.0),
            insight(created_at="yesterday"),
            Action.FILTERED_OUT,
            'created_at is "yesterday", so created_after cannot be checked',
        ),
        (
            selector(created_within=3600.0),
            insight(created_at=1764554400),
            Action.FILTERED_OUT,
            "created_at is the number 1764554400, so created_after cannot be checked",
        ),
        (
            selector(created_within=3600.0, statuses=("completed",)),
            {k: v for k, v in insight().items() if k != "created_at"},
            Action.FILTERED_OUT,
            "created_at is missing or null, so created_after cannot be checked",
        ),
        (selector(created_within=1e300), insight(), Action.EXPORT, ""),
        (selector(name_glob="ndvi-*"), insight(), Action.EXPORT, ""),
        (
            selector(name_glob="NDVI-*"),
            insight(),
            Action.FILTERED_OUT,
            'name "ndvi-north" does not match name_glob "NDVI-*"',
        ),
        (
            selector(name_glob="*"),
            insight(name=None),
            Action.FILTERED_OUT,
            "name is missing or null, so name_glob cannot match it",
        ),
        (
            selector(name_glob="[a-m]*"),
            insight(status="running"),
            Action.FILTERED_OUT,
            'name "ndvi-north" does not match name_glob "[a-m]*"',
        ),
        (selector(), insight(id=""), Action.INVALID, "the listing gives no usable id (empty)"),
        (
            selector(),
            insight(id=12),
            Action.INVALID,
            "the listing gives no usable id (the number 12)",
        ),
        (selector(), insight(id=["a"]), Action.INVALID, "the listing gives no usable id (a list)"),
        (
            selector(),
            {"name": "x"},
            Action.INVALID,
            "the listing gives no usable id (missing or null)",
        ),
        (selector(), "ins-1", Action.INVALID, "the listing entry is not a JSON object"),
        (selector(), None, Action.INVALID, "the listing entry is not a JSON object"),
        (
            selector(name="{created_date}-{insight_name}"),
            insight(created_at=None),
            Action.INVALID,
            "created_at is missing or null, and the name or path template uses {created_date}",
        ),
        (
            selector(),
            insight(id="x" * 300),
            Action.INVALID,
            'no output path can be made for it: the output path component "'
            + "x" * 40
            + '…" is 300 bytes long; the limit is 255 (shorten the id or set name)',
        ),
    ],
)
def test_rules(sel: DiscoverSelector, item: Any, action: Action, reason: str) -> None:
    result = one(item, sel)
    assert (result.action, result.reason) == (action, reason)
    assert (result.spec is not None) == (action is Action.EXPORT)
    assert result.failure is None


def test_an_export_is_the_same_job_as_the_explicit_entry_for_it() -> None:
    result = one(insight(), selector(index=3, aois=("aoi-1",), all_aois=False, line=9))
    assert result.spec == ExportSpec(
        aoi_id="aoi-1",
        insight_id="ins-1",
        inputs=("scene_a",),
        outputs=("ndvi", "cloud_mask"),
        name="ins-1",
        relpath="aoi-1/ins-1/ins-1.zip",
        line=9,
        source="discover[3]",
    )
    explicit = parse_manifest(
        "version: 1\nexports: [{aoi_id: aoi-1, insight_id: ins-1, inputs: [scene_a], "
        "outputs: [ndvi, cloud_mask]}]\n",
        path=Path("m.yaml"),
    ).exports[0]
    assert job_key(result.spec) == job_key(explicit)
    assert (result.insight_id, result.name, result.status) == ("ins-1", "ndvi-north", "completed")


def test_results_follow_the_listing_order_with_positions() -> None:
    items = [insight(id="a"), insight(id="b", status="running"), "junk", insight(id="d")]
    results = resolve(
        selector(),
        "aoi-1",
        items,
        now=NOW,
        path_template=DEFAULT_PATH_TEMPLATE,
        ready_statuses=READY,
    )
    assert [(r.position, r.insight_id, r.action) for r in results] == [
        (0, "a", Action.EXPORT),
        (1, "b", Action.NOT_READY),
        (2, None, Action.INVALID),
        (3, "d", Action.EXPORT),
    ]
    assert (
        resolve(selector(), "aoi-1", [], now=NOW, path_template="{name}", ready_statuses=READY)
        == ()
    )


# -- assets ----------------------------------------------------------------------------------------


def test_all_takes_listed_names_in_order_deduplicated() -> None:
    listed = [
        {"name": "b", "format": "tif"},
        "a",
        {"name": "b"},
        {"name": ""},
        {"name": 3},
        {"format": "tif"},
        "",
        7,
        None,
        ["x"],
        "c",
    ]
    result = one(insight(input=listed, output="not a list"))
    assert result.spec is not None
    assert result.spec.inputs == ("b", "a", "c")
    assert result.spec.outputs == ()
    assert result.failure is None


def test_selector_lists_are_sent_as_given() -> None:
    result = one(insight(input=[], output=[]), selector(inputs=("s",), outputs=()))
    assert result.spec is not None
    assert (result.spec.inputs, result.spec.outputs) == (("s",), ())
    assert result.failure is None


@pytest.mark.parametrize(
    ("inputs", "outputs", "item"),
    [
        (ALL, ALL, insight(input=[], output=[])),
        (ALL, ALL, insight(input=None, output=None)),
        (ALL, (), {k: v for k, v in insight().items() if k not in ("input",)}),
        ((), ALL, insight(output=[{"name": None}])),
    ],
)
def test_no_listed_assets_is_an_export_that_fails(
    inputs: Any, outputs: Any, item: dict[str, Any]
) -> None:
    result = one(item, selector(index=4, inputs=inputs, outputs=outputs))
    assert result.action is Action.EXPORT
    assert result.spec is not None
    assert (result.spec.inputs, result.spec.outputs) == ((), ())
    assert result.spec.relpath == "aoi-1/ins-1/ins-1.zip"
    assert result.failure == Failure(
        NO_LISTED_ASSETS,
        "the request would carry no inputs and no outputs: the listing names no assets for this "
        "insight where discover[4] asks for all",
    )


# -- names and paths -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name_template", "path_template", "item", "name", "relpath"),
    [
        (
            "{insight_name}",
            DEFAULT_PATH_TEMPLATE,
            insight(),
            "ndvi-north",
            "aoi-1/ins-1/ndvi-north.zip",
        ),
        (
            "{insight_name}",
            DEFAULT_PATH_TEMPLATE,
            insight(name=""),
            "ins-1",
            "aoi-1/ins-1/ins-1.zip",
        ),
        (
            "{insight_name}",
            DEFAULT_PATH_TEMPLATE,
            insight(name=["x"]),
            "ins-1",
            "aoi-1/ins-1/ins-1.zip",
        ),
        (
            "{insight_name}",
            DEFAULT_PATH_TEMPLATE,
            insight(name="../../etc/passwd"),
            "../../etc/passwd",
            "aoi-1/ins-1/.._.._etc_passwd.zip",
        ),
        (
            "{insight_name}",
            DEFAULT_PATH_TEMPLATE,
            insight(name="con"),
            "con",
            "aoi-1/ins-1/_con.zip",
        ),
        (
            "{created_date}_{insight_id}",
            "{name}.zip",
            insight(created_at="2026-11-30T23:30:00-02:00"),
            "2026-12-01_ins-1",
            "2026-12-01_ins-1.zip",
        ),
        (
            "{insight_id}",
            "{created_date}/{insight_name}/{name}.zip",
            insight(created_at="2026-11-30T22:10:04.123456+00:00", name="a\x07b"),
            "ins-1",
            "2026-11-30/ab/ins-1.zip",
        ),
        (
            "{insight_id}",
            "{created_date}.zip",
            insight(created_at="2026-11-30"),
            "ins-1",
            "2026-11-30.zip",
        ),
        ("{{{aoi_id}}}", "{name}.zip", insight(), "{aoi-1}", "{aoi-1}.zip"),
        (
            "{insight_name}",
            "{aoi_id}/{insight_id}/{name}.zip",
            insight(id="..", name=""),
            "..",
            "aoi-1/_/_.zip",
        ),
    ],
)
def test_name_and_path(
    name_template: str, path_template: str, item: dict[str, Any], name: str, relpath: str
) -> None:
    result = one(item, selector(name=name_template), path_template=path_template)
    assert result.spec is not None, result.reason
    assert (result.spec.name, result.spec.relpath) == (name, relpath)


def test_created_date_in_the_path_without_a_created_at() -> None:
    result = one(insight(created_at="30 Nov"), path_template="{created_date}/{name}.zip")
    assert result.action is Action.INVALID
    assert result.reason == (
        'created_at is "30 Nov", and the name or path template uses {created_date}'
    )


def test_a_template_the_validator_would_refuse_makes_every_insight_invalid() -> None:
    results = resolve(
        selector(), "a", [insight(), 1], now=NOW, path_template="/abs/{name}", ready_statuses=READY
    )
    assert [r.action for r in results] == [Action.INVALID, Action.INVALID]
    assert (
        results[0].reason == "the path template must be relative to the output dir (no leading /)"
    )


def test_naive_now_is_utc() -> None:
    sel = selector(created_within=3600.0)
    item = insight(created_at="2026-12-01T02:00:00Z")
    assert one(item, sel, now=dt.datetime(2026, 12, 1, 3, 0)).action is Action.EXPORT
    assert one(item, sel, now=dt.datetime(2026, 12, 1, 3, 0, 1)).action is Action.FILTERED_OUT


def test_huge_values_are_quoted_short() -> None:
    big = "s" * 5_000_000
    result = one(insight(status=big))
    assert result.action is Action.NOT_READY
    assert result.reason == f'status "{"s" * 60}"… (5,000,000 characters) is not a ready status'
    result = one(insight(name=big), selector(name_glob="n*"))
    assert (
        result.reason == f'name "{"s" * 60}"… (5,000,000 characters) does not match name_glob "n*"'
    )


# -- hostile listings, as properties ----------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
DATES = st.one_of(
    JSON,
    st.datetimes(timezones=st.none() | st.just(UTC)).map(lambda d: d.isoformat()),
    st.sampled_from(
        ["2026-11-30T22:10:04Z", "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"]
    ),
)
INSIGHTS = st.one_of(
    JSON,
    st.fixed_dictionaries(
        {},
        optional={
            "id": st.one_of(JSON, st.text(min_size=1, max_size=300)),
            "name": st.one_of(JSON, st.text(max_size=300)),
            "status": st.one_of(JSON, st.sampled_from(["completed", "READY", "running", "failed"])),
            "created_at": DATES,
            "deleted_at": st.one_of(st.none(), st.just(""), JSON),
            "input": st.one_of(JSON, st.lists(st.one_of(st.text(max_size=5), JSON), max_size=5)),
            "output": st.one_of(JSON, st.lists(st.fixed_dictionaries({"name": JSON}), max_size=3)),
        },
    ),
)
SELECTORS = st.builds(
    DiscoverSelector,
    index=st.integers(0, 3),
    all_aois=st.just(True),
    statuses=st.none() | st.just(("completed",)),
    created_after=st.none() | st.datetimes(timezones=st.just(UTC)),
    created_within=st.none() | st.floats(1, 1e12),
    name_glob=st.none() | st.sampled_from(["*", "n*", "[!a]*", "**?"]),
    inputs=st.sampled_from([ALL, (), ("s",)]),
    outputs=st.sampled_from([ALL, ("o",)]),
    name=st.sampled_from(["{insight_id}", "{insight_name}", "{created_date}-{insight_name}"]),
)


@settings(max_examples=300, deadline=None)
@given(sel=SELECTORS, items=st.lists(INSIGHTS, max_size=5))
def test_hostile_listings_give_one_clear_result_each(
    sel: DiscoverSelector, items: list[Any]
) -> None:
    results = resolve(
        sel,
        "aoi-1",
        items,
        now=NOW,
        path_template="{aoi_id}/{created_date}/{insight_name}/{name}.zip",
        ready_statuses=READY,
    )
    assert len(results) == len(items)
    for position, (result, item) in enumerate(zip(results, items, strict=True)):
        assert result.position == position
        assert isinstance(result.action, Action) and result.action is not Action.DONE
        assert "\n" not in result.reason and len(result.reason) < 600
        assert (result.action is Action.EXPORT) == (result.spec is not None)
        assert (result.action is Action.EXPORT) == (result.reason == "")
        if result.action is Action.DELETED:
            assert item["deleted_at"] not in (None, "")
        if result.spec is None:
            assert result.failure is None
            continue
        spec = result.spec
        assert isinstance(item, dict)
        assert spec.insight_id == item["id"] and spec.aoi_id == "aoi-1"
        assert item.get("deleted_at") in (None, "")
        assert str(item.get("status")).lower() in (sel.statuses or READY)
        assert all(isinstance(a, str) and a for a in spec.inputs + spec.outputs)
        assert len(set(spec.inputs)) == len(spec.inputs)
        assert spec.source == f"discover[{sel.index}]"
        parts = PurePosixPath(spec.relpath).parts
        assert not spec.relpath.startswith("/") and ".." not in parts and "." not in parts
        assert all(len(p.encode("utf-8", "surrogatepass")) <= 255 for p in parts)
        assert (result.failure is not None) == (not spec.inputs and not spec.outputs)


# -- merging with the explicit entries ---------------------------------------------------------------


def spec(
    insight_id: str, relpath: str, source: str, outputs: tuple[str, ...] = ("o",)
) -> ExportSpec:
    return ExportSpec("a", insight_id, (), outputs, insight_id, relpath, 0, source)


def found(*specs: ExportSpec, failure: Failure | None = None) -> list[Resolved]:
    return [
        Resolved(n, s.insight_id, None, "ready", Action.EXPORT, spec=s, failure=failure)
        for n, s in enumerate(specs)
    ]


def test_merge_keeps_distinct_jobs_and_skips_non_exports() -> None:
    d1, d2 = spec("i1", "a/i1.zip", "discover[0]"), spec("i2", "a/i2.zip", "discover[0]")
    skipped = Resolved(5, "x", None, "running", Action.NOT_READY, "status")
    assert merge([spec("e", "a/e.zip", "exports[0]")], [*found(d1), skipped, *found(d2)]) == Merged(
        (Planned(d1), Planned(d2)), ()
    )


def test_explicit_wins_a_path_clash_and_identical_jobs_are_merged() -> None:
    explicit = [spec("i1", "a/i1.zip", "exports[3]")]
    same = spec("i1", "a/i1.zip", "discover[0]")
    other = spec("i9", "a/i1.zip", "discover[1]")
    selection = spec("i1", "a/i1.zip", "discover[2]", outputs=("p",))
    result = merge(explicit, found(same, other, selection))
    assert result.merged == ((same, "exports[3]"),)
    clash = (
        'output path "a/i1.zip" is also the output path of exports[3] (aoi "a", insight "i1"); '
        "set a distinct name template or output.path"
    )
    assert result.jobs == (
        Planned(other, Failure(PATH_CLASH, clash)),
        Planned(selection, Failure(PATH_CLASH, clash)),
    )


def test_the_earlier_discovered_job_wins_over_a_later_one() -> None:
    first = spec("i1", "a/n.zip", "discover[0]")
    again = spec("i1", "a/n.zip", "discover[1]")
    later = spec("i2", "a/n.zip", "discover[1]")
    result = merge([], found(first, again, later))
    assert result.merged == ((again, "discover[0]"),)
    assert result.jobs == (
        Planned(first),
        Planned(
            later,
            Failure(
                PATH_CLASH,
                'output path "a/n.zip" is also the output path of discover[0] (aoi "a", insight '
                '"i1"); set a distinct name template or output.path',
            ),
        ),
    )


def test_a_failing_job_keeps_its_failure_unless_it_clashes() -> None:
    empty = spec("i1", "a/i1.zip", "discover[0]", outputs=())
    failure = Failure(NO_LISTED_ASSETS, "none")
    assert merge([], found(empty, failure=failure)).jobs == (Planned(empty, failure),)


@pytest.mark.parametrize(
    ("explicit_path", "discovered_path", "how"),
    [
        ("a/b", "a/b/c.zip", "lies inside the output path of"),
        ("a/b/c.zip", "a/b", "is a folder in the output path of"),
        ("a/x.zip", "a/x.zip.part", "is the download file (.part) of"),
        ("a/x.zip.part", "a/x.zip", "has its download file (.part) at the output path of"),
        ("a/x.zip.part/y", "a/x.zip", "with .part is a folder in the output path of"),
        ("a/x.zip", "a/x.zip.part/y", "lies inside the download file (.part) of"),
    ],
)
def test_folder_and_part_clashes_fail_the_discovered_job(
    explicit_path: str, discovered_path: str, how: str
) -> None:
    explicit = spec("e", explicit_path, "exports[0]")
    discovered = spec("d", discovered_path, "discover[0]")
    result = merge([explicit], found(discovered))
    assert result.jobs == (
        Planned(
            discovered,
            Failure(
                PATH_CLASH,
                f'output path "{discovered_path}" {how} exports[0] (aoi "a", insight "e"); set a '
                "distinct name template or output.path",
            ),
        ),
    )


def test_case_only_differences_are_not_clashes() -> None:
    d = spec("d", "A/X.zip", "discover[0]")
    assert merge([spec("e", "a/x.zip", "exports[0]")], found(d)).jobs == (Planned(d),)
