"""Fault matrix: the real Runner against a misbehaving Sandbox over loopback (issue 4).

Each case scripts one fault (or a pair that only makes sense together) against the first of three
jobs and asserts the exact end state: either a verified file whose sha256 is what the storage
served, or no final file, no ``.part`` and a specific ``error_code``; the two other jobs always
complete. Where the count is meaningful, requests are counted at the sandbox. (One failure keeps
its ``.part`` on purpose: retries spent mid-body leave a byte-exact prefix that the next run
resumes; see ``test_persistent_cuts_keep_a_sound_part_that_the_next_run_resumes``.)

aiohttp re-sends an idempotent request (PUT, GET) once by itself when the connection breaks before
the response headers arrived; the sandbox therefore sees two requests per client attempt for
``reset``. That is the library's documented behaviour (RFC 9112 §9.3.1), not a client retry.
"""

from __future__ import annotations

import errno
import hashlib
import random
import uuid
import zipfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio
import pytest

from batch_export import partfile
from batch_export.manifest import ExportSpec
from batch_export.runner import Job, JobResult, Outcome, Runner, RunResult, Settings
from batch_export.sandbox import (
    Fault,
    FaultHook,
    FaultScript,
    RecordedRequest,
    Rule,
    Sandbox,
    SandboxConfig,
    Selection,
    StorageContext,
    StoragePlan,
)
from batch_export.store import MemoryStore
from tests.fakes import FakeClock

pytestmark = pytest.mark.anyio

KEY = "fault-key-7d1e0c"
RETRIES = 3
#: Generous, so that a loaded machine never turns a slow answer into a retry (counts are exact);
#: the stall faults run with STALL_READ_TIMEOUT, well below their stall_seconds.
READ_TIMEOUT = 5.0
STALL_READ_TIMEOUT = 1.0
STALLS = frozenset({Fault.STALL, Fault.STALL_HEADERS})


class Recorder:
    """A RunObserver that keeps the results."""

    def __init__(self) -> None:
        self.finished: list[JobResult] = []

    def job_state(self, job: Job) -> None:
        pass

    def job_bytes(self, job: Job, count: int) -> None:
        pass

    def job_finished(self, result: JobResult) -> None:
        self.finished.append(result)


def make_specs(sandbox: Sandbox, count: int) -> list[ExportSpec]:
    """``count`` jobs on distinct (AOI, insight) pairs, so rules can target one of them."""
    pairs = [(aoi, ins) for aoi in sandbox.catalog.aois for ins in aoi.insights]
    specs = []
    for n in range(count):
        aoi, ins = pairs[n]
        name = f"job{n:03d}"
        specs.append(
            ExportSpec(
                aoi.id,
                ins.id,
                tuple(ins.inputs[:1]),
                tuple(ins.outputs[:2]),
                name,
                f"{aoi.id}/{ins.id}/{name}.zip",
            )
        )
    return specs


def settings(sandbox: Sandbox, out: Path, **changes: Any) -> Settings:
    base = Settings(
        api_url=sandbox.api_url,
        out_dir=out,
        state_dir=out / ".batch-export",
        connections=1,  # one stream, as these tests expect; segments: tests/test_segmented.py
        rate=1000.0,
        poll_interval=0.01,
        poll_max_interval=0.02,
        poll_timeout=60.0,
        retries=RETRIES,
        read_timeout=READ_TIMEOUT,
        backoff_base=0.005,
        backoff_cap=0.02,
    )
    return replace(base, **changes)


@dataclass
class Run:
    sandbox: Sandbox
    specs: list[ExportSpec]
    out: Path
    result: RunResult
    script: FaultScript
    store: MemoryStore = field(default_factory=MemoryStore)

    def job(self, n: int = 0) -> JobResult:
        return self.result.jobs[n]

    def puts(self, n: int = 0) -> list[RecordedRequest]:
        spec = self.specs[n]
        path = f"/v0/aoi/{spec.aoi_id}/insights/{spec.insight_id}/download"
        return [r for r in self.sandbox.requests_to("api", "PUT") if r.path == path]

    def gets(self, n: int = 0) -> list[RecordedRequest]:
        spec = self.specs[n]
        package = Selection(spec.aoi_id, spec.insight_id, spec.inputs, spec.outputs).package_id
        path = f"/packages/{package}.zip"
        return [r for r in self.sandbox.requests_to("storage", "GET") if r.path == path]

    def served(self, n: int = 0) -> str:
        spec = self.specs[n]
        return self.sandbox.package_bytes_sha256(
            spec.aoi_id, spec.insight_id, spec.inputs, spec.outputs
        )

    def final(self, n: int = 0) -> Path:
        return self.out / self.specs[n].relpath

    def part(self, n: int = 0) -> Path:
        final = self.final(n)
        return final.with_name(final.name + ".part")


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    async with Sandbox(SandboxConfig(keys=(KEY,), asset_size=12_000, rate=None)) as sb:
        yield sb


def target(spec: ExportSpec, **rule: Any) -> Rule:
    """A rule aimed at ``spec``'s AOI and insight only."""
    return Rule(aoi_id=spec.aoi_id, insight_id=spec.insight_id, **rule)


