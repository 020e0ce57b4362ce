"""The listing client of discovery (SPEC §7): which AOIs a selector names, and what each AOI holds.

Requests (Pixxel's published OpenAPI, docs.pixxel.space)::

    GET /v0/aois?offset=0&limit=100[&project_ids=p1,p2]
    200 {"aois": [{"aoi_id": "...", ...}], "pagination": {"limit", "offset", "total"}}
    GET /v0/aoi/{aoi_id}/insights
    200 {"insights": [{"id": "...", "name", "status", "created_at", "deleted_at", "input",
                       "output", ...}]}

Both go through one :class:`Fetch` — in a run, the API client's ``request_json`` (the shared
limiter, retries, error envelope and redaction of the PUT; every request counts in the report's
totals). The paging rules are a pure state machine, :class:`AoiPager`: the listing ends when
``offset >= pagination.total`` or a page comes back empty; a page that repeats an AOI already seen
(``paging_repeat``), a ``total`` that changes between pages (``paging_total_changed``) or more than
:data:`MAX_PAGES` pages (``paging_runaway``) end it with an error, keeping the AOIs of the pages
already read. A body that is not the documented shape is retried like a 5xx and then fails with
``bad_response``, as a PUT's would.

Every failure becomes a :class:`ListingError` in the result — of the selector's paging (its AOI
list) or of one AOI's insight listing — never an exception: the run goes ahead with the rest.
``aois: [ids]`` sends no ``/v0/aois`` request; each distinct AOI is listed once per call, however
many selectors name it, and each distinct AOI query (all, or one set of projects) is paged once.

A breaker (SPEC §9's, for listings): after :data:`BREAKER_FAILURES` listings in a row failed with
the same code that is plainly not the AOI's own — the API unreachable (retries spent on network
errors), a TLS failure, HTTP 401 — with no success between, the listings not yet sent are not sent:
they fail with that code at once, so a dead API costs a few listings' retries, not hundreds. A 403
with one code for 5 AOIs' listings in a row (no success between) is a rejected key, as for jobs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import anyio

from batch_export.api import PixxelClient
from batch_export.breaker import KEY_AOIS, KEY_STREAK
from batch_export.errors import UNREACHABLE_CODES, JobError

__all__ = [
    "BREAKER_FAILURES",
    "MAX_PAGES",
    "PAGE_LIMIT",
    "AoiListing",
    "AoiPager",
    "AoiQuery",
    "Fetch",
    "ListingError",
    "PagingError",
    "SelectorListing",
    "api_fetch",
    "check_aoi_page",
    "check_insights",
    "list_selectors",
]

#: AOIs asked per page (``limit``).
PAGE_LIMIT = 100
#: Most AOI pages one listing may take (1,000,000 AOIs) before it counts as runaway paging.
MAX_PAGES = 10_000
#: Listings in a row failing with the same run-wide code before the rest are not sent.
BREAKER_FAILURES = 3
_RUN_WIDE = UNREACHABLE_CODES | {"tls_error"}


class Fetch(Protocol):
    """One listing GET: the parsed JSON document of a usable 2xx answer.

    ``validate(doc)`` raises ``ValueError(reason)`` when the document cannot be used (the fetcher
    may retry such answers like a 5xx, as the API client does).

    Raises:
        JobError: the request failed for good (4xx with the server's code, retries spent, …).
    """

    def __call__(
        self, path: str, params: Mapping[str, str], validate: Callable[[Any], None]
    ) -> Awaitable[Any]:
        """Send ``GET path?params`` (path already percent-encoded) and return the document."""
        ...


def api_fetch(client: PixxelClient, *, deadline: float) -> Fetch:
    """The :class:`Fetch` of a run: ``client.request_json("GET", …)`` until ``deadline``.

    Args:
        client: The run's API client (its limiter, retries, redaction and request counts).
        deadline: Monotonic time (seconds) after which no turn is waited for (429 pauses and the
            rate limit included); a request still waiting then fails with ``poll_timeout``.
    """

    async def fetch(path: str, params: Mapping[str, str], validate: Callable[[Any], None]) -> Any:
        answer = await client.request_json(
            "GET", path, params=params or None, deadline=deadline, validate=validate
        )
        return answer.doc

    return fetch


class AoiQuery(Protocol):
    """What a selector says about its AOIs (``DiscoverSelector`` has these attributes).

    Exactly one of: ``aois`` (explicit ids), ``all_aois`` (``aois: all``), ``projects``.
    """

    @property
    def index(self) -> int:
        """Position in ``discover:``."""
        ...

    @property
    def aois(self) -> tuple[str, ...] | None:
        """Explicit AOI ids, or ``None``."""
        ...

    @property
    def all_aois(self) -> bool:
        """``aois: all``."""
        ...

    @property
    def projects(self) -> tuple[str, ...] | None:
        """Project ids, or ``None``."""
        ...


@dataclass(frozen=True, slots=True)
class ListingError:
    """Why a listing failed: a stable ``code``, a one-line ``message``, the HTTP status if any."""

    code: str
    message: str
    http_status: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The report form: ``{"code", "message", "http_status"}``."""
        return {"code": self.code, "message": self.message, "http_status": self.http_status}

    @classmethod
    def of(cls, exc: JobError) -> ListingError:
        """The listing error for a failed request."""
        return cls(exc.code, exc.message, exc.http_status)


@dataclass(frozen=True, slots=True)
class AoiListing:
    """One AOI's insight listing: the insights as listed (JSON objects), or why there are none.

    Attributes:
        aoi_id: The AOI.
        insights: Every insight the API returned, deleted and unready ones included, in order.
        error: Why the listing failed (then ``insights`` is empty), or ``None``.
    """

    aoi_id: str
    insights: tuple[Mapping[str, Any], ...] = ()
    error: ListingError | None = None


@dataclass(frozen=True, slots=True)
class SelectorListing:
    """What one selector's AOIs hold.

    Attributes:
        selector: The selector's index in ``discover:``.
        aois: One entry per AOI, in the order listed (or given).
        error: Why its AOI paging ended early (the AOIs of the pages read are still in ``aois``),
            or ``None``; always ``None`` for ``aois: [ids]``.
    """

    selector: int
    aois: tuple[AoiListing, ...]
    error: ListingError | None = None


class PagingError(Exception):
    """The AOI listing cannot go on; carries the :class:`ListingError`."""

    def __init__(self, error: ListingError) -> None:
        super().__init__(error.message)
        self.error = error


def _bad(message: str) -> ValueError:
    return ValueError(message)


def check_aoi_page(doc: Any) -> None:
    """Check an AOI page's shape.

    Raises:
        ValueError: not ``{"aois": [{"aoi_id": str, ...}], "pagination": {"total": int, ...}}``.
    """
    if not isinstance(doc, dict):
        raise _bad("the AOI page is not a JSON object")
    aois = doc.get("aois")
    if not isinstance(aois, list):
        raise _bad("the AOI page has no 'aois' array")
    for item in aois:
        if not isinstance(item, dict) or not isinstance(item.get("aoi_id"), str):
            raise _bad("an entry of 'aois' has no string 'aoi_id'")
        if not item["aoi_id"]:
            raise _bad("an entry of 'aois' has an empty 'aoi_id'")
    pagination = doc.get("pagination")
    total = pagination.get("total") if isinstance(pagination, dict) else None
    if not isinstance(total, int) or isinstance(total, bool) or total < 0:
        raise _bad("the AOI page has no whole-number 'pagination.total'")


def check_insights(doc: Any) -> None:
    """Check an insight listing's shape.

    Raises:
        ValueError: not ``{"insights": [{"id": str, ...}]}``.
    """
    if not isinstance(doc, dict) or not isinstance(doc.get("insights"), list):
        raise _bad("the insight listing has no 'insights' array")
    for item in doc["insights"]:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str) or not item["id"]:
            raise _bad("an entry of 'insights' has no string 'id'")


