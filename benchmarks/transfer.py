"""Transfer throughput, CPU per GiB and peak RSS, against curl and aria2c (issues 5, 13, 15).

Prerequisites: ``apt-get update && apt-get install -y nginx aria2`` (Debian's packages; nginx is
installed here with apt-get when missing and possible; without nginx the section says SKIPPED,
without aria2c the capped case skips its aria2c rows). nginx serves generated zip packages on
loopback: one of 2 GiB, eight of 256 MiB fetched concurrently, and one of 1 GiB from a location
with ``limit_rate 20m`` (20 MiB/s per connection, as object stores cap each connection). Side by
side, in the same run, on the same URLs and the same disk:

* *bare curl*: ``curl -o FILE`` (``curl --parallel`` for the 8): the transfer limit;
* *verified pipeline*: the same, then ``sha256sum`` and ``unzip -tq`` -- what gives a shell user the
  guarantees batch-export gives (byte count, digest, every member's CRC);
* *runner*: a real :class:`~batch_export.runner.Runner` in a child process (``benchmarks._fetch``),
  whose download path streams, hashes (SHA-256, block CRCs), checks every member's CRC, fsyncs and
  renames; default settings (8 connections per download) unless the label says otherwise.
  nginx's ETag is not an MD5, so no MD5 is promised or computed; the 2 GiB package is also
  fetched from a location that sends ``Content-MD5`` (as S3's single-part ETag would), where the
  runner computes and checks an MD5 as well (informational figure);
* *aria2c* ``-x8 -s8`` / ``-x16 -s16`` (capped case): the segmented-download reference.

Every figure is **whole process**, spawn to exit, as an operator's cron job sees it (interpreter
start-up, imports and the PUTs included); the runner's in-process time is shown beside it. The
methods take turns, :data:`REPEATS` rounds (the slow single-connection and verified-pipeline runs
fewer), so a burst of other work on this shared machine hits them alike; the **median** run counts
and the spread (fastest-slowest) is shown. CPU seconds are user + system of the process tree
(``wait4``), the median of the runs; peak RSS the largest.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from benchmarks._common import GIB, MIB, PYTHON, ROOT, Figure, bench_env, log, run_measured

REPEATS = 5
PIPELINE_REPEATS = 1
SLOW_REPEATS = 1  # single-connection runs of the capped case: ~50 s each
BIG = 2 * GIB
SMALL = 256 * MIB
SMALL_COUNT = 8
CAPPED = GIB
CAP = "20m"  # nginx limit_rate: bytes/s per connection (m = MiB)
_MEMBER = 64 * MIB
_PIECE = MIB


# ----------------------------------------------------------------------------------- packages


def make_zip(path: Path, size: int, seed: int) -> None:
    """Write a real ``ZIP_STORED`` zip of ``size`` bytes of member data (pseudo-random, fast)."""
    rng = random.Random(seed)
    base = rng.randbytes(2 * _PIECE)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for index in range(0, size, _MEMBER):
            length = min(_MEMBER, size - index)
            info = zipfile.ZipInfo(f"data/part{index // _MEMBER:04d}.tif", (2026, 11, 29, 0, 0, 0))
            info.file_size = length
            with archive.open(info, "w") as member:
                left = length
                while left > 0:
                    shift = rng.randrange(_PIECE)
                    piece = base[shift : shift + min(_PIECE, left)]
                    member.write(piece)
                    left -= len(piece)


# ----------------------------------------------------------------------------------- nginx


def find_nginx() -> tuple[str | None, str]:
    """Return (path to nginx or None, what happened) -- installing it with apt-get if missing."""
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )
    if found:
        return found, "present"
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None, "nginx is missing and cannot be installed here (not root or no apt-get)"
    log("transfer: nginx missing; apt-get install nginx")
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    for argv in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "nginx"],
    ):
        done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
            return None, f"`{' '.join(argv)}` failed: {tail[0]}"
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", 1) else None
    )
    return found, "installed with apt-get" if found else "apt-get installed no nginx binary"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def nginx_serving(
    binary: str, root: Path, work: Path, md5s: dict[str, str] | None = None
) -> Iterator[str]:
    """Serve ``root`` with nginx on a free loopback port; yield its base URL.

    Each file named in ``md5s`` (name -> base64 MD5) is also served at ``/md5/<name>`` with a
    ``Content-MD5`` header, as an origin that promises an MD5 (S3 single-part ETags do too).
    """
    port = _free_port()
    promised = "".join(
        f"        location = /md5/{name} {{ alias {root / name}; "
        f'add_header Content-MD5 "{digest}"; }}\n'
        for name, digest in (md5s or {}).items()
    )
    for sub in ("client", "proxy", "fastcgi", "uwsgi", "scgi"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    conf = work / "nginx.conf"
    conf.write_text(
        f"""
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 30;
    default_type application/zip;
    client_body_temp_path {work}/client;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ }}
        location /capped/ {{ alias {root}/; limit_rate {CAP}; }}
{promised}    }}
}}
"""
    )
    proc = subprocess.Popen(
        [binary, "-p", str(work), "-c", str(conf), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read() if proc.stderr else ""
                    raise RuntimeError(f"nginx did not start: {err.strip()[-300:]}") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ----------------------------------------------------------------------------------- methods


@dataclass(slots=True)
class Trial:
    """One timed run of one method: whole-process wall and CPU seconds, peak RSS (MiB), bytes.

    ``inner`` is the runner's own wall time (interpreter start-up excluded), when known.
    """

    wall: float
    cpu: float
    rss_mib: float
    bytes: int
    inner: float | None = None


@dataclass(slots=True)
class Summary:
    """The runs of one method: median wall and CPU, spread of the wall, peak RSS."""

    wall: float
    low: float
    high: float
    cpu: float
    rss_mib: float
    bytes: int
    inner: float | None
    runs: int

    @classmethod
    def of(cls, trials: list[Trial]) -> Summary:
        walls = [t.wall for t in trials]
        inner = [t.inner for t in trials if t.inner is not None]
        return cls(
            wall=statistics.median(walls),
            low=min(walls),
            high=max(walls),
            cpu=statistics.median(t.cpu for t in trials),
            rss_mib=max(t.rss_mib for t in trials),
            bytes=trials[0].bytes,
            inner=statistics.median(inner) if inner else None,
            runs=len(trials),
        )

    def speed(self) -> str:
        """``N MiB/s (median s, spread a-b s, n runs)``."""
        spread = f", {self.low:.2f}-{self.high:.2f} s" if self.runs > 1 else ""
        inner = f", in-process {self.inner:.2f} s" if self.inner is not None else ""
        return (
            f"{self.bytes / MIB / self.wall:,.0f} MiB/s ({self.wall:.2f} s{spread}, "
            f"{self.runs} run{'s' if self.runs > 1 else ''}{inner})"
        )

    def cpu_per_gib(self) -> float:
        """CPU seconds per GiB moved."""
        return self.cpu / (self.bytes / GIB)


def _curl(urls: list[str], files: list[Path]) -> str:
    pairs = " ".join(f"-o {f} {u}" for u, f in zip(urls, files, strict=True))
    parallel = f"--parallel --parallel-max {len(urls)} " if len(urls) > 1 else ""
    return f"curl -sS -f {parallel}{pairs}"


def _checks(files: list[Path]) -> str:
    names = " ".join(str(f) for f in files)
    return (
        f"sha256sum {names} >/dev/null && "
        f'for f in {names}; do unzip -tq "$f" >/dev/null || exit 1; done'
    )


def _shell(script: str, size: int) -> Trial:
    measured = run_measured(["bash", "-c", f"set -e; {script}"])
    if measured.returncode != 0:
        raise RuntimeError(f"`{script[:80]}...` failed: {measured.stderr.strip()[-300:]}")
    return Trial(measured.wall, measured.cpu, measured.maxrss_mib, size)


def bare_curl(urls: list[str], out: Path, size: int) -> Trial:
    """``curl -o`` (``--parallel`` for several) into ``out``."""
    files = [out / f"c{n}.zip" for n in range(len(urls))]
    return _shell(_curl(urls, files), size)


def verified_pipeline(urls: list[str], out: Path, size: int) -> Trial:
    """curl, then ``sha256sum`` and ``unzip -tq`` of every file."""
    files = [out / f"v{n}.zip" for n in range(len(urls))]
    return _shell(f"{_curl(urls, files)} && {_checks(files)}", size)


def aria2c(connections: int) -> Callable[[list[str], Path, int], Trial]:
    """``aria2c -xN -sN`` of one URL (the segmented-download reference)."""

    def method(urls: list[str], out: Path, size: int) -> Trial:
        (url,) = urls
        script = (
            f"aria2c -q -x{connections} -s{connections} --file-allocation=falloc "
            f"--allow-overwrite=true --auto-file-renaming=false -d {out} -o a.zip {url}"
        )
        return _shell(script, size)

    return method


def runner(connections: int | None = None) -> Callable[[list[str], Path, int], Trial]:
    """The runner's download path in a child process (``benchmarks._fetch``), whole process."""

    def method(urls: list[str], out: Path, size: int) -> Trial:
        request: dict[str, object] = {"urls": urls, "out": str(out)}
        if connections is not None:
            request["connections"] = connections
        measured = run_measured(
            [PYTHON, "-m", "benchmarks._fetch", json.dumps(request)], env=bench_env(), cwd=ROOT
        )
        lines = measured.stdout.strip().splitlines()
        if measured.returncode != 0 or not lines:
            raise RuntimeError(f"the runner child failed: {measured.stderr.strip()[-500:]}")
        got = json.loads(lines[-1])
        if got["exit_code"] != 0 or got["bytes"] < size:
            raise RuntimeError(f"the runner did not download everything: {got}")
        rss = max(measured.maxrss_mib, got["peak_rss_kib"] / 1024)
        return Trial(measured.wall, measured.cpu, rss, got["bytes"], inner=got["wall"])

    return method


