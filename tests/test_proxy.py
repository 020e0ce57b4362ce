"""Through a real proxy: PyPI's ``proxy.py``, started by these tests on 127.0.0.1.

The origins are made-up names (``api.example.test``, ``storage.example.test``) that only the proxy
resolves (to 127.0.0.1, :mod:`tests.proxy_plugin`); the client never resolves them itself, so a
request that did not go through the proxy fails. The API origin speaks TLS with a certificate from a
test CA (PyPI ``trustme``) that the client trusts through ``SSL_CERT_FILE``. What the proxy parsed
(CONNECT lines, plain-http requests, their headers) is recorded and inspected: the API key never
reaches it outside the TLS tunnel, proxy credentials are sent only to it and never reach a log, a
report or the state store, and ``~/.netrc`` adds no ``Authorization`` anywhere.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import signal
import socket
import ssl
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web
from anyio.from_thread import start_blocking_portal
from yarl import URL

from batch_export.api import PixxelClient
from batch_export.clock import SystemClock
from batch_export.errors import ApiError
from batch_export.http import open_sessions
from batch_export.manifest import ExportSpec
from batch_export.ratelimit import RateLimiter
from tests.fakes import clean_env
from tests.test_http import LoopbackResolver

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-proxy-test-0123456789abcdef"
USER, PASSWORD = "alice", "pr0xy-pa55word-xyz"
NETRC_PASSWORD = "netrc-pa55word-qqq"
SIGNATURE = "sig-0f1e2d3c4b5a69788796a5b4"


def package(name: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as archive:
        # A fixed timestamp: writestr with a name stamps "now" (2 s resolution), so a served copy
        # and the one the test compares it with differed when a run crossed such a boundary.
        member = zipfile.ZipInfo(f"{name}.tif", date_time=(2026, 1, 1, 0, 0, 0))
        archive.writestr(member, (name.encode() * 5000)[:40_000])
    return buf.getvalue()


# --------------------------------------------------------------------------- the proxy


@dataclass
class ProxyServer:
    port: int
    record: Path

    def records(self) -> list[dict[str, Any]]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines()]

    def url(self, *, credentials: str | None = f"{USER}:{PASSWORD}") -> str:
        return f"http://{credentials}@127.0.0.1:{self.port}" if credentials else self.base

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_proxy(
    tmp_path: Path, *, auth: bool, tls: trustme.CA | None = None
) -> Iterator[ProxyServer]:
    port_file, record = tmp_path / "proxy.port", tmp_path / "proxy.jsonl"
    args = [
        sys.executable,
        "-m",
        "proxy",
        "--hostname",
        "127.0.0.1",
        "--port",
        "0",
        "--port-file",
        str(port_file),
        "--num-workers",
        "1",
        "--num-acceptors",
        "1",
        "--plugins",
        "tests.proxy_plugin.LoopbackRecorder",
        "--log-file",
        str(tmp_path / "proxy.log"),
    ]
    if auth:
        args += ["--basic-auth", f"{USER}:{PASSWORD}"]
    if tls is not None:  # the proxy itself speaks TLS (an https:// proxy URL)
        leaf = tls.issue_cert("127.0.0.1")
        leaf.private_key_pem.write_to_path(str(tmp_path / "proxy-key.pem"))
        leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "proxy-cert.pem"))
        args += ["--key-file", str(tmp_path / "proxy-key.pem")]
        args += ["--cert-file", str(tmp_path / "proxy-cert.pem")]
    env = clean_env(PYTHONPATH=str(ROOT), PROXY_RECORD=str(record))
    proc = subprocess.Popen(args, env=env, cwd=tmp_path, stdin=subprocess.DEVNULL)
    try:
        port = _wait_for_port(port_file, proc)
        yield ProxyServer(port=port, record=record)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_for_port(port_file: Path, proc: subprocess.Popen[bytes]) -> int:
    for _ in range(300):  # up to ~30 s on a busy machine
        if proc.poll() is not None:
            raise RuntimeError("proxy.py exited at start")
        text = port_file.read_text().strip() if port_file.exists() else ""
        if text.isdigit():
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", int(text))) == 0:
                    return int(text)
        time.sleep(0.1)
    raise RuntimeError("proxy.py did not start listening")


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[ProxyServer]:
    yield from start_proxy(tmp_path, auth=True)


@pytest.fixture
def open_proxy(tmp_path: Path) -> Iterator[ProxyServer]:
    yield from start_proxy(tmp_path, auth=False)


# --------------------------------------------------------------------------- the origins


@dataclass
class Origins:
    api_port: int
    storage_port: int
    storage_scheme: str
    api_seen: list[dict[str, str]] = field(default_factory=list)
    storage_seen: list[dict[str, str]] = field(default_factory=list)

    @property
    def api_url(self) -> str:
        return f"https://api.example.test:{self.api_port}"

    def storage_url(self, name: str, host: str = "storage.example.test") -> str:
        return f"{self.storage_scheme}://{host}:{self.storage_port}/pkg/{name}.zip?sig={SIGNATURE}"


@pytest.fixture
def ca(tmp_path: Path) -> tuple[trustme.CA, Path]:
    authority = trustme.CA()
    pem = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(pem))
    return authority, pem


def serve_origins(ca: tuple[trustme.CA, Path], *, storage_tls: bool) -> Iterator[Origins]:
    authority, _ = ca
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("api.example.test", "storage.example.test").configure_cert(context)
    origins = Origins(0, 0, "https" if storage_tls else "http")

    async def put(request: web.Request) -> web.Response:
        origins.api_seen.append(dict(request.headers))
        insight = request.match_info["insight"]
        return web.json_response(
            {"id": insight, "status": "ready", "signed_url": origins.storage_url(insight)}
        )

    async def get(request: web.Request) -> web.Response:
        origins.storage_seen.append(dict(request.headers) | {"path_qs": request.path_qs})
        body = package(request.match_info["name"])
        return web.Response(body=body, content_type="application/zip")

    async def start() -> list[web.AppRunner]:
        runners = []
        for _ in range(2):
            runners.append(web.AppRunner(web.Application(), shutdown_timeout=0.1))
        runners[0].app.router.add_put("/v0/aoi/{aoi}/insights/{insight}/download", put)
        runners[1].app.router.add_get("/pkg/{name}.zip", get)
        ports = []
        for runner, tls in zip(runners, (True, storage_tls), strict=True):
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context if tls else None)
            await site.start()
            ports.append(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        origins.api_port, origins.storage_port = ports
        return runners

    async def stop(runners: list[web.AppRunner]) -> None:
        for runner in runners:
            await runner.cleanup()

    with start_blocking_portal(backend="asyncio") as portal:
        runners = portal.call(start)
        try:
            yield origins
        finally:
            portal.call(stop, runners)


@pytest.fixture
def tls_origins(ca: tuple[trustme.CA, Path]) -> Iterator[Origins]:
    yield from serve_origins(ca, storage_tls=True)


@pytest.fixture
def http_storage_origins(ca: tuple[trustme.CA, Path]) -> Iterator[Origins]:
    yield from serve_origins(ca, storage_tls=False)


def write_netrc(home: Path) -> None:
    home.mkdir()
    netrc = home / ".netrc"
    netrc.write_text(
        "".join(
            f"machine {host} login earthdata password {NETRC_PASSWORD}\n"
            for host in ("api.example.test", "storage.example.test", "direct.example.test")
        )
        + f"default login anyone password {NETRC_PASSWORD}\n"
    )
    netrc.chmod(0o600)


def manifest(tmp_path: Path, names: list[str]) -> Path:
    lines = ["version: 1", "limits: {poll_interval: 0.05s, rate: 100, retries: 1}", "exports:"]
    lines += [f'  - {{aoi_id: "aoi-1", insight_id: "{n}", outputs: ["layer"]}}' for n in names]
    path = tmp_path / "m.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cli(
    tmp_path: Path, origins: Origins, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "batch_export",
            "run",
            str(manifest(tmp_path, ["ins-a", "ins-b"])),
            "--api-url",
            origins.api_url,
            "--report",
            str(tmp_path / "report.json"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )


def sinks(tmp_path: Path, proc: subprocess.CompletedProcess[str]) -> str:
    """Everything a run wrote that a person or a program reads: streams, report, state store."""
    state = b"".join(
        p.read_bytes()
        for p in (tmp_path / "exports").rglob("*")
        if p.is_file() and not p.name.endswith(".zip")
    )
    return (
        proc.stdout + proc.stderr + (tmp_path / "report.json").read_text() + state.decode("latin-1")
    )


# --------------------------------------------------------------------------- tests


def test_https_through_connect_key_only_inside_the_tunnel(
    tmp_path: Path, proxy: ProxyServer, tls_origins: Origins, ca: tuple[trustme.CA, Path]
) -> None:
    write_netrc(tmp_path / "home")
    env = clean_env(
        PIXXEL_API_KEY=KEY,
        HTTPS_PROXY=proxy.url(),
        SSL_CERT_FILE=str(ca[1]),
        HOME=str(tmp_path / "home"),
    )
    env.pop("NETRC", None)
    env.pop("NO_PROXY", None)
    env.pop("no_proxy", None)
    proc = run_cli(tmp_path, tls_origins, env)
    assert proc.returncode == 0, proc.stderr

    for name in ("ins-a", "ins-b"):
        written = tmp_path / "exports" / "aoi-1" / name / f"{name}.zip"
        assert (
            hashlib.sha256(written.read_bytes()).hexdigest()
            == hashlib.sha256(package(name)).hexdigest()
        )

    # The API got the key (inside the tunnel); storage got no Authorization at all (no ~/.netrc).
    assert [seen["Authorization"] for seen in tls_origins.api_seen] == [KEY, KEY]
    assert [("Authorization" in seen) for seen in tls_origins.storage_seen] == [False, False]

    # The proxy saw only CONNECTs, each carrying the proxy credentials and nothing else secret.
    records = proxy.records()
    expected_auth = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    # One CONNECT per tunnel: at most one per request, fewer when a tunnel is kept alive.
    assert {(r["method"], r["host"], r["port"]) for r in records} == {
        ("CONNECT", "api.example.test", tls_origins.api_port),
        ("CONNECT", "storage.example.test", tls_origins.storage_port),
    }
    assert 2 <= len(records) <= 4
    assert {r["headers"].get("Proxy-Authorization") for r in records} == {expected_auth}
    assert all("Authorization" not in r["headers"] for r in records)
    raw = proxy.record.read_text()
    for secret in (KEY, SIGNATURE, NETRC_PASSWORD):
        assert secret not in raw

    # Proxy credentials reach no sink.
    everything = sinks(tmp_path, proc)
    for secret in (PASSWORD, KEY, SIGNATURE, NETRC_PASSWORD):
        assert secret not in everything


def test_wrong_proxy_credentials_fail_clearly_and_stay_secret(
    tmp_path: Path, proxy: ProxyServer, tls_origins: Origins, ca: tuple[trustme.CA, Path]
) -> None:
    wrong = "wr0ng-pa55word-abc"
    env = clean_env(
        PIXXEL_API_KEY=KEY,
        https_proxy=proxy.url(credentials=f"{USER}:{wrong}"),
        SSL_CERT_FILE=str(ca[1]),
    )
    proc = run_cli(tmp_path, tls_origins, env)
    assert proc.returncode == 1
    report = json.loads((tmp_path / "report.json").read_text())
    errors = [job["error"] for job in report["jobs"]]
    assert [e["code"] for e in errors] == ["proxy_error", "proxy_error"]
    assert errors[0]["message"] == (
        f"proxy 127.0.0.1:{proxy.port} (https_proxy) wants credentials for "
        f"api.example.test:{tls_origins.api_port} (407): put the user and password in the "
        "proxy URL, before its host"
    )
    assert tls_origins.api_seen == []
    assert proxy.records() == []  # refused before any request was passed on
    everything = sinks(tmp_path, proc)
    assert wrong not in everything and KEY not in everything


SPEC = ExportSpec(
    aoi_id="aoi-1", insight_id="ins-1", inputs=(), outputs=("a",), name="j", relpath="j.zip"
)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_http_storage_through_the_proxy_and_no_proxy_exempts_a_host(
    tmp_path: Path,
    open_proxy: ProxyServer,
    http_storage_origins: Origins,
    monkeypatch: pytest.MonkeyPatch,
    anyio_backend: str,
) -> None:
    write_netrc(tmp_path / "home")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("NETRC", raising=False)
    env = {"HTTP_PROXY": open_proxy.base, "NO_PROXY": "direct.example.test,10.0.0.0/8"}
    origins = http_storage_origins
    async with open_sessions(
        api_connections=2, storage_connections=2, environ=env, resolver=LoopbackResolver()
    ) as sessions:
        for host in ("storage.example.test", "direct.example.test"):
            url = URL(origins.storage_url("ins-1", host), encoded=True)
            async with sessions.storage.get(url) as resp:
                assert resp.status == 200
                assert await resp.read() == package("ins-1")

    # Only the proxied host reached the proxy, as an absolute-form GET without Authorization.
    records = open_proxy.records()
    assert [(r["method"], r["host"]) for r in records] == [("GET", "storage.example.test")]
    assert "Authorization" not in records[0]["headers"]
    assert [seen["Host"] for seen in origins.storage_seen] == [
        f"storage.example.test:{origins.storage_port}",
        f"direct.example.test:{origins.storage_port}",
    ]
    assert all("Authorization" not in seen for seen in origins.storage_seen)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_plain_http_api_is_never_sent_through_a_proxy(
    open_proxy: ProxyServer, anyio_backend: str
) -> None:
    clock = SystemClock()
    env = {"HTTP_PROXY": open_proxy.base}
    async with open_sessions(api_connections=1, storage_connections=1, environ=env) as sessions:
        client = PixxelClient(
            sessions.api,
            base_url="http://api.example.test:8080",
            api_key=KEY,
            limiter=RateLimiter(100.0, clock=clock),
            clock=clock,
            retries=0,
            read_timeout=5.0,
        )
        with pytest.raises(ApiError) as info:
            await client.request_package(SPEC, deadline=clock.monotonic() + 60, job_key="k")
    assert info.value.code == "proxy_plain_http"
    assert info.value.message.startswith(
        f"the API URL is plain http and HTTP_PROXY sends it through the proxy 127.0.0.1:{open_proxy.port}"
    )
    assert open_proxy.records() == []
    assert client.stats.sent == 0


def test_proxy_variables_never_apply_to_loopback(tmp_path: Path) -> None:
    # The sandbox (loopback) is reached directly although every proxy variable points nowhere.
    env = clean_env(
        HTTPS_PROXY="http://127.0.0.1:9",
        HTTP_PROXY="http://127.0.0.1:9",
        ALL_PROXY="http://127.0.0.1:9",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "batch_export", "demo", "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "out").rglob("*.zip"))) == 7


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_an_https_proxy_is_reached_over_tls(
    tmp_path: Path, tls_origins: Origins, ca: tuple[trustme.CA, Path], anyio_backend: str
) -> None:
    authority, pem = ca
    with contextmanager(start_proxy)(tmp_path, auth=False, tls=authority) as server:
        env = {"HTTPS_PROXY": f"https://127.0.0.1:{server.port}", "SSL_CERT_FILE": str(pem)}
        async with open_sessions(api_connections=1, storage_connections=1, environ=env) as sessions:
            url = URL(tls_origins.storage_url("ins-9"), encoded=True)
            async with sessions.storage.get(url) as resp:
                assert resp.status == 200 and await resp.read() == package("ins-9")
        assert [(r["method"], r["host"]) for r in server.records()] == [
            ("CONNECT", "storage.example.test")
        ]
