"""Nothing the tool writes under the state dir follows a symlink out of it (issue 16 item 4).

A symlinked ``reports``, ``lock``, state store (or its journal files) or default staging folder is
refused at start, exit 2 with one line naming it, before any request and without writing through
the link.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from batch_export.config import state_dir_links
from batch_export.errors import UsageError
from batch_export.sandbox import Sandbox, SandboxConfig
from tests.fakes import clean_env, cli_in_process, sandbox_thread

KEY = "link-key-1b2c"


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with sandbox_thread(SandboxConfig(keys=(KEY,), rate=None, asset_size=100)) as sb:
        yield sb


@pytest.mark.parametrize(
    ("entry", "is_dir"),
    [
        ("reports", True),
        ("lock", False),
        ("state.sqlite3", False),
        ("state.sqlite3-wal", False),
        ("state.sqlite3-journal", False),
    ],
)
def test_a_symlinked_state_dir_entry_is_refused_at_start(
    sandbox: Sandbox, tmp_path: Path, entry: str, is_dir: bool
) -> None:
    aoi = sandbox.catalog.aois[0]
    insight = aoi.insights[0]
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        f"""version: 1
api: {{url: "{sandbox.api_url}"}}
limits: {{poll_interval: 0.05s, rate: 100}}
output: {{dir: out}}
exports:
  - {{aoi_id: "{aoi.id}", insight_id: "{insight.id}", name: "n", outputs: ["{insight.outputs[0]}"]}}
"""
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = elsewhere / "thing"
    if is_dir:
        target.mkdir()
    state = tmp_path / "out" / ".batch-export"
    state.mkdir(parents=True)
    (state / entry).symlink_to(target)
    before = len(sandbox.requests)
    # The refusal in this process (tests/fakes.py); the run that goes ahead below is a real one.
    args = ["run", str(manifest), "--no-progress"]
    proc = cli_in_process(args, env={"PIXXEL_API_KEY": KEY}, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"{state / entry} is a symbolic link" in lines[0]
    assert sorted(p.name for p in elsewhere.rglob("*")) == (["thing"] if is_dir else [])
    assert len(sandbox.requests) == before
    (state / entry).unlink()  # without the link the same run goes ahead
    again = subprocess.run(
        [sys.executable, "-m", "batch_export", "run", str(manifest), "--no-progress"],
        capture_output=True,
        text=True,
        env=clean_env(PIXXEL_API_KEY=KEY),
        cwd=tmp_path,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr


def test_the_default_staging_folder_is_checked_too(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "staging").symlink_to(tmp_path)
    with pytest.raises(UsageError, match="staging is a symbolic link"):
        state_dir_links(state, also=(state / "staging",))
    state_dir_links(state, also=())  # a folder output does not stage there
    state_dir_links(tmp_path / "missing", also=())  # nothing there yet: nothing to refuse