RUNNER = "runner"
RUNNER_16 = "runner --connections 16"
RUNNER_1 = "runner --connections 1"
MD5_RUNNER = "runner, MD5 promised"
ARIA_8 = "aria2c -x8 -s8"
ARIA_16 = "aria2c -x16 -s16"
#: Runs of each method per scenario, by label (default: :data:`REPEATS`).
_FEWER = {
    "verified pipeline": PIPELINE_REPEATS,
    MD5_RUNNER: PIPELINE_REPEATS,
    RUNNER_16: PIPELINE_REPEATS,
}


def _rounds(
    name: str,
    methods: dict[str, tuple[list[str], Callable[[list[str], Path, int], Trial]]],
    work: Path,
    size: int,
    fewer: dict[str, int],
) -> dict[str, Summary]:
    """Run the methods in turns (alternating, round after round); summarise each one's runs."""
    trials: dict[str, list[Trial]] = {label: [] for label in methods}
    for round_ in range(REPEATS):
        for label, (urls, method) in methods.items():
            if round_ >= fewer.get(label, REPEATS):
                continue
            log(f"transfer: {name}: {label} (round {round_ + 1})")
            out = Path(tempfile.mkdtemp(dir=work, prefix="out-"))
            try:
                trials[label].append(method(urls, out, size))
            finally:
                shutil.rmtree(out, ignore_errors=True)  # unsynced dirty pages never hit the disk
                os.sync()
    return {label: Summary.of(runs) for label, runs in trials.items()}


