"""The ``discover:`` selectors (SPEC §7): shapes, YAML typing, defaults, every error at once."""

from __future__ import annotations

import datetime as dt

import pytest

from batch_export.manifest import ALL, DiscoverSelector
from tests.test_manifest.helpers import MINIMAL, only_problem, parse, problems

UTC = dt.UTC


def test_a_full_selector_and_the_short_forms() -> None:
    m = parse(
        """\
        version: 1
        discover:
          - aois: ["a", "b", "a"]
            status: [Completed, DONE]
            created_after: "2026-11-01T00:00:00+05:30"
            name_glob: "ndvi-*"
            inputs: all
            outputs: [o, o]
            name: "{insight_name}-{created_date}"
          - aois: all
            created_after: 30d
            outputs: all
          - projects: [p1, p2]
            created_after: 1w2d12h30m15s
            outputs: all
        """
    )
    assert m.exports == ()
    assert m.discover == (
        DiscoverSelector(
            index=0,
            aois=("a", "b"),
            statuses=("completed", "done"),
            created_after=dt.datetime(2026, 10, 31, 18, 30, tzinfo=UTC),
            name_glob="ndvi-*",
            inputs=ALL,
            outputs=("o",),
            name="{insight_name}-{created_date}",
            line=3,
        ),
        DiscoverSelector(
            index=1, all_aois=True, created_within=30 * 86_400.0, outputs=ALL, line=10
        ),
        DiscoverSelector(
            index=2,
            projects=("p1", "p2"),
            created_within=9 * 86_400 + 12 * 3600 + 30 * 60 + 15.0,
            outputs=ALL,
            line=13,
        ),
    )
    assert [s.source for s in m.discover] == ["discover[0]", "discover[1]", "discover[2]"]
    assert m.discover[1].name == "{insight_id}"
    assert m.discover[1].created_after is None


def test_selectors_take_defaults_like_export_entries() -> None:
    m = parse(
        """\
        version: 1
        defaults: {inputs: [scene], outputs: [ndvi]}
        discover:
          - aois: all
          - aois: all
            outputs: all
          - aois: all
            inputs: []
        exports:
          - {aoi_id: a, insight_id: i}
        """
    )
    assert [(s.inputs, s.outputs) for s in m.discover] == [
        (("scene",), ("ndvi",)),
        (("scene",), ALL),
        ((), ("ndvi",)),
    ]
    assert [e.source for e in m.exports] == ["exports[0]"]


def test_every_selector_error_at_once() -> None:
    text = """\
        version: 1
        discover:
          - aois: "all"
            outputs: "all"
          - aois: a
            outputs: all
          - outputs: all
          - aois: all
            projects: [p]
            outputs: all
          - projects: []
            outputs: all
          - aois: all
          - aois: all
            created_after: 2026-11-01T00:00:00Z
            inputs: all
          - aois: all
            created_after: "2026-11-01"
            inputs: all
          - aois: all
            created_after: "2026-11-01T00:00:00"
            inputs: all
          - aois: all
            created_after: "yesterday"
            inputs: all
          - aois: all
            created_after: "2026-13-01T00:00:00Z"
            inputs: all
          - aois: all
            created_after: 0d
            name: "{name}"
            inputs: all
          - aois: [""]
            bogus: 1
            inputs: all
          - x
          - aois: [on]
            status: []
            name_glob: ""
            inputs: everything
            outputs: [1]
        """
    assert problems(text) == [
        "m.yaml:3:11: discover[0].aois: write all without quotes for every AOI the key can list, "
        'or a list such as ["all"] for an id that is the word all',
        "m.yaml:4:14: discover[0].outputs: write all without quotes for every asset the listing "
        'names, or a list such as ["all"] for an id that is the word all',
        "m.yaml:5:11: discover[1].aois: expected a list of AOI ids or the word all, got a string "
        '(write ["a"])',
        "m.yaml:7:5: discover[2]: a selector needs aois: (a list of AOI ids, or all) or projects: "
        "(a list of project ids)",
        "m.yaml:9:15: discover[3]: set aois: or projects:, not both (a selector lists one kind of "
        "thing)",
        "m.yaml:11:15: discover[4].projects: expected at least one id",
        "m.yaml:13:5: discover[5]: nothing selected: inputs and outputs are both empty (set them "
        "here, as lists or all, or in defaults:)",
        "m.yaml:15:20: discover[6].created_after: expected a string; unquoted "
        "2026-11-01T00:00:00Z is read by YAML as the timestamp 2026-11-01T00:00:00+00:00 — quote "
        'it: "2026-11-01T00:00:00Z"',
        "m.yaml:18:20: discover[7].created_after: a time of day and a zone are needed too, such as "
        '"2026-11-01T00:00:00Z"',
        'm.yaml:21:20: discover[8].created_after: "2026-11-01T00:00:00" has no time zone; add Z '
        "(UTC) or an offset such as +05:30",
        "m.yaml:24:20: discover[9].created_after: expected an RFC 3339 time such as "
        '"2026-11-01T00:00:00Z" or an age such as 30d, 12h or 1w, got "yesterday"',
        'm.yaml:27:20: discover[10].created_after: "2026-13-01T00:00:00Z" is not a valid time '
        "(check the month, day and hour)",
        "m.yaml:30:20: discover[11].created_after: an age here must be more than 0",
        "m.yaml:31:11: discover[11].name: unknown field {name} in the name template; the fields "
        "are {aoi_id}, {insight_id}, {insight_name} and {created_date}",
        "m.yaml:33:12: discover[12].aois[0]: an AOI id must not be empty",
        "m.yaml:34:5: discover[12].bogus: unknown key bogus (known keys here: aois, projects, "
        "status, created_after, name_glob, inputs, outputs, name)",
        "m.yaml:36:5: discover[13]: expected a mapping with aois: or projects:, got a string",
        "m.yaml:37:12: discover[14].aois[0]: expected a string; unquoted on is read by YAML as the "
        'boolean true — quote it: "on"',
        "m.yaml:38:13: discover[14].status: expected at least one status",
        "m.yaml:39:16: discover[14].name_glob: name_glob must not be empty",
        'm.yaml:40:13: discover[14].inputs: expected a list, got a string (write ["everything"])',
        "m.yaml:41:15: discover[14].outputs[0]: expected a string; unquoted 1 is read by YAML as "
        'the integer 1 — quote it: "1"',
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("version: 1\n", "m.yaml:1:1: (document): missing required key exports (or discover:)"),
        (
            "version: 1\ndiscover: []\n",
            "m.yaml:2:11: discover: expected at least one selector (or an export)",
        ),
        (
            "version: 1\nexports: []\ndiscover: []\n",
            "m.yaml:2:10: exports: expected at least one export (or a discover: selector)",
        ),
        (
            "version: 1\ndiscover: {}\n",
            "m.yaml:2:11: discover: expected a list of selectors, got a mapping",
        ),
        (
            "version: 1\ndiscover:\n",
            "m.yaml:2:10: discover: expected a list of selectors, got nothing",
        ),
    ],
)
def test_at_least_one_of_exports_and_discover(text: str, message: str) -> None:
    assert only_problem(text) == message


