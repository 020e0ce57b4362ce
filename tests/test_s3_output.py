"""Object-store output end to end: the runner, the sandbox API and a real S3 server (SeaweedFS).

Requests are counted at the sandbox (API, storage origin) and at a proxy in front of the S3 server.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from batch_export.clock import SystemClock
from batch_export.lifecycle import JobState, job_key
from batch_export.manifest import ExportSpec
from batch_export.objectstore import ObjectUploader, S3Store, StoreUrl
from batch_export.retry import RetryPolicy
from batch_export.runner import Outcome, Runner, RunResult
from batch_export.sandbox import Sandbox, SandboxConfig
from batch_export.store import MemoryStore
from batch_export.types import Job
from tests.s3server import (
    BUCKET,
    READER_ACCESS_KEY,
    READER_SECRET_KEY,
    SECRET_KEY,
    S3Proxy,
    SeaweedS3,
    Seen,
)
from tests.test_e2e_runner import KEY, Recorder, served, settings, specs_from

pytestmark = pytest.mark.anyio
MiB = 1024 * 1024


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    async with Sandbox(SandboxConfig(keys=(KEY,), asset_size=20_000, rate=None)) as sb:
        yield sb


@asynccontextmanager
async def uploader(
    url: StoreUrl, *, check_existing: bool = False, part_size: int = 5 * MiB
) -> AsyncIterator[ObjectUploader]:
    policy = RetryPolicy(clock=SystemClock(), retries=3, backoff_base=0.01, backoff_cap=0.02)
    async with S3Store.connect(url, retry=policy, part_size=part_size) as store:
        await store.check()
        yield ObjectUploader(store, check_existing=check_existing)


async def run_s3(
    sandbox: Sandbox,
    specs: list[ExportSpec],
    staging: Path,
    url: StoreUrl,
    store: MemoryStore,
    *,
    check_existing: bool = False,
    part_size: int = 5 * MiB,
    observer: Recorder | None = None,
    **changes: object,
) -> RunResult:
    async with uploader(url, check_existing=check_existing, part_size=part_size) as up:
        runner = Runner(
            settings(sandbox, staging, state_dir=staging.parent / "state", **changes),
            specs,
            api_key=KEY,
            store=store,
            observer=observer or Recorder(),
            uploader=up,
        )
        return await runner.run()


def _url() -> StoreUrl:
    return StoreUrl("s3", BUCKET, f"nightly-{uuid.uuid4().hex[:8]}")


async def test_ten_packages_end_as_ten_verified_objects(
    sandbox: Sandbox, s3_server: SeaweedS3, proxy: S3Proxy, s3_env: dict[str, str], tmp_path: Path
) -> None:
    url = _url()
    specs = specs_from(sandbox, 10)
    keys = {url.key_for(spec.relpath) for spec in specs}
    early: list[str] = []

    async def listing_before_writes(seen: Seen) -> None:
        if seen.operation in {"PutObject", "CompleteMultipartUpload"}:
            key = seen.path.split("/", 2)[2]
            listed = await asyncio.to_thread(s3_server.objects, BUCKET, url.prefix)
            if key in listed:
                early.append(key)

    proxy.before = listing_before_writes
    store = MemoryStore()
    result = await run_s3(sandbox, specs, tmp_path / "staging", url, store)
    assert result.exit_code == 0
    assert [job.outcome for job in result.jobs] == [Outcome.DOWNLOADED] * 10
    assert result.store_requests == len(proxy.requests) == 11  # HeadBucket + 10 PutObject
    assert early == []  # no object was under its final key before its upload completed
    objects = s3_server.objects(BUCKET, url.prefix)
    assert set(objects) == keys
    for spec in specs:
        data, metadata = s3_server.get(url.key_for(spec.relpath))
        assert hashlib.sha256(data).hexdigest() == served(sandbox, spec)
        assert metadata == {"sha256": served(sandbox, spec)}
    assert s3_server.uploads(BUCKET, url.prefix) == []
    # The staged files are gone once done; nothing of the packages stays on local disk.
    assert [p for p in (tmp_path / "staging").rglob("*") if p.is_file()] == []
    assert all(
        store_record.state is JobState.DONE
        for store_record in (await store.load_many([r.key for r in result.jobs])).values()
    )

    # A re-run skips every done job without any request to the API, the storage or the store.
    await sandbox.idle()
    sandbox.requests.clear()
    proxy.requests.clear()
    again = await run_s3(sandbox, specs, tmp_path / "staging", url, store)
    assert again.exit_code == 0
    assert [job.outcome for job in again.jobs] == [Outcome.SKIPPED] * 10
    assert sandbox.requests == []
    assert proxy.operations() == ["HeadBucket"]  # the start-up check, once
    assert again.store_requests == 1


async def test_check_existing_heads_done_objects_and_reexports_missing_ones(
    sandbox: Sandbox, s3_server: SeaweedS3, proxy: S3Proxy, s3_env: dict[str, str], tmp_path: Path
) -> None:
    url = _url()
    specs = specs_from(sandbox, 4)
    store = MemoryStore()
    assert (await run_s3(sandbox, specs, tmp_path / "staging", url, store)).exit_code == 0
    gone = url.key_for(specs[1].relpath)
    s3_server.client().delete_object(Bucket=BUCKET, Key=gone)  # type: ignore[attr-defined]
    # Without --check-existing the store is not asked: the missing object is not noticed.
    proxy.requests.clear()
    plain = await run_s3(sandbox, specs, tmp_path / "staging", url, store)
    assert [job.outcome for job in plain.jobs] == [Outcome.SKIPPED] * 4
    assert proxy.operations() == ["HeadBucket"]

    await sandbox.idle()
    sandbox.requests.clear()
    proxy.requests.clear()
    checked = await run_s3(sandbox, specs, tmp_path / "staging", url, store, check_existing=True)
    assert checked.exit_code == 0
    outcomes = [job.outcome for job in checked.jobs]
    assert outcomes == [Outcome.SKIPPED, Outcome.DOWNLOADED, Outcome.SKIPPED, Outcome.SKIPPED]
    assert sorted(proxy.operations()) == sorted(["HeadBucket"] + ["HeadObject"] * 4 + ["PutObject"])
    assert len(sandbox.requests_to("storage", "GET")) == 1
    data, metadata = s3_server.get(gone)
    assert hashlib.sha256(data).hexdigest() == served(sandbox, specs[1]) == metadata["sha256"]


async def test_refused_credentials_mid_run_open_the_breaker(
    sandbox: Sandbox,
    s3_server: SeaweedS3,
    proxy: S3Proxy,
    s3_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    # A read-only identity passes the start-up check; every write is refused.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", READER_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", READER_SECRET_KEY)
    url = _url()
    specs = specs_from(sandbox, 12)
    store = MemoryStore()
    result = await run_s3(sandbox, specs, tmp_path / "staging", url, store, downloads=2)
    assert result.exit_code == 1
    assert result.stopped_by == "breaker"
    assert result.breaker is not None and result.breaker["cause"] == "store_auth"
    assert [
        (j.outcome, j.error_code) for j in result.jobs if j.outcome is not Outcome.PENDING
    ] == []  # never failed
    writes = [seen for seen in proxy.requests if seen.operation == "PutObject"]
    assert 1 <= len(writes) <= 2  # the uploads in flight when the breaker opened, no retries
    assert all(seen.status == 403 for seen in writes)
    assert s3_server.objects(BUCKET, url.prefix) == {}
    records = await store.load_many([job.key for job in result.jobs])
    assert {r.state for r in records.values()} <= {
        JobState.UPLOADING,
        JobState.REQUESTING,
        JobState.PREPARING,
        JobState.READY,
        JobState.DOWNLOADING,
        JobState.VERIFYING,
    }
    assert any(r.state is JobState.UPLOADING for r in records.values())
    assert all(
        r.error_message is None or READER_SECRET_KEY not in r.error_message
        for r in records.values()
    )

    # With working credentials the next run resumes the uploading jobs from their staged files.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_env["AWS_ACCESS_KEY_ID"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    uploading = {k for k, r in records.items() if r.state is JobState.UPLOADING}
    await sandbox.idle()
    sandbox.requests.clear()
    proxy.requests.clear()
    again = await run_s3(sandbox, specs, tmp_path / "staging", url, store)
    assert again.exit_code == 0
    puts = [(r.path, json.loads(r.body)) for r in sandbox.requests_to("api", "PUT")]
    for spec in specs:
        body = {"inputs": list(spec.inputs), "outputs": list(spec.outputs)}
        sent = (f"/v0/aoi/{spec.aoi_id}/insights/{spec.insight_id}/download", body) in puts
        assert sent == (job_key(spec) not in uploading)
    # No storage GET for the uploading jobs (a cancelled download may take two: 416, then 200).
    packages = {get.path for get in sandbox.requests_to("storage", "GET")}
    assert len(packages) == len(specs) - len(uploading)
    assert len(s3_server.objects(BUCKET, url.prefix)) == 12


async def test_upload_with_retries_spent_is_uploaded_from_the_staged_file_next_run(
    sandbox: Sandbox, s3_server: SeaweedS3, proxy: S3Proxy, s3_env: dict[str, str], tmp_path: Path
) -> None:
    url = _url()
    specs = specs_from(sandbox, 3)
    broken = url.key_for(specs[1].relpath)
    proxy.answer = lambda seen: 503 if seen.path == f"/{BUCKET}/{broken}" else None
    store = MemoryStore()
    staging = tmp_path / "staging"
    first = await run_s3(sandbox, specs, staging, url, store)
    assert first.exit_code == 1
    assert [(job.outcome, job.error_code) for job in first.jobs] == [
        (Outcome.DOWNLOADED, None),
        (Outcome.FAILED, "store_error"),
        (Outcome.DOWNLOADED, None),
    ]
    # The policy's 3 retries: 4 PutObject answered 503 by the proxy, nothing reached the store.
    refused = [seen for seen in proxy.requests if seen.path == f"/{BUCKET}/{broken}"]
    assert [(seen.operation, seen.status) for seen in refused] == [("PutObject", 503)] * 4
    assert first.store_requests == len(proxy.requests) == 1 + 2 + 4  # every attempt
    assert set(s3_server.objects(BUCKET, url.prefix)) == {
        url.key_for(specs[0].relpath),
        url.key_for(specs[2].relpath),
    }
    staged = staging / specs[1].relpath
    assert hashlib.sha256(staged.read_bytes()).hexdigest() == served(sandbox, specs[1])

    # The store works again: the next run uploads the staged file, with no API PUT or storage GET.
    proxy.answer = None
    await sandbox.idle()
    sandbox.requests.clear()
    proxy.requests.clear()
    again = await run_s3(sandbox, specs, staging, url, store)
    assert again.exit_code == 0
    assert [job.outcome for job in again.jobs] == [
        Outcome.SKIPPED,
        Outcome.DOWNLOADED,
        Outcome.SKIPPED,
    ]
    assert sandbox.requests == []
    assert proxy.operations() == ["HeadBucket", "PutObject"]
    assert again.store_requests == 2
    data, metadata = s3_server.get(broken)
    assert hashlib.sha256(data).hexdigest() == served(sandbox, specs[1]) == metadata["sha256"]
    assert not staged.exists()
    record = (await store.load_many([job_key(specs[1])]))[job_key(specs[1])]
    assert (record.state, record.error_code) == (JobState.DONE, None)


async def test_a_changed_staged_file_is_downloaded_again_not_uploaded(
    sandbox: Sandbox, s3_server: SeaweedS3, proxy: S3Proxy, s3_env: dict[str, str], tmp_path: Path
) -> None:
    url = _url()
    specs = specs_from(sandbox, 1)
    proxy.answer = lambda seen: 503 if seen.operation == "PutObject" else None
    store = MemoryStore()
    staging = tmp_path / "staging"
    assert (await run_s3(sandbox, specs, staging, url, store)).exit_code == 1
    staged = staging / specs[0].relpath
    data = bytearray(staged.read_bytes())
    data[100] ^= 0x01  # same size, another sha256: no longer the verified package
    staged.write_bytes(bytes(data))

    proxy.answer = None
    await sandbox.idle()
    sandbox.requests.clear()
    again = await run_s3(sandbox, specs, staging, url, store)
    assert again.exit_code == 0
    assert len(sandbox.requests_to("api", "PUT")) >= 1
    assert len(sandbox.requests_to("storage", "GET")) == 1
    body, metadata = s3_server.get(url.key_for(specs[0].relpath))
    assert hashlib.sha256(body).hexdigest() == served(sandbox, specs[0]) == metadata["sha256"]


class UploadRecorder(Recorder):
    """A Recorder that also records the uploaded bytes each job's progress reports."""

    def __init__(self) -> None:
        super().__init__()
        self.uploaded: list[tuple[str, int]] = []

    def job_uploaded(self, job: Job, count: int) -> None:
        self.uploaded.append((job.key, count))


