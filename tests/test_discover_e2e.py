"""Nightly discovery end to end (issue 11): the CLI against the sandbox on loopback, counts at the server.

Three selectors over a 250-AOI catalog (one naming a forbidden AOI, one by project, one ``aois: all``
paging 3 pages): the first run exports exactly the completed, non-deleted insights matching the
filters, byte for byte; the second sends only the listing requests; after the sandbox adds two
insights and finishes a running one, the third exports exactly those three. ``--emit-manifest``
writes a plain manifest that validates and re-runs as zero work; ``discover`` sends no PUT and no
storage GET; paging faults end as one clear selector error.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from batch_export import discover_command
from batch_export.sandbox import Catalog, Fault, FaultScript, Rule, Sandbox, SandboxConfig
from tests.fakes import FakeClock, clean_env, cli_in_process, cli_process, sandbox_thread

KEY = "nightly-key-4e1a"
CATALOG = Catalog.generate(0, 250)
PROJECT_AFTER = "2026-11-01T00:00:00Z"
FLOOD_AFTER = "2026-11-20T00:00:00Z"


def _usable(insight: Any) -> bool:
    return insight.deleted_at is None and insight.status == "completed"


def _pick_aoi() -> Any:
    """An AOI with a running insight (finished in run 3) and a completed one, matched by no glob."""
    for aoi in CATALOG.aois:
        running = [i for i in aoi.insights if i.status == "running" and i.deleted_at is None]
        if running and any(_usable(i) for i in aoi.insights):
            if not running[0].name.startswith(("crop-health", "flood-extent")):
                return aoi
    raise AssertionError("no suitable AOI in the catalog")


AOI = _pick_aoi()
RUNNING = next(i for i in AOI.insights if i.status == "running" and i.deleted_at is None)
PROJECT = next(p for p in CATALOG.project_ids if p != AOI.project_id)
DENIED = next(a for a in CATALOG.aois[5:] if a.project_id != PROJECT and a.id != AOI.id)
VISIBLE = [a for a in CATALOG.aois if a.id != DENIED.id]
NEW_FLOOD_AOI = next(a for a in VISIBLE[30:] if a.id != AOI.id)


def manifest_text(api_url: str) -> str:
    return f"""version: 1
api: {{url: "{api_url}"}}
limits: {{rate: 500, poll_interval: 0.05s, poll_max_interval: 0.1s, retries: 2, read_timeout: 10s}}
output: {{dir: out}}
discover:
  - aois: ["{AOI.id}", "{DENIED.id}"]
    status: [completed]
    inputs: all
    outputs: all
  - projects: ["{PROJECT}"]
    name_glob: "crop-health-*"
    created_after: "{PROJECT_AFTER}"
    outputs: all
    name: "{{insight_name}}"
  - aois: all
    name_glob: "flood-extent-*"
    created_after: "{FLOOD_AFTER}"
    outputs: all
