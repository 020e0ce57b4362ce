"""The object-store module against a real S3 server (SeaweedFS) on loopback, through a recording proxy.

Request counts are taken at the proxy, i.e. at the server's door.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import uuid
from pathlib import Path

import pytest

from batch_export.errors import (
    ObjectStoreError,
    RetriesExhausted,
    StoreAuthError,
    UsageError,
)
from batch_export.manifest import ExportSpec
from batch_export.objectstore import (
    MAX_PARTS,
    ObjectInfo,
    ObjectUploader,
    S3Store,
    StoreUrl,
    default_state_dir,
    multipart_etag,
    parse_store_url,
    part_size_for,
    store_proxies,
    store_secrets,
)
from batch_export.redact import Redactor
from batch_export.retry import RetryPolicy
from batch_export.types import Job, JobRecord, JobState
from tests.fakes import FakeClock
from tests.s3server import (
    ACCESS_KEY,
    BUCKET,
    READER_ACCESS_KEY,
    READER_SECRET_KEY,
    SECRET_KEY,
    S3Proxy,
    SeaweedS3,
    Seen,
)

pytestmark = pytest.mark.anyio
MiB = 1024 * 1024
PART = 5 * MiB  # S3's smallest part


# ------------------------------------------------------------------------------------ pure parts


def test_parse_store_url() -> None:
    assert parse_store_url("s3://bucket/nightly") == StoreUrl("s3", "bucket", "nightly")
    assert parse_store_url("s3://bucket/a//b/") == StoreUrl("s3", "bucket", "a/b")
    assert parse_store_url("S3://bucket") == StoreUrl("s3", "bucket", "")
    assert parse_store_url("exports") is None
    assert parse_store_url("/srv/exports") is None
    assert str(StoreUrl("s3", "bucket", "nightly")) == "s3://bucket/nightly"
    assert str(StoreUrl("s3", "bucket", "")) == "s3://bucket"
    assert StoreUrl("s3", "bucket", "nightly").key_for("a/b.zip") == "nightly/a/b.zip"
    assert StoreUrl("s3", "bucket", "").key_for("a/b.zip") == "a/b.zip"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("gs://bucket/x", "gs://"),
        ("az://container/x", "az://"),
        ("ftp://host/x", "ftp://"),
        ("s3://Bucket_Upper/x", "bucket name"),
        ("s3://ab/x", "bucket name"),
        ("s3://bucket/a/../b", "'..'"),
        ("s3://user@bucket/x", "no user"),
        ("s3://bucket/x?versionId=1", "no user, query"),
    ],
)
def test_parse_store_url_refuses(text: str, fragment: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_store_url(text)
    assert fragment in caught.value.message


def test_default_state_dir_is_sanitised(tmp_path: Path) -> None:
    url = StoreUrl("s3", "bucket", "nightly/run 1/ü")
    assert default_state_dir(tmp_path, url) == tmp_path / ".batch-export/s3/bucket/nightly/run_1/_"
    assert (
        default_state_dir(tmp_path, StoreUrl("s3", "b.x", "")) == tmp_path / ".batch-export/s3/b.x"
    )


def test_part_size_grows_to_stay_within_max_parts() -> None:
    assert part_size_for(1, part_size=16 * MiB) == 16 * MiB
    big = 16 * MiB * MAX_PARTS + 1
    size = part_size_for(big, part_size=16 * MiB)
    assert size == 17 * MiB
    assert -(-big // size) <= MAX_PARTS


def test_multipart_etag_formula() -> None:
    md5s = [hashlib.md5(b"a").digest(), hashlib.md5(b"b").digest()]
    assert multipart_etag(md5s) == hashlib.md5(md5s[0] + md5s[1]).hexdigest() + "-2"


def test_store_secrets() -> None:
    env = {"AWS_SECRET_ACCESS_KEY": "sek", "AWS_SESSION_TOKEN": "tok", "AWS_REGION": "eu-west-1"}
    assert store_secrets(env) == ["sek", "tok"]


# ------------------------------------------------------------------------------ real server


def _policy(retries: int = 3) -> RetryPolicy:
    return RetryPolicy(clock=FakeClock(), retries=retries)


def _prefix() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def _package(tmp_path: Path, size: int) -> tuple[Path, str]:
    path = tmp_path / "package.zip"
    data = os.urandom(size)
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def _parts(proxy: S3Proxy) -> list[Seen]:
    return [seen for seen in proxy.requests if seen.operation == "UploadPart"]


async def test_small_package_is_one_put_with_md5_sigv4_and_sha256(
    s3_server: SeaweedS3, proxy: S3Proxy, s3_env: dict[str, str], tmp_path: Path
) -> None:
    url = StoreUrl("s3", BUCKET, _prefix())
    path, sha = _package(tmp_path, 3 * MiB)
    async with S3Store.connect(url, retry=_policy(), part_size=PART) as store:
        result = await store.upload(path, url.key_for("a/p.zip"), size=3 * MiB, sha256=sha)
    assert proxy.operations() == ["PutObject"]
    put = proxy.requests[0]
    assert put.headers["authorization"].startswith("AWS4-HMAC-SHA256 Credential=" + ACCESS_KEY)
    assert put.headers["content-md5"]
    assert put.headers["x-amz-meta-sha256"] == sha
    assert (result.parts, result.parts_sent, result.resumed) == (1, 1, False)
    data, metadata = s3_server.get(url.key_for("a/p.zip"))
    assert hashlib.sha256(data).hexdigest() == sha
    assert metadata == {"sha256": sha}


async def test_multipart_object_appears_only_when_complete(
    s3_server: SeaweedS3, proxy: S3Proxy, s3_env: dict[str, str], tmp_path: Path
) -> None:
    url = StoreUrl("s3", BUCKET, _prefix())
    key = url.key_for("p.zip")
    size = 2 * PART + 123
    path, sha = _package(tmp_path, size)
    seen_before: list[tuple[str, dict[str, int]]] = []

    async def look(seen: Seen) -> None:
        listing = await asyncio.to_thread(s3_server.objects, BUCKET, url.prefix)
        seen_before.append((seen.operation, listing))

    proxy.before = look
    bytes_seen: list[int] = []
    async with S3Store.connect(url, retry=_policy(), part_size=PART) as store:
        result = await store.upload(path, key, size=size, sha256=sha, on_bytes=bytes_seen.append)
    ops = proxy.operations()
    assert ops[:2] == ["ListMultipartUploads", "CreateMultipartUpload"]
    assert sorted(ops[2:5]) == ["UploadPart"] * 3
    assert ops[5:] == ["CompleteMultipartUpload"]
    # Before every request, the completion included, nothing was under the final key.
    assert [listing for _, listing in seen_before] == [{}] * 6
    assert s3_server.objects(BUCKET, url.prefix) == {key: size}
    parts = _parts(proxy)
    assert sorted(p.size for p in parts) == [123, PART, PART]
    assert all(p.headers.get("content-md5") for p in parts)
    assert all(p.headers["authorization"].startswith("AWS4-HMAC-SHA256") for p in parts)
    assert sum(bytes_seen) == size
    data, metadata = s3_server.get(key)
    assert hashlib.sha256(data).hexdigest() == sha
    assert metadata == {"sha256": sha}
    assert (result.parts, result.parts_sent, result.resumed) == (3, 3, False)
    assert s3_server.uploads(BUCKET, url.prefix) == []


async def test_part_corrupted_in_flight_is_refused_and_sent_again(
    s3_server: SeaweedS3, proxy: S3Proxy, s3_env: dict[str, str], tmp_path: Path
) -> None:
    url = StoreUrl("s3", BUCKET, _prefix())
    key = url.key_for("p.zip")
    size = 2 * PART + 7
    path, sha = _package(tmp_path, size)
    flipped: list[str] = []

    def corrupt(seen: Seen) -> bool:
        if seen.operation == "UploadPart" and seen.query["partNumber"] == "2" and not flipped:
            flipped.append(seen.query["partNumber"])
            return True
        return False

    proxy.corrupt = corrupt
    clock = FakeClock()
    async with S3Store.connect(
        url, retry=RetryPolicy(clock=clock, retries=3), part_size=PART, concurrency=1
    ) as store:
        await store.upload(path, key, size=size, sha256=sha)
    part2 = [p for p in _parts(proxy) if p.query["partNumber"] == "2"]
    assert [p.status for p in part2] == [400, 200]  # BadDigest from the store, then accepted
    assert len(clock.sleeps) == 1  # one backoff before the second try
    data, metadata = s3_server.get(key)
    assert hashlib.sha256(data).hexdigest() == sha
    assert metadata == {"sha256": sha}


async def test_server_errors_spent_abort_the_upload(
    s3_server: SeaweedS3, proxy: S3Proxy, s3_env: dict[str, str], tmp_path: Path
) -> None:
    url = StoreUrl("s3", BUCKET, _prefix())
    key = url.key_for("p.zip")
    size = PART + 1
    path, sha = _package(tmp_path, size)
    proxy.answer = lambda seen: (
        503 if seen.operation == "UploadPart" and seen.query["partNumber"] == "2" else None
    )
    async with S3Store.connect(url, retry=_policy(retries=2), part_size=PART) as store:
        with pytest.raises(RetriesExhausted) as caught:
            await store.upload(path, key, size=size, sha256=sha)
    assert caught.value.code == "store_error"
    assert caught.value.http_status == 503
    assert [p.status for p in _parts(proxy) if p.query["partNumber"] == "2"] == [503, 503, 503]
    # Part 1, cancelled with the group, may reach the proxy's log after the abort (its body is
    # still being read there), so it is left out of the order; the server holds no upload.
    order = [
        seen.operation
        for seen in proxy.requests
        if not (seen.operation == "UploadPart" and seen.query["partNumber"] == "1")
    ]
    assert order[-1] == "AbortMultipartUpload"
    assert s3_server.uploads(BUCKET, url.prefix) == []
    assert s3_server.objects(BUCKET, url.prefix) == {}


async def test_interrupted_upload_is_resumed_without_resending_parts(
    s3_server: SeaweedS3,
    proxy: S3Proxy,
    s3_env: dict[str, str],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = StoreUrl("s3", BUCKET, _prefix())
    key = url.key_for("p.zip")
    size = 3 * PART + 11
    path, sha = _package(tmp_path, size)
    hang = asyncio.Event()

    async def stall_third_part(seen: Seen) -> None:
        if seen.operation == "UploadPart" and seen.query["partNumber"] == "3":
            hang.set()
            await asyncio.Event().wait()  # never answers: the client is cut off here

    proxy.before = stall_third_part
    async with S3Store.connect(url, retry=_policy(), part_size=PART, concurrency=1) as store:
        task = asyncio.create_task(store.upload(path, key, size=size, sha256=sha))
        await hang.wait()
        task.cancel()  # a signal: the upload stays for the next run
        with pytest.raises(asyncio.CancelledError):
            await task
    assert s3_server.objects(BUCKET, url.prefix) == {}
    [(left_key, upload_id)] = s3_server.uploads(BUCKET, url.prefix)
    assert left_key == key
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"upload of s3://{BUCKET}/{key} interrupted: the next run resumes it (a bucket lifecycle "
        "rule AbortIncompleteMultipartUpload removes it if no run comes)"
    ]

    proxy.before = None
    proxy.requests.clear()
    async with S3Store.connect(url, retry=_policy(), part_size=PART) as store:
        result = await store.upload(path, key, size=size, sha256=sha)
    ops = proxy.operations()
    assert ops[:2] == ["ListMultipartUploads", "ListParts"]
    assert "CreateMultipartUpload" not in ops
    assert sorted(p.query["partNumber"] for p in _parts(proxy)) == ["3", "4"]
    assert all(p.query["uploadId"] == upload_id for p in _parts(proxy))
    assert ops[-1] == "CompleteMultipartUpload"
    assert (result.parts, result.parts_sent, result.resumed) == (4, 2, True)
    data, metadata = s3_server.get(key)
    assert hashlib.sha256(data).hexdigest() == sha
    assert metadata == {"sha256": sha}
    assert s3_server.uploads(BUCKET, url.prefix) == []


async def test_leftover_of_another_file_is_aborted_not_resumed(
    s3_server: SeaweedS3, proxy: S3Proxy, s3_env: dict[str, str], tmp_path: Path
) -> None:
    url = StoreUrl("s3", BUCKET, _prefix())
    key = url.key_for("p.zip")
    client = s3_server.client()
    stale = client.create_multipart_upload(Bucket=BUCKET, Key=key)["UploadId"]  # type: ignore[attr-defined]
    client.upload_part(Bucket=BUCKET, Key=key, UploadId=stale, PartNumber=1, Body=os.urandom(PART))  # type: ignore[attr-defined]
    size = PART + 5
    path, sha = _package(tmp_path, size)
    async with S3Store.connect(url, retry=_policy(), part_size=PART) as store:
        result = await store.upload(path, key, size=size, sha256=sha)
    assert result.resumed is False
    ops = proxy.operations()
    assert ops[:4] == [
        "ListMultipartUploads",
        "ListParts",
        "AbortMultipartUpload",
        "CreateMultipartUpload",
    ]
    assert s3_server.uploads(BUCKET, url.prefix) == []
    data, _ = s3_server.get(key)
    assert hashlib.sha256(data).hexdigest() == sha


async def test_stat_reports_size_and_sha256_or_missing(
    s3_server: SeaweedS3, proxy: S3Proxy, s3_env: dict[str, str], tmp_path: Path
) -> None:
    url = StoreUrl("s3", BUCKET, _prefix())
    path, sha = _package(tmp_path, 1000)
    async with S3Store.connect(url, retry=_policy(), part_size=PART) as store:
        await store.upload(path, url.key_for("p.zip"), size=1000, sha256=sha)
        assert await store.stat(url.key_for("p.zip")) == ObjectInfo(size=1000, sha256=sha)
        assert await store.stat(url.key_for("gone.zip")) is None
    assert proxy.operations() == ["PutObject", "HeadObject", "HeadObject"]


async def test_check_passes_on_a_good_bucket(proxy: S3Proxy, s3_env: dict[str, str]) -> None:
    async with S3Store.connect(StoreUrl("s3", BUCKET, "x"), retry=_policy()) as store:
        await store.check()
        assert set(store.secrets()) == {ACCESS_KEY, SECRET_KEY}
    assert proxy.operations() == ["HeadBucket"]


async def test_check_missing_bucket_is_store_not_found(
    proxy: S3Proxy, s3_env: dict[str, str]
) -> None:
    async with S3Store.connect(StoreUrl("s3", "no-such-bucket", "x"), retry=_policy()) as store:
        with pytest.raises(UsageError) as caught:
            await store.check()
    assert caught.value.code == "store_not_found"
    assert "no bucket 'no-such-bucket'" in caught.value.message
    assert proxy.operations() == ["HeadBucket"]


async def test_check_wrong_credentials_is_store_auth_after_one_request(
    proxy: S3Proxy, s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-0123456789")
    async with S3Store.connect(StoreUrl("s3", BUCKET, "x"), retry=_policy()) as store:
        with pytest.raises(UsageError) as caught:
            await store.check()
    assert caught.value.code == "store_auth"
    assert "wrong-secret" not in caught.value.message
    assert proxy.operations() == ["HeadBucket"]
    assert proxy.requests[0].status == 403


async def test_check_unreachable_store_is_store_error(
    s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    clock = FakeClock()
    async with S3Store.connect(
        StoreUrl("s3", BUCKET, "x"), retry=RetryPolicy(clock=clock, retries=2)
    ) as store:
        with pytest.raises(UsageError) as caught:
            await store.check()
    assert caught.value.code == "store_error"
    assert f"127.0.0.1:{port}" in caught.value.message
    assert len(clock.sleeps) == 2


async def test_refused_credentials_mid_run_are_store_auth_without_retry(
    s3_server: SeaweedS3,
    proxy: S3Proxy,
    s3_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    # A read-only identity passes the start-up check and is refused at the first write.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", READER_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", READER_SECRET_KEY)
    url = StoreUrl("s3", BUCKET, _prefix())
    path, sha = _package(tmp_path, 1000)
    async with S3Store.connect(url, retry=_policy(), part_size=PART) as store:
        await store.check()
        with pytest.raises(StoreAuthError) as caught:
            await store.upload(path, url.key_for("p.zip"), size=1000, sha256=sha, job_key="k1")
    assert caught.value.code == "store_auth"
    assert caught.value.job_key == "k1"
    assert caught.value.http_status == 403
    assert proxy.operations() == ["HeadBucket", "PutObject"]
    redact = Redactor(store_secrets())
    assert READER_SECRET_KEY not in redact(str(caught.value))
    assert s3_server.objects(BUCKET, url.prefix) == {}


async def test_missing_credentials_are_store_auth(
    s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    async with S3Store.connect(StoreUrl("s3", BUCKET, "x"), retry=_policy()) as store:
        with pytest.raises(UsageError) as caught:
            await store.check()
    assert caught.value.code == "store_auth"
    assert "AWS_ACCESS_KEY_ID" in caught.value.message


async def test_staged_file_shorter_than_recorded_is_local_io(
    proxy: S3Proxy, s3_env: dict[str, str], tmp_path: Path
) -> None:
    path, sha = _package(tmp_path, 100)
    async with S3Store.connect(StoreUrl("s3", BUCKET, _prefix()), retry=_policy()) as store:
        with pytest.raises(ObjectStoreError) as caught:
            await store.upload(path, "x/p.zip", size=200, sha256=sha)
    assert caught.value.code == "local_io"
    assert proxy.operations() == []


def _job(tmp_path: Path, relpath: str, size: int, sha: str) -> Job:
    spec = ExportSpec("aoi", "ins", (), ("ndvi",), "p", relpath)
    record = JobRecord(
        key="k" * 64,
        aoi_id="aoi",
        insight_id="ins",
        name="p",
        relpath=relpath,
        state=JobState.UPLOADING,
        bytes=size,
        sha256=sha,
    )
    return Job(spec=spec, final=tmp_path / relpath, record=record)


async def test_uploader_removes_the_staged_file_and_a_crash_after_upload_is_confirmed_by_head(
    s3_server: SeaweedS3, proxy: S3Proxy, s3_env: dict[str, str], tmp_path: Path
) -> None:
    url = StoreUrl("s3", BUCKET, _prefix())
    staged, sha = _package(tmp_path, 2000)
    target = tmp_path / "a" / "p.zip"
    target.parent.mkdir()
    staged.rename(target)
    job = _job(tmp_path, "a/p.zip", 2000, sha)
    async with S3Store.connect(url, retry=_policy(), part_size=PART) as store:
        uploader = ObjectUploader(store)
        assert uploader.location("a/p.zip") == f"s3://{BUCKET}/{url.prefix}/a/p.zip"
        await uploader.upload(job, target)
        assert not target.exists()
        assert proxy.operations() == ["PutObject"]
        # As if the process died after the store confirmed but before `done` was saved.
        proxy.requests.clear()
        await uploader.upload(job, target)
        assert proxy.operations() == ["HeadObject"]
        # A staged file gone and no object: the job fails, and the next run downloads it again.
        other = _job(tmp_path, "a/gone.zip", 2000, sha)
        with pytest.raises(ObjectStoreError) as caught:
            await uploader.upload(other, tmp_path / "a" / "gone.zip")
        assert caught.value.code == "staged_missing"


async def test_uploader_confirm_asks_nothing_unless_checking_existing(
    s3_server: SeaweedS3, proxy: S3Proxy, s3_env: dict[str, str], tmp_path: Path
) -> None:
    url = StoreUrl("s3", BUCKET, _prefix())
    path, sha = _package(tmp_path, 1000)
    present = _job(tmp_path, "a/p.zip", 1000, sha).record
    changed = JobRecord(**{**_fields(present), "key": "c" * 64, "sha256": "0" * 64})
    missing = JobRecord(**{**_fields(present), "key": "m" * 64, "relpath": "a/missing.zip"})
    async with S3Store.connect(url, retry=_policy(), part_size=PART) as store:
        await store.upload(path, url.key_for("a/p.zip"), size=1000, sha256=sha)
        proxy.requests.clear()
        records = [present, changed, missing]
        assert await ObjectUploader(store).confirm(records) == {r.key for r in records}
        assert proxy.operations() == []
        checked = await ObjectUploader(store, check_existing=True).confirm(records)
        assert checked == {present.key}
        assert proxy.operations() == ["HeadObject"] * 3


def _fields(record: JobRecord) -> dict[str, object]:
    return {name: getattr(record, name) for name in record.__dataclass_fields__}


def test_store_proxies_follow_the_project_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert store_proxies("https://minio.corp:9000", None) == {}
    monkeypatch.setenv("HTTPS_PROXY", "http://user:pw@proxy.corp:3128")
    assert store_proxies("https://minio.corp:9000", None) == {
        "https": "http://user:pw@proxy.corp:3128"
    }
    assert store_proxies(None, "eu-west-1") == {"https": "http://user:pw@proxy.corp:3128"}
    assert store_proxies("https://127.0.0.1:9000", None) == {}  # loopback: never proxied
    assert store_proxies("http://minio.corp:9000", None) == {}  # no HTTP_PROXY for http
    monkeypatch.setenv("NO_PROXY", "minio.corp")
    assert store_proxies("https://minio.corp:9000", None) == {}


async def test_a_proxy_in_the_environment_never_carries_loopback_store_traffic(
    s3_server: SeaweedS3,
    proxy: S3Proxy,
    s3_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{dead}")
    url = StoreUrl("s3", BUCKET, _prefix())
    path, sha = _package(tmp_path, 1000)
    async with S3Store.connect(url, retry=_policy(), part_size=PART) as store:
        await store.check()
        await store.upload(path, url.key_for("p.zip"), size=1000, sha256=sha)
    assert proxy.operations() == ["HeadBucket", "PutObject"]


async def test_no_permission_to_list_uploads_means_a_fresh_multipart_upload(
    s3_server: SeaweedS3, proxy: S3Proxy, s3_env: dict[str, str], tmp_path: Path
) -> None:
    url = StoreUrl("s3", BUCKET, _prefix())
    size = PART + 9
    path, sha = _package(tmp_path, size)
    proxy.answer = lambda seen: 403 if seen.operation == "ListMultipartUploads" else None
    async with S3Store.connect(url, retry=_policy(), part_size=PART) as store:
        result = await store.upload(path, url.key_for("p.zip"), size=size, sha256=sha)
    assert result.resumed is False
    assert proxy.operations()[:2] == ["ListMultipartUploads", "CreateMultipartUpload"]
    data, metadata = s3_server.get(url.key_for("p.zip"))
    assert hashlib.sha256(data).hexdigest() == sha == metadata["sha256"]


def test_a_part_is_sent_as_a_stream_of_the_staged_file_not_held_in_memory(tmp_path: Path) -> None:
    from batch_export.objectstore import _Part, _part_md5, _PartReader

    data = bytes(range(256)) * 12_288  # 3 MiB
    staged = tmp_path / "p.zip"
    staged.write_bytes(data)
    part = _Part(number=2, offset=1_000_000, size=1_500_000)
    expected = data[1_000_000:2_500_000]
    assert _part_md5(staged, part) == hashlib.md5(expected).digest()
    with _PartReader(staged, part) as body:
        first = body.read(65_536)  # aiohttp's read size: answered with 1 MiB (fewer thread hops)
        assert first == expected[: 1024 * 1024] and body.tell() == 1024 * 1024
        assert body.read(65_536) == expected[1024 * 1024 :]  # never past the part's end
        assert body.read(65_536) == b""
        assert body.seek(0) == 0 and body.read() == expected  # rewound for a retry or a hash
        assert body.seek(10, io.SEEK_END) == part.size
    short = _Part(number=1, offset=2_000_000, size=2_000_000)
    with pytest.raises(ObjectStoreError) as caught:
        _part_md5(staged, short)
    assert caught.value.code == "local_io"
