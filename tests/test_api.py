"""The API client against loopback origins: bounded requests, bounded parsing, redacted server text.

Counts are taken at the server; no assertion depends on how long anything took.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web

from batch_export.api import MAX_JSON_DEPTH, PixxelClient
from batch_export.clock import SystemClock
from batch_export.errors import ApiError, PollTimeout, RetriesExhausted
from batch_export.http import open_sessions
from batch_export.manifest import ExportSpec
from batch_export.ratelimit import RateLimiter
from batch_export.redact import Redactor
from tests.fakes import FakeClock

pytestmark = pytest.mark.anyio

KEY = "sk-live-0123456789abcdef"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Origin:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests = 0
        self.active = 0
        self.peak = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            return await self.handler(request)
        finally:
            self.active -= 1


@asynccontextmanager
async def api(
    handler: Handler,
    *,
    retries: int = 2,
    read_timeout: float = 5.0,
    connections: int = 64,
    clock: Any = None,
) -> AsyncIterator[tuple[PixxelClient, Origin]]:
    origin = Origin(handler)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", origin.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    clock = clock or FakeClock()
    try:
        async with open_sessions(
            api_connections=connections, storage_connections=1, environ={}
        ) as sessions:
            yield (
                PixxelClient(
                    sessions.api,
                    base_url=f"http://127.0.0.1:{port}",
                    api_key=KEY,
                    limiter=RateLimiter(10_000.0, clock=clock),
                    clock=clock,
                    retries=retries,
                    read_timeout=read_timeout,
                    redactor=Redactor([KEY]),
                    connections=connections,
                ),
                origin,
            )
    finally:
        await runner.cleanup()


SPEC = ExportSpec(
    aoi_id="aoi-1", insight_id="ins-1", inputs=(), outputs=("a",), name="j", relpath="j.zip"
)


def far() -> float:
    return 1e12


async def test_deeply_nested_json_is_a_retryable_bad_response() -> None:
    async def deep(request: web.Request) -> web.Response:
        return web.Response(body=b"[" * 100_000 + b"]" * 100_000, content_type="application/json")

    async with api(deep, retries=2) as (client, origin):
        with pytest.raises(RetriesExhausted) as info:
            await client.request_package(SPEC, deadline=far(), job_key="k")
    assert info.value.code == "bad_response"
    assert origin.requests == 3
    assert "nested deeper than" in info.value.message


async def test_json_just_past_the_depth_bound_is_refused_and_at_it_accepted() -> None:
    def nested(depth: int) -> bytes:
        return b'{"status": "pending", "x": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"

    async def answer(request: web.Request) -> web.Response:
        depth = int(request.query["depth"])
        return web.Response(body=nested(depth), content_type="application/json")

    async with api(answer, retries=0) as (client, _):
        ok = await client.request_json(
            "GET", "/x", params={"depth": str(MAX_JSON_DEPTH)}, deadline=far()
        )
        assert ok.doc["status"] == "pending"
        with pytest.raises(RetriesExhausted) as info:
            await client.request_json(
                "GET", "/x", params={"depth": str(MAX_JSON_DEPTH + 1)}, deadline=far()
            )
    assert info.value.code == "bad_response"


async def test_deeply_nested_error_envelope_is_still_an_answer() -> None:
    async def deep(request: web.Request) -> web.Response:
        return web.Response(status=400, body=b"[" * 100_000, content_type="application/json")

    async with api(deep) as (client, origin):
        with pytest.raises(ApiError) as info:
            await client.request_package(SPEC, deadline=far(), job_key="k")
    assert (info.value.code, info.value.message, origin.requests) == (
        "http_400",
        "API answered HTTP 400",
        1,
    )


async def test_server_text_is_redacted_where_it_enters() -> None:
    message = (
        f"key {KEY} refused; see https://bob:pw1@h.example.com/x?sig=abc and "
        "/bucket/p.zip?X-Amz-Signature=deadbeef"
    )

    async def echo(request: web.Request) -> web.Response:
        body = {"error": {"code": f"bad_key_{KEY}", "message": message}}
        return web.json_response(body, status=403)

    async with api(echo) as (client, _):
        with pytest.raises(ApiError) as info:
            await client.request_package(SPEC, deadline=far(), job_key="k")
    exc = info.value
    assert exc.code == "http_403"
    assert exc.message == (
        "key <redacted> refused; see https://<redacted>@h.example.com/x?<redacted> and "
        "/bucket/p.zip?<redacted> (error code 'bad_key_<redacted>')"
    )
    assert exc.job_key == "k" and exc.http_status == 403


async def test_an_identifier_code_is_kept() -> None:
    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"error": {"code": "unknown_asset", "message": "no"}}, status=400)

    async with api(refuse) as (client, _):
        with pytest.raises(ApiError) as info:
            await client.request_package(SPEC, deadline=far(), job_key="k")
    assert (info.value.code, info.value.message) == ("unknown_asset", "no")


async def trickle(request: web.Request) -> web.StreamResponse:
    """A valid status document, one byte every 50 ms (about 2.5 s in all)."""
    body = json.dumps({"id": "ins-1", "status": "pending", "signed_url": ""}).encode()
    resp = web.StreamResponse(headers={"Content-Type": "application/json"})
    resp.content_length = len(body)
    await resp.prepare(request)
    for i in range(len(body)):
        await resp.write(body[i : i + 1])
        await asyncio.sleep(0.05)
    return resp


async def test_a_trickling_api_is_cut_by_the_total_bound() -> None:
    # read_timeout 0.15 s: bytes keep coming every 50 ms, so only the total bound (0.3 s) can cut it.
    async with api(trickle, retries=1, read_timeout=0.15) as (client, origin):
        with pytest.raises(RetriesExhausted) as info:
            await client.request_package(SPEC, deadline=far(), job_key="k")
    assert info.value.code == "timeout"
    assert origin.requests == 2
    assert info.value.message.startswith("the API at 127.0.0.1:")
    assert "no complete answer within 0.3 s" in info.value.message


async def test_poll_timeout_holds_against_a_trickling_api() -> None:
    clock = SystemClock()
    async with api(trickle, retries=5, read_timeout=30.0, clock=clock) as (client, origin):
        with pytest.raises(PollTimeout) as info:
            await client.request_package(SPEC, deadline=clock.monotonic() + 0.3, job_key="k")
    assert info.value.code == "poll_timeout"
    assert origin.requests == 1
    assert "did not arrive before poll_timeout" in info.value.message


async def test_api_connections_are_bounded() -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.02)
        return web.json_response({"id": "i", "status": "pending", "signed_url": ""})

    async with api(slow, connections=4) as (client, origin):
        async with asyncio.TaskGroup() as tg:
            for _ in range(60):
                tg.create_task(client.request_package(SPEC, deadline=far(), job_key="k"))
    assert origin.requests == 60
    assert origin.peak == 4


async def test_a_long_retry_after_on_503_does_not_outlast_poll_timeout() -> None:
    async def busy(request: web.Request) -> web.Response:
        return web.Response(status=503, headers={"Retry-After": "900"})

    clock = FakeClock()
    async with api(busy, retries=6, clock=clock) as (client, origin):
        with pytest.raises(PollTimeout) as info:
            await client.request_package(SPEC, deadline=clock.now + 10.0, job_key="k")
    assert info.value.code == "poll_timeout"
    assert origin.requests == 1  # woken at the deadline, it gives up instead of sending again
    assert clock.sleeps == [10.0]
