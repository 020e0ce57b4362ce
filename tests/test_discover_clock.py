"""Discovery's listing deadline is on the run's injected clock, the one the API client compares it
with (``discover`` and the run's discover hook): a fake clock far from the real one still gives
exactly ``poll_timeout`` of fake time to wait out 429s."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from batch_export import discover_command
from batch_export.api import PixxelClient
from batch_export.config import RunOptions, resolve_settings
from batch_export.http import open_sessions
from batch_export.manifest import parse_manifest
from batch_export.ratelimit import RateLimiter
from batch_export.resolve import run_hook
from batch_export.sandbox import Catalog, Fault, FaultScript, Rule, Sandbox, SandboxConfig
from tests.fakes import FakeClock, cli_in_process, sandbox_thread

KEY = "clock-key-51c7"
AOI_ID = Catalog.generate(0, 3).aois[0].id
#: Every insight listing answers 429 + Retry-After: 100 s; poll_timeout is 250 s, so the listing is
#: sent at t0, t0 + 100 and t0 + 200, and the pause after the third 429 ends past the deadline.
THROTTLE = Rule(Fault.THROTTLE, "listing", route="insights", retry_after=100.0)


def manifest_text(api_url: str) -> str:
    return f"""version: 1
api: {{url: "{api_url}"}}
limits: {{rate: 500, poll_timeout: 250s, retries: 0}}
output: {{dir: out}}
discover:
  - aois: ["{AOI_ID}"]
    outputs: all
"""


def far_clock() -> FakeClock:
    """A fake clock 100,000 s ahead of the real monotonic one (whole seconds: sums are exact)."""
    start = float(int(time.monotonic()) + 100_000)
    return FakeClock(start=start, wall_offset=time.time() - start)


def config() -> SandboxConfig:
    return SandboxConfig(keys=(KEY,), rate=None, asset_size=100, aoi_count=3)


@pytest.fixture
def threaded_sandbox() -> Iterator[Sandbox]:
    with sandbox_thread(config()) as sb:
        yield sb


def test_discover_waits_out_429s_for_poll_timeout_of_its_own_clock(
    threaded_sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(manifest_text(threaded_sandbox.api_url))
    threaded_sandbox.faults.add(FaultScript([THROTTLE]))
    clock = far_clock()
    start = clock.now
    monkeypatch.setattr(discover_command, "SystemClock", lambda: clock)
    shown = cli_in_process(
        ["discover", str(manifest), "--json"], env={"PIXXEL_API_KEY": KEY}, cwd=tmp_path
    )
    assert shown.returncode == 1, shown.stderr
    [aoi] = json.loads(shown.stdout)["selectors"][0]["aois"]
    assert (aoi["aoi_id"], aoi["error"]["code"]) == (AOI_ID, "poll_timeout")
    listings = [r for r in threaded_sandbox.requests_to("api", "GET") if "/insights" in r.path]
    assert len(listings) == 3  # t0, t0 + 100, t0 + 200 on the fake clock
    assert clock.sleeps == [100.0, 100.0] and clock.now - start == 200.0


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    async with Sandbox(config()) as sb:
        yield sb


@pytest.mark.anyio
async def test_the_run_discover_hook_deadline_is_on_the_clients_clock(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(manifest_text(sandbox.api_url))
    manifest = parse_manifest(path.read_text(), path=path)
    settings = resolve_settings(manifest, RunOptions())
    sandbox.faults.add(FaultScript([THROTTLE]))
    clock = far_clock()
    start = clock.now
    async with open_sessions(api_connections=1, storage_connections=1, environ={}) as sessions:
        client = PixxelClient(
            sessions.api,
            base_url=sandbox.api_url,
            api_key=KEY,
            limiter=RateLimiter(settings.rate, clock=clock),
            clock=clock,
            retries=0,
            read_timeout=5.0,
        )
        found = await run_hook(manifest, settings, explicit=())(client)
    [entry] = found.entries
    assert entry.aoi_id == AOI_ID
    assert entry.error is not None and entry.error.code == "poll_timeout"
    listings = [r for r in sandbox.requests_to("api", "GET") if "/insights" in r.path]
    assert len(listings) == 3
    assert clock.sleeps == [100.0, 100.0] and clock.now - start == 200.0
