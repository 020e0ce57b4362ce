"""Every run option value is checked exactly like its manifest key (issue 16 item 2).

The command line, ``BATCH_EXPORT_<OPTION>`` and the Python API reach the same check: exit 2 (or
:class:`UsageError`) with one line, before any request, and an API URL's secret is never echoed.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import batch_export
from batch_export.config import RunOptions, check_options
from batch_export.errors import UsageError
from batch_export.sandbox import Sandbox, SandboxConfig
from tests.fakes import CliResult, clean_env, cli_in_process, sandbox_thread

KEY = "opt-key-5d0e"
SECRET = "s3cr3t-9f1a"


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    with sandbox_thread(SandboxConfig(keys=(KEY,), rate=None, asset_size=100)) as sb:
        yield sb


def _manifest(tmp_path: Path, sandbox: Sandbox) -> Path:
    aoi = sandbox.catalog.aois[0]
    insight = aoi.insights[0]
    path = tmp_path / "m.yaml"
    path.write_text(
        f"""version: 1
api: {{url: "{sandbox.api_url}"}}
output: {{dir: out}}
exports:
  - {{aoi_id: "{aoi.id}", insight_id: "{insight.id}", name: "n", outputs: ["{insight.outputs[0]}"]}}
"""
    )
    return path


def _bad_urls(port: int) -> list[str]:
    return [
        f"http://bob:{SECRET}@127.0.0.1:{port}",
        f"http://127.0.0.1:{port}/?token={SECRET}",
        f"http://127.0.0.1:{port}/#{SECRET}",
        f"ftp://127.0.0.1:{port}/{SECRET}",
    ]


def test_a_bad_api_url_from_the_command_line_or_environment_is_exit_2(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    manifest = _manifest(tmp_path, sandbox)
    port = int(sandbox.api_url.rsplit(":", 1)[1])
    for n, url in enumerate(_bad_urls(port)):
        for how in ("option", "env"):
            extra = {"BATCH_EXPORT_API_URL": url} if how == "env" else {}
            args = ["--api-url", url] if how == "option" else []
            for command in (
                ["run", str(manifest), *args],
                ["run", str(manifest), "--dry-run", *args],
            ):
                proc: subprocess.CompletedProcess[str] | CliResult
                if n == 0:  # the first URL in a real process: stderr as a user sees it
                    proc = subprocess.run(
                        [sys.executable, "-m", "batch_export", *command],
                        capture_output=True,
                        text=True,
                        env=clean_env(PIXXEL_API_KEY=KEY, **extra),
                        cwd=tmp_path,
                        timeout=120,
                    )
                else:  # the others in this process: the same check, no interpreter start each
                    proc = cli_in_process(
                        command, env={"PIXXEL_API_KEY": KEY, **extra}, cwd=tmp_path
                    )
                assert proc.returncode == 2, (url, how, proc.stderr)
                lines = proc.stderr.strip().splitlines()
                assert len(lines) == 1, proc.stderr
                assert "the API URL" in lines[0] and "(value not shown)" in lines[0]
                assert SECRET not in proc.stderr + proc.stdout
    assert sandbox.requests == []  # nothing was sent


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (RunOptions(api_url=f"https://u:{SECRET}@api.example.test"), "user:password@"),
        (RunOptions(api_url=f"https://api.example.test/?t={SECRET}"), "query"),
        (RunOptions(in_flight=0), "--in-flight must be an integer from 1 to 100000"),
        (RunOptions(in_flight=100_001), "--in-flight must be an integer from 1 to 100000"),
        (RunOptions(downloads=1025), "--downloads must be an integer from 1 to 1024"),
        (RunOptions(connections=257), "--connections must be an integer from 1 to 256"),
        (RunOptions(segment_min=0), "segment_min must be an integer from 1 to 1099511627776"),
        (RunOptions(rate=float("inf")), "--rate must be a number of requests/s above 0"),
        (RunOptions(rate=float("nan")), "--rate must be a number of requests/s above 0"),
        (RunOptions(rate=0.0), "--rate must be a number of requests/s above 0"),
        (RunOptions(max_runtime=float("inf")), "--max-runtime must be a duration above 0"),
    ],
)
def test_option_values_get_the_manifest_keys_checks(options: RunOptions, needle: str) -> None:
    with pytest.raises(UsageError) as caught:
        check_options(options)
    assert needle in str(caught.value)
    assert SECRET not in str(caught.value)


def test_limits_in_range_pass() -> None:
    check_options(RunOptions(in_flight=100_000, downloads=1024, connections=256, rate=0.01))


def test_the_python_api_refuses_an_api_url_with_credentials(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    manifest = _manifest(tmp_path, sandbox)
    with pytest.raises(UsageError) as caught:
        batch_export.export(manifest, api_url=f"http://bob:{SECRET}@127.0.0.1:1", api_key=KEY)
    assert SECRET not in str(caught.value)
    assert sandbox.requests == []


def test_the_command_line_connections_range_is_the_manifests(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    manifest = _manifest(tmp_path, sandbox)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "batch_export",
            "run",
            str(manifest),
            "--connections",
            "200",
            "--dry-run",
        ],
        capture_output=True,
        text=True,
        env=clean_env(PIXXEL_API_KEY=KEY),
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr  # limits.connections allows up to 256


def test_every_run_option_is_in_the_readme_table() -> None:
    from batch_export.cli import main

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = [line for line in readme.splitlines() if line.startswith("| `-")]
    run = main.commands["run"]  # type: ignore[attr-defined]
    missing = [
        name
        for param in run.params
        for name in (*param.opts, *param.secondary_opts)
        if name != "--help" and not any(f"`{name}" in row or f" {name}" in row for row in table)
    ]
    assert missing == []
