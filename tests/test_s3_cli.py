"""``batch-export run --out s3://…`` as a process: the sandbox API and a real S3 server on loopback.

Requests are counted at the sandbox (API, storage origin) and at a proxy in front of SeaweedFS.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal

from batch_export.sandbox import Sandbox, SandboxConfig
from tests.fakes import clean_env, sandbox_thread
from tests.s3server import (
    ACCESS_KEY,
    AWS_USER_VARIABLES,
    BUCKET,
    SECRET_KEY,
    S3Proxy,
    SeaweedS3,
    Seen,
    s3_environ,
)

KEY = "s3-cli-key-7d2a"
MiB = 1024 * 1024


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    with sandbox_thread(SandboxConfig(keys=(KEY,), asset_size=20_000, rate=None)) as sb:
        yield sb


@pytest.fixture
def portal() -> Iterator[BlockingPortal]:
    with start_blocking_portal(backend="asyncio") as running:
        yield running


@pytest.fixture
def proxy(s3_server: SeaweedS3, portal: BlockingPortal) -> Iterator[S3Proxy]:
    recorder = S3Proxy(upstream=s3_server.endpoint)
    portal.call(recorder.start)
    yield recorder
    portal.call(recorder.close)


def env(endpoint: str, **changes: str) -> dict[str, str]:
    base = {k: v for k, v in clean_env(PIXXEL_API_KEY=KEY).items() if k not in AWS_USER_VARIABLES}
    return base | s3_environ(endpoint) | changes


def write_manifest(tmp_path: Path, sandbox: Sandbox, jobs: int) -> Path:
    lines = [
        "version: 1",
        "limits: {poll_interval: 0.05s, poll_max_interval: 0.1s, rate: 200, downloads: 2, in_flight: 8}",
        "exports:",
    ]
    pool = [(a, i) for a in sandbox.catalog.aois for i in a.insights]
    for n in range(jobs):
        aoi, ins = pool[n % len(pool)]
        outputs = ins.outputs[: 1 + (n // len(pool)) % len(ins.outputs)]
        lines.append(
            f'  - {{aoi_id: "{aoi.id}", insight_id: "{ins.id}", name: "job{n:02d}", '
            f"outputs: {json.dumps(list(outputs))}}}"
        )
    path = tmp_path / "manifest.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


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


def run(
    manifest: Path, sandbox: Sandbox, endpoint: str, *extra: str, **changes: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command(manifest, sandbox, *extra),
        capture_output=True,
        text=True,
        env=env(endpoint, **changes),
        timeout=180,
        check=False,
    )


def state_dir(manifest: Path, prefix: str) -> Path:
    return manifest.parent / ".batch-export" / "s3" / BUCKET / prefix


def db_states(folder: Path) -> dict[str, str]:
    with sqlite3.connect(folder / "state.sqlite3") as conn:
        return dict(conn.execute("SELECT key, state FROM jobs").fetchall())


def test_ten_packages_into_a_bucket_then_a_silent_rerun(
    sandbox: Sandbox, s3_server: SeaweedS3, proxy: S3Proxy, tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path, sandbox, 10)
    first = run(manifest, sandbox, proxy.url, "--out", f"s3://{BUCKET}/nightly-cli")
    assert first.returncode == 0, first.stderr
    objects = s3_server.objects(BUCKET, "nightly-cli/")
    assert len(objects) == 10
    for key in objects:
        data, metadata = s3_server.get(key)
        assert metadata["sha256"] == hashlib.sha256(data).hexdigest()
    folder = state_dir(manifest, "nightly-cli")
    assert set(db_states(folder).values()) == {"done"}
    assert [p for p in (folder / "staging").rglob("*") if p.is_file()] == []
    (report,) = [json.loads(p.read_text()) for p in (folder / "reports").glob("*.json")]
    assert report["requests"]["store"] == len(proxy.requests) == 11  # HeadBucket + 10 PutObject
    assert report["requests"]["storage"] == 10

    # No credential anywhere: stderr, the report, the state store, status.
    status = subprocess.run(
        [
            sys.executable,
            "-m",
            "batch_export",
            "status",
            str(manifest),
            "--out",
            f"s3://{BUCKET}/nightly-cli",
        ],
        capture_output=True,
        text=True,
        env=env(proxy.url),
        timeout=60,
        check=False,
    )
    assert status.returncode == 0, status.stderr
    assert "10" in status.stdout and "done" in status.stdout
    texts = [first.stderr, first.stdout, status.stdout, status.stderr]
    texts += [p.read_text() for p in (folder / "reports").glob("*.json")]
    blobs = [p.read_bytes() for p in folder.glob("state.sqlite3*")]
    for secret in (SECRET_KEY, ACCESS_KEY, KEY):
        assert all(secret not in text for text in texts)
        assert all(secret.encode() not in blob for blob in blobs)

    sandbox.requests.clear()
    proxy.requests.clear()
    again = run(manifest, sandbox, proxy.url, "--out", f"s3://{BUCKET}/nightly-cli")
    assert again.returncode == 0, again.stderr
    assert sandbox.requests == []
    assert proxy.operations() == ["HeadBucket"]


def test_missing_bucket_exits_2_before_any_api_request(
    sandbox: Sandbox, proxy: S3Proxy, tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path, sandbox, 3)
    result = run(manifest, sandbox, proxy.url, "--out", "s3://no-such-bucket/x")
    assert result.returncode == 2
    assert "no bucket 'no-such-bucket'" in result.stderr
    assert "Traceback" not in result.stderr
    assert sandbox.requests == []
    assert proxy.operations() == ["HeadBucket"]


def test_wrong_credentials_exit_2_after_one_store_request(
    sandbox: Sandbox, proxy: S3Proxy, tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path, sandbox, 3)
    wrong = "wrong-secret-key-1234567890abcdef"
    result = run(
        manifest, sandbox, proxy.url, "--out", f"s3://{BUCKET}/x", AWS_SECRET_ACCESS_KEY=wrong
    )
    assert result.returncode == 2
    assert "refused the credentials" in result.stderr
    assert wrong not in result.stderr and ACCESS_KEY not in result.stderr
    assert sandbox.requests == []
    assert proxy.operations() == ["HeadBucket"]


@pytest.mark.parametrize("url", ["gs://bucket/x", "az://container/x"])
def test_schemes_that_cannot_be_tested_here_are_refused(
    sandbox: Sandbox, tmp_path: Path, url: str
) -> None:
    manifest = write_manifest(tmp_path, sandbox, 1)
    result = run(manifest, sandbox, "http://127.0.0.1:9", "--out", url)
    assert result.returncode == 2
    assert "not supported" in result.stderr
    assert sandbox.requests == []


def _parts_held(server: SeaweedS3, prefix: str) -> list[int]:
    uploads = server.uploads(BUCKET, prefix)
    if not uploads:
        return []
    key, upload_id = uploads[0]
    answer = server.client().list_parts(Bucket=BUCKET, Key=key, UploadId=upload_id)  # type: ignore[attr-defined]
    return [int(part["PartNumber"]) for part in answer.get("Parts", [])]


def test_kill_9_during_upload_resumes_without_api_or_storage_requests(
    s3_server: SeaweedS3, proxy: S3Proxy, tmp_path: Path
) -> None:
    with sandbox_thread(SandboxConfig(keys=(KEY,), asset_size=20 * MiB, rate=None)) as sandbox:
        manifest = write_manifest(tmp_path, sandbox, 1)
        stalled = threading.Event()

        async def stall_second_part(seen: Seen) -> None:
            if seen.operation == "UploadPart" and seen.query.get("partNumber") == "2":
                stalled.set()
                import anyio

                await anyio.sleep(3600)  # never answers: the process is killed meanwhile

        proxy.before = stall_second_part
        out = f"s3://{BUCKET}/kill9"
        proc = subprocess.Popen(
            command(manifest, sandbox, "--out", out),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env(proxy.url),
        )
        try:
            assert stalled.wait(timeout=120)
            # Kill once part 1 is in the store (it travels beside part 2).
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not _parts_held(s3_server, "kill9/"):
                time.sleep(0.05)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(timeout=30)
        folder = state_dir(manifest, "kill9")
        assert list(db_states(folder).values()) == ["uploading"]
        assert s3_server.objects(BUCKET, "kill9/") == {}
        assert len(s3_server.uploads(BUCKET, "kill9/")) == 1
        gets_before = len(sandbox.requests_to("storage", "GET"))
        puts_before = len(sandbox.requests_to("api", "PUT"))

        proxy.before = None
        proxy.requests.clear()
        again = run(manifest, sandbox, proxy.url, "--out", out)
        assert again.returncode == 0, again.stderr
        assert len(sandbox.requests_to("api", "PUT")) == puts_before  # no new PUT
        assert len(sandbox.requests_to("storage", "GET")) == gets_before  # no new GET
        ops = proxy.operations()
        assert "CreateMultipartUpload" not in ops
        sent = [
            seen.query["partNumber"] for seen in proxy.requests if seen.operation == "UploadPart"
        ]
        assert sent == ["2"]  # part 1 was already in the store
        [(key, size)] = s3_server.objects(BUCKET, "kill9/").items()
        data, metadata = s3_server.get(key)
        assert size == len(data)
        assert metadata["sha256"] == hashlib.sha256(data).hexdigest()
        assert s3_server.uploads(BUCKET, "kill9/") == []
        assert list(db_states(folder).values()) == ["done"]


def test_dry_run_names_the_objects_and_sends_nothing(sandbox: Sandbox, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, sandbox, 2)
    result = run(manifest, sandbox, "http://127.0.0.1:9", "--out", "s3://bucket/plan", "--dry-run")
    assert result.returncode == 0, result.stderr
    first = sandbox.catalog.aois[0]
    assert f"-> s3://bucket/plan/{first.id}/{first.insights[0].id}/job00.zip" in result.stdout
    assert sandbox.requests == []


def test_manifest_output_dir_may_name_the_bucket(
    sandbox: Sandbox, s3_server: SeaweedS3, proxy: S3Proxy, tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path, sandbox, 2)
    text = manifest.read_text().replace(
        "version: 1\n", f"version: 1\noutput: {{dir: 's3://{BUCKET}/nightly+1/x'}}\n"
    )
    manifest.write_text(text)
    result = run(manifest, sandbox, proxy.url)
    assert result.returncode == 0, result.stderr
    assert len(s3_server.objects(BUCKET, "nightly+1/x/")) == 2
    # The state dir beside the manifest, each prefix segment a sanitised folder name.
    assert set(db_states(state_dir(manifest, "nightly_1/x")).values()) == {"done"}
