"""A stop (signal, ``--max-runtime``) also ends the discover: listing phase (SPEC §2, §7).

The listings ran to their end before the stop was looked at: SIGINT two seconds into the listing of
300 AOIs was obeyed after all 303 listings (15 s), and ``--max-runtime`` was not even counting yet
(its clock started after discovery), so a nightly listing 10,000 AOIs at 2 requests/s ignored a
5-minute budget and a Kubernetes SIGTERM with its 30 s grace period.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import anyio
import pytest

from batch_export.api import PixxelClient
from batch_export.runner import Outcome, Runner, RunResult
from batch_export.stop import StopController
from batch_export.store import MemoryStore
from batch_export.types import Discovered
from tests.test_breaker_runs import closed_port, fake_specs, settings

pytestmark = pytest.mark.anyio


class Quiet:
    def job_state(self, job: object) -> None: ...
    def job_bytes(self, job: object, count: int) -> None: ...
    def job_finished(self, result: object) -> None: ...


async def run_with(
    tmp_path: Path, discover: object, *, stop: StopController, max_runtime: float | None = None
) -> RunResult:
    runner = Runner(
        replace(settings(f"http://127.0.0.1:{closed_port()}", tmp_path), poll_interval=1.0),
        fake_specs(2),
        api_key="k",
        store=MemoryStore(),
        observer=Quiet(),
        discover=discover,  # type: ignore[arg-type]
        max_runtime=max_runtime,
        stop=stop,
    )
    with anyio.fail_after(10):  # the listings never end by themselves
        return await runner.run()


async def test_a_signal_during_the_listings_stops_them(tmp_path: Path) -> None:
    stop = StopController()
    listed: list[str] = []

    async def slow_listings(client: PixxelClient) -> Discovered:
        listed.append("started")
        stop.request("SIGTERM")  # the signal arrives while the listings go on
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    result = await run_with(tmp_path, slow_listings, stop=stop)
    assert listed == ["started"]
    assert [job.outcome for job in result.jobs] == [Outcome.PENDING, Outcome.PENDING]
    assert result.api_requests == 0 and result.discovery == ()
    assert stop.reason == "SIGTERM" and result.exit_code == 143
    assert result.listings_stopped


async def test_max_runtime_counts_from_the_start_listings_included(tmp_path: Path) -> None:
    stop = StopController()

    async def endless_listings(client: PixxelClient) -> Discovered:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    result = await run_with(tmp_path, endless_listings, stop=stop, max_runtime=0.2)
    assert stop.reason == "max_runtime"
    assert [job.outcome for job in result.jobs] == [Outcome.PENDING, Outcome.PENDING]
    assert result.api_requests == 0 and result.exit_code == 3


async def test_a_time_budget_spent_on_listings_alone_is_exit_3_not_0(tmp_path: Path) -> None:
    # A discover-only manifest: no job is known when the budget ends the listings. "Every job
    # done" (exit 0) would tell cron the night's work is finished; there is work left: exit 3.
    stop = StopController()

    async def endless_listings(client: PixxelClient) -> Discovered:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    runner = Runner(
        settings(f"http://127.0.0.1:{closed_port()}", tmp_path),
        [],
        api_key="k",
        store=MemoryStore(),
        observer=Quiet(),
        discover=endless_listings,
        max_runtime=0.2,
        stop=stop,
    )
    with anyio.fail_after(10):
        result = await runner.run()
    assert result.jobs == () and result.listings_stopped
    assert result.exit_code == 3