class AoiPager:
    """The paging rules of ``GET /v0/aois``, without I/O.

    Use: while :attr:`offset` is not ``None``, fetch the page at :attr:`offset` and give it to
    :meth:`take`; the AOI ids read so far are in :attr:`aoi_ids`.

    Args:
        limit: AOIs asked per page.
        max_pages: Most pages before the listing counts as runaway.
    """

    def __init__(self, *, limit: int = PAGE_LIMIT, max_pages: int = MAX_PAGES) -> None:
        self.limit = limit
        self.max_pages = max_pages
        self.offset: int | None = 0
        self.pages = 0
        self.total: int | None = None
        self.aoi_ids: list[str] = []
        self._seen: set[str] = set()

    def take(self, doc: Mapping[str, Any]) -> None:
        """Take the page just fetched (shape already checked by :func:`check_aoi_page`).

        Raises:
            PagingError: a repeated AOI, a changed total, or too many pages; :attr:`offset` is
                then ``None``.
        """
        assert self.offset is not None, "the listing has ended"
        self.pages += 1
        total = int(doc["pagination"]["total"])
        ids = [str(item["aoi_id"]) for item in doc["aois"]]
        if self.total is not None and total != self.total:
            self._stop(
                "paging_total_changed",
                f"the AOI listing's total changed from {self.total} to {total} between pages",
            )
        self.total = total
        repeated = [aoi for aoi in ids if aoi in self._seen]
        if repeated or len(set(ids)) != len(ids):
            shown = repeated[0] if repeated else ids[0]
            self._stop(
                "paging_repeat",
                f"the AOI page at offset {self.offset} repeats AOIs already listed "
                f"(e.g. {shown!r})",
            )
        self._seen.update(ids)
        self.aoi_ids.extend(ids)
        self.offset += len(ids)
        if not ids or self.offset >= total:
            self.offset = None
        elif self.pages >= self.max_pages:
            self._stop(
                "paging_runaway",
                f"the AOI listing did not end after {self.pages} pages "
                f"({len(self.aoi_ids)} of {total} AOIs)",
            )

    def _stop(self, code: str, message: str) -> None:
        self.offset = None
        raise PagingError(ListingError(code, message))


