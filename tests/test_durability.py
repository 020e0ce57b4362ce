"""Nothing lost, nothing repeated: kill -9, SIGTERM, --max-runtime, the lock and re-runs (subprocesses)."""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from batch_export.sandbox import Sandbox, SandboxConfig
from tests.fakes import clean_env, sandbox_thread

KEY = "durability-key-3e5f"


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    with sandbox_thread(
        SandboxConfig(keys=(KEY,), asset_size=300_000, rate=None, ready_after_puts=3)
    ) as sb:
        yield sb


def env() -> dict[str, str]:
    return clean_env(PIXXEL_API_KEY=KEY)


def command(manifest: Path, sandbox: Sandbox, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "batch_export",
        "run",
        str(manifest),
        "--api-url",
        sandbox.api_url,
        *extra,
    ]


def run(manifest: Path, sandbox: Sandbox, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command(manifest, sandbox, *extra),
        capture_output=True,
        text=True,
        env=env(),
        timeout=180,
        check=False,
    )


def write_manifest(
    tmp_path: Path, sandbox: Sandbox, jobs: int, *, downloads: int = 2, rate: float = 200
) -> Path:
    lines = [
        "version: 1",
        f"limits: {{poll_interval: 0.05s, poll_max_interval: 0.1s, rate: {rate}, downloads: {downloads}, in_flight: 8}}",
        "exports:",
    ]
    pool = [(a, i) for a in sandbox.catalog.aois for i in a.insights]
    for n in range(jobs):
        aoi, ins = pool[n % len(pool)]
        outputs = ins.outputs[: 1 + (n // len(pool)) % len(ins.outputs)]
        inputs = ins.inputs[: (n // len(pool)) // len(ins.outputs)]
        lines.append(
            f'  - {{aoi_id: "{aoi.id}", insight_id: "{ins.id}", name: "job{n:02d}", '
            f"inputs: {json.dumps(list(inputs))}, outputs: {json.dumps(list(outputs))}}}"
        )
    path = tmp_path / "manifest.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def db_states(out: Path) -> dict[str, tuple[str, str]]:
    """key -> (state, relpath), read straight from the SQLite file."""
    path = out / ".batch-export" / "state.sqlite3"
    if not path.exists():
        return {}
    with sqlite3.connect(path) as conn:
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'jobs'").fetchall():
            return {}  # killed before the first migration committed
        rows = conn.execute("SELECT key, state, relpath FROM jobs").fetchall()
    return {key: (state, relpath) for key, state, relpath in rows}


def wait_for_requests(proc: subprocess.Popen[bytes], sandbox: Sandbox, count: int) -> None:
    """Return once the sandbox has recorded ``count`` requests, the process ended, or 60 s passed."""
    deadline = time.monotonic() + 60.0
    while len(sandbox.requests) < count and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)


def job_of_put(request_body: bytes, path: str) -> tuple[str, str]:
    return path, request_body.decode()


def assert_all_done_and_verified(out: Path, sandbox: Sandbox, manifest: Path) -> None:
    states = db_states(out)
    assert states and all(state == "done" for state, _ in states.values()), states
    zips = sorted(p for p in out.rglob("*.zip"))
    assert len(zips) == len(states)
    assert not list(out.rglob("*.part"))
    for path in zips:
        with zipfile.ZipFile(path) as archive:
            assert archive.testzip() is None


def test_kill_9_at_random_moments_then_rerun(sandbox: Sandbox, tmp_path: Path) -> None:
    # 30 jobs x 3 PUTs at 15 requests/s: a run takes ~6 s, so each kill lands in a different phase.
    manifest = write_manifest(tmp_path, sandbox, 30, downloads=1, rate=15)
    sandbox.config.asset_size = 1_000_000
    out = tmp_path / "exports"
    rng = random.Random(20261129)
    phases: set[str] = set()
    done_puts_after: dict[tuple[str, str], int] = {}  # job (path, body) -> request index when done
    kills = 0
    for _ in range(10):
        proc = subprocess.Popen(
            command(manifest, sandbox),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env(),
        )
        # The moment to kill at: after a random number of this run's requests reached the
        # sandbox (not a wall-clock delay, which a loaded machine's slow start-up would turn into
        # kills that all land before the first request).
        wait_for_requests(proc, sandbox, len(sandbox.requests) + rng.randint(1, 30))
        proc.kill()
        proc.wait()
        kills += 1
        phases.update(state for state, _ in db_states(out).values())
        # Jobs the store says are done must never be requested again.
        mark = len(sandbox.requests)
        for key, (state, relpath) in db_states(out).items():
            if state == "done":
                final = out / relpath
                assert final.exists() and not final.with_name(final.name + ".part").exists()
                with zipfile.ZipFile(final) as archive:
                    assert archive.testzip() is None
                done_puts_after.setdefault((key, relpath), mark)
        # No file under a final name is ever incomplete.
        for path in out.rglob("*.zip"):
            with zipfile.ZipFile(path) as archive:
                assert archive.testzip() is None
    assert kills == 10
    assert {"preparing", "done"} <= phases  # the kills did land across the run
    final_run = run(manifest, sandbox)
    assert final_run.returncode == 0, final_run.stderr
    assert_all_done_and_verified(out, sandbox, manifest)
    # A job recorded done was never requested again (match its PUT path + body to the manifest).
    specs = {f"job{n:02d}": n for n in range(30)}
    assert len(specs) == 30
    from batch_export.lifecycle import job_key
    from batch_export.manifest import load_manifest

    loaded = load_manifest(manifest)
    by_key = {job_key(spec): spec for spec in loaded.exports}
    for (key, _relpath), mark in done_puts_after.items():
        spec = by_key[key]
        path = f"/v0/aoi/{spec.aoi_id}/insights/{spec.insight_id}/download"
        body = json.dumps(
            {"inputs": list(spec.inputs), "outputs": list(spec.outputs)}, separators=(",", ":")
        ).encode()
        later = [r for r in sandbox.requests[mark:] if r.path == path and r.body == body]
        assert later == [], f"{spec.name} was requested again after it was done"
    # Re-running the finished manifest sends nothing and exits 0.
    before = len(sandbox.requests)
    again = run(manifest, sandbox)
    assert again.returncode == 0
    assert len(sandbox.requests) == before


def test_sigterm_mid_download_exits_143_and_resumes_with_range(tmp_path: Path) -> None:
    config = SandboxConfig(keys=(KEY,), asset_size=150_000_000, rate=None, ready_after_puts=1)
    with sandbox_thread(config) as sandbox:
        aoi = sandbox.catalog.aois[0]
        ins = aoi.insights[0]
        manifest = tmp_path / "m.yaml"
        manifest.write_text(
            "version: 1\nlimits: {poll_interval: 0.05s, connections: 1}\nexports:\n"
            f'  - {{aoi_id: "{aoi.id}", insight_id: "{ins.id}", outputs: ["{ins.outputs[0]}", "{ins.outputs[1]}"]}}\n'
        )
        out = tmp_path / "exports"
        proc = subprocess.Popen(
            command(manifest, sandbox),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env(),
        )
        part = out / aoi.id / ins.id / f"{ins.id}.zip.part"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if part.exists() and part.stat().st_size > 4 * 1024 * 1024:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 143, stderr
        kept = part.stat().st_size
        assert kept > 0
        assert not part.with_name(ins.id + ".zip").exists()
        gets_before = len(sandbox.requests_to("storage", "GET"))
        second = run(manifest, sandbox)
        assert second.returncode == 0, second.stderr
        resume = sandbox.requests_to("storage", "GET")[gets_before]
        assert resume.header("Range") == f"bytes={kept}-"
        assert resume.status == 206
        final = part.with_name(ins.id + ".zip")
        import hashlib

        digest = hashlib.sha256()
        with open(final, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
        assert digest.hexdigest() == sandbox.package_bytes_sha256(
            aoi.id, ins.id, (), tuple(ins.outputs[:2])
        )


def test_max_runtime_exits_3_then_next_run_finishes(sandbox: Sandbox, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, sandbox, 5)
    sandbox.config.ready_after_puts = 1_000_000  # never ready during the first run
    first = run(manifest, sandbox, "--max-runtime", "1s")
    assert first.returncode == 3, first.stderr
    states = db_states(tmp_path / "exports")
    assert len(states) == 5 and all(
        state in ("requesting", "preparing") for state, _ in states.values()
    )
    report = json.loads(
        sorted((tmp_path / "exports" / ".batch-export" / "reports").glob("*.json"))[-1].read_text()
    )
    assert report["exit_code"] == 3 and report["counts"]["pending"] == 5
    sandbox.config.ready_after_puts = 1
    second = run(manifest, sandbox)
    assert second.returncode == 0, second.stderr
    assert_all_done_and_verified(tmp_path / "exports", sandbox, manifest)


def test_concurrent_second_run_exits_75(sandbox: Sandbox, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, sandbox, 3)
    sandbox.config.ready_after_puts = 1_000_000
    first = subprocess.Popen(
        command(manifest, sandbox, "--max-runtime", "20s"),
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        lock = tmp_path / "exports" / ".batch-export" / "lock"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (
            lock.exists() and lock.read_text().startswith("pid")
        ):
            time.sleep(0.02)
        second = run(manifest, sandbox)
        assert second.returncode == 75
        assert f"pid {first.pid}" in second.stderr
    finally:
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=30) == 130


def test_done_file_removed_or_changed_is_redone_and_force_redoes_all(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path, sandbox, 3)
    assert run(manifest, sandbox).returncode == 0
    zips = sorted((tmp_path / "exports").rglob("*.zip"))
    zips[0].unlink()
    with open(zips[1], "ab") as handle:
        handle.write(b"x")
    before = len(sandbox.requests_to("storage", "GET"))
    assert run(manifest, sandbox).returncode == 0
    assert len(sandbox.requests_to("storage", "GET")) - before == 2
    assert_all_done_and_verified(tmp_path / "exports", sandbox, manifest)
    before = len(sandbox.requests_to("storage", "GET"))
    assert run(manifest, sandbox, "--force").returncode == 0
    assert len(sandbox.requests_to("storage", "GET")) - before == 3


def test_edited_manifest_adds_new_jobs_and_leaves_removed_ones(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path, sandbox, 4)
    assert run(manifest, sandbox).returncode == 0
    lines = manifest.read_text().splitlines()
    removed = lines.pop(3)  # drop the first export
    manifest.write_text("\n".join(lines) + "\n")
    bigger = write_manifest(tmp_path, sandbox, 6)
    text = bigger.read_text().splitlines()
    text.remove(removed)
    bigger.write_text("\n".join(text) + "\n")
    before = len(sandbox.requests_to("api"))
    result = run(bigger, sandbox)
    assert result.returncode == 0
    assert len(sandbox.requests_to("api")) - before == 2 * 3  # only the two new jobs, 3 PUTs each
    assert len(db_states(tmp_path / "exports")) == 6  # the removed job's record is left alone


def test_shards_partition_the_manifest(sandbox: Sandbox, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, sandbox, 12)
    seen: list[str] = []
    for k in range(3):
        state = tmp_path / f"state{k}"
        result = run(manifest, sandbox, "--shard", f"{k}/3", "--state-dir", str(state))
        assert result.returncode == 0, result.stderr
        with sqlite3.connect(state / "state.sqlite3") as conn:
            keys = [row[0] for row in conn.execute("SELECT key FROM jobs")]
        assert all(int(key[:16], 16) % 3 == k for key in keys)
        seen.extend(keys)
    assert len(seen) == len(set(seen)) == 12


def test_sigterm_while_parsing_a_big_manifest_exits_143(sandbox: Sandbox, tmp_path: Path) -> None:
    manifest = tmp_path / "big.yaml"
    aoi = sandbox.catalog.aois[0]
    ins = aoi.insights[0]
    lines = ["version: 1", 'output: {path: "{aoi_id}/{insight_id}/{name}.zip"}', "exports:"]
    lines += [
        f'  - {{aoi_id: "{aoi.id}", insight_id: "{ins.id}", name: "n{i}", outputs: ["{ins.outputs[0]}"]}}'
        for i in range(100_000)
    ]
    manifest.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen(
        command(manifest, sandbox),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
    )
    time.sleep(
        1.5
    )  # past the imports, inside the parse (which takes seconds): not a timing assertion
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr and "Aborted" not in stderr
    assert sandbox.requests == []


def test_state_dir_inside_the_packages_is_a_usage_error(sandbox: Sandbox, tmp_path: Path) -> None:
    aoi = sandbox.catalog.aois[0]
    ins = aoi.insights[0]
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        'version: 1\noutput: {path: "{name}"}\nexports:\n'
        f'  - {{aoi_id: "{aoi.id}", insight_id: "{ins.id}", name: "lock", outputs: ["{ins.outputs[0]}"]}}\n'
    )
    out = tmp_path / "out"
    proc = run(manifest, sandbox, "--out", str(out), "--state-dir", str(out))
    assert proc.returncode == 2
    assert "inside the state dir" in proc.stderr
    assert sandbox.requests == []


def test_unwritable_report_path_is_a_usage_error_before_any_request(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path, sandbox, 1)
    for option in ("--report", "--metrics-file"):
        proc = run(manifest, sandbox, option, "/dev/null/r.json")
        assert proc.returncode == 2, proc.stderr
        assert option in proc.stderr and "Traceback" not in proc.stderr
    assert sandbox.requests == []
