"""The runner on the fake transport (tests/transport.py): no socket, no real wait, counts exact."""

from __future__ import annotations

import hashlib
import io
import json
import math
import socket
import zipfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from batch_export.manifest import ExportSpec
from batch_export.runner import Outcome, Runner, RunResult, Settings
from batch_export.store import MemoryStore
from tests.fakes import FakeClock
from tests.test_e2e_runner import Recorder
from tests.transport import (
    FakePixxel,
    FakeRequest,
    FakeResponse,
    FakeTransport,
    fake_sessions,
    stall,
)

pytestmark = pytest.mark.anyio

KEY = "fake-transport-key-8d2f"
STORAGE = "https://bucket.storage.example.test"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def package(name: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as archive:
        # A fixed timestamp: the same bytes at every call (writestr with a name stamps "now").
        member = zipfile.ZipInfo(f"{name}.tif", date_time=(2026, 1, 1, 0, 0, 0))
        archive.writestr(member, name.encode() * 3000)
    return buf.getvalue()


SPECS = [
    ExportSpec("aoi-1", f"ins-{n}", (), ("layer",), f"job{n}", f"aoi-1/ins-{n}/job{n}.zip")
    for n in range(3)
]


def api_handler(polls_until_ready: int) -> tuple[FakeTransport, dict[str, int]]:
    seen: dict[str, int] = {}

    async def answer(request: FakeRequest) -> FakeResponse:
        assert request.headers["Authorization"] == KEY
        insight = request.url.path.split("/")[5]
        seen[insight] = seen.get(insight, 0) + 1
        ready = seen[insight] > polls_until_ready
        doc = {
            "id": insight,
            "status": "ready" if ready else "pending",
            "signed_url": f"{STORAGE}/p/{insight}.zip?X-Amz-Signature=s1gn" if ready else "",
        }
        return FakeResponse(200, json.dumps(doc).encode(), {"Content-Type": "application/json"})

    return FakeTransport(answer), seen


async def run(tmp_path: Path, api: FakeTransport, storage: FakeTransport) -> RunResult:
    settings = Settings(
        api_url="https://api.example.test",
        out_dir=tmp_path,
        state_dir=tmp_path / ".batch-export",
        connections=1,  # one stream, as these tests expect; segments: tests/test_segmented.py
        rate=50.0,
        poll_interval=5.0,
        poll_max_interval=30.0,
        poll_timeout=3600.0,
        retries=2,
        read_timeout=60.0,
        backoff_base=1.0,
        backoff_cap=10.0,
    )
    runner = Runner(
        settings,
        SPECS,
        api_key=KEY,
        store=MemoryStore(),
        observer=Recorder(),
        clock=FakeClock(),
        sessions=fake_sessions(api, storage),
    )
    return await runner.run()


async def test_pending_then_ready_then_a_broken_body_resumes(tmp_path: Path) -> None:
    api, puts = api_handler(polls_until_ready=2)
    gets: dict[str, int] = {}

    async def serve(request: FakeRequest) -> FakeResponse:
        assert "Authorization" not in request.headers
        name = request.url.path.rsplit("/", 1)[1].removesuffix(".zip")
        gets[name] = gets.get(name, 0) + 1
        body = package(name)
        if gets[name] == 1:  # the first GET of each package breaks half-way
            return FakeResponse(
                200, body, {"ETag": f'"{name}"'}, chunk=4096, break_after=len(body) // 2
            )
        if "Range" in request.headers:
            start = int(request.headers["Range"].removeprefix("bytes=").rstrip("-"))
            headers = {
                "ETag": f'"{name}"',
                "Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}",
            }
            return FakeResponse(206, body[start:], headers)
        return FakeResponse(200, body, {"ETag": f'"{name}"'})

    storage = FakeTransport(serve)
    result = await run(tmp_path, api, storage)

    assert [job.outcome for job in result.jobs] == [Outcome.DOWNLOADED] * 3
    for spec in SPECS:
        written = (tmp_path / spec.relpath).read_bytes()
        assert hashlib.sha256(written).digest() == hashlib.sha256(package(spec.insight_id)).digest()
    assert puts == {"ins-0": 3, "ins-1": 3, "ins-2": 3}
    assert gets == {"ins-0": 2, "ins-1": 2, "ins-2": 2}
    resumed = [r for r in storage.requests if "Range" in r.headers]
    assert len(resumed) == 3
    assert (result.api_requests, result.storage_requests) == (9, 6)


async def test_storage_dns_failure_names_the_host_and_the_proxy_variables(tmp_path: Path) -> None:
    api, _ = api_handler(polls_until_ready=0)

    async def unresolvable(request: FakeRequest) -> FakeResponse:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    storage = FakeTransport(unresolvable)
    result = await run(tmp_path, api, storage)

    assert [job.outcome for job in result.jobs] == [Outcome.FAILED] * 3
    errors = {job.error_code for job in result.jobs}
    assert errors == {"dns_error"}
    message = result.jobs[0].error_message or ""
    assert message.startswith(
        "cannot resolve the host of storage at bucket.storage.example.test:443; "
        "if this machine reaches the internet through a proxy, set HTTPS_PROXY"
    )
    assert "s1gn" not in message
    assert len(storage.requests) == 3 * 3  # retries: 2 -> three tries per job


async def test_a_server_disconnect_on_the_api_is_retried(tmp_path: Path) -> None:
    answers, _ = api_handler(polls_until_ready=0)
    calls = {"n": 0}

    async def flaky(request: FakeRequest) -> FakeResponse:
        calls["n"] += 1
        if calls["n"] == 1:
            raise aiohttp.ServerDisconnectedError()
        return await answers.handler(request)

    async def serve(request: FakeRequest) -> FakeResponse:
        name = request.url.path.rsplit("/", 1)[1].removesuffix(".zip")
        return FakeResponse(200, package(name))

    result = await run(tmp_path, FakeTransport(flaky), FakeTransport(serve))
    assert [job.outcome for job in result.jobs] == [Outcome.DOWNLOADED] * 3
    assert calls["n"] == 4


async def test_a_storage_refusal_echoing_secrets_reaches_no_sink_unredacted(tmp_path: Path) -> None:
    api, _ = api_handler(polls_until_ready=0)
    echo = (
        b"<Error><Code>AccessDenied</Code><Message>Request https://AKIAEXAMPLE:wJalrXUtnFEMI@bucket"
        b"/p/x.zip?X-Amz-Signature=s1gn refused for X-Amz-Credential=AKIAEXAMPLE/2026/s3 and "
        b"/p/x.zip?X-Amz-Signature=s1gn</Message><StringToSign>AWS4 s1gn</StringToSign></Error>"
    )

    async def refuse(request: FakeRequest) -> FakeResponse:
        return FakeResponse(403, echo, {"Content-Type": "application/xml"})

    result = await run(tmp_path, api, FakeTransport(refuse))
    assert [job.outcome for job in result.jobs] == [Outcome.FAILED] * 3
    message = result.jobs[0].error_message or ""
    assert message == (
        "storage refused the signed URL (HTTP 403): AccessDenied: Request "
        "https://<redacted>@bucket/p/x.zip?<redacted> refused for X-Amz-Credential=<redacted> and "
        "/p/x.zip?<redacted>"
    )
    for secret in ("s1gn", "wJalrXUtnFEMI", "AKIAEXAMPLE"):
        assert secret not in json.dumps([job.error_message for job in result.jobs])


# -- stalls spent retries: the decisions of tests/test_faults.py's "every time" cases, in virtual
# time (there each cost RETRIES + 1 real read timeouts); the real-socket proof that a stall is cut
# by read_timeout stays there, in the "once" cases.

RETRIES = 3
FAULTED = SPECS[0].insight_id


def faulted_run_settings(tmp_path: Path) -> Settings:
    return Settings(
        api_url="https://api.example.test",
        out_dir=tmp_path,
        state_dir=tmp_path / ".batch-export",
        connections=1,
        rate=1000.0,
        poll_interval=0.01,
        poll_max_interval=0.02,
        poll_timeout=60.0,
        retries=RETRIES,
        read_timeout=1.0,
        backoff_base=0.005,
        backoff_cap=0.02,
    )


async def run_faulted(tmp_path: Path, origin: str, fault: Callable[[], FakeResponse]) -> Any:
    """Three jobs on a FakePixxel whose ``origin`` answers the first job with ``fault()`` always."""

    async def hook(request: FakeRequest) -> FakeResponse | None:
        mine = f"/insights/{FAULTED}/" in request.url.path or request.url.path.endswith(
            f"/{FAULTED}.zip"
        )
        on_origin = (request.method == "PUT") == (origin == "api")
        return fault() if mine and on_origin else None

    pixxel = FakePixxel({spec.insight_id: package(spec.insight_id) for spec in SPECS}, fault=hook)
    runner = Runner(
        faulted_run_settings(tmp_path),
        SPECS,
        api_key=KEY,
        store=MemoryStore(),
        observer=Recorder(),
        clock=FakeClock(),
        sessions=pixxel.sessions(),
    )
    return pixxel, await runner.run()


def assert_failed_alone(pixxel: FakePixxel, result: RunResult, tmp_path: Path, code: str) -> None:
    job = result.jobs[0]
    assert job.outcome is Outcome.FAILED
    assert job.error_code == code, job.error_message
    assert job.error_message
    final = tmp_path / SPECS[0].relpath
    assert not final.exists() and not final.with_name(final.name + ".part").exists()
    for n, spec in enumerate(SPECS[1:], start=1):
        other = result.jobs[n]
        assert other.outcome is Outcome.DOWNLOADED, (other.error_code, other.error_message)
        written = tmp_path / spec.relpath
        served = hashlib.sha256(package(spec.insight_id)).hexdigest()
        assert hashlib.sha256(written.read_bytes()).hexdigest() == served == other.sha256
        assert other.bytes == written.stat().st_size
        with zipfile.ZipFile(written) as archive:
            assert archive.testzip() is None
        assert not written.with_name(written.name + ".part").exists()
        assert [r.status for r in pixxel.gets(spec.insight_id)] == [200]
        assert [r.status for r in pixxel.puts(spec.insight_id)] == [200, 200]


def stalled_headers() -> FakeResponse:
    raise stall()


def stalled_body() -> FakeResponse:
    body = b'{"id": "x", "status": "pending", "signed_url": ""}'
    return FakeResponse(200, body, {"Content-Type": "application/json"}, stall_after=0)


def stalled_package() -> FakeResponse:
    return FakeResponse(200, package(FAULTED), {"Content-Type": "application/zip"}, stall_after=0)


@pytest.mark.parametrize("fault", [stalled_body, stalled_headers], ids=["stall", "before-headers"])
async def test_an_api_stall_every_time_fails_that_job_only(
    tmp_path: Path, fault: Callable[[], FakeResponse]
) -> None:
    pixxel, result = await run_faulted(tmp_path, "api", fault)
    assert_failed_alone(pixxel, result, tmp_path, "timeout")
    assert len(pixxel.puts(FAULTED)) == RETRIES + 1
    assert pixxel.gets(FAULTED) == []
    assert result.jobs[0].attempts == 1


@pytest.mark.parametrize(
    "fault", [stalled_package, stalled_headers], ids=["before-body", "before-headers"]
)
async def test_a_storage_stall_every_time_fails_that_job_only(
    tmp_path: Path, fault: Callable[[], FakeResponse]
) -> None:
    pixxel, result = await run_faulted(tmp_path, "storage", fault)
    assert_failed_alone(pixxel, result, tmp_path, "stalled")
    assert len(pixxel.gets(FAULTED)) == RETRIES + 1


# -- a client faster than the server's per-key bucket: test_e2e_runner's 16/s case in virtual time
# (there it waited ~8 s of real Retry-After pauses; its 8/s case, no 429 at the server's own rate,
# stays on real time and sockets).


async def test_a_client_faster_than_the_servers_bucket_is_throttled_and_still_finishes(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    rate, burst = 8.0, 2.0  # the sandbox's bucket: SandboxConfig(rate=8.0, burst=2)
    bucket = {"tokens": burst, "at": clock.monotonic()}

    async def throttle(request: FakeRequest) -> FakeResponse | None:
        # The sandbox's token bucket (batch_export/sandbox/server.py), on the runner's clock.
        if request.method != "PUT":
            return None
        now = clock.monotonic()
        bucket["tokens"] = min(burst, bucket["tokens"] + (now - bucket["at"]) * rate)
        bucket["at"] = now
        if bucket["tokens"] >= 1.0 - 1e-6:
            bucket["tokens"] = max(0.0, bucket["tokens"] - 1.0)
            return None
        wait = max(1, math.ceil((1.0 - bucket["tokens"]) / rate - 1e-6))
        body = b'{"error": {"code": "rate_limited", "message": "slow down"}}'
        return FakeResponse(429, body, {"Retry-After": str(wait)})

    specs = [
        ExportSpec("aoi-1", f"ins-{n}", (), ("layer",), f"job{n}", f"aoi-1/ins-{n}/job{n}.zip")
        for n in range(20)
    ]
    pixxel = FakePixxel({s.insight_id: package(s.insight_id) for s in specs}, fault=throttle)
    settings = replace(faulted_run_settings(tmp_path), rate=16.0, in_flight=20, retries=4)
    runner = Runner(
        settings,
        specs,
        api_key=KEY,
        store=MemoryStore(),
        observer=Recorder(),
        clock=clock,
        sessions=pixxel.sessions(),
    )
    result = await runner.run()

    statuses = [r.status for r in pixxel.api.requests]
    assert result.exit_code == 0
    for spec in specs:
        written = (tmp_path / spec.relpath).read_bytes()
        assert hashlib.sha256(written).digest() == hashlib.sha256(package(spec.insight_id)).digest()
    assert statuses.count(429) > 0
    assert statuses.count(200) == 40
