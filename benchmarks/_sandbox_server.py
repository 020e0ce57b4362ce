"""Child process: the sandbox, answering ``stats``/``clear`` lines on stdin; EOF stops it.

Usage: ``python -m benchmarks._sandbox_server '<SandboxConfig fields as JSON>'``. Prints
``READY <api_url> <storage_url>`` once serving.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from typing import Any

from batch_export.sandbox import Sandbox, SandboxConfig


def _stats(sandbox: Sandbox) -> dict[str, Any]:
    by_origin: dict[str, Counter[int]] = {"api": Counter(), "storage": Counter()}
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    for request in sandbox.requests:
        by_origin[request.origin][request.status] += 1
        first.setdefault(request.origin, request.at)
        last[request.origin] = request.at
    return {
        "api": {str(k): v for k, v in sorted(by_origin["api"].items())},
        "storage": {str(k): v for k, v in sorted(by_origin["storage"].items())},
        "api_total": sum(by_origin["api"].values()),
        "storage_total": sum(by_origin["storage"].values()),
        "api_first_at": first.get("api"),
        "api_last_at": last.get("api"),
    }


async def main() -> None:
    fields = json.loads(sys.argv[1])
    fields["keys"] = tuple(fields.get("keys", ()))
    sandbox = Sandbox(SandboxConfig(**fields))
    await sandbox.start()
    print("READY", sandbox.api_url, sandbox.storage_url, flush=True)
    loop = asyncio.get_running_loop()
    try:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            command = line.strip()
            if command == "stats":
                answer = _stats(sandbox)
            elif command == "clear":
                sandbox.requests.clear()
                answer = {"ok": True}
            else:
                answer = {"error": f"unknown command {command!r}"}
            print(json.dumps(answer), flush=True)
    finally:
        await sandbox.close()


if __name__ == "__main__":
    asyncio.run(main())
