"""The run-wide circuit breaker in whole runs (SPEC §9); requests are counted at the sandbox."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import anyio
import pytest

from batch_export.manifest import ExportSpec
from batch_export.runner import Outcome, Runner, RunResult, Settings
from batch_export.sandbox import Sandbox, SandboxConfig
from batch_export.store import MemoryStore, SqliteStore
from batch_export.types import JobState
from tests.fakes import clean_env, sandbox_thread

KEY = "breaker-key-31c0"


def specs(sandbox: Sandbox, count: int, *, aois: int = 3, by_aoi: bool = False) -> list[ExportSpec]:
    """``count`` distinct jobs over the first ``aois`` AOIs, taking turns (or AOI after AOI)."""
    chosen = sandbox.catalog.aois[:aois]
    out = []
    for n in range(count):
        aoi = chosen[n * aois // count] if by_aoi else chosen[n % aois]
        ins = aoi.insights[n % len(aoi.insights)]
        name = f"job{n:03d}"
        out.append(
            ExportSpec(aoi.id, ins.id, (), (ins.outputs[0],), name, f"{aoi.id}/{ins.id}/{name}.zip")
        )
    return out


def settings(api_url: str, out: Path, **changes: object) -> Settings:
    base = Settings(
        api_url=api_url,
        out_dir=out,
        state_dir=out / ".batch-export",
        rate=50.0,
        poll_interval=0.02,
        poll_max_interval=0.05,
        poll_timeout=60.0,
        retries=6,
        read_timeout=5.0,
        backoff_base=0.01,
        backoff_cap=0.05,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


async def run(api_url: str, jobs: list[ExportSpec], out: Path, **changes: object) -> RunResult:
    class Quiet:
        def job_state(self, job: object) -> None: ...
        def job_bytes(self, job: object, count: int) -> None: ...
        def job_finished(self, result: object) -> None: ...

    runner = Runner(
        settings(api_url, out, **changes), jobs, api_key=KEY, store=MemoryStore(), observer=Quiet()
    )
    return await runner.run()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    async with Sandbox(SandboxConfig(keys=(KEY,), asset_size=2_000, rate=None)) as sb:
        yield sb


# -------------------------------------------------------------------------------- bad key (CLI)


@pytest.fixture
def threaded() -> Iterator[Sandbox]:
    with sandbox_thread(SandboxConfig(keys=(KEY,), asset_size=2_000, rate=None)) as sb:
        yield sb


@pytest.mark.parametrize("by_aoi", [False, True], ids=["taking-turns", "aoi-after-aoi"])
def test_200_jobs_with_a_bad_key_cost_at_most_10_requests(
    threaded: Sandbox, tmp_path: Path, by_aoi: bool
) -> None:
    # AOI after AOI: in manifest order the first 67 jobs share one AOI, and 403s from one AOI
    # alone cannot open the breaker; jobs are admitted round-robin over AOIs so it still does.
    lines = ["version: 1", "exports:"]  # the default rate (2/s) and in-flight (32)
    for spec in specs(threaded, 200, by_aoi=by_aoi):
        lines.append(
            f'  - {{aoi_id: "{spec.aoi_id}", insight_id: "{spec.insight_id}", '
            f'outputs: ["{spec.outputs[0]}"], name: "{spec.name}"}}'
        )
    manifest = tmp_path / "m.yaml"
    manifest.write_text("\n".join(lines) + "\n")
    report = tmp_path / "report.json"
    started = time.monotonic()
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "batch_export", "run", str(manifest)),
            *("--api-url", threaded.api_url, "--report", str(report), "--progress-interval", "0"),
        ],
        capture_output=True,
        text=True,
        env=clean_env(PIXXEL_API_KEY="not-the-key"),
        timeout=120,
        check=False,
    )
    seconds = time.monotonic() - started
    assert proc.returncode == 1, proc.stderr
    puts = threaded.requests_to("api", "PUT")
    assert 5 <= len(puts) <= 10, len(puts)
    assert {r.status for r in puts} == {403}
    doc = json.loads(report.read_text())
    assert doc["counts"]["pending"] == 200 and doc["counts"]["failed"] == 0
    assert {job["outcome"] for job in doc["jobs"]} == {"pending"}
    assert all(job["error"] is None for job in doc["jobs"])
    breaker = doc["breaker"]
    assert (breaker["cause"], breaker["code"], breaker["http_status"]) == (
        "api_key",
        "invalid_api_key",
        403,
    )
    assert breaker["jobs_in_a_row"] == 5 and breaker["aois"] >= 2
    assert breaker["api_requests"] == len(puts) and breaker["pending"] == 200
    opened = [line for line in proc.stderr.splitlines() if "circuit breaker open" in line]
    assert len(opened) == 1, proc.stderr
    assert "the API rejects the key (HTTP 403 invalid_api_key for 5 job(s) in a row" in opened[0]
    assert "failed      " not in proc.stderr  # no job printed as failed
    assert "Traceback" not in proc.stderr and "not-the-key" not in proc.stderr + report.read_text()
    print(f"bad key: {len(puts)} requests for 200 jobs in {seconds:.1f} s")

    # Nothing was recorded as failed: the state store holds no failed job (none abandoned later).
    async def states() -> set[JobState]:
        store = await SqliteStore.open(tmp_path / "exports" / ".batch-export")
        try:
            return {record.state for record in await store.all_records()}
        finally:
            await store.close()

    assert JobState.FAILED not in anyio.run(states)


# ------------------------------------------------------------------------------ closed API port


@pytest.mark.anyio
async def test_a_closed_api_port_costs_about_three_jobs_retries(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    started = time.monotonic()
    # 40 jobs, 32 of them in flight at once, each request allowed 7 attempts.
    result = await run(url, fake_specs(40), tmp_path, in_flight=32, rate=20.0)
    seconds = time.monotonic() - started
    attempts = 6 + 1
    # Three probes spend their retries; the others wait at the gate and never send: at 20
    # requests/s the refusal of the first attempt is back long before the second one's turn.
    assert result.api_requests == 3 * attempts
    assert result.api_by_status == {0: result.api_requests}
    assert result.count(Outcome.PENDING) == 40 and result.exit_code == 1
    assert result.breaker is not None
    assert (result.breaker["cause"], result.breaker["code"]) == ("api_unreachable", "network_error")
    print(f"closed port: {result.api_requests} requests, {seconds:.2f} s")


def fake_specs(count: int) -> list[ExportSpec]:
    return [
        ExportSpec(f"a{n}", f"i{n}", (), ("o",), f"n{n}", f"a{n}/i{n}/n{n}.zip")
        for n in range(count)
    ]


# ------------------------------------------------------------------ one AOI's 403 is its own


@pytest.mark.anyio
@pytest.mark.parametrize("by_aoi", [False, True], ids=["taking-turns", "aoi-after-aoi"])
async def test_403_on_one_aoi_of_three_does_not_open_it(
    sandbox: Sandbox, tmp_path: Path, by_aoi: bool
) -> None:
    denied = sandbox.catalog.aois[0].id
    sandbox.config.denied_aois = frozenset({denied})
    jobs = specs(sandbox, 30, by_aoi=by_aoi)
    result = await run(sandbox.api_url, jobs, tmp_path)
    assert result.breaker is None
    by_outcome = {(job.aoi_id == denied, job.outcome, job.error_code) for job in result.jobs}
    assert by_outcome == {
        (True, Outcome.FAILED, "permission_denied"),
        (False, Outcome.DOWNLOADED, None),
    }
    assert result.count(Outcome.FAILED) == 10 and result.exit_code == 1
    assert len(sandbox.requests_to("api", "PUT")) >= 30  # every job was asked for


# ------------------------------------------- a discover: listing that cannot reach the API


def test_an_unreachable_api_with_discover_selectors_ends_the_run(tmp_path: Path) -> None:
    # The listing's attempts took a probe place and kept it: with two jobs out of retries the
    # other jobs waited at the gate for ever and the run never ended (cron: a hung process).
    manifest = tmp_path / "m.yaml"
    lines = [
        "version: 1",
        f'api: {{url: "http://127.0.0.1:{closed_port()}"}}',
        "limits: {retries: 1, rate: 50}",
        "exports:",
        *(f'  - {{aoi_id: "a{n}", insight_id: "b", outputs: ["x"]}}' for n in range(4)),
        "discover:",
        "  - {aois: all, outputs: all}",
    ]
    manifest.write_text("\n".join(lines) + "\n")
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "batch_export", "run", str(manifest)),
            *("--report", str(report), "--progress-interval", "0"),
        ],
        capture_output=True,
        text=True,
        env=clean_env(PIXXEL_API_KEY="k"),
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(report.read_text())
    assert doc["counts"]["pending"] == 4 and doc["counts"]["failed"] == 0
    assert doc["breaker"]["cause"] == "api_unreachable" and doc["breaker"]["jobs_in_a_row"] == 3
    # The listing's 2 attempts, then 3 probe jobs' 2 attempts each; the fourth job sends nothing.
    assert doc["requests"]["api"] == 2 + 3 * 2
    assert [entry["error"]["code"] for entry in doc["discovery"]] == ["network_error"]
    assert "Traceback" not in proc.stderr
