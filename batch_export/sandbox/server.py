"""The sandbox servers: the Pixxel API origin and the storage origin, on two loopback ports.

API origin (SPEC §1, §6)::

    PUT /v0/aoi/{aoi_id}/insights/{insight_id}/download     Authorization: <raw key>
    checks, in order: key (403) -> per-key token bucket (429 + Retry-After) -> body shape (400)
    -> permission (403: denied or unknown AOI/insight) -> asset ids of that insight (400)
    200 {"id": <insight id>, "status": <vocabulary>, "signed_url": "" | <presigned storage URL>}

Asset ids are checked only against an insight the key may see, so a 400 never reveals what a denied
AOI holds. Storage origin::

    GET /packages/{package_id}.zip?X-Amz-...&X-Amz-Signature=<hex>
    400 XML InvalidArgument (an Authorization header as well) | 403 XML SignatureDoesNotMatch
    | 403 XML AccessDenied "Request has expired" | 200/206/416 zip bytes
    HEAD -> 403 (a presigned GET URL is not valid for HEAD)

Listing (``GET /v0/aois``, ``GET /v0/aoi/{aoi_id}/insights``) and admin routes that change the
catalog while it runs: see :mod:`batch_export.sandbox.listing`.

Every request to either origin, rejected ones included, is appended to :attr:`Sandbox.requests`.
Access logs never contain query strings.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import ipaddress
import json
import logging
import math
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO
from xml.sax.saxutils import escape

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.typedefs import Handler, Middleware

from batch_export.sandbox.catalog import Catalog
from batch_export.sandbox.config import RecordedRequest, SandboxConfig
from batch_export.sandbox.faults import (
    FAULT_KEY,
    ApiContext,
    ConfigFaults,
    Faults,
    ScriptedResponse,
    StorageContext,
    StoragePlan,
)
from batch_export.sandbox.listing import ListingRoutes
from batch_export.sandbox.packages import (
    CHUNK_SIZE,
    BuiltPackage,
    Selection,
    build_package,
    variant_name,
)
from batch_export.sandbox.signing import UrlSigner, Verdict
from batch_export.sandbox.wire import DATE_KEY, STATUS_KEY, end_connection, send_scripted

__all__ = ["RedactingAccessLogger", "Sandbox", "loopback_host"]

API_PATH = "/v0/aoi/{aoi_id}/insights/{insight_id}/download"
_MAX_PARALLEL_BUILDS = 4
_EPSILON = 1e-6  # float slack: wall-clock seconds near 1.8e9 carry ~2e-7 s of rounding
_STATUS = STATUS_KEY
_SENT = web.RequestKey("sandbox_bytes_sent", int)

access_logger = logging.getLogger("batch_export.sandbox.access")


class RedactingAccessLogger(AbstractAccessLogger):
    """Access log line per request with the query string replaced by ``?<redacted>``.

    Line: ``<remote> "<METHOD> <raw path>[?<redacted>]" <status> <bytes sent> <seconds>s``.
    """

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        """Write one line for ``request`` (``time``: seconds the handler took)."""
        path, mark, _ = request.raw_path.partition("?")
        self.logger.info(
            '%s "%s %s%s" %d %d %.3fs',
            request.remote,
            request.method,
            path,
            "?<redacted>" if mark else "",
            response.status,
            response.body_length,
            time,
        )


def loopback_host(host: str) -> str:
    """Return ``host`` as a loopback IP address (``localhost`` → ``127.0.0.1``).

    Raises:
        ValueError: ``host`` is not a loopback IP address or ``localhost``.
    """
    if host == "localhost":
        return "127.0.0.1"
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"the sandbox serves on loopback only, not {host!r}")
    return host


def _envelope(status: int, code: str, message: str, details: Any = None) -> web.Response:
    body = {"error": {"code": code, "details": details, "message": message}}
    return web.json_response(body, status=status)


def _xml_error(status: int, code: str, message: str, **extra: str) -> web.Response:
    fields = "".join(f"<{k}>{escape(v)}</{k}>" for k, v in extra.items())
    text = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{escape(message)}</Message>{fields}</Error>"
    )
    return web.Response(status=status, text=text, content_type="application/xml")


def _http_date(moment: float) -> str:
    return email.utils.formatdate(moment, usegmt=True)


def _consume_exception(task: asyncio.Task[BuiltPackage]) -> None:
    """Mark a background build's failure as seen; whoever awaits the task gets it again."""
    if not task.cancelled():
        task.exception()


