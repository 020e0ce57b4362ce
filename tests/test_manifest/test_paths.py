"""Output path templates, sanitising and collisions of output paths."""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import batch_export.manifest._paths as paths_module
from batch_export.manifest import (
    DEFAULT_PATH_TEMPLATE,
    load_manifest,
    render_name,
    render_relpath,
    sanitize_path_value,
)
from tests.test_manifest.helpers import (
    MINIMAL,
    one_export,
    only_problem,
    parse,
    problems,
)

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
    conflicts = paths_module.path_conflicts
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


# -- {insight_name} and {created_date} (SPEC §7) ---------------------------------------------------


def test_template_field_messages_list_every_field() -> None:
    assert only_problem(one_export() + 'output: {path: "{foo}.zip"}\n') == (
        "m.yaml:6:16: output.path: unknown field {foo} in the path template; the fields are "
        "{aoi_id}, {insight_id}, {name}, {insight_name} and {created_date}"
    )
    assert only_problem(one_export() + 'output: {path: "{insight}.zip"}\n') == (
        "m.yaml:6:16: output.path: unknown field {insight} in the path template (did you mean "
        "{insight_id}?); the fields are {aoi_id}, {insight_id}, {name}, {insight_name} and "
        "{created_date}"
    )


def test_insight_name_of_an_explicit_entry_is_its_name() -> None:
    m = parse(
        one_export(name='"my/field"')
        + 'output: {path: "{aoi_id}/{insight_name}/{insight_id}.zip"}\n'
    )
    assert m.exports[0].relpath == "a/my_field/i.zip"
    m = parse(one_export() + 'output: {path: "{insight_name}.zip"}\n')
    assert m.exports[0].relpath == "i.zip"


def test_created_date_is_refused_with_explicit_exports() -> None:
    assert only_problem(one_export() + 'output: {path: "{created_date}/{name}.zip"}\n') == (
        "m.yaml:6:16: output.path: {created_date} is the creation date of a discovered insight; "
        "explicit exports: entries have none (use it only in a manifest without exports:, or in "
        "a discover: selector's name)"
    )
    m = parse(
        'version: 1\noutput: {path: "{created_date}/{insight_name}.zip"}\n'
        "discover: [{aois: all, outputs: all}]\n"
    )
    assert m.output.path == "{created_date}/{insight_name}.zip"


def test_render_relpath_with_the_discovery_fields() -> None:
    template = "{aoi_id}/{created_date}/{insight_name}/{name}.zip"
    assert (
        render_relpath(
            template,
            aoi_id="a",
            insight_id="i",
            name="n",
            insight_name="../x\u202e",
            created_date="2026-11-30",
        )
        == "a/2026-11-30/.._x/n.zip"
    )
    with pytest.raises(ValueError, match=r"^\{created_date\} is the creation date"):
        render_relpath(template, aoi_id="a", insight_id="i", name="n")


def test_render_name_substitutes_raw_values() -> None:
    assert (
        render_name(
            "{insight_name}-{created_date}",
            aoi_id="a",
            insight_id="i",
            insight_name="x/y",
            created_date="2026-11-30",
        )
        == "x/y-2026-11-30"
    )
    assert (
        render_name("{{{aoi_id}}}", aoi_id="a", insight_id="", insight_name="", created_date="")
        == "{a}"
    )
    for bad, message in [
        ("", "the name template is empty"),
        ("{name}", "unknown field {name} in the name template"),
        ("{insight_id:>9}", "{insight_id:>9}: format specs are not allowed in the name template"),
        ("{aoi_id", "unbalanced braces in the name template"),
        ("a\x01{aoi_id}", "control characters are not allowed in the name template"),
    ]:
        with pytest.raises(ValueError, match="^" + re.escape(message)):
            render_name(bad, aoi_id="a", insight_id="i", insight_name="n", created_date="d")
