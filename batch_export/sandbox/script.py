"""Scripted fault injection: rules that pick requests and break them, from Python, JSON or YAML.

A :class:`FaultScript` is a :class:`~batch_export.sandbox.faults.FaultHook` holding a list of
:class:`Rule`. A rule selects requests of one ``origin`` (``api``: the download PUT, ``storage``: the
package GET, ``listing``: the listing GETs, narrowed by ``route: aois|insights``), optionally of one
AOI and/or insight (an insight listing matches ``aoi_id``; an AOI page matches no ``aoi_id``), then picks among them by count (the ``nth``
matching requests, ``every`` k-th), by chance (``probability``, decided from the script's ``seed``)
or all of them, at most ``times`` times; each pick injects the rule's one fault. Every rule counts
every request it matches, whatever other rules do. When several rules pick one request, the faults
that change how the package body is sent (cuts, lying headers) all apply; of those that replace
the whole answer (errors, pages, resets) the first rule's wins and the others do not count it as
injected. File form (YAML; JSON is the same shape)::

    seed: 7
    rules:
      - {origin: api, fault: http_error, status: 503, empty_body: true, nth: 1}
      - {origin: api, fault: throttle, retry_after: 2, retry_after_form: date, every: 10}
      - {origin: storage, fault: reset_mid_body, after_bytes: 4096, probability: 0.05}
      - {origin: storage, fault: stall, stall_seconds: 30, insight_id: ins-a1b2}

Faults (and the origins where each may be used)::

    http_error            all            status 500/502/503/504 (``status``), body or ``empty_body``
    throttle              all            429 + Retry-After: ``retry_after`` s, ``retry_after_form``
                                         seconds | date | garbage | none
    html                  all            200 HTML page (``content_type``, default text/html)
    invalid_json          api, listing   200 with a body that is not JSON
    truncated_json        api, listing   200, the document cut in half (length matches)
    reset                 all            TCP RST before any header
    reset_mid_body        all            headers, ``after_bytes`` of the body, then TCP RST
    short_body            all            full Content-Length, ``after_bytes``, then a clean close
    stall                 all            headers, ``after_bytes``, silence for ``stall_seconds``
    stall_headers         all            no answer at all for ``stall_seconds``, then a close
    content_length_long   all            Content-Length says ``delta`` bytes more than the body
    content_length_short  all            Content-Length says ``delta`` bytes fewer (and only those
                                         are sent)
    chunked_short         all            chunked coding, body ends cleanly after ``after_bytes``
    repeat_page           listing        an AOI page that serves the page before it (AOIs already
                                         sent; the first page repeats itself)
    total_change          listing        an AOI page whose ``pagination.total`` is ``delta`` more
    ignore_range          storage        200 with the whole body to a Range request
    range_wrong_start     storage        206 from byte 0 whatever was asked (also without Range)
    range_wrong_total     storage        206 whose Content-Range total is ``delta`` too big
    wrong_etag            storage        an MD5-looking ETag that is not the body's
    flipped_byte          storage        one body byte flipped (at ``after_bytes``, default the
                                         middle); every header tells the truth about the package
    no_etag               storage        no ETag at all
    opaque_etag           storage        a strong ETag that is not an MD5 (S3 multipart upload,
                                         SSE-KMS): Range resumes allowed, no MD5 to check
    content_disposition   storage        Content-Disposition naming ``filename`` (a hostile path)
    failed                api            the package ends in the failed status
    url_lifetime          api            signed URLs valid for ``lifetime`` seconds
    empty_url             api            a ready answer with an empty signed_url

Range faults (``ignore_range``, ``range_wrong_total``) only pick GETs that carry ``Range``. ``failed``
picks packages (the n-th package seen, by chance per package …); ``url_lifetime`` picks issued URLs;
``empty_url`` picks ready answers. Decisions by chance are derived from (seed, rule, request key,
its count), so a job meets the same faults however requests interleave.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from batch_export.sandbox.faults import (
    Answer,
    ApiContext,
    Ending,
    FaultHook,
    ListingContext,
    ListingPlan,
    ScriptedResponse,
    StorageContext,
    StoragePlan,
    note_fault,
)
from batch_export.sandbox.packages import Selection

__all__ = ["Fault", "FaultScript", "Firing", "Rule"]


class Fault(enum.StrEnum):
    """The faults a :class:`Rule` can inject (see the module docstring)."""

    HTTP_ERROR = "http_error"
    THROTTLE = "throttle"
    HTML = "html"
    INVALID_JSON = "invalid_json"
    TRUNCATED_JSON = "truncated_json"
    RESET = "reset"
    RESET_MID_BODY = "reset_mid_body"
    SHORT_BODY = "short_body"
    STALL = "stall"
    STALL_HEADERS = "stall_headers"
    CONTENT_LENGTH_LONG = "content_length_long"
    CONTENT_LENGTH_SHORT = "content_length_short"
    CHUNKED_SHORT = "chunked_short"
    IGNORE_RANGE = "ignore_range"
    RANGE_WRONG_START = "range_wrong_start"
    RANGE_WRONG_TOTAL = "range_wrong_total"
    WRONG_ETAG = "wrong_etag"
    FLIPPED_BYTE = "flipped_byte"
    NO_ETAG = "no_etag"
    OPAQUE_ETAG = "opaque_etag"
    CONTENT_DISPOSITION = "content_disposition"
    FAILED = "failed"
    URL_LIFETIME = "url_lifetime"
    EMPTY_URL = "empty_url"
    REPEAT_PAGE = "repeat_page"
    TOTAL_CHANGE = "total_change"


_F = Fault
_BOTH = frozenset({"api", "storage", "listing"})
_API = frozenset({"api", "listing"})
_STORAGE = frozenset({"storage"})
_LISTING = frozenset({"listing"})
_PUT = frozenset({"api"})
#: Where each fault may be used.
ORIGINS: Mapping[Fault, frozenset[str]] = {
    _F.HTTP_ERROR: _BOTH,
    _F.THROTTLE: _BOTH,
    _F.HTML: _BOTH,
    _F.INVALID_JSON: _API,
    _F.TRUNCATED_JSON: _API,
    _F.RESET: _BOTH,
    _F.RESET_MID_BODY: _BOTH,
    _F.SHORT_BODY: _BOTH,
    _F.STALL: _BOTH,
    _F.STALL_HEADERS: _BOTH,
    _F.CONTENT_LENGTH_LONG: _BOTH,
    _F.CONTENT_LENGTH_SHORT: _BOTH,
    _F.CHUNKED_SHORT: _BOTH,
    _F.IGNORE_RANGE: _STORAGE,
    _F.RANGE_WRONG_START: _STORAGE,
    _F.RANGE_WRONG_TOTAL: _STORAGE,
    _F.WRONG_ETAG: _STORAGE,
    _F.FLIPPED_BYTE: _STORAGE,
    _F.NO_ETAG: _STORAGE,
    _F.OPAQUE_ETAG: _STORAGE,
    _F.CONTENT_DISPOSITION: _STORAGE,
    _F.FAILED: _PUT,
    _F.URL_LIFETIME: _PUT,
    _F.EMPTY_URL: _PUT,
    _F.REPEAT_PAGE: _LISTING,
    _F.TOTAL_CHANGE: _LISTING,
}
_ROUTES = ("aois", "insights")
_RANGE_ONLY = frozenset({_F.IGNORE_RANGE, _F.RANGE_WRONG_TOTAL})
_PLAN_FAULTS = frozenset(
    {
        _F.SHORT_BODY,
        _F.RESET_MID_BODY,
        _F.STALL,
        _F.CONTENT_LENGTH_LONG,
        _F.CONTENT_LENGTH_SHORT,
        _F.CHUNKED_SHORT,
        *_RANGE_ONLY,
        _F.RANGE_WRONG_START,
        _F.WRONG_ETAG,
        _F.FLIPPED_BYTE,
        _F.NO_ETAG,
        _F.OPAQUE_ETAG,
        _F.CONTENT_DISPOSITION,
    }
)
_RETRY_AFTER_FORMS = ("seconds", "date", "garbage", "none")
_HTML_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head>\n"
    b"<body><h1>Bad Gateway</h1><p>The upstream server is temporarily unavailable.</p>"
    b"<p>Please try again later.</p></body></html>\n"
)
_PICKED = web.RequestKey("sandbox_script_pick", object)
_PACKAGE_LEVEL = frozenset({_F.FAILED, _F.URL_LIFETIME, _F.EMPTY_URL})
_STORAGE_FAULTS = frozenset(f for f, origins in ORIGINS.items() if "storage" in origins)
_API_ANSWERS = frozenset(f for f, origins in ORIGINS.items() if "api" in origins) - _PACKAGE_LEVEL
_PAGE_FAULTS = frozenset({_F.REPEAT_PAGE, _F.TOTAL_CHANGE})
_LISTING_FAULTS = frozenset(f for f, origins in ORIGINS.items() if "listing" in origins)
_LISTING_PICKED = web.RequestKey("sandbox_listing_pick", object)


@dataclass(frozen=True, slots=True)
class Rule:
    """One fault and the requests it picks.

    Attributes:
        fault: What to inject (:class:`Fault`).
        origin: ``"api"`` (download PUT), ``"storage"`` (package GET) or ``"listing"`` (the
            listing GETs). (Not ``on``: YAML 1.1 reads an unquoted ``on:`` key as ``true``.)
        route: For ``listing``: only ``"aois"`` pages or only ``"insights"`` listings
            (``None``: both).
        aoi_id: Only requests for this AOI (``None``: any).
        insight_id: Only requests for this insight (``None``: any).
        nth: Pick the n-th matching requests (1-based); empty: no condition.
        every: Pick every k-th matching request (k, 2k, …); ``None``: no condition.
        probability: Pick with this chance (0–1), decided from the script's seed; ``None``: always.
        times: Pick at most this many requests in all; ``None``: no limit.
        status: HTTP status for ``http_error`` (400–599).
        empty_body: ``http_error``/``throttle`` answers carry no body at all.
        retry_after: Seconds a ``throttle`` (or ``http_error``) asks to wait; ``None``: no
            ``Retry-After`` header.
        retry_after_form: How ``Retry-After`` is written: ``seconds``, ``date`` (an HTTP date,
            with a matching ``Date``), ``garbage`` (unparseable) or ``none`` (no header).
        after_bytes: Body bytes sent before a cut, reset, stall or short chunked end, or the index
            of a ``flipped_byte``; ``None``: half of what the answer sends.
        stall_seconds: Silence of a ``stall`` before the server closes (seconds; bounded).
        delta: Bytes by which a ``content_length_*`` or ``range_wrong_total`` lies; AOIs that a
            ``total_change`` adds to ``pagination.total``.
        lifetime: Signed URL lifetime for ``url_lifetime`` (seconds).
        content_type: ``Content-Type`` of an ``html`` page.
        filename: File name offered by ``content_disposition``.
    """

    fault: Fault
    origin: str
    route: str | None = None
    aoi_id: str | None = None
    insight_id: str | None = None
    nth: tuple[int, ...] = ()
    every: int | None = None
    probability: float | None = None
    times: int | None = None
    status: int = 503
    empty_body: bool = False
    retry_after: float | None = None
    retry_after_form: str = "seconds"
    after_bytes: int | None = None
    stall_seconds: float = 5.0
    delta: int = 1000
    lifetime: float = 3.0
    content_type: str = "text/html; charset=utf-8"
    filename: str = "../../../../tmp/evil.zip"

    def __post_init__(self) -> None:
        object.__setattr__(self, "fault", Fault(self.fault))
        if isinstance(self.nth, int):  # Rule(..., nth=3) from Python
            object.__setattr__(self, "nth", (self.nth,))
        for name in ("probability", "retry_after"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, float(value))
        for name in ("stall_seconds", "lifetime"):
            object.__setattr__(self, name, float(getattr(self, name)))
        if self.origin not in ORIGINS[self.fault]:
            allowed = " or ".join(sorted(ORIGINS[self.fault]))
            raise ValueError(f"fault {self.fault} is for {allowed} requests, not {self.origin!r}")
        if self.route is not None and (self.origin != "listing" or self.route not in _ROUTES):
            raise ValueError("route is for listing rules: aois or insights")
        if self.fault in _PAGE_FAULTS and self.route == "insights":
            raise ValueError(f"fault {self.fault} is for AOI pages (route aois)")
        if any(n < 1 for n in self.nth):
            raise ValueError("nth counts from 1")
        if self.every is not None and self.every < 1:
            raise ValueError("every must be >= 1")
        if self.probability is not None and not 0.0 <= self.probability <= 1.0:
            raise ValueError("probability must be between 0 and 1")
        if self.times is not None and self.times < 0:
            raise ValueError("times must be >= 0")
        if not 400 <= self.status <= 599:
            raise ValueError("status must be an HTTP error status (400-599)")
        if self.retry_after_form not in _RETRY_AFTER_FORMS:
            raise ValueError(f"retry_after_form must be one of {', '.join(_RETRY_AFTER_FORMS)}")
        if self.after_bytes is not None and self.after_bytes < 0:
            raise ValueError("after_bytes must be >= 0")
        if self.stall_seconds < 0 or self.lifetime < 0 or self.delta < 0:
            raise ValueError("stall_seconds, lifetime and delta must be >= 0")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Rule:
        """Build a rule from its file form (``nth`` may be one number or a list).

        Raises:
            ValueError: unknown key, wrong type or value.
        """
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(map(str, set(data) - set(known)))
        if unknown:
            hint = " ('on' is 'origin')" if "True" in unknown or "on" in unknown else ""
            raise ValueError(f"unknown key(s): {', '.join(unknown)}{hint}")
        for required in ("fault", "origin"):
            if required not in data:
                raise ValueError(f"{required!r} is required")
        values: dict[str, Any] = {}
        for name, value in data.items():
            values[name] = _checked(name, value)
        return cls(**values)


_INTS = {"every", "times", "status", "after_bytes", "delta"}
_FLOATS = {"probability", "retry_after", "stall_seconds", "lifetime"}
_STRS = {
    "fault",
    "origin",
    "route",
    "aoi_id",
    "insight_id",
    "retry_after_form",
    "content_type",
    "filename",
}
_OPTIONAL = {
    "route",
    "aoi_id",
    "insight_id",
    "every",
    "probability",
    "times",
    "retry_after",
    "after_bytes",
}


def _checked(name: str, value: Any) -> Any:
    """Type-check one field of a rule's file form."""
    if value is None and name in _OPTIONAL:
        return None
    if name == "nth":
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in items):
            raise ValueError("nth must be a whole number or a list of them")
        return tuple(items)
    if name == "empty_body":
        if not isinstance(value, bool):
            raise ValueError("empty_body must be true or false")
        return value
    if name in _INTS:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{name} must be a whole number")
        return value
    if name in _FLOATS:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ValueError(f"{name} must be a number")
        return float(value)
    if name in _STRS:
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string")
        if name == "fault" and value not in Fault.__members__.values():
            raise ValueError(f"unknown fault {value!r}; known: {', '.join(Fault)}")
        return value
    raise ValueError(f"unknown key {name!r}")  # pragma: no cover - from_dict checked the keys