class _Unsatisfiable(Exception):
    """The Range header names no byte of the package."""


def _byte_range(header: str, total: int) -> tuple[int, int] | None:
    """Parse a single ``bytes=`` range into inclusive (first, last); ``None`` means ignore it.

    Raises:
        _Unsatisfiable: The range is well-formed but starts beyond the end.
    """
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first_text, dash, last_text = spec.strip().partition("-")
    if not dash:
        return None
    first_text, last_text = first_text.strip(), last_text.strip()
    if not first_text:  # suffix range: the last N bytes
        if not last_text.isdigit():
            return None
        count = int(last_text)
        if count == 0 or total == 0:
            raise _Unsatisfiable
        return max(0, total - count), total - 1
    if not first_text.isdigit() or (last_text and not last_text.isdigit()):
        return None
    first = int(first_text)
    if last_text and int(last_text) < first:
        return None  # syntactically invalid: ignored, as RFC 9110 says
    if first >= total:
        raise _Unsatisfiable
    last = int(last_text) if last_text else total - 1
    return first, min(last, total - 1)


@dataclasses.dataclass(slots=True)
class _PackageState:
    first_put: float
    puts: int = 0
    ready_at: float | None = None


@dataclasses.dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class Sandbox:
    """The simulated Pixxel API and its storage, served on two loopback ports.

    Args:
        config: Behaviour; mutable, read afresh at every request. Defaults to
            :class:`SandboxConfig` ``()``.
        cache_dir: Where package zips are built; a temporary folder removed by :meth:`close` when
            omitted. A given folder is kept, and packages found there are reused.

    Attributes:
        config: The configuration in force.
        catalog: AOIs, insights and asset ids, generated from ``config.seed``; replaced by a
            changed copy when :attr:`listing` adds or changes an insight.
        listing: The listing routes; ``sandbox.listing.add_insight(...)`` and
            ``update_insight(...)`` change the catalog while it runs.
        faults: Fault hooks in force (:class:`~batch_export.sandbox.faults.Faults`).
        requests: Every request received by either origin, in order of arrival; an entry has
            status 0 until its answer is sent. Tests may clear it between phases.
        api_url: API origin, e.g. ``http://127.0.0.1:41234`` (no trailing slash); set by :meth:`start`.
        storage_url: Storage origin (a different port); set by :meth:`start`.
    """

    def __init__(
        self, config: SandboxConfig | None = None, *, cache_dir: Path | None = None
    ) -> None:
        self.config = config if config is not None else SandboxConfig()
        self.catalog = Catalog.generate(self.config.seed, self.config.aoi_count)
        self.faults = Faults([ConfigFaults(lambda: self.config)])
        self.listing = ListingRoutes(self, self._admit)
        self.requests: list[RecordedRequest] = []
        self.api_url = ""
        self.storage_url = ""
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._cache_dir = cache_dir
        self._signer = UrlSigner()
        self._packages: dict[Selection, _PackageState] = {}
        self._by_id: dict[str, Selection] = {}
        self._storage_gets: dict[str, int] = {}
        self._buckets: dict[str, _Bucket] = {}
        self._built: dict[str, BuiltPackage] = {}
        self._building: dict[str, asyncio.Task[BuiltPackage]] = {}
        self._build_slots = asyncio.Semaphore(_MAX_PARALLEL_BUILDS)
        self._api_requests = 0
        self._runners: list[web.AppRunner] = []
        self._active = 0  # requests being answered
        self._idle = asyncio.Event()
        self._idle.set()

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(
        self, host: str = "127.0.0.1", api_port: int = 0, storage_port: int = 0
    ) -> None:
        """Start both origins on ``host`` (loopback only).

        Args:
            host: Loopback address; ``localhost`` means ``127.0.0.1``.
            api_port: API port; 0 picks a free one.
            storage_port: Storage port; 0 picks a free one.

        Raises:
            ValueError: ``host`` is not a loopback address.
            OSError: A port could not be bound.
        """
        host = loopback_host(host)
        if self._runners:
            raise RuntimeError("sandbox already started")
        self._directory()
        self.listing.start()
        try:
            self.api_url = await self._serve(self._api_app(), "api", host, api_port)
            self.storage_url = await self._serve(self._storage_app(), "storage", host, storage_port)
        except BaseException:
            await self.close()
            raise

    async def _serve(self, app: web.Application, origin: str, host: str, port: int) -> str:
        runner = web.AppRunner(
            app,
            access_log_class=RedactingAccessLogger,
            access_log=access_logger.getChild(origin),
            shutdown_timeout=1.0,
        )
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, host, port, backlog=1024)
        await site.start()
        bound = runner.addresses[0][1]
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{bound}"

    async def close(self) -> None:
        """Stop both origins, wait for package builds in progress, remove the temporary cache."""
        runners, self._runners = self._runners, []
        for runner in runners:
            await runner.cleanup()
        if self._building:
            await asyncio.gather(*self._building.values(), return_exceptions=True)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
            self._cache_dir = None

    async def __aenter__(self) -> Sandbox:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- inspection ----------------------------------------------------------------------------

    async def idle(self) -> None:
        """Wait until no request is being answered, so every record has its final status.

        A client that gave up on an answer (e.g. its read timeout) leaves the handler running a
        little longer; count requests after this (under ``asyncio.timeout`` if in doubt).
        """
        await self._idle.wait()

    def requests_to(self, origin: str, method: str | None = None) -> list[RecordedRequest]:
        """Recorded requests to ``origin`` (``"api"``/``"storage"``), optionally of one method."""
        return [
            r
            for r in self.requests
            if r.origin == origin and (method is None or r.method == method.upper())
        ]

    def package_bytes_sha256(
        self,
        aoi_id: str,
        insight_id: str,
        inputs: tuple[str, ...] | list[str],
        outputs: tuple[str, ...] | list[str],
    ) -> str:
        """SHA-256 (hex) of the bytes the storage serves for this selection, faults included.

        Builds the package (blocking) if it is not built yet.
        """
        return self._build_now(Selection(aoi_id, insight_id, tuple(inputs), tuple(outputs))).sha256

    def package_bytes(
        self,
        aoi_id: str,
        insight_id: str,
        inputs: tuple[str, ...] | list[str],
        outputs: tuple[str, ...] | list[str],
    ) -> bytes:
        """The bytes the storage serves for this selection, faults included (whole, in memory).

        Builds the package (blocking) if it is not built yet; meant for small test packages.
        """
        built = self._build_now(Selection(aoi_id, insight_id, tuple(inputs), tuple(outputs)))
        return built.path.read_bytes()

    # -- packages ------------------------------------------------------------------------------

    def _variant(self, selection: Selection) -> tuple[str, bool]:
        corrupt = self.faults.corrupts(selection)
        name = variant_name(self.catalog.seed, self.config.asset_size, selection, corrupt=corrupt)
        return name, corrupt

    def _directory(self) -> Path:
        if self._cache_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="batch-export-sandbox-")
            self._cache_dir = Path(self._tmp.name)
        return self._cache_dir

    def _build_now(self, selection: Selection) -> BuiltPackage:
        name, corrupt = self._variant(selection)
        built = self._built.get(name)
        if built is None:
            built = build_package(
                self._directory(),
                self.catalog.seed,
                self.config.asset_size,
                selection,
                corrupt=corrupt,
            )
            self._built[name] = built
        return built

    def _start_build(self, selection: Selection) -> BuiltPackage | asyncio.Task[BuiltPackage]:
        """Return the built package, or the (possibly just started) task building it."""
        name, corrupt = self._variant(selection)
        built = self._built.get(name)
        if built is not None:
            return built
        task = self._building.get(name)
        if task is None:
            task = asyncio.ensure_future(self._build(name, selection, corrupt))
            task.add_done_callback(_consume_exception)
            self._building[name] = task
        return task

    async def _ensure_built(self, selection: Selection) -> BuiltPackage:
        started = self._start_build(selection)
        if isinstance(started, BuiltPackage):
            return started
        return await asyncio.shield(started)

    async def _build(self, name: str, selection: Selection, corrupt: bool) -> BuiltPackage:
        try:
            async with self._build_slots:
                built = await asyncio.to_thread(
                    build_package,
                    self._directory(),
                    self.catalog.seed,
                    self.config.asset_size,
                    selection,
                    corrupt=corrupt,
                )
            self._built[name] = built
            return built
        finally:
            self._building.pop(name, None)

    # -- shared plumbing -----------------------------------------------------------------------

    def _recorder(self, origin: str) -> Middleware:
        sandbox = self

        @web.middleware
        async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
            at = sandbox.config.clock()
            path, _, query = request.raw_path.partition("?")
            entry = RecordedRequest(
                origin=origin,
                method=request.method,
                path=path,
                query=query,
                headers=tuple(
                    (k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers
                ),
                body=b"",
                status=0,
                at=at,
            )
            sandbox.requests.append(entry)  # in order of arrival; status 0 until answered
            sandbox._active += 1
            sandbox._idle.clear()
            response: web.StreamResponse | None = None
            body = b""
            try:
                body = await request.read()
                response = await handler(request)
            except web.HTTPException as exc:
                response = sandbox._http_error(origin, exc)
            finally:
                status = request.get(_STATUS)
                if status is None:
                    status = response.status if response is not None else 500
                answer = response.body if isinstance(response, web.Response) else None
                final = dataclasses.replace(
                    entry,
                    body=body,
                    status=status,
                    response_body=answer if isinstance(answer, bytes) else b"",
                    fault=request.get(FAULT_KEY, ""),
                    bytes_sent=request.get(_SENT, 0),
                )
                sandbox._replace_record(entry, final)
                sandbox._active -= 1
                if sandbox._active == 0:
                    sandbox._idle.set()
            return response

        return record

    def _replace_record(self, old: RecordedRequest, new: RecordedRequest) -> None:
        for index in range(len(self.requests) - 1, -1, -1):
            if self.requests[index] is old:
                self.requests[index] = new
                return
        self.requests.append(new)  # the list was cleared meanwhile

    def _http_error(self, origin: str, exc: web.HTTPException) -> web.StreamResponse:
        code = {404: "NoSuchKey", 405: "MethodNotAllowed"}.get(exc.status, "InvalidRequest")
        if origin == "api":
            code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "bad_request")
            response: web.StreamResponse = _envelope(exc.status, code, exc.reason)
        else:
            response = _xml_error(exc.status, code, exc.reason)
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response

    async def _on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        # A fault may set its own Date (e.g. to pair it exactly with a Retry-After date).
        response.headers["Date"] = request.get(DATE_KEY) or _http_date(self.config.clock())
        request[_STATUS] = response.status

    # -- API origin ----------------------------------------------------------------------------

    def _api_app(self) -> web.Application:
        app = web.Application(middlewares=[self._recorder("api")])
        app.router.add_put(API_PATH, self._put)
        self.listing.add_routes(app)
        app.on_response_prepare.append(self._on_prepare)
        return app

    def _rate_limited(self, key: str) -> int | None:
        """Take a token from ``key``'s bucket; return the wait (whole seconds) if there is none."""
        config = self.config
        if config.rate is None:
            return None
        now = config.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(tokens=float(config.burst), updated=now)
        elapsed = max(0.0, now - bucket.updated)
        bucket.tokens = min(float(config.burst), bucket.tokens + elapsed * config.rate)
        bucket.updated = now
        if bucket.tokens >= 1.0 - _EPSILON:
            bucket.tokens = max(0.0, bucket.tokens - 1.0)
            return None
        return max(1, math.ceil((1.0 - bucket.tokens) / config.rate - _EPSILON))

    async def _admit(self, request: web.Request) -> str | web.Response:
        """Check the key (403) and take a token from its bucket (429): the key, or the answer."""
        config = self.config
        key = request.headers.get("Authorization")
        if key is None or key not in config.keys:
            hint = (
                " (send the raw key, without 'Bearer ')"
                if key and key.startswith("Bearer ")
                else ""
            )
            return _envelope(403, "invalid_api_key", f"missing or unknown API key{hint}")
        wait = self._rate_limited(key)
        if wait is not None:
            response = _envelope(
                429,
                "rate_limited",
                f"too many requests for this key; retry after {wait} s",
                {"retry_after": wait},
            )
            response.headers["Retry-After"] = str(wait)
            return response
        return key

    async def _put(self, request: web.Request) -> web.StreamResponse:
        key = await self._admit(request)
        if not isinstance(key, str):
            return key
        aoi_id = request.match_info["aoi_id"]
        insight_id = request.match_info["insight_id"]
        self._api_requests += 1
        ctx = ApiContext(
            request, key, aoi_id, insight_id, self._api_requests, body=await request.read()
        )
        injected = self.faults.api_response(ctx)
        if isinstance(injected, ScriptedResponse):
            return await send_scripted(request, injected, now=self.config.clock())
        if injected is not None:
            return injected

        parsed = self._parse_body(await request.read())
        if isinstance(parsed, web.Response):
            return parsed
        inputs, outputs = parsed

        insight = self.catalog.insight(aoi_id, insight_id)
        if insight is None or self.faults.denies(key, aoi_id, insight_id):
            return _envelope(
                403,
                "permission_denied",
                f"no permission for AOI {aoi_id!r} insight {insight_id!r}",
                {"aoi_id": aoi_id, "insight_id": insight_id},
            )
        unknown_inputs = [a for a in inputs if a not in insight.inputs]
        unknown_outputs = [a for a in outputs if a not in insight.outputs]
        if unknown_inputs or unknown_outputs:
            return _envelope(
                400,
                "unknown_asset",
                f"unknown asset ids for insight {insight_id!r}",
                {"inputs": unknown_inputs, "outputs": unknown_outputs},
            )
        return await self._progress(Selection(aoi_id, insight_id, inputs, outputs))

    @staticmethod
    def _parse_body(body: bytes) -> tuple[tuple[str, ...], tuple[str, ...]] | web.Response:
        if not body.strip():
            return _envelope(400, "missing_body", "request body is missing")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            return _envelope(400, "invalid_json", "request body is not valid JSON", str(exc))
        if not isinstance(data, dict):
            return _envelope(
                400,
                "invalid_body",
                "request body must be a JSON object",
                {"got": type(data).__name__},
            )
        fields: list[tuple[str, ...]] = []
        for name in ("inputs", "outputs"):
            if name not in data:
                return _envelope(
                    400,
                    "invalid_body",
                    f"{name!r} is missing",
                    {"field": name, "problem": "missing"},
                )
            value = data[name]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                return _envelope(
                    400,
                    "invalid_body",
                    f"{name!r} must be an array of strings",
                    {"field": name, "problem": "not an array of strings"},
                )
            if len(set(value)) != len(value):
                duplicates = sorted({v for v in value if value.count(v) > 1})
                return _envelope(
                    400,
                    "invalid_body",
                    f"{name!r} lists an asset id more than once",
                    {"field": name, "problem": "duplicates", "duplicates": duplicates},
                )
            fields.append(tuple(value))
        inputs, outputs = fields
        if not inputs and not outputs:
            return _envelope(400, "empty_selection", "'inputs' and 'outputs' are both empty")
        return inputs, outputs

    def _status_words(self) -> tuple[str, str, str, str]:
        """(first pending, later pending, ready, failed) in the configured vocabulary."""
        if self.config.vocabulary == "pending/ready":
            return "pending", "pending", "ready", "failed"
        return "CREATED", "IN_PROGRESS", "SUCCESS", "FAILED"

    async def _progress(self, selection: Selection) -> web.StreamResponse:
        config = self.config
        now = config.clock()
        state = self._packages.get(selection)
        if state is None:
            state = self._packages[selection] = _PackageState(first_put=now)
            if not self.faults.fails(selection):
                self._start_build(selection)  # prepare while the client polls; ready awaits it
        state.puts += 1
        first, later, ready, failed = self._status_words()
        if state.ready_at is None and (
            state.puts >= config.ready_after_puts
            and now - state.first_put >= config.prepare_seconds - _EPSILON
        ):
            state.ready_at = now
        signed_url = ""
        if state.ready_at is None:
            status = first if state.puts == 1 else later
        elif self.faults.fails(selection):
            status = failed
        elif self.faults.withholds_url(selection):
            status = ready  # ready, but signed_url stays ""
        else:
            await self._ensure_built(selection)
            package_id = selection.package_id
            self._by_id[package_id] = selection
            signed_url = self._signer.sign(
                self.storage_url,
                f"/packages/{package_id}.zip",
                now=config.clock(),
                lifetime=self.faults.url_lifetime(selection, config.url_lifetime),
            )
            status = ready
        return web.json_response(
            {"id": selection.insight_id, "status": status, "signed_url": signed_url}
        )

    # -- storage origin ------------------------------------------------------------------------

    def _storage_app(self) -> web.Application:
        app = web.Application(middlewares=[self._recorder("storage")])
        app.router.add_get("/packages/{package_id}.zip", self._get, allow_head=False)
        app.router.add_route("HEAD", "/packages/{package_id}.zip", self._head)
        app.on_response_prepare.append(self._on_prepare)
        return app

    async def _head(self, request: web.Request) -> web.StreamResponse:
        return _xml_error(403, "AccessDenied", "Access Denied")

    async def _get(self, request: web.Request) -> web.StreamResponse:
        now = self.config.clock()
        raw_path, _, raw_query = request.raw_path.partition("?")
        if "Authorization" in request.headers:  # as S3 does for a presigned URL plus a header
            return _xml_error(
                400,
                "InvalidArgument",
                "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter, "
                "Signature query string parameter or the Authorization header should be specified",
                ArgumentName="Authorization",
            )
        check = self._signer.verify(raw_path, raw_query, now=now)
        if check.verdict is Verdict.BAD_SIGNATURE:
            return _xml_error(
                403,
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the signature you provided. "
                "Check your key and signing method.",
            )
        if check.verdict is Verdict.EXPIRED:
            assert check.expires_at is not None
            return _xml_error(
                403,
                "AccessDenied",
                "Request has expired",
                Expires=email.utils.formatdate(check.expires_at, usegmt=True),
                ServerTime=email.utils.formatdate(now, usegmt=True),
            )
        package_id = request.match_info["package_id"]
        selection = self._by_id.get(package_id)
        if selection is None:
            return _xml_error(404, "NoSuchKey", "The specified key does not exist.")
        attempt = self._storage_gets.get(package_id, 0) + 1
        self._storage_gets[package_id] = attempt
        ctx = StorageContext(request, package_id, selection, attempt)
        injected = self.faults.storage_response(ctx)
        if isinstance(injected, ScriptedResponse):
            return await send_scripted(request, injected, now=self.config.clock())
        if injected is not None:
            return injected
        plan = self.faults.storage_plan(ctx)
        built = await self._ensure_built(selection)
        state = self._packages.get(selection)
        last_modified = _http_date(state.ready_at if state and state.ready_at else now)
        return await self._send_package(request, built, last_modified, plan)

    async def _send_package(
        self, request: web.Request, built: BuiltPackage, last_modified: str, plan: StoragePlan
    ) -> web.StreamResponse:
        """Answer 200/206/416 with the package bytes, departing from HTTP as ``plan`` says."""
        etag = built.etag if plan.etag is None else plan.etag
        headers = {
            "Content-Type": "application/zip",
            "Accept-Ranges": "bytes",
            "Last-Modified": last_modified,
        }
        if etag:
            headers["ETag"] = etag
        headers.update(plan.headers)
        total = built.size
        first, last = 0, total - 1
        status = 200
        range_header = None if plan.ignore_range else request.headers.get("Range")
        if_range = request.headers.get("If-Range")
        if range_header is not None and (
            if_range is None or if_range in (built.etag, last_modified, etag or built.etag)
        ):
            try:
                wanted = _byte_range(range_header, total)
            except _Unsatisfiable:
                refused = _xml_error(416, "InvalidRange", "The requested range is not satisfiable")
                refused.headers["Content-Range"] = f"bytes */{total}"
                refused.headers["ETag"] = built.etag
                refused.headers["Accept-Ranges"] = "bytes"
                return refused
            if wanted is not None:
                first, last = wanted
                status = 206
        if plan.range_start is not None:
            first, last, status = min(plan.range_start, max(0, total - 1)), total - 1, 206
        if status == 206:
            headers["Content-Range"] = f"bytes {first}-{last}/{total + plan.range_total_delta}"

        response = web.StreamResponse(status=status, headers=headers)
        count = last - first + 1
        announced = max(0, count + plan.length_delta)
        to_send = count
        if plan.chunked:
            response.enable_chunked_encoding()
        else:
            response.content_length = announced
            to_send = min(count, announced)
        cut_after = plan.cut_after_bytes
        if cut_after is None and plan.cut_fraction is not None:
            cut_after = int(to_send * plan.cut_fraction)
        cut = cut_after is not None and cut_after < to_send
        if cut and cut_after is not None:
            to_send = max(0, cut_after)
        try:
            await response.prepare(request)
            flip_at = plan.flip_byte_at
            if flip_at is not None and flip_at < 0:
                flip_at = to_send // 2
            await self._stream(
                request,
                response,
                built,
                first,
                to_send,
                flip_at=flip_at,
                rate=self.config.storage_rate,
            )
        except ConnectionError:
            return response  # the client went away; nothing more to send
        if plan.chunked:
            return response  # aiohttp ends the chunked body cleanly, however short it is
        if cut or announced > to_send:
            await end_connection(request, plan.ending, plan.stall_seconds)
        return response

    @staticmethod
    async def _stream(
        request: web.Request,
        response: web.StreamResponse,
        built: BuiltPackage,
        offset: int,
        count: int,
        *,
        flip_at: int | None = None,
        rate: float | None = None,
    ) -> None:
        """Send ``count`` bytes of the package file from ``offset``, 1 MiB at a time.

        ``flip_at``: index (among the bytes sent) of a byte sent with its lowest bit flipped.
        ``rate``: at most this many bytes/s (real time), in pieces of a twentieth of a second.
        The bytes handed to the connection so far are kept in the request (``bytes_sent``).
        """
        loop = asyncio.get_running_loop()
        piece_size = CHUNK_SIZE if rate is None else max(1, min(CHUNK_SIZE, int(rate / 20)))
        handle: BinaryIO = await asyncio.to_thread(built.path.open, "rb")
        try:
            await asyncio.to_thread(handle.seek, offset)
            sent = 0
            started = loop.time()
            while sent < count:
                piece = await asyncio.to_thread(handle.read, min(piece_size, count - sent))
                if not piece:
                    raise ConnectionResetError("package file shrank while streaming")
                if flip_at is not None and sent <= flip_at < sent + len(piece):
                    spoiled = bytearray(piece)
                    spoiled[flip_at - sent] ^= 0x01
                    piece = bytes(spoiled)
                if rate is not None:
                    await asyncio.sleep(max(0.0, started + sent / rate - loop.time()))
                request[_SENT] = sent + len(piece)  # handed over, whatever the peer does next
                await response.write(piece)
                sent += len(piece)
        finally:
            await asyncio.to_thread(handle.close)
