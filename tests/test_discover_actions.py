"""``discover`` shows what a run will do with each insight, state store included (SPEC §7).

A discovered job whose path another insight's package holds in the state store fails with
``path_clash`` at run time (``ownership.py``); ``discover`` showed it as ``export``. Each case is
checked against the run itself: the action ``discover`` shows is the run's outcome.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml

from batch_export.sandbox import Sandbox, SandboxConfig
from tests.fakes import clean_env, sandbox_thread

KEY = "discover-actions-key-77c2"


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    with sandbox_thread(SandboxConfig(keys=(KEY,), asset_size=2_000, rate=None)) as sb:
        yield sb


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "batch_export", *args],
        capture_output=True,
        text=True,
        env=clean_env(PIXXEL_API_KEY=KEY),
        timeout=120,
        check=False,
    )


def two_completed(sandbox: Sandbox) -> tuple[Any, Any, Any]:
    for aoi in sandbox.catalog.aois:
        usable = [i for i in aoi.insights if i.status == "completed" and i.deleted_at is None]
        if len(usable) >= 2:
            return aoi, usable[0], usable[1]
    raise AssertionError("no AOI with two completed insights")


def test_a_stored_path_clash_shows_as_fail_not_export(sandbox: Sandbox, tmp_path: Path) -> None:
    aoi, first, second = two_completed(sandbox)
    head = (
        f'version: 1\napi: {{url: "{sandbox.api_url}"}}\n'
        "limits: {rate: 100, poll_interval: 0.05s}\n"
        'output: {dir: out, path: "{aoi_id}/{name}.zip"}\n'
    )
    manifest = tmp_path / "m.yaml"
    # Night 1: an explicit entry puts the first insight's package at <aoi>/same.zip.
    manifest.write_text(
        head + "exports:\n"
        f'  - {{aoi_id: "{aoi.id}", insight_id: "{first.id}", outputs: ["{first.outputs[0]}"], '
        'name: "same"}\n'
    )
    assert cli("run", str(manifest), "--no-progress").returncode == 0
    # Then a selector names the second insight "same" too: the run must not replace the file.
    manifest.write_text(
        head + "discover:\n"
        f'  - {{aois: ["{aoi.id}"], name_glob: "{second.name}", outputs: all, name: "same"}}\n'
    )
    shown = cli("discover", str(manifest), "--json")
    assert shown.returncode == 0, shown.stderr
    insights = {i["id"]: i for i in json.loads(shown.stdout)["selectors"][0]["aois"][0]["insights"]}
    assert insights[second.id]["action"] == "fail"
    reason = insights[second.id]["reason"]
    assert reason.startswith(
        f"path_clash: output path '{aoi.id}/same.zip' is the done file of job "
    )
    assert insights[first.id]["action"] == "filtered_out"
    text = cli("discover", str(manifest))
    assert text.returncode == 0
    row = next(line for line in text.stdout.splitlines() if line.strip().startswith(second.id))
    assert row.split()[3] == "fail" and "path_clash:" in row

    before = (tmp_path / "out" / aoi.id / "same.zip").read_bytes()
    report = tmp_path / "report.json"
    run = cli("run", str(manifest), "--no-progress", "--report", str(report))
    assert run.returncode == 1
    (job,) = json.loads(report.read_text())["jobs"]
    assert (job["insight_id"], job["outcome"]) == (second.id, "failed")
    assert f"path_clash: {job['error']['message']}" == reason  # the run's own words
    assert (tmp_path / "out" / aoi.id / "same.zip").read_bytes() == before


def test_a_discovery_failure_and_an_abandoned_job_show_as_the_run_will_treat_them(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    aoi, first, second = two_completed(sandbox)
    manifest = tmp_path / "m.yaml"
    # The explicit entry wins the path; the discovered second insight fails path_clash each
    # night and is abandoned on the third (give_up_after: 3), then shows as abandoned.
    manifest.write_text(
        f'version: 1\napi: {{url: "{sandbox.api_url}"}}\n'
        "limits: {rate: 100, poll_interval: 0.05s, give_up_after: 3}\n"
        'output: {dir: out, path: "{aoi_id}/{name}.zip"}\n'
        "exports:\n"
        f'  - {{aoi_id: "{aoi.id}", insight_id: "{first.id}", outputs: ["{first.outputs[0]}"], '
        'name: "same"}\n'
        "discover:\n"
        f'  - {{aois: ["{aoi.id}"], name_glob: "{second.name}", outputs: all, name: "same"}}\n'
    )
    for night in range(1, 4):
        document = json.loads(cli("discover", str(manifest), "--json").stdout)
        item = {i["id"]: i for i in document["selectors"][0]["aois"][0]["insights"]}[second.id]
        assert item["action"] == "fail", night
        assert item["reason"].startswith("path_clash: ")
        assert cli("run", str(manifest), "--no-progress").returncode == (1 if night < 3 else 0)
    document = json.loads(cli("discover", str(manifest), "--json").stdout)
    item = {i["id"]: i for i in document["selectors"][0]["aois"][0]["insights"]}[second.id]
    assert item["action"] == "abandoned"
    assert item["reason"].startswith("path_clash: ")  # its last error


def test_discover_out_s3_reads_the_state_dir_run_uses(sandbox: Sandbox, tmp_path: Path) -> None:
    # discover --out was a local path: s3://demo/x became the folder s3:/demo/x, so the done
    # jobs of an object-store run showed as export, and --emit-manifest wrote a local output.dir.
    aoi, first, _ = two_completed(sandbox)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        f'version: 1\napi: {{url: "{sandbox.api_url}"}}\ndiscover:\n'
        f'  - {{aois: ["{aoi.id}"], name_glob: "{first.name}", outputs: all}}\n'
    )
    # The state dir run uses for --out s3://demo/x: beside the manifest (README); a done record
    # of the one discovered job, as an earlier run would have left it.
    shown = json.loads(cli("discover", str(manifest), "--json").stdout)
    (item,) = [i for i in shown["selectors"][0]["aois"][0]["insights"] if i["id"] == first.id]
    assert item["action"] == "export"
    plain = tmp_path / "plain.yaml"
    emitted = cli("discover", str(manifest), "--out", "s3://demo/x", "--emit-manifest", str(plain))
    assert emitted.returncode == 0, emitted.stderr
    assert yaml.safe_load(plain.read_text())["output"]["dir"] == "s3://demo/x"
    assert not (Path.cwd() / "s3:").exists() and not (tmp_path / "s3:").exists()
    state = tmp_path / ".batch-export" / "s3" / "demo" / "x"
    status = cli("status", str(plain), "--out", "s3://demo/x", "--json")
    assert json.loads(status.stdout)["state_dir"] == str(state)  # status and run agree...
    anyio.run(_mark_done, state, plain)
    shown = json.loads(cli("discover", str(manifest), "--out", "s3://demo/x", "--json").stdout)
    (item,) = [i for i in shown["selectors"][0]["aois"][0]["insights"] if i["id"] == first.id]
    assert item["action"] == "done"  # ...and so does discover


async def _mark_done(state: Path, plain: Path) -> None:
    from batch_export.lifecycle import job_key
    from batch_export.manifest import load_manifest
    from batch_export.store import SqliteStore
    from batch_export.types import JobRecord, JobState

    (spec,) = load_manifest(plain).exports
    store = await SqliteStore.open(state)
    try:
        await store.save(
            JobRecord(
                key=job_key(spec),
                aoi_id=spec.aoi_id,
                insight_id=spec.insight_id,
                name=spec.name,
                relpath=spec.relpath,
                state=JobState.DONE,
            )
        )
    finally:
        await store.close()