async def test_multipart_package_through_the_runner(
    s3_server: SeaweedS3, proxy: S3Proxy, s3_env: dict[str, str], tmp_path: Path
) -> None:
    async with Sandbox(SandboxConfig(keys=(KEY,), asset_size=6 * MiB, rate=None)) as sandbox:
        url = _url()
        specs = specs_from(sandbox, 1)
        observer = UploadRecorder()
        result = await run_s3(
            sandbox, specs, tmp_path / "staging", url, MemoryStore(), observer=observer
        )
        assert result.exit_code == 0
        data, metadata = s3_server.get(url.key_for(specs[0].relpath))
        assert len(data) > 5 * MiB
        assert hashlib.sha256(data).hexdigest() == served(sandbox, specs[0]) == metadata["sha256"]
    parts = [seen for seen in proxy.requests if seen.operation == "UploadPart"]
    assert len(parts) == -(-len(data) // (5 * MiB))
    assert all(seen.headers.get("content-md5") for seen in parts)
    # Every part's bytes reached the progress observer once confirmed: the package, in parts.
    assert sorted(count for _, count in observer.uploaded) == sorted(
        [5 * MiB] * (len(parts) - 1) + [len(data) - 5 * MiB * (len(parts) - 1)]
    )
    assert {key for key, _ in observer.uploaded} == {job_key(specs[0])}


async def test_python_api_exports_into_a_bucket(
    sandbox: Sandbox, s3_server: SeaweedS3, proxy: S3Proxy, s3_env: dict[str, str], tmp_path: Path
) -> None:
    import batch_export

    specs = specs_from(sandbox, 2)
    lines = ["version: 1", "limits: {poll_interval: 0.05s, rate: 100}", "exports:"]
    for spec in specs:
        lines.append(
            f'  - {{aoi_id: "{spec.aoi_id}", insight_id: "{spec.insight_id}", name: "{spec.name}", '
            f"inputs: {json.dumps(list(spec.inputs))}, outputs: {json.dumps(list(spec.outputs))}}}"
        )
    manifest = tmp_path / "nightly.yaml"
    manifest.write_text("\n".join(lines) + "\n")
    result = await batch_export.export_async(
        manifest,
        out=f"s3://{BUCKET}/api-{uuid.uuid4().hex[:6]}",
        api_url=sandbox.api_url,
        api_key=KEY,
        staging_dir=tmp_path / "staging",
        check_existing=True,
    )
    assert result.exit_code == 0
    assert [job["path"].startswith(f"s3://{BUCKET}/api-") for job in result.jobs] == [True, True]
    assert (tmp_path / "staging").is_dir()
    assert result.report_path is not None
    assert result.report_path.parent.parent.parent.parent == tmp_path / ".batch-export" / "s3"
    for job in result.jobs:
        key = str(job["path"]).split("/", 3)[3]
        data, metadata = s3_server.get(key)
        assert hashlib.sha256(data).hexdigest() == job["sha256"] == metadata["sha256"]
