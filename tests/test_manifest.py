"""Tests of batch_export.manifest: YAML 1.1 pitfalls, exact error lines, paths, collisions, bombs."""

from __future__ import annotations

import gc
import json
import os
import unicodedata
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from textwrap import dedent

import jsonschema
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import batch_export.manifest as manifest_module
from batch_export.errors import ManifestError
from batch_export.manifest import (
    DEFAULT_PATH_TEMPLATE,
    ExportSpec,
    Manifest,
    load_manifest,
    manifest_json_schema,
    parse_manifest,
    render_relpath,
    sanitize_path_value,
)

REPO = Path(__file__).resolve().parent.parent
SCHEMA_FILE = REPO / "batch_export" / "manifest.schema.json"
EXAMPLE = REPO / "manifests" / "example.yaml"
SECRET = "sk-live-0123456789abcdefSECRET"

LOADERS = ["libyaml", "python"] if yaml.__with_libyaml__ else ["python"]


@pytest.fixture(params=LOADERS)
def loader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with libyaml's event stream and with PyYAML's pure-Python one."""
    name: str = request.param
    if name == "python":
        monkeypatch.setattr(manifest_module, "_LOADER", yaml.SafeLoader)
    return name


def parse(text: str, path: str = "m.yaml") -> Manifest:
    return parse_manifest(dedent(text), path=Path(path))


def problems(text: str) -> list[str]:
    with pytest.raises(ManifestError) as info:
        parse(text)
    assert info.value.problems, "a ManifestError must list its problems"
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def only_problem(text: str) -> str:
    lines = problems(text)
    assert len(lines) == 1, lines
    return lines[0]


def one_export(**fields: str) -> str:
    """A valid manifest with one export; ``fields`` are raw YAML values replacing the defaults."""
    values = {"aoi_id": '"a"', "insight_id": '"i"', "outputs": '["o"]', **fields}
    lines = ["version: 1", "exports:"]
    for n, (key, value) in enumerate(values.items()):
        lines.append(("  - " if n == 0 else "    ") + f"{key}: {value}")
    return "\n".join(lines) + "\n"


MINIMAL = one_export()


# -- the happy path ------------------------------------------------------------------------------


def test_minimal_manifest() -> None:
    m = parse(
        """\
        version: 1
        exports:
          - aoi_id: "6f1c2e"
            insight_id: "b77a90"
            inputs: ["scene_2026_05_01"]
            outputs: ["ndvi", "cloud_mask"]
            name: field-12-ndvi
          - aoi_id: "6f1c2e"
            insight_id: "c0ffee"
            outputs: [ndvi]
        """
    )
    assert m.path == Path("m.yaml")
    assert m.exports == (
        ExportSpec(
            aoi_id="6f1c2e",
            insight_id="b77a90",
            inputs=("scene_2026_05_01",),
            outputs=("ndvi", "cloud_mask"),
            name="field-12-ndvi",
            relpath="6f1c2e/b77a90/field-12-ndvi.zip",
            line=3,
        ),
        ExportSpec("6f1c2e", "c0ffee", (), ("ndvi",), "c0ffee", "6f1c2e/c0ffee/c0ffee.zip", 8),
    )
    assert m.warnings == ()
    assert m.output.dir is None
    assert m.output.path == DEFAULT_PATH_TEMPLATE
    assert m.api == manifest_module.ApiSettings()
    assert m.limits == manifest_module.LimitSettings()


def test_every_section(tmp_path: Path) -> None:
    text = """\
        version: 1
        api:
          url: https://api.pixxel.space/
          key_env: PIXXEL_API_KEY
          ready_statuses: [Ready, SUCCESS, ready]
          failed_statuses: [Failed]
        limits:
          in_flight: 500
          downloads: 8
          rate: 2.5
          poll_interval: 500ms
          poll_max_interval: 1h30m
          poll_timeout: 7200
          retries: 0
          read_timeout: "90s"
        output:
          dir: out
          path: "{aoi_id}-{insight_id}/{name}.tar.gz"
        defaults:
          inputs: [s1]
          outputs: [o1]
        exports:
          - {aoi_id: "a", insight_id: "i"}
        """
    m = parse(text, path=str(tmp_path / "m.yaml"))
    assert m.api == manifest_module.ApiSettings(
        url="https://api.pixxel.space",
        key_env="PIXXEL_API_KEY",
        ready_statuses=("ready", "success"),
        failed_statuses=("failed",),
    )
    assert m.limits == manifest_module.LimitSettings(
        in_flight=500,
        downloads=8,
        rate=2.5,
        poll_interval=0.5,
        poll_max_interval=5400.0,
        poll_timeout=7200.0,
        retries=0,
        read_timeout=90.0,
    )
    assert isinstance(m.limits.poll_timeout, float)
    assert m.output.dir == tmp_path / "out"
    assert m.exports[0].relpath == "a-i/i.tar.gz"
    assert m.exports[0].inputs == ("s1",)
    assert m.exports[0].outputs == ("o1",)


def test_public_names() -> None:
    for name in manifest_module.__all__:
        assert hasattr(manifest_module, name)


def test_gc_is_left_enabled() -> None:
    assert gc.isenabled()
    parse(MINIMAL)
    assert gc.isenabled()
    problems("version: 2\n")
    assert gc.isenabled()


# -- YAML 1.1 retyping ---------------------------------------------------------------------------

RETYPED = [
    ("012", "the integer 10"),
    ("0x1F", "the integer 31"),
    ("0b101", "the integer 5"),
    ("1_000", "the integer 1000"),
    ("1:30", "the integer 90"),
    ("12", "the integer 12"),
    ("-7", "the integer -7"),
    ("1.5", "the number 1.5"),
    (".inf", "the number infinity"),
    ("-.inf", "the number -infinity"),
    (".nan", "the number NaN (not a number)"),
    ("no", "the boolean false"),
    ("on", "the boolean true"),
    ("yes", "the boolean true"),
    ("off", "the boolean false"),
    ("True", "the boolean true"),
    ("2026-05-01", "the date 2026-05-01"),
    ("2026-05-01T10:00:00Z", "the timestamp 2026-05-01T10:00:00+00:00"),
    ("~", "null (no value)"),
    ("null", "null (no value)"),
]

# (field, build the manifest from a raw YAML value, line, column, path, read the value back)
STRING_FIELDS = [
    (
        "aoi_id",
        lambda v: one_export(aoi_id=v),
        3,
        13,
        "exports[0].aoi_id",
        lambda m: m.exports[0].aoi_id,
    ),
    (
        "insight_id",
        lambda v: one_export(insight_id=v),
        4,
        17,
        "exports[0].insight_id",
        lambda m: m.exports[0].insight_id,
    ),
    ("name", lambda v: one_export(name=v), 6, 11, "exports[0].name", lambda m: m.exports[0].name),
    (
        "outputs",
        lambda v: one_export(outputs=f'["o", {v}]'),
        5,
        20,
        "exports[0].outputs[1]",
        lambda m: m.exports[0].outputs[1],
    ),
    (
        "inputs",
        lambda v: one_export(inputs=f"[{v}]"),
        6,
        14,
        "exports[0].inputs[0]",
        lambda m: m.exports[0].inputs[0],
    ),
    (
        "defaults",
        lambda v: f"version: 1\ndefaults:\n  outputs:\n    - {v}\n{MINIMAL[11:]}",
        4,
        7,
        "defaults.outputs[0]",
        None,
    ),
    (
        "output.dir",
        lambda v: f"version: 1\noutput:\n  dir: {v}\n{MINIMAL[11:]}",
        3,
        8,
        "output.dir",
        lambda m: m.output.dir.name,
    ),
    (
        "status",
        lambda v: f"version: 1\napi:\n  ready_statuses: [{v}]\n{MINIMAL[11:]}",
        3,
        20,
        "api.ready_statuses[0]",
        lambda m: m.api.ready_statuses[0],
    ),
]


@pytest.mark.parametrize(("raw", "reading"), RETYPED)
@pytest.mark.parametrize(("field", "build", "line", "col", "path", "read"), STRING_FIELDS)
def test_unquoted_scalar_that_yaml_retypes_is_rejected(
    loader: str,
    raw: str,
    reading: str,
    field: str,
    build: Callable[[str], str],
    line: int,
    col: int,
    path: str,
    read: Callable[[Manifest], str] | None,
) -> None:
    if field == "status":  # values under api are never echoed
        message = "expected a string; YAML reads this unquoted value as "
        assert only_problem(build(raw)).startswith(f"m.yaml:{line}:{col}: {path}: {message}")
    else:
        assert only_problem(build(raw)) == (
            f"m.yaml:{line}:{col}: {path}: expected a string; unquoted {raw} is read by YAML as "
            f'{reading} — quote it: "{raw}"'
        )
    if read is not None and not (field == "output.dir" and raw == "~"):
        got = read(parse(build(json.dumps(raw))))
        assert got == (raw.lower() if field == "status" else raw)


def test_empty_value_where_a_string_is_expected() -> None:
    assert only_problem(one_export(name="")) == (
        "m.yaml:6:10: exports[0].name: expected a string, got nothing (empty value)"
    )
    assert only_problem(one_export(name='""')) == (
        "m.yaml:6:11: exports[0].name: name must not be empty"
    )
    assert only_problem(one_export(aoi_id="''")) == (
        "m.yaml:3:13: exports[0].aoi_id: aoi_id must not be empty"
    )
    assert only_problem(one_export(outputs='["o", ""]')) == (
        "m.yaml:5:20: exports[0].outputs[1]: an asset id must not be empty"
    )


def test_explicit_str_tag_keeps_the_text_and_other_tags_are_named() -> None:
    assert parse(one_export(aoi_id="!!str 012")).exports[0].aoi_id == "012"
    assert parse(one_export(aoi_id="! 012")).exports[0].aoi_id == "012"
    assert only_problem(one_export(aoi_id='!!int "12"')) == (
        "m.yaml:3:13: exports[0].aoi_id: expected a string, got a value tagged !!int"
    )
    assert only_problem(one_export(aoi_id="!custom x")) == (
        "m.yaml:3:13: exports[0].aoi_id: expected a string, got a value tagged !custom"
    )
    assert only_problem(one_export(outputs="!foo [a]")) == (
        "m.yaml:5:14: exports[0].outputs: unexpected explicit tag !foo; remove it"
    )


def test_block_scalars_are_strings() -> None:
    m = parse(
        'version: 1\nexports:\n  - aoi_id: >-\n      012\n    insight_id: "i"\n    outputs: [o]\n'
    )
    assert m.exports[0].aoi_id == "012"


def test_collections_where_a_string_is_expected() -> None:
    assert only_problem(one_export(aoi_id="[a]")) == (
        "m.yaml:3:13: exports[0].aoi_id: expected a string, got a list"
    )
    assert only_problem(one_export(outputs="[[a]]")) == (
        "m.yaml:5:15: exports[0].outputs[0]: expected a string, got a list"
    )
    assert only_problem(one_export(outputs="{a: b}")) == (
        "m.yaml:5:14: exports[0].outputs: expected a list, got a mapping"
    )
    assert only_problem(one_export(outputs="ndvi")) == (
        'm.yaml:5:14: exports[0].outputs: expected a list, got a string (write ["ndvi"])'
    )
    assert only_problem(one_export(outputs="")) == (
        "m.yaml:5:13: exports[0].outputs: expected a list, got nothing (write [] for an empty list)"
    )


RETYPED_KEYS = [
    ("on", "the boolean true"),
    ("yes", "the boolean true"),
    ("012", "the integer 10"),
    ("1:30", "the integer 90"),
    ("~", "null (no value)"),
    ("2026-05-01", "the date 2026-05-01"),
    ("1.5", "the number 1.5"),
]


@pytest.mark.parametrize(("raw", "reading"), RETYPED_KEYS)
def test_unquoted_key_that_yaml_retypes_is_rejected(loader: str, raw: str, reading: str) -> None:
    top = f"{raw}: 1\n{MINIMAL}"
    assert only_problem(top) == (
        f"m.yaml:1:1: (document): unquoted key {raw} is read by YAML as {reading} — quote it: "
        f'"{raw}"; it is not a known key either (known keys here: version, api, limits, output, '
        "defaults, exports)"
    )
    entry = MINIMAL + f"    {raw}: x\n"
    assert only_problem(entry) == (
        f"m.yaml:6:5: exports[0]: unquoted key {raw} is read by YAML as {reading} — quote it: "
        f'"{raw}"; it is not a known key either (known keys here: aoi_id, insight_id, inputs, '
        "outputs, name)"
    )
    limits = f"version: 1\nlimits:\n  {raw}: 3\n{MINIMAL[11:]}"
    assert only_problem(limits).startswith(f"m.yaml:3:3: limits: unquoted key {raw} is read by")


def test_retyped_key_under_api_is_not_echoed() -> None:
    line = only_problem(f"version: 1\napi:\n  12345: x\n{MINIMAL[11:]}")
    assert line == (
        "m.yaml:3:3: api: key names are strings; YAML reads this unquoted key as an integer, and "
        "it is not a known key (known keys here: url, key_env, key_file, ready_statuses, "
        "failed_statuses)"
    )


def test_non_scalar_keys() -> None:
    line = only_problem(MINIMAL + "    ? [a, b]\n    : x\n")
    assert line == "m.yaml:6:7: exports[0]: expected a key name, got a list as a key"


def test_merge_keys_are_not_supported() -> None:
    text = """\
        version: 1
        exports:
          - &base {aoi_id: "a", insight_id: "i", outputs: [o]}
          - <<: *base
            name: other
        """
    assert problems(text) == [
        "m.yaml:4:5: exports[1]: YAML merge keys (<<) are not supported; use defaults: for shared "
        "inputs/outputs, or an alias (*name) for a whole value",
        "m.yaml:4:5: exports[1]: missing required key aoi_id",
        "m.yaml:4:5: exports[1]: missing required key insight_id",
    ]


# -- numbers and durations -----------------------------------------------------------------------


def limits(body: str) -> str:
    return f"version: 1\nlimits:\n  {body}\n{MINIMAL[11:]}"


def test_in_flight_yes_is_not_one(loader: str) -> None:
    assert only_problem(limits("in_flight: yes")) == (
        "m.yaml:3:14: limits.in_flight: expected an integer; unquoted yes is read by YAML as the "
        "boolean true"
    )


@pytest.mark.parametrize(
    ("raw", "reading"),
    [
        ("012", "the integer 10"),
        ("0x1F", "the integer 31"),
        ("1_000", "the integer 1000"),
        ("1:30", "the integer 90"),
        ("0b11", "the integer 3"),
    ],
)
def test_non_decimal_number_forms_are_rejected(raw: str, reading: str) -> None:
    assert only_problem(limits(f"in_flight: {raw}")) == (
        f"m.yaml:3:14: limits.in_flight: write a plain decimal number: YAML 1.1 reads unquoted "
        f"{raw} as {reading}"
    )
    assert only_problem(limits(f"rate: {raw}")) == (
        f"m.yaml:3:9: limits.rate: write a plain decimal number: YAML 1.1 reads unquoted {raw} as "
        f"{reading}"
    )
    assert only_problem(limits(f"poll_timeout: {raw}")) == (
        "m.yaml:3:17: limits.poll_timeout: write a plain decimal number of seconds or a duration "
        f"such as 90s, 15m or 1h30m: YAML 1.1 reads unquoted {raw} as {reading}"
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("in_flight: 0", "must be between 1 and 100000, got 0"),
        ("in_flight: 100001", "must be between 1 and 100000, got 100001"),
        ("downloads: 1025", "must be between 1 and 1024, got 1025"),
        ("retries: -1", "must be between 0 and 100, got -1"),
        ("retries: 101", "must be between 0 and 100, got 101"),
        ("retries: 1.5", "expected a whole number, got 1.5"),
        ('retries: "3"', 'expected an integer, got the quoted string "3" (remove the quotes)'),
        ("retries: three", "expected an integer, got the string three"),
        ("retries: ~", "expected an integer, got nothing"),
        ("retries: [3]", "expected an integer, got a list"),
        (
            "retries: .inf",
            "write a plain decimal number: YAML 1.1 reads unquoted .inf as the number infinity",
        ),
        ("rate: 0", "must be a number of requests/s above 0, got 0"),
        ("rate: -2", "must be a number of requests/s above 0, got -2"),
        ("rate: 1e999", "must be a number of requests/s above 0, got inf"),
        ("rate: no", "expected a number; unquoted no is read by YAML as the boolean false"),
        ("poll_interval: 0", "a duration here must be more than 0 seconds"),
        ("poll_interval: 0s", "a duration here must be more than 0 seconds"),
        ("poll_interval: -1", "a duration here must be more than 0 seconds"),
        (
            "poll_interval: 5x",
            "expected a duration such as 90s, 15m, 1h30m, 500ms or a number of seconds",
        ),
        (
            "poll_interval: 1m1h",
            "expected a duration such as 90s, 15m, 1h30m, 500ms or a number of seconds",
        ),
        (
            "poll_interval: yes",
            "expected a duration such as 90s, 15m, 1h30m, 500ms or a number of "
            "seconds, got the boolean true",
        ),
        (
            "poll_interval: {a: 1}",
            "expected a duration such as 90s, 15m, 1h30m, 500ms or a number "
            "of seconds, got a mapping",
        ),
    ],
)
def test_limit_values(body: str, message: str) -> None:
    key = body.split(":")[0]
    col = 3 + len(key) + 2
    assert only_problem(limits(body)) == f"m.yaml:3:{col}: limits.{key}: {message}"


@pytest.mark.parametrize(
    ("body", "value"),
    [
        ("rate: 1e3", 1000.0),
        ("rate: 0.25", 0.25),
        ("rate: 3", 3.0),
        ("in_flight: 100000", 100000),
        ("in_flight: +5", 5),
        ("poll_interval: 1.5s", 1.5),
        ("poll_interval: 2", 2.0),
        ("poll_interval: 0.5", 0.5),
        ('poll_interval: "2"', 2.0),
        ("poll_interval: 15m", 900.0),
        ("read_timeout: 2h", 7200.0),
    ],
)
def test_limit_values_accepted(body: str, value: float) -> None:
    key = body.split(":")[0]
    got = getattr(parse(limits(body)).limits, key)
    assert got == value
    assert type(got) is type(value)


def test_poll_max_interval_at_least_poll_interval() -> None:
    text = f"version: 1\nlimits:\n  poll_interval: 1m\n  poll_max_interval: 30s\n{MINIMAL[11:]}"
    assert only_problem(text) == (
        "m.yaml:4:22: limits.poll_max_interval: must be at least poll_interval (30 s < 60 s)"
    )
    same = f"version: 1\nlimits:\n  poll_interval: 1m\n  poll_max_interval: 60\n{MINIMAL[11:]}"
    assert parse(same).limits.poll_max_interval == 60.0


def test_empty_sections_are_fine() -> None:
    m = parse(f"version: 1\napi:\nlimits:\noutput:\ndefaults:\n{MINIMAL[11:]}")
    assert m.limits == manifest_module.LimitSettings()
    assert only_problem(f"version: 1\nlimits: 3\n{MINIMAL[11:]}") == (
        "m.yaml:2:9: limits: expected a mapping, got a number"
    )


# -- version, exports ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("2", "unsupported manifest version 2; this batch-export reads version 1"),
        ('"1"', "expected the integer 1 (version: 1)"),
        ("1.0", "expected the integer 1 (version: 1)"),
        ("01", "expected the integer 1 (version: 1)"),
        ("yes", "expected the integer 1 (version: 1)"),
        ("", "expected the integer 1 (version: 1)"),
    ],
)
def test_version(raw: str, message: str) -> None:
    assert only_problem(f"version: {raw}\n{MINIMAL[11:]}").endswith(f": version: {message}")


def test_version_and_exports_are_required() -> None:
    assert problems("api: {}\n") == [
        "m.yaml:1:1: (document): missing required key version",
        "m.yaml:1:1: (document): missing required key exports",
    ]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("[]", "m.yaml:2:10: exports: expected at least one export"),
        ("", "m.yaml:2:9: exports: expected a list of exports, got nothing"),
        ("{a: 1}", "m.yaml:2:10: exports: expected a list of exports, got a mapping"),
        (
            "[x]",
            "m.yaml:2:11: exports[0]: expected a mapping with aoi_id and insight_id, got a string",
        ),
    ],
)
def test_exports_shape(raw: str, message: str) -> None:
    assert only_problem(f"version: 1\nexports: {raw}\n") == message


def test_missing_ids() -> None:
    assert problems("version: 1\nexports:\n  - {outputs: [o]}\n") == [
        "m.yaml:3:5: exports[0]: missing required key aoi_id",
        "m.yaml:3:5: exports[0]: missing required key insight_id",
    ]


@pytest.mark.parametrize(
    "document",
    ["", "# nothing but a comment\n", "---\n", "--- ~\n"],
)
def test_empty_document(document: str) -> None:
    assert only_problem(document) == (
        "m.yaml:1:1: (document): the manifest is empty; expected version: 1 and exports:"
    )


def test_document_that_is_not_a_mapping() -> None:
    assert only_problem("- 1\n") == (
        "m.yaml:1:1: (document): expected a mapping with version: 1 and exports:, got a list"
    )


def test_second_document() -> None:
    assert only_problem(MINIMAL + "---\n" + MINIMAL) == (
        "m.yaml:6:1: (document): a manifest is a single YAML document; found a second one "
        "(remove this ---)"
    )


# -- duplicate and unknown keys ------------------------------------------------------------------


def test_duplicate_keys_at_every_level(loader: str) -> None:
    text = """\
        version: 1
        version: 1
        api:
          url: https://api.pixxel.space
          url: https://api.pixxel.space
        limits:
          rate: 1
          rate: 2
        output:
          dir: a
          dir: b
        defaults:
          inputs: []
          inputs: []
        exports:
          - aoi_id: "a"
            insight_id: "i"
            outputs: [o]
            aoi_id: "b"
        exports: []
        """
    assert problems(text) == [
        "m.yaml:2:1: version: duplicate key version (first at line 1, column 1)",
        "m.yaml:5:3: api.url: duplicate key url (first at line 4, column 3)",
        "m.yaml:8:3: limits.rate: duplicate key rate (first at line 7, column 3)",
        "m.yaml:11:3: output.dir: duplicate key dir (first at line 10, column 3)",
        "m.yaml:14:3: defaults.inputs: duplicate key inputs (first at line 13, column 3)",
        "m.yaml:19:5: exports[0].aoi_id: duplicate key aoi_id (first at line 16, column 5)",
        "m.yaml:20:1: exports: duplicate key exports (first at line 15, column 1)",
    ]


def test_unknown_keys_at_every_level() -> None:
    text = """\
        version: 1
        export: []
        api:
          urll: x
        limits:
          inflight: 3
        output:
          folder: x
        defaults:
          output: []
        exports:
          - aoi_id: "a"
            insight_id: "i"
            outputs: [o]
            inptus: [x]
        """
    assert problems(text) == [
        "m.yaml:2:1: export: unknown key export; did you mean exports? (known keys here: version, "
        "api, limits, output, defaults, exports)",
        "m.yaml:4:3: api.urll: unknown key urll; did you mean url? (known keys here: url, key_env, "
        "key_file, ready_statuses, failed_statuses)",
        "m.yaml:6:3: limits.inflight: unknown key inflight; did you mean in_flight? (known keys "
        "here: in_flight, downloads, rate, poll_interval, poll_max_interval, poll_timeout, retries, "
        "read_timeout)",
        "m.yaml:8:3: output.folder: unknown key folder (known keys here: dir, path)",
        "m.yaml:10:3: defaults.output: unknown key output; did you mean outputs? (known keys here: "
        "inputs, outputs)",
        "m.yaml:15:5: exports[0].inptus: unknown key inptus; did you mean inputs? (known keys "
        "here: aoi_id, insight_id, inputs, outputs, name)",
    ]


# -- secrets -------------------------------------------------------------------------------------

LITERAL_KEY = (
    "the API key must not be written in the manifest; name an environment variable in "
    "api.key_env or a file in api.key_file"
)


@pytest.mark.parametrize(
    "name",
    [
        "key",
        "api_key",
        "apikey",
        "API-Key",
        "token",
        "secret",
        "password",
        "authorization",
        "Authorization",
        "access_token",
        "access-token",
        "bearer_token",
        "pixxel_api_key",
        "my_secret_value",
    ],
)
def test_literal_key_in_api_is_rejected_without_echo(name: str) -> None:
    text = f"version: 1\napi:\n  key_env: PIXXEL_API_KEY\n  {name}: {SECRET}\n{MINIMAL[11:]}"
    lines = problems(text)
    assert lines == [f"m.yaml:4:3: api.{name}: {LITERAL_KEY}"]
    assert SECRET not in "\n".join(lines)


@pytest.mark.parametrize("name", ["api_key", "apikey", "token", "PIXXEL_API_KEY", "password"])
def test_literal_key_at_top_level_is_rejected(name: str) -> None:
    lines = problems(f"{name}: {SECRET}\n{MINIMAL}")
    assert lines == [f"m.yaml:1:1: {name}: {LITERAL_KEY}"]


def test_literal_key_nested_value_is_not_walked() -> None:
    lines = problems(f"version: 1\napi:\n  key:\n    value: {SECRET}\n    on: 012\n{MINIMAL[11:]}")
    assert lines == [f"m.yaml:3:3: api.key: {LITERAL_KEY}"]


def test_secret_looking_key_names_under_api_are_not_echoed() -> None:
    name = "Zk9vYmFyYmF6cXV4MTIzNDU2Nzg5MA"
    lines = problems(f"version: 1\napi:\n  {name}: 1\n{MINIMAL[11:]}")
    assert lines == [
        "m.yaml:3:3: api: unknown key (name not shown) (known keys here: url, key_env, key_file, "
        "ready_statuses, failed_statuses)"
    ]
    duplicate = problems(f"version: 1\napi:\n  {name}: 1\n  {name}: 2\n{MINIMAL[11:]}")
    assert not any(name in line for line in duplicate)
    assert "m.yaml:4:3: api: duplicate key (first at line 3, column 3)" in duplicate


def test_typo_of_key_env_is_unknown_not_literal() -> None:
    assert only_problem(f"version: 1\napi:\n  key-env: X\n{MINIMAL[11:]}") == (
        "m.yaml:3:3: api.key-env: unknown key key-env; did you mean key_env? (known keys here: "
        "url, key_env, key_file, ready_statuses, failed_statuses)"
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (f"key_env: {SECRET}", "expected the NAME of an environment variable"),
        (f"key_env: 1{SECRET[1:]}", "expected the NAME of an environment variable"),
        (
            "key_env: 012",
            "expected a string; YAML reads this unquoted value as an integer — quote "
            "it (value not shown)",
        ),
        (f"url: https://user:{SECRET}@api.pixxel.space", "must not hold user:password@"),
        (f"url: ftp://{SECRET}", "must be an http:// or https:// URL with a host"),
        (f"url: {SECRET}", "must be an http:// or https:// URL with a host"),
        (f"url: https://{SECRET}:99999", "is not a valid URL"),
        (f"url: https://api.pixxel.space/?key={SECRET}", "must not have a query"),
        (f"url: https://api.pixxel.space/#{SECRET}", "must not have a query"),
        ("url: https://", "must be an http:// or https:// URL with a host"),
        (f"url: [{SECRET}]", "expected a string, got a list"),
        (
            f"ready_statuses: [{SECRET}, 12]",
            "expected a string; YAML reads this unquoted value as an integer",
        ),
        (f"failed_statuses: {SECRET}", "expected a list, got a string"),
        (f"key_file: ~/{SECRET}", "~ is not expanded here"),
    ],
)
def test_api_values_are_never_echoed(body: str, message: str) -> None:
    lines = problems(f"version: 1\napi:\n  {body}\n{MINIMAL[11:]}")
    assert len(lines) == 1, lines
    assert message in lines[0]
    assert SECRET not in lines[0]
    assert SECRET[:12] not in lines[0]
    assert ": api." in lines[0]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (f"api: {SECRET}", "m.yaml:2:6: api: expected a mapping, got a string"),
        (
            f"api:\n  url: !{SECRET} x",
            "m.yaml:3:8: api.url: expected a string, got a value tagged (not shown)",
        ),
        (
            f"api:\n  ready_statuses: !{SECRET} [a]",
            "m.yaml:3:19: api.ready_statuses: unexpected explicit tag (not shown); remove it",
        ),
        (
            f"api: !{SECRET} {{url: https://x}}",
            "m.yaml:2:6: api: unexpected explicit tag (not shown); remove it",
        ),
    ],
)
def test_api_section_shapes_are_not_echoed(body: str, expected: str) -> None:
    assert only_problem(f"version: 1\n{body}\n{MINIMAL[11:]}") == expected


def test_key_env_and_key_file_together() -> None:
    text = f"version: 1\napi:\n  key_env: K\n  key_file: /run/k\n{MINIMAL[11:]}"
    assert only_problem(text) == (
        "m.yaml:4:13: api.key_file: set api.key_env or api.key_file, not both: the key must have "
        "one source"
    )


def test_api_url_accepted_forms() -> None:
    def url(raw: str) -> str | None:
        return parse(f"version: 1\napi:\n  url: {raw}\n{MINIMAL[11:]}").api.url

    assert url("https://api.pixxel.space") == "https://api.pixxel.space"
    assert url("https://api.pixxel.space/") == "https://api.pixxel.space"
    assert url("http://127.0.0.1:8080") == "http://127.0.0.1:8080"
    assert url("HTTP://[::1]:9/base/") == "HTTP://[::1]:9/base"


def test_statuses() -> None:
    text = """\
        version: 1
        api:
          ready_statuses: [Ready, DONE, ready, "Complete"]
          failed_statuses: [FAILED, done, error]
        exports:
          - {aoi_id: "a", insight_id: "i", outputs: [o]}
        """
    assert problems(text) == [
        "m.yaml:4:29: api.failed_statuses: this status is also in api.ready_statuses (line 3, "
        "column 27); a status is either ready or failed"
    ]
    ok = parse(text.replace("done, ", ""))
    assert ok.api.ready_statuses == ("ready", "done", "complete")
    assert ok.api.failed_statuses == ("failed", "error")
    assert only_problem(f"version: 1\napi:\n  ready_statuses: []\n{MINIMAL[11:]}") == (
        "m.yaml:3:19: api.ready_statuses: expected at least one status"
    )
    assert only_problem(f"version: 1\napi:\n  ready_statuses: [' ']\n{MINIMAL[11:]}") == (
        "m.yaml:3:20: api.ready_statuses: a status must not be empty"
    )


# -- paths anchored at the manifest --------------------------------------------------------------


def test_relative_paths_are_anchored_at_the_manifest_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "m.yaml").write_text(
        "version: 1\napi:\n  key_file: secrets/key\noutput:\n  dir: out/packages\n" + MINIMAL[11:],
        encoding="utf-8",
    )
    elsewhere = tmp_path / "cron"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for as_given in (folder / "m.yaml", Path("../project/m.yaml")):
        m = load_manifest(as_given)
        assert m.path == as_given
        assert m.output.dir is not None and m.api.key_file is not None
        assert m.output.dir.is_absolute() and m.api.key_file.is_absolute()
        assert os.path.realpath(m.output.dir) == os.path.realpath(folder / "out" / "packages")
        assert os.path.realpath(m.api.key_file) == os.path.realpath(folder / "secrets" / "key")


def test_anchoring_does_not_resolve_symlinks(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (real / "m.yaml").write_text("version: 1\noutput:\n  dir: out\n" + MINIMAL[11:], "utf-8")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    assert load_manifest(link / "m.yaml").output.dir == link / "out"


def test_absolute_paths_are_kept_and_tilde_is_refused() -> None:
    m = parse(
        "version: 1\napi:\n  key_file: /run/secrets/k\noutput:\n  dir: /srv/x\n" + MINIMAL[11:]
    )
    assert m.output.dir == Path("/srv/x")
    assert m.api.key_file == Path("/run/secrets/k")
    assert only_problem("version: 1\noutput:\n  dir: ~/x\n" + MINIMAL[11:]) == (
        "m.yaml:3:8: output.dir: ~ is not expanded here; write the full path"
    )
    assert only_problem("version: 1\noutput:\n  dir: ''\n" + MINIMAL[11:]) == (
        "m.yaml:3:8: output.dir: expected a path, got an empty string"
    )


# -- defaults ------------------------------------------------------------------------------------


def test_defaults_are_replaced_not_concatenated() -> None:
    m = parse(
        """\
        version: 1
        defaults:
          inputs: [s1, s2]
          outputs: [o1]
        exports:
          - {aoi_id: "a", insight_id: "i1"}
          - {aoi_id: "a", insight_id: "i2", outputs: [o2]}
          - {aoi_id: "a", insight_id: "i3", inputs: []}
          - {aoi_id: "a", insight_id: "i4", inputs: [s3], outputs: []}
        """
    )
    assert [(e.inputs, e.outputs) for e in m.exports] == [
        (("s1", "s2"), ("o1",)),
        (("s1", "s2"), ("o2",)),
        ((), ("o1",)),
        (("s3",), ()),
    ]


def test_entry_selecting_nothing_is_an_error() -> None:
    text = """\
        version: 1
        defaults:
          outputs: [o1]
        exports:
          - {aoi_id: "a", insight_id: "i1", outputs: []}
          - {aoi_id: "a", insight_id: "i2", outputs: [], inputs: []}
          - {aoi_id: "a", insight_id: "i3"}
        """
    assert problems(text) == [
        "m.yaml:5:5: exports[0]: nothing selected: inputs and outputs are both empty (set them "
        "here or in defaults:)",
        "m.yaml:6:5: exports[1]: nothing selected: inputs and outputs are both empty (set them "
        "here or in defaults:)",
    ]
    assert only_problem('version: 1\nexports:\n  - {aoi_id: "a", insight_id: "i"}\n').endswith(
        "exports[0]: nothing selected: inputs and outputs are both empty (set them here or in "
        "defaults:)"
    )


def test_lists_are_deduplicated_in_first_occurrence_order() -> None:
    m = parse(one_export(inputs="[s2, s1, s2]", outputs='[b, a, "b", c, a]'))
    assert m.exports[0].inputs == ("s2", "s1")
    assert m.exports[0].outputs == ("b", "a", "c")


def test_name_defaults_to_insight_id() -> None:
    assert parse(MINIMAL).exports[0].name == "i"


def test_aliases_for_shared_lists() -> None:
    m = parse(
        """\
        version: 1
        exports:
          - {aoi_id: "a", insight_id: "i1", outputs: &outs [ndvi, cloud_mask]}
          - {aoi_id: "a", insight_id: "i2", outputs: *outs}
        """
    )
    assert m.exports[1].outputs == ("ndvi", "cloud_mask")


# -- output path templates -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{name.attr}.zip", "{name.attr}: attribute or index access is not allowed"),
        ("{name[0]}.zip", "{name[0]}: attribute or index access is not allowed"),
        ("{name:>99}.zip", "{name:>99}: format specs are not allowed in the path template"),
        ("{name!r}.zip", "{name!r}: conversions (!r, !s, !a) are not allowed"),
        ("{foo}.zip", "unknown field {foo} in the path template; the fields are"),
        ("{nmae}.zip", "unknown field {nmae} in the path template (did you mean {name}?)"),
        ("{}.zip", "positional field {} in the path template"),
        ("{0}.zip", "positional field {0} in the path template"),
        ("{name.zip", "unbalanced braces in the path template"),
        ("name}.zip", "unbalanced braces in the path template"),
        ("/abs/{name}.zip", "must be relative to the output dir (no leading /)"),
        ("../{name}.zip", "must stay under the output dir: .. is not allowed"),
        ("a/../{name}.zip", "must stay under the output dir: .. is not allowed"),
        ("a/./{name}.zip", "must stay under the output dir: . is not allowed"),
        ("a//{name}.zip", "an empty folder name (// or a trailing /) is not allowed"),
        ("{name}/", "an empty folder name (// or a trailing /) is not allowed"),
        ("a\\\\{name}.zip", "backslashes are not allowed in the path template"),
        ("C:{name}.zip", "must not start with a drive (C:)"),
        (".batch-export/{name}.zip", "must not write into the state dir .batch-export/"),
        (".Batch-Export/{name}.zip", "must not write into the state dir .batch-export/"),
        ("", "the path template is empty"),
        ("a\\t{name}", "control characters are not allowed in the path template"),
    ],
)
def test_bad_templates(template: str, message: str) -> None:
    line = only_problem(f'version: 1\noutput:\n  path: "{template}"\n{MINIMAL[11:]}')
    assert line.startswith("m.yaml:3:9: output.path: ")
    assert message in line


def test_template_must_be_a_string() -> None:
    assert only_problem(f"version: 1\noutput:\n  path: 12\n{MINIMAL[11:]}") == (
        "m.yaml:3:9: output.path: expected a string; unquoted 12 is read by YAML as the integer "
        '12 — quote it: "12"'
    )


@pytest.mark.parametrize(
    ("template", "relpath"),
    [
        ("{{x}}/{name}.zip", "{x}/i.zip"),
        ("{aoi_id}-{insight_id}/{name}.tar.gz", "a-i/i.tar.gz"),
        ("x/{name}", "x/i"),
        ("{name}", "i"),
        ("..{name}/a..b", "..i/a..b"),
        ("static.zip", "static.zip"),
    ],
)
def test_good_templates(template: str, relpath: str) -> None:
    m = parse(f'version: 1\noutput:\n  path: "{template}"\n{MINIMAL[11:]}')
    assert m.output.path == template
    assert m.exports[0].relpath == relpath


@pytest.mark.parametrize(
    ("value", "expected"),
    [("..", "_"), (".", "_"), ("...", "_"), ("\x01", "_"), ("a\tb\x7fc\x00", "abc")],
)
def test_sanitiser_on_values_the_manifest_rejects_earlier(value: str, expected: str) -> None:
    # Dots-only ids and control characters never get this far (rejected as ids), but the
    # sanitiser stays safe on them on its own.
    assert sanitize_path_value(value) == expected


@pytest.mark.parametrize(
    ("aoi_id", "insight_id", "name", "relpath"),
    [
        ("a", "a/../../b", "CON", "a/a_.._.._b/_CON.zip"),
        ("/etc/passwd", "i", "x", "_etc_passwd/i/x.zip"),
        ("\\\\server\\share", "i", "nul.txt", "__server_share/i/_nul.txt.zip"),
        ("a", "i", "x. . ", "a/i/x.zip"),
        ("a", "i", "com9.tar", "a/i/_com9.tar.zip"),
        ("a", "i", "LPT1 .x", "a/i/_LPT1 .x.zip"),
        ("a", "i", "COM10", "a/i/COM10.zip"),
        ("a", "i", "CONSOLE", "a/i/CONSOLE.zip"),
        ("a", "i", "..a", "a/i/..a.zip"),
        ("é/ü", "i", "ok", "é_ü/i/ok.zip"),
    ],
)
def test_values_are_sanitised(aoi_id: str, insight_id: str, name: str, relpath: str) -> None:
    m = parse(
        one_export(
            aoi_id=json.dumps(aoi_id), insight_id=json.dumps(insight_id), name=json.dumps(name)
        )
    )
    spec = m.exports[0]
    assert (spec.aoi_id, spec.insight_id, spec.name) == (aoi_id, insight_id, name)
    assert spec.relpath == relpath


def test_values_cannot_enter_the_state_dir() -> None:
    assert only_problem(one_export(aoi_id='".batch-export"')) == (
        'm.yaml:3:5: exports[0]: the output path ".batch-export/i/i.zip" enters the state dir '
        ".batch-export/"
    )
    assert "enters the state dir" in only_problem(one_export(aoi_id='".BATCH-EXPORT."'))


def test_component_longer_than_255_bytes() -> None:
    assert parse(one_export(name=json.dumps("é" * 125))).exports[0].relpath.endswith(".zip")
    line = only_problem(one_export(name=json.dumps("é" * 126)))
    assert line.startswith("m.yaml:3:5: exports[0]: the output path component ")
    assert "is 256 bytes long; the limit is 255 (shorten the id or set name)" in line


# -- collisions ----------------------------------------------------------------------------------


def test_same_output_path_is_an_error() -> None:
    text = """\
        version: 1
        output: {path: "{aoi_id}/{name}.zip"}
        exports:
          - {aoi_id: "a", insight_id: "i1", name: "n", outputs: [o]}
          - {aoi_id: "a", insight_id: "i2", name: "n", outputs: [o]}
          - {aoi_id: "a", insight_id: "i3", name: "n/", outputs: [o]}
        """
    assert problems(text) == [
        'm.yaml:5:5: exports[1]: output path "a/n.zip" is also the output path of exports[0] '
        "(line 4); set a distinct name or change output.path",
    ]


def test_sanitised_values_colliding() -> None:
    text = """\
        version: 1
        exports:
          - {aoi_id: "a/b", insight_id: "i", outputs: [o]}
          - {aoi_id: "a\\\\b", insight_id: "i", outputs: [o]}
        """
    assert problems(text) == [
        'm.yaml:4:5: exports[1]: output path "a_b/i/i.zip" is also the output path of exports[0] '
        "(line 3); set a distinct name or change output.path",
    ]


def test_part_file_collision() -> None:
    text = """\
        version: 1
        output: {path: "{name}"}
        exports:
          - {aoi_id: "a", insight_id: "i1", name: "pkg.zip.part", outputs: [o]}
          - {aoi_id: "a", insight_id: "i2", name: "pkg.zip", outputs: [o]}
        """
    assert problems(text) == [
        'm.yaml:4:5: exports[0]: output path "pkg.zip.part" is the download file (.part) of '
        "exports[1] (line 5)",
    ]


def test_path_conflicts_folder_prefix_and_part() -> None:
    # One template renders every entry at the same depth, so a manifest cannot make a file path
    # a folder of another; the check exists anyway and is tested directly.
    conflicts = manifest_module._path_conflicts
    assert list(conflicts(["a/b.zip", "a/b.zip/c.zip"])) == [(0, 1, "folder")]
    assert list(conflicts(["a/b.zip/c.zip", "a/b.zip"])) == [(1, 0, "folder")]
    assert list(conflicts(["x", "x.part/y"])) == [(0, 1, "part-folder")]
    assert list(conflicts(["x.part", "x"])) == [(0, 1, "part")]
    assert list(conflicts(["A/b", "a/B"])) == [(1, 0, "case")]
    nfd = unicodedata.normalize("NFD", "é")
    assert list(conflicts(["é", nfd])) == [(1, 0, "case")]
    assert list(conflicts(["a/b", "a/c", "b/a"])) == []


def test_identical_entries_are_merged_with_a_warning(loader: str) -> None:
    m = parse(
        """\
        version: 1
        exports:
          - &e {aoi_id: "a", insight_id: "i", outputs: [o, p]}
          - {aoi_id: "b", insight_id: "i", outputs: [o]}
          - {aoi_id: "a", insight_id: "i", outputs: [o, p, o], name: "i"}
          - *e
        """
    )
    assert [e.aoi_id for e in m.exports] == ["a", "b"]
    assert m.exports[0].line == 3
    assert m.warnings == (
        # an alias is the node it refers to: the position is the anchored entry's
        "m.yaml:3:5: exports[3]: identical to exports[0] (line 3); merged into it",
        "m.yaml:5:5: exports[2]: identical to exports[0] (line 3); merged into it",
    )


def test_same_path_with_different_selection_is_an_error_not_a_merge() -> None:
    text = """\
        version: 1
        exports:
          - {aoi_id: "a", insight_id: "i", outputs: [o, p]}
          - {aoi_id: "a", insight_id: "i", outputs: [p, o]}
        """
    assert only_problem(text) == (
        'm.yaml:4:5: exports[1]: output path "a/i/i.zip" is also the output path of exports[0] '
        "(line 3); set a distinct name or change output.path"
    )


def test_case_insensitive_collision_is_a_warning() -> None:
    m = parse(
        """\
        version: 1
        exports:
          - {aoi_id: "AOI", insight_id: "i", outputs: [o]}
          - {aoi_id: "aoi", insight_id: "i", outputs: [o]}
        """
    )
    assert len(m.exports) == 2
    assert m.warnings == (
        'm.yaml:4:5: exports[1]: output path "aoi/i/i.zip" differs from that of exports[0] (line '
        "3) only in letter case or Unicode form; they collide on case-insensitive file systems "
        "(macOS, Windows)",
    )


# -- all errors at once; syntax errors -----------------------------------------------------------


def test_all_errors_are_reported_at_once_in_position_order() -> None:
    text = """\
        version: 1
        limits:
          rate: 0
          in_flight: yes
        exports:
          - aoi_id: 012
            insight_id: "i"
            outputs: [o]
          - {aoi_id: "a", insight_id: on, outputs: [o], bogus: 1}
        api:
          token: x
        """
    lines = problems(text)
    assert lines == [
        "m.yaml:3:9: limits.rate: must be a number of requests/s above 0, got 0",
        "m.yaml:4:14: limits.in_flight: expected an integer; unquoted yes is read by YAML as the "
        "boolean true",
        "m.yaml:6:13: exports[0].aoi_id: expected a string; unquoted 012 is read by YAML as the "
        'integer 10 — quote it: "012"',
        "m.yaml:9:31: exports[1].insight_id: expected a string; unquoted on is read by YAML as the "
        'boolean true — quote it: "on"',
        "m.yaml:9:49: exports[1].bogus: unknown key bogus (known keys here: aoi_id, insight_id, "
        "inputs, outputs, name)",
        f"m.yaml:11:3: api.token: {LITERAL_KEY}",
    ]


@pytest.mark.parametrize(
    ("text", "position"),
    [
        (f'version: 1\napi:\n  key_env: "{SECRET}\n', None),
        (f"version: 1\napi: {{key_env: {SECRET}: x}}\n", None),
        (f"version: 1\napi:\n\tkey_env: {SECRET}\n", "m.yaml:3:1: "),
        (f"version: 1\napi:\n  key_env: [{SECRET}\n", None),
        (f"version: 1\napi:\n  key_env: *{SECRET}\n", "m.yaml:3:12: "),
        (f"version: 1\napi:\n  key_env: !{SECRET}!x y\n", "m.yaml:3:12: "),
        (f'version: 1\napi:\n  key_env: "\\q{SECRET}"\n', "m.yaml:3:"),
        (f"version: 1\napi:\n  key_env: {SECRET}\n  - x\n", None),
    ],
)
def test_syntax_errors_do_not_echo_the_source(loader: str, text: str, position: str | None) -> None:
    line = only_problem(text)
    assert line.startswith(position or "m.yaml:")
    assert ": (document): " in line
    assert SECRET not in line
    assert "sk-live" not in line
    assert "\n" not in line


def test_syntax_error_line_shape() -> None:
    line = only_problem("version: 1\nexports: [\n")
    assert line.startswith("m.yaml:3:1: (document): invalid YAML: ")


def test_control_character_in_the_text() -> None:
    assert only_problem("version: 1\x07\n") == (
        "m.yaml:1:11: (document): character U+0007 is not allowed in YAML text; write it as an "
        'escape inside a double-quoted string ("\\u0007")'
    )
    assert only_problem("version: 1\nexports:\n  - é\x00\n").startswith(
        "m.yaml:3:6: (document): character U+0000 is not allowed"
    )


# -- YAML bombs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "version: 1\nexports: &e [*e]\n",
        "version: 1\nexports:\n  - &m {aoi_id: *m}\n",
        "version: 1\nexports: &e\n  - - - *e\n",
    ],
)
def test_recursive_alias_is_rejected(loader: str, text: str) -> None:
    line = only_problem(text)
    assert "recursive alias: it refers to the node that contains it (anchored at line" in line


def test_undefined_alias(loader: str) -> None:
    assert only_problem(f"version: 1\nexports: *nope\n{MINIMAL[11:]}") == (
        "m.yaml:2:10: (document): alias to an anchor that is not defined before it"
    )


def test_billion_laughs_is_rejected(loader: str) -> None:
    levels = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for n in range(1, 10):
        prev, cur = chr(ord("a") + n - 1), chr(ord("a") + n)
        levels.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    line = only_problem("\n".join(levels) + "\n")
    # reported at the alias that expands most: the first *i of the last line
    assert line.startswith("m.yaml:10:8: (document): aliases would expand the document by ")
    assert "(the limit is 100,000): a YAML bomb?" in line


@pytest.mark.parametrize(("copies", "refused"), [(100, False), (101, True)])
def test_alias_expansion_limit_is_exact(copies: int, refused: bool) -> None:
    # An anchored list of 999 scalars is 1,000 nodes; each alias to it adds 1,000.
    items = ",".join(f'"s{i}"' for i in range(999))
    text = f"x: &l [{items}]\ny: [{','.join(['*l'] * copies)}]\n"
    lines = problems(text)
    assert any("YAML bomb" in line for line in lines) is refused


def test_deep_nesting_does_not_crash(loader: str) -> None:
    # libyaml refuses more than 1000 levels; the composer is iterative and takes any depth (PyYAML's
    # pure-Python scanner is quadratic in the flow depth, hence a smaller depth there)
    depth = 5000 if loader == "libyaml" else 1100
    line = only_problem(f"version: 1\nexports: {'[' * depth}{']' * depth}\n")
    assert line in (
        "m.yaml:2:11: exports[0]: expected a mapping with aoi_id and insight_id, got a list",
        "m.yaml:2:1009: (document): invalid YAML: exceeded maximum nesting depth (while "
        "increasing flow level started at line 2)",
    )


# -- big manifests -------------------------------------------------------------------------------


def big_manifest(n: int) -> str:
    lines = ["version: 1", "defaults:", "  outputs: [ndvi, cloud_mask]", "exports:"]
    for i in range(n):
        lines.append(f'  - aoi_id: "aoi{i % 97:03d}"')
        lines.append(f'    insight_id: "ins{i:06d}"')
        lines.append('    inputs: ["scene_2026_05_01"]')
    return "\n".join(lines) + "\n"


def test_ten_thousand_entries(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text(big_manifest(10_000), encoding="utf-8")
    m = load_manifest(path)
    assert len(m.exports) == 10_000
    assert m.exports[-1] == ExportSpec(
        "aoi008",
        "ins009999",
        ("scene_2026_05_01",),
        ("ndvi", "cloud_mask"),
        "ins009999",
        "aoi008/ins009999/ins009999.zip",
        5 + 3 * 9_999,
    )
    assert m.warnings == ()


# -- reading files -------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert info.value.problems == [
        f"{path}:1:1: (document): cannot read manifest: No such file or directory"
    ]


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as info:
        load_manifest(tmp_path)
    assert info.value.problems == [
        f"{tmp_path}:1:1: (document): cannot read manifest: Is a directory"
    ]


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_bytes(b'version: 1\nexports:\n  - aoi_id: "\xe9t\xe9"\n')
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert info.value.problems == [
        f"{path}:3:14: (document): the manifest is not UTF-8 text (byte 0xE9 cannot be decoded); "
        "save it as UTF-8"
    ]
    path.write_bytes(b"version: 1\n# \xc3\xa9\xff\n")  # the column counts characters
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert info.value.problems[0].startswith(f"{path}:2:4: (document): the manifest is not UTF-8")


def test_bom_and_crlf_are_fine(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + MINIMAL.replace("\n", "\r\n").encode())
    assert load_manifest(path).exports[0].relpath == "a/i/i.zip"


def test_errors_name_the_file_as_given(tmp_path: Path) -> None:
    path = tmp_path / "sub dir" / "m.yaml"
    path.parent.mkdir()
    path.write_text("version: 2\n" + MINIMAL[11:], encoding="utf-8")
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert info.value.problems == [
        f"{path}:1:10: version: unsupported manifest version 2; this batch-export reads version 1"
    ]


# -- JSON Schema and the example -----------------------------------------------------------------


def test_shipped_schema_equals_the_generated_one() -> None:
    shipped = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    assert shipped == manifest_json_schema(), (
        "batch_export/manifest.schema.json is stale; regenerate it with: python -c 'import json; "
        "from batch_export.manifest import manifest_json_schema as s; "
        "print(json.dumps(s(), indent=2, ensure_ascii=False))' > batch_export/manifest.schema.json"
    )
    jsonschema.Draft202012Validator.check_schema(shipped)


def test_example_validates_against_the_schema_and_the_validator() -> None:
    data = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    jsonschema.validate(data, manifest_json_schema(), cls=jsonschema.Draft202012Validator)
    m = load_manifest(EXAMPLE)
    assert m.api.url == "https://api.pixxel.space"
    assert m.api.key_env == "PIXXEL_API_KEY"
    assert m.output.dir == EXAMPLE.parent.absolute() / "exports"
    assert m.warnings == ()
    assert len(m.exports) == 3
    assert m.exports[1].outputs == ("ndvi", "cloud_mask")


@pytest.mark.parametrize(
    "text",
    [
        "version: 1\nexports: [{aoi_id: a, insight_id: b, bogus: 1}]\n",
        "version: 1\nlimits: {in_flight: 0}\nexports: [{aoi_id: a, insight_id: b}]\n",
        "version: 1\nlimits: {poll_interval: 5x}\nexports: [{aoi_id: a, insight_id: b}]\n",
        "version: 1\napi: {key: x}\nexports: [{aoi_id: a, insight_id: b}]\n",
        "version: 2\nexports: [{aoi_id: a, insight_id: b}]\n",
        "version: 1\nexports: []\n",
        "version: 1\napi: {url: ftp://x}\nexports: [{aoi_id: a, insight_id: b}]\n",
        "version: 1\napi: {key_env: 1X}\nexports: [{aoi_id: a, insight_id: b}]\n",
    ],
)
def test_schema_and_validator_agree_on_invalid_manifests(text: str) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(
            yaml.safe_load(text), manifest_json_schema(), cls=jsonschema.Draft202012Validator
        )
    problems(text)


# -- properties ----------------------------------------------------------------------------------


def double_quoted(text: str) -> str:
    return (
        '"'
        + "".join(c if " " <= c <= "~" and c not in '"\\' else f"\\U{ord(c):08x}" for c in text)
        + '"'
    )


def single_quoted(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# Any text an id may hold: no control characters (rejected: they reach URLs, logs and terminals)
# and not only dots ("." and ".." would be folded out of the request URL's path).
ANY_TEXT = st.text(st.characters(exclude_categories=("Cs", "Cc")), min_size=1, max_size=40).filter(
    lambda s: s.strip(".") != ""
)
LINE_TEXT = st.text(
    st.characters(categories=("L", "M", "N", "P", "S", "Zs"), exclude_characters="\ufeff"),
    min_size=1,
    max_size=40,
).filter(lambda s: s.strip(" ") == s)


@settings(max_examples=200, deadline=None)
@given(value=ANY_TEXT)
def test_double_quoted_strings_round_trip_exactly(value: str) -> None:
    quoted = double_quoted(value)
    m = parse(
        "version: 1\noutput: {path: 'x/{aoi_id}/{insight_id}/{name}.zip'}\nexports:\n"
        f"  - {{aoi_id: {quoted}, insight_id: {quoted}, name: {quoted}, outputs: [{quoted}]}}\n"
    )
    spec = m.exports[0]
    assert (spec.aoi_id, spec.insight_id, spec.name, spec.outputs) == (
        value,
        value,
        value,
        (value,),
    )


@settings(max_examples=200, deadline=None)
@given(value=LINE_TEXT)
def test_single_quoted_strings_round_trip_exactly(value: str) -> None:
    quoted = single_quoted(value)
    m = parse(
        "version: 1\noutput: {path: 'x/{aoi_id}/{insight_id}/{name}.zip'}\nexports:\n"
        f"  - aoi_id: {quoted}\n    insight_id: {quoted}\n    outputs: [{quoted}]\n"
    )
    assert (m.exports[0].aoi_id, m.exports[0].insight_id) == (value, value)


PATHISH = st.text(
    st.one_of(
        st.sampled_from(["/", "\\", ".", " ", "\x00", "\x1f", "\x7f", "C", "O", "N", "-", ":"]),
        st.characters(exclude_categories=("Cs",)),
    ),
    max_size=12,
)
TEMPLATES = [DEFAULT_PATH_TEMPLATE, "{name}", "{aoi_id}{insight_id}{name}", ".{name}", "{name}."]


def assert_safe_relpath(relpath: str) -> None:
    parts = PurePosixPath(relpath).parts
    assert not PurePosixPath(relpath).is_absolute()
    assert relpath.split("/") == list(parts)
    assert all(part not in ("", ".", "..") for part in parts)
    assert "\\" not in relpath
    assert parts[0].casefold() != ".batch-export"
    assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in relpath)
    assert all(len(part.encode()) <= 255 for part in parts)


@settings(max_examples=500, deadline=None)
@given(
    aoi_id=PATHISH,
    insight_id=PATHISH,
    name=PATHISH,
    template=st.sampled_from(TEMPLATES),
)
def test_sanitised_paths_never_escape(
    aoi_id: str, insight_id: str, name: str, template: str
) -> None:
    for value in (aoi_id, insight_id, name):
        safe = sanitize_path_value(value)
        assert safe and safe not in (".", "..")
        assert "/" not in safe and "\\" not in safe
        assert not safe.endswith((".", " "))
    try:
        relpath = render_relpath(template, aoi_id=aoi_id, insight_id=insight_id, name=name)
    except ValueError as exc:
        assert "state dir" in str(exc) or "bytes long" in str(exc)
        return
    assert_safe_relpath(relpath)


def test_render_relpath_rejects_the_state_dir_and_bad_templates() -> None:
    with pytest.raises(ValueError, match="state dir"):
        render_relpath(DEFAULT_PATH_TEMPLATE, aoi_id=".batch-export", insight_id="i", name="n")
    with pytest.raises(ValueError, match="format specs"):
        render_relpath("{name:>9}", aoi_id="a", insight_id="i", name="n")


@pytest.mark.parametrize("value", [".", "..", "...", "a\\u001b[2J", "b\\u0000c", "x\\u009b"])
def test_dots_and_control_characters_in_ids_are_sanitised_in_the_path(
    tmp_path: Path, value: str
) -> None:
    path = tmp_path / "m.yaml"
    quoted = f'"{value}"'
    path.write_text(
        f"version: 1\nexports:\n  - {{aoi_id: {quoted}, insight_id: {quoted}, name: {quoted}, outputs: [{quoted}]}}\n"
    )
    spec = load_manifest(path).exports[0]
    decoded = json.loads(quoted)
    assert (spec.aoi_id, spec.insight_id, spec.name, spec.outputs) == (
        decoded,
        decoded,
        decoded,
        (decoded,),
    )
    parts = PurePosixPath(spec.relpath).parts
    assert ".." not in parts and "." not in parts
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in spec.relpath)


def test_bidi_overrides_are_removed_from_paths() -> None:
    assert sanitize_path_value("\u202egpj.exe") == "gpj.exe"
    assert sanitize_path_value("a\u2066b\u200fc") == "abc"
