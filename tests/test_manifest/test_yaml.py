"""YAML composition: retyped scalars and keys, syntax errors, control characters, bombs, quoting round trips."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batch_export.manifest import (
    Manifest,
)
from tests.test_manifest.helpers import (
    MINIMAL,
    SECRET,
    one_export,
    only_problem,
    parse,
    problems,
)

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
        "defaults, exports, discover)"
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


TAB_MESSAGE = (
    "(document): invalid YAML: found a tab character where YAML does not allow one; indent with "
    "spaces, not tabs"
)


@pytest.mark.parametrize(
    ("text", "position"),
    [
        ("version: 1\nexports:\n\t- aoi_id: a\n", "m.yaml:3:1"),
        ('version: 1\nexports:\n  - aoi_id: "é"\n\t  insight_id: i\n', "m.yaml:4:1"),
        ("version: 1\nlimits:\n  rate: 1\n\tin_flight: 2\n", "m.yaml:4:1"),
    ],
)
def test_a_tab_is_named_as_a_tab(loader: str, text: str, position: str) -> None:
    assert only_problem(text) == f"{position}: {TAB_MESSAGE}"


def test_a_tab_inside_a_flow_mapping_is_white_space() -> None:
    m = parse('version: 1\nexports: [{aoi_id: a,\tinsight_id: i, outputs: ["o"]}]\n')
    assert m.exports[0].insight_id == "i"
