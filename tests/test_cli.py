"""The command line as users run it: subprocesses against a sandbox on a real loopback port."""

from __future__ import annotations

import fcntl
import json
import re
import socket
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from batch_export.sandbox import DEMO_KEY, Sandbox, SandboxConfig
from tests.fakes import CliResult, clean_env, cli_in_process, sandbox_thread

ROOT = Path(__file__).resolve().parent.parent
KEY = "cli-test-key-9d8c7b6a"


def cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    full_env = clean_env(**(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "batch_export", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    with sandbox_thread(SandboxConfig(keys=(KEY,), asset_size=4000, rate=None)) as sb:
        yield sb


def write_manifest(tmp_path: Path, sandbox: Sandbox, body: str, name: str = "m.yaml") -> Path:
    aoi = sandbox.catalog.aois[0]
    text = textwrap.dedent(body).format(
        aoi=aoi.id,
        ins=aoi.insights[0].id,
        ins2=aoi.insights[1].id,
        out=aoi.insights[0].outputs[0],
        out2=aoi.insights[1].outputs[0],
    )
    path = tmp_path / name
    path.write_text(text)
    return path


GOOD = """\
version: 1
limits: {{poll_interval: 0.05s, poll_max_interval: 0.1s, rate: 50}}
exports:
  - aoi_id: "{aoi}"
    insight_id: "{ins}"
    outputs: ["{out}"]
  - aoi_id: "{aoi}"
    insight_id: "{ins2}"
    outputs: ["{out2}"]
"""


def test_run_exit_0_then_report_and_files(sandbox: Sandbox, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, sandbox, GOOD)
    report = tmp_path / "report.json"
    proc = cli(
        "run",
        str(manifest),
        "--api-url",
        sandbox.api_url,
        "--report",
        str(report),
        env={"PIXXEL_API_KEY": KEY},
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(report.read_text())
    assert doc["exit_code"] == 0
    assert doc["counts"] == {
        "total": 2,
        "downloaded": 2,
        "skipped": 0,
        "failed": 0,
        "pending": 0,
        "abandoned": 0,
    }
    for job in doc["jobs"]:
        path = Path(job["path"])
        assert path.is_relative_to(tmp_path / "exports")  # exports/ beside the manifest
        with zipfile.ZipFile(path) as archive:
            assert archive.testzip() is None
        assert job["bytes"] == path.stat().st_size
    state_reports = list((tmp_path / "exports" / ".batch-export" / "reports").glob("*.json"))
    assert len(state_reports) == 1
    assert json.loads(state_reports[0].read_text())["counts"] == doc["counts"]
    assert "summary: 2 job(s): 2 downloaded" in proc.stderr
    assert KEY not in proc.stderr + proc.stdout + report.read_text()


def test_quiet_run_prints_nothing_on_success(sandbox: Sandbox, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, sandbox, GOOD)
    proc = cli(
        "run", str(manifest), "--api-url", sandbox.api_url, "-q", env={"PIXXEL_API_KEY": KEY}
    )
    assert proc.returncode == 0
    assert proc.stdout == "" and proc.stderr == ""


def test_failing_job_exit_1_with_reason(sandbox: Sandbox, tmp_path: Path) -> None:
    manifest = write_manifest(
        tmp_path,
        sandbox,
        GOOD + '  - {{aoi_id: "{aoi}", insight_id: "{ins}", outputs: ["nope"], name: bad}}\n',
    )
    report = tmp_path / "r.json"
    proc = cli(
        "run",
        str(manifest),
        "--api-url",
        sandbox.api_url,
        "-q",
        "--report",
        str(report),
        env={"PIXXEL_API_KEY": KEY},
    )
    assert proc.returncode == 1
    doc = json.loads(report.read_text())
    assert doc["counts"]["failed"] == 1 and doc["counts"]["downloaded"] == 2
    failed = next(j for j in doc["jobs"] if j["outcome"] == "failed")
    assert failed["error"]["http_status"] == 400 and failed["error"]["code"]
    assert "summary:" in proc.stderr  # quiet still prints the summary when the exit code is not 0
    assert "failed" in proc.stderr


BAD_MANIFESTS = {
    "octal": (
        'version: 1\nexports:\n  - aoi_id: 012\n    insight_id: "x"\n    outputs: ["a"]\n',
        3,
        13,
    ),
    "bool": (
        'version: 1\nexports:\n  - aoi_id: "a"\n    insight_id: no\n    outputs: ["a"]\n',
        4,
        17,
    ),
    "date": (
        'version: 1\nexports:\n  - aoi_id: "a"\n    insight_id: "i"\n    outputs: [2026-05-01]\n',
        5,
        14,
    ),
    "sexagesimal": (
        'version: 1\nexports:\n  - aoi_id: 1:30\n    insight_id: "i"\n    outputs: ["a"]\n',
        3,
        13,
    ),
    "duplicate": (
        'version: 1\nexports:\n  - aoi_id: "a"\n    aoi_id: "b"\n    insight_id: "i"\n    outputs: ["a"]\n',
        4,
        5,
    ),
    "unknown": (
        'version: 1\nexports:\n  - aoi_id: "a"\n    insight_id: "i"\n    outputs: ["a"]\n    output: ["b"]\n',
        6,
        5,
    ),
    "empty": ('version: 1\nexports:\n  - aoi_id: "a"\n    insight_id: "i"\n', 3, 5),
    "escape": (
        'version: 1\noutput: {path: "../{name}.zip"}\nexports:\n  - aoi_id: "a"\n    insight_id: "i"\n    outputs: ["a"]\n',
        2,
        17,
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_manifest_errors_exit_2_and_request_nothing(
    sandbox: Sandbox, tmp_path: Path, case: str
) -> None:
    text, line, _col = BAD_MANIFESTS[case]
    manifest = tmp_path / f"{case}.yaml"
    manifest.write_text(text)
    env = {"PIXXEL_API_KEY": KEY}
    proc: subprocess.CompletedProcess[str] | CliResult
    if case == "bool":  # one case in a real process; the others in this one (tests/fakes.py)
        proc = cli("run", str(manifest), "--api-url", sandbox.api_url, env=env)
        again = cli("validate", str(manifest)).returncode
    else:
        args = ["run", str(manifest), "--api-url", sandbox.api_url]
        proc = cli_in_process(args, env=env, cwd=tmp_path)
        again = cli_in_process(["validate", str(manifest)], env={}, cwd=tmp_path).returncode
    assert proc.returncode == 2, proc.stderr
    assert re.search(rf"^{re.escape(str(manifest))}:{line}:\d+: \S", proc.stderr, re.M), proc.stderr
    assert sandbox.requests == []
    assert not (tmp_path / "exports").exists()
    assert again == 2


def test_validate_prints_plan(sandbox: Sandbox, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, sandbox, GOOD)
    proc = cli("validate", str(manifest))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("PUT /v0/aoi/") == 2
    assert "2 job(s); at least 2 API request(s)" in proc.stdout
    assert sandbox.requests == []


def test_dry_run_sends_nothing(sandbox: Sandbox, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, sandbox, GOOD)
    proc = cli("run", str(manifest), "--api-url", sandbox.api_url, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("PUT /v0/aoi/") == 2
    assert sandbox.requests == []


def test_literal_key_in_manifest_is_rejected_without_echo(tmp_path: Path) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        'version: 1\napi:\n  api_key: "sk-live-DO-NOT-ECHO"\nexports:\n  - {aoi_id: "a", insight_id: "b", outputs: ["c"]}\n'
    )
    proc = cli("run", str(manifest), env={"PIXXEL_API_KEY": KEY})
    assert proc.returncode == 2
    assert "DO-NOT-ECHO" not in proc.stderr + proc.stdout
    assert f"{manifest}:3:" in proc.stderr


def test_key_sources(sandbox: Sandbox, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, sandbox, GOOD)
    missing = cli("run", str(manifest), "--api-url", sandbox.api_url)
    assert missing.returncode == 2 and "PIXXEL_API_KEY" in missing.stderr
    key_file = tmp_path / "key"
    key_file.write_text(f"  {KEY}\n")
    both = cli(
        "run",
        str(manifest),
        "--api-url",
        sandbox.api_url,
        env={"PIXXEL_API_KEY": KEY, "PIXXEL_API_KEY_FILE": str(key_file)},
    )
    assert both.returncode == 2 and "more than once" in both.stderr
    assert KEY not in both.stderr
    from_file = cli(
        "run",
        str(manifest),
        "--api-url",
        sandbox.api_url,
        "-q",
        env={"PIXXEL_API_KEY_FILE": str(key_file)},
    )
    assert from_file.returncode == 0, from_file.stderr
    assert {r.header("Authorization") for r in sandbox.requests_to("api")} == {KEY}
    assert sandbox.requests == sandbox.requests  # nothing before the valid run
    assert sum(1 for r in sandbox.requests_to("api")) == 4


def test_plain_http_api_refused_off_loopback(tmp_path: Path) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        'version: 1\nexports:\n  - {aoi_id: "a", insight_id: "b", outputs: ["c"]}\n'
    )
    proc = cli(
        "run", str(manifest), "--api-url", "http://api.example.com", env={"PIXXEL_API_KEY": KEY}
    )
    assert proc.returncode == 2
    assert "--allow-http" in proc.stderr


def test_second_run_on_locked_state_dir_exits_75(sandbox: Sandbox, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, sandbox, GOOD)
    state = tmp_path / "exports" / ".batch-export"
    state.mkdir(parents=True)
    with open(state / "lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        handle.write("pid 4242 started 2026-11-29T03:00:00Z\n")
        handle.flush()
        proc = cli("run", str(manifest), "--api-url", sandbox.api_url, env={"PIXXEL_API_KEY": KEY})
    assert proc.returncode == 75
    assert "pid 4242" in proc.stderr
    assert sandbox.requests == []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_sandbox_command_and_demo_manifest(tmp_path: Path) -> None:
    port, storage_port = _free_port(), _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "batch_export",
            "sandbox",
            "--port",
            str(port),
            "--storage-port",
            str(storage_port),
            "--prepare-seconds",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        lines = []
        for line in server.stdout:
            lines.append(line)
            if "Serving until" in line:
                break
        banner = "".join(lines)
        assert f"http://127.0.0.1:{port}" in banner and DEMO_KEY in banner
        proc = cli(
            "run",
            str(ROOT / "manifests" / "demo.yaml"),
            "--api-url",
            f"http://127.0.0.1:{port}",
            "--out",
            str(tmp_path / "out"),
            env={"PIXXEL_API_KEY": DEMO_KEY},
        )
        assert proc.returncode == 0, proc.stderr
        zips = sorted((tmp_path / "out").rglob("*.zip"))
        assert len(zips) >= 6
        assert len({p.parts[-3] for p in zips}) >= 2  # at least two AOIs
        for path in zips:
            with zipfile.ZipFile(path) as archive:
                assert archive.testzip() is None
    finally:
        server.terminate()
        server.wait(timeout=10)
        for pipe in (server.stdout, server.stderr):
            if pipe is not None:
                pipe.close()
    assert server.returncode == 0


def test_tls_mismatch_fails_each_job_at_once(sandbox: Sandbox, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, sandbox, GOOD)
    https_url = sandbox.api_url.replace("http://", "https://")
    report = tmp_path / "r.json"
    proc = cli(
        "run",
        str(manifest),
        "--api-url",
        https_url,
        "-q",
        "--report",
        str(report),
        env={"PIXXEL_API_KEY": KEY},
    )
    assert proc.returncode == 1
    doc = json.loads(report.read_text())
    assert [job["error"]["code"] for job in doc["jobs"]] == ["tls_error", "tls_error"]
    assert doc["requests"]["api"] == 2  # one attempt per job, no retries


def test_key_with_a_line_break_or_non_ascii_is_refused_without_echo(tmp_path: Path) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        'version: 1\nexports:\n  - {aoi_id: "a", insight_id: "b", outputs: ["c"]}\n'
    )
    for bad in ("abc\r\nX-Injected: 1", "clé-secrète"):
        key_file = tmp_path / "key"
        key_file.write_text(bad)
        proc = cli(
            "run",
            str(manifest),
            "--api-url",
            "http://127.0.0.1:9",
            env={"PIXXEL_API_KEY_FILE": str(key_file)},
        )
        assert proc.returncode == 2
        assert "printable ASCII" in proc.stderr
        assert bad.split()[0] not in proc.stderr and "secr" not in proc.stderr


def test_a_demo_that_could_not_run_does_not_say_where_the_packages_are(tmp_path: Path) -> None:
    # It printed "packages are in ..." after the refusal (exit 2): there are no packages.
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = cli_in_process(["demo", "--out", str(blocker)], env={}, cwd=tmp_path)
    assert result.returncode == 2
    assert "packages are in" not in result.stdout + result.stderr
    assert "is a file, not a folder" in result.stderr


def test_an_output_dir_that_is_a_file_is_named_as_such(tmp_path: Path) -> None:
    # It said "cannot use the state dir <file>/.batch-export: Not a directory".
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        'version: 1\nexports:\n  - {aoi_id: "a", insight_id: "i", outputs: ["o"]}\n'
    )
    args = ["run", str(manifest), "--api-url", "http://127.0.0.1:9", "--out", str(blocker)]
    result = cli_in_process(args, env={"PIXXEL_API_KEY": "k"}, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"batch-export: the output dir {blocker} is a file, not a folder (--out or output.dir)"
    ]
