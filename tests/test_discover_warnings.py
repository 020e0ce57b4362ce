"""A paged selector that lists no AOI is a warning, not silence (issue 16 item 5)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from batch_export.sandbox import Sandbox, SandboxConfig
from tests.fakes import cli_process, sandbox_thread

KEY = "warn-key-60aa"


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    with sandbox_thread(SandboxConfig(keys=(KEY,), rate=None, asset_size=100)) as sb:
        yield sb


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return cli_process(*args, key=KEY, cwd=cwd)


def test_a_project_without_aois_is_a_warning_in_discover_and_the_report(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        f"""version: 1
api: {{url: "{sandbox.api_url}"}}
limits: {{rate: 500}}
output: {{dir: out}}
discover:
  - projects: ["prj-nope"]
    outputs: all
"""
    )
    message = "project(s) prj-nope list no AOI this key can see (a typo?)"
    shown = cli("discover", str(manifest), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr  # a warning, not a failure
    assert f"  AOI listing: warning: {message}" in shown.stdout.splitlines()
    as_json = cli("discover", str(manifest), "--json", cwd=tmp_path)
    assert json.loads(as_json.stdout)["selectors"] == [
        {
            "selector": 0,
            "aois": [
                {
                    "aoi_id": None,
                    "error": None,
                    "insights": [],
                    "warning": {"code": "no_aois", "message": message},
                }
            ],
        }
    ]
    run = cli("run", str(manifest), "--no-progress", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert f"discover[0] AOI listing: {message}" in run.stderr
    [report] = (tmp_path / "out" / ".batch-export" / "reports").glob("*.json")
    assert json.loads(report.read_text())["discovery"] == [
        {
            "selector": 0,
            "aoi_id": None,
            "listed": 0,
            "selected": 0,
            "error": None,
            "warning": {"code": "no_aois", "message": message},
        }
    ]
