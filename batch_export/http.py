"""The one HTTP seam: sessions, proxies, TLS trust and the table of network errors.

Every request batch-export sends goes through an :class:`HttpSession` made by :func:`open_sessions`:
one for the API (bounded connections, ``Authorization`` added per request by the API client) and
one for storage (no default headers, no decompression: the bytes on disk are the bytes served).

Proxies (:class:`ProxyRules`) are chosen per request from the standard variables, each host judged
on its own; ``~/.netrc`` is never read (aiohttp's ``trust_env`` would read it and add an
``Authorization: Basic`` header to presigned GETs, so it stays off and ``proxy=`` is passed per
request). With a proxy, https goes through ``CONNECT``: the API key travels only inside the TLS
tunnel to the API host.

TLS trust (:func:`tls_context`): the system trust store (PyPI ``truststore``: the OS verifier on
macOS/Windows, OpenSSL's default paths on Linux); ``SSL_CERT_FILE`` / ``SSL_CERT_DIR``, when set,
replace it (as for OpenSSL, curl and requests).

Errors (:func:`describe_failure`): one table turns every aiohttp/OS/ssl exception into a
:class:`NetworkFault` (a stable ``code``, a one-line message naming ``host:port`` and never the
query string, and whether a retry can help). The API client and the downloader raise their own
errors from it; nothing above this module sees an aiohttp or ``OSError`` type for a network failure.

The seam for tests: the runner opens its sessions through a :class:`SessionFactory` (default
:func:`open_sessions`); a fake one hands it :class:`HttpSession` subclasses whose ``request``
answers from a script, so decisions and counts are tested without sockets (``tests/transport.py``).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import ssl
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
import truststore
from aiohttp.abc import AbstractResolver
from yarl import URL

from batch_export import __version__
from batch_export.errors import UsageError
from batch_export.redact import REDACTED, Redactor
from batch_export.urls import is_loopback_host

if TYPE_CHECKING:
    from aiohttp.client import _RequestContextManager

__all__ = [
    "CA_HINT",
    "PROXY_HINT",
    "HttpSession",
    "NetworkFault",
    "Proxy",
    "ProxyRules",
    "SessionFactory",
    "Sessions",
    "check_environment",
    "describe_failure",
    "open_sessions",
    "tls_context",
]

#: What a TLS failure suggests (SPEC §9: name the variables that set a custom CA bundle).
CA_HINT = (
    "if the host uses a private CA, point SSL_CERT_FILE at its PEM bundle "
    "(or SSL_CERT_DIR at a hashed certificate directory)"
)
#: What a DNS failure suggests (SPEC §9: hint at the proxy variables).
PROXY_HINT = (
    "if this machine reaches the internet through a proxy, set HTTPS_PROXY "
    "(and NO_PROXY for hosts to reach directly)"
)
_DEFAULT_PORTS = {"http": 80, "https": 443}


# --------------------------------------------------------------------------- proxies (pure)


@dataclass(frozen=True, slots=True)
class Proxy:
    """A proxy to send one request through.

    Attributes:
        url: the proxy URL, credentials included (aiohttp sends them as ``Proxy-Authorization``).
        source: the variable it came from, e.g. ``"HTTPS_PROXY"`` or ``"https_proxy"``.
    """

    url: URL
    source: str

    @property
    def shown(self) -> str:
        """The proxy URL as it may be shown: ``http://<redacted>@host:port`` when it has a user."""
        base = f"{self.url.scheme}://{self.url.raw_host}:{self.url.port}"
        if self.url.raw_user is None:
            return base
        return f"{self.url.scheme}://{REDACTED}@{self.url.raw_host}:{self.url.port}"

    @property
    def address(self) -> str:
        """``host:port`` of the proxy."""
        return f"{self.url.raw_host}:{self.url.port}"


@dataclass(frozen=True, slots=True)
class _Exemption:
    """One ``NO_PROXY`` entry: everything, a domain (and its subdomains), an address or a network."""

    domain: str | None = None
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    port: int | None = None
    everything: bool = False

    def covers(self, host: str, port: int) -> bool:
        if self.everything:
            return True
        if self.port is not None and self.port != port:
            return False
        if self.network is not None:
            try:
                return ipaddress.ip_address(host) in self.network
            except ValueError:
                return False
        assert self.domain is not None
        return host == self.domain or host.endswith("." + self.domain)