async def run_with(
    sandbox: Sandbox,
    out: Path,
    rules: Callable[[ExportSpec], list[Rule]],
    *,
    jobs: int = 3,
    specs: list[ExportSpec] | None = None,
    store: MemoryStore | None = None,
    clock: Any = None,
    rng: random.Random | None = None,
    **changes: Any,
) -> Run:
    specs = specs or make_specs(sandbox, jobs)
    script = FaultScript(rules(specs[0]), seed=1)
    if any(rule.fault in STALLS for rule in script.rules):
        changes.setdefault("read_timeout", STALL_READ_TIMEOUT)
    sandbox.faults.add(script)
    store = store or MemoryStore()
    try:
        runner = Runner(
            settings(sandbox, out, **changes),
            specs,
            api_key=KEY,
            store=store,
            observer=Recorder(),
            clock=clock,
            rng=rng,
        )
        result = await runner.run()
        with anyio.fail_after(30):
            await sandbox.idle()  # handlers a client gave up on have recorded their status
    finally:
        sandbox.faults.remove(script)
    return Run(sandbox, specs, out, result, script, store)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_done(run: Run, n: int = 0) -> None:
    job = run.job(n)
    assert job.outcome is Outcome.DOWNLOADED, (job.error_code, job.error_message)
    assert sha256(run.final(n)) == run.served(n) == job.sha256
    assert job.bytes == run.final(n).stat().st_size
    with zipfile.ZipFile(run.final(n)) as archive:
        assert archive.testzip() is None
    assert not run.part(n).exists()


def assert_failed(run: Run, code: str, n: int = 0) -> None:
    job = run.job(n)
    assert job.outcome is Outcome.FAILED
    assert job.error_code == code, job.error_message
    assert job.error_message
    assert not run.final(n).exists()
    assert not run.part(n).exists()


def assert_others_done(run: Run) -> None:
    for n in range(1, len(run.specs)):
        assert_done(run, n)
        assert [r.status for r in run.gets(n)] == [200]
        assert [r.status for r in run.puts(n)] == [200, 200]


def statuses(requests: list[RecordedRequest]) -> list[int]:
    return [r.status for r in requests]


# -- the API origin ------------------------------------------------------------------------------

API_ONCE = [
    # (case id, rule parameters, the status the sandbox recorded for the faulted PUT)
    ("500", {"fault": Fault.HTTP_ERROR, "status": 500}, 500),
    ("502", {"fault": Fault.HTTP_ERROR, "status": 502}, 502),
    ("503", {"fault": Fault.HTTP_ERROR, "status": 503}, 503),
    ("504", {"fault": Fault.HTTP_ERROR, "status": 504}, 504),
    ("500-empty", {"fault": Fault.HTTP_ERROR, "status": 500, "empty_body": True}, 500),
    ("502-empty", {"fault": Fault.HTTP_ERROR, "status": 502, "empty_body": True}, 502),
    ("503-empty", {"fault": Fault.HTTP_ERROR, "status": 503, "empty_body": True}, 503),
    ("504-empty", {"fault": Fault.HTTP_ERROR, "status": 504, "empty_body": True}, 504),
    ("429-no-retry-after", {"fault": Fault.THROTTLE}, 429),
    (
        "429-garbage-retry-after",
        {"fault": Fault.THROTTLE, "retry_after": 3, "retry_after_form": "garbage"},
        429,
    ),
    ("invalid-json", {"fault": Fault.INVALID_JSON}, 200),
    ("truncated-json", {"fault": Fault.TRUNCATED_JSON}, 200),
    ("html-page", {"fault": Fault.HTML}, 200),
    ("reset-mid-body", {"fault": Fault.RESET_MID_BODY, "after_bytes": 10}, 200),
    ("short-body", {"fault": Fault.SHORT_BODY, "after_bytes": 10}, 200),
    ("stall", {"fault": Fault.STALL, "after_bytes": 10, "stall_seconds": 10.0}, 200),
    ("stall-before-headers", {"fault": Fault.STALL_HEADERS, "stall_seconds": 10.0}, 0),
    ("content-length-long", {"fault": Fault.CONTENT_LENGTH_LONG, "delta": 50}, 200),
    ("content-length-short", {"fault": Fault.CONTENT_LENGTH_SHORT, "delta": 20}, 200),
    ("chunked-short", {"fault": Fault.CHUNKED_SHORT, "after_bytes": 20}, 200),
]


@pytest.mark.parametrize(("params", "status"), [pytest.param(p, s, id=i) for i, p, s in API_ONCE])
async def test_api_fault_once_costs_exactly_one_put(
    sandbox: Sandbox, tmp_path: Path, params: dict[str, Any], status: int
) -> None:
    run = await run_with(sandbox, tmp_path, lambda s: [target(s, origin="api", nth=(1,), **params)])
    assert run.script.count() == 1
    assert_done(run)
    assert statuses(run.puts()) == [status, 200, 200]
    assert run.puts()[0].fault == params["fault"]
    assert statuses(run.gets()) == [200]
    assert_others_done(run)


async def test_api_reset_before_headers_once(sandbox: Sandbox, tmp_path: Path) -> None:
    run = await run_with(
        sandbox, tmp_path, lambda s: [target(s, origin="api", fault=Fault.RESET, nth=(1,))]
    )
    assert_done(run)
    # 0 = no status line was sent; aiohttp re-sent the PUT at once by itself.
    assert statuses(run.puts()) == [0, 200, 200]
    assert run.result.api_requests == 3 * 2  # the client saw no error
    assert_others_done(run)


