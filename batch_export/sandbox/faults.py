"""Fault injection: fixed hook points where the sandbox departs from the happy path.

The server asks :class:`Faults` at each hook point; :class:`Faults` asks its hooks in order. Every hook
derives from :class:`FaultHook`, whose methods are no-ops, so a new kind of fault overrides only the
points it cares about and is added with ``sandbox.faults.add(hook)``. :class:`ConfigFaults` implements
the faults set in :class:`~batch_export.sandbox.config.SandboxConfig` and is always installed first.

Hook points:

* API, after the key and the rate limit passed: :meth:`FaultHook.api_response` may answer instead
  (5xx, 429, HTML page …), also with a :class:`ScriptedResponse` that breaks the connection.
* Listing (``GET /v0/aois``, ``GET /v0/aoi/{id}/insights``), after the key and the rate limit
  passed: :meth:`FaultHook.listing_plan` may change the page served (:class:`ListingPlan`: a
  repeated page, a changed ``total``); then :meth:`FaultHook.listing_response` may answer instead
  of the document, like ``api_response``.
* API, permission: :meth:`FaultHook.denies`; package outcome: :meth:`FaultHook.fails`; signed URL
  lifetime: :meth:`FaultHook.url_lifetime` (``config.url_lifetime`` is the starting value); a ready
  answer without its URL: :meth:`FaultHook.withholds_url`.
* Package content: :meth:`FaultHook.corrupts`.
* Storage, after the signature was accepted: :meth:`FaultHook.storage_response` may answer instead
  (also with a :class:`ScriptedResponse`); :meth:`FaultHook.storage_plan` adjusts how the package
  is sent (:class:`StoragePlan`: cuts, resets, stalls, lying headers).

A hook that answers or alters a request may name what it did with :func:`note_fault`; the name is
kept in :attr:`~batch_export.sandbox.config.RecordedRequest.fault`.

:class:`~batch_export.sandbox.script.FaultScript` is a hook driven by rules (from Python, JSON or
YAML) that covers every fault the sandbox knows.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from aiohttp import web

from batch_export.sandbox.config import SandboxConfig
from batch_export.sandbox.packages import Selection

__all__ = [
    "FAULT_KEY",
    "Answer",
    "ApiContext",
    "ConfigFaults",
    "Ending",
    "FaultHook",
    "Faults",
    "ListingContext",
    "ListingPlan",
    "ScriptedResponse",
    "SegmentFault",
    "StorageContext",
    "StoragePlan",
    "note_fault",
]

FAULT_KEY = web.RequestKey("sandbox_fault", str)
"""Request key under which a hook names the fault it injected (see :func:`note_fault`)."""


def note_fault(request: web.Request, name: str) -> None:
    """Record that fault ``name`` was injected into ``request`` (kept in the request record)."""
    request[FAULT_KEY] = name


class Ending(enum.StrEnum):
    """How a connection ends after a body was cut short."""

    CLOSE = "close"
    """A clean close (FIN) once the bytes sent so far are flushed."""
    RESET = "reset"
    """An abort with ``SO_LINGER`` 0: the peer gets a TCP RST (``ECONNRESET``)."""
    STALL = "stall"
    """Nothing more for ``stall_seconds`` (or until the client leaves), then a clean close."""


@dataclass(frozen=True, slots=True)
class ScriptedResponse:
    """An answer the server writes by hand, so that it can break HTTP on the way.

    Attributes:
        status: Status line code.
        headers: Headers to send (``Date`` is added unless given).
        body: The body the headers describe.
        reset_before_headers: Send nothing at all: reset the connection (TCP RST) at once.
        stall_before_headers: Send nothing for this many seconds (or until the client leaves),
            then close the connection without an answer; ``None``: no stall.
        cut_after_bytes: Send only this many body bytes, then end the connection as ``ending``
            says; ``None`` sends the whole body.
        ending: How the connection ends after a cut (:class:`Ending`).
        stall_seconds: For :attr:`Ending.STALL`: how long to hold the connection silent (seconds).
        length_delta: ``Content-Length`` announces ``len(body) + length_delta`` bytes (at least
            0). More than the body: the body is sent, then the connection ends as ``ending`` says.
            Less: only the announced bytes are sent.
        chunked: Use chunked transfer coding (no ``Content-Length``); with a cut the body ends
            cleanly (a proper last chunk) after ``cut_after_bytes``.
        retry_after_date: Send ``Retry-After`` as an HTTP date this many seconds after a ``Date``
            header written from the same (whole-second) instant of the sandbox clock.
    """

    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    reset_before_headers: bool = False
    stall_before_headers: float | None = None
    cut_after_bytes: int | None = None
    ending: Ending = Ending.CLOSE
    stall_seconds: float = 0.0
    length_delta: int = 0
    chunked: bool = False
    retry_after_date: float | None = None


Answer = web.StreamResponse | ScriptedResponse
"""What a hook may answer instead of the sandbox: an aiohttp response or a scripted one."""


@dataclass(frozen=True, slots=True)
class ApiContext:
    """A PUT that passed the key check and the rate limit.

    Attributes:
        request: The request (its body is already read: ``await request.read()`` is cheap).
        key: The API key it carried.
        aoi_id: AOI id from the path.
        insight_id: Insight id from the path.
        number: 1-based count of API requests that reached this hook point.
        body: The request body as received (bytes).
    """

    request: web.Request
    key: str
    aoi_id: str
    insight_id: str
    number: int
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class ListingContext:
    """A listing GET that passed the key check and the rate limit.

    Attributes:
        request: The request.
        key: The API key it carried.
        route: ``"aois"`` (``GET /v0/aois``) or ``"insights"`` (``GET /v0/aoi/{id}/insights``).
        aoi_id: The AOI whose insights are listed; ``""`` for an AOI page.
        offset: The page's ``offset`` as asked (AOI pages; 0 for insights).
        limit: The page size in force (AOI pages; 0 for insights).
        number: 1-based count of listing requests that reached this hook point.
    """

    request: web.Request
    key: str
    route: str
    aoi_id: str
    offset: int
    limit: int
    number: int


@dataclass(slots=True)
class ListingPlan:
    """How one AOI page departs from the truth; hooks adjust it in place.

    Attributes:
        offset_shift: Serve the page that starts this many AOIs earlier than asked (a page that
            repeats AOIs already sent), never before offset 0.
        total_delta: Add this to ``pagination.total`` (a total that changes between pages).
    """

    offset_shift: int = 0
    total_delta: int = 0


@dataclass(frozen=True, slots=True)
class StorageContext:
    """A storage GET whose signature was accepted.

    Attributes:
        request: The request.
        package_id: Package id from the path.
        selection: What the package contains.
        attempt: 1-based count of accepted GETs of this package, this one included.
    """

    request: web.Request
    package_id: str
    selection: Selection
    attempt: int


@dataclass(slots=True)
class StoragePlan:
    """How one storage GET sends its body; hooks adjust it in place.

    Attributes:
        cut_after_bytes: Send the headers (full ``Content-Length``), this many body bytes, then
            end the connection as ``ending`` says; ``None`` sends the whole body.
        cut_fraction: Like ``cut_after_bytes``, as a fraction (0–1) of the bytes this answer
            would send; used when ``cut_after_bytes`` is ``None``.
        ending: How the connection ends after a cut or an over-long ``Content-Length``.
        stall_seconds: For :attr:`Ending.STALL`: seconds of silence before the close.
        length_delta: ``Content-Length`` announces this many bytes more (or fewer, if negative)
            than the body has; only the announced bytes are ever sent.
        chunked: Chunked transfer coding, no ``Content-Length``; a cut then ends the body
            cleanly with a last chunk, so nothing at the HTTP level says it is short.
        ignore_range: Answer 200 with the whole body even to a ``Range`` request.
        range_start: Answer 206 with the bytes from this offset, whatever was asked (also to a
            request without ``Range``).
        range_total_delta: Add this to the total in ``Content-Range`` (a 206 lying about the
            entity size).
        etag: Send this ``ETag`` instead of the package's MD5; ``""`` sends none.
        headers: Extra headers (e.g. a hostile ``Content-Disposition``).
        flip_byte_at: Flip one bit of the body byte at this index (of the bytes this answer
            sends; negative: the middle one); every header still describes the true bytes.
    """

    cut_after_bytes: int | None = None
    cut_fraction: float | None = None
    ending: Ending = Ending.CLOSE
    stall_seconds: float = 0.0
    length_delta: int = 0
    chunked: bool = False
    ignore_range: bool = False
    range_start: int | None = None
    range_total_delta: int = 0
    etag: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    flip_byte_at: int | None = None


class FaultHook:
    """Base class of fault hooks; every method is a no-op, override the points you need."""

    def api_response(self, ctx: ApiContext) -> Answer | None:
        """Return a response to send instead of handling the PUT, or ``None``."""
        return None

    def listing_plan(self, ctx: ListingContext, plan: ListingPlan) -> None:
        """Adjust ``plan`` for this AOI page (called for insight listings too; ignore those)."""

    def listing_response(self, ctx: ListingContext, document: bytes) -> Answer | None:
        """Return a response to send instead of the listing ``document`` (JSON bytes), or ``None``."""
        return None

    def denies(self, key: str, aoi_id: str, insight_id: str) -> bool:
        """Return ``True`` to answer 403 (permission) for this AOI/insight.

        For an insight listing ``insight_id`` is ``""``.
        """
        return False

    def fails(self, selection: Selection) -> bool:
        """Return ``True`` to end this package in the failed status instead of ready."""
        return False

    def corrupts(self, selection: Selection) -> bool:
        """Return ``True`` to serve this package with one flipped byte inside a member's data."""
        return False

    def url_lifetime(self, selection: Selection, lifetime: float) -> float:
        """Return the lifetime (seconds) of the signed URL about to be issued for ``selection``."""
        return lifetime

    def withholds_url(self, selection: Selection) -> bool:
        """Return ``True`` to send this ready answer with an empty ``signed_url``."""
        return False

    def storage_response(self, ctx: StorageContext) -> Answer | None:
        """Return a response to send instead of the package, or ``None``."""
        return None

    def storage_plan(self, ctx: StorageContext, plan: StoragePlan) -> None:
        """Adjust ``plan`` for this GET."""


