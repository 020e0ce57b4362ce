"""Issue 5 item 1: orchestration efficiency against the rate limit and the preparation time.

500 jobs, sandbox preparation 2 s, sandbox limit 50 requests/s (burst 2), client 50 requests/s
(burst 1), in-flight 500, poll interval 1 s, tiny packages. ideal = max(preparation + poll interval,
2 requests per job x jobs / rate). A second run sets the client 2x over the server's limit.

The runner runs in this process (a real :class:`~batch_export.runner.Runner` with the SQLite store);
the sandbox runs in its own process and counts what reached it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import anyio

from benchmarks._common import KEY, Figure, distinct_selections, log, sandbox_process

JOBS = 500
PREPARE = 2.0
POLL = 1.0
SERVER_RATE = 50.0
SERVER_BURST = 2


class _Quiet:
    def job_state(self, job: Any) -> None:
        pass

    def job_bytes(self, job: Any, count: int) -> None:
        pass

    def job_finished(self, result: Any) -> None:
        pass


def _one_run(client_rate: float) -> dict[str, Any]:
    from batch_export.manifest import ExportSpec
    from batch_export.runner import Runner, Settings
    from batch_export.store import SqliteStore

    config = {
        "prepare_seconds": PREPARE,
        "rate": SERVER_RATE,
        "burst": SERVER_BURST,
        "asset_size": 512,
    }
    with sandbox_process(**config) as sandbox, tempfile.TemporaryDirectory() as tmp:
        specs = [
            ExportSpec(aoi, ins, inputs, outputs, f"job{n:04d}", f"{aoi}/{ins}/job{n:04d}.zip")
            for n, (aoi, ins, inputs, outputs) in enumerate(
                distinct_selections(sandbox.catalog, JOBS)
            )
        ]
        settings = Settings(
            api_url=sandbox.api_url,
            out_dir=Path(tmp) / "out",
            state_dir=Path(tmp) / "state",
            in_flight=JOBS,
            rate=client_rate,
            poll_interval=POLL,
        )

        async def main() -> Any:
            store = await SqliteStore.open(settings.state_dir)
            try:
                runner = Runner(settings, specs, api_key=KEY, store=store, observer=_Quiet())
                return await runner.run()
            finally:
                await store.close()

        result = anyio.run(main)
        stats = sandbox.stats()
    api = stats["api"]
    span = (stats["api_last_at"] or 0) - (stats["api_first_at"] or 0)
    accepted = stats["api_total"] - api.get("429", 0)
    return {
        "exit_code": result.exit_code,
        "makespan": result.wall_seconds,
        "api_total": stats["api_total"],
        "throttled": api.get("429", 0),
        "accepted": accepted,
        "span": span,
        "accepted_rate": accepted / span if span > 0 else 0.0,
        "sent_rate": stats["api_total"] / span if span > 0 else 0.0,
    }


def run() -> list[Figure]:
    """Measure both runs; return their figures."""
    ideal = max(PREPARE + POLL, 2 * JOBS / SERVER_RATE)
    figures: list[Figure] = []
    log(f"orchestration: {JOBS} jobs at client rate {SERVER_RATE:g}/s (ideal {ideal:.1f} s)")
    same = _one_run(SERVER_RATE)
    ratio = same["makespan"] / ideal
    figures += [
        Figure(
            "orchestration",
            f"makespan / ideal, client {SERVER_RATE:g}/s = server",
            ratio,
            "x",
            "<= 1.05",
            ratio <= 1.05 and same["exit_code"] == 0,
            f"makespan {same['makespan']:.2f} s, ideal {ideal:.1f} s; "
            f"{same['api_total']} API requests (fewest possible {2 * JOBS}); exit {same['exit_code']}",
        ),
        Figure(
            "orchestration",
            "429s at the sandbox, client = server rate",
            same["throttled"],
            "",
            "0",
            same["throttled"] == 0,
            f"accepted rate {same['accepted_rate']:.2f}/s of {SERVER_RATE:g}/s",
        ),
    ]
    log(f"orchestration: client rate {2 * SERVER_RATE:g}/s, 2x over the server's")
    over = _one_run(2 * SERVER_RATE)
    figures += [
        Figure(
            "orchestration",
            f"client 2x over ({2 * SERVER_RATE:g}/s): finished",
            float(over["exit_code"] == 0),
            "",
            "1 (exit 0)",
            over["exit_code"] == 0,
            f"exit {over['exit_code']}; makespan {over['makespan']:.2f} s "
            f"({over['makespan'] / ideal:.2f}x ideal); {over['throttled']} 429s of "
            f"{over['api_total']} API requests",
        ),
        Figure(
            "orchestration",
            "client 2x over: accepted rate / server limit",
            over["accepted_rate"] / SERVER_RATE,
            "x",
            "",
            None,
            f"{over['accepted_rate']:.2f} accepted requests/s over {over['span']:.1f} s "
            f"(sent {over['sent_rate']:.2f}/s) vs the server's {SERVER_RATE:g}/s",
        ),
    ]
    return figures