@pytest.mark.parametrize(
    ("params", "code", "puts"),
    [
        pytest.param({"fault": Fault.HTTP_ERROR, "status": 503}, "http_503", RETRIES + 1, id="503"),
        pytest.param(
            {"fault": Fault.HTTP_ERROR, "status": 502, "empty_body": True},
            "http_502",
            RETRIES + 1,
            id="502-empty",
        ),
        pytest.param({"fault": Fault.INVALID_JSON}, "bad_response", RETRIES + 1, id="invalid-json"),
        pytest.param({"fault": Fault.HTML}, "html_body", RETRIES + 1, id="html"),
        pytest.param(
            {"fault": Fault.RESET}, "network_error", 2 * (RETRIES + 1), id="reset-before-headers"
        ),
        # A stall every time (RETRIES + 1 real read timeouts here): tests/test_runner_fake_transport.py
        # asserts the same counts in virtual time; the "once" stall cases above prove on this
        # socket that read_timeout cuts a real stall.
    ],
)
async def test_api_fault_every_time_fails_that_job_only(
    sandbox: Sandbox, tmp_path: Path, params: dict[str, Any], code: str, puts: int
) -> None:
    run = await run_with(sandbox, tmp_path, lambda s: [target(s, origin="api", **params)])
    assert_failed(run, code)
    assert len(run.puts()) == puts
    assert run.gets() == []
    assert run.job().attempts == 1
    assert_others_done(run)


@pytest.mark.parametrize(
    ("params", "wait"),
    [
        pytest.param({"retry_after": 7}, 7.0, id="seconds"),
        pytest.param({"retry_after": 7, "retry_after_form": "date"}, 7.0, id="http-date"),
        pytest.param({"retry_after": 100_000}, 900.0, id="seconds-clamped"),
        pytest.param(
            {"retry_after": 100_000, "retry_after_form": "date"}, 900.0, id="date-clamped"
        ),
    ],
)
async def test_api_429_retry_after_is_obeyed_within_0_to_900_s(
    sandbox: Sandbox, tmp_path: Path, params: dict[str, Any], wait: float
) -> None:
    clock = FakeClock()
    run = await run_with(
        sandbox,
        tmp_path,
        lambda s: [Rule(origin="api", fault=Fault.THROTTLE, nth=(1,), **params)],
        jobs=1,
        clock=clock,
        poll_timeout=3600.0,  # a 429 pause counts against poll_timeout (SPEC §4)
    )
    assert_done(run)
    assert statuses(run.puts()) == [429, 200, 200]
    assert run.result.throttled == 1
    # The limiter paused every request for exactly the server's wait (virtual time: no sleeping).
    pauses = [s for s in clock.sleeps if s > 1.0]
    assert pauses == [pytest.approx(wait)]


async def test_api_429_does_not_use_up_retries(sandbox: Sandbox, tmp_path: Path) -> None:
    clock = FakeClock()
    run = await run_with(
        sandbox,
        tmp_path,
        lambda s: [target(s, origin="api", fault=Fault.THROTTLE, retry_after=1, times=3 * RETRIES)],
        clock=clock,
    )
    assert_done(run)
    assert statuses(run.puts()) == [429] * (3 * RETRIES) + [200, 200]
    assert_others_done(run)


async def test_failed_status_for_a_chosen_package(sandbox: Sandbox, tmp_path: Path) -> None:
    run = await run_with(sandbox, tmp_path, lambda s: [target(s, origin="api", fault=Fault.FAILED)])
    assert_failed(run, "package_failed")
    assert run.job().error_http_status == 200
    assert statuses(run.puts()) == [200, 200]  # pending, then failed
    assert run.gets() == []
    assert_others_done(run)


async def test_ready_without_url_once_is_polled_again(sandbox: Sandbox, tmp_path: Path) -> None:
    run = await run_with(
        sandbox, tmp_path, lambda s: [target(s, origin="api", fault=Fault.EMPTY_URL, nth=(1,))]
    )
    assert_done(run)
    assert statuses(run.puts()) == [200, 200, 200]  # pending, ready without URL, ready
    assert run.script.count(Fault.EMPTY_URL) == 1
    assert_others_done(run)


async def test_ready_without_url_three_times_fails(sandbox: Sandbox, tmp_path: Path) -> None:
    run = await run_with(
        sandbox, tmp_path, lambda s: [target(s, origin="api", fault=Fault.EMPTY_URL)]
    )
    assert_failed(run, "ready_without_url")
    assert statuses(run.puts()) == [200] * 4  # pending, then 3 ready answers without a URL
    assert run.gets() == []
    assert_others_done(run)


