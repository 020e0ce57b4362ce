"""Operator experience: JSON log lines, the Prometheus metrics file, the progress display in a pty."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from batch_export.sandbox import Sandbox, SandboxConfig
from tests.fakes import clean_env, sandbox_thread

KEY = "operator-key-77aa"


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    with sandbox_thread(SandboxConfig(keys=(KEY,), asset_size=3_000_000, rate=None)) as sb:
        yield sb


def env() -> dict[str, str]:
    return clean_env(PIXXEL_API_KEY=KEY, COLUMNS="120", TERM="xterm-256color")


def manifest(tmp_path: Path, sandbox: Sandbox, *, failing: bool) -> Path:
    aoi = sandbox.catalog.aois[0]
    lines = ["version: 1", "limits: {poll_interval: 0.05s, rate: 100}", "exports:"]
    for ins in aoi.insights[:2]:
        lines.append(
            f'  - {{aoi_id: "{aoi.id}", insight_id: "{ins.id}", outputs: ["{ins.outputs[0]}"]}}'
        )
    if failing:
        lines.append(
            f'  - {{aoi_id: "{aoi.id}", insight_id: "{aoi.insights[0].id}", outputs: ["nope"], name: bad}}'
        )
    path = tmp_path / "m.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "batch_export", "run", *args],
        capture_output=True,
        text=True,
        env=env(),
        timeout=120,
        check=False,
    )


def test_json_log_lines_parse_and_carry_the_fields(sandbox: Sandbox, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    proc = run(
        str(manifest(tmp_path, sandbox, failing=True)),
        "--api-url",
        sandbox.api_url,
        "--log-format",
        "json",
        "--report",
        str(report),
        "-v",
    )
    assert proc.returncode == 1
    lines = [json.loads(line) for line in proc.stderr.splitlines()]
    run_id = json.loads(report.read_text())["run_id"]
    assert all(line["run_id"] == run_id for line in lines)
    assert all({"ts", "level", "event", "message"} <= line.keys() for line in lines)
    downloaded = [line for line in lines if line["event"] == "job_downloaded"]
    assert len(downloaded) == 2
    for line in downloaded:
        assert line["level"] == "info"
        assert re.fullmatch(r"[0-9a-f]{64}", line["key"])
        assert line["aoi_id"] == sandbox.catalog.aois[0].id
        assert line["state"] == "downloaded" and line["attempt"] == 1
        assert line["bytes"] == Path(line["path"]).stat().st_size
    failed = [line for line in lines if line["event"] == "job_failed"]
    assert len(failed) == 1 and failed[0]["error_code"] and failed[0]["http_status"] == 400
    states = [line for line in lines if line["event"] == "job_state"]
    assert {line["state"] for line in states} >= {
        "requesting",
        "preparing",
        "ready",
        "downloading",
        "verifying",
        "done",
        "failed",
    }
    summary = [line for line in lines if line["event"] == "run_summary"]
    assert len(summary) == 1
    assert summary[0]["counts"] == {
        "total": 3,
        "downloaded": 2,
        "skipped": 0,
        "failed": 1,
        "pending": 0,
        "abandoned": 0,
    }
    assert summary[0]["exit_code"] == 1
    assert KEY not in proc.stderr


def test_metrics_file_parses_with_prometheus_client(sandbox: Sandbox, tmp_path: Path) -> None:
    metrics = tmp_path / "textfile" / "batch_export.prom"
    first = run(
        str(manifest(tmp_path, sandbox, failing=True)),
        "--api-url",
        sandbox.api_url,
        "--metrics-file",
        str(metrics),
        "-q",
    )
    assert first.returncode == 1
    values = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(metrics.read_text())
        for sample in family.samples
    }
    assert values[("batch_export_jobs", (("outcome", "downloaded"),))] == 2
    assert values[("batch_export_jobs", (("outcome", "failed"),))] == 1
    assert values[("batch_export_api_requests", (("status", "200"),))] == 4
    assert values[("batch_export_api_requests", (("status", "400"),))] == 1
    assert values[("batch_export_throttled_requests", ())] == 0
    assert values[("batch_export_last_exit_code", ())] == 1
    assert values[("batch_export_last_success_timestamp_seconds", ())] == 0  # no success yet
    assert values[("batch_export_downloaded_bytes", ())] > 6_000_000
    second = run(
        str(manifest(tmp_path, sandbox, failing=False)),
        "--api-url",
        sandbox.api_url,
        "--metrics-file",
        str(metrics),
        "-q",
    )
    assert second.returncode == 0
    text = metrics.read_text()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert families["batch_export_last_exit_code"].samples[0].value == 0
    assert families["batch_export_last_success_timestamp_seconds"].samples[0].value > 1.7e9
    skipped = [s for s in families["batch_export_jobs"].samples if s.labels["outcome"] == "skipped"]
    assert skipped[0].value == 2


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


def test_progress_display_in_a_pseudo_terminal(sandbox: Sandbox, tmp_path: Path) -> None:
    master, slave = pty.openpty()
    os.set_inheritable(slave, True)
    sandbox.config.prepare_seconds = 0.5
    sandbox.config.asset_size = 80_000_000  # downloads last several display frames
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "batch_export",
            "run",
            str(manifest(tmp_path, sandbox, failing=True)),
            "--api-url",
            sandbox.api_url,
        ],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env(),
        close_fds=True,
    )
    os.close(slave)
    chunks: list[bytes] = []
    while True:
        ready, _, _ = select.select([master], [], [], 30)
        if not ready:
            break
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=30) == 1
    raw = b"".join(chunks).decode("utf-8", "replace")
    assert "\x1b[" in raw  # a live display was drawn
    assert "jobs 0/3 done" in ANSI.sub("", raw) or "jobs 1/3 done" in ANSI.sub("", raw)
    text = ANSI.sub("", raw)
    # Every cursor move or carriage return of the display separates segments; a log line must be
    # one whole segment (the display never writes into the middle of it).
    lines = [line.strip() for line in ANSI.sub("\n", raw).split("\n")]
    # Log lines print whole, above the display, never torn by it.
    for needle in ("downloaded  ", "failed      ", "summary: 3 job(s)"):
        matching = [line for line in lines if needle in line]
        assert matching, needle
        assert all(
            re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING) ", line)
            for line in matching
        ), matching
    assert "API " in text and "req/s" in text
    # The display got job events: a per-download bar with the job's label, and a moving count.
    aoi = sandbox.catalog.aois[0].id
    assert re.search(rf"{aoi}/\S+ .*MB", text)
    assert re.search(r"jobs [1-3]/3 done", text)


def test_progress_display_renders_counts_limiter_and_bars() -> None:
    from rich.console import Console

    from batch_export.lifecycle import JobState
    from batch_export.manifest import ExportSpec
    from batch_export.progress import ProgressDisplay
    from batch_export.ratelimit import LimiterStats
    from batch_export.runner import Job, JobResult, Outcome
    from batch_export.store import JobRecord

    console = Console(record=True, width=120, force_terminal=False)
    stats = LimiterStats(rate=1.0, target_rate=4.0, paused_for=12.0, throttled=3, granted=10)
    display = ProgressDisplay(total=3, limiter=lambda: stats, console=console)
    spec = ExportSpec("aoi-1", "ins-1", (), ("o",), "n1", "aoi-1/ins-1/n1.zip")
    record = JobRecord(
        key="k1",
        aoi_id="aoi-1",
        insight_id="ins-1",
        name="n1",
        relpath=spec.relpath,
        state=JobState.DOWNLOADING,
    )
    job = Job(spec=spec, final=Path("/x"), record=record, bytes_total=2_000_000)
    display.job_state(job)
    job.bytes_done = 500_000
    display.job_bytes(job, 500_000)
    display.job_finished(
        JobResult("k0", "a", "i", "n0", Outcome.DOWNLOADED, "/p", 1, "s", 1, 0, 1.0)
    )
    display.job_finished(
        JobResult("k2", "a", "i", "n2", Outcome.FAILED, "/p", None, None, 1, 0, 1.0, "x", "y", 403)
    )
    console.print(display)
    text = console.export_text()
    assert "jobs 1/3 done · 1 failed · 1 to go" in text
    assert "API 1/4 req/s · paused 12 s (Retry-After) · 3×429" in text
    assert "aoi-1/n1" in text and "0.5/2.0 MB" in text
    display.job_finished(
        JobResult("k1", "aoi-1", "ins-1", "n1", Outcome.DOWNLOADED, "/p", 2, "s", 1, 0, 1.0)
    )
    console.print(display)
    assert "aoi-1/n1" not in console.export_text()
