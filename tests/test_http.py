"""The HTTP seam: proxy choice per host, TLS trust, and the one table of network errors.

The error table is exercised on real loopback sockets (a closed port, a TLS origin with an
untrusted CA, https to a plain-http server, a resolver that fails), never by building aiohttp's
exceptions by hand.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from batch_export.errors import UsageError
from batch_export.http import (
    CA_HINT,
    PROXY_HINT,
    NetworkFault,
    ProxyRules,
    describe_failure,
    open_sessions,
    tls_context,
)
from batch_export.redact import Redactor

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --------------------------------------------------------------------------- proxy rules


def chosen(env: dict[str, str], url: str) -> str | None:
    proxy = ProxyRules.from_env(env).proxy_for(url)
    return None if proxy is None else f"{proxy.source} {proxy.url}"


def test_scheme_picks_its_variable_and_lower_case_wins() -> None:
    env = {
        "HTTPS_PROXY": "http://upper:3128",
        "https_proxy": "http://lower:3128",
        "HTTP_PROXY": "http://plain:8080",
    }
    assert chosen(env, "https://api.pixxel.space/v0") == "https_proxy http://lower:3128"
    assert chosen(env, "http://storage.example.com/x") == "HTTP_PROXY http://plain:8080"


def test_all_proxy_is_the_fallback_and_a_bare_host_means_http() -> None:
    env = {"ALL_PROXY": "proxy.corp:3128", "http_proxy": "http://web:8080"}
    assert chosen(env, "https://api.pixxel.space") == "ALL_PROXY http://proxy.corp:3128"
    assert chosen(env, "http://h.example.com") == "http_proxy http://web:8080"
    assert chosen({}, "https://api.pixxel.space") is None
    assert chosen({"HTTPS_PROXY": "  "}, "https://api.pixxel.space") is None


def test_cgi_ignores_upper_case_http_proxy() -> None:
    env = {"HTTP_PROXY": "http://attacker:1", "REQUEST_METHOD": "GET"}
    assert chosen(env, "http://h.example.com") is None
    assert chosen(env | {"http_proxy": "http://ok:1"}, "http://h.example.com") == (
        "http_proxy http://ok:1"
    )


@pytest.mark.parametrize(
    ("no_proxy", "url", "proxied"),
    [
        ("example.com", "https://example.com/x", False),
        ("example.com", "https://a.b.example.com/x", False),
        ("example.com", "https://notexample.com/x", True),
        (".example.com", "https://example.com/x", False),
        ("*.example.com", "https://s3.example.com/x", False),
        ("EXAMPLE.com.", "https://Example.COM./x", False),
        ("example.com:8443", "https://example.com:8443/x", False),
        ("example.com:8443", "https://example.com/x", True),
        ("example.com:443", "https://example.com/x", False),
        ("10.1.2.3", "https://10.1.2.3/x", False),
        ("10.0.0.0/8", "https://10.200.0.9:9000/x", False),
        ("10.0.0.0/8", "https://11.0.0.1/x", True),
        ("10.0.0.0/8", "https://ten.example.com/x", True),
        ("fd00::/8", "https://[fd12::1]:9000/x", False),
        ("[fd12::1]:9000", "https://[fd12::1]:9000/x", False),
        ("[fd12::1]:9000", "https://[fd12::1]:9001/x", True),
        ("*", "https://anything.example.org/x", False),
        ("a.com, b.com  c.com", "https://c.com/x", False),
        (",,", "https://c.com/x", True),
    ],
)
def test_no_proxy_forms(no_proxy: str, url: str, proxied: bool) -> None:
    for name in ("NO_PROXY", "no_proxy"):
        env = {"HTTPS_PROXY": "http://proxy:3128", name: no_proxy}
        assert (chosen(env, url) is not None) is proxied, (name, no_proxy, url)


@pytest.mark.parametrize(
    "url",
    ["https://localhost:8443/x", "https://127.0.0.1/x", "https://127.8.0.1/", "https://[::1]/"],
)
def test_loopback_is_never_proxied(url: str) -> None:
    assert chosen({"HTTPS_PROXY": "http://proxy:3128", "ALL_PROXY": "http://p:1"}, url) is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("socks5://proxy:1080", "HTTPS_PROXY: only http:// and https:// proxies are supported"),
        ("http://proxy:notaport", "HTTPS_PROXY is not a valid proxy URL"),
        ("http://", "HTTPS_PROXY: only http:// and https:// proxies are supported"),
    ],
)
def test_unusable_proxy_is_a_usage_error(value: str, message: str) -> None:
    with pytest.raises(UsageError) as info:
        ProxyRules.from_env({"HTTPS_PROXY": value})
    assert str(info.value).startswith(message)


def test_proxy_credentials_are_secrets_and_never_shown() -> None:
    rules = ProxyRules.from_env({"HTTPS_PROXY": "http://bob:p%40ss@proxy.corp:3128"})
    assert set(rules.secrets) == {"p%40ss", "bob:p%40ss", "p@ss", "bob:p@ss"}
    proxy = rules.proxy_for("https://api.pixxel.space")
    assert proxy is not None
    assert proxy.shown == "http://<redacted>@proxy.corp:3128"
    assert proxy.address == "proxy.corp:3128"


async def test_open_sessions_teaches_the_redactor_the_proxy_password() -> None:
    redactor = Redactor(["the-key-123456"])
    env = {"HTTPS_PROXY": "http://bob:hunter2hunter2@proxy.corp:3128"}
    async with open_sessions(
        api_connections=2, storage_connections=2, redactor=redactor, environ=env
    ) as sessions:
        assert sessions.api.proxies.proxy_for("https://api.pixxel.space") is not None
    text = "proxy said bob:hunter2hunter2 and hunter2hunter2 and the-key-123456"
    assert redactor(text) == "proxy said <redacted> and <redacted> and <redacted>"


# --------------------------------------------------------------------------- TLS trust


@pytest.fixture
def ca(tmp_path: Path) -> Iterator[tuple[trustme.CA, Path]]:
    authority = trustme.CA()
    pem = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(pem))
    yield authority, pem


def test_tls_context_uses_ssl_cert_file(ca: tuple[trustme.CA, Path]) -> None:
    _, pem = ca
    context = tls_context({"SSL_CERT_FILE": str(pem)})
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
    assert len(context.get_ca_certs()) == 1


def test_tls_context_without_variables_is_the_system_store() -> None:
    context = tls_context({})
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
    assert type(context).__module__.startswith("truststore")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"SSL_CERT_FILE": "/nonexistent/ca.pem"},
            "SSL_CERT_FILE=/nonexistent/ca.pem: cannot load",
        ),
        ({"SSL_CERT_DIR": "/nonexistent/dir"}, "SSL_CERT_DIR=/nonexistent/dir: not a directory"),
    ],
)
def test_bad_ca_variables_are_usage_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(UsageError) as info:
        tls_context(env)
    assert str(info.value).startswith(message)


def test_a_file_that_is_not_pem_is_a_usage_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(UsageError) as info:
        tls_context({"SSL_CERT_FILE": str(junk)})
    assert str(info.value) == f"SSL_CERT_FILE={junk}: cannot load the CA bundle (not a PEM bundle)"


# --------------------------------------------------------------------------- the error table


class FailingResolver(AbstractResolver):
    async def resolve(self, host: str, port: int = 0, family: Any = 0) -> list[ResolveResult]:
        raise OSError(socket.EAI_NONAME, "Name or service not known")

    async def close(self) -> None:
        return None


class LoopbackResolver(AbstractResolver):
    """Every name is 127.0.0.1 (made-up names for TLS tests, no DNS needed)."""

    async def resolve(self, host: str, port: int = 0, family: Any = 0) -> list[ResolveResult]:
        return [
            {
                "hostname": host,
                "host": "127.0.0.1",
                "port": port,
                "family": socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
        ]

    async def close(self) -> None:
        return None


async def fault_of(url: str, **session_args: Any) -> NetworkFault:
    async with open_sessions(api_connections=1, storage_connections=1, **session_args) as sessions:
        try:
            async with sessions.api.get(URL(url), timeout=aiohttp.ClientTimeout(total=10)):
                pass
        except (aiohttp.ClientError, OSError) as exc:
            return describe_failure(exc, url=url, origin="the API")
    raise AssertionError("the request did not fail")


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def ok(request: web.Request) -> web.Response:
    return web.Response(text="ok")


@pytest.fixture
async def tls_origin(ca: tuple[trustme.CA, Path]) -> AsyncIterator[int]:
    authority, _ = ca
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("api.example.test").configure_cert(server_context)
    app = web.Application()
    app.router.add_get("/", ok)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context)
    await site.start()
    yield int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
    await runner.cleanup()


@pytest.fixture
async def plain_origin() -> AsyncIterator[int]:
    app = web.Application()
    app.router.add_get("/", ok)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
    await runner.cleanup()


async def test_refused_names_host_and_port_never_the_query() -> None:
    port = closed_port()
    fault = await fault_of(f"http://127.0.0.1:{port}/v0/x?X-Amz-Signature=s3cret")
    assert fault == NetworkFault(
        "network_error", f"the API at 127.0.0.1:{port}: connection refused", True
    )


async def test_dns_failure_hints_at_the_proxy_variables() -> None:
    fault = await fault_of("https://api.pixxel.space/v0?k=1", resolver=FailingResolver())
    assert fault == NetworkFault(
        "dns_error",
        f"cannot resolve the host of the API at api.pixxel.space:443; {PROXY_HINT}",
        True,
    )
    assert "HTTPS_PROXY" in PROXY_HINT and "NO_PROXY" in PROXY_HINT


async def test_untrusted_certificate_names_host_and_ca_variables(tls_origin: int) -> None:
    fault = await fault_of(
        f"https://api.example.test:{tls_origin}/", resolver=LoopbackResolver(), environ={}
    )
    assert fault.code == "tls_error" and not fault.retryable
    assert fault.message.startswith(f"TLS certificate of api.example.test:{tls_origin} not trusted")
    assert fault.message.endswith(CA_HINT)
    assert "SSL_CERT_FILE" in CA_HINT and "SSL_CERT_DIR" in CA_HINT


async def test_private_ca_from_ssl_cert_file_is_trusted(
    tls_origin: int, ca: tuple[trustme.CA, Path]
) -> None:
    _, pem = ca
    env = {"SSL_CERT_FILE": str(pem)}
    async with (
        open_sessions(
            api_connections=1, storage_connections=1, environ=env, resolver=LoopbackResolver()
        ) as sessions,
        sessions.api.get(URL(f"https://api.example.test:{tls_origin}/")) as resp,
    ):
        assert resp.status == 200 and await resp.text() == "ok"


async def test_https_to_a_plain_http_server(plain_origin: int) -> None:
    fault = await fault_of(f"https://127.0.0.1:{plain_origin}/")
    assert fault.code == "tls_error" and not fault.retryable
    assert fault.message.startswith(f"TLS handshake with 127.0.0.1:{plain_origin} failed (")
    assert fault.message.endswith("is it a plain http:// server?")


async def test_unreachable_proxy_is_named_with_its_variable() -> None:
    port = closed_port()
    env = {"HTTPS_PROXY": f"http://bob:pw@proxy.example.test:{port}"}
    async with open_sessions(
        api_connections=1, storage_connections=1, environ=env, resolver=LoopbackResolver()
    ) as sessions:
        url = URL("https://api.pixxel.space/v0")
        proxy = sessions.api.proxies.proxy_for(url)
        with pytest.raises(aiohttp.ClientError) as info:
            async with sessions.api.get(url):
                pass
    fault = describe_failure(info.value, url=url, origin="the API", proxy=proxy)
    assert fault == NetworkFault(
        "proxy_error",
        f"cannot connect to the proxy proxy.example.test:{port} (HTTPS_PROXY) for the API at "
        "api.pixxel.space:443: connection refused; check the proxy variables",
        True,
    )


def test_out_of_descriptors_is_transient() -> None:
    import errno

    fault = describe_failure(
        OSError(errno.EMFILE, "Too many open files"),
        url="https://s.example.com/x",
        origin="storage",
    )
    assert fault == NetworkFault(
        "too_many_open_files",
        "storage at s.example.com:443: too many open files in this process",
        True,
    )


def test_other_errnos_are_named_not_numbered() -> None:
    import errno

    fault = describe_failure(
        OSError(errno.EPROTO, "x"), url="https://s.example.com:9000/x", origin="storage"
    )
    assert fault.message == "storage at s.example.com:9000: EPROTO (protocol error)"


async def test_unreachable_codes_cover_the_table_s_connection_rows() -> None:
    from batch_export.errors import UNREACHABLE_CODES

    refused = await fault_of(f"http://127.0.0.1:{closed_port()}/")
    unresolved = await fault_of("https://api.pixxel.space/", resolver=FailingResolver())
    timeout = describe_failure(TimeoutError(), url="https://a.example.com", origin="the API")
    proxy = describe_failure(
        aiohttp.ClientHttpProxyError(None, (), status=502),  # type: ignore[arg-type]
        url="https://a.example.com",
        origin="the API",
    )
    codes = {f.code for f in (refused, unresolved, timeout, proxy)}
    assert codes == {"network_error", "dns_error", "timeout", "proxy_error"} == UNREACHABLE_CODES
    descriptors = describe_failure(
        OSError(24, "Too many open files"), url="https://a.example.com", origin="the API"
    )
    assert descriptors.code not in UNREACHABLE_CODES  # the process's own trouble, not the host's
