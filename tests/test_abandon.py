"""Abandoned jobs (SPEC §9): the machine's rows, then whole nightly runs against the sandbox."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from batch_export.lifecycle import (
    Aborted,
    Finish,
    JobValue,
    Loaded,
    RequestFailed,
    RequestSlotFree,
    Rules,
    SendPut,
    step,
    uncounted,
)
from batch_export.sandbox import Sandbox, SandboxConfig
from batch_export.types import JobRecord, JobState, Outcome, Problem
from tests.fakes import clean_env, cli_in_process, sandbox_thread

UNKNOWN = Problem("unknown_asset", "asset 'x' is not known", 400)


def fresh() -> JobValue:
    return JobValue(JobRecord("k", "a", "i", "n", "a/i/n.zip"))


def one_run(
    value: JobValue, problem: Problem, rules: Rules, *, aborted: bool = False
) -> tuple[JobValue, tuple[object, ...]]:
    """A run of the job that fails with ``problem``: load, request, the failure."""
    value, _ = step(value, Loaded(file_intact=False, force=False), rules)
    if aborted:  # discovered, but it cannot run (no_listed_assets, path_clash)
        return step(value, Aborted(problem), rules)
    value, actions = step(value, RequestSlotFree(now=0.0), rules)
    assert isinstance(actions[0], SendPut)
    return step(value, RequestFailed(problem), rules)


def test_the_same_permanent_error_in_three_runs_abandons_the_job() -> None:
    rules = Rules()  # give_up_after 3 by default
    value = fresh()
    for run in (1, 2):
        value, actions = one_run(value, UNKNOWN, rules)
        assert (value.state, value.record.failure_runs) == (JobState.FAILED, run)
        assert actions == (Finish(Outcome.FAILED),)
    value, actions = one_run(value, UNKNOWN, rules)
    assert (value.state, value.record.failure_runs) == (JobState.ABANDONED, 3)
    assert actions == (Finish(Outcome.ABANDONED),)
    assert (value.record.error_code, value.record.error_http_status) == ("unknown_asset", 400)
    # The next run does not request it ...
    assert step(value, Loaded(file_intact=False, force=False), rules) == (
        value,
        (Finish(Outcome.ABANDONED),),
    )
    # ... unless told to: then one more such failure abandons it again at once.
    retry = Rules(retry_abandoned=True)
    loaded, actions = step(value, Loaded(file_intact=False, force=False), retry)
    assert (loaded.state, actions) == (JobState.QUEUED, ())
    again, actions = one_run(value, UNKNOWN, retry)
    assert (again.state, again.record.failure_runs) == (JobState.ABANDONED, 4)


@pytest.mark.parametrize(
    ("between", "runs_after"),
    [
        (Problem("permission_denied", "no", 403), 1),  # another permanent code: counts from 1
        (Problem("http_503", "API answered HTTP 503 (after 7 attempts)", 503), 0),  # retryable
        (Problem("network_error", "refused", None), 0),
        (Problem("rate", "throttled", 429), 0),
        (Problem("timeout", "slow", 408), 0),
    ],
)
def test_another_failure_between_starts_the_count_again(between: Problem, runs_after: int) -> None:
    rules = Rules()
    value, _ = one_run(fresh(), UNKNOWN, rules)
    value, _ = one_run(value, UNKNOWN, rules)
    value, _ = one_run(value, between, rules)
    assert (value.state, value.record.failure_runs) == (JobState.FAILED, runs_after)
    value, _ = one_run(value, UNKNOWN, rules)
    assert (value.state, value.record.failure_runs) == (JobState.FAILED, 1)


@pytest.mark.parametrize("code", ["no_listed_assets", "path_clash"])
def test_discovery_failures_count_too(code: str) -> None:
    rules = Rules(give_up_after=2)
    problem = Problem(code, "m")
    value, actions = one_run(fresh(), problem, rules, aborted=True)
    assert (value.state, actions) == (JobState.FAILED, (Finish(Outcome.FAILED),))
    value, actions = one_run(value, problem, rules, aborted=True)
    assert (value.state, actions) == (JobState.ABANDONED, (Finish(Outcome.ABANDONED),))


def test_an_uncounted_failure_takes_the_run_back() -> None:
    rules = Rules(give_up_after=3)
    forbidden = Problem("invalid_api_key", "no", 403)
    value = fresh()
    for runs in (1, 2):
        value, _ = one_run(value, forbidden, rules)
        assert (value.state, value.record.failure_runs) == (JobState.FAILED, runs)
    third, actions = one_run(value, forbidden, rules)
    assert third.state is JobState.ABANDONED and actions[-1] == Finish(Outcome.ABANDONED)
    revised = uncounted(third)  # the key was in doubt in that run: it did not count
    assert (revised.state, revised.record.failure_runs) == (JobState.FAILED, 2)
    assert revised.record.error_code == "invalid_api_key"
    assert uncounted(fresh()) == fresh()  # not failed: nothing to take back
    once, _ = one_run(fresh(), forbidden, rules)
    assert uncounted(uncounted(once)).record.failure_runs == 0  # never below 0


def test_a_bug_never_abandons_a_job() -> None:
    rules = Rules(give_up_after=1)
    value, _ = one_run(fresh(), Problem("internal_error", "bug"), rules, aborted=True)
    assert (value.state, value.record.failure_runs) == (JobState.FAILED, 0)


def test_give_up_after_zero_never_abandons() -> None:
    rules = Rules(give_up_after=0)
    value = fresh()
    for _ in range(5):
        value, _ = one_run(value, UNKNOWN, rules)
    assert value.state is JobState.FAILED


# ------------------------------------------------------------------------- nightly runs (CLI)

KEY = "abandon-key-6b1f"


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    with sandbox_thread(SandboxConfig(keys=(KEY,), asset_size=3000, rate=None)) as sb:
        yield sb


def nightly(
    manifest: Path, sandbox: Sandbox, *args: str, key: str = KEY
) -> tuple[int, str, dict[str, object]]:
    report = manifest.parent / "report.json"
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "batch_export", "run", str(manifest)),
            *("--api-url", sandbox.api_url, "--report", str(report), "--progress-interval", "0"),
            *args,
        ],
        capture_output=True,
        text=True,
        env=clean_env(PIXXEL_API_KEY=key),
        timeout=120,
        check=False,
    )
    assert "Traceback" not in proc.stderr
    return proc.returncode, proc.stderr, json.loads(report.read_text())


def stored_failure_runs(manifest: Path) -> list[tuple[str, str, int]]:
    """(insight_id, state, failure_runs) of the manifest's failed/abandoned jobs, from ``status``.

    In this process (tests/fakes.py): a read of the store, no interpreter start each night.
    """
    args = ["status", str(manifest), "--json", "--failed"]
    status = cli_in_process(args, env={}, cwd=manifest.parent)
    return [
        (j["insight_id"], j["state"], j["failure_runs"]) for j in json.loads(status.stdout)["jobs"]
    ]


def test_a_nightly_job_that_cannot_work_stops_nagging(sandbox: Sandbox, tmp_path: Path) -> None:
    aoi = sandbox.catalog.aois[0]
    good, bad = aoi.insights[0], aoi.insights[1]
    text = textwrap.dedent(
        f"""\
        version: 1
        limits: {{poll_interval: 0.05s, rate: 50}}
        exports:
          - {{aoi_id: "{aoi.id}", insight_id: "{good.id}", outputs: ["{good.outputs[0]}"]}}
          - {{aoi_id: "{aoi.id}", insight_id: "{bad.id}", outputs: ["no-such-asset"]}}
        """
    )
    manifest = tmp_path / "m.yaml"
    manifest.write_text(text)

    def puts_for_bad() -> int:
        return sum(1 for r in sandbox.requests_to("api", "PUT") if f"/insights/{bad.id}/" in r.path)

    for night in (1, 2):
        code, _, doc = nightly(manifest, sandbox)
        assert code == 1
        assert [job["outcome"] for job in doc["jobs"]] == [
            "downloaded" if night == 1 else "skipped",
            "failed",
        ]
    assert puts_for_bad() == 2
    error = doc["jobs"][1]["error"]
    assert error["http_status"] == 400

    # Night 3: the third failure with the same code abandons it; abandoned alone does not fail.
    code, stderr, doc = nightly(manifest, sandbox)
    assert code == 0
    assert doc["counts"] == {
        "total": 2,
        "downloaded": 0,
        "skipped": 1,
        "failed": 0,
        "pending": 0,
        "abandoned": 1,
    }
    entry = doc["jobs"][1]
    assert entry["outcome"] == "abandoned" and entry["error"] == error
    assert "0 pending, 1 abandoned in" in stderr
    abandoned = [line for line in stderr.splitlines() if "abandoned   " in line]
    assert len(abandoned) == 1 and " WARNING " in abandoned[0]
    assert puts_for_bad() == 3

    # Night 4: nothing asked, nothing printed under -q (cron mails nothing), exit 0; metrics count it.
    metrics = tmp_path / "metrics.prom"
    code, stderr, doc = nightly(manifest, sandbox, "-q", "--metrics-file", str(metrics))
    assert (code, stderr) == (0, "")
    assert puts_for_bad() == 3
    assert 'batch_export_jobs{outcome="abandoned"} 1.0' in metrics.read_text()

    # --retry-abandoned asks once more; the same error abandons it again at once.
    code, _, doc = nightly(manifest, sandbox, "--retry-abandoned")
    assert (code, doc["jobs"][1]["outcome"]) == (0, "abandoned")
    assert puts_for_bad() == 4

    # status shows it under its own table and state.
    status = subprocess.run(
        [sys.executable, "-m", "batch_export", "status", str(manifest), "--json", "--failed"],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
        check=False,
    )
    jobs = json.loads(status.stdout)["jobs"]
    assert [(job["insight_id"], job["state"], job["failure_runs"]) for job in jobs] == [
        (bad.id, "abandoned", 4)
    ]

    # Fixing the entry makes a new job (a new key): requested and downloaded.
    manifest.write_text(text.replace("no-such-asset", bad.outputs[0]))
    code, _, doc = nightly(manifest, sandbox)
    assert code == 0
    assert [job["outcome"] for job in doc["jobs"]] == ["skipped", "downloaded"]


def test_a_wrong_key_never_abandons_a_small_nightly(sandbox: Sandbox, tmp_path: Path) -> None:
    # Two jobs on one AOI: too few for the breaker, and a 403 from a bad key looks like the AOI's
    # own permission. Abandoning them after 3 nights of a wrong (expired) key made night 3 exit 0
    # and, once the key was fixed, exported nothing and still exited 0: data silently not exported.
    aoi = sandbox.catalog.aois[0]
    lines = ["version: 1", "limits: {poll_interval: 0.05s, rate: 50}", "exports:"]
    for ins in aoi.insights[:2]:
        lines.append(
            f'  - {{aoi_id: "{aoi.id}", insight_id: "{ins.id}", outputs: ["{ins.outputs[0]}"]}}'
        )
    manifest = tmp_path / "m.yaml"
    manifest.write_text("\n".join(lines) + "\n")
    for _night in range(4):
        code, stderr, doc = nightly(manifest, sandbox, key="expired-key-0000")
        assert code == 1, stderr
        assert [job["outcome"] for job in doc["jobs"]] == ["failed", "failed"]
        assert {job["error"]["code"] for job in doc["jobs"]} == {"invalid_api_key"}
        assert "abandoned   " not in stderr and "expired-key-0000" not in stderr
        assert (
            "2 job(s) failed with HTTP 401/403 and no answer of this run accepted the API key"
            in stderr
        )
        # Failed, but the run did not count: no answer showed the key works.
        assert [runs for _, _, runs in stored_failure_runs(manifest)] == [0, 0]
    assert len(sandbox.requests_to("api", "PUT")) == 8  # every night asked again
    code, _, doc = nightly(manifest, sandbox)  # the key fixed: both exported
    assert code == 0
    assert [job["outcome"] for job in doc["jobs"]] == ["downloaded", "downloaded"]


def test_a_forbidden_aoi_beside_a_working_one_is_still_abandoned(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    # The counterpart: an answer of 200 in the same run proves the key, so the 403 is the AOI's.
    good_aoi, bad_aoi = sandbox.catalog.aois[0], sandbox.catalog.aois[1]
    sandbox.config.denied_aois = frozenset({bad_aoi.id})
    good, bad = good_aoi.insights[0], bad_aoi.insights[0]
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        textwrap.dedent(
            f"""\
            version: 1
            limits: {{poll_interval: 0.05s, rate: 50}}
            exports:
              - {{aoi_id: "{good_aoi.id}", insight_id: "{good.id}", outputs: ["{good.outputs[0]}"]}}
              - {{aoi_id: "{bad_aoi.id}", insight_id: "{bad.id}", outputs: ["{bad.outputs[0]}"]}}
            """
        )
    )
    for night, expected in ((1, 1), (2, 1), (3, 0)):
        code, _, doc = nightly(manifest, sandbox, "--force")  # the good job asks every night
        assert code == expected, night
    assert doc["jobs"][1]["outcome"] == "abandoned"
    assert doc["jobs"][1]["error"]["code"] == "permission_denied"
    assert stored_failure_runs(manifest) == [(bad.id, "abandoned", 3)]


def test_a_forbidden_aoi_alone_is_abandoned_once_a_listing_proves_the_key(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    # No answer of the run accepted the key (its only job got a 403): one GET /v0/aois?limit=1 at
    # the end tells a forbidden AOI (200: the key works, the 403 is the AOI's) from a bad key.
    aoi = sandbox.catalog.aois[1]
    sandbox.config.denied_aois = frozenset({aoi.id})
    ins = aoi.insights[0]
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "version: 1\nlimits: {poll_interval: 0.05s, rate: 50}\nexports:\n"
        f'  - {{aoi_id: "{aoi.id}", insight_id: "{ins.id}", outputs: ["{ins.outputs[0]}"]}}\n'
    )
    for night, expected in ((1, 1), (2, 1), (3, 0)):
        code, stderr, doc = nightly(manifest, sandbox)
        assert code == expected, (night, stderr)
        assert "no answer of this run accepted the API key" not in stderr
    assert doc["jobs"][0]["outcome"] == "abandoned"
    probes = [r for r in sandbox.requests_to("api", "GET") if r.path == "/v0/aois"]
    assert len(probes) == 3 and {r.status for r in probes} == {200}
    assert stored_failure_runs(manifest) == [(ins.id, "abandoned", 3)]
