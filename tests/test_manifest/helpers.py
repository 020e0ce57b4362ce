"""Shared helpers of the manifest tests: parse a text, collect its problems."""

from __future__ import annotations

from pathlib import Path
from textwrap import dedent

import pytest
import yaml

from batch_export.errors import ManifestError
from batch_export.manifest import Manifest, parse_manifest

REPO = Path(__file__).resolve().parents[2]
SCHEMA_FILE = REPO / "batch_export" / "manifest.schema.json"
EXAMPLE = REPO / "manifests" / "example.yaml"
SECRET = "sk-live-0123456789abcdefSECRET"

LOADERS = ["libyaml", "python"] if yaml.__with_libyaml__ else ["python"]


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


LITERAL_KEY = (
    "the API key must not be written in the manifest; name an environment variable in "
    "api.key_env or a file in api.key_file"
)