def _parse_exemption(entry: str) -> _Exemption | None:
    """Parse one ``NO_PROXY`` entry; return None for an empty one.

    Forms: ``*`` (everything), ``example.com`` / ``.example.com`` / ``*.example.com`` (the domain
    and its subdomains), any of these with ``:port``, ``10.0.0.1``, ``10.0.0.0/8``, ``::1``,
    ``[::1]:8080``, ``fd00::/8``.
    """
    entry = entry.strip().lower()
    if not entry:
        return None
    if entry == "*":
        return _Exemption(everything=True)
    port: int | None = None
    host = entry
    if entry.startswith("["):  # [v6] or [v6]:port
        host, _, rest = entry[1:].partition("]")
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
    elif entry.count(":") == 1:  # host:port or v4:port (a bare v6 address has several colons)
        name, _, number = entry.partition(":")
        if number.isdigit():
            host, port = name, int(number)
    try:
        return _Exemption(network=ipaddress.ip_network(host, strict=False), port=port)
    except ValueError:
        pass
    domain = host.removeprefix("*").lstrip(".").rstrip(".")
    return _Exemption(domain=domain, port=port) if domain else None


class ProxyRules:
    """Which proxy (if any) a request to a URL goes through: the standard variables, per host.

    ``https://`` URLs use ``https_proxy`` / ``HTTPS_PROXY``, ``http://`` URLs ``http_proxy`` /
    ``HTTP_PROXY``; either falls back to ``all_proxy`` / ``ALL_PROXY``. The lower-case form wins
    when both are set (as in curl and Python's ``urllib``); upper-case ``HTTP_PROXY`` is ignored
    when ``REQUEST_METHOD`` is set (CGI, "httpoxy"). A value without a scheme means ``http://``.
    ``no_proxy`` / ``NO_PROXY`` is a comma-separated list of exemptions (see
    :func:`_parse_exemption`); loopback hosts and ``localhost`` are never proxied.

    Raises (from :meth:`from_env`):
        UsageError: a proxy variable holds something other than an ``http://`` or ``https://`` URL
            with a host.
    """

    def __init__(
        self, proxies: Mapping[str, Proxy], exemptions: tuple[_Exemption, ...] = ()
    ) -> None:
        self._proxies = dict(proxies)
        self._exemptions = exemptions

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ProxyRules:
        """Read the proxy variables from ``environ`` (default: this process's environment)."""
        env = os.environ if environ is None else environ
        proxies: dict[str, Proxy] = {}
        fallback = _proxy_var(env, "all_proxy")
        for scheme in ("https", "http"):
            chosen = _proxy_var(env, f"{scheme}_proxy", cgi=scheme == "http") or fallback
            if chosen is not None:
                proxies[scheme] = chosen
        raw = env.get("no_proxy") or env.get("NO_PROXY") or ""
        parsed = (_parse_exemption(item) for item in raw.replace(" ", ",").split(","))
        return cls(proxies, tuple(item for item in parsed if item is not None))

    def proxy_for(self, url: URL | str) -> Proxy | None:
        """Return the proxy for a request to ``url``, or None to connect directly."""
        url = URL(url) if isinstance(url, str) else url
        proxy = self._proxies.get(url.scheme)
        host = (url.raw_host or "").strip("[]").lower().rstrip(".")
        if proxy is None or not host or is_loopback_host(host):
            return None
        port = url.port or _DEFAULT_PORTS.get(url.scheme, 0)
        if any(exemption.covers(host, port) for exemption in self._exemptions):
            return None
        return proxy

    @property
    def secrets(self) -> tuple[str, ...]:
        """Proxy passwords and ``user:password`` pairs (percent-encoded and decoded), to redact."""
        found: set[str] = set()
        for proxy in self._proxies.values():
            url = proxy.url
            for user, password in ((url.raw_user, url.raw_password), (url.user, url.password)):
                if password:
                    found.update((password, f"{user or ''}:{password}"))
        return tuple(sorted(found))


def _proxy_var(env: Mapping[str, str], name: str, *, cgi: bool = False) -> Proxy | None:
    """Return the proxy named by ``name`` (lower case first, then upper case), or None."""
    candidates = [name]
    if not (cgi and "REQUEST_METHOD" in env):
        candidates.append(name.upper())
    for var in candidates:
        value = env.get(var, "").strip()
        if value:
            return Proxy(url=_proxy_url(value, var), source=var)
    return None