async def test_url_lifetime_of_a_few_seconds_is_used_not_refreshed(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    # 5 s: "known expired" below 2.5 s left; X-Amz-Date and Date have whole seconds, so the
    # client sees between 4 and 5 s at first, well above that.
    run = await run_with(
        sandbox, tmp_path, lambda s: [Rule(origin="api", fault=Fault.URL_LIFETIME, lifetime=5)]
    )
    assert run.script.count(Fault.URL_LIFETIME) == 3
    for n in range(3):
        assert_done(run, n)
        assert "X-Amz-Expires=5&" in run.gets(n)[0].query
        assert statuses(run.gets(n)) == [200]
        assert statuses(run.puts(n)) == [200, 200]


# -- the storage origin --------------------------------------------------------------------------


@dataclass(frozen=True)
class Once:
    """A storage fault case that must still end in the exact file.

    ``gets``: the statuses of the job's GETs; ``ranges``: their Range headers (``"past-end"``: one
    past the file's size); ``puts``: the job's PUTs (a verification failure restarts from 0
    with the same URL: no extra PUT).
    """

    id: str
    rules: list[dict[str, Any]]
    gets: list[int]
    ranges: list[str | None]
    puts: int = 2


CUT = {"fault": Fault.SHORT_BODY, "after_bytes": 9000, "nth": (1,)}
STORAGE_ONCE = [
    Once(
        "500", [{"fault": Fault.HTTP_ERROR, "status": 500, "nth": (1,)}], [500, 200], [None, None]
    ),
    Once(
        "502-empty",
        [{"fault": Fault.HTTP_ERROR, "status": 502, "empty_body": True, "nth": (1,)}],
        [502, 200],
        [None, None],
    ),
    Once(
        "503", [{"fault": Fault.HTTP_ERROR, "status": 503, "nth": (1,)}], [503, 200], [None, None]
    ),
    Once(
        "504-empty",
        [{"fault": Fault.HTTP_ERROR, "status": 504, "empty_body": True, "nth": (1,)}],
        [504, 200],
        [None, None],
    ),
    Once("html-page", [{"fault": Fault.HTML, "nth": (1,)}], [200, 200], [None, None]),
    # An error page that does not say it is HTML: caught by verification, restarted from 0.
    Once(
        "html-as-octet-stream",
        [{"fault": Fault.HTML, "content_type": "application/octet-stream", "nth": (1,)}],
        [200, 200],
        [None, None],
    ),
    Once("reset-before-headers", [{"fault": Fault.RESET, "nth": (1,)}], [0, 200], [None, None]),
    Once(
        "stall-before-headers",
        [{"fault": Fault.STALL_HEADERS, "stall_seconds": 10.0, "nth": (1,)}],
        [0, 200],
        [None, None],
    ),
    # Sound bytes so far: resumed with Range from where the body broke.
    Once(
        "reset-mid-body",
        [{"fault": Fault.RESET_MID_BODY, "after_bytes": 9000, "nth": (1,)}],
        [200, 206],
        [None, "bytes=9000-"],
    ),
    Once("short-body", [CUT], [200, 206], [None, "bytes=9000-"]),
    Once(
        "stall-mid-body",
        [{"fault": Fault.STALL, "after_bytes": 9000, "stall_seconds": 10.0, "nth": (1,)}],
        [200, 206],
        [None, "bytes=9000-"],
    ),
    # Content-Length longer than the body: the resume asks past the end (416), restart from 0.
    Once(
        "content-length-long",
        [{"fault": Fault.CONTENT_LENGTH_LONG, "delta": 1000, "nth": (1,)}],
        [200, 416, 200],
        [None, "past-end", None],
    ),
    # Content-Length shorter than the body: a "complete" answer whose MD5 is wrong; restart.
    Once(
        "content-length-short",
        [{"fault": Fault.CONTENT_LENGTH_SHORT, "delta": 1000, "nth": (1,)}],
        [200, 200],
        [None, None],
    ),
    # No length at all and a clean early end: only the MD5 ETag/zip check can tell; restart.
    Once(
        "chunked-short",
        [{"fault": Fault.CHUNKED_SHORT, "after_bytes": 9000, "nth": (1,)}],
        [200, 200],
        [None, None],
    ),
    # Range ignored: the 200 restarts the .part from 0, never appended to it.
    Once(
        "range-ignored",
        [CUT, {"fault": Fault.IGNORE_RANGE, "nth": (1,)}],
        [200, 200],
        [None, "bytes=9000-"],
    ),
    Once(
        "range-wrong-start",
        [CUT, {"fault": Fault.RANGE_WRONG_START, "nth": (2,)}],
        [200, 206, 200],
        [None, "bytes=9000-", None],
    ),
    Once(
        "range-wrong-total",
        [CUT, {"fault": Fault.RANGE_WRONG_TOTAL, "nth": (1,)}],
        [200, 206, 200],
        [None, "bytes=9000-", None],
    ),
    Once(
        "206-without-range",
        [{"fault": Fault.RANGE_WRONG_START, "nth": (1,)}],
        [206, 200],
        [None, None],
    ),
    Once(
        "etag-changed-on-resume",
        [CUT, {"fault": Fault.WRONG_ETAG, "nth": (2,)}],
        [200, 206, 200],
        [None, "bytes=9000-", None],
    ),
    Once("wrong-etag", [{"fault": Fault.WRONG_ETAG, "nth": (1,)}], [200, 200], [None, None]),
    # A 206 whose Content-Length disagrees with its own Content-Range: restart from 0.
    Once(
        "range-length-disagrees",
        [CUT, {"fault": Fault.CONTENT_LENGTH_SHORT, "delta": 100, "nth": (2,)}],
        [200, 206, 200],
        [None, "bytes=9000-", None],
    ),
    # Every header true, one byte false: the MD5 over the whole file catches it, also when the
    # bad byte came in a resumed 206; the .part is discarded and fetched again from 0.
    Once("flipped-byte", [{"fault": Fault.FLIPPED_BYTE, "nth": (1,)}], [200, 200], [None, None]),
    Once(
        "flipped-byte-in-resume",
        [CUT, {"fault": Fault.FLIPPED_BYTE, "after_bytes": 10, "nth": (2,)}],
        [200, 206, 200],
        [None, "bytes=9000-", None],
    ),
    # No validator and no length: only the zip structure can tell a short body; restart.
    Once(
        "chunked-short-no-etag",
        [
            {"fault": Fault.CHUNKED_SHORT, "after_bytes": 9000, "nth": (1,)},
            {"fault": Fault.NO_ETAG, "nth": (1,)},
        ],
        [200, 200],
        [None, None],
    ),
    # A strong ETag that is no MD5 (S3 multipart, SSE-KMS): resumes are fine, and a bad byte in
    # the resumed part is left to the zip CRC check (computed from the blocks kept while
    # streaming), which discards the file and fetches it again.
    Once(
        "opaque-etag-resume",
        [{"fault": Fault.OPAQUE_ETAG}, CUT],
        [200, 206],
        [None, "bytes=9000-"],
    ),
    Once(
        "opaque-etag-flipped-byte-in-resume",
        [{"fault": Fault.OPAQUE_ETAG}, CUT, {"fault": Fault.FLIPPED_BYTE, "nth": (2,)}],
        [200, 206, 200],
        [None, "bytes=9000-", None],
    ),
    # No validator: bytes so far cannot be proven to belong to the next answer; restart from 0.
    Once(
        "no-etag-then-cut",
        [CUT, {"fault": Fault.NO_ETAG, "nth": (1,)}],
        [200, 200],
        [None, None],
    ),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in STORAGE_ONCE])
