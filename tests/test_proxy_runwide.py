"""A proxy that cannot be used is a run-wide condition, not one failure per job (issue 16 item 3).

An unusable proxy variable is one line and exit 2 at start; a proxy that refuses connections opens
the run-wide breaker (``proxy_error`` is one of the unreachable codes): a few probe jobs try, the
rest stay pending, one line names the proxy (never its password). The proxy is a closed port on
127.0.0.1; the API host is a made-up name only the proxy would resolve, so nothing leaves the machine.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fakes import clean_env

PASSWORD = "prx-pw-83d1"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _manifest(tmp_path: Path, jobs: int) -> Path:
    lines = [
        "version: 1",
        'api: {url: "https://api.example.test"}',
        "limits: {rate: 100, retries: 1}",
        "output: {dir: out}",
        "exports:",
    ]
    lines += [f'  - {{aoi_id: "a{n}", insight_id: "i{n}", outputs: ["x"]}}' for n in range(jobs)]
    path = tmp_path / "m.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _run(tmp_path: Path, proxy: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "batch_export",
            "run",
            str(_manifest(tmp_path, 30)),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env=clean_env(PIXXEL_API_KEY="k-proxy-test", HTTPS_PROXY=proxy, NO_PROXY=""),
        cwd=tmp_path,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("proxy", "needle"),
    [
        ("not a url", "HTTPS_PROXY is not a valid proxy URL"),
        ("socks5://127.0.0.1:1080", "only http:// and https:// proxies are supported"),
        ("http://127.0.0.1:99999", "HTTPS_PROXY is not a valid proxy URL"),
    ],
)
def test_an_unusable_proxy_variable_is_exit_2_at_start(
    tmp_path: Path, proxy: str, needle: str
) -> None:
    proc = _run(tmp_path, proxy)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_a_proxy_refusing_connections_stops_the_run_once(tmp_path: Path) -> None:
    port = _closed_port()
    proc = _run(tmp_path, f"http://user:{PASSWORD}@127.0.0.1:{port}")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert PASSWORD not in proc.stderr
    [report_path] = (tmp_path / "out" / ".batch-export" / "reports").glob("*.json")
    report = json.loads(report_path.read_text())
    assert PASSWORD not in report_path.read_text()
    outcomes = [job["outcome"] for job in report["jobs"]]
    assert outcomes.count("pending") == 30  # no job failed one by one
    assert report["breaker"]["cause"] == "api_unreachable"
    assert report["requests"]["api"] == 6  # 3 probe jobs x (1 try + 1 retry), then no more
    breaker_lines = [line for line in proc.stderr.splitlines() if "circuit breaker open" in line]
    assert len(breaker_lines) == 1
    assert f"proxy 127.0.0.1:{port} (HTTPS_PROXY)" in breaker_lines[0]


def test_a_plain_http_api_a_proxy_would_carry_is_refused_once_at_start(tmp_path: Path) -> None:
    port = _closed_port()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "batch_export",
            "run",
            str(_manifest(tmp_path, 30)),
            "--api-url",
            "http://api.example.test",
            "--allow-http",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env=clean_env(PIXXEL_API_KEY="k", HTTP_PROXY=f"http://u:{PASSWORD}@127.0.0.1:{port}"),
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"batch-export: proxy_plain_http: the API URL is plain http and HTTP_PROXY sends it "
        f"through the proxy 127.0.0.1:{port}: the key would reach the proxy in clear; use "
        "https, or list the API host in NO_PROXY"
    ]
    assert not (tmp_path / "out").exists()  # nothing started
