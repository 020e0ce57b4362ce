"""The command line under trouble (issue 10): state stores, output collisions, signals, pipes, env.

Each test is a kind of failure users hit: a state store that cannot be used (exit 2, one line, no
traceback, nothing requested) or that fails mid-run (a clean end with report and metrics); a
``--report``/``--metrics-file`` that would overwrite the state store, a package or the manifest
(exit 2); SIGHUP (exit 129, the code recorded everywhere); a late signal while the outcome is
recorded (the exit code stays the recorded one); output piped into ``head`` (no traceback, the
command's own exit code); every ``run`` option settable as ``BATCH_EXPORT_<OPTION>``.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from batch_export import app
from batch_export.cli import main
from batch_export.errors import LocalIOError
from batch_export.sandbox import Sandbox, SandboxConfig
from batch_export.store import SqliteStore
from tests.fakes import CliResult, clean_env, cli_in_process, sandbox_thread

KEY = "cli-hardening-key-5d2a"


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    with sandbox_thread(SandboxConfig(keys=(KEY,), asset_size=3000, rate=None)) as sb:
        yield sb


def write_manifest(tmp_path: Path, sandbox: Sandbox, jobs: int = 2) -> Path:
    aoi = sandbox.catalog.aois[0]
    # rate 100/s: the default 2/s would only add real waiting between the PUTs of every run
    limits = "limits: {poll_interval: 0.05s, poll_max_interval: 0.1s, rate: 100}"
    lines = ["version: 1", limits, "exports:"]
    for ins in aoi.insights[:jobs]:
        lines.append(
            f'  - {{aoi_id: "{aoi.id}", insight_id: "{ins.id}", outputs: ["{ins.outputs[0]}"]}}'
        )
    path = tmp_path / "m.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def cli(
    *args: str, sandbox: Sandbox | None = None, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full = [sys.executable, "-m", "batch_export", *args]
    if sandbox is not None:
        full += ["--api-url", sandbox.api_url]
    return subprocess.run(
        full,
        capture_output=True,
        text=True,
        env=clean_env(PIXXEL_API_KEY=KEY, **(extra_env or {})),
        timeout=120,
        check=False,
    )


def assert_one_line_error(
    proc: subprocess.CompletedProcess[str] | CliResult, *needles: str
) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("batch-export: "), proc.stderr
    for needle in needles:
        assert needle in lines[0]


# -- the state store unusable at start: exit 2, one line -----------------------------------------


def _newer_schema(db: Path) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA user_version = 99")


def _truncated(db: Path) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE filler (x TEXT)")
        conn.executemany("INSERT INTO filler VALUES (?)", [("x" * 500,) for _ in range(3000)])
    with open(db, "r+b") as handle:
        handle.truncate(db.stat().st_size // 2)


def _garbage(db: Path) -> None:
    db.write_bytes(b"this is not a database at all " * 200)


@pytest.mark.parametrize(
    ("damage", "needle"),
    [(_newer_schema, "newer batch-export"), (_truncated, "damaged"), (_garbage, "not a SQLite")],
)
def test_a_state_store_unusable_at_start_is_exit_2_with_one_line(
    sandbox: Sandbox, tmp_path: Path, damage: Any, needle: str
) -> None:
    manifest = write_manifest(tmp_path, sandbox)
    state = tmp_path / "exports" / ".batch-export"
    assert cli("run", str(manifest), sandbox=sandbox).returncode == 0
    for extra in state.glob("state.sqlite3-*"):
        extra.unlink()
    damage(state / "state.sqlite3")
    before = len(sandbox.requests)
    for log_format in ("text", "json"):
        proc: subprocess.CompletedProcess[str] | CliResult
        if log_format == "text":  # a real process: nothing else reaches its stderr
            proc = cli("run", str(manifest), "--log-format", log_format, sandbox=sandbox)
        else:  # the same refusal as a JSON line, in this process (tests/fakes.py)
            args = ["run", str(manifest), "--log-format", log_format, "--api-url", sandbox.api_url]
            proc = cli_in_process(args, env={"PIXXEL_API_KEY": KEY}, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and "ExceptionGroup" not in proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], proc.stderr
        if log_format == "json":
            assert json.loads(lines[0])["event"] == "run_error"
    assert len(sandbox.requests) == before  # nothing was requested


# -- the state store failing mid-run: a clean end ------------------------------------------------


def test_a_state_disk_filling_mid_run_ends_cleanly_with_report_and_metrics(
    sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = write_manifest(tmp_path, sandbox, jobs=3)
    real_save = SqliteStore.save
    saves: list[int] = []

    async def filling(self: SqliteStore, record: Any) -> None:
        saves.append(1)
        if len(saves) > 4:
            raise LocalIOError(
                f"the state store {self.path} could not commit: database or disk is full",
                code="state_store",
            )
        await real_save(self, record)

    async def no_end(self: SqliteStore, *args: Any) -> None:
        raise LocalIOError(
            "the state store could not commit: database or disk is full", code="state_store"
        )

    monkeypatch.setattr(SqliteStore, "save", filling)
    monkeypatch.setattr(SqliteStore, "record_run_end", no_end)
    monkeypatch.setenv("PIXXEL_API_KEY", KEY)
    report, metrics = tmp_path / "r.json", tmp_path / "m.prom"
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        result = CliRunner().invoke(
            main,
            [
                "run",
                str(manifest),
                "--api-url",
                sandbox.api_url,
                "--report",
                str(report),
                "--metrics-file",
                str(metrics),
                "--no-progress",
            ],
        )
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    doc = json.loads(report.read_text())
    assert doc["exit_code"] == 1 and doc["counts"]["failed"] == 0
    assert "batch_export_last_exit_code 1.0" in metrics.read_text()


# -- --report / --metrics-file colliding with what the run owns -----------------------------------


def test_report_and_metrics_paths_join_the_collision_check(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path, sandbox)
    assert cli("run", str(manifest), sandbox=sandbox).returncode == 0
    state = tmp_path / "exports" / ".batch-export"
    store_bytes = (state / "state.sqlite3").read_bytes()
    aoi = sandbox.catalog.aois[0]
    ins = aoi.insights[0]
    package = tmp_path / "exports" / aoi.id / ins.id / f"{ins.id}.zip"
    package_bytes = package.read_bytes()
    before = len(sandbox.requests)
    cases = [
        (["--report", str(state / "state.sqlite3")], "state.sqlite3 in the state dir"),
        (["--metrics-file", str(state / "state.sqlite3-wal")], "state.sqlite3-wal"),
        (["--report", str(state / "lock")], "lock in the state dir"),
        (["--metrics-file", str(package)], f"the package of export {aoi.id}/{ins.id}"),
        (["--report", str(package) + ".part"], f"the package of export {aoi.id}/{ins.id}"),
        (["--report", str(manifest)], "the manifest"),
        (["--report", str(tmp_path / "x"), "--metrics-file", str(tmp_path / "x")], "--report file"),
    ]
    for options, needle in cases:  # in this process: a refusal before any run (tests/fakes.py)
        args = ["run", str(manifest), *options, "--api-url", sandbox.api_url]
        proc = cli_in_process(args, env={"PIXXEL_API_KEY": KEY}, cwd=tmp_path)
        assert_one_line_error(proc, needle, "choose another path")
    # A relative spelling through the working dir is the same file (a real process, as typed).
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "batch_export",
            "run",
            "m.yaml",
            "--api-url",
            sandbox.api_url,
            "--report",
            "exports/.batch-export/state.sqlite3",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=clean_env(PIXXEL_API_KEY=KEY),
        check=False,
    )
    assert_one_line_error(proc, "state.sqlite3")
    assert (state / "state.sqlite3").read_bytes() == store_bytes
    assert package.read_bytes() == package_bytes
    assert len(sandbox.requests) == before


# -- signals: SIGHUP like SIGINT/SIGTERM; the exit code is the recorded one ----------------------


def test_sighup_checkpoints_and_exits_129_recorded_everywhere(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    sandbox.config.ready_after_puts = 1_000_000  # pending for ever
    manifest = write_manifest(tmp_path, sandbox, jobs=2)
    metrics = tmp_path / "m.prom"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "batch_export",
            "run",
            str(manifest),
            "--api-url",
            sandbox.api_url,
            "--metrics-file",
            str(metrics),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(PIXXEL_API_KEY=KEY),
    )
    deadline = time.monotonic() + 60
    while len(sandbox.requests_to("api", "PUT")) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGHUP)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 129, stderr
    assert "Traceback" not in stderr
    state = tmp_path / "exports" / ".batch-export"
    (report,) = (state / "reports").glob("*.json")
    doc = json.loads(report.read_text())
    assert doc["exit_code"] == 129 and doc["counts"]["pending"] == 2
    assert "batch_export_last_exit_code 129.0" in metrics.read_text()
    with sqlite3.connect(state / "state.sqlite3") as db:
        assert list(db.execute("SELECT exit_code FROM runs")) == [(129,)]
        states = {row[0] for row in db.execute("SELECT state FROM jobs")}
    assert states and states <= {"requesting", "preparing"}


def test_a_signal_while_the_outcome_is_recorded_keeps_the_recorded_exit_code(
    sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = write_manifest(tmp_path, sandbox)
    monkeypatch.setenv("PIXXEL_API_KEY", KEY)
    real_write = app.write_report

    def impatient(report: dict[str, Any], path: Path, **kwargs: Any) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the report is written
        real_write(report, path, **kwargs)

    monkeypatch.setattr(app, "write_report", impatient)
    metrics = tmp_path / "m.prom"
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        result = CliRunner().invoke(
            main,
            [
                "run",
                str(manifest),
                "--api-url",
                sandbox.api_url,
                "--metrics-file",
                str(metrics),
                "--no-progress",
            ],
        )
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    (report,) = (tmp_path / "exports" / ".batch-export" / "reports").glob("*.json")
    recorded = json.loads(report.read_text())["exit_code"]
    assert recorded == 0
    assert result.exit_code == recorded, result.output
    assert "batch_export_last_exit_code 0.0" in metrics.read_text()


def test_signal_relay_phases() -> None:
    from batch_export.signals import Interrupted, SignalRelay
    from batch_export.stop import StopController

    relay = SignalRelay()
    with pytest.raises(Interrupted) as caught:
        relay._handle(signal.SIGHUP, None)  # before the run: nothing ran
    assert caught.value.exit_code == 129
    stop = StopController()
    stop.freeze()
    relay._stop, relay._loop = stop, object()  # type: ignore[assignment]
    relay._handle(signal.SIGTERM, None)  # the outcome is being recorded: ignored
    assert stop.reason is None
    relay.finishing()
    relay._handle(signal.SIGINT, None)  # after: ignored
    stop2 = StopController()
    stop2.request("max_runtime")
    stop2.request("SIGHUP")
    assert stop2.reason == "SIGHUP"  # a signal outranks the time budget
    stop2.request("SIGINT")
    assert stop2.reason == "SIGHUP"  # otherwise the first one wins


# -- pipes ------------------------------------------------------------------------------------------


def test_output_piped_into_head_ends_quietly_with_the_commands_own_code(tmp_path: Path) -> None:
    lines = ["version: 1", "exports:"]
    lines += [f'  - {{aoi_id: "a", insight_id: "i{n}", outputs: ["x"]}}' for n in range(20_000)]
    manifest = tmp_path / "big.yaml"
    manifest.write_text("\n".join(lines) + "\n")
    python = f"{sys.executable} -m batch_export"
    for command in (
        f"{python} validate {manifest}",
        f"{python} run {manifest} --dry-run --api-url http://127.0.0.1:9",
    ):
        proc = subprocess.run(
            [
                "bash",
                "-c",
                f"set -o pipefail; {command} | head -n 2 > /dev/null; echo ${{PIPESTATUS[0]}}",
            ],
            capture_output=True,
            text=True,
            env=clean_env(PIXXEL_API_KEY=KEY),
            timeout=120,
            check=False,
        )
        assert proc.stdout.strip() == "0", (command, proc.stderr)
        assert "Traceback" not in proc.stderr and "Broken pipe" not in proc.stderr, proc.stderr
        assert "Exception ignored" not in proc.stderr


# -- every run option from the environment ----------------------------------------------------------


def test_every_run_option_is_settable_as_batch_export_option(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path, sandbox)
    proc = cli("run", str(manifest), sandbox=sandbox, extra_env={"BATCH_EXPORT_IN_FLIGHT": "0"})
    assert proc.returncode == 2 and "--in-flight" in proc.stderr
    proc = cli("run", str(manifest), sandbox=sandbox, extra_env={"BATCH_EXPORT_DRY_RUN": "1"})
    assert proc.returncode == 0 and proc.stdout.count(" PUT /v0/aoi/") == 2
    assert sandbox.requests == []
    elsewhere = tmp_path / "elsewhere"
    report = tmp_path / "env-report.json"
    proc = cli(
        "run",
        str(manifest),
        sandbox=sandbox,
        extra_env={
            "BATCH_EXPORT_OUT": str(elsewhere),
            "BATCH_EXPORT_REPORT": str(report),
            "BATCH_EXPORT_QUIET": "1",
        },
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # quiet, and exit 0: no summary
    assert json.loads(report.read_text())["counts"]["downloaded"] == 2
    assert len(list(elsewhere.rglob("*.zip"))) == 2
    # The command line wins over the environment.
    proc = cli(
        "run",
        str(manifest),
        "--in-flight",
        "4",
        sandbox=sandbox,
        extra_env={"BATCH_EXPORT_IN_FLIGHT": "0", "BATCH_EXPORT_OUT": str(elsewhere)},
    )
    assert proc.returncode == 0, proc.stderr


# -- nothing the run creates or opens in the state dir follows a planted symlink --------------------


@pytest.mark.parametrize("entry", ["lock", "reports", "state.sqlite3-wal"])
def test_a_symlink_planted_in_the_state_dir_is_refused_and_its_target_untouched(
    sandbox: Sandbox, tmp_path: Path, entry: str
) -> None:
    manifest = write_manifest(tmp_path, sandbox)
    state = tmp_path / "exports" / ".batch-export"
    state.mkdir(parents=True)
    victim = tmp_path / "victim"
    if entry == "reports":
        victim.mkdir()
    else:
        victim.write_text("precious\n")
    (state / entry).symlink_to(victim)
    proc = cli("run", str(manifest), sandbox=sandbox)
    assert_one_line_error(proc, str(state / entry))
    assert "symlink" in proc.stderr
    if entry == "reports":
        assert list(victim.iterdir()) == []
    else:
        assert victim.read_text() == "precious\n"
    assert sandbox.requests == []


def test_status_never_shows_a_signed_query_even_from_an_older_store(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path, sandbox, jobs=1)
    assert cli("run", str(manifest), sandbox=sandbox).returncode == 0
    state = tmp_path / "exports" / ".batch-export"
    leaked = (
        "storage said no: https://s3.example/p.zip?X-Amz-Signature=deadbeef&X-Amz-Credential=AKIA"
    )
    with sqlite3.connect(state / "state.sqlite3") as db:
        db.execute(
            "UPDATE jobs SET state = 'failed', error_code = 'x', error_message = ?", (leaked,)
        )
    for extra in ([], ["--json"]):
        proc = cli("status", "--state-dir", str(state), *extra)
        assert proc.returncode == 0, proc.stderr
        assert "deadbeef" not in proc.stdout and "AKIA" not in proc.stdout
        assert "https://s3.example/p.zip?" in proc.stdout