async def test_storage_fault_once_ends_in_the_exact_file(
    sandbox: Sandbox, tmp_path: Path, case: Once
) -> None:
    run = await run_with(
        sandbox, tmp_path, lambda s: [target(s, origin="storage", **r) for r in case.rules]
    )
    assert_done(run)
    gets = run.gets()
    assert statuses(gets) == case.gets
    size = run.final().stat().st_size
    wanted = [f"bytes={size}-" if r == "past-end" else r for r in case.ranges]
    assert [g.header("Range") for g in gets] == wanted
    for get in gets:
        assert get.header("Range") is None or get.header("If-Range") is not None
    assert statuses(run.puts()) == [200] * case.puts
    assert_others_done(run)


async def test_storage_429_retry_after_is_obeyed(sandbox: Sandbox, tmp_path: Path) -> None:
    clock = FakeClock()
    run = await run_with(
        sandbox,
        tmp_path,
        lambda s: [
            target(s, origin="storage", fault=Fault.THROTTLE, retry_after=12, nth=(1,)),
            target(
                s,
                origin="storage",
                fault=Fault.HTTP_ERROR,
                status=503,
                retry_after=30,
                retry_after_form="date",
                nth=(2,),
            ),
        ],
        clock=clock,
    )
    assert_done(run)
    assert statuses(run.gets()) == [429, 503, 200]
    assert [s for s in clock.sleeps if s > 1.0] == [pytest.approx(12.0), pytest.approx(30.0)]
    assert_others_done(run)


STORAGE_ALWAYS = [
    ("503", {"fault": Fault.HTTP_ERROR, "status": 503}, "http_503", RETRIES + 1),
    (
        "504-empty",
        {"fault": Fault.HTTP_ERROR, "status": 504, "empty_body": True},
        "http_504",
        RETRIES + 1,
    ),
    ("html-page", {"fault": Fault.HTML}, "html_body", RETRIES + 1),
    ("reset-before-headers", {"fault": Fault.RESET}, "network_error", 2 * (RETRIES + 1)),
    # Stalls every time, before the headers or the body: in virtual time in
    # tests/test_runner_fake_transport.py; the real stalls are the "once" cases above.
    # Verification failed twice: the .part is discarded each time, the job fails.
    (
        "html-as-octet-stream",
        {"fault": Fault.HTML, "content_type": "application/octet-stream"},
        "not_a_zip",
        2,
    ),
    ("wrong-etag", {"fault": Fault.WRONG_ETAG}, "md5_mismatch", 2),
    (
        "content-length-short",
        {"fault": Fault.CONTENT_LENGTH_SHORT, "delta": 1000},
        "md5_mismatch",
        2,
    ),
    ("chunked-short", {"fault": Fault.CHUNKED_SHORT, "after_bytes": 9000}, "md5_mismatch", 2),
    ("206-without-range", {"fault": Fault.RANGE_WRONG_START}, "bad_range", RETRIES + 1),
]


@pytest.mark.parametrize(
    ("params", "code", "gets"), [pytest.param(p, c, g, id=i) for i, p, c, g in STORAGE_ALWAYS]
)
async def test_storage_fault_every_time_fails_that_job_only(
    sandbox: Sandbox, tmp_path: Path, params: dict[str, Any], code: str, gets: int
) -> None:
    run = await run_with(sandbox, tmp_path, lambda s: [target(s, origin="storage", **params)])
    assert_failed(run, code)
    assert len(run.gets()) == gets
    assert_others_done(run)


