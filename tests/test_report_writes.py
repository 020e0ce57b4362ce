"""The end-of-run files: the state dir's report never through a symlink, each file on its own.

The start-up check (``config.state_dir_links``) refuses a symlink at ``<state-dir>/reports``; one
made while the run goes on (hours later, by another user or a script) was followed at the end.
A report that cannot be written no longer keeps ``--report`` and the metrics from being written,
and the summary line no longer names a report that is not there.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import batch_export
from batch_export import app
from batch_export.redact import Redactor
from batch_export.report import write_report
from batch_export.sandbox import Sandbox, SandboxConfig
from tests.fakes import sandbox_thread

KEY = "report-writes-key-5d1e"


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with sandbox_thread(SandboxConfig(keys=(KEY,), rate=None, asset_size=100)) as sb:
        yield sb


def test_write_report_below_a_root_never_follows_a_symlink(tmp_path: Path) -> None:
    state, elsewhere = tmp_path / "state", tmp_path / "elsewhere"
    state.mkdir()
    elsewhere.mkdir()
    (state / "reports").symlink_to(elsewhere)
    with pytest.raises(OSError, match="'reports' is a symlink, not a folder"):
        write_report({"a": 1}, state / "reports" / "r.json", redactor=Redactor(), root=state)
    assert list(elsewhere.iterdir()) == []
    (state / "reports").unlink()
    write_report({"a": 1}, state / "reports" / "r.json", redactor=Redactor(), root=state)
    assert json.loads((state / "reports" / "r.json").read_text()) == {"a": 1}
    assert sorted(p.name for p in (state / "reports").iterdir()) == ["r.json"]  # no temp left


def test_a_reports_link_made_after_the_start_is_not_followed(
    sandbox: Sandbox,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    aoi = sandbox.catalog.aois[0]
    insight = aoi.insights[0]
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        f'version: 1\napi: {{url: "{sandbox.api_url}"}}\noutput: {{dir: out}}\n'
        "limits: {rate: 100, poll_interval: 0.05s}\nexports:\n"
        f'  - {{aoi_id: "{aoi.id}", insight_id: "{insight.id}", '
        f'outputs: ["{insight.outputs[0]}"]}}\n'
    )
    reports, elsewhere = tmp_path / "out" / ".batch-export" / "reports", tmp_path / "elsewhere"
    elsewhere.mkdir()
    locked = app._run_locked

    async def link_then_run(*args: Any, **kwargs: Any) -> Any:
        # After every start-up check, under the lock: the link appears while the run goes on.
        if reports.is_dir():
            shutil.rmtree(reports)
        reports.symlink_to(elsewhere)
        return await locked(*args, **kwargs)

    monkeypatch.setattr(app, "_run_locked", link_then_run)
    extra, metrics = tmp_path / "copy.json", tmp_path / "m.prom"
    caplog.set_level(logging.INFO, logger="batch_export")
    result = batch_export.export(manifest, api_key=KEY, report=extra, metrics_file=metrics)
    assert result.exit_code == 0
    assert list(elsewhere.iterdir()) == []  # nothing written through the link
    assert json.loads(extra.read_text())["exit_code"] == 0  # --report still written
    assert "batch_export_last_exit_code 0" in metrics.read_text()  # and the metrics
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [
        f"cannot write the report {reports / (result.run_id + '.json')}: "
        f"{reports}: 'reports' is a symlink, not a folder"
    ]
    summary = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("summary:"))
    assert summary.endswith("; exit 0; report not written (see the error above)")


def test_the_default_staging_folder_is_written_below_the_state_dir_never_through_a_link(
    tmp_path: Path,
) -> None:
    # With --out s3://..., packages are staged in <state-dir>/staging, a state-dir entry checked
    # for a link at start only: the writes used it as their root, so a link made there mid-run
    # was followed. The writes' root is now the state dir, below which nothing is a link.
    from dataclasses import replace

    from batch_export import safepath
    from batch_export.runner import Runner
    from batch_export.store import MemoryStore
    from tests.test_breaker_runs import settings

    state = tmp_path / "state"
    base = replace(settings("http://127.0.0.1:9", tmp_path), state_dir=state)
    staged = replace(base, out_url="s3://bucket/prefix", out_dir=state / "staging")
    own_staging = replace(staged, out_dir=tmp_path / "my-staging")

    def root(of: object) -> Path:
        runner = Runner(of, [], api_key="k", store=MemoryStore(), observer=None)  # type: ignore[arg-type]
        return runner._write_root

    assert root(staged) == state
    assert root(own_staging) == tmp_path / "my-staging"  # the operator's: it may be a link
    assert root(base) == base.out_dir
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    state.mkdir()
    (state / "staging").symlink_to(elsewhere)
    with pytest.raises(safepath.PathProblem, match="'staging' is a symlink, not a folder"):
        safepath.open_dir(state / "staging" / "aoi" / "ins", root(staged))
    assert list(elsewhere.iterdir()) == []