def _proxy_url(value: str, var: str) -> URL:
    if any(char.isspace() or ord(char) < 0x20 or ord(char) == 0x7F for char in value):
        raise UsageError(f"{var} is not a valid proxy URL (white space or control characters)")
    if "://" not in value:
        value = "http://" + value
    try:
        url = URL(value)
        url.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise UsageError(f"{var} is not a valid proxy URL") from None
    if url.scheme not in ("http", "https") or not url.raw_host:
        shown = url.scheme or "?"
        raise UsageError(f"{var}: only http:// and https:// proxies are supported (got {shown}://)")
    return url


# --------------------------------------------------------------------------- TLS


def tls_context(environ: Mapping[str, str] | None = None) -> ssl.SSLContext:
    """Return the client TLS context: ``SSL_CERT_FILE``/``SSL_CERT_DIR`` if set, else the system store.

    Raises:
        UsageError: ``SSL_CERT_FILE`` names no readable PEM bundle, or ``SSL_CERT_DIR`` no directory.
    """
    env = os.environ if environ is None else environ
    cafile = env.get("SSL_CERT_FILE") or None
    capath = env.get("SSL_CERT_DIR") or None
    if cafile is None and capath is None:
        return truststore.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if capath is not None and not all(os.path.isdir(p) for p in capath.split(os.pathsep) if p):
        raise UsageError(f"SSL_CERT_DIR={capath}: not a directory")
    try:
        return ssl.create_default_context(cafile=cafile, capath=capath)
    except (OSError, ssl.SSLError) as exc:
        reason = "not a PEM bundle" if isinstance(exc, ssl.SSLError) else exc.strerror
        raise UsageError(f"SSL_CERT_FILE={cafile}: cannot load the CA bundle ({reason})") from None


def check_environment(
    environ: Mapping[str, str] | None = None,
    *,
    redactor: Redactor | None = None,
    api_url: str | None = None,
) -> None:
    """Check the proxy and CA variables before a run starts (so a bad one is one line, exit 2).

    Args:
        environ: where the variables are read (default: ``os.environ``).
        redactor: learns the proxy passwords at once, before anything is logged.
        api_url: the run's API base URL: a plain-http one that a proxy would carry is refused
            here once, rather than as ``proxy_plain_http`` in every job.

    Raises:
        UsageError: as :meth:`ProxyRules.from_env` and :func:`tls_context` do, or the key would
            reach a proxy in clear.
    """
    proxies = ProxyRules.from_env(environ)
    if redactor is not None:
        for secret in proxies.secrets:
            redactor.add(secret)
    proxy = proxies.proxy_for(api_url) if api_url is not None else None
    if proxy is not None and api_url is not None and URL(api_url).scheme == "http":
        raise UsageError(
            f"proxy_plain_http: the API URL is plain http and {proxy.source} sends it through the "
            f"proxy {proxy.address}: the key would reach the proxy in clear; use https, or list "
            "the API host in NO_PROXY"
        )
    tls_context(environ)


# --------------------------------------------------------------------------- sessions


class HttpSession:
    """An aiohttp session whose every request goes through the proxy its URL's host calls for.

    Args:
        session: the underlying ``aiohttp.ClientSession`` (``trust_env`` off: no ``~/.netrc``).
        proxies: the proxy rules.
    """

    def __init__(self, session: aiohttp.ClientSession, proxies: ProxyRules) -> None:
        self._session = session
        self.proxies = proxies

    def request(self, method: str, url: URL, **kwargs: Any) -> _RequestContextManager:
        """``session.request(method, url, proxy=…, **kwargs)``: an awaitable / async context manager."""
        proxy = self.proxies.proxy_for(url)
        return self._session.request(
            method, url, proxy=proxy.url if proxy is not None else None, **kwargs
        )

    def get(self, url: URL, **kwargs: Any) -> _RequestContextManager:
        """GET ``url`` (see :meth:`request`)."""
        return self.request("GET", url, **kwargs)

    def put(self, url: URL, **kwargs: Any) -> _RequestContextManager:
        """PUT ``url`` (see :meth:`request`)."""
        return self.request("PUT", url, **kwargs)


@dataclass(frozen=True, slots=True)
class Sessions:
    """The run's two sessions (see the module docstring)."""

    api: HttpSession
    storage: HttpSession


class SessionFactory(Protocol):
    """What opens a run's sessions: :func:`open_sessions`, or a fake transport in tests."""

    def __call__(
        self, *, api_connections: int, storage_connections: int, redactor: Redactor | None = None
    ) -> AbstractAsyncContextManager[Sessions]:
        """Open the sessions (see :func:`open_sessions`)."""
        ...


