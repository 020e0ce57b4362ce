"""Shared plumbing: figures, child processes measured with ``wait4``, the sandbox in a subprocess."""

from __future__ import annotations

import itertools
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
KEY = "bench-key-5b1e"
MIB = 1024 * 1024
GIB = 1024 * MIB


@dataclass(slots=True)
class Figure:
    """One measured figure, optionally against a target.

    Attributes:
        section: table group ("orchestration", "transfer", ...).
        name: what was measured.
        value: the number.
        unit: its unit ("s", "x", "MiB", ...).
        target: human text of the target ("<= 1.05"), or "" for an informational figure.
        met: whether the target is met (None: no target).
        note: how it was obtained / the raw numbers behind a ratio.
    """

    section: str
    name: str
    value: float
    unit: str
    target: str = ""
    met: bool | None = None
    note: str = ""

    def shown(self) -> str:
        """The value with its unit, rounded for the table."""
        if self.unit == "x":
            return f"{self.value:.2f}x"
        if abs(self.value) >= 100 or float(self.value).is_integer():
            return f"{self.value:,.0f} {self.unit}".strip()
        return f"{self.value:.2f} {self.unit}".strip()

    @property
    def verdict(self) -> str:
        """``met``/``MISSED``/``-``."""
        return "-" if self.met is None else ("met" if self.met else "MISSED")


@dataclass(slots=True)
class Measured:
    """A child process's wall time and resource usage (from ``wait4``: it and its reaped children).

    Attributes:
        returncode: exit status (negative: killed by that signal).
        wall: seconds from spawn to exit.
        user, system: CPU seconds.
        maxrss_mib: peak resident set size of the largest process in the tree (MiB).
        stdout, stderr: captured output (when captured).
    """

    returncode: int
    wall: float
    user: float
    system: float
    maxrss_mib: float
    stdout: str = ""
    stderr: str = ""

    @property
    def cpu(self) -> float:
        """User + system CPU seconds."""
        return self.user + self.system


def run_measured(
    argv: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    capture: bool = True,
    timeout: float = 600.0,
) -> Measured:
    """Run ``argv`` to completion and measure it with ``wait4`` (its own rusage, not the harness's).

    Output goes to temporary files (not pipes), so a chatty child never blocks on a full pipe.
    """
    import tempfile

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(
            list(argv),
            stdout=out if capture else subprocess.DEVNULL,
            stderr=err if capture else subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
        )
        deadline = started + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.002)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0)
        err.seek(0)
        return Measured(
            returncode=proc.returncode,
            wall=wall,
            user=usage.ru_utime,
            system=usage.ru_stime,
            maxrss_mib=usage.ru_maxrss / 1024,
            stdout=out.read().decode(errors="replace") if capture else "",
            stderr=err.read().decode(errors="replace") if capture else "",
        )


def machine() -> dict[str, str]:
    """Describe this machine: cores, CPU model, memory, Python, kernel."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    except OSError:
        pass
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "memory": mem,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "kernel": platform.release(),
    }


def bench_env(**extra: str) -> dict[str, str]:
    """The environment for child runs: no inherited PIXXEL_/BATCH_EXPORT_ settings, the bench key."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PIXXEL_", "BATCH_EXPORT_"))}
    return base | {"PIXXEL_API_KEY": KEY, "PYTHONPATH": str(ROOT)} | extra


def log(message: str) -> None:
    """Progress line on stderr (the table goes to stdout)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------- selections


def distinct_selections(
    catalog: Any, count: int
) -> list[tuple[str, str, tuple[str, ...], tuple[str, ...]]]:
    """Return ``count`` distinct (aoi, insight, inputs, outputs) selections of a sandbox catalog.

    Each is a different package at the sandbox (ordered subsets of the insight's assets), so no two
    jobs share preparation.

    Raises:
        ValueError: the catalog has fewer distinct selections.
    """

    def ordered_subsets(items: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
        for size in range(len(items) + 1):
            yield from itertools.permutations(items, size)

    per_insight = [
        [
            (aoi.id, ins.id, inputs, outputs)
            for outputs in ordered_subsets(ins.outputs)
            for inputs in ordered_subsets(ins.inputs)
            if inputs or outputs
        ]
        for aoi in catalog.aois
        for ins in aoi.insights
    ]
    found: list[tuple[str, str, tuple[str, ...], tuple[str, ...]]] = []
    for row in itertools.zip_longest(*per_insight):  # round-robin over insights
        found.extend(item for item in row if item is not None)
        if len(found) >= count:
            return found[:count]
    raise ValueError(f"the sandbox catalog has only {len(found)} distinct selections")


def manifest_text(
    selections: Sequence[tuple[str, str, tuple[str, ...], tuple[str, ...]]],
    count: int,
    *,
    limits: str = "",
) -> str:
    """Return a manifest of ``count`` entries cycling through ``selections`` (distinct names)."""
    lines = ["version: 1"]
    if limits:
        lines.append(f"limits: {{{limits}}}")
    lines.append("exports:")
    for n in range(count):
        aoi, insight, inputs, outputs = selections[n % len(selections)]
        lines.append(
            f'  - {{aoi_id: "{aoi}", insight_id: "{insight}", name: "job{n:06d}", '
            f"inputs: {json.dumps(list(inputs))}, outputs: {json.dumps(list(outputs))}}}"
        )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------- sandbox


@dataclass
class SandboxProcess:
    """The sandbox in its own process (so it never shares the GIL with the client it serves).

    Attributes:
        api_url, storage_url: its origins.
        catalog: the seed-0 catalog (rebuilt here from the seed: it is deterministic).
    """

    proc: subprocess.Popen[str]
    api_url: str
    storage_url: str
    catalog: Any = field(default=None)

    def stats(self) -> dict[str, Any]:
        """Requests received so far: ``{"api": {status: n}, "storage": {...}, ...}``."""
        return self._ask("stats")

    def clear(self) -> None:
        """Forget the requests received so far."""
        self._ask("clear")

    def _ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the sandbox process died")
        answer: dict[str, Any] = json.loads(line)
        return answer


@contextmanager
def sandbox_process(**config: Any) -> Iterator[SandboxProcess]:
    """Start ``python -m benchmarks._sandbox_server`` with ``SandboxConfig(**config)``."""
    from batch_export.sandbox import Catalog

    proc = subprocess.Popen(
        [PYTHON, "-m", "benchmarks._sandbox_server", json.dumps({"keys": [KEY], **config})],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=bench_env(),
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        if len(line) != 3 or line[0] != "READY":
            raise RuntimeError(f"the sandbox did not start: {line}")
        yield SandboxProcess(proc, line[1], line[2], Catalog.generate(config.get("seed", 0)))
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