"""


@dataclass(frozen=True)
class Expected:
    source: str
    aoi_id: str
    insight_id: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def expected_jobs(catalog: Catalog) -> set[Expected]:
    jobs = set()
    for aoi in catalog.aois:
        for ins in aoi.insights:
            if not _usable(ins):
                continue
            if aoi.id == AOI.id:
                jobs.add(Expected("discover[0]", aoi.id, ins.id, ins.inputs, ins.outputs))
            if aoi.id == DENIED.id:
                continue
            if (
                aoi.project_id == PROJECT
                and fnmatch.fnmatchcase(ins.name, "crop-health-*")
                and ins.created_at >= PROJECT_AFTER
            ):
                jobs.add(Expected("discover[1]", aoi.id, ins.id, (), ins.outputs))
            if fnmatch.fnmatchcase(ins.name, "flood-extent-*") and ins.created_at >= FLOOD_AFTER:
                jobs.add(Expected("discover[2]", aoi.id, ins.id, (), ins.outputs))
    return jobs


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    config = SandboxConfig(
        keys=(KEY,), rate=None, asset_size=1500, aoi_count=250, denied_aois=frozenset({DENIED.id})
    )
    with sandbox_thread(config) as sb:
        yield sb


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return cli_process(*args, key=KEY, cwd=cwd)


@dataclass(frozen=True)
class Counts:
    pages: int
    insight_listings: dict[str, int]
    puts: int
    storage: int
    other: int

    @property
    def listing(self) -> int:
        return self.pages + sum(self.insight_listings.values())


def counts(sandbox: Sandbox) -> Counts:
    listings: dict[str, int] = {}
    pages = puts = other = 0
    for r in sandbox.requests_to("api"):
        if r.method == "GET" and r.path == "/v0/aois":
            pages += 1
        elif r.method == "GET" and r.path.endswith("/insights"):
            aoi = r.path.split("/")[3]
            listings[aoi] = listings.get(aoi, 0) + 1
        elif r.method == "PUT":
            puts += 1
        else:
            other += 1
    return Counts(pages, listings, puts, len(sandbox.requests_to("storage")), other)


def latest_report(tmp_path: Path) -> dict[str, Any]:
    reports = sorted((tmp_path / "out" / ".batch-export" / "reports").glob("*.json"))
    return json.loads(reports[-1].read_text())  # type: ignore[no-any-return]


def check_downloads(sandbox: Sandbox, report: dict[str, Any], wanted: set[Expected]) -> None:
    by_id = {(e.source, e.aoi_id, e.insight_id): e for e in wanted}
    downloaded = [j for j in report["jobs"] if j["outcome"] == "downloaded"]
    assert {(j["source"], j["aoi_id"], j["insight_id"]) for j in downloaded} == set(by_id)
    for job in downloaded:
        spec = by_id[job["source"], job["aoi_id"], job["insight_id"]]
        data = Path(job["path"]).read_bytes()
        sha = sandbox.package_bytes_sha256(spec.aoi_id, spec.insight_id, spec.inputs, spec.outputs)
        assert hashlib.sha256(data).hexdigest() == sha == job["sha256"]


def admin(
    sandbox: Sandbox, method: str, path: str, body: dict[str, Any], *, key: str = KEY
) -> dict[str, Any]:
    request = urllib.request.Request(
        sandbox.api_url + path,
        data=json.dumps(body).encode(),
        method=method,
        headers={"Authorization": key, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:  # loopback only
        return json.loads(answer.read())  # type: ignore[no-any-return]


def test_three_nightly_runs_export_exactly_what_is_new(sandbox: Sandbox, tmp_path: Path) -> None:
    manifest = tmp_path / "nightly.yaml"
    manifest.write_text(manifest_text(sandbox.api_url))
    wanted = expected_jobs(CATALOG)
    assert 10 <= len(wanted) <= 40  # the filters select a handful of the ~500 insights
    distinct_aois = {a.id for a in CATALOG.aois}  # 249 visible + the forbidden one, once each

    # Night 1: every completed, non-deleted insight matching the filters; the forbidden AOI fails.
    first = cli("run", str(manifest), "--no-progress", cwd=tmp_path)
    assert first.returncode == 1, first.stderr
    assert "Traceback" not in first.stderr
    report = latest_report(tmp_path)
    check_downloads(sandbox, report, wanted)
    assert report["counts"]["total"] == len(wanted) and report["counts"]["failed"] == 0
    denied = [e for e in report["discovery"] if e["aoi_id"] == DENIED.id]
    assert denied == [
        {
            "selector": 0,
            "aoi_id": DENIED.id,
            "listed": 0,
            "selected": 0,
            "error": {
                "code": "permission_denied",
                "message": f"no permission for AOI {DENIED.id!r}",
                "http_status": 403,
            },
            "warning": None,
        }
    ]
    assert len(report["discovery"]) == 2 + len(
        [a for a in VISIBLE if a.project_id == PROJECT]
    ) + len(VISIBLE)
    assert all(e["error"] is None for e in report["discovery"] if e["aoi_id"] != DENIED.id)
    assert sum(e["selected"] for e in report["discovery"]) == len(wanted)
    one = counts(sandbox)
    assert one.pages == 4  # 3 pages of aois: all, 1 of the project
    assert one.insight_listings == dict.fromkeys(distinct_aois, 1)
    assert one.other == 0 and one.puts >= len(wanted) and one.storage >= len(wanted)
    assert report["requests"]["api"] == one.listing + one.puts
    sandbox.requests.clear()

    # Night 2: nothing new: only the listing requests, no PUT, no download.
    second = cli("run", str(manifest), "--no-progress", cwd=tmp_path)
    assert second.returncode == 1
    two = counts(sandbox)
    assert (two.pages, two.puts, two.storage, two.other) == (4, 0, 0, 0)
    assert two.insight_listings == dict.fromkeys(distinct_aois, 1)
    assert latest_report(tmp_path)["counts"]["skipped"] == len(wanted)
    assert latest_report(tmp_path)["requests"]["api"] == two.listing == 254
    sandbox.requests.clear()

    # Night 3: two new insights and a finished running one: exactly those three.
    added_a = admin(sandbox, "POST", "/_sandbox/insights", {"aoi_id": AOI.id, "name": "ndvi-x1"})
    added_b = admin(
        sandbox,
        "POST",
        "/_sandbox/insights",
        {"aoi_id": NEW_FLOOD_AOI.id, "name": "flood-extent-fresh"},
    )
    admin(sandbox, "PATCH", f"/_sandbox/insights/{RUNNING.id}", {"status": "completed"})
    sandbox.requests.clear()
    third = cli("run", str(manifest), "--no-progress", cwd=tmp_path)
    assert third.returncode == 1
    new = expected_jobs(sandbox.catalog) - wanted
    assert {(e.aoi_id, e.insight_id) for e in new} == {
        (AOI.id, added_a["id"]),
        (NEW_FLOOD_AOI.id, added_b["id"]),
        (AOI.id, RUNNING.id),
    }
    report = latest_report(tmp_path)
    check_downloads(sandbox, report, new)
    assert report["counts"]["skipped"] == len(wanted)
    three = counts(sandbox)
    assert (three.pages, three.other) == (4, 0)
    assert three.insight_listings == dict.fromkeys(distinct_aois, 1)
    assert three.puts >= 3 and three.storage >= 3
    sandbox.requests.clear()

    # discover: only listing requests; --emit-manifest gives a plain manifest of the same jobs.
    plain = tmp_path / "review" / "plain.yaml"
    plain.parent.mkdir()
    shown = cli("discover", str(manifest), "--json", "--emit-manifest", str(plain), cwd=tmp_path)
    assert shown.returncode == 1, shown.stderr  # the forbidden AOI's listing failed
    seen = counts(sandbox)
    assert (seen.pages, seen.puts, seen.storage, seen.other) == (4, 0, 0, 0)
    assert seen.insight_listings == dict.fromkeys(distinct_aois, 1)
    document = json.loads(shown.stdout)
    first_selector = document["selectors"][0]
    assert first_selector["selector"] == 0
    assert [a["aoi_id"] for a in first_selector["aois"]] == [AOI.id, DENIED.id]
    assert first_selector["aois"][1]["error"]["code"] == "permission_denied"
    actions = {i["id"]: i["action"] for i in first_selector["aois"][0]["insights"]}
    listed = sandbox.catalog.aoi(AOI.id)
    assert listed is not None
    assert actions == {
        i.id: "done" if _usable(i) else "deleted" if i.deleted_at else "not_ready"
        for i in listed.insights
    }
    assert cli("validate", str(plain), cwd=tmp_path).returncode == 0
    sandbox.requests.clear()
    rerun = cli("run", str(plain), "--no-progress", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert sandbox.requests == []  # zero work: no listing, no PUT, no download
    report = latest_report(tmp_path)
    assert report["counts"]["skipped"] == report["counts"]["total"] == len(wanted) + 3

    print(
        f"\nrequest counts: night 1: {one.listing} listing + {one.puts} PUT + {one.storage} "
        f"storage; night 2: {two.listing} listing + {two.puts} PUT + {two.storage} storage; "
        f"night 3: {three.listing} listing + {three.puts} PUT + {three.storage} storage"
    )


@pytest.mark.parametrize(
    ("rule", "code"),
    [
        # page requests: 1 = the project's page (selector 1), 2, 3, 4 = aois: all (selector 2)
        (Rule(Fault.REPEAT_PAGE, "listing", route="aois", nth=(3,)), "paging_repeat"),
        (
            Rule(Fault.TOTAL_CHANGE, "listing", route="aois", nth=(3,), delta=5),
            "paging_total_changed",
        ),
        (Rule(Fault.HTTP_ERROR, "listing", route="aois", status=502, nth=(3, 4, 5)), "http_502"),
        (Rule(Fault.HTML, "listing", route="aois", nth=(3, 4, 5)), "html_body"),
    ],
)
def test_paging_faults_are_one_clear_selector_error(
    sandbox: Sandbox, tmp_path: Path, rule: Rule, code: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = tmp_path / "nightly.yaml"
    manifest.write_text(manifest_text(sandbox.api_url))
    sandbox.faults.add(FaultScript([rule]))
    # The JSON view in this process on a virtual clock (started at the real one), so the retries'
    # backoff (1 s base, full jitter) waits for nothing; the readable table below is a real
    # process with real waits.
    now = time.monotonic()
    clock = FakeClock(start=now, wall_offset=time.time() - now)
    monkeypatch.setattr(discover_command, "SystemClock", lambda: clock)
    args = ["discover", str(manifest), "--json"]
    shown = cli_in_process(args, env={"PIXXEL_API_KEY": KEY}, cwd=tmp_path)
    assert shown.returncode == 1, shown.stderr
    assert "Traceback" not in shown.stderr
    selectors = json.loads(shown.stdout)["selectors"]
    paging = [a for a in selectors[2]["aois"] if a["aoi_id"] is None]
    assert len(paging) == 1 and paging[0]["error"]["code"] == code
    assert paging[0]["insights"] == []
    assert len(selectors[2]["aois"]) == 101  # the first page's AOIs, then the paging error
    assert all(a["aoi_id"] is not None for a in selectors[1]["aois"])  # the project: fine
    seen = counts(sandbox)
    assert (seen.puts, seen.storage) == (0, 0)
    sandbox.faults.add(FaultScript([rule]))  # the same fault again, for the readable table
    text = cli("discover", str(manifest), cwd=tmp_path)
    assert text.returncode == 1
    assert f"AOI listing: listing failed: {code}" in text.stdout


def test_a_paging_fault_in_a_run_keeps_the_pages_read(sandbox: Sandbox, tmp_path: Path) -> None:
    manifest = tmp_path / "nightly.yaml"
    manifest.write_text(manifest_text(sandbox.api_url))
    sandbox.faults.add(FaultScript([Rule(Fault.REPEAT_PAGE, "listing", route="aois", nth=(3,))]))
    result = cli("run", str(manifest), "--no-progress", cwd=tmp_path)
    assert result.returncode == 1
    report = latest_report(tmp_path)
    errors = [e for e in report["discovery"] if e["aoi_id"] is None]
    assert [(e["selector"], e["error"]["code"]) for e in errors] == [(2, "paging_repeat")]
    first_page = {a.id for a in VISIBLE[:100]}
    wanted = {
        e for e in expected_jobs(CATALOG) if e.source != "discover[2]" or e.aoi_id in first_page
    }
    check_downloads(sandbox, report, wanted)
    assert "paging_repeat" in result.stderr


def test_explicit_entries_win_path_clashes_and_empty_listings_fail(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    aoi = VISIBLE[1]
    clash, empty = aoi.insights[0], aoi.insights[-1]
    assert clash.id != empty.id
    bare = dataclasses.replace(
        empty, inputs=(), outputs=(), status="completed", deleted_at=None, name="bare"
    )
    sandbox.catalog = sandbox.catalog.with_insight(aoi.id, bare)
    manifest = tmp_path / "mixed.yaml"
    manifest.write_text(
        f"""version: 1
