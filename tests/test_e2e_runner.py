"""The runner against the sandbox over real loopback sockets; counts are taken at the sandbox."""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from batch_export.lifecycle import JobState
from batch_export.manifest import ExportSpec
from batch_export.runner import Job, JobResult, Outcome, Runner, RunResult, Settings
from batch_export.sandbox import Sandbox, SandboxConfig
from batch_export.store import MemoryStore

pytestmark = pytest.mark.anyio

KEY = "test-key-4f1c9a7e2b"


class Recorder:
    """A RunObserver that records states and can run a hook on a state."""

    def __init__(self, hook: Callable[[Job], None] | None = None) -> None:
        self.states: list[tuple[str, JobState]] = []
        self.finished: list[JobResult] = []
        self.hook = hook

    def job_state(self, job: Job) -> None:
        self.states.append((job.key, job.record.state))
        if self.hook:
            self.hook(job)

    def job_bytes(self, job: Job, count: int) -> None:
        pass

    def job_finished(self, result: JobResult) -> None:
        self.finished.append(result)


def specs_from(sandbox: Sandbox, count: int, *, aois: int = 3) -> list[ExportSpec]:
    specs = []
    pool = [(a, i) for a in sandbox.catalog.aois[:aois] for i in a.insights]
    for n in range(count):
        # Distinct selections, so that no two jobs share a package at the sandbox.
        aoi, ins = pool[n % len(pool)]
        variants = [
            (ins.inputs[:a], ins.outputs[:b])
            for b in range(1, len(ins.outputs) + 1)
            for a in range(len(ins.inputs) + 1)
        ]
        inputs, outputs = (tuple(v) for v in variants[n // len(pool)])
        name = f"job{n:03d}"
        specs.append(
            ExportSpec(aoi.id, ins.id, inputs, outputs, name, f"{aoi.id}/{ins.id}/{name}.zip")
        )
    return specs


def settings(sandbox: Sandbox, out: Path, **changes: object) -> Settings:
    base = Settings(
        api_url=sandbox.api_url,
        out_dir=out,
        state_dir=out / ".batch-export",
        connections=1,  # one stream, as these tests expect; segments: tests/test_segmented.py
        rate=50.0,
        poll_interval=0.02,
        poll_max_interval=0.05,
        poll_timeout=30.0,
        retries=4,
        read_timeout=5.0,
        backoff_base=0.01,
        backoff_cap=0.05,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


async def run(
    sandbox: Sandbox,
    specs: list[ExportSpec],
    out: Path,
    observer: Recorder | None = None,
    **changes: object,
) -> RunResult:
    runner = Runner(
        settings(sandbox, out, **changes),
        specs,
        api_key=KEY,
        store=MemoryStore(),
        observer=observer or Recorder(),
    )
    return await runner.run()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def served(sandbox: Sandbox, spec: ExportSpec) -> str:
    return sandbox.package_bytes_sha256(spec.aoi_id, spec.insight_id, spec.inputs, spec.outputs)


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    async with Sandbox(SandboxConfig(keys=(KEY,), asset_size=20_000, rate=None)) as sb:
        yield sb


@pytest.mark.parametrize(
    ("vocabulary", "ready_after", "expected_statuses"),
    [
        ("pending/ready", 2, ["pending", "ready"]),
        ("CREATED/IN_PROGRESS/SUCCESS/FAILED", 3, ["CREATED", "IN_PROGRESS", "SUCCESS"]),
    ],
)
async def test_happy_path_both_vocabularies(
    tmp_path: Path, vocabulary: str, ready_after: int, expected_statuses: list[str]
) -> None:
    config = SandboxConfig(
        keys=(KEY,),
        asset_size=10_000,
        vocabulary=vocabulary,
        ready_after_puts=ready_after,
        rate=None,
    )
    async with Sandbox(config) as sandbox:
        specs = specs_from(sandbox, 6)
        result = await run(sandbox, specs, tmp_path)
        assert result.exit_code == 0
        assert [j.outcome for j in result.jobs] == [Outcome.DOWNLOADED] * 6
        puts = sandbox.requests_to("api", "PUT")
        assert len(puts) == 6 * ready_after
        for spec, job in zip(specs, result.jobs, strict=True):
            path = f"/v0/aoi/{spec.aoi_id}/insights/{spec.insight_id}/download"
            mine = [
                r
                for r in puts
                if r.path == path
                and json.loads(r.body)
                == {"inputs": list(spec.inputs), "outputs": list(spec.outputs)}
            ]
            assert len(mine) == ready_after
            assert all(
                r.body
                == json.dumps(
                    {"inputs": list(spec.inputs), "outputs": list(spec.outputs)},
                    separators=(",", ":"),
                ).encode()
                for r in mine
            )
            assert all(r.header("Authorization") == KEY for r in mine)
            assert all(r.header("Content-Type") == "application/json" for r in mine)
            final = tmp_path / spec.relpath
            assert sha256(final) == served(sandbox, spec) == job.sha256
            assert job.bytes == final.stat().st_size
            assert job.polls == ready_after - 1
            assert not (final.parent / (final.name + ".part")).exists()
        assert len(sandbox.requests_to("storage", "GET")) == 6
        assert sandbox.requests_to("storage", "HEAD") == []
        assert result.api_requests == len(puts)


# At the server's own rate, in real time over sockets: no 429. A client twice as fast (429s, then
# every job done) is tests/test_runner_fake_transport.py's bucket test, in virtual time (here it
# waited ~8 s of real Retry-After pauses).
@pytest.mark.parametrize(("client_rate", "expect_429"), [(8.0, False)])
async def test_shared_rate_limit_against_sandbox_bucket(
    tmp_path: Path, client_rate: float, expect_429: bool
) -> None:
    config = SandboxConfig(keys=(KEY,), asset_size=1000, rate=8.0, burst=2)
    async with Sandbox(config) as sandbox:
        specs = specs_from(sandbox, 20)
        result = await run(sandbox, specs, tmp_path, rate=client_rate, in_flight=20)
        statuses = [r.status for r in sandbox.requests_to("api", "PUT")]
        assert result.exit_code == 0
        assert all(sha256(tmp_path / s.relpath) == served(sandbox, s) for s in specs)
        if expect_429:
            assert statuses.count(429) > 0
        else:
            assert statuses.count(429) == 0
        assert statuses.count(200) == 40


async def test_400_and_403_fail_alone(tmp_path: Path) -> None:
    config = SandboxConfig(keys=(KEY,), asset_size=1000, rate=None)
    async with Sandbox(config) as sandbox:
        specs = specs_from(sandbox, 4, aois=2)
        denied = sandbox.catalog.aois[2]
        bad_asset = replace(specs[0], outputs=("no_such_asset",), relpath="bad/asset.zip")
        forbidden = ExportSpec(
            denied.id,
            denied.insights[0].id,
            (),
            (denied.insights[0].outputs[0],),
            "x",
            "denied/x.zip",
        )
        sandbox.config.denied_aois = frozenset({denied.id})
        result = await run(sandbox, [bad_asset, *specs, forbidden], tmp_path)
        assert result.exit_code == 1
        by_path = {Path(j.path).relative_to(tmp_path).as_posix(): j for j in result.jobs}
        assert by_path["bad/asset.zip"].outcome is Outcome.FAILED
        assert by_path["bad/asset.zip"].error_http_status == 400
        assert by_path["denied/x.zip"].outcome is Outcome.FAILED
        assert by_path["denied/x.zip"].error_http_status == 403
        # The server's own error.code reaches the result.
        puts = sandbox.requests_to("api", "PUT")
        for rel, status in (("bad/asset.zip", 400), ("denied/x.zip", 403)):
            envelope = json.loads(await _body_of(sandbox, status))
            assert by_path[rel].error_code == envelope["error"]["code"]
            assert by_path[rel].error_message == envelope["error"]["message"]
        assert sum(1 for r in puts if r.status in (400, 403)) == 2  # failed at once, no retries
        assert len(puts) == 2 + 4 * 2
        for spec in specs:
            assert sha256(tmp_path / spec.relpath) == served(sandbox, spec)
        assert not (tmp_path / "bad").exists() and not (tmp_path / "denied").exists()


async def _body_of(sandbox: Sandbox, status: int) -> bytes:
    # The sandbox records requests, not response bodies: ask it again the same way.
    import aiohttp

    req = next(r for r in sandbox.requests_to("api", "PUT") if r.status == status)
    headers = {"Authorization": KEY, "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session:
        async with session.put(sandbox.api_url + req.path, data=req.body, headers=headers) as resp:
            assert resp.status == status
            return await resp.read()


async def test_storage_rejects_expired_url_then_fresh_put_completes(tmp_path: Path) -> None:
    shift = [0.0]
    config = SandboxConfig(
        keys=(KEY,), asset_size=5000, rate=None, clock=lambda: time.time() + shift[0]
    )
    async with Sandbox(config) as sandbox:
        spec = specs_from(sandbox, 1)[0]

        def age_storage(job: Job) -> None:
            # Once the client holds its URL, the server's clock jumps 2 h: the URL is now expired
            # at the storage, and the client cannot know it in advance.
            if job.record.state is JobState.READY and shift[0] == 0.0:
                shift[0] = 7200.0

        result = await run(sandbox, [spec], tmp_path, Recorder(age_storage))
        assert result.exit_code == 0
        gets = sandbox.requests_to("storage", "GET")
        assert [g.status for g in gets] == [403, 200]
        assert len(sandbox.requests_to("api", "PUT")) == 3  # pending, ready, then one refresh
        assert sha256(tmp_path / spec.relpath) == served(sandbox, spec)


async def test_url_known_expired_is_refreshed_before_download(tmp_path: Path) -> None:
    config = SandboxConfig(keys=(KEY,), asset_size=5000, rate=None, url_lifetime=3600)
    async with Sandbox(config) as sandbox:
        spec = specs_from(sandbox, 1)[0]
        from batch_export.clock import SystemClock

        class Shifted(SystemClock):
            shift = 0.0

            def wall(self) -> float:
                return time.time() + self.shift

        clock = Shifted()

        def jump(job: Job) -> None:
            if job.record.state is JobState.READY and clock.shift == 0.0:
                clock.shift = 3590.0  # 10 s left of a 1-hour URL: known expired (< 30 s)

        runner = Runner(
            settings(sandbox, tmp_path),
            [spec],
            api_key=KEY,
            store=MemoryStore(),
            observer=Recorder(jump),
            clock=clock,
        )
        result = await runner.run()
        assert result.exit_code == 0
        assert len(sandbox.requests_to("api", "PUT")) == 3
        assert [g.status for g in sandbox.requests_to("storage", "GET")] == [200]


async def test_cut_mid_body_resumes_with_range(tmp_path: Path) -> None:
    # aiohttp drops bytes still in its buffer when the connection breaks, so the resume point is
    # at most the cut (never 0 with a cut this far into the body), and never past it.
    config = SandboxConfig(keys=(KEY,), asset_size=5_000_000, rate=None, cut_after_bytes=3_000_000)
    async with Sandbox(config) as sandbox:
        spec = specs_from(sandbox, 1)[0]
        result = await run(sandbox, [spec], tmp_path)
        assert result.exit_code == 0
        gets = sandbox.requests_to("storage", "GET")
        assert len(gets) == 2
        assert gets[0].header("Range") is None
        match = re.fullmatch(r"bytes=(\d+)-", gets[1].header("Range") or "")
        assert match and 0 < int(match.group(1)) <= 3_000_000
        final = tmp_path / spec.relpath
        assert gets[1].header("If-Range") == f'"{hashlib.md5(final.read_bytes()).hexdigest()}"'
        assert gets[1].status == 206
        assert sha256(tmp_path / spec.relpath) == served(sandbox, spec)


async def test_corrupt_package_with_matching_etag_is_caught_by_crc(tmp_path: Path) -> None:
    config = SandboxConfig(keys=(KEY,), asset_size=5000, rate=None)
    async with Sandbox(config) as sandbox:
        specs = specs_from(sandbox, 3)
        sandbox.config.corrupt_insights = frozenset({specs[0].insight_id})
        result = await run(sandbox, specs, tmp_path)
        assert result.exit_code == 1
        bad = result.jobs[0]
        assert bad.outcome is Outcome.FAILED and bad.error_code == "zip_crc"
        final = tmp_path / specs[0].relpath
        assert not final.exists() and not final.with_name(final.name + ".part").exists()
        corrupt_gets = [g for g in sandbox.requests_to("storage", "GET")]
        assert len(corrupt_gets) == 2 + 2  # the corrupt one twice (restart once), others once
        assert len(sandbox.requests_to("api", "PUT")) == 3 * 2  # the restart reuses the URL
        for spec in specs[1:]:
            assert sha256(tmp_path / spec.relpath) == served(sandbox, spec)


async def test_failed_status_and_poll_timeout(tmp_path: Path) -> None:
    config = SandboxConfig(
        keys=(KEY,), asset_size=1000, rate=None, vocabulary="CREATED/IN_PROGRESS/SUCCESS/FAILED"
    )
    async with Sandbox(config) as sandbox:
        specs = specs_from(sandbox, 3)
        sandbox.config.fail_insights = frozenset({specs[0].insight_id})
        result = await run(sandbox, specs[:1], tmp_path)
        assert result.jobs[0].error_code == "package_failed"
        sandbox.config.ready_after_puts = 10_000
        result = await run(sandbox, specs[1:2], tmp_path, poll_timeout=0.3)
        assert result.jobs[0].outcome is Outcome.FAILED
        assert result.jobs[0].error_code == "poll_timeout"


async def test_api_key_reaches_only_the_api(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from batch_export.logs import configure_logging
    from batch_export.progress import LogObserver
    from batch_export.redact import Redactor
    from batch_export.report import build_report, write_report

    config = SandboxConfig(keys=(KEY,), asset_size=3000, rate=None, cut_after_bytes=2000)
    async with Sandbox(config) as sandbox:
        specs = specs_from(sandbox, 3)
        redactor = Redactor([KEY])
        configure_logging(verbosity=1, redactor=redactor)
        runner = Runner(
            settings(sandbox, tmp_path),
            specs,
            api_key=KEY,
            store=MemoryStore(),
            observer=LogObserver(),
            redactor=redactor,
        )
        result = await runner.run()
        assert result.exit_code == 0
        report = build_report(run_id="r", started_at=0, finished_at=1, exit_code=0, result=result)
        write_report(report, tmp_path / ".batch-export" / "reports" / "r.json", redactor=redactor)
        for request in sandbox.requests_to("storage"):
            assert all(KEY not in value for _, value in request.headers)
            assert request.header("Authorization") is None
        captured = capsys.readouterr()
        assert KEY not in captured.err and KEY not in captured.out
        assert "X-Amz-Signature" not in captured.err
        for path in tmp_path.rglob("*"):
            if path.is_file():
                assert KEY.encode() not in path.read_bytes(), path


async def test_symlink_in_output_dir_cannot_redirect_a_package(tmp_path: Path) -> None:
    config = SandboxConfig(keys=(KEY,), asset_size=2000, rate=None)
    async with Sandbox(config) as sandbox:
        specs = specs_from(sandbox, 2, aois=1)
        out = tmp_path / "out"
        outside = tmp_path / "outside"
        outside.mkdir()
        (out / specs[0].aoi_id).mkdir(parents=True)
        (out / specs[0].aoi_id / specs[0].insight_id).symlink_to(outside)
        result = await run(sandbox, specs, out)
        assert result.jobs[0].outcome is Outcome.FAILED
        assert result.jobs[0].error_code == "path_escape"
        assert list(outside.iterdir()) == []
        assert result.jobs[1].outcome is Outcome.DOWNLOADED


async def test_odd_ids_reach_the_api_as_one_encoded_segment_each(tmp_path: Path) -> None:
    config = SandboxConfig(keys=(KEY,), asset_size=1000, rate=None)
    async with Sandbox(config) as sandbox:
        specs = [
            ExportSpec("..", "ins/x", (), ("o",), "n1", "a/n1.zip"),
            ExportSpec(".", "a b%c?d#e", (), ("o",), "n2", "a/n2.zip"),
        ]
        result = await run(sandbox, specs, tmp_path)
        paths = [r.path for r in sandbox.requests_to("api", "PUT")]
        assert paths == [
            "/v0/aoi/%2E%2E/insights/ins%2Fx/download",
            "/v0/aoi/%2E/insights/a%20b%25c%3Fd%23e/download",
        ]
        assert [j.error_http_status for j in result.jobs] == [403, 403]  # unknown to the sandbox
