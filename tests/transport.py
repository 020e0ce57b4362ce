"""A fake HTTP transport: the runner, the API client and the downloader without sockets.

``FakeTransport(handler)`` calls ``handler(request)`` for each request and gives back what it
returns (a :class:`FakeResponse`) or raises what it raises (``ConnectionResetError``,
``socket.gaierror``, ``aiohttp.ServerDisconnectedError``, … — the same types the real transport
raises, so :func:`batch_export.http.describe_failure` names them). A response may also break after
``break_after`` bytes of its body, or stall after ``stall_after`` bytes (the read raises what
aiohttp raises when ``sock_read`` expires, at once: no real wait). Each request keeps the status it
was answered with (0 when the handler raised: no status line), as the sandbox records it.
``fake_sessions(api, storage)`` is a :class:`~batch_export.http.SessionFactory` for
``Runner(..., sessions=…)``; :class:`FakePixxel` is the sandbox's normal answers (pending, ready,
a package with an MD5 ETag, Range resumes) with a per-request fault hook.

Use it where the socket adds nothing (decisions, counts, retries under a fake clock); keep real
loopback servers for what is about the wire (proxies, TLS, HTTP framing).
"""

from __future__ import annotations

import hashlib
import json
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
    status: int = 0  # the status answered; 0 while unanswered or when the handler raised


#: What aiohttp raises when ``sock_read`` expires, before the headers or mid-body
#: (aiohttp/client_proto.py ``_on_read_timeout``, aiohttp >= 3.10).
def _read_timeout() -> BaseException:
    return aiohttp.SocketTimeoutError("Timeout on reading data from socket")


class _Content:
    def __init__(
        self, body: bytes, chunk: int, break_after: int | None, stall_after: int | None
    ) -> None:
        self._body = body
        self._chunk = chunk
        self._break_after = break_after
        self._stall_after = stall_after
        self._pos = 0

    def _next(self, limit: int) -> bytes:
        end = min(len(self._body), self._pos + limit)
        for after, fault in (
            (self._break_after, lambda: aiohttp.ClientPayloadError("broke mid-body (fake)")),
            (self._stall_after, _read_timeout),
        ):
            if after is not None:
                if self._pos >= after:
                    raise fault()
                end = min(end, after)
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
        stall_after: int | None = None,
    ) -> None:
        self.status = status
        merged = {"Content-Length": str(len(body))} | (headers or {})
        self.headers = CIMultiDictProxy(CIMultiDict(merged))
        self.content = _Content(body, chunk, break_after, stall_after)
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
            response = await self._transport.handler(request)
            request.status = response.status
            return response

        return _Call(get)


def fake_sessions(api: FakeTransport, storage: FakeTransport) -> Any:
    @asynccontextmanager
    async def open_fake(
        *, api_connections: int, storage_connections: int, redactor: Redactor | None = None
    ) -> AsyncIterator[Sessions]:
        yield Sessions(api=FakeHttpSession(api), storage=FakeHttpSession(storage))

    return open_fake


def stall() -> BaseException:
    """The exception a request stalled before its headers raises (raise it from a handler)."""
    return _read_timeout()


Fault = Callable[[FakeRequest], Awaitable[FakeResponse | None]]


class FakePixxel:
    """The sandbox's normal answers on the fake transport, with a fault hook per request.

    API: ``PUT /v0/aoi/{aoi}/insights/{insight}/download`` answers ``pending`` until the
    ``ready_after_puts``-th PUT of that insight that the fault hook let through (as the sandbox
    counts only PUTs past its key and rate checks), then ``ready`` with a signed URL
    ``{STORAGE}/packages/{insight}.zip?X-Amz-Signature=…``. Storage: ``GET`` of that path serves
    ``packages[insight]`` with a quoted MD5 ``ETag`` (what S3 gives a single-part object); a
    ``Range: bytes=N-`` whose ``If-Range`` matches is a 206 from byte N, a 416 past the end.
    ``fault(request)`` runs first for every request (both origins): it may raise (a network
    failure, :func:`stall`), return a :class:`FakeResponse`, or return None for the normal answer.
    """

    STORAGE = "https://storage.fake.test"

    def __init__(
        self, packages: dict[str, bytes], *, fault: Fault | None = None, ready_after_puts: int = 2
    ) -> None:
        self.packages = packages
        self.fault = fault
        self.ready_after_puts = ready_after_puts
        self._answered: dict[str, int] = {}  # PUTs per insight the fault hook let through
        self.api = FakeTransport(self._api)
        self.storage = FakeTransport(self._storage)

    def sessions(self) -> Any:
        """A SessionFactory for ``Runner(..., sessions=…)`` on these two origins."""
        return fake_sessions(self.api, self.storage)

    def puts(self, insight: str) -> list[FakeRequest]:
        """The PUTs for ``insight``, in order."""
        return [r for r in self.api.requests if r.url.path.split("/")[5] == insight]

    def gets(self, insight: str) -> list[FakeRequest]:
        """The storage GETs of ``insight``'s package, in order."""
        return [r for r in self.storage.requests if r.url.path == f"/packages/{insight}.zip"]

    async def _api(self, request: FakeRequest) -> FakeResponse:
        injected = await self.fault(request) if self.fault is not None else None
        if injected is not None:
            return injected
        insight = request.url.path.split("/")[5]
        self._answered[insight] = self._answered.get(insight, 0) + 1
        ready = self._answered[insight] >= self.ready_after_puts
        url = f"{self.STORAGE}/packages/{insight}.zip?X-Amz-Signature=fake" if ready else ""
        doc = {"id": insight, "status": "ready" if ready else "pending", "signed_url": url}
        return FakeResponse(200, json.dumps(doc).encode(), {"Content-Type": "application/json"})

    async def _storage(self, request: FakeRequest) -> FakeResponse:
        injected = await self.fault(request) if self.fault is not None else None
        if injected is not None:
            return injected
        body = self.packages[request.url.path.removeprefix("/packages/").removesuffix(".zip")]
        etag = f'"{hashlib.md5(body, usedforsecurity=False).hexdigest()}"'
        headers = {"ETag": etag, "Content-Type": "application/zip"}
        wanted = request.headers.get("Range")
        if wanted is None or request.headers.get("If-Range") not in (None, etag):
            return FakeResponse(200, body, headers)
        start = int(wanted.removeprefix("bytes=").rstrip("-"))
        if start >= len(body):
            return FakeResponse(416, b"", {"Content-Range": f"bytes */{len(body)}"})
        headers["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
        return FakeResponse(206, body[start:], headers)