# ----------------------------------------------------------------------------------- section


def run() -> list[Figure]:
    """Measure the scenarios with every method; return the figures."""
    binary, how = find_nginx()
    if binary is None:
        line = f"SKIPPED transfer/CPU/memory benchmarks: {how}"
        log(line)
        return [Figure("transfer", "SKIPPED (no nginx)", 0, "", "", None, line)]
    if not shutil.which("curl") or not shutil.which("unzip") or not shutil.which("sha256sum"):
        line = "SKIPPED transfer benchmarks: curl, unzip and sha256sum are needed"
        log(line)
        return [Figure("transfer", "SKIPPED (no curl/unzip)", 0, "", "", None, line)]
    work = Path(tempfile.mkdtemp(prefix="batch-export-bench-"))
    try:
        served = work / "www"
        served.mkdir()
        started = time.perf_counter()
        log(
            f"transfer: generating 1 x {BIG // MIB} MiB + {SMALL_COUNT} x {SMALL // MIB} MiB "
            f"+ 1 x {CAPPED // MIB} MiB zips"
        )
        make_zip(served / "big.zip", BIG, 1)
        make_zip(served / "capped.zip", CAPPED, 2)
        for n in range(SMALL_COUNT):
            make_zip(served / f"small{n}.zip", SMALL, 100 + n)
        md5 = hashlib.md5(usedforsecurity=False)
        with open(served / "big.zip", "rb") as handle:
            while block := handle.read(4 * MIB):
                md5.update(block)
        os.sync()  # the disk is quiet before anything is timed
        for path in (work, served, *served.iterdir()):
            path.chmod(0o755 if path.is_dir() else 0o644)  # nginx workers run as nobody
        log(f"transfer: packages ready in {time.perf_counter() - started:.1f} s; nginx {how}")
        md5s = {"big.zip": base64.b64encode(md5.digest()).decode()}
        with nginx_serving(binary, served, work / "nginx", md5s) as base:
            big = [f"{base}/big.zip"]
            small = [f"{base}/small{n}.zip" for n in range(SMALL_COUNT)]
            capped = [f"{base}/capped/capped.zip"]
            uncapped: dict[str, tuple[list[str], Callable[[list[str], Path, int], Trial]]] = {
                "bare curl": (big, bare_curl),
                "verified pipeline": (big, verified_pipeline),
                RUNNER: (big, runner()),
                RUNNER_16: (big, runner(16)),
                MD5_RUNNER: ([f"{base}/md5/big.zip"], runner()),
            }
            results = {
                "1 x 2 GiB": _rounds(
                    "1 x 2 GiB", uncapped, work, os.path.getsize(served / "big.zip"), _FEWER
                ),
                "8 x 256 MiB": _rounds(
                    "8 x 256 MiB",
                    {
                        "bare curl": (small, bare_curl),
                        "verified pipeline": (small, verified_pipeline),
                        RUNNER: (small, runner()),
                    },
                    work,
                    sum(os.path.getsize(served / f"small{n}.zip") for n in range(SMALL_COUNT)),
                    _FEWER,
                ),
            }
            capped_methods: dict[str, tuple[list[str], Callable[[list[str], Path, int], Trial]]]
            capped_methods = {
                "bare curl": (capped, bare_curl),
                RUNNER_1: (capped, runner(1)),
                RUNNER: (capped, runner()),
                RUNNER_16: (capped, runner(16)),
            }
            if shutil.which("aria2c"):
                capped_methods[ARIA_8] = (capped, aria2c(8))
                capped_methods[ARIA_16] = (capped, aria2c(16))
            else:
                log("transfer: aria2c missing (apt-get install -y aria2): capped case without it")
            results[f"1 x 1 GiB, {CAP}/connection"] = _rounds(
                "1 x 1 GiB capped",
                capped_methods,
                work,
                os.path.getsize(served / "capped.zip"),
                {"bare curl": SLOW_REPEATS, RUNNER_1: SLOW_REPEATS},
            )
        return _figures(results)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _figures(results: dict[str, dict[str, Summary]]) -> list[Figure]:
    figures: list[Figure] = []
    for name in ("1 x 2 GiB", "8 x 256 MiB"):
        trials = results[name]
        bare, pipe, mine = trials["bare curl"], trials["verified pipeline"], trials[RUNNER]
        raw = (
            f"whole process: runner {mine.speed()}; verified pipeline {pipe.speed()}; "
            f"bare curl {bare.speed()}"
        )
        for label, other, target in (("verified pipeline", pipe, 1.0), ("bare curl", bare, 0.6)):
            ratio = other.wall / mine.wall
            figures.append(
                Figure(
                    "transfer",
                    f"{name}: runner speed / {label}",
                    ratio,
                    "x",
                    f">= {target}",
                    ratio >= target,
                    raw,
                )
            )
    for name in ("1 x 2 GiB", "8 x 256 MiB"):
        trials = results[name]
        pipe, mine, bare = trials["verified pipeline"], trials[RUNNER], trials["bare curl"]
        ratio = mine.cpu_per_gib() / pipe.cpu_per_gib()
        figures.append(
            Figure(
                "cpu/memory",
                f"{name}: CPU s/GiB, runner / verified pipeline",
                ratio,
                "x",
                "<= 1.2",
                ratio <= 1.2,
                f"whole process: runner {mine.cpu_per_gib():.2f} CPU s/GiB, verified pipeline "
                f"{pipe.cpu_per_gib():.2f}, bare curl {bare.cpu_per_gib():.2f}",
            )
        )
    big = results["1 x 2 GiB"]
    for label in (MD5_RUNNER, RUNNER_16):
        trial = big[label]
        figures.append(
            Figure(
                "transfer",
                f"1 x 2 GiB, {label}: speed / bare curl",
                big["bare curl"].wall / trial.wall,
                "x",
                "",
                None,
                f"{trial.speed()}, {trial.cpu_per_gib():.2f} CPU s/GiB"
                + (
                    ": Content-MD5 makes it compute and check an MD5 too"
                    if label == MD5_RUNNER
                    else ""
                ),
            )
        )
    capped_name = next(name for name in results if name.startswith("1 x 1 GiB"))
    capped = results[capped_name]
    peak = max(big[RUNNER_16].rss_mib, capped[RUNNER_16].rss_mib)
    figures.append(
        Figure(
            "cpu/memory",
            "peak RSS of the runner at --connections 16 (2 GiB uncapped, 1 GiB capped)",
            peak,
            "MiB",
            "<= 100 MiB",
            peak <= 100,
            f"VmHWM of the runner process (interpreter and imports included): 2 GiB uncapped "
            f"{big[RUNNER_16].rss_mib:.0f} MiB, 1 GiB capped (all 16 open) "
            f"{capped[RUNNER_16].rss_mib:.0f} MiB; default (8) {big[RUNNER].rss_mib:.0f} MiB",
        )
    )
    many = results["8 x 256 MiB"][RUNNER].rss_mib
    figures.append(
        Figure(
            "cpu/memory",
            "peak RSS of the runner, 8 x 256 MiB at once (16 streams at the start)",
            many,
            "MiB",
            "",
            None,
            "VmHWM of the runner process: 8 downloads, each a lead connection and one for its "
            "last range; two 1 MiB pieces per connection plus the interpreter",
        )
    )
    speeds = "; ".join(f"{label} {trial.speed()}" for label, trial in capped.items())
    pairs = [(RUNNER, ARIA_8, 0.9), (RUNNER_16, ARIA_16, 0.9)]
    for mine_label, other_label, target in pairs:
        if other_label not in capped:
            figures.append(
                Figure(
                    "capped",
                    f"{capped_name}: {mine_label} / {other_label}",
                    0,
                    "",
                    "",
                    None,
                    "SKIPPED: aria2c missing (apt-get install -y aria2)",
                )
            )
            continue
        ratio = capped[other_label].wall / capped[mine_label].wall
        figures.append(
            Figure(
                "capped",
                f"{capped_name}: {mine_label} speed / {other_label}",
                ratio,
                "x",
                f">= {target}",
                ratio >= target,
                speeds,
            )
        )
    one = capped[RUNNER_1]
    figures.append(
        Figure(
            "capped",
            f"{capped_name}: {RUNNER_1} speed / bare curl",
            capped["bare curl"].wall / one.wall,
            "x",
            "",
            None,
            f"{RUNNER_1} {one.speed()}; bare curl {capped['bare curl'].speed()}",
        )
    )
    return figures
