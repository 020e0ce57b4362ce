"""Connection-level misbehaviour: TCP resets, stalls, short bodies, and hand-written answers.

aiohttp's server does HTTP correctly; these helpers break it on purpose, below the response object:

* :func:`reset` aborts the connection with ``SO_LINGER`` 0, so the peer gets a real TCP RST
  (``ECONNRESET``), unlike ``transport.close()``, which flushes and sends a FIN;
* :func:`stall` holds a connection silent for a bounded time, returning early when the peer leaves;
* :func:`send_scripted` writes a :class:`~batch_export.sandbox.faults.ScriptedResponse`.
"""

from __future__ import annotations

import asyncio
import email.utils
import socket
import struct
import time
from contextlib import suppress

from aiohttp import web

from batch_export.sandbox.faults import Ending, ScriptedResponse

__all__ = [
    "DATE_KEY",
    "MAX_STALL",
    "SETTLE",
    "STATUS_KEY",
    "end_connection",
    "flushed",
    "reset",
    "send_scripted",
    "stall",
]

_POLL = 0.01  # seconds between checks of a transport's state
_FLUSH_LIMIT = 2.0  # seconds to wait for the send buffer to empty before a reset
MAX_STALL = 3600.0
"""Upper bound of any stall (seconds): a stall is a fault, never a hang of the sandbox."""
SETTLE = 0.1
"""Seconds the bytes before a cut are given to reach the client's reader (see end_connection)."""
STATUS_KEY = web.RequestKey("sandbox_status", int)
"""The status actually sent on a request (0: none, the connection was reset before headers)."""
DATE_KEY = web.RequestKey("sandbox_date", str)
"""A ``Date`` header value the server must send as is (instead of its clock's)."""


def _gone(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def flushed(request: web.BaseRequest) -> None:
    """Wait (at most 2 s) until the transport handed every written byte to the kernel."""
    deadline = time.monotonic() + _FLUSH_LIMIT
    while not _gone(request) and time.monotonic() < deadline:
        transport = request.transport
        if transport is None or transport.get_write_buffer_size() == 0:
            return
        await asyncio.sleep(_POLL)


def reset(request: web.BaseRequest) -> None:
    """Abort the connection so that the peer receives a TCP RST."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def stall(request: web.BaseRequest, seconds: float) -> None:
    """Send nothing for ``seconds`` (capped at :data:`MAX_STALL`), or until the peer left."""
    deadline = time.monotonic() + min(max(0.0, seconds), MAX_STALL)
    while True:  # no event tells a handler that its peer left: look every 50 ms
        left = deadline - time.monotonic()
        if left <= 0 or _gone(request):
            return
        await asyncio.sleep(min(_POLL * 5, left))


async def end_connection(request: web.BaseRequest, ending: Ending, stall_seconds: float) -> None:
    """End a connection whose response was cut short, as ``ending`` says.

    Before a close or a reset, the bytes sent are flushed and given :data:`SETTLE` seconds to
    reach the client's reader: aiohttp (like many clients) drops bytes still in its buffer once
    the connection is known broken, which would make the resume offset a race. The client must
    be correct either way; the pause only makes the offsets tests see exact.
    """
    if _gone(request):
        return
    if ending is Ending.STALL:
        await stall(request, stall_seconds)
    else:
        await flushed(request)
        await asyncio.sleep(SETTLE)
    if ending is Ending.RESET:
        reset(request)
        return
    transport = request.transport
    if transport is not None:
        transport.close()  # flushes what was written, then FIN


async def send_scripted(
    request: web.Request, answer: ScriptedResponse, *, now: float
) -> web.StreamResponse:
    """Write ``answer`` on ``request``'s connection; return the (prepared) response object.

    ``now`` is the sandbox clock (seconds since the epoch), for a ``Retry-After`` date. A reset
    before the headers returns an unprepared response, which aiohttp then fails to send on the
    aborted connection (harmlessly).
    """
    headers = dict(answer.headers)
    if answer.retry_after_date is not None:
        instant = float(int(now))
        headers["Date"] = request[DATE_KEY] = email.utils.formatdate(instant, usegmt=True)
        headers["Retry-After"] = email.utils.formatdate(
            instant + answer.retry_after_date, usegmt=True
        )
    response = web.StreamResponse(status=answer.status, headers=headers)
    if answer.reset_before_headers:
        request[STATUS_KEY] = 0
        reset(request)
        return response
    if answer.stall_before_headers is not None:
        request[STATUS_KEY] = 0
        await stall(request, answer.stall_before_headers)
        if request.transport is not None:
            request.transport.close()
        return response
    body = answer.body
    announced = max(0, len(body) + answer.length_delta)
    to_send = len(body)
    if answer.chunked:
        response.enable_chunked_encoding()
    else:
        response.content_length = announced
        to_send = min(to_send, announced)
    cut = answer.cut_after_bytes is not None and answer.cut_after_bytes < to_send
    if cut and answer.cut_after_bytes is not None:
        to_send = max(0, answer.cut_after_bytes)
    try:
        await response.prepare(request)
        if to_send:
            await response.write(body[:to_send])
    except ConnectionError:
        return response
    if answer.chunked and cut:
        with suppress(ConnectionError):
            await response.write_eof()  # a proper last chunk: the body "ends" early
        return response
    if cut or announced > to_send:
        await end_connection(request, answer.ending, answer.stall_seconds)
    return response
