"""A path the state store records as another job's done file is never replaced (data loss, issue 16).

The check of run 1 compares the run's own jobs; these tests change what a later run lists or
names so that a different job of a later run gets the same path, and assert the file on disk is
still the first job's, byte for byte, with the later job failing ``path_clash`` without a request.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from batch_export.sandbox import Sandbox, SandboxConfig
from tests.fakes import cli_process, sandbox_thread

KEY = "owner-key-77c1"
AOI_INDEX = 0


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    config = SandboxConfig(keys=(KEY,), rate=None, asset_size=900)
    with sandbox_thread(config) as sb:
        yield sb


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return cli_process(*args, key=KEY, cwd=cwd)


def report_of(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The run's own report, named by its summary line (report names sort by second only)."""
    found = re.findall(r"; report (\S+\.json)", proc.stderr)
    assert len(found) == 1, proc.stderr
    return json.loads(Path(found[0]).read_text())  # type: ignore[no-any-return]


LIMITS = "limits: {rate: 500, poll_interval: 0.05s, poll_max_interval: 0.1s, retries: 1}"


def test_a_later_discovered_insight_never_replaces_a_done_file(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    aoi = sandbox.catalog.aois[AOI_INDEX]
    added = [sandbox.listing.add_insight(aoi.id, name=f"dup-{n}")[1] for n in range(3)]
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        f"""version: 1
api: {{url: "{sandbox.api_url}"}}
{LIMITS}
output: {{dir: out, path: "{{aoi_id}}/{{name}}.zip"}}
discover:
  - aois: ["{aoi.id}"]
    name_glob: "dup-*"
    outputs: all
    name: "{{created_date}}"
"""
    )
    first = cli("run", str(manifest), "--no-progress", cwd=tmp_path)
    assert first.returncode == 1, first.stderr
    jobs = report_of(first)["jobs"]
    done = [j for j in jobs if j["outcome"] == "downloaded"]
    assert len(done) == 1
    assert (
        sorted(j["error"]["code"] for j in jobs if j["outcome"] == "failed") == ["path_clash"] * 2
    )
    winner = next(i for i in added if i.id == done[0]["insight_id"])
    path = Path(done[0]["path"])
    before = path.read_bytes()
    assert hashlib.sha256(before).hexdigest() == done[0]["sha256"]

    sandbox.listing.update_insight(winner.id, deleted=True)
    puts = len(sandbox.requests_to("api", "PUT"))
    second = cli("run", str(manifest), "--no-progress", cwd=tmp_path)
    assert second.returncode == 1, second.stderr
    assert "Traceback" not in second.stderr
    assert path.read_bytes() == before  # the first job's package, untouched
    assert not path.with_name(path.name + ".part").exists()
    assert len(sandbox.requests_to("api", "PUT")) == puts  # the loser sent nothing
    jobs = report_of(second)["jobs"]
    failed = [j for j in jobs if j["outcome"] == "failed"]
    assert [j["error"]["code"] for j in failed] == ["path_clash", "path_clash"]
    # The listing's first live insight meets the stored done file; the next one meets it in-run.
    stored = [j for j in failed if "in the state store" in j["error"]["message"]]
    assert len(stored) == 1
    assert f"insight '{winner.id}'" in stored[0]["error"]["message"]
    status = cli("status", str(manifest), "--json", cwd=tmp_path)
    rows = [r for r in json.loads(status.stdout)["jobs"] if r["state"] == "done"]
    assert [r["insight_id"] for r in rows] == [winner.id]


def _explicit(sandbox: Sandbox, insight: Any, outputs: tuple[str, ...], name: str) -> str:
    aoi = next(a for a in sandbox.catalog.aois if insight in a.insights)
    return f"""version: 1
api: {{url: "{sandbox.api_url}"}}
{LIMITS}
output: {{dir: out, path: "{{name}}.zip"}}
exports:
  - aoi_id: "{aoi.id}"
    insight_id: "{insight.id}"
    name: "{name}"
    outputs: {json.dumps(list(outputs))}
"""


def _two_insights(sandbox: Sandbox) -> tuple[Any, Any]:
    usable = [
        i
        for a in sandbox.catalog.aois
        for i in a.insights
        if i.status == "completed" and i.deleted_at is None and len(i.outputs) >= 2
    ]
    return usable[0], usable[1]


def test_an_edited_entry_of_the_same_insight_supersedes_its_old_file(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    insight, _ = _two_insights(sandbox)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(_explicit(sandbox, insight, insight.outputs, "pkg"))
    assert cli("run", str(manifest), "--no-progress", cwd=tmp_path).returncode == 0
    # Same path, fewer outputs: a new job key over the old done file of the same insight.
    manifest.write_text(_explicit(sandbox, insight, insight.outputs[:1], "pkg"))
    second = cli("run", str(manifest), "--no-progress", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    [job] = report_of(second)["jobs"]
    assert job["outcome"] == "downloaded"
    aoi = next(a for a in sandbox.catalog.aois if insight in a.insights)
    sha = sandbox.package_bytes_sha256(aoi.id, insight.id, (), insight.outputs[:1])
    assert hashlib.sha256(Path(job["path"]).read_bytes()).hexdigest() == sha == job["sha256"]


def test_an_entry_of_another_insight_never_replaces_a_done_file(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    first_insight, other = _two_insights(sandbox)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(_explicit(sandbox, first_insight, first_insight.outputs, "pkg"))
    first = cli("run", str(manifest), "--no-progress", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    [done] = report_of(first)["jobs"]
    path = Path(done["path"])
    before = path.read_bytes()
    puts = len(sandbox.requests_to("api", "PUT"))
    manifest.write_text(_explicit(sandbox, other, other.outputs, "pkg"))
    for extra in ((), ("--force",)):
        second = cli("run", str(manifest), "--no-progress", *extra, cwd=tmp_path)
        assert second.returncode == 1, second.stderr
        [job] = report_of(second)["jobs"]
        assert job["outcome"] == "failed"
        assert job["error"]["code"] == "path_clash"
        assert f"insight '{first_insight.id}'" in job["error"]["message"]
        assert path.read_bytes() == before
        assert len(sandbox.requests_to("api", "PUT")) == puts
