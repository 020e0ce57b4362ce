"""Checks of single nodes: numbers, durations, duplicate and unknown keys, secrets, the api section, paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import batch_export.manifest as manifest_module
from batch_export.manifest import (
    load_manifest,
)
from tests.test_manifest.helpers import (
    LITERAL_KEY,
    MINIMAL,
    SECRET,
    only_problem,
    parse,
    problems,
)

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
        "api, limits, output, defaults, exports, discover)",
        "m.yaml:4:3: api.urll: unknown key urll; did you mean url? (known keys here: url, key_env, "
        "key_file, ready_statuses, failed_statuses)",
        "m.yaml:6:3: limits.inflight: unknown key inflight; did you mean in_flight? (known keys "
        "here: in_flight, downloads, rate, poll_interval, poll_max_interval, poll_timeout, retries, "
        "read_timeout, connections, segment_min, give_up_after)",
        "m.yaml:8:3: output.folder: unknown key folder (known keys here: dir, path)",
        "m.yaml:10:3: defaults.output: unknown key output; did you mean outputs? (known keys here: "
        "inputs, outputs)",
        "m.yaml:15:5: exports[0].inptus: unknown key inptus; did you mean inputs? (known keys "
        "here: aoi_id, insight_id, inputs, outputs, name)",
    ]


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


# -- the limits of segmented downloads and abandoned jobs (SPEC §3, §4, §9) -----------------------


@pytest.mark.parametrize(
    ("body", "key", "value"),
    [
        ("connections: 1", "connections", 1),
        ("connections: 256", "connections", 256),
        ("give_up_after: 1", "give_up_after", 1),
        ("segment_min: 1", "segment_min", 1),
        ("segment_min: 33554432", "segment_min", 32 * 2**20),
        ("segment_min: 32MiB", "segment_min", 32 * 2**20),
        ("segment_min: 32 MiB", "segment_min", 32 * 2**20),
        ("segment_min: 1GiB", "segment_min", 2**30),
        ("segment_min: 1.5GiB", "segment_min", 3 * 2**29),
        ("segment_min: 500MB", "segment_min", 500_000_000),
        ("segment_min: 64kB", "segment_min", 64_000),
        ("segment_min: 64KiB", "segment_min", 65_536),
        ("segment_min: 1TiB", "segment_min", 2**40),
        ('segment_min: "10B"', "segment_min", 10),
    ],
)
def test_new_limits_accepted(body: str, key: str, value: int) -> None:
    m = parse(limits(body))
    assert getattr(m.limits, key) == value
    assert isinstance(getattr(m.limits, key), int)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("connections: 0", "m.yaml:3:16: limits.connections: must be between 1 and 256, got 0"),
        (
            "connections: yes",
            "m.yaml:3:16: limits.connections: expected an integer; unquoted yes is read by YAML "
            "as the boolean true",
        ),
        (
            "give_up_after: 0",
            "m.yaml:3:18: limits.give_up_after: must be between 1 and 1000, got 0",
        ),
        (
            "give_up_after: 2.5",
            "m.yaml:3:18: limits.give_up_after: expected a whole number, got 2.5",
        ),
        (
            "segment_min: 0",
            "m.yaml:3:16: limits.segment_min: must be between 1 and 1,099,511,627,776 bytes, got 0",
        ),
        (
            "segment_min: 2TiB",
            "m.yaml:3:16: limits.segment_min: must be between 1 and 1,099,511,627,776 bytes, got "
            "2,199,023,255,552",
        ),
        (
            "segment_min: 1.5",
            "m.yaml:3:16: limits.segment_min: expected a whole number of bytes, got 1.5",
        ),
        (
            'segment_min: "32"',
            "m.yaml:3:16: limits.segment_min: expected a size such as 32MiB, 1GiB, 500MB or a "
            'number of bytes, got "32" (remove the quotes for a number of bytes)',
        ),
        (
            "segment_min: 32XB",
            "m.yaml:3:16: limits.segment_min: expected a size such as 32MiB, 1GiB, 500MB or a "
            'number of bytes, got "32XB"',
        ),
        (
            "segment_min: 32mib",
            "m.yaml:3:16: limits.segment_min: expected a size such as 32MiB, 1GiB, 500MB or a "
            'number of bytes, got "32mib"',
        ),
        (
            "segment_min: [1]",
            "m.yaml:3:16: limits.segment_min: expected a size such as 32MiB, 1GiB, 500MB or a "
            "number of bytes, got a list",
        ),
        (
            "segment_min: no",
            "m.yaml:3:16: limits.segment_min: expected a size such as 32MiB, 1GiB, 500MB or a "
            "number of bytes, got the boolean false",
        ),
        (
            "segment_min: 0x10",
            "m.yaml:3:16: limits.segment_min: write a plain decimal number: YAML 1.1 reads "
            "unquoted 0x10 as the integer 16",
        ),
    ],
)
def test_new_limits_rejected(body: str, message: str) -> None:
    assert only_problem(limits(body)) == message


# -- output.dir as an object-store URL (SPEC §8) ---------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "url"),
    [
        ("s3://bucket/prefix", "s3://bucket/prefix"),
        ("s3://bucket/pre/fix/", "s3://bucket/pre/fix"),
        ("S3://Bucket/x", "s3://Bucket/x"),
        ("s3://bucket", "s3://bucket"),
        ("s3://bucket/", "s3://bucket"),
        ("gs://b/p", "gs://b/p"),
        ("az://container/p", "az://container/p"),
    ],
)
def test_output_dir_object_store_url_is_kept_as_a_url(raw: str, url: str) -> None:
    m = parse(f'version: 1\noutput: {{dir: "{raw}"}}\n{MINIMAL[11:]}', path="/srv/m/m.yaml")
    assert m.out_url == url
    assert m.output.url == url
    assert m.output.dir is None


def test_output_dir_folder_has_no_url() -> None:
    m = parse(f"version: 1\noutput: {{dir: out}}\n{MINIMAL[11:]}", path="/srv/m/m.yaml")
    assert m.out_url is None
    assert m.output.dir == Path("/srv/m/out")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            "http://host/x",
            "http:// is not an object store batch-export writes to; use a local folder or "
            "s3://bucket/prefix, gs://bucket/prefix or az://container/prefix",
        ),
        (
            "s3 x://b",
            "this URL scheme is not an object store batch-export writes to; use a local folder "
            "or s3://bucket/prefix, gs://bucket/prefix or az://container/prefix",
        ),
        ("s3://", "names no bucket; write s3://bucket/prefix"),
        ("S3:///prefix", "names no bucket; write s3://bucket/prefix"),
        (
            f"s3://AKIA:{SECRET}@bucket/x",
            "must not hold credentials (user@ or key@): they come from the store's standard "
            "environment and files, never from the manifest (value not shown)",
        ),
        (
            "s3://bucket:9000/x",
            "the bucket must not carry a port; name an S3-compatible endpoint with "
            "AWS_ENDPOINT_URL",
        ),
        (
            "s3://b/x?versionId=1",
            "an object-store URL must not have a query (?...) or fragment (#...)",
        ),
        ("gs://b/a b", "an object-store URL must not contain white space or control characters"),
    ],
)
def test_output_dir_bad_object_store_urls(raw: str, message: str) -> None:
    line = only_problem(f'version: 1\noutput: {{dir: "{raw}"}}\n{MINIMAL[11:]}')
    assert line == f"m.yaml:2:15: output.dir: {message}"
    assert SECRET not in line


@pytest.mark.parametrize("raw", ["s3:/bucket/x", "S3:bucket", "gs:/b", "az:c"])
def test_output_dir_object_store_url_with_one_slash_is_a_typo(raw: str) -> None:
    scheme = raw[:2].lower()
    assert only_problem(f'version: 1\noutput: {{dir: "{raw}"}}\n{MINIMAL[11:]}') == (
        f"m.yaml:2:15: output.dir: an object-store URL starts with {scheme}:// (two slashes), as "
        f"in {scheme}://bucket/prefix; for a local folder named {scheme}: write ./{scheme}:"
    )


def test_output_dir_folder_that_merely_starts_like_a_scheme() -> None:
    m = parse(f'version: 1\noutput: {{dir: "s3data"}}\n{MINIMAL[11:]}', path="/srv/m/m.yaml")
    assert m.output.dir == Path("/srv/m/s3data")
