"""Cron-style runs (no terminal, ``-q``): one line when something needs a look, none otherwise.

cron mails whatever a job prints. A run stopped by its time budget (exit 3, planned: the next run
continues) printed a ``stopping (max_runtime)`` warning before the summary, two lines for one fact.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from batch_export.sandbox import Sandbox, SandboxConfig
from tests.fakes import clean_env, sandbox_thread

KEY = "cron-key-9a0f"


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    # Packages that are not ready for a minute: the time budget always ends the run first.
    config = SandboxConfig(keys=(KEY,), asset_size=1_000, rate=None, prepare_seconds=60.0)
    with sandbox_thread(config) as sb:
        yield sb


def test_a_quiet_run_stopped_by_its_time_budget_prints_one_line(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    aoi = sandbox.catalog.aois[0]
    insight = aoi.insights[0]
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        f'version: 1\napi: {{url: "{sandbox.api_url}"}}\n'
        "limits: {rate: 50, poll_interval: 0.1s, poll_max_interval: 0.2s}\nexports:\n"
        f'  - {{aoi_id: "{aoi.id}", insight_id: "{insight.id}", '
        f'outputs: ["{insight.outputs[0]}"]}}\n'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "batch_export", "run", str(manifest), "-q", "--max-runtime", "1s"],
        capture_output=True,
        text=True,
        env=clean_env(PIXXEL_API_KEY=KEY),
        stdin=subprocess.DEVNULL,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 3
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert " WARNING summary: 1 job(s): 0 downloaded, 0 skipped, 0 failed, 1 pending" in lines[0]
    assert "; exit 3; report " in lines[0]
