"""Whole manifests: the happy path, version/exports, defaults, all errors at once, big files, reading."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

import batch_export.manifest as manifest_module
from batch_export.errors import ManifestError
from batch_export.manifest import (
    DEFAULT_PATH_TEMPLATE,
    ExportSpec,
    load_manifest,
)
from tests.test_manifest.helpers import (
    LITERAL_KEY,
    MINIMAL,
    one_export,
    only_problem,
    parse,
    problems,
)

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
            source="exports[0]",
        ),
        ExportSpec(
            "6f1c2e", "c0ffee", (), ("ndvi",), "c0ffee", "6f1c2e/c0ffee/c0ffee.zip", 8, "exports[1]"
        ),
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
        "m.yaml:1:1: (document): missing required key exports (or discover:)",
    ]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("[]", "m.yaml:2:10: exports: expected at least one export (or a discover: selector)"),
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
        "exports[9999]",
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


def test_each_export_names_its_source_and_a_merged_one_keeps_the_first() -> None:
    m = parse(
        """\
        version: 1
        exports:
          - {aoi_id: a, insight_id: i, outputs: [o]}
          - {aoi_id: a, insight_id: j, outputs: [o]}
          - {aoi_id: a, insight_id: i, outputs: [o]}
          - {aoi_id: a, insight_id: k, outputs: [o]}
        """
    )
    assert [(e.insight_id, e.source) for e in m.exports] == [
        ("i", "exports[0]"),
        ("j", "exports[1]"),
        ("k", "exports[3]"),
    ]
    assert m.warnings == (
        "m.yaml:5:5: exports[2]: identical to exports[0] (line 3); merged into it",
    )
