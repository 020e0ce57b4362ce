"""The Python API (SPEC §10): export() / export_async() against a sandbox on a real loopback port."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import signal
import sqlite3
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import batch_export
from batch_export.errors import LockHeldError, ManifestError, UsageError
from batch_export.lock import StateLock
from batch_export.sandbox import Sandbox, SandboxConfig
from tests.fakes import sandbox_thread

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
KEY = "api-test-key-31f0a9"


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    with sandbox_thread(SandboxConfig(keys=(KEY,), asset_size=3000, rate=None)) as sb:
        yield sb


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sandbox: Sandbox) -> Path:
    """A working dir holding ``nightly.yaml`` (2 jobs) and the key in the environment."""
    monkeypatch.chdir(tmp_path)
    for name in [n for n in os.environ if n.startswith(("PIXXEL_", "BATCH_EXPORT_"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PIXXEL_API_KEY", KEY)
    write_manifest(tmp_path / "nightly.yaml", sandbox)
    return tmp_path


def write_manifest(path: Path, sandbox: Sandbox, *, jobs: int = 2, outputs: str = "") -> Path:
    aoi = sandbox.catalog.aois[0]
    lines = [
        "version: 1",
        f"api: {{url: {sandbox.api_url}}}",
        "limits: {poll_interval: 0.05s, poll_max_interval: 0.1s, rate: 100}",
        "exports:",
    ]
    for ins in aoi.insights[:jobs]:
        out = outputs or ins.outputs[0]
        lines.append(f'  - {{aoi_id: "{aoi.id}", insight_id: "{ins.id}", outputs: ["{out}"]}}')
    path.write_text("\n".join(lines) + "\n")
    return path


def python_examples() -> list[str]:
    section = README.split("## Use from Python", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def assert_packages_served(sandbox: Sandbox, jobs: tuple[dict[str, Any], ...]) -> None:
    aoi = sandbox.catalog.aois[0]
    for job, ins in zip(jobs, aoi.insights, strict=False):
        data = Path(job["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == job["sha256"]
        assert job["sha256"] == sandbox.package_bytes_sha256(aoi.id, ins.id, (), (ins.outputs[0],))


def test_readme_example_runs_in_a_worker_thread_as_airflow_would(
    sandbox: Sandbox, workdir: Path
) -> None:
    namespace: dict[str, Any] = {}
    exec(python_examples()[0], namespace)
    returned: list[Any] = []
    worker = threading.Thread(target=lambda: returned.append(namespace["nightly_export"]()))
    worker.start()
    worker.join(timeout=120)
    assert returned == [
        {"total": 2, "downloaded": 2, "skipped": 0, "failed": 0, "pending": 0, "abandoned": 0}
    ]
    reports = list((workdir / "exports" / ".batch-export" / "reports").glob("*.json"))
    assert len(reports) == 1
    assert_packages_served(sandbox, tuple(json.loads(reports[0].read_text())["jobs"]))
    assert len(sandbox.requests_to("storage", "GET")) == 2


def test_readme_async_example_runs_inside_a_running_loop(sandbox: Sandbox, workdir: Path) -> None:
    namespace: dict[str, Any] = {}
    exec(python_examples()[1], namespace)

    async def main() -> tuple[int, int]:
        asyncio.get_running_loop()  # we are inside a running loop
        first = await namespace["export_in_a_running_loop"]()
        again = await namespace["export_in_a_running_loop"]()  # done jobs are skipped
        return first, again

    assert anyio.run(main) == (2, 0)
    assert len(sandbox.requests_to("api", "PUT")) == 2 * 2  # pending, then ready; none re-run


def test_a_call_leaves_signals_exit_and_other_loggers_alone(
    sandbox: Sandbox, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    touched: list[str] = []

    def record(name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> None:
            touched.append(name)
            raise AssertionError(f"{name} called by the API")

        return call

    monkeypatch.setattr(signal, "signal", record("signal.signal"))
    monkeypatch.setattr(signal, "set_wakeup_fd", record("signal.set_wakeup_fd"))
    monkeypatch.setattr(sys, "exit", record("sys.exit"))
    monkeypatch.setattr(os, "_exit", record("os._exit"))
    monkeypatch.setattr(
        asyncio.AbstractEventLoop, "add_signal_handler", record("add_signal_handler")
    )
    monkeypatch.setattr(
        asyncio.SelectorEventLoop, "add_signal_handler", record("add_signal_handler")
    )

    def snapshot(name: str | None) -> tuple[Any, ...]:
        logger = logging.getLogger(name)
        return (list(logger.handlers), logger.level, logger.propagate, list(logger.filters))

    watched = [None, "aiohttp", "asyncio"]
    before = [snapshot(name) for name in watched]
    ours = logging.getLogger("batch_export")
    ours_before = snapshot("batch_export")
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    keep = Keep(level=logging.DEBUG)
    ours.addHandler(keep)
    ours_level = ours.level
    ours.setLevel(logging.INFO)
    try:
        # One job fails (unknown asset: 400), one is done: exit 1, no exception.
        write_manifest(workdir / "bad.yaml", sandbox, jobs=1, outputs="no-such-asset")
        failed = batch_export.export("bad.yaml", out="exports", api_key=KEY)
        done = batch_export.export("nightly.yaml", out="exports")
    finally:
        ours.removeHandler(keep)
        ours.setLevel(ours_level)
    assert touched == []
    assert [snapshot(name) for name in watched] == before
    assert snapshot("batch_export") == ours_before
    assert failed.exit_code == 1 and failed.counts["failed"] == 1
    assert failed.jobs[0]["error"]["http_status"] == 400
    assert done.exit_code == 0 and done.counts["downloaded"] == 2
    assert any(line.startswith("summary: 1 job(s)") for line in seen)
    assert not any(KEY in line for line in seen)


def test_bad_manifest_and_bad_options_raise_and_request_nothing(
    sandbox: Sandbox, workdir: Path
) -> None:
    assert batch_export.ManifestError is ManifestError
    assert batch_export.UsageError is UsageError
    assert issubclass(ManifestError, batch_export.BatchExportError)
    (workdir / "broken.yaml").write_text("version: 1\nexports:\n  - aoi_id: 012\n")
    with pytest.raises(ManifestError) as caught:
        batch_export.export("broken.yaml")
    assert caught.value.problems[0].startswith("broken.yaml:3:")
    bad_values: list[dict[str, Any]] = [
        {"rate": -1},
        {"rate": 0},
        {"in_flight": 0},
        {"downloads": 1.5},
        {"shard": "2/2"},
        {"shard": (1, 0)},
        {"max_runtime": "soon"},
        {"api_url": "http://example.com"},
    ]
    for options in bad_values:
        with pytest.raises(UsageError):
            batch_export.export("nightly.yaml", **options)
    assert sandbox.requests == []


def test_a_held_state_dir_raises_lock_held(sandbox: Sandbox, workdir: Path) -> None:
    with StateLock(workdir / "exports" / ".batch-export"), pytest.raises(LockHeldError):
        batch_export.export("nightly.yaml")
    assert sandbox.requests == []


def test_dry_run_returns_the_plan_and_sends_nothing(sandbox: Sandbox, workdir: Path) -> None:
    result = batch_export.export("nightly.yaml", dry_run=True)
    assert result.exit_code == 0 and len(result.plan) == 3
    assert result.plan[0].split()[1:3] == [
        "PUT",
        f"/v0/aoi/{sandbox.catalog.aois[0].id}/insights/"
        f"{sandbox.catalog.aois[0].insights[0].id}/download",
    ]
    assert sandbox.requests == []


def test_cancelling_the_task_checkpoints_like_sigint_then_reraises(
    sandbox: Sandbox, workdir: Path
) -> None:
    sandbox.config.ready_after_puts = 1_000_000  # pending for ever
    reraised: list[bool] = []

    async def main() -> None:
        async def run() -> None:
            try:
                await batch_export.export_async("nightly.yaml", out="exports")
            except anyio.get_cancelled_exc_class():
                reraised.append(True)
                raise

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(run)
                while len(sandbox.requests_to("api", "PUT")) < 4:  # both jobs are polling
                    await anyio.sleep(0.01)
                tasks.cancel_scope.cancel()

    anyio.run(main)
    assert reraised == [True]
    state = workdir / "exports" / ".batch-export"
    (report_file,) = (state / "reports").glob("*.json")
    report = json.loads(report_file.read_text())
    assert report["exit_code"] == 130 and report["counts"]["pending"] == 2
    with sqlite3.connect(state / "state.sqlite3") as db:
        states = {row[0] for row in db.execute("SELECT state FROM jobs")}
        runs = list(db.execute("SELECT exit_code FROM runs"))
    assert states <= {"requesting", "preparing"} and states
    assert runs == [(130,)]


def test_report_sources_are_the_manifest_indexes_also_when_sharded(
    sandbox: Sandbox, workdir: Path
) -> None:
    write_manifest(workdir / "four.yaml", sandbox, jobs=4)
    manifest = batch_export.manifest.load_manifest(workdir / "four.yaml")
    expected = {spec.relpath: spec.source for spec in manifest.exports}
    assert sorted(expected.values()) == [f"exports[{n}]" for n in range(4)]
    seen: dict[str, str] = {}
    for shard in ("0/2", "1/2"):
        result = batch_export.export(
            "four.yaml", out="exports", state_dir=f"state-{shard[0]}", shard=shard
        )
        for job in result.jobs:
            seen[job["path"]] = job["source"]
    assert seen == {str(workdir / "exports" / rel): src for rel, src in expected.items()}