def test_quoted_times_in_every_rfc3339_form() -> None:
    for raw, expected in [
        ('"2026-11-01T00:00:00Z"', dt.datetime(2026, 11, 1, tzinfo=UTC)),
        ('"2026-11-01t10:20:30.25z"', dt.datetime(2026, 11, 1, 10, 20, 30, 250_000, tzinfo=UTC)),
        ('"2026-11-01 00:00:00-02:00"', dt.datetime(2026, 11, 1, 2, tzinfo=UTC)),
        ("'2026-11-01T00:00:00+00:00'", dt.datetime(2026, 11, 1, tzinfo=UTC)),
    ]:
        m = parse(f"version: 1\ndiscover: [{{aois: all, outputs: all, created_after: {raw}}}]\n")
        assert m.discover[0].created_after == expected, raw
        assert m.discover[0].created_after.tzinfo is UTC


def test_all_is_a_plain_word_and_a_list_holding_it_is_an_id() -> None:
    m = parse('version: 1\ndiscover: [{aois: ["all"], inputs: ["all"], outputs: all}]\n')
    assert m.discover[0].aois == ("all",)
    assert not m.discover[0].all_aois
    assert m.discover[0].inputs == ("all",)
    assert m.discover[0].outputs == ALL


def test_keys_retyped_by_yaml_in_a_selector() -> None:
    assert only_problem("version: 1\ndiscover: [{aois: all, outputs: all, on: 1}]\n") == (
        "m.yaml:2:38: discover[0]: unquoted key on is read by YAML as the boolean true — quote "
        'it: "on"; it is not a known key either (known keys here: aois, projects, status, '
        "created_after, name_glob, inputs, outputs, name)"
    )


def test_duplicate_key_in_a_selector() -> None:
    assert only_problem("version: 1\ndiscover: [{aois: all, outputs: all, aois: [a]}]\n") == (
        "m.yaml:2:38: discover[0].aois: duplicate key aois (first at line 2, column 13)"
    )


def test_the_plan_counts_selectors() -> None:
    from batch_export.plan import plan_lines

    m = parse(
        """\
        version: 1
        discover:
          - {aois: all, outputs: all}
          - {projects: [p], outputs: all}
        """
    )
    lines = plan_lines(m, None)
    assert lines == [
        "0 job(s); at least 2 API request(s) (2 of them listings), 2 when each first answer is "
        "pending; at 2 requests/s that takes at least 1.0s, 1.0s with one poll each (5.0s apart); "
        "lower bounds: more polls, retries and the downloads add to them",
        "2 discover: selector(s), resolved from the API's listings at run time: at least 2 AOI "
        "page(s) and 0 insight listing(s) (counted above); their jobs are known only then and "
        "are not counted (validate sends nothing)",
    ]
    named = parse(
        """\
        version: 1
        limits: {rate: 4, poll_interval: 30s}
        discover:
          - {aois: [a1, a2], outputs: all}
          - {aois: [a2, a3], outputs: all}
          - {aois: all, outputs: all}
          - {aois: all, name_glob: "x*", outputs: all}
        """
    )
    assert plan_lines(named, None)[0].startswith(
        "0 job(s); at least 4 API request(s) (4 of them listings)"
    )
    assert not any("selector" in line for line in plan_lines(parse(MINIMAL), None))
