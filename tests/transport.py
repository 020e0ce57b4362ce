"""A fake HTTP transport: the runner, the API client and the downloader without sockets.

``FakeTransport(handler)`` calls ``handler(request)`` for each request and gives back what it
returns (a :class:`FakeResponse`) or raises what it raises (``ConnectionResetError``,
``socket.gaierror``, ``aiohttp.ServerDisconnectedError``, … — the same types the real transport
raises, so :func:`batch_export.http.describe_failure` names them). A response may also break after
``break_after`` bytes of its body. ``fake_sessions(api, storage)`` is a
:class:`~batch_export.http.SessionFactory` for ``Runner(..., sessions=…)``.

Use it where the socket adds nothing (decisions, counts, retries under a fake clock); keep real
loopback servers for what is about the wire (proxies, TLS, HTTP framing).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from batch_export.http import HttpSession, ProxyRules, Sessions
from batch_export.redact import Redactor


@dataclass
class FakeRequest:
    method: str
    url: URL
    headers: dict[str, str]
    body: bytes | None


class _Content:
    def __init__(self, body: bytes, chunk: int, break_after: int | None) -> None:
        self._body = body
        self._chunk = chunk
        self._break_after = break_after
        self._pos = 0

    def _next(self, limit: int) -> bytes:
        end = min(len(self._body), self._pos + limit)
        if self._break_after is not None:
            if self._pos >= self._break_after:
                raise aiohttp.ClientPayloadError("connection broke mid-body (fake)")
            end = min(end, self._break_after)
        piece = self._body[self._pos : end]
        self._pos = end
        return piece

    async def iter_any(self) -> AsyncIterator[bytes]:
        while True:
            piece = self._next(self._chunk)
            if not piece:
                return
            yield piece

    async def read(self, n: int = -1) -> bytes:
        return self._next(len(self._body) if n < 0 else n)


class FakeResponse:
    def __init__(
        self,
        status: int = 200,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        *,
        chunk: int = 65536,
        break_after: int | None = None,
    ) -> None:
        self.status = status
        merged = {"Content-Length": str(len(body))} | (headers or {})
        self.headers = CIMultiDictProxy(CIMultiDict(merged))
        self.content = _Content(body, chunk, break_after)
        self.released = False

    def release(self) -> None:
        self.released = True


class _Call:
    """Awaitable and async context manager, like aiohttp's ``_RequestContextManager``."""

    def __init__(self, get: Callable[[], Awaitable[FakeResponse]]) -> None:
        self._get = get
        self._resp: FakeResponse | None = None

    def __await__(self) -> Any:
        return self._get().__await__()

    async def __aenter__(self) -> FakeResponse:
        self._resp = await self._get()
        return self._resp

    async def __aexit__(self, *exc: object) -> None:
        if self._resp is not None:
            self._resp.release()


Handler = Callable[[FakeRequest], Awaitable[FakeResponse]]


@dataclass
class FakeTransport:
    handler: Handler
    requests: list[FakeRequest] = field(default_factory=list)


class FakeHttpSession(HttpSession):
    def __init__(self, transport: FakeTransport) -> None:
        self.proxies = ProxyRules({})
        self._transport = transport

    def request(self, method: str, url: URL, **kwargs: Any) -> Any:
        request = FakeRequest(method, url, dict(kwargs.get("headers") or {}), kwargs.get("data"))

        async def get() -> FakeResponse:
            self._transport.requests.append(request)
            return await self._transport.handler(request)

        return _Call(get)


def fake_sessions(api: FakeTransport, storage: FakeTransport) -> Any:
    @asynccontextmanager
    async def open_fake(
        *, api_connections: int, storage_connections: int, redactor: Redactor | None = None
    ) -> AsyncIterator[Sessions]:
        yield Sessions(api=FakeHttpSession(api), storage=FakeHttpSession(storage))

    return open_fake
