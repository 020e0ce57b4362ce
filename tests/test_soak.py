"""Seeded soak: about 200 small jobs while a few percent of every fault happens at once (issue 4).

The run must end with every job either done, with a file whose sha256 is what the storage served
and whose every zip member passes its CRC, or failed with a reason; never a corrupt final file,
never a job left pending, and a ``.part`` only where it is a byte-exact prefix of the package.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from batch_export.manifest import ExportSpec
from batch_export.runner import JobResult, Outcome, Runner, Settings
from batch_export.sandbox import Fault, FaultScript, Rule, Sandbox, SandboxConfig
from batch_export.sandbox.script import ORIGINS
from batch_export.store import MemoryStore

pytestmark = pytest.mark.anyio

KEY = "soak-key-39f0aa"
JOBS = 200
SEED = 20261129


class Quiet:
    """A RunObserver that keeps nothing."""

    def job_state(self, job: object) -> None:
        pass

    def job_bytes(self, job: object, count: int) -> None:
        pass

    def job_finished(self, result: JobResult) -> None:
        pass


def soak_rules() -> list[Rule]:
    p = 0.025  # per request (per package for ``failed``)
    api = "api"
    storage = "storage"
    rules = [
        Rule(Fault.HTTP_ERROR, api, status=500, probability=p),
        Rule(Fault.HTTP_ERROR, api, status=502, empty_body=True, probability=p),
        Rule(Fault.HTTP_ERROR, api, status=503, probability=p),
        Rule(Fault.HTTP_ERROR, api, status=504, empty_body=True, probability=p),
        # 429s halve the client's rate for everyone: a few, with short waits, keep the soak short.
        Rule(Fault.THROTTLE, api, retry_after=0, probability=p, times=2),
        Rule(Fault.THROTTLE, api, retry_after=0, retry_after_form="date", probability=p, times=1),
        Rule(Fault.INVALID_JSON, api, probability=p),
        Rule(Fault.TRUNCATED_JSON, api, probability=p),
        Rule(Fault.HTML, api, probability=p),
        Rule(Fault.RESET, api, probability=p),
        Rule(Fault.RESET_MID_BODY, api, probability=p),
        Rule(Fault.SHORT_BODY, api, probability=p),
        Rule(Fault.STALL, api, stall_seconds=3.0, probability=p),
        Rule(Fault.STALL_HEADERS, api, stall_seconds=3.0, probability=p),
        Rule(Fault.CONTENT_LENGTH_LONG, api, delta=10, probability=p),
        Rule(Fault.CONTENT_LENGTH_SHORT, api, delta=10, probability=p),
        Rule(Fault.CHUNKED_SHORT, api, probability=p),
        Rule(Fault.FAILED, api, probability=p),
        Rule(Fault.URL_LIFETIME, api, lifetime=3.0, probability=p),
        Rule(Fault.EMPTY_URL, api, probability=p),
        Rule(Fault.HTTP_ERROR, storage, status=500, probability=p),
        Rule(Fault.HTTP_ERROR, storage, status=503, empty_body=True, probability=p),
        Rule(Fault.THROTTLE, storage, retry_after=0, probability=p),
        Rule(Fault.HTML, storage, probability=p),
        Rule(Fault.HTML, storage, content_type="application/octet-stream", probability=p),
        Rule(Fault.RESET, storage, probability=p),
        Rule(Fault.RESET_MID_BODY, storage, probability=p),
        Rule(Fault.SHORT_BODY, storage, probability=p),
        Rule(Fault.STALL, storage, stall_seconds=3.0, probability=p),
        Rule(Fault.STALL_HEADERS, storage, stall_seconds=3.0, probability=p),
        Rule(Fault.CONTENT_LENGTH_LONG, storage, delta=100, probability=p),
        Rule(Fault.CONTENT_LENGTH_SHORT, storage, delta=100, probability=p),
        Rule(Fault.CHUNKED_SHORT, storage, probability=p),
        Rule(Fault.RANGE_WRONG_START, storage, probability=p),
        Rule(Fault.WRONG_ETAG, storage, probability=p),
        Rule(Fault.FLIPPED_BYTE, storage, probability=p),
        Rule(Fault.NO_ETAG, storage, probability=p),
        Rule(Fault.OPAQUE_ETAG, storage, probability=p),
        Rule(Fault.CONTENT_DISPOSITION, storage, probability=p),
        # Only GETs that resume with Range are candidates: give them a real chance.
        Rule(Fault.IGNORE_RANGE, storage, probability=0.3),
        Rule(Fault.RANGE_WRONG_TOTAL, storage, probability=0.3),
    ]
    return rules


def soak_specs(sandbox: Sandbox, count: int) -> list[ExportSpec]:
    """``count`` distinct selections (so no two jobs share a package), round-robin over insights."""
    per_insight = []
    for aoi in sandbox.catalog.aois:
        for ins in aoi.insights:
            selections = [
                (aoi.id, ins.id, inputs, outputs)
                for k in range(1, len(ins.outputs) + 1)
                for outputs in itertools.combinations(ins.outputs, k)
                for j in range(len(ins.inputs) + 1)
                for inputs in itertools.combinations(ins.inputs, j)
            ]
            per_insight.append(selections)
    flat = [s for group in itertools.zip_longest(*per_insight) for s in group if s is not None]
    assert len(flat) >= count
    specs = []
    for n, (aoi_id, ins_id, inputs, outputs) in enumerate(flat[:count]):
        name = f"soak{n:03d}"
        specs.append(
            ExportSpec(aoi_id, ins_id, inputs, outputs, name, f"{aoi_id}/{ins_id}/{name}.zip")
        )
    return specs


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    config = SandboxConfig(keys=(KEY,), asset_size=1500, rate=None, seed=3)
    async with Sandbox(config) as sb:
        yield sb


async def test_soak_every_job_done_or_failed_with_reason_and_no_corrupt_file(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    script = FaultScript(soak_rules(), seed=SEED)
    sandbox.faults.add(script)
    specs = soak_specs(sandbox, JOBS)
    settings = Settings(
        api_url=sandbox.api_url,
        out_dir=tmp_path,
        state_dir=tmp_path / ".batch-export",
        in_flight=64,
        downloads=8,
        rate=2000.0,
        poll_interval=0.01,
        poll_max_interval=0.02,
        poll_timeout=60.0,
        retries=6,
        read_timeout=1.0,  # well above a loaded machine's hiccups, well below a stall
        backoff_base=0.005,
        backoff_cap=0.05,
    )
    runner = Runner(settings, specs, api_key=KEY, store=MemoryStore(), observer=Quiet())
    result = await runner.run()
    sandbox.faults.remove(script)

    # Every kind of fault happened, several times over (the listing-only ones have no place here).
    fired = {f.fault for f in script.fired}
    kinds = {f for f in Fault if ORIGINS[f] != {"listing"}}
    assert fired == kinds, kinds - fired
    assert len(script.fired) > 200

    outcomes = [job.outcome for job in result.jobs]
    assert Outcome.PENDING not in outcomes and Outcome.SKIPPED not in outcomes
    downloaded = [j for j in result.jobs if j.outcome is Outcome.DOWNLOADED]
    failed = [j for j in result.jobs if j.outcome is Outcome.FAILED]
    assert len(downloaded) + len(failed) == JOBS
    assert len(downloaded) >= JOBS * 0.9
    assert result.exit_code == (1 if failed else 0)

    by_path = {str(tmp_path / spec.relpath): spec for spec in specs}
    for job in downloaded:
        spec = by_path[job.path]
        final = Path(job.path)
        data = final.read_bytes()
        served = sandbox.package_bytes_sha256(
            spec.aoi_id, spec.insight_id, spec.inputs, spec.outputs
        )
        assert hashlib.sha256(data).hexdigest() == served == job.sha256, job.path
        with zipfile.ZipFile(final) as archive:
            assert archive.testzip() is None
            names = [f"inputs/{a}.tif" for a in spec.inputs]
            names += [f"outputs/{a}.tif" for a in spec.outputs]
            assert archive.namelist() == names
    for job in failed:
        assert job.error_code and re.fullmatch(r"[a-z0-9_]+", job.error_code), job
        assert job.error_message
        assert not Path(job.path).exists()
        part = Path(job.path + ".part")
        if part.exists():  # kept for the next run's resume: a byte-exact prefix of the package
            spec = by_path[job.path]
            whole = sandbox.package_bytes(spec.aoi_id, spec.insight_id, spec.inputs, spec.outputs)
            assert whole.startswith(part.read_bytes()) and part.stat().st_size > 0

    # Nothing else was written: no server-named file, no stray .part.
    failed_parts = {job.path + ".part" for job in failed}
    for path in tmp_path.rglob("*"):
        if path.is_file() and ".batch-export" not in path.parts:
            assert str(path) in by_path or str(path) in failed_parts, path
