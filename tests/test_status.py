"""``batch-export status``: the state dir found as ``run`` finds it, the manifest's jobs, stale ones, --failed."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import anyio
import pytest
from click.testing import CliRunner

from batch_export.cli import main
from batch_export.lifecycle import JobState, job_key
from batch_export.manifest import load_manifest
from batch_export.store import JobRecord, SqliteStore

MANIFEST = """\
version: 1
exports:
  - {aoi_id: "a1", insight_id: "i1", outputs: ["ndvi"]}
  - {aoi_id: "a1", insight_id: "i2", outputs: ["ndvi"]}
  - {aoi_id: "a2", insight_id: "i3", outputs: ["ndvi"]}
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def fill_store(state_dir: Path, records: list[JobRecord]) -> None:
    async def go() -> None:
        store = await SqliteStore.open(state_dir)
        try:
            for record in records:
                await store.save(record)
        finally:
            await store.close()

    anyio.run(go)


def records_of(manifest: Path) -> list[JobRecord]:
    return [
        JobRecord(
            key=job_key(spec),
            aoi_id=spec.aoi_id,
            insight_id=spec.insight_id,
            name=spec.name,
            relpath=spec.relpath,
        )
        for spec in load_manifest(manifest).exports
    ]


def status(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["status", *args], catch_exceptions=False)
    return result.exit_code, result.output


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A manifest in ``tmp_path/proj`` whose run left its state in ``proj/exports/.batch-export``.

    The working dir is elsewhere (``tmp_path/cwd``), as under cron.
    """
    manifest = write(tmp_path / "proj" / "m.yaml", MANIFEST)
    first, second, third = records_of(manifest)
    # An entry that was in the manifest before and has been edited since: a different key.
    old = write(
        tmp_path / "old.yaml",
        'version: 1\nexports:\n  - {aoi_id: "a2", insight_id: "i3", outputs: ["cloud"]}\n',
    )
    (edited,) = records_of(old)
    fill_store(
        tmp_path / "proj" / "exports" / ".batch-export",
        [
            first.evolve(state=JobState.DONE, bytes=10, sha256="0" * 64, attempts=1),
            second.evolve(
                state=JobState.FAILED,
                attempts=2,
                error_code="unknown_asset",
                error_message="asset 'ndvi' is not known",
                error_http_status=400,
            ),
            edited.evolve(state=JobState.FAILED, error_code="http_403", error_http_status=403),
        ],
    )
    del third  # never run: status shows it queued
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return manifest


def test_status_manifest_finds_the_state_dir_beside_the_manifest(project: Path) -> None:
    code, out = status(str(project), "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["state_dir"] == str(project.parent / "exports" / ".batch-export")
    counts = doc["counts"]
    assert (counts["total"], counts["done"], counts["failed"], counts["queued"]) == (3, 1, 1, 1)
    assert counts["stale"] == 1
    assert sum(v for k, v in counts.items() if k not in ("total", "stale")) == 3
    states = [(job["insight_id"], job["state"]) for job in doc["jobs"]]
    assert states == [("i1", "done"), ("i2", "failed"), ("i3", "queued"), ("i3", "stale")]
    stale = doc["jobs"][3]
    assert (stale["last_state"], stale["error_code"]) == ("failed", "http_403")


def test_status_failed_lists_only_failures(project: Path) -> None:
    code, out = status(str(project), "--json", "--failed")
    assert code == 0
    jobs = json.loads(out)["jobs"]
    assert [(job["insight_id"], job["state"], job["error_code"]) for job in jobs] == [
        ("i2", "failed", "unknown_asset")
    ]
    code, text = status(str(project), "--failed")
    assert code == 0
    assert "failed jobs (tried again by the next run)" in text
    assert "unknown_asset" in text and "asset 'ndvi' is not known" in text
    assert "jobs by state" not in text and "http_403" not in text  # not the stale job's


def test_status_text_names_the_stale_jobs(project: Path) -> None:
    code, text = status(str(project))
    assert code == 0
    assert "1 stale job(s) in the store" in text
    assert "unknown_asset" in text


def test_status_without_manifest_counts_every_stored_job(project: Path) -> None:
    code, out = status("--out", str(project.parent / "exports"), "--json")
    assert code == 0
    doc = json.loads(out)
    assert (doc["counts"]["total"], doc["counts"]["failed"], doc["counts"]["stale"]) == (3, 2, 0)


def test_status_manifest_with_out_and_state_dir_as_run_takes_them(
    project: Path, tmp_path: Path
) -> None:
    # --out is relative to the working dir, as for run; the state dir is <out>/.batch-export.
    code, out = status(str(project), "--out", "../proj/exports", "--json")
    assert code == 0
    found = Path(json.loads(out)["state_dir"])
    assert found == tmp_path / "cwd" / "../proj/exports/.batch-export"  # as run spells it
    assert found.resolve() == project.parent / "exports" / ".batch-export"
    # No store there yet, i.e. no run yet: the manifest's jobs are all queued (README), exit 0.
    code, out = status(str(project), "--state-dir", str(tmp_path / "nowhere"), "--json")
    assert code == 0, out
    doc = json.loads(out)
    assert doc["counts"]["total"] == doc["counts"]["queued"] == len(doc["jobs"]) > 0
    assert {job["state"] for job in doc["jobs"]} == {"queued"}
    assert doc["runs"] == []
    assert not (tmp_path / "nowhere").exists()  # status creates nothing
    code, out = status("--state-dir", str(tmp_path / "nowhere"))  # without a manifest: an error
    assert code == 2
    assert f"no state store in {tmp_path / 'nowhere'}" in out


def test_status_manifest_with_output_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = write(
        tmp_path / "proj" / "m.yaml",
        MANIFEST.replace("exports:\n", "output: {dir: ../data}\nexports:\n", 1),
    )
    fill_store(tmp_path / "data" / ".batch-export", records_of(manifest)[:1])
    monkeypatch.chdir(tmp_path)
    code, out = status(str(manifest), "--json")
    assert code == 0
    doc = json.loads(out)
    assert Path(doc["state_dir"]).resolve() == tmp_path / "data" / ".batch-export"
    assert (doc["counts"]["total"], doc["counts"]["queued"], doc["counts"]["stale"]) == (3, 3, 0)


def test_status_bad_manifest_exits_2(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.yaml", "version: 1\nexports: [{aoi_id: a}]\n")
    code, out = status(str(bad))
    assert code == 2
    assert "nothing was requested" in out


def test_status_counts_jobs_of_aois_a_discover_selector_covers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = write(
        tmp_path / "m.yaml",
        MANIFEST + '  - {aoi_id: "a9", insight_id: "x", outputs: ["o"]}\n'
        "discover:\n  - {aois: [a2], outputs: all}\n",
    )
    old = write(
        tmp_path / "old.yaml",
        "version: 1\nexports:\n"
        '  - {aoi_id: "a2", insight_id: "found", outputs: ["o"]}\n'
        '  - {aoi_id: "a3", insight_id: "gone", outputs: ["o"]}\n',
    )
    fill_store(tmp_path / "exports" / ".batch-export", records_of(old))
    monkeypatch.chdir(tmp_path)
    code, out = status(str(manifest), "--json")
    assert code == 0
    doc = json.loads(out)
    states = [(job["insight_id"], job["state"]) for job in doc["jobs"]]
    assert states == [
        ("i1", "queued"),
        ("i2", "queued"),
        ("i3", "queued"),
        ("x", "queued"),
        ("found", "queued"),  # a discovered job of a2: the manifest's
        ("gone", "stale"),
    ]
    assert (doc["counts"]["total"], doc["counts"]["stale"]) == (5, 1)