@dataclass(frozen=True, slots=True)
class Firing:
    """One fault injected: which rule, what, and on which request or package.

    Attributes:
        rule: Index of the rule in the script.
        fault: The fault injected.
        origin: ``"api"`` or ``"storage"``.
        aoi_id: AOI of the request or package.
        insight_id: Insight of the request or package.
    """

    rule: int
    fault: Fault
    origin: str
    aoi_id: str
    insight_id: str


@dataclass(slots=True)
class _Counters:
    matched: int = 0
    fired: int = 0
    per_key: dict[str, int] = field(default_factory=dict)


class FaultScript(FaultHook):
    """A fault hook driven by :class:`Rule` s; install with ``sandbox.faults.add(script)``.

    Args:
        rules: The rules, asked in order (how they combine: see the module docstring).
        seed: Seeds the decisions of rules with a ``probability``.

    Attributes:
        rules: The rules.
        seed: The seed.
        fired: Every fault injected so far, in order.
    """

    def __init__(self, rules: list[Rule] | tuple[Rule, ...], *, seed: int = 0) -> None:
        self.rules = tuple(rules)
        self.seed = seed
        self.fired: list[Firing] = []
        self._counters = [_Counters() for _ in self.rules]
        self._package_picks: dict[tuple[int, Selection], bool] = {}

    # -- construction ----------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Any) -> FaultScript:
        """Build a script from its file form: ``{"seed": int, "rules": [rule, …]}``.

        Raises:
            ValueError: anything malformed, with the rule's index.
        """
        if not isinstance(data, dict):
            raise ValueError("a fault script is a mapping with 'rules' (and optionally 'seed')")
        unknown = sorted(set(data) - {"seed", "rules"})
        if unknown:
            raise ValueError(f"unknown top-level key(s): {', '.join(map(str, unknown))}")
        seed = data.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError("seed must be a whole number")
        raw_rules = data.get("rules")
        if not isinstance(raw_rules, list):
            raise ValueError("'rules' must be a list of rules")
        rules = []
        for index, raw in enumerate(raw_rules):
            if not isinstance(raw, dict):
                raise ValueError(f"rules[{index}]: a rule is a mapping")
            try:
                rules.append(Rule.from_dict(raw))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"rules[{index}]: {exc}") from None
        return cls(rules, seed=seed)

    @classmethod
    def load(cls, path: Path) -> FaultScript:
        """Read a script from a ``.json`` file, or YAML otherwise.

        Raises:
            ValueError: unreadable, not JSON/YAML, or malformed (message names the file).
        """
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: cannot read: {exc}") from None
        try:
            data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"{path}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}"
            ) from None
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            where = f"{mark.line + 1}:{mark.column + 1}:" if mark is not None else ""
            raise ValueError(f"{path}:{where} not valid YAML: {exc.problem or exc}") from None
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML: {type(exc).__name__}") from None
        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    # -- inspection ------------------------------------------------------------------------------

    def count(self, fault: Fault | str | None = None) -> int:
        """How many faults (of kind ``fault``, or all) were injected so far."""
        return sum(1 for f in self.fired if fault is None or f.fault == fault)

    # -- picking ---------------------------------------------------------------------------------

    def _chance(self, index: int, key: str, number: int) -> float:
        digest = hashlib.sha256(f"{self.seed}:{index}:{key}:{number}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2.0**64

    def _picks(self, index: int, rule: Rule, key: str) -> bool:
        """Count one matching request for ``rule``; return whether the rule picks it."""
        counters = self._counters[index]
        counters.matched += 1
        number = counters.matched
        per_key = counters.per_key[key] = counters.per_key.get(key, 0) + 1
        if rule.times is not None and counters.fired >= rule.times:
            return False
        if rule.nth and number not in rule.nth:
            return False
        if rule.every is not None and number % rule.every:
            return False
        return rule.probability is None or self._chance(index, key, per_key) < rule.probability

    def _fire(self, index: int, origin: str, aoi_id: str, insight_id: str) -> Rule:
        """Record that rule ``index`` injected its fault; return the rule."""
        rule = self.rules[index]
        self._counters[index].fired += 1
        self.fired.append(Firing(index, rule.fault, origin, aoi_id, insight_id))
        return rule

    def _picking(
        self,
        origin: str,
        faults: frozenset[Fault],
        aoi_id: str,
        insight_id: str,
        key: str,
        *,
        ranged: bool = False,
        route: str | None = None,
    ) -> list[int]:
        """Indexes of the rules for ``faults`` that pick this request (each counts it)."""
        picked = []
        for index, rule in enumerate(self.rules):
            if rule.origin != origin or rule.fault not in faults:
                continue
            if rule.route is not None and rule.route != route:
                continue
            if rule.fault in _PAGE_FAULTS and route != "aois":
                continue
            if rule.aoi_id is not None and rule.aoi_id != aoi_id:
                continue
            if rule.insight_id is not None and rule.insight_id != insight_id:
                continue
            if rule.fault in _RANGE_ONLY and not ranged:
                continue
            if self._picks(index, rule, key):
                picked.append(index)
        return picked

    # -- API hook points -------------------------------------------------------------------------

    def api_response(self, ctx: ApiContext) -> Answer | None:
        """Answer a PUT picked by a request-level API rule."""
        key = f"{ctx.aoi_id}/{ctx.insight_id}/{hashlib.sha256(ctx.body).hexdigest()}"
        picked = self._picking("api", _API_ANSWERS, ctx.aoi_id, ctx.insight_id, key)
        if not picked:
            return None
        rule = self._fire(picked[0], "api", ctx.aoi_id, ctx.insight_id)
        note_fault(ctx.request, rule.fault)
        document = json.dumps(
            {"id": ctx.insight_id, "status": "pending", "signed_url": ""}
        ).encode()
        return _answer(rule, document, "application/json", api=True)

    # -- listing hook points ---------------------------------------------------------------------

    def listing_plan(self, ctx: ListingContext, plan: ListingPlan) -> None:
        """Pick this listing GET's rules; apply the page faults, keep the answers for later."""
        key = f"{ctx.route}/{ctx.aoi_id}/{ctx.offset}"
        picked = self._picking("listing", _LISTING_FAULTS, ctx.aoi_id, "", key, route=ctx.route)
        answers = [i for i in picked if self.rules[i].fault not in _PAGE_FAULTS]
        if answers:
            ctx.request[_LISTING_PICKED] = answers[0]
            return  # the answer replaces the whole page: the page faults do not count
        names = []
        for index in picked:
            rule = self._fire(index, "listing", ctx.aoi_id, "")
            names.append(rule.fault)
            if rule.fault is _F.REPEAT_PAGE:
                plan.offset_shift = max(plan.offset_shift, ctx.limit)
            else:
                plan.total_delta += max(1, rule.delta)
        if names:
            note_fault(ctx.request, "+".join(names))

    def listing_response(self, ctx: ListingContext, document: bytes) -> Answer | None:
        """Answer a listing GET picked by a rule that replaces the answer."""
        index = ctx.request.get(_LISTING_PICKED)
        if not isinstance(index, int):
            return None
        rule = self._fire(index, "listing", ctx.aoi_id, "")
        note_fault(ctx.request, rule.fault)
        return _answer(rule, document, "application/json", api=True)

    def fails(self, selection: Selection) -> bool:
        """Fail the packages picked by ``failed`` rules (decided once per package)."""
        for index, rule in enumerate(self.rules):
            if rule.fault is not Fault.FAILED:
                continue
            if (index, selection) not in self._package_picks:
                matches = (rule.aoi_id in (None, selection.aoi_id)) and (
                    rule.insight_id in (None, selection.insight_id)
                )
                picked = matches and self._picks(index, rule, selection.package_id)
                self._package_picks[index, selection] = picked
                if picked:
                    self._fire(index, "api", selection.aoi_id, selection.insight_id)
            if self._package_picks[index, selection]:
                return True
        return False

    def url_lifetime(self, selection: Selection, lifetime: float) -> float:
        """Shorten the URLs picked by ``url_lifetime`` rules."""
        picked = self._picking(
            "api",
            frozenset({Fault.URL_LIFETIME}),
            selection.aoi_id,
            selection.insight_id,
            selection.package_id,
        )
        if not picked:
            return lifetime
        return self._fire(picked[0], "api", selection.aoi_id, selection.insight_id).lifetime

    def withholds_url(self, selection: Selection) -> bool:
        """Empty the ``signed_url`` of ready answers picked by ``empty_url`` rules."""
        picked = self._picking(
            "api",
            frozenset({Fault.EMPTY_URL}),
            selection.aoi_id,
            selection.insight_id,
            selection.package_id,
        )
        if picked:
            self._fire(picked[0], "api", selection.aoi_id, selection.insight_id)
        return bool(picked)

    # -- storage hook points ---------------------------------------------------------------------

    def storage_response(self, ctx: StorageContext) -> Answer | None:
        """Pick this GET's rules; answer at once when one replaces the package."""
        selection = ctx.selection
        picked = self._picking(
            "storage",
            _STORAGE_FAULTS,
            selection.aoi_id,
            selection.insight_id,
            ctx.package_id,
            ranged="Range" in ctx.request.headers,
        )
        answers = [i for i in picked if self.rules[i].fault not in _PLAN_FAULTS]
        if answers:
            rule = self._fire(answers[0], "storage", selection.aoi_id, selection.insight_id)
            note_fault(ctx.request, rule.fault)
            return _answer(rule, _HTML_PAGE, "text/html", api=False)
        rules = [self._fire(i, "storage", selection.aoi_id, selection.insight_id) for i in picked]
        if rules:
            note_fault(ctx.request, "+".join(rule.fault for rule in rules))
            ctx.request[_PICKED] = rules
        return None

    def storage_plan(self, ctx: StorageContext, plan: StoragePlan) -> None:
        """Apply the body-level faults picked for this GET, if any."""
        for rule in ctx.request.get(_PICKED, []):
            _adjust(plan, rule)


def _adjust(plan: StoragePlan, rule: Rule) -> None:
    """Apply one body-level fault to ``plan``."""
    fault = rule.fault
    if fault in (_F.SHORT_BODY, _F.RESET_MID_BODY, _F.STALL, _F.CHUNKED_SHORT):
        if rule.after_bytes is None:
            plan.cut_fraction = 0.5
        else:
            plan.cut_after_bytes = rule.after_bytes
        plan.ending = {_F.RESET_MID_BODY: Ending.RESET, _F.STALL: Ending.STALL}.get(
            fault, Ending.CLOSE
        )
        plan.stall_seconds = rule.stall_seconds
        plan.chunked = fault is _F.CHUNKED_SHORT
    elif fault is _F.CONTENT_LENGTH_LONG:
        plan.length_delta = rule.delta
    elif fault is _F.CONTENT_LENGTH_SHORT:
        plan.length_delta = -rule.delta
    elif fault is _F.IGNORE_RANGE:
        plan.ignore_range = True
    elif fault is _F.RANGE_WRONG_START:
        plan.range_start = 0
    elif fault is _F.RANGE_WRONG_TOTAL:
        plan.range_total_delta = max(1, rule.delta)
    elif fault is _F.WRONG_ETAG:
        plan.etag = '"' + hashlib.md5(b"not the body", usedforsecurity=False).hexdigest() + '"'
    elif fault is _F.FLIPPED_BYTE:
        plan.flip_byte_at = -1 if rule.after_bytes is None else rule.after_bytes  # -1: middle
    elif fault is _F.NO_ETAG:
        plan.etag = ""
    elif fault is _F.OPAQUE_ETAG:
        plan.etag = plan.etag or '"9b2cf535f27731c974343645a3985328-2"'  # multipart-style
    elif fault is _F.CONTENT_DISPOSITION:
        plan.headers["Content-Disposition"] = f'attachment; filename="{rule.filename}"'


def _retry_after(rule: Rule) -> tuple[dict[str, str], float | None]:
    """``Retry-After`` headers for ``rule``, or the seconds of an HTTP-date form."""
    if rule.retry_after is None or rule.retry_after_form == "none":
        return {}, None
    if rule.retry_after_form == "garbage":
        return {"Retry-After": "soon, maybe"}, None
    if rule.retry_after_form == "date":
        return {}, rule.retry_after  # written by send_scripted, paired with Date
    seconds = rule.retry_after
    return {"Retry-After": str(int(seconds)) if seconds.is_integer() else str(seconds)}, None


def _answer(rule: Rule, document: bytes, document_type: str, *, api: bool) -> Answer:
    """The response a request-level rule sends (``document``: the body a good answer would have)."""
    fault = rule.fault
    if fault in (_F.HTTP_ERROR, _F.THROTTLE):
        status = 429 if fault is _F.THROTTLE else rule.status
        headers, date_form = _retry_after(rule)
        if rule.empty_body:
            return ScriptedResponse(status=status, headers=headers, retry_after_date=date_form)
        if api:
            body = json.dumps(
                {"error": {"code": f"http_{status}", "details": None, "message": "injected"}}
            ).encode()
            headers["Content-Type"] = "application/json"
        else:
            code = "SlowDown" if status in (429, 503) else "InternalError"
            body = (
                f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                "<Message>Please reduce your request rate.</Message></Error>"
            ).encode()
            headers["Content-Type"] = "application/xml"
        return ScriptedResponse(
            status=status, headers=headers, body=body, retry_after_date=date_form
        )
    if fault is _F.HTML:
        return ScriptedResponse(headers={"Content-Type": rule.content_type}, body=_HTML_PAGE)
    if fault is _F.INVALID_JSON:
        return ScriptedResponse(
            headers={"Content-Type": "application/json"},
            body=b"{'id': oops, status: pending,}",
        )
    if fault is _F.TRUNCATED_JSON:
        return ScriptedResponse(
            headers={"Content-Type": "application/json"}, body=document[: len(document) // 2]
        )
    if fault is _F.RESET:
        return ScriptedResponse(reset_before_headers=True)
    if fault is _F.STALL_HEADERS:
        return ScriptedResponse(stall_before_headers=rule.stall_seconds)
    typed = {"Content-Type": document_type}
    half = len(document) // 2
    after = rule.after_bytes if rule.after_bytes is not None else half
    if fault is _F.RESET_MID_BODY:
        return ScriptedResponse(
            headers=typed, body=document, cut_after_bytes=after, ending=Ending.RESET
        )
    if fault is _F.SHORT_BODY:
        return ScriptedResponse(headers=typed, body=document, cut_after_bytes=after)
    if fault is _F.STALL:
        return ScriptedResponse(
            headers=typed,
            body=document,
            cut_after_bytes=after,
            ending=Ending.STALL,
            stall_seconds=rule.stall_seconds,
        )
    if fault is _F.CONTENT_LENGTH_LONG:
        return ScriptedResponse(headers=typed, body=document, length_delta=rule.delta)
    if fault is _F.CONTENT_LENGTH_SHORT:
        return ScriptedResponse(headers=typed, body=document, length_delta=-rule.delta)
    if fault is _F.CHUNKED_SHORT:
        return ScriptedResponse(headers=typed, body=document, cut_after_bytes=after, chunked=True)
    raise AssertionError(f"{fault} is not a request-level fault")  # pragma: no cover