async def test_persistent_cuts_keep_a_sound_part_that_the_next_run_resumes(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """Retries spent mid-body: the job fails, its .part is a byte-exact prefix; next run resumes."""
    store = MemoryStore()
    run = await run_with(
        sandbox,
        tmp_path,
        lambda s: [target(s, origin="storage", fault=Fault.RESET_MID_BODY, after_bytes=2000)],
        store=store,
    )
    job = run.job()
    assert job.outcome is Outcome.FAILED and job.error_code == "truncated"
    assert not run.final().exists()
    assert [g.header("Range") for g in run.gets()] == [None] + [
        f"bytes={2000 * k}-" for k in range(1, RETRIES + 1)
    ]
    assert_others_done(run)
    part = run.part().read_bytes()
    spec = run.specs[0]
    served = sandbox.package_bytes(spec.aoi_id, spec.insight_id, spec.inputs, spec.outputs)
    assert part == served[: 2000 * (RETRIES + 1)]

    sandbox.requests.clear()
    again = await run_with(sandbox, tmp_path, lambda s: [], specs=run.specs, store=store)
    assert_done(again)
    assert [g.header("Range") for g in again.gets()] == [f"bytes={len(part)}-"]
    assert statuses(again.gets()) == [206]


async def test_server_named_file_is_never_used_as_a_path(sandbox: Sandbox, tmp_path: Path) -> None:
    out = tmp_path / "out"
    decoy = f"evil-{uuid.uuid4().hex}.zip"
    run = await run_with(
        sandbox,
        out,
        lambda s: [
            Rule(origin="storage", fault=Fault.CONTENT_DISPOSITION, filename=f"../../{decoy}"),
            Rule(
                origin="storage",
                fault=Fault.CONTENT_DISPOSITION,
                filename=f"/tmp/{decoy}",
                nth=(2,),
            ),
        ],
    )
    for n in range(3):
        assert_done(run, n)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert [f for f in files if not f.startswith(".batch-export/")] == sorted(
        s.relpath for s in run.specs
    )
    assert not any(p.name == decoy for p in tmp_path.rglob("*"))
    assert not Path("/tmp", decoy).exists()


# -- signed URLs that expire between a broken connection and its resume ---------------------------


class StorageClockJump(FaultHook):
    """After the first (cut) GET of each package, the storage's clock jumps past every URL."""

    def __init__(self, shift: list[float]) -> None:
        self.shift = shift

    def storage_plan(self, ctx: StorageContext, plan: StoragePlan) -> None:
        if ctx.attempt == 1:
            self.shift[0] += 7200.0


async def test_url_expired_at_the_storage_between_break_and_resume(tmp_path: Path) -> None:
    import time

    shift = [0.0]
    config = SandboxConfig(
        keys=(KEY,), asset_size=12_000, rate=None, clock=lambda: time.time() + shift[0]
    )
    async with Sandbox(config) as sandbox:
        sandbox.faults.add(StorageClockJump(shift))
        run = await run_with(
            sandbox,
            tmp_path,
            lambda s: [Rule(origin="storage", fault=Fault.SHORT_BODY, after_bytes=9000, nth=(1,))],
            jobs=1,
        )
        assert_done(run)
        gets = run.gets()
        assert statuses(gets) == [200, 403, 206]
        assert b"Request has expired" in gets[1].response_body
        assert [g.header("Range") for g in gets] == [None, "bytes=9000-", "bytes=9000-"]
        assert gets[2].query != gets[1].query  # a fresh signed URL from a fresh PUT
        assert statuses(run.puts()) == [200, 200, 200]


async def test_url_expired_when_issued_is_refreshed_three_times_then_fails(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    run = await run_with(
        sandbox, tmp_path, lambda s: [target(s, origin="api", fault=Fault.URL_LIFETIME, lifetime=0)]
    )
    assert_failed(run, "url_rejected")
    assert run.job().error_http_status == 403
    # pending, ready, then 3 refreshes (each URL known expired); the last one is tried anyway.
    assert statuses(run.puts()) == [200] * 5
    assert statuses(run.gets()) == [403]
    assert_others_done(run)


async def test_storage_refusing_every_url_costs_three_refreshes_then_fails(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    run = await run_with(
        sandbox,
        tmp_path,
        lambda s: [target(s, origin="storage", fault=Fault.HTTP_ERROR, status=403)],
    )
    assert_failed(run, "url_rejected")
    assert statuses(run.gets()) == [403] * 4
    assert statuses(run.puts()) == [200] * 5
    assert_others_done(run)


class MaxJitter(random.Random):
    """Backoff and poll jitter at their upper bound: waits are exact."""

    def uniform(self, a: float, b: float) -> float:
        return b


async def test_url_known_expired_after_backoff_is_refreshed_before_resume(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    clock = FakeClock()
    run = await run_with(
        sandbox,
        tmp_path,
        lambda s: [
            Rule(origin="api", fault=Fault.URL_LIFETIME, lifetime=20),
            # The body breaks after 9000 bytes (a cut, not a stall: no real read timeout to wait).
            Rule(origin="storage", fault=Fault.SHORT_BODY, after_bytes=9000, nth=(1,)),
        ],
        jobs=1,
        clock=clock,
        rng=MaxJitter(),
        backoff_base=15.0,
        backoff_cap=15.0,
    )
    seen = [(r.origin, r.status, r.fault, r.header("Range")) for r in run.sandbox.requests]
    assert run.job().outcome is Outcome.DOWNLOADED, (run.job(), seen, clock.sleeps)
    assert_done(run)
    gets = run.gets()
    # A 20-second URL counts as expired with less than 10 s left (min(30 s, half its life)):
    # after the 15-second backoff the client knows it, and asks for a fresh one (no 403 needed).
    # (Virtual time; X-Amz-Date and Date have whole seconds, hence the wide margins.)
    assert statuses(gets) == [200, 206], (seen, clock.sleeps)
    assert gets[1].header("Range") == "bytes=9000-"
    assert statuses(run.puts()) == [200, 200, 200], (seen, clock.sleeps)  # pending, ready, fresh
    assert 15.0 in clock.sleeps


# -- the local disk ------------------------------------------------------------------------------


async def test_disk_full_fails_the_job_removes_the_part_and_stops_new_downloads(
    sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = partfile.PartSink.write
    seen: list[Path] = []

    def write(self: Any, data: bytes) -> None:
        original(self, data[:100])  # some bytes land, then the disk is full
        seen.append(self.path)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(partfile.PartSink, "write", write)
    run = await run_with(sandbox, tmp_path, lambda s: [], jobs=4, downloads=1)
    failed = [j for j in run.result.jobs if j.outcome is Outcome.FAILED]
    assert len(failed) == 1
    assert failed[0].error_code == "disk_full"
    assert "No space left" in (failed[0].error_message or "")
    assert [j.outcome for j in run.result.jobs].count(Outcome.PENDING) == 3
    assert run.result.exit_code == 1
    assert len(run.sandbox.requests_to("storage", "GET")) == 1  # no download started after it
    assert len(seen) == 1 and seen[0].name.endswith(".zip.part")
    assert [p for p in tmp_path.rglob("*") if p.suffix in (".part", ".zip")] == []


async def test_unwritable_output_dir_fails_clearly_and_stops_new_downloads(
    sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refusing_open(dir_fd: int, name: str, *, keep: bool) -> Any:
        raise OSError(errno.EROFS, "Read-only file system", name)

    monkeypatch.setattr(partfile, "open_file", refusing_open)
    run = await run_with(sandbox, tmp_path, lambda s: [], jobs=3, downloads=1)
    outcomes = [j.outcome for j in run.result.jobs]
    assert outcomes.count(Outcome.FAILED) == 1 and outcomes.count(Outcome.PENDING) == 2
    failed = next(j for j in run.result.jobs if j.outcome is Outcome.FAILED)
    assert failed.error_code == "read_only_output"
    assert "Read-only file system" in (failed.error_message or "")
    assert [p for p in tmp_path.rglob("*") if p.suffix in (".part", ".zip")] == []


async def test_unwritable_at_commit_also_removes_the_part_and_stops_new_downloads(
    sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    real_replace = os.replace

    def refusing_replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if str(src).endswith(".zip.part"):
            raise OSError(errno.EROFS, "Read-only file system", str(dst))
        real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", refusing_replace)
    run = await run_with(sandbox, tmp_path, lambda s: [], jobs=3, downloads=1)
    outcomes = [j.outcome for j in run.result.jobs]
    assert outcomes.count(Outcome.FAILED) == 1 and outcomes.count(Outcome.PENDING) == 2
    failed = next(j for j in run.result.jobs if j.outcome is Outcome.FAILED)
    assert failed.error_code == "read_only_output"
    assert [p for p in tmp_path.rglob("*") if p.suffix in (".part", ".zip")] == []


@pytest.mark.skipif(
    hasattr(__import__("os"), "geteuid") and __import__("os").geteuid() == 0,
    reason="root ignores permissions",
)
async def test_read_only_output_dir_by_permissions(sandbox: Sandbox, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        run = await run_with(sandbox, out, lambda s: [], jobs=3, downloads=1)
    finally:
        out.chmod(0o755)
    outcomes = [j.outcome for j in run.result.jobs]
    assert outcomes.count(Outcome.FAILED) == 1 and outcomes.count(Outcome.PENDING) == 2
    assert (
        next(j for j in run.result.jobs if j.outcome is Outcome.FAILED).error_code
        == "permission_denied"
    )


# -- the fault script itself ---------------------------------------------------------------------


def test_script_from_yaml_and_json(tmp_path: Path) -> None:
    yaml_file = tmp_path / "faults.yaml"
    yaml_file.write_text(
        "seed: 5\n"
        "rules:\n"
        "  - {origin: api, fault: http_error, status: 502, empty_body: true, nth: 1}\n"
        "  - {origin: storage, fault: stall, after_bytes: 100, stall_seconds: 2, probability: 0.5}\n"
        "  - {origin: api, fault: throttle, retry_after: 3, retry_after_form: date, every: 4, times: 2}\n"
    )
    script = FaultScript.load(yaml_file)
    assert script.seed == 5
    assert script.rules[0] == Rule(Fault.HTTP_ERROR, "api", status=502, empty_body=True, nth=(1,))
    assert script.rules[1].probability == 0.5 and script.rules[1].stall_seconds == 2.0
    assert script.rules[2].every == 4 and script.rules[2].times == 2
    json_file = tmp_path / "faults.json"
    json_file.write_text(
        '{"rules": [{"origin": "storage", "fault": "ignore_range", "nth": [2, 3]}]}'
    )
    assert FaultScript.load(json_file).rules == (Rule(Fault.IGNORE_RANGE, "storage", nth=(2, 3)),)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rules: [{origin: api, fault: nope}]", "rules[0]: unknown fault 'nope'"),
        (
            "rules: [{origin: storage, fault: invalid_json}]",
            "rules[0]: fault invalid_json is for api",
        ),
        ("rules: [{origin: api, fault: reset, nth: 0}]", "rules[0]: nth counts from 1"),
        (
            "rules: [{origin: api, fault: reset, probabilty: 0.1}]",
            "rules[0]: unknown key(s): probabilty",
        ),
        ("rules: [{origin: api, fault: reset, probability: 2}]", "rules[0]: probability must be"),
        ("rules: [{origin: api, fault: http_error, status: 200}]", "rules[0]: status must be"),
        ("rules: [{fault: reset}]", "rules[0]: 'origin' is required"),
        ("rules: [{on: api, fault: reset}]", "rules[0]: unknown key(s): True ('on' is 'origin')"),
        ("rules: {origin: api}", "'rules' must be a list"),
        ("seed: x\nrules: []", "seed must be a whole number"),
        ("rules: [", ":1:9: not valid YAML: expected the node content"),
    ],
)
def test_script_errors_name_the_rule(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "f.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=None) as info:
        FaultScript.load(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_probability_is_decided_per_request_key_not_by_arrival_order() -> None:
    rule = Rule(Fault.RESET, "storage", probability=0.3)
    one, two = FaultScript([rule], seed=9), FaultScript([rule], seed=9)
    keys = [f"pkg{n}" for n in range(200)]
    a = [one._picks(0, rule, k) for k in keys]
    b = [two._picks(0, rule, k) for k in reversed(keys)][::-1]
    assert a == b
    assert 40 <= sum(a) <= 80  # ~30 % of 200


def test_sandbox_cli_help_documents_faults() -> None:
    from click.testing import CliRunner

    from batch_export.sandbox.cli import sandbox_command

    result = CliRunner().invoke(sandbox_command, ["--help"])
    assert result.exit_code == 0
    assert "--faults FILE" in result.output
    for fault in ("http_error", "throttle", "reset_mid_body", "ignore_range", "url_lifetime"):
        assert fault in result.output


def test_sandbox_cli_rejects_a_bad_fault_script(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from batch_export.sandbox.cli import sandbox_command

    path = tmp_path / "bad.yaml"
    path.write_text("rules: [{origin: api, fault: nope}]")
    result = CliRunner().invoke(sandbox_command, ["--port", "0", "--faults", str(path)])
    assert result.exit_code == 2
    assert "unknown fault 'nope'" in result.output


def test_sandbox_command_serves_the_fault_script(tmp_path: Path) -> None:
    """`batch-export sandbox --faults FILE`: an operator's rehearsal against a misbehaving API."""
    import json
    import re
    import signal
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    from batch_export.sandbox import Catalog

    aoi = Catalog.generate(0).aois[0]
    insight = aoi.insights[0]
    script = tmp_path / "faults.yaml"
    script.write_text(
        "seed: 3\n"
        "rules:\n"
        "  - {origin: api, fault: http_error, status: 503, empty_body: true, nth: [1]}\n"
        "  - {origin: api, fault: throttle, retry_after: 30, retry_after_form: date, nth: [2]}\n"
    )
    code = "from batch_export.sandbox.cli import sandbox_command; sandbox_command()"
    process = subprocess.Popen(
        [
            *(sys.executable, "-c", code),
            *("--port", "0", "--rate", "0", "--no-access-log", "--faults", str(script)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("Serving until"):
                break
        output = "".join(lines)
        match = re.search(r"API URL:\s+(\S+)", output)
        assert match, output
        assert f"faults:      2 rule(s) from {script} (seed 3)" in output
        request = urllib.request.Request(
            f"{match.group(1)}/v0/aoi/{aoi.id}/insights/{insight.id}/download",
            data=json.dumps({"inputs": [], "outputs": [insight.outputs[0]]}).encode(),
            method="PUT",
            headers={"Authorization": "sandbox-demo-key", "Content-Type": "application/json"},
        )
        answers = []
        for _ in range(3):
            try:
                with urllib.request.urlopen(request) as response:
                    answers.append((response.status, response.read(), None))
            except urllib.error.HTTPError as error:
                answers.append((error.code, error.read(), error.headers))
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert [a[0] for a in answers] == [503, 429, 200]
    assert answers[0][1] == b""
    throttled = answers[1][2]
    assert throttled is not None
    from email.utils import parsedate_to_datetime

    wait = parsedate_to_datetime(throttled["Retry-After"]) - parsedate_to_datetime(
        throttled["Date"]
    )
    assert wait.total_seconds() == 30
    assert json.loads(answers[2][1])["status"] == "pending"


# -- the wire: a reset is a real TCP RST, a short body a clean FIN ---------------------------------


async def _raw_get(sandbox: Sandbox, url: str) -> tuple[bytes, BaseException | None]:
    """GET ``url`` over a bare socket; return the bytes received and how the connection ended."""
    import asyncio
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    target_path = parts.path + (f"?{parts.query}" if parts.query else "")
    writer.write(f"GET {target_path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    received = b""
    ended: BaseException | None = None
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), 5)
            if not chunk:
                break
            received += chunk
    except ConnectionResetError as exc:
        ended = exc
    writer.close()
    return received, ended


@pytest.mark.parametrize(
    ("fault", "reset", "body_bytes"),
    [
        (Fault.RESET, True, None),
        (Fault.RESET_MID_BODY, True, 3000),
        (Fault.SHORT_BODY, False, 3000),
    ],
)
async def test_resets_are_real_rsts_and_short_bodies_clean_closes(
    sandbox: Sandbox, tmp_path: Path, fault: Fault, reset: bool, body_bytes: int | None
) -> None:
    spec = make_specs(sandbox, 1)[0]
    run = await run_with(sandbox, tmp_path, lambda s: [], specs=[spec])
    url = f"{sandbox.storage_url}{run.gets()[0].path}?{run.gets()[0].query}"
    script = FaultScript([Rule(fault, "storage", after_bytes=3000)])
    sandbox.faults.add(script)
    received, ended = await _raw_get(sandbox, url)
    assert isinstance(ended, ConnectionResetError) is reset
    if body_bytes is None:
        assert received == b""
    else:
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert len(body) == body_bytes
