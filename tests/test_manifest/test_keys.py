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