#: Bytes a storage response buffers before aiohttp pauses the socket (it pauses at twice this:
#: 256 KiB, one full socket read of asyncio's). aiohttp's default (64 KiB) can pause and resume
#: reading after every 256 KiB read, an ``epoll_ctl`` pair and a wake-up each (profiled at 16
#: streams: 5.9 reads/MiB and 0.36 CPU s/GiB at 64 KiB, 4.0 and 0.26 at 256 KiB); 128 KiB keeps
#: most of that gain at half the memory per connection (RSS at 16 connections ~5 MiB lower).
_STORAGE_READ_BUFSIZE = 128 * 1024


@asynccontextmanager
async def open_sessions(
    *,
    api_connections: int,
    storage_connections: int,
    redactor: Redactor | None = None,
    environ: Mapping[str, str] | None = None,
    resolver: AbstractResolver | None = None,
) -> AsyncIterator[Sessions]:
    """Open the API and storage sessions for one run; close both on exit.

    Args:
        api_connections: most simultaneous connections to API hosts.
        storage_connections: most simultaneous connections to storage hosts.
        redactor: learns the proxy passwords, so that no sink shows them.
        environ: where the proxy and CA variables are read (default: ``os.environ``).
        resolver: a DNS resolver (tests map made-up names to loopback; default: aiohttp's).

    Raises:
        UsageError: a proxy or CA variable is unusable (see :class:`ProxyRules`, :func:`tls_context`).
    """
    proxies = ProxyRules.from_env(environ)
    if redactor is not None:
        for secret in proxies.secrets:
            redactor.add(secret)
    context = tls_context(environ)
    headers = {"User-Agent": f"batch-export/{__version__}"}

    def session(limit: int, **kwargs: Any) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=max(1, limit), ssl=context, resolver=resolver)
        return aiohttp.ClientSession(
            connector=connector,
            headers=headers,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,  # never ~/.netrc; proxies are chosen per request instead
            **kwargs,
        )

    async with (
        session(api_connections) as api,
        session(
            storage_connections, auto_decompress=False, read_bufsize=_STORAGE_READ_BUFSIZE
        ) as storage,
    ):
        yield Sessions(api=HttpSession(api, proxies), storage=HttpSession(storage, proxies))


# --------------------------------------------------------------------------- the error table


@dataclass(frozen=True, slots=True)
class NetworkFault:
    """What a failed exchange means.

    Attributes:
        code: stable error code for reports (``network_error``, ``dns_error``, ``timeout``, …).
        message: one line naming ``host:port`` (and the proxy when one was used), no query string.
        retryable: whether another try can help (False for TLS and proxy-credential failures).
    """

    code: str
    message: str
    retryable: bool


_CONNECT_TIMEOUT: tuple[type[BaseException], ...] = tuple(
    getattr(aiohttp, name) for name in ("ConnectionTimeoutError",) if hasattr(aiohttp, name)
)  # aiohttp >= 3.10
_DNS_ERROR: tuple[type[BaseException], ...] = tuple(
    getattr(aiohttp, name) for name in ("ClientConnectorDNSError",) if hasattr(aiohttp, name)
)  # aiohttp >= 3.11; before, a ClientConnectorError around a socket.gaierror
_ERRNO_TEXT = {
    errno.ECONNREFUSED: "connection refused",
    errno.ECONNRESET: "connection reset by peer",
    errno.ECONNABORTED: "connection aborted",
    errno.EPIPE: "connection closed while sending",
    errno.ENETUNREACH: "network unreachable",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETDOWN: "network down",
    errno.ETIMEDOUT: "connection timed out",
    errno.EADDRNOTAVAIL: "no local address available",
    errno.EMFILE: "too many open files in this process",
    errno.ENFILE: "too many open files on this machine",
}