api: {{url: "{sandbox.api_url}"}}
limits: {{rate: 500, poll_interval: 0.05s, retries: 2}}
output: {{dir: out}}
exports:
  - {{aoi_id: "{aoi.id}", insight_id: "{clash.id}", outputs: ["{clash.outputs[0]}"]}}
discover:
  - aois: ["{aoi.id}"]
    status: [completed, running, queued, failed]
    inputs: all
    outputs: all
"""
    )
    result = cli("run", str(manifest), "--no-progress", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    report = latest_report(tmp_path)
    by_insight = {(j["source"], j["insight_id"]): j for j in report["jobs"]}
    explicit = by_insight["exports[0]", clash.id]
    assert explicit["outcome"] == "downloaded"
    lost = by_insight["discover[0]", clash.id]
    assert lost["outcome"] == "failed" and lost["error"]["code"] == "path_clash"
    assert "exports[0]" in lost["error"]["message"]
    none = by_insight["discover[0]", empty.id]
    assert none["outcome"] == "failed" and none["error"]["code"] == "no_listed_assets"
    puts = {r.path.split("/")[5] for r in sandbox.requests_to("api", "PUT")}
    assert clash.id in puts and empty.id not in puts  # the failing jobs sent nothing
    assert Path(explicit["path"]).read_bytes() == sandbox.package_bytes(
        aoi.id, clash.id, (), (clash.outputs[0],)
    )


def test_the_readme_nightly_example_works_as_written(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Nightly exports", 1)[1].split("\n## ", 1)[0]
    manifest_block = re.findall(r"```yaml\n(# nightly\.yaml.*?)```", section, re.S)[0]
    shell = re.findall(r"```sh\n(.*?)```", section, re.S)[0]
    assert "batch-export sandbox --port 8765 --new-insight-every 60" in shell
    assert "8765" in manifest_block
    # the CLI defaults; new insights every hour, not every minute: a slow machine must not race them;
    # ready at the first PUT: the manifest as written polls every 5 s (the default), and a pending
    # round would only add 5 s of real waiting to each run (polling: test_three_nightly_runs_...)
    config = SandboxConfig(new_insight_every=3600.0, ready_after_puts=1)
    with sandbox_thread(config) as sandbox:
        port = sandbox.api_url.rsplit(":", 1)[1]
        manifest = tmp_path / "nightly.yaml"
        manifest.write_text(manifest_block.replace("8765", port))
        env = clean_env(PIXXEL_API_KEY="sandbox-demo-key")

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "batch_export", *args, "nightly.yaml"],
                capture_output=True,
                text=True,
                env=env,
                cwd=tmp_path,
                timeout=300,
            )

        shown = run("discover")
        assert shown.returncode == 0, shown.stderr
        assert " export" in shown.stdout and "deleted" in shown.stdout
        completed = {(a.id, i.id) for a in sandbox.catalog.aois for i in a.insights if _usable(i)}
        assert run("run").returncode == 0
        files = {p.relative_to(tmp_path / "nightly-exports") for p in tmp_path.rglob("*.zip")}
        assert {tuple(p.parts[:2]) for p in files} == completed
        sandbox.requests.clear()
        assert run("run").returncode == 0
        assert sandbox.requests_to("api", "PUT") == [] and sandbox.requests_to("storage") == []
        gets = sandbox.requests_to("api", "GET")
        assert len(gets) == 1 + len(sandbox.catalog.aois)  # one page, one listing per AOI
        admin(sandbox, "POST", "/_sandbox/insights", {"name": "ndvi-late"}, key="sandbox-demo-key")
        assert run("run").returncode == 0
        late = [p for p in tmp_path.rglob("ndvi-late.zip")]
        assert len(late) == 1


def test_emit_manifest_refuses_a_path_explicit_entries_cannot_reproduce(tmp_path: Path) -> None:
    with sandbox_thread(SandboxConfig(keys=(KEY,), rate=None)) as sandbox:
        manifest = tmp_path / "dated.yaml"
        manifest.write_text(
            f"""version: 1
api: {{url: "{sandbox.api_url}"}}
output: {{path: "{{created_date}}/{{aoi_id}}/{{insight_id}}.zip"}}
discover:
  - aois: all
    outputs: all
"""
        )
        plain = tmp_path / "plain.yaml"
        result = cli("discover", str(manifest), "--emit-manifest", str(plain), cwd=tmp_path)
        assert result.returncode == 2
        assert "cannot write" in result.stderr and "plain manifest" in result.stderr
        assert "Traceback" not in result.stderr
        assert not plain.exists()
        assert sandbox.requests_to("api", "PUT") == [] and sandbox.requests_to("storage") == []