class _Breaker:
    """Counts listings failing in a row with one run-wide code; open: send no more.

    Run-wide: an unreachable API, a TLS failure, a 401 (``threshold`` in a row), or a 403 with one
    ``error.code`` for :data:`~batch_export.breaker.KEY_STREAK` listings in a row across at least
    :data:`~batch_export.breaker.KEY_AOIS` AOIs with no success between — the job breaker's rule
    for a rejected key (SPEC §9): a bad key over a 10,000-AOI ``aois: [ids]`` list cost 10,000
    listings and as many warning lines.
    """

    def __init__(self, threshold: int) -> None:
        self._threshold = threshold
        self._streak = 0
        self._last: ListingError | None = None
        self._forbidden: tuple[str, int, set[str]] | None = None  # code, listings, AOIs
        self.open: ListingError | None = None

    def record(self, error: ListingError | None, aoi_id: str | None = None) -> None:
        self._record_forbidden(error, aoi_id)
        run_wide = error is not None and (error.code in _RUN_WIDE or error.http_status == 401)
        if error is None or not run_wide:
            self._streak, self._last = 0, None
            return
        same = self._last is not None and self._last.code == error.code
        self._streak = self._streak + 1 if same else 1
        self._last = error
        if self._streak >= self._threshold and self.open is None:
            self.open = ListingError(
                error.code,
                f"not listed: the last {self._streak} listings failed the same way "
                f"({error.message})",
                error.http_status,
            )

    def _record_forbidden(self, error: ListingError | None, aoi_id: str | None) -> None:
        status = None if error is None else error.http_status
        if error is None or (status is not None and 400 <= status < 500 and status != 403):
            if status not in (408, 429):  # flow control says nothing about the key
                self._forbidden = None  # an answer that accepted the key
            return
        if status != 403:
            return  # 5xx, network: no answer about the key
        code, count, aois = self._forbidden or (error.code, 0, set())
        if code != error.code:
            code, count, aois = error.code, 0, set()
        aois.add(aoi_id or "")
        self._forbidden = (code, count + 1, aois)
        if count + 1 >= KEY_STREAK and len(aois) >= KEY_AOIS and self.open is None:
            self.open = ListingError(
                error.code,
                f"not listed: the last {count + 1} listings across {len(aois)} AOIs were refused "
                f"with HTTP 403 {error.code}, no success between: the API rejects the key? "
                f"({error.message})",
                403,
            )


