"""Issue 5 item 4 and issue 3's bench item: big manifests and re-runs of finished ones.

* ``batch-export validate`` of a generated 100,000-entry manifest: wall time and peak RSS.
* A 10,000-entry manifest finished by a real ``batch-export run`` against the sandbox (no preparation
  time: ready at the first PUT; no rate limit at the sandbox, ``--rate`` high at the client), then
  run again: wall time of the re-run and requests that reached the sandbox (must be 0).
* The same for 1,000 entries (issue 3).

Every run is the real command line in a child process, timed from spawn to exit.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from benchmarks._common import (
    PYTHON,
    Figure,
    bench_env,
    distinct_selections,
    log,
    manifest_text,
    run_measured,
    sandbox_process,
)

VALIDATE_ENTRIES = 100_000
RERUN_ENTRIES = (10_000, 1_000)
_SELECTIONS = 40  # packages the sandbox builds; entries cycle through them under distinct names


def _validate(work: Path) -> list[Figure]:
    from batch_export.sandbox import Catalog

    selections = distinct_selections(Catalog.generate(0), _SELECTIONS)
    manifest = work / "validate-100k.yaml"
    manifest.write_text(manifest_text(selections, VALIDATE_ENTRIES))
    log(f"scale: validate {VALIDATE_ENTRIES:,} entries")
    measured = run_measured(
        [PYTHON, "-m", "batch_export", "validate", str(manifest)], env=bench_env(), cwd=work
    )
    if measured.returncode != 0:
        raise RuntimeError(f"validate failed: {measured.stderr.strip()[-500:]}")
    plan_lines = measured.stdout.count("\n")
    return [
        Figure(
            "scale",
            f"validate {VALIDATE_ENTRIES:,} entries: wall time",
            measured.wall,
            "s",
            "<= 10 s",
            measured.wall <= 10,
            f"{plan_lines:,} plan lines; CPU {measured.cpu:.2f} s",
        ),
        Figure(
            "scale",
            f"validate {VALIDATE_ENTRIES:,} entries: peak RSS",
            measured.maxrss_mib,
            "MiB",
            "<= 500 MiB",
            measured.maxrss_mib <= 500,
            "ru_maxrss of the process",
        ),
    ]


def _rerun(work: Path, entries: int) -> list[Figure]:
    config = {"rate": None, "ready_after_puts": 1, "prepare_seconds": 0.0, "asset_size": 256}
    with sandbox_process(**config) as sandbox:
        selections = distinct_selections(sandbox.catalog, _SELECTIONS)
        manifest = work / f"rerun-{entries}.yaml"
        manifest.write_text(
            manifest_text(
                selections,
                entries,
                limits="in_flight: 256, downloads: 32, poll_interval: 0.05s, retries: 8",
            )
        )
        out = work / f"out-{entries}"
        out.mkdir()
        argv = [
            PYTHON,
            "-m",
            "batch_export",
            "run",
            str(manifest),
            "--api-url",
            sandbox.api_url,
            "--out",
            str(out),
            "--rate",
            "100000",
            "-q",
        ]
        log(f"scale: finishing a {entries:,}-entry manifest against the sandbox")
        first = run_measured(argv, env=bench_env(), cwd=work)
        if first.returncode != 0:
            raise RuntimeError(
                f"the first run of {entries} jobs exited {first.returncode}: "
                f"{first.stderr.strip()[-800:]}"
            )
        before = sandbox.stats()
        sandbox.clear()
        log(f"scale: re-running the finished {entries:,}-entry manifest")
        again = run_measured(argv, env=bench_env(), cwd=work)
        stats = sandbox.stats()
    if again.returncode != 0:
        raise RuntimeError(f"the re-run exited {again.returncode}: {again.stderr.strip()[-800:]}")
    requests = stats["api_total"] + stats["storage_total"]
    return [
        Figure(
            "scale",
            f"re-run of a finished {entries:,}-entry manifest: wall time",
            again.wall,
            "s",
            "<= 5 s",
            again.wall <= 5,
            f"whole process, spawn to exit; peak RSS {again.maxrss_mib:.0f} MiB; the first run "
            f"took {first.wall:.1f} s ({before['api_total']:,} API + "
            f"{before['storage_total']:,} storage requests)",
        ),
        Figure(
            "scale",
            f"re-run of a finished {entries:,}-entry manifest: requests at the sandbox",
            requests,
            "",
            "0",
            requests == 0,
            f"API {stats['api_total']}, storage {stats['storage_total']}",
        ),
    ]


def run() -> list[Figure]:
    """Measure validate and both re-runs; return the figures."""
    with tempfile.TemporaryDirectory(prefix="batch-export-bench-scale-") as tmp:
        work = Path(tmp)
        figures = _validate(work)
        for entries in RERUN_ENTRIES:
            figures += _rerun(work, entries)
    return figures