class ConfigFaults(FaultHook):
    """The faults configured in :class:`SandboxConfig`, read afresh at every request.

    Args:
        config: Returns the sandbox's current configuration.
    """

    def __init__(self, config: Callable[[], SandboxConfig]) -> None:
        self._config = config

    def denies(self, key: str, aoi_id: str, insight_id: str) -> bool:
        """Deny the AOIs in ``denied_aois``."""
        return aoi_id in self._config().denied_aois

    def fails(self, selection: Selection) -> bool:
        """Fail the insights in ``fail_insights``."""
        return selection.insight_id in self._config().fail_insights

    def corrupts(self, selection: Selection) -> bool:
        """Corrupt the insights in ``corrupt_insights``."""
        return selection.insight_id in self._config().corrupt_insights

    def storage_plan(self, ctx: StorageContext, plan: StoragePlan) -> None:
        """Cut the first ``cut_times`` GETs of each package after ``cut_after_bytes``."""
        config = self._config()
        if config.cut_after_bytes is not None and ctx.attempt <= config.cut_times:
            plan.cut_after_bytes = config.cut_after_bytes


class SegmentFault(FaultHook):
    """A fault that hits chosen connections of a segmented download, not the whole package.

    A GET is a *segment* GET when its ``Range`` starts after byte 0 (the first GET of a
    segmented download asks ``bytes=0-``). The chosen ones get their plan changed by
    ``adjust`` (e.g. a cut after some bytes with a reset, a stall, another ``ETag``).

    Args:
        adjust: Changes the :class:`StoragePlan` of a chosen GET in place.
        nth: Which segment GETs are chosen (1-based, in order of arrival); empty: every one.
        start: Only segment GETs whose ``Range`` starts at this byte; ``None``: any.
        name: What :func:`note_fault` records for a chosen GET.

    Attributes:
        hits: ``Range`` header of each chosen GET, in order.
    """

    def __init__(
        self,
        adjust: Callable[[StoragePlan], None],
        *,
        nth: tuple[int, ...] = (),
        start: int | None = None,
        name: str = "segment_fault",
    ) -> None:
        self._adjust = adjust
        self._nth = nth
        self._start = start
        self._name = name
        self._seen = 0
        self.hits: list[str] = []

    def storage_plan(self, ctx: StorageContext, plan: StoragePlan) -> None:
        """Adjust the plan of the chosen segment GETs."""
        header = ctx.request.headers.get("Range", "")
        first = _range_start(header)
        if not first:
            return
        if self._start is not None and first != self._start:
            return
        self._seen += 1
        if self._nth and self._seen not in self._nth:
            return
        self.hits.append(header)
        note_fault(ctx.request, self._name)
        self._adjust(plan)


