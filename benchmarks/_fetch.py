"""Child process: the runner downloads the given URLs (its real download/verify/commit path).

Usage: ``python -m benchmarks._fetch '{"urls": [...], "out": DIR, "connections": N}'`` (``connections``
optional: the default setting otherwise). A tiny API in this process
answers every PUT with ``ready`` and one of the URLs as ``signed_url``; a real
:class:`~batch_export.runner.Runner` (SQLite store, one job per URL, every job downloading at once)
does the rest. Prints one JSON line: wall and CPU seconds of the run (interpreter start-up excluded),
peak RSS of the process (``VmHWM``), exit code, bytes.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import anyio
from aiohttp import web

from batch_export.allocator import keep_freed_memory
from batch_export.manifest import ExportSpec
from batch_export.runner import Runner, Settings
from batch_export.store import SqliteStore

KEY = "bench-fetch-key"


class _Quiet:
    def job_state(self, job: Any) -> None:
        pass

    def job_bytes(self, job: Any, count: int) -> None:
        pass

    def job_finished(self, result: Any) -> None:
        pass


def _peak_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


async def _main(urls: list[str], out: Path, connections: int | None) -> dict[str, Any]:
    async def put(request: web.Request) -> web.Response:
        url = urls[int(request.match_info["insight_id"])]
        return web.json_response(
            {"id": request.match_info["insight_id"], "status": "ready", "signed_url": url}
        )

    app = web.Application()
    app.router.add_put("/v0/aoi/{aoi_id}/insights/{insight_id}/download", put)
    api = web.AppRunner(app, access_log=None)
    await api.setup()
    site = web.TCPSite(api, "127.0.0.1", 0)
    await site.start()
    port = api.addresses[0][1]
    specs = [
        ExportSpec("bench", str(n), (), ("pkg",), f"pkg{n}", f"pkg{n}.zip")
        for n in range(len(urls))
    ]
    settings = Settings(
        api_url=f"http://127.0.0.1:{port}",
        out_dir=out,
        state_dir=out / ".state",
        in_flight=len(urls),
        downloads=len(urls),
        rate=1000.0,
    )
    if connections is not None:
        settings = dataclasses.replace(settings, connections=connections)
    store = await SqliteStore.open(settings.state_dir)
    try:
        before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        result = await Runner(settings, specs, api_key=KEY, store=store, observer=_Quiet()).run()
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        await store.close()
        await api.cleanup()
    return {
        "exit_code": result.exit_code,
        "wall": wall,
        "user": after.ru_utime - before.ru_utime,
        "system": after.ru_stime - before.ru_stime,
        "peak_rss_kib": _peak_rss_kib(),
        "bytes": sum(job.bytes or 0 for job in result.jobs),
        "failures": [job.error_code for job in result.jobs if job.error_code],
    }


def main() -> None:
    """Run the downloads named by ``sys.argv[1]`` and print the JSON figures."""
    args = json.loads(sys.argv[1])
    keep_freed_memory()  # as the CLI does at start
    figures = anyio.run(_main, list(args["urls"]), Path(args["out"]), args.get("connections"))
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
