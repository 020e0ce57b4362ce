"""Unattended progress (SPEC §9): stderr not a terminal -> a progress line every --progress-interval."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from batch_export.sandbox import Sandbox, SandboxConfig
from tests.fakes import clean_env, sandbox_thread

KEY = "progress-key-5e4d"
LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO    progress: queued \d+ requesting \d+ "
    r"preparing \d+ (ready \d+ )?downloading \d+ (verifying \d+ )?done \d+ failed \d+ "
    r"\| \d+(\.\d)? [kMGT]?B at \d+(\.\d)? [kMGT]?B/s \| ETA (unknown|\d+[dhms]\S*)$"
)


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    config = SandboxConfig(keys=(KEY,), asset_size=200_000, rate=None, prepare_seconds=1.0)
    with sandbox_thread(config) as sb:
        yield sb


def manifest(tmp_path: Path, sandbox: Sandbox) -> Path:
    aoi = sandbox.catalog.aois[0]
    lines = ["version: 1", "limits: {poll_interval: 0.2s, rate: 50}", "exports:"]
    for ins in aoi.insights[:3]:
        lines.append(
            f'  - {{aoi_id: "{aoi.id}", insight_id: "{ins.id}", outputs: ["{ins.outputs[0]}"]}}'
        )
    path = tmp_path / "m.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run(tmp_path: Path, sandbox: Sandbox, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "batch_export",
            "run",
            str(manifest(tmp_path, sandbox)),
            "--api-url",
            sandbox.api_url,
            *args,
        ],
        capture_output=True,  # stderr is a pipe, not a terminal
        text=True,
        env=clean_env(PIXXEL_API_KEY=KEY),
        timeout=120,
        check=False,
    )


def test_progress_lines_without_a_terminal(sandbox: Sandbox, tmp_path: Path) -> None:
    proc = run(tmp_path, sandbox, "--progress-interval", "0.25s")
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "progress:" in line]
    assert lines, proc.stderr
    assert all(LINE.match(line) for line in lines), lines
    assert "\x1b[" not in proc.stderr  # no live display drawn into a pipe


def test_progress_json_lines_carry_the_same_fields(sandbox: Sandbox, tmp_path: Path) -> None:
    proc = run(tmp_path, sandbox, "--progress-interval", "0.25s", "--log-format", "json")
    assert proc.returncode == 0, proc.stderr
    docs = [json.loads(line) for line in proc.stderr.splitlines()]
    progress = [doc for doc in docs if doc["event"] == "progress"]
    assert progress
    for doc in progress:
        assert doc["message"].startswith("progress: queued ")
        assert sum(doc["counts"].values()) == 3
        assert doc["message"].startswith(
            f"progress: queued {doc['counts']['queued']} "
            f"requesting {doc['counts']['requesting']} preparing {doc['counts']['preparing']} "
        )
        assert isinstance(doc["bytes"], int)
        assert doc["eta_seconds"] is None or doc["eta_seconds"] >= 0
        assert ("ETA unknown" in doc["message"]) == (doc["eta_seconds"] is None)


def test_no_progress_lines_when_quiet_or_interval_zero(sandbox: Sandbox, tmp_path: Path) -> None:
    quiet = run(tmp_path, sandbox, "--progress-interval", "0.25s", "-q")
    assert (quiet.returncode, quiet.stderr) == (0, "")
    off = run(tmp_path, sandbox, "--progress-interval", "0", "--force")
    assert off.returncode == 0
    assert "progress:" not in off.stderr
