"""The ``loader`` fixture: run a manifest test with libyaml's event stream and with the pure-Python one."""

from __future__ import annotations

import pytest
import yaml

import batch_export.manifest._yaml as yaml_module
from tests.test_manifest.helpers import LOADERS


@pytest.fixture(params=LOADERS)
def loader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with libyaml's event stream and with PyYAML's pure-Python one."""
    name: str = request.param
    if name == "python":
        monkeypatch.setattr(yaml_module, "_LOADER", yaml.SafeLoader)
    return name
