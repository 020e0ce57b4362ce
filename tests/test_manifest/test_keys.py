"""The key table's JSON Schema: shipped file up to date, the example and invalid manifests agree."""

from __future__ import annotations

import json

import jsonschema
import pytest
import yaml

from batch_export.manifest import (
    load_manifest,
    manifest_json_schema,
)
from tests.test_manifest.helpers import (
    EXAMPLE,
    SCHEMA_FILE,
    parse,
    problems,
)

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


VALID_DISCOVER = [
    'version: 1\ndiscover: [{aois: ["a"], outputs: all}]\n',
    "version: 1\ndiscover: [{aois: all, inputs: [s], created_after: 30d, status: [done]}]\n",
    'version: 1\ndiscover: [{projects: [p], outputs: all, created_after: "2026-11-01T00:00:00Z"}]\n',
    'version: 1\ndiscover: [{aois: all, outputs: all, name: "{insight_name}", name_glob: "n*"}]\n'
    'output: {dir: "s3://b/p", path: "{created_date}/{name}.zip"}\n',
    "version: 1\nexports: []\ndiscover: [{aois: all, outputs: all}]\n",
    "version: 1\ndiscover: []\nexports: [{aoi_id: a, insight_id: b, outputs: [o]}]\n",
    "version: 1\nlimits: {connections: 8, segment_min: 32MiB, give_up_after: 3}\n"
    "exports: [{aoi_id: a, insight_id: b, outputs: [o]}]\n",
    "version: 1\nlimits: {segment_min: 1048576}\nexports: [{aoi_id: a, insight_id: b, outputs: [o]}]\n",
]


@pytest.mark.parametrize("text", VALID_DISCOVER)
def test_schema_and_validator_accept_discover_and_the_new_limits(text: str) -> None:
    jsonschema.validate(
        yaml.safe_load(text), manifest_json_schema(), cls=jsonschema.Draft202012Validator
    )
    parse(text)


@pytest.mark.parametrize(
    "text",
    [
        "version: 1\ndiscover: []\n",
        "version: 1\nexports: []\ndiscover: []\n",
        "version: 1\n",
        "version: 1\ndiscover: [{outputs: all}]\n",
        "version: 1\ndiscover: [{aois: all, projects: [p], outputs: all}]\n",
        "version: 1\ndiscover: [{aois: any, outputs: all}]\n",
        "version: 1\ndiscover: [{aois: [], outputs: all}]\n",
        "version: 1\ndiscover: [{aois: all, outputs: all, bogus: 1}]\n",
        "version: 1\ndiscover: [{aois: all, outputs: all, created_after: yesterday}]\n",
        "version: 1\ndiscover: [{aois: all, outputs: everything}]\n",
        "version: 1\nlimits: {connections: 0}\ndiscover: [{aois: all, outputs: all}]\n",
        "version: 1\nlimits: {segment_min: 32XB}\ndiscover: [{aois: all, outputs: all}]\n",
        "version: 1\nlimits: {give_up_after: 0}\ndiscover: [{aois: all, outputs: all}]\n",
    ],
)
def test_schema_and_validator_agree_on_invalid_discover_manifests(text: str) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(
            yaml.safe_load(text), manifest_json_schema(), cls=jsonschema.Draft202012Validator
        )
    problems(text)


def test_schema_documents_the_new_defaults() -> None:
    limits = manifest_json_schema()["properties"]["limits"]["properties"]
    assert limits["connections"]["default"] == 8
    assert limits["segment_min"]["default"] == "32MiB"
    assert limits["give_up_after"]["default"] == 3
    selector = manifest_json_schema()["properties"]["discover"]["items"]
    assert sorted(selector["properties"]) == sorted(
        ["aois", "projects", "status", "created_after", "name_glob", "inputs", "outputs", "name"]
    )
    assert selector["additionalProperties"] is False