def _range_start(header: str) -> int | None:
    """First byte of a ``bytes=N-...`` header, or None."""
    unit, _, spec = header.partition("=")
    first = spec.partition("-")[0].strip()
    if unit.strip().lower() != "bytes" or not first.isdigit():
        return None
    return int(first)


class Faults:
    """The hooks in force, asked in order at each hook point.

    Args:
        hooks: Initial hooks, asked in this order.
    """

    def __init__(self, hooks: list[FaultHook] | None = None) -> None:
        self.hooks: list[FaultHook] = list(hooks or [])

    def add(self, hook: FaultHook) -> None:
        """Install ``hook`` after the existing ones."""
        self.hooks.append(hook)

    def remove(self, hook: FaultHook) -> None:
        """Uninstall ``hook``."""
        self.hooks.remove(hook)

    def api_response(self, ctx: ApiContext) -> Answer | None:
        """First non-``None`` answer of the hooks."""
        for hook in self.hooks:
            response = hook.api_response(ctx)
            if response is not None:
                return response
        return None

    def listing_plan(self, ctx: ListingContext) -> ListingPlan:
        """The plan for this listing GET after every hook adjusted it."""
        plan = ListingPlan()
        for hook in self.hooks:
            hook.listing_plan(ctx, plan)
        return plan

    def listing_response(self, ctx: ListingContext, document: bytes) -> Answer | None:
        """First non-``None`` answer of the hooks."""
        for hook in self.hooks:
            response = hook.listing_response(ctx, document)
            if response is not None:
                return response
        return None

    def denies(self, key: str, aoi_id: str, insight_id: str) -> bool:
        """Whether any hook denies this AOI/insight."""
        return any(hook.denies(key, aoi_id, insight_id) for hook in self.hooks)

    def fails(self, selection: Selection) -> bool:
        """Whether any hook fails this package."""
        return any(hook.fails(selection) for hook in self.hooks)

    def corrupts(self, selection: Selection) -> bool:
        """Whether any hook corrupts this package."""
        return any(hook.corrupts(selection) for hook in self.hooks)

    def url_lifetime(self, selection: Selection, lifetime: float) -> float:
        """``lifetime`` (seconds, from the config) as adjusted by each hook in turn."""
        for hook in self.hooks:
            lifetime = hook.url_lifetime(selection, lifetime)
        return lifetime

    def withholds_url(self, selection: Selection) -> bool:
        """Whether any hook withholds the URL of this ready answer (every hook is asked)."""
        answers = [hook.withholds_url(selection) for hook in self.hooks]
        return any(answers)

    def storage_response(self, ctx: StorageContext) -> Answer | None:
        """First non-``None`` answer of the hooks."""
        for hook in self.hooks:
            response = hook.storage_response(ctx)
            if response is not None:
                return response
        return None

    def storage_plan(self, ctx: StorageContext) -> StoragePlan:
        """The plan for this GET after every hook adjusted it."""
        plan = StoragePlan()
        for hook in self.hooks:
            hook.storage_plan(ctx, plan)
        return plan