def describe_failure(
    exc: BaseException,
    *,
    url: URL | str,
    origin: str,
    proxy: Proxy | None = None,
    timeout: str = "timed out waiting for data",
) -> NetworkFault:
    """Translate an aiohttp/OS/ssl exception into a :class:`NetworkFault` (the one table).

    Args:
        exc: what the request raised.
        url: the URL it was for (only its host and port are named).
        origin: who we were talking to, e.g. ``"the API"`` or ``"storage"``.
        proxy: the proxy the request went through, if any.
        timeout: how to describe a timeout (a stall between bytes, or the whole request's bound).

    Rows, most specific first: certificate / other TLS failures -> ``tls_error`` (not retryable);
    proxy answered CONNECT with an error -> ``proxy_error`` (407/403 not retryable); proxy
    unreachable -> ``proxy_error``; DNS -> ``dns_error`` (with :data:`PROXY_HINT`); timeouts ->
    ``timeout``; a body cut short -> ``truncated``; out of file descriptors ->
    ``too_many_open_files``; any other connection failure -> ``network_error`` (errno named, not
    numbered).
    """
    target = URL(url) if isinstance(url, str) else url
    where = _address(target)
    via = f" via proxy {proxy.address} ({proxy.source})" if proxy is not None else ""
    lead = f"{origin} at {where}{via}"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        cert = exc.certificate_error
        reason = (
            getattr(cert, "verify_message", None) or getattr(cert, "reason", None) or "rejected"
        )
        return NetworkFault(
            "tls_error", f"TLS certificate of {where} not trusted ({reason}); {CA_HINT}", False
        )
    if isinstance(exc, aiohttp.ClientSSLError | ssl.SSLError):
        inner = getattr(exc, "os_error", exc)
        reason = str(getattr(inner, "reason", None) or type(inner).__name__)
        hint = CA_HINT
        if "WRONG_VERSION_NUMBER" in reason or "RECORD_LAYER" in reason:
            hint = "is it a plain http:// server?"
        return NetworkFault(
            "tls_error", f"TLS handshake with {where} failed ({reason.lower()}); {hint}", False
        )
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        return _proxy_refusal(exc.status, where, proxy)
    if isinstance(exc, aiohttp.ClientProxyConnectionError):
        shown = proxy.address if proxy else f"{exc.host}:{exc.port}"
        source = f" ({proxy.source})" if proxy else ""
        return NetworkFault(
            "proxy_error",
            f"cannot connect to the proxy {shown}{source} for {origin} at {where}: "
            f"{_os_text(exc.os_error)}; check the proxy variables",
            True,
        )
    if _is_dns_failure(exc):
        return NetworkFault(
            "dns_error", f"cannot resolve the host of {origin} at {where}; {PROXY_HINT}", True
        )
    if isinstance(exc, _CONNECT_TIMEOUT):
        return NetworkFault("timeout", f"{lead}: timed out connecting", True)
    if isinstance(exc, TimeoutError):
        return NetworkFault("timeout", f"{lead}: {timeout}", True)
    if isinstance(exc, aiohttp.ClientPayloadError):
        return NetworkFault("truncated", f"{lead}: connection broke mid-body", True)
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return NetworkFault("network_error", f"{lead}: server closed the connection", True)
    os_error = exc.os_error if isinstance(exc, aiohttp.ClientConnectorError) else exc
    if isinstance(os_error, OSError) and os_error.errno in (errno.EMFILE, errno.ENFILE):
        return NetworkFault("too_many_open_files", f"{lead}: {_os_text(os_error)}", True)
    return NetworkFault("network_error", f"{lead}: {_os_text(os_error)}", True)


def _proxy_refusal(status: int, where: str, proxy: Proxy | None) -> NetworkFault:
    shown = f"proxy {proxy.address} ({proxy.source})" if proxy else "the proxy"
    if status == 407:
        return NetworkFault(
            "proxy_error",
            f"{shown} wants credentials for {where} (407): put the user and password in the "
            "proxy URL, before its host",
            False,
        )
    if status == 403:
        return NetworkFault(
            "proxy_error", f"{shown} refused to connect to {where} (403): ask its operator", False
        )
    return NetworkFault("proxy_error", f"{shown} could not reach {where} (HTTP {status})", True)


def _is_dns_failure(exc: BaseException) -> bool:
    if isinstance(exc, _DNS_ERROR):
        return True
    if isinstance(exc, aiohttp.ClientConnectorError):
        return isinstance(exc.os_error, socket.gaierror)
    return isinstance(exc, socket.gaierror)


def _os_text(exc: BaseException) -> str:
    """Name an OS error by its meaning (``connection refused``), never its library message."""
    number = getattr(exc, "errno", None)
    if isinstance(number, int) and number in _ERRNO_TEXT:
        return _ERRNO_TEXT[number]
    if isinstance(number, int) and number in errno.errorcode:
        return f"{errno.errorcode[number]} ({os.strerror(number).lower()})"
    return type(exc).__name__


def _address(url: URL) -> str:
    host = url.raw_host or "?"
    if ":" in host:
        host = f"[{host}]"
    port = url.port or _DEFAULT_PORTS.get(url.scheme)
    return f"{host}:{port}" if port else host
