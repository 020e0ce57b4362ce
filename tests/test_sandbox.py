"""The sandbox (SPEC §6) over real loopback sockets: API origin, storage origin, faults, recording."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import signal
import socket
import subprocess
import sys
import urllib.request
import zipfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.web
import pytest
from click.testing import CliRunner
from multidict import CIMultiDict
from yarl import URL

from batch_export.sandbox import (
    DEMO_KEY,
    ApiContext,
    Catalog,
    FaultHook,
    Sandbox,
    SandboxConfig,
    Selection,
)
from batch_export.sandbox.cli import sandbox_command
from tests.fakes import SandboxClock

pytestmark = pytest.mark.anyio

T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z


@pytest.fixture
def clock() -> SandboxClock:
    return SandboxClock(T0)


@pytest.fixture
def make_config(clock: SandboxClock) -> Callable[..., SandboxConfig]:
    def make(**overrides: Any) -> SandboxConfig:
        values: dict[str, Any] = {"asset_size": 2048, "rate": None, "clock": clock}
        values.update(overrides)
        return SandboxConfig(**values)

    return make


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


CATALOG = Catalog.generate(0)
AOI = CATALOG.aois[0]
INSIGHT = AOI.insights[0]
OTHER_AOI = CATALOG.aois[1]


def put_url(sandbox: Sandbox, aoi_id: str = AOI.id, insight_id: str = INSIGHT.id) -> str:
    return f"{sandbox.api_url}/v0/aoi/{aoi_id}/insights/{insight_id}/download"


def selection_body(
    inputs: tuple[str, ...] = INSIGHT.inputs, outputs: tuple[str, ...] = INSIGHT.outputs
) -> dict[str, list[str]]:
    return {"inputs": list(inputs), "outputs": list(outputs)}


async def put(
    session: aiohttp.ClientSession,
    sandbox: Sandbox,
    body: Any = None,
    *,
    key: str | None = DEMO_KEY,
    aoi_id: str = AOI.id,
    insight_id: str = INSIGHT.id,
    raw: bytes | None = None,
) -> tuple[int, CIMultiDict[str], Any]:
    headers = {} if key is None else {"Authorization": key}
    if raw is not None:
        kwargs: dict[str, Any] = {"data": raw}
    else:
        kwargs = {"json": selection_body() if body is None else body}
    async with session.put(
        put_url(sandbox, aoi_id, insight_id), headers=headers, **kwargs
    ) as response:
        return response.status, CIMultiDict(response.headers), await response.json()


async def ready_url(
    session: aiohttp.ClientSession, sandbox: Sandbox, body: Any = None, **kwargs: Any
) -> str:
    for _ in range(10):
        status, _, answer = await put(session, sandbox, body, **kwargs)
        assert status == 200
        if answer["signed_url"]:
            return str(answer["signed_url"])
    raise AssertionError("never ready")


async def get(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> tuple[int, CIMultiDict[str], bytes]:
    async with session.get(URL(url, encoded=True), headers=headers or {}) as response:
        return response.status, CIMultiDict(response.headers), await response.read()


# -- API origin --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("vocabulary", "ready_after", "expected"),
    [
        ("pending/ready", 3, ["pending", "pending", "ready", "ready"]),
        ("CREATED/IN_PROGRESS/SUCCESS/FAILED", 3, ["CREATED", "IN_PROGRESS", "SUCCESS", "SUCCESS"]),
        ("pending/ready", 1, ["ready", "ready"]),
    ],
)
async def test_status_sequences(
    session: aiohttp.ClientSession,
    make_config: Callable[..., SandboxConfig],
    vocabulary: str,
    ready_after: int,
    expected: list[str],
) -> None:
    config = make_config(vocabulary=vocabulary, ready_after_puts=ready_after)
    async with Sandbox(config) as sandbox:
        answers = [(await put(session, sandbox))[2] for _ in expected]
    assert [a["status"] for a in answers] == expected
    assert all(a["id"] == INSIGHT.id for a in answers)
    for answer in answers:
        if answer["status"] in ("ready", "SUCCESS"):
            assert answer["signed_url"].startswith(f"{sandbox.storage_url}/packages/")
        else:
            assert answer["signed_url"] == ""


@pytest.mark.parametrize(
    ("vocabulary", "expected"),
    [
        ("pending/ready", ["pending", "failed", "failed"]),
        ("CREATED/IN_PROGRESS/SUCCESS/FAILED", ["CREATED", "FAILED", "FAILED"]),
    ],
)
async def test_fail_insights(
    session: aiohttp.ClientSession,
    make_config: Callable[..., SandboxConfig],
    vocabulary: str,
    expected: list[str],
) -> None:
    config = make_config(vocabulary=vocabulary, fail_insights=frozenset({INSIGHT.id}))
    async with Sandbox(config) as sandbox:
        answers = [(await put(session, sandbox))[2] for _ in expected]
    assert [a["status"] for a in answers] == expected
    assert [a["signed_url"] for a in answers] == ["", "", ""]


async def test_prepare_seconds_uses_the_clock(
    session: aiohttp.ClientSession, make_config: Callable[..., SandboxConfig], clock: SandboxClock
) -> None:
    config = make_config(ready_after_puts=1, prepare_seconds=30)
    async with Sandbox(config) as sandbox:
        statuses = [(await put(session, sandbox))[2]["status"]]
        clock.advance(29.5)
        statuses.append((await put(session, sandbox))[2]["status"])
        clock.advance(0.5)
        statuses.append((await put(session, sandbox))[2]["status"])
    assert statuses == ["pending", "pending", "ready"]


async def test_different_selections_are_different_packages(
    session: aiohttp.ClientSession, make_config: Callable[..., SandboxConfig]
) -> None:
    async with Sandbox(make_config()) as sandbox:
        first = await put(session, sandbox, selection_body(outputs=INSIGHT.outputs[:1]))
        second = await put(session, sandbox, selection_body(outputs=INSIGHT.outputs[:2]))
        third = await put(session, sandbox, selection_body(outputs=INSIGHT.outputs[:1]))
    assert [a[2]["status"] for a in (first, second, third)] == ["pending", "pending", "ready"]


@pytest.mark.parametrize(
    "key", [None, "", "wrong-key", f"Bearer {DEMO_KEY}", DEMO_KEY.upper()], ids=repr
)
async def test_bad_key_gets_403_envelope(
    session: aiohttp.ClientSession, make_config: Callable[..., SandboxConfig], key: str | None
) -> None:
    async with Sandbox(make_config()) as sandbox:
        status, headers, answer = await put(session, sandbox, key=key)
    assert status == 403
    assert headers["Content-Type"].startswith("application/json")
    assert set(answer) == {"error"}
    assert set(answer["error"]) == {"code", "details", "message"}
    assert answer["error"]["code"] == "invalid_api_key"
    assert answer["error"]["details"] is None
    assert "wrong-key" not in answer["error"]["message"]


@pytest.mark.parametrize(
    ("raw", "code", "details"),
    [
        (b"", "missing_body", None),
        (b"   ", "missing_body", None),
        (b"{not json", "invalid_json", ...),
        (b"\xff\xfe", "invalid_json", ...),
        (b"[]", "invalid_body", {"got": "list"}),
        (b'"inputs"', "invalid_body", {"got": "str"}),
        (b'{"outputs": ["ndvi"]}', "invalid_body", {"field": "inputs", "problem": "missing"}),
        (b'{"inputs": []}', "invalid_body", {"field": "outputs", "problem": "missing"}),
        (
            b'{"inputs": "scene", "outputs": []}',
            "invalid_body",
            {"field": "inputs", "problem": "not an array of strings"},
        ),
        (
            b'{"inputs": [], "outputs": [1]}',
            "invalid_body",
            {"field": "outputs", "problem": "not an array of strings"},
        ),
        (
            b'{"inputs": [], "outputs": null}',
            "invalid_body",
            {"field": "outputs", "problem": "not an array of strings"},
        ),
        (b'{"inputs": [], "outputs": []}', "empty_selection", None),
    ],
)
async def test_bad_body_gets_400_envelope(
    session: aiohttp.ClientSession,
    make_config: Callable[..., SandboxConfig],
    raw: bytes,
    code: str,
    details: Any,
) -> None:
    async with Sandbox(make_config()) as sandbox:
        status, _, answer = await put(session, sandbox, raw=raw)
    assert status == 400
    assert answer["error"]["code"] == code
    assert isinstance(answer["error"]["message"], str) and answer["error"]["message"]
    if details is not ...:
        assert answer["error"]["details"] == details


async def test_unknown_and_duplicate_asset_ids_get_400(
    session: aiohttp.ClientSession, make_config: Callable[..., SandboxConfig]
) -> None:
    other_output = next(o for o in OTHER_AOI.insights[0].outputs if o not in INSIGHT.outputs)
    body = {"inputs": [INSIGHT.inputs[0], "scene_1999_01_01"], "outputs": [other_output]}
    async with Sandbox(make_config()) as sandbox:
        status, _, answer = await put(session, sandbox, body)
        dup_status, _, dup = await put(
            session, sandbox, {"inputs": [], "outputs": [INSIGHT.outputs[0]] * 2}
        )
    assert status == 400
    assert answer["error"]["code"] == "unknown_asset"
    assert answer["error"]["details"] == {"inputs": ["scene_1999_01_01"], "outputs": [other_output]}
    assert dup_status == 400
    assert dup["error"]["details"]["duplicates"] == [INSIGHT.outputs[0]]


@pytest.mark.parametrize(
    ("aoi_id", "insight_id"),
    [
        (OTHER_AOI.id, OTHER_AOI.insights[0].id),  # denied
        ("aoi-000000", INSIGHT.id),  # unknown AOI
        (AOI.id, "ins-000000"),  # unknown insight
        (AOI.id, OTHER_AOI.insights[0].id),  # insight of another AOI
    ],
)
async def test_permission_403(
    session: aiohttp.ClientSession,
    make_config: Callable[..., SandboxConfig],
    aoi_id: str,
    insight_id: str,
) -> None:
    config = make_config(denied_aois=frozenset({OTHER_AOI.id}))
    async with Sandbox(config) as sandbox:
        status, _, answer = await put(
            session,
            sandbox,
            {"inputs": ["anything"], "outputs": []},
            aoi_id=aoi_id,
            insight_id=insight_id,
        )
    assert status == 403
    assert answer["error"]["code"] == "permission_denied"
    assert answer["error"]["details"] == {"aoi_id": aoi_id, "insight_id": insight_id}


async def test_rate_limit_429_with_retry_after(
    session: aiohttp.ClientSession, make_config: Callable[..., SandboxConfig], clock: SandboxClock
) -> None:
    config = make_config(rate=10.0, burst=2, keys=(DEMO_KEY, "second-key"))
    async with Sandbox(config) as sandbox:
        first = await put(session, sandbox)
        second = await put(session, sandbox)
        third = await put(session, sandbox)
        other_key = await put(session, sandbox, key="second-key")
        clock.advance(0.1)
        after_refill = await put(session, sandbox)
        again = await put(session, sandbox)
        config.rate = 0.25
        clock.advance(1.0)  # 0.25 token
        slow = await put(session, sandbox)
    assert [first[0], second[0], third[0], other_key[0], after_refill[0], again[0]] == [
        200,
        200,
        429,
        200,
        200,
        429,
    ]
    assert third[1]["Retry-After"] == "1"
    assert third[2]["error"]["code"] == "rate_limited"
    assert set(third[2]["error"]) == {"code", "details", "message"}
    assert slow[0] == 429 and slow[1]["Retry-After"] == "3"  # ceil(0.75 / 0.25)


async def test_other_methods_405_and_date_header(
    session: aiohttp.ClientSession, make_config: Callable[..., SandboxConfig]
) -> None:
    async with Sandbox(make_config()) as sandbox:
        async with session.get(put_url(sandbox), headers={"Authorization": DEMO_KEY}) as response:
            status, date, answer = response.status, response.headers["Date"], await response.json()
        async with session.post(put_url(sandbox)) as response:
            post_status = response.status
    assert status == 405 and post_status == 405
    assert answer["error"]["code"] == "method_not_allowed"
    assert date == "Fri, 15 Jan 2027 08:00:00 GMT"


# -- storage origin ----------------------------------------------------------------------------


async def test_signed_url_serves_the_selected_package(
    session: aiohttp.ClientSession, make_config: Callable[..., SandboxConfig]
) -> None:
    inputs, outputs = INSIGHT.inputs[:1], INSIGHT.outputs[::-1]
    async with Sandbox(make_config()) as sandbox:
        url = await ready_url(session, sandbox, selection_body(inputs, outputs))
        status, headers, data = await get(session, url)
        expected_sha = sandbox.package_bytes_sha256(AOI.id, INSIGHT.id, inputs, outputs)
    assert url.startswith(sandbox.storage_url)
    assert "X-Amz-Credential=SANDBOX%2F20270115%2Fus-east-1%2Fs3%2Faws4_request" in url
    assert "X-Amz-Date=20270115T080000Z&X-Amz-Expires=3600&" in url
    assert status == 200
    assert headers["Content-Type"] == "application/zip"
    assert headers["Accept-Ranges"] == "bytes"
    assert int(headers["Content-Length"]) == len(data)
    assert "Content-Encoding" not in headers
    assert headers["ETag"] == f'"{hashlib.md5(data).hexdigest()}"'
    assert hashlib.sha256(data).hexdigest() == expected_sha
    archive = zipfile.ZipFile(io.BytesIO(data))
    assert archive.testzip() is None
    assert archive.namelist() == [f"inputs/{i}.tif" for i in inputs] + [
        f"outputs/{o}.tif" for o in outputs
    ]
    assert all(info.file_size == 2048 for info in archive.infolist())
    assert all(info.compress_type == zipfile.ZIP_STORED for info in archive.infolist())


async def test_ranges(
    session: aiohttp.ClientSession, make_config: Callable[..., SandboxConfig]
) -> None:
    async with Sandbox(make_config()) as sandbox:
        url = await ready_url(session, sandbox)
        _, headers, whole = await get(session, url)
        etag, total = headers["ETag"], len(whole)
        open_ended = await get(session, url, {"Range": "bytes=100-"})
        bounded = await get(session, url, {"Range": "bytes=10-19", "If-Range": etag})
        suffix = await get(session, url, {"Range": "bytes=-5"})
        past_end = await get(session, url, {"Range": f"bytes=5-{total + 100}"})
        mismatch = await get(session, url, {"Range": "bytes=100-", "If-Range": '"0000"'})
        unsatisfiable = await get(session, url, {"Range": f"bytes={total}-"})
        garbage = await get(session, url, {"Range": "pages=1-2"})
    assert open_ended[0] == 206
    assert open_ended[1]["Content-Range"] == f"bytes 100-{total - 1}/{total}"
    assert open_ended[2] == whole[100:]
    assert open_ended[1]["ETag"] == etag
    assert bounded[0] == 206 and bounded[2] == whole[10:20]
    assert bounded[1]["Content-Range"] == f"bytes 10-19/{total}"
    assert bounded[1]["Content-Length"] == "10"
    assert suffix[0] == 206 and suffix[2] == whole[-5:]
    assert past_end[0] == 206 and past_end[2] == whole[5:]
    assert mismatch[0] == 200 and mismatch[2] == whole and "Content-Range" not in mismatch[1]
    assert unsatisfiable[0] == 416
    assert unsatisfiable[1]["Content-Range"] == f"bytes */{total}"
    assert garbage[0] == 200 and garbage[2] == whole


async def test_requoted_url_is_refused(
    session: aiohttp.ClientSession, make_config: Callable[..., SandboxConfig]
) -> None:
    async with Sandbox(make_config()) as sandbox:
        url = await ready_url(session, sandbox)
        requoted = await get(session, url.replace("%2F", "/"))
        tampered = await get(session, url.replace("X-Amz-Expires=3600", "X-Amz-Expires=9999"))
        unsigned = await get(session, url.partition("?")[0])
    for status, headers, body in (requoted, tampered, unsigned):
        assert status == 403
        assert headers["Content-Type"].startswith("application/xml")
        assert body.startswith(b"<?xml")
        assert b"<Code>SignatureDoesNotMatch</Code>" in body


async def test_expired_url_is_access_denied(
    session: aiohttp.ClientSession, make_config: Callable[..., SandboxConfig], clock: SandboxClock
) -> None:
    async with Sandbox(make_config(url_lifetime=60)) as sandbox:
        url = await ready_url(session, sandbox)
        assert "X-Amz-Expires=60&" in url
        clock.advance(60)
        at_limit = await get(session, url)
        clock.advance(1)
        expired = await get(session, url)
        fresh = await ready_url(session, sandbox)
        renewed = await get(session, fresh)
    assert at_limit[0] == 200
    assert expired[0] == 403
    assert expired[1]["Content-Type"].startswith("application/xml")
    assert b"<Code>AccessDenied</Code>" in expired[2]
    assert b"<Message>Request has expired</Message>" in expired[2]
    assert fresh != url and renewed[0] == 200


async def test_head_is_403(
    session: aiohttp.ClientSession, make_config: Callable[..., SandboxConfig]
) -> None:
    async with Sandbox(make_config()) as sandbox:
        url = await ready_url(session, sandbox)
        async with session.head(URL(url, encoded=True)) as response:
            status = response.status
    assert status == 403
    assert sandbox.requests_to("storage", "HEAD")[0].status == 403


async def test_cut_after_bytes_then_whole(
    session: aiohttp.ClientSession, make_config: Callable[..., SandboxConfig]
) -> None:
    async with Sandbox(make_config(cut_after_bytes=1000, cut_times=1)) as sandbox:
        url = await ready_url(session, sandbox)
        received = bytearray()
        async with session.get(URL(url, encoded=True)) as response:
            announced = int(response.headers["Content-Length"])
            with pytest.raises(aiohttp.ClientPayloadError):
                async for piece in response.content.iter_any():
                    received.extend(piece)
        status, _, whole = await get(session, url)
        expected_sha = sandbox.package_bytes_sha256(
            AOI.id, INSIGHT.id, INSIGHT.inputs, INSIGHT.outputs
        )
    assert len(received) == 1000
    assert announced == len(whole) > 1000
    assert bytes(received) == whole[:1000]
    assert status == 200
    assert hashlib.sha256(whole).hexdigest() == expected_sha


async def test_corrupt_package_fails_crc_but_matches_etag(
    session: aiohttp.ClientSession, make_config: Callable[..., SandboxConfig]
) -> None:
    config = make_config(corrupt_insights=frozenset({INSIGHT.id}))
    async with Sandbox(config) as sandbox:
        url = await ready_url(session, sandbox)
        status, headers, data = await get(session, url)
        expected_sha = sandbox.package_bytes_sha256(
            AOI.id, INSIGHT.id, INSIGHT.inputs, INSIGHT.outputs
        )
    assert status == 200
    assert int(headers["Content-Length"]) == len(data)
    assert headers["ETag"] == f'"{hashlib.md5(data).hexdigest()}"'
    assert hashlib.sha256(data).hexdigest() == expected_sha
    assert zipfile.ZipFile(io.BytesIO(data)).testzip() == f"inputs/{INSIGHT.inputs[0]}.tif"


# -- recording, determinism, plumbing ---------------------------------------------------------


async def test_recording_per_origin(
    session: aiohttp.ClientSession, make_config: Callable[..., SandboxConfig], clock: SandboxClock
) -> None:
    async with Sandbox(make_config()) as sandbox:
        await put(session, sandbox, key="nope")
        url = await ready_url(session, sandbox)
        clock.advance(5)
        await get(session, url, {"X-Probe": "yes"})
    api = sandbox.requests_to("api")
    storage = sandbox.requests_to("storage", "GET")
    assert [r.status for r in api] == [403, 200, 200]
    assert api[0].header("authorization") == "nope"
    assert all(
        r.method == "PUT" and r.path == put_url(sandbox)[len(sandbox.api_url) :] for r in api
    )
    assert api[1].header("Content-Type") == "application/json"
    assert api[1].body == b'{"inputs": ["' + b'", "'.join(i.encode() for i in INSIGHT.inputs) + (
        b'"], "outputs": ["' + b'", "'.join(o.encode() for o in INSIGHT.outputs) + b'"]}'
    )
    assert [r.at for r in api] == [T0, T0, T0]
    assert json.loads(api[0].response_body)["error"]["code"] == "invalid_api_key"
    assert json.loads(api[2].response_body)["signed_url"] == url
    assert storage[0].response_body == b""
    assert len(storage) == 1
    assert storage[0].header("Authorization") is None
    assert storage[0].header("X-Probe") == "yes"
    assert storage[0].status == 200 and storage[0].at == T0 + 5
    assert "?" + storage[0].query == url[url.index("?") :]
    assert storage[0].path == url[len(sandbox.storage_url) : url.index("?")]


async def test_determinism_across_instances(
    session: aiohttp.ClientSession, make_config: Callable[..., SandboxConfig], tmp_path: Path
) -> None:
    digests = []
    for cache in (None, tmp_path / "a", tmp_path / "a"):
        async with Sandbox(make_config(), cache_dir=cache) as sandbox:
            _, _, data = await get(session, await ready_url(session, sandbox))
            digests.append(hashlib.sha256(data).hexdigest())
            assert sandbox.catalog == CATALOG
    assert digests[0] == digests[1] == digests[2]
    async with Sandbox(make_config(seed=1)) as other:
        assert other.catalog != CATALOG


def test_default_catalog_shape() -> None:
    assert len(CATALOG.aois) >= 3
    assert all(2 <= len(aoi.insights) <= 4 for aoi in CATALOG.aois)
    assert Catalog.generate(0) == CATALOG
    ids = [aoi.id for aoi in CATALOG.aois] + [i.id for a in CATALOG.aois for i in a.insights]
    assert len(set(ids)) == len(ids)
    assert all(aoi.id.startswith("aoi-") for aoi in CATALOG.aois)


async def test_ports_differ_and_temp_cache_removed(
    make_config: Callable[..., SandboxConfig],
) -> None:
    sandbox = Sandbox(make_config())
    await sandbox.start()
    try:
        api, storage = URL(sandbox.api_url), URL(sandbox.storage_url)
        assert api.host == storage.host == "127.0.0.1"
        assert api.port != storage.port
        cache = sandbox._cache_dir
        assert cache is not None and cache.is_dir()
    finally:
        await sandbox.close()
    assert not cache.exists()


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "example.com", ""])
async def test_refuses_non_loopback_host(
    make_config: Callable[..., SandboxConfig], host: str
) -> None:
    with pytest.raises(ValueError, match="loopback"):
        await Sandbox(make_config()).start(host=host)


async def test_localhost_means_ipv4_loopback(make_config: Callable[..., SandboxConfig]) -> None:
    async with Sandbox(make_config()) as sandbox:
        pass
    other = Sandbox(make_config())
    await other.start(host="localhost")
    try:
        assert other.api_url.startswith("http://127.0.0.1:")
        assert other.storage_url.startswith("http://127.0.0.1:")
    finally:
        await other.close()
    assert sandbox.api_url.startswith("http://127.0.0.1:")


async def test_authorization_header_on_storage_is_refused(
    session: aiohttp.ClientSession, make_config: Callable[..., SandboxConfig]
) -> None:
    async with Sandbox(make_config()) as sandbox:
        url = await ready_url(session, sandbox)
        status, headers, body = await get(session, url, {"Authorization": DEMO_KEY})
    assert status == 400
    assert headers["Content-Type"].startswith("application/xml")
    assert b"<Code>InvalidArgument</Code>" in body
    assert sandbox.requests_to("storage")[0].header("Authorization") == DEMO_KEY


async def test_resume_after_cut_with_range(
    session: aiohttp.ClientSession, make_config: Callable[..., SandboxConfig]
) -> None:
    async with Sandbox(make_config(cut_after_bytes=700, cut_times=2)) as sandbox:
        url = await ready_url(session, sandbox)
        received = bytearray()
        etag = ""
        for _ in range(2):
            headers = {"Range": f"bytes={len(received)}-", "If-Range": etag} if etag else {}
            async with session.get(URL(url, encoded=True), headers=headers) as response:
                etag = response.headers["ETag"]
                with pytest.raises(aiohttp.ClientPayloadError):
                    async for piece in response.content.iter_any():
                        received.extend(piece)
        assert len(received) == 1400
        status, headers, rest = await get(
            session, url, {"Range": f"bytes={len(received)}-", "If-Range": etag}
        )
        expected = sandbox.package_bytes_sha256(AOI.id, INSIGHT.id, INSIGHT.inputs, INSIGHT.outputs)
    assert status == 206
    assert headers["Content-Range"].startswith("bytes 1400-")
    data = bytes(received) + rest
    assert hashlib.sha256(data).hexdigest() == expected
    assert zipfile.ZipFile(io.BytesIO(data)).testzip() is None
    assert [r.status for r in sandbox.requests_to("storage")] == [200, 206, 206]


async def test_client_going_away_mid_body_does_not_hurt(
    make_config: Callable[..., SandboxConfig],
) -> None:
    async with Sandbox(make_config(asset_size=3 * 1024 * 1024)) as sandbox:
        async with aiohttp.ClientSession() as session:
            url = await ready_url(session, sandbox)
            async with session.get(URL(url, encoded=True)) as response:
                await response.content.readexactly(1024)
                response.close()
        async with aiohttp.ClientSession() as session:
            status, _, data = await get(session, url)
    assert status == 200
    assert zipfile.ZipFile(io.BytesIO(data)).testzip() is None


async def test_hundreds_of_concurrent_connections(
    make_config: Callable[..., SandboxConfig],
) -> None:
    import anyio

    count = 300
    async with Sandbox(make_config(ready_after_puts=1)) as sandbox:
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            url = await ready_url(session, sandbox)
            statuses: list[int] = []
            digests: set[str] = set()

            async def one() -> None:
                status, _, answer = await put(session, sandbox)
                statuses.append(status)
                status, _, data = await get(session, str(answer["signed_url"]))
                statuses.append(status)
                digests.add(hashlib.sha256(data).hexdigest())

            async with anyio.create_task_group() as group:
                for _ in range(count):
                    group.start_soon(one)
    assert statuses.count(200) == 2 * count
    assert len(digests) == 1
    assert url.startswith(sandbox.storage_url)


async def test_access_log_redacts_queries(
    session: aiohttp.ClientSession,
    make_config: Callable[..., SandboxConfig],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="batch_export.sandbox.access")
    async with Sandbox(make_config()) as sandbox:
        url = await ready_url(session, sandbox)
        await get(session, url)
        await get(session, url.replace("%2F", "/"))
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("batch_export.sandbox")]
    storage_lines = [line for line in lines if "/packages/" in line]
    assert len(storage_lines) == 2
    assert all("?<redacted>" in line for line in storage_lines)
    assert not any("X-Amz" in line or "aws4_request" in line for line in lines)
    assert not any(DEMO_KEY in line for line in lines)


class FirstPutUnavailable(FaultHook):
    def __init__(self) -> None:
        self.seen: list[ApiContext] = []

    def api_response(self, ctx: ApiContext) -> aiohttp.web.StreamResponse | None:
        self.seen.append(ctx)
        if ctx.number == 1:
            return aiohttp.web.json_response({"error": "busy"}, status=503)
        return None

    def url_lifetime(self, selection: Selection, lifetime: float) -> float:
        return 5.0


async def test_fault_hooks_extend(
    session: aiohttp.ClientSession, make_config: Callable[..., SandboxConfig]
) -> None:
    hook = FirstPutUnavailable()
    async with Sandbox(make_config()) as sandbox:
        sandbox.faults.add(hook)
        statuses = [(await put(session, sandbox))[0] for _ in range(3)]
        url = await ready_url(session, sandbox)
    assert statuses == [503, 200, 200]
    assert [ctx.number for ctx in hook.seen] == [1, 2, 3, 4]
    assert hook.seen[0].key == DEMO_KEY and hook.seen[0].insight_id == INSIGHT.id
    assert "X-Amz-Expires=5&" in url


def _free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port >= 65535:
            continue
        with socket.socket() as second:
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no free pair of ports")


def test_cli_serves_until_sigterm() -> None:
    port = _free_port_pair()
    code = "from batch_export.sandbox.cli import sandbox_command; sandbox_command()"
    process = subprocess.Popen(
        [sys.executable, "-c", code, "--port", str(port), "--key", "k1", "--key", "k2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("Serving until"):
                break
        output = "".join(lines)
        with urllib.request.urlopen(
            urllib.request.Request(
                f"http://127.0.0.1:{port}/v0/aoi/{AOI.id}/insights/{INSIGHT.id}/download",
                data=json.dumps(selection_body()).encode(),
                method="PUT",
                headers={"Authorization": "k2", "Content-Type": "application/json"},
            )
        ) as response:
            assert json.load(response)["status"] == "pending"
        process.send_signal(signal.SIGTERM)
        rest, errors = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0
    assert f"API URL:     http://127.0.0.1:{port}\n" in output
    assert f"storage URL: http://127.0.0.1:{port + 1}\n" in output
    assert "API key:     k1\n" in output and "API key:     k2\n" in output
    assert AOI.id in output and INSIGHT.inputs[0] in output
    assert "sandbox stopped" in rest
    assert '"PUT /v0/aoi/' in errors


def test_cli_usage_errors() -> None:
    runner = CliRunner()
    assert runner.invoke(sandbox_command, ["--help"]).exit_code == 0
    result = runner.invoke(sandbox_command, ["--host", "0.0.0.0", "--port", "0"])
    assert result.exit_code == 2
    assert "loopback" in result.output
    result = runner.invoke(sandbox_command, ["--port", "9000", "--storage-port", "9000"])
    assert result.exit_code == 2


def test_sandbox_imports_nothing_from_the_client_side() -> None:
    import ast

    import batch_export.sandbox as package

    allowed_roots = {"aiohttp", "click", "yaml", "batch_export", *sys.stdlib_module_names}
    for source in Path(package.__file__).parent.glob("*.py"):
        tree = ast.parse(source.read_text(), str(source))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed_roots, (source.name, name)
                if name.startswith("batch_export"):
                    assert name.startswith("batch_export.sandbox"), (source.name, name)


def test_public_names() -> None:
    import batch_export.sandbox as package

    assert sorted(package.__all__) == sorted(
        name for name in vars(package) if not name.startswith("_") and name[0].isupper()
    )
    for name in package.__all__:
        assert getattr(package, name) is not None