async def _page_aois(
    fetch: Fetch, projects: tuple[str, ...] | None, *, max_pages: int, breaker: _Breaker
) -> tuple[tuple[str, ...], ListingError | None]:
    """Page through ``GET /v0/aois`` (of these projects); return the AOI ids and any error."""
    pager = AoiPager(max_pages=max_pages)
    while pager.offset is not None:
        if breaker.open is not None:
            return tuple(pager.aoi_ids), breaker.open
        params = {"offset": str(pager.offset), "limit": str(pager.limit)}
        if projects:
            params["project_ids"] = ",".join(projects)
        try:
            doc = await fetch("/v0/aois", params, check_aoi_page)
        except JobError as exc:
            error = ListingError.of(exc)
            breaker.record(error)
            return tuple(pager.aoi_ids), error
        breaker.record(None)
        try:
            pager.take(doc)
        except PagingError as exc:
            return tuple(pager.aoi_ids), exc.error
    return tuple(pager.aoi_ids), None


async def _list_insights(
    fetch: Fetch, aoi_id: str, encode: Callable[[str], str], breaker: _Breaker
) -> AoiListing:
    if breaker.open is not None:
        return AoiListing(aoi_id, error=breaker.open)
    try:
        doc = await fetch(f"/v0/aoi/{encode(aoi_id)}/insights", {}, check_insights)
    except JobError as exc:
        error = ListingError.of(exc)
        breaker.record(error, aoi_id)
        return AoiListing(aoi_id, error=error)
    breaker.record(None)
    return AoiListing(aoi_id, tuple(doc["insights"]))


async def list_selectors(
    fetch: Fetch,
    selectors: Sequence[AoiQuery],
    *,
    encode: Callable[[str], str],
    concurrency: int = 8,
    max_pages: int = MAX_PAGES,
) -> tuple[SelectorListing, ...]:
    """List what every selector's AOIs hold: pages first, then each distinct AOI once.

    Args:
        fetch: Sends one listing GET (see :class:`Fetch`).
        selectors: The ``discover:`` selectors, in order.
        encode: Percent-encodes an id as one path segment (the PUT's encoding).
        concurrency: Most insight listings in flight at once (all share the run's rate limit).
        max_pages: Most AOI pages per paged query.

    Returns:
        One :class:`SelectorListing` per selector, in order. Raises nothing for a failed listing.
    """
    breaker = _Breaker(BREAKER_FAILURES)
    paged: dict[tuple[str, ...] | None, tuple[tuple[str, ...], ListingError | None]] = {}
    chosen: list[tuple[tuple[str, ...], ListingError | None]] = []
    for selector in selectors:
        if selector.aois is not None:
            chosen.append((tuple(dict.fromkeys(selector.aois)), None))
            continue
        query = None if selector.all_aois else tuple(selector.projects or ())
        if query not in paged:
            paged[query] = await _page_aois(fetch, query, max_pages=max_pages, breaker=breaker)
        chosen.append(paged[query])
    wanted = list(dict.fromkeys(aoi for ids, _ in chosen for aoi in ids))
    listed: dict[str, AoiListing] = {}
    slots = anyio.Semaphore(max(1, concurrency))

    async def one(aoi_id: str) -> None:
        async with slots:
            listed[aoi_id] = await _list_insights(fetch, aoi_id, encode, breaker)

    async with anyio.create_task_group() as group:
        for aoi_id in wanted:
            group.start_soon(one, aoi_id)
    return tuple(
        SelectorListing(selector.index, tuple(listed[aoi] for aoi in ids), error)
        for selector, (ids, error) in zip(selectors, chosen, strict=True)
    )
