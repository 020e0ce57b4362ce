"""Output to object storage (SPEC §8): ``s3://bucket/prefix`` URLs, the start-up check, uploads.

A package is staged and verified on local disk as for a local output, then uploaded here. An object
under its final key is always complete and verified:

- below one part size: one ``PutObject`` carrying ``Content-MD5``;
- above: a multipart upload, every ``UploadPart`` carrying its ``Content-MD5`` (the store refuses a
  part whose bytes changed on the way: ``BadDigest``; the part is re-sent), completed only after the
  last part; the completed object's multipart ETag (MD5 of the parts' MD5s, ``-N``) is compared with
  what was sent;
- the object's metadata records ``sha256`` (``x-amz-meta-sha256``).

A multipart upload that fails is aborted. One cut short by a crash or a signal is found again by
the next run (``ListMultipartUploads`` for the exact key, then ``ListParts``): when every part the
store holds is the staged file's part (same size, ETag = its MD5) the upload is resumed and
completed; otherwise it is aborted and started again. Nothing is left behind without the README
saying so (the ``AbortIncompleteMultipartUpload`` lifecycle rule covers a bucket whose jobs are never
run again).

Library: aiobotocore (botocore over aiohttp, which the project already uses). It exposes the upload
id and the parts, so a multipart upload resumes across processes and is aborted by id; it reads the
standard credential chain (environment, ``AWS_PROFILE`` and ``~/.aws`` files, SSO, instance roles) and
``AWS_ENDPOINT_URL``. Botocore's own retries are off: every request is retried here with the
project's :class:`~batch_export.retry.RetryPolicy`, so request counts are the tool's own.

Error codes (SPEC §8): ``store_auth`` (credentials refused; not retried), ``store_not_found`` (no
such bucket; not retried), ``store_error`` (5xx, network, a refused part: retried with backoff).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import logging
import os
import re
import stat
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any, TypeVar, cast
from urllib.parse import urlsplit

from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
    ProfileNotFound,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from batch_export.clock import Clock, SystemClock
from batch_export.errors import (
    JobError,
    ObjectStoreError,
    RetriesExhausted,
    StoreAuthError,
    StoreNotFound,
    UsageError,
)
from batch_export.http import ProxyRules
from batch_export.redact import Redactor
from batch_export.retry import RetryPolicy
from batch_export.types import Job, JobRecord

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from types_aiobotocore_s3 import S3Client

__all__ = [
    "DEFAULT_PART_SIZE",
    "DEFAULT_UPLOAD_CONCURRENCY",
    "ENDPOINT_ENV",
    "MAX_PARTS",
    "SECRET_ENV",
    "ObjectInfo",
    "ObjectUploader",
    "S3Store",
    "StoreUrl",
    "UploadResult",
    "default_state_dir",
    "multipart_etag",
    "object_output_dirs",
    "open_output",
    "parse_store_url",
    "part_size_for",
    "store_proxies",
    "store_secrets",
]

#: Bytes per part of a multipart upload (S3 allows 5 MiB to 5 GiB; 10,000 parts at most).
DEFAULT_PART_SIZE = 16 * 1024 * 1024
#: Parts of one upload sent at once.
DEFAULT_UPLOAD_CONCURRENCY = 4
#: S3's limit on the parts of one multipart upload (AWS S3 User Guide, "Multipart upload limits").
MAX_PARTS = 10_000
#: The variables naming a non-AWS endpoint (botocore reads them too; AWS SDKs' "service-specific
#: endpoints": the S3-specific one wins).
ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
#: Environment variables whose values are credentials: redacted everywhere (SPEC §8).
SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ACCESS_KEY_ID",
)
#: Schemes SPEC §8 names that this build cannot write (no library support tested here).
_UNSUPPORTED = {"gs": "Google Cloud Storage", "az": "Azure Blob Storage", "abfs": "Azure"}
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# S3 bucket naming rules (AWS S3 User Guide, "General purpose bucket naming rules").
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_MULTIPART_ETAG = re.compile(r'^"?([0-9a-f]{32})-(\d+)"?$')
_PLAIN_ETAG = re.compile(r'^"?([0-9a-f]{32})"?$')
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_AUTH_CODES = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "AllAccessDisabled",
        "AccountProblem",
        "InvalidClientTokenId",
        "Forbidden",
    }
)
#: 4xx codes that mean the bytes went wrong on the way or the store was slow: send again.
_RETRYABLE_4XX = frozenset({"BadDigest", "InvalidDigest", "RequestTimeout", "IncompleteBody"})
_T = TypeVar("_T")
log = logging.getLogger("batch_export")


@dataclass(frozen=True, slots=True)
class StoreUrl:
    """An object-store output: ``s3://bucket/prefix``.

    Attributes:
        scheme: ``"s3"``.
        bucket: the bucket name.
        prefix: the key prefix without leading or trailing ``/`` (``""`` for the bucket's root).
    """

    scheme: str
    bucket: str
    prefix: str

    def key_for(self, relpath: str) -> str:
        """Return the object key of a package at ``relpath`` (POSIX, relative) under the prefix."""
        return f"{self.prefix}/{relpath}" if self.prefix else relpath

    def __str__(self) -> str:
        """Return the URL as the user writes it (``s3://bucket/prefix``)."""
        return f"{self.scheme}://{self.bucket}/{self.prefix}".rstrip("/")


def parse_store_url(text: str) -> StoreUrl | None:
    """Return the :class:`StoreUrl` of ``text``, or None when ``text`` is no URL (a local path).

    Raises:
        UsageError: a URL this build cannot write (``gs://``, ``az://``, any other scheme), a bucket
            name S3 would refuse, or a prefix with ``.``/``..`` segments.
    """
    match = _SCHEME.match(text)
    if not match:
        return None
    scheme = match.group(1).lower()
    if scheme != "s3":
        what = _UNSUPPORTED.get(scheme, f"{scheme}://")
        raise UsageError(
            f"output {scheme}://… ({what}) is not supported: only s3:// object stores "
            "(AWS S3 or S3-compatible via AWS_ENDPOINT_URL), or a local folder"
        )
    parts = urlsplit(text)
    if parts.query or parts.fragment or "@" in parts.netloc:
        raise UsageError("an s3:// output is s3://bucket/prefix: no user, query or fragment")
    bucket = parts.netloc
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise UsageError(
            f"s3:// bucket name {bucket!r} is not valid: 3-63 characters of a-z, 0-9, '.', '-'"
        )
    segments = [segment for segment in parts.path.split("/") if segment]
    if any(segment in {".", ".."} for segment in segments):
        raise UsageError("an s3:// prefix may not hold '.' or '..' segments")
    return StoreUrl(scheme=scheme, bucket=bucket, prefix="/".join(segments))


def default_state_dir(manifest_dir: Path, url: StoreUrl) -> Path:
    """Return ``<manifest folder>/.batch-export/<scheme>/<bucket>/<prefix>`` (SPEC §8), sanitised.

    Every prefix segment becomes one folder name of ``[A-Za-z0-9._-]`` (others → ``_``).
    """
    folder = manifest_dir / ".batch-export" / url.scheme / url.bucket
    for segment in PurePosixPath(url.prefix).parts if url.prefix else ():
        folder /= _UNSAFE.sub("_", segment)
    return folder


def object_output_dirs(
    url: StoreUrl, *, manifest_path: Path, state_dir: Path | None, staging_dir: Path | None
) -> tuple[Path, Path]:
    """Return ``(staging dir, state dir)`` of an object-store output, absolute (SPEC §8).

    The state dir: ``--state-dir``, else :func:`default_state_dir` beside the manifest. The staging
    dir (where packages are downloaded and verified before the upload; the runner's output dir):
    ``--staging-dir``, else ``<state dir>/staging``. Both must be on a local file system.
    """
    state = (
        state_dir.absolute()
        if state_dir
        else default_state_dir(manifest_path.absolute().parent, url)
    )
    return (staging_dir.absolute() if staging_dir else state / "staging"), state


@contextlib.asynccontextmanager
async def open_output(
    out_url: str,
    *,
    redactor: Redactor,
    retries: int,
    backoff_base: float,
    backoff_cap: float,
    read_timeout: float,
    downloads: int,
    check_existing: bool = False,
    clock: Clock | None = None,
) -> AsyncIterator[ObjectUploader]:
    """Connect to the output's store, check it once (before any API request), yield the uploader.

    The credentials in use are added to ``redactor``. Durations in seconds; ``downloads`` sizes the
    connection pool (``downloads x`` :data:`DEFAULT_UPLOAD_CONCURRENCY`).

    Raises:
        UsageError: the URL is unusable, or the start-up check failed (codes ``store_not_found``,
            ``store_auth``, ``store_error``): exit 2, nothing requested from the API.
    """
    url = parse_store_url(out_url)
    if url is None:
        raise UsageError(f"{out_url} is not an object-store URL")
    for secret in store_secrets():
        redactor.add(secret)
    policy = RetryPolicy(
        clock=clock or SystemClock(),
        retries=retries,
        backoff_base=backoff_base,
        backoff_cap=backoff_cap,
    )
    async with contextlib.AsyncExitStack() as stack:
        try:
            store = await stack.enter_async_context(
                S3Store.connect(
                    url,
                    retry=policy,
                    connections=max(1, downloads) * DEFAULT_UPLOAD_CONCURRENCY,
                    read_timeout=read_timeout,
                )
            )
        except StoreAuthError as exc:
            raise UsageError(f"{url}: {exc.message}", code=exc.code) from None
        for secret in store.secrets():
            redactor.add(secret)
        await store.check()
        yield ObjectUploader(store, check_existing=check_existing)


def store_proxies(endpoint_url: str | None, region: str | None) -> dict[str, str]:
    """Return botocore's ``proxies`` for the store: ``{scheme: proxy URL}``, or ``{}`` for none.

    Judged by :class:`~batch_export.http.ProxyRules` (``HTTPS_PROXY``/``HTTP_PROXY``/``ALL_PROXY``,
    ``NO_PROXY``, loopback never) on the endpoint, or on ``https://s3.<region>.amazonaws.com``.
    An empty mapping keeps botocore from reading the variables itself.

    Raises:
        UsageError: a proxy variable is not a usable URL.
    """
    target = endpoint_url or f"https://s3.{region or 'us-east-1'}.amazonaws.com"
    proxy = ProxyRules.from_env().proxy_for(target)
    if proxy is None:
        return {}
    return {urlsplit(target).scheme: str(proxy.url)}


def store_secrets(environ: Mapping[str, str] | None = None) -> list[str]:
    """Return the credential values in ``environ`` (default: the process's) to redact."""
    env = os.environ if environ is None else environ
    return [env[name] for name in SECRET_ENV if env.get(name)]


def part_size_for(size: int, *, part_size: int = DEFAULT_PART_SIZE) -> int:
    """Return the part size (bytes) for an object of ``size`` bytes: at least ``part_size``.

    Grows in whole MiB so that no upload needs more than :data:`MAX_PARTS` parts.
    """
    mib = 1024 * 1024
    needed = -(-size // MAX_PARTS)
    return max(part_size, -(-needed // mib) * mib)


def multipart_etag(part_md5s: list[bytes]) -> str:
    """Return the ETag S3 gives a completed multipart upload: ``md5(md5_1 … md5_N)-N`` (hex).

    Source: widely documented S3 behaviour (not part of the API contract; stores with KMS or other
    encryption differ, so a mismatch is judged only when the store's ETag has this form).
    """
    return f"{hashlib.md5(b''.join(part_md5s)).hexdigest()}-{len(part_md5s)}"


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What a HEAD tells of an object: ``size`` in bytes, ``sha256`` from its metadata (or None)."""

    size: int
    sha256: str | None


@dataclass(frozen=True, slots=True)
class UploadResult:
    """A confirmed upload.

    Attributes:
        key: the object key.
        etag: the object's ETag as the store gave it.
        parts: parts of the upload (1 for a single ``PutObject``).
        parts_sent: parts sent by this call (fewer than ``parts`` when it resumed an upload).
        resumed: True when an interrupted multipart upload was resumed.
    """

    key: str
    etag: str
    parts: int
    parts_sent: int
    resumed: bool


@dataclass(frozen=True, slots=True)
class _Part:
    number: int  # 1-based
    offset: int  # bytes
    size: int  # bytes


def _plan(size: int, part_size: int) -> list[_Part]:
    count = max(1, -(-size // part_size))
    return [
        _Part(number=i + 1, offset=i * part_size, size=min(part_size, size - i * part_size))
        for i in range(count)
    ]


#: Bytes read at a time while hashing a part or sending it (the only part bytes held in memory).
_CHUNK = 1024 * 1024


def _part_md5(path: Path, part: _Part) -> bytes:
    """Return the MD5 digest of one part of the staged file, read in :data:`_CHUNK` pieces.

    Raises:
        ObjectStoreError: ``local_io``: the staged file is shorter than recorded.
    """
    digest = hashlib.md5()
    with path.open("rb") as handle:
        handle.seek(part.offset)
        left = part.size
        while left > 0:
            chunk = handle.read(min(_CHUNK, left))
            if not chunk:
                raise ObjectStoreError(
                    f"the staged file {path} is shorter than recorded",
                    code="local_io",
                    retryable=False,
                )
            digest.update(chunk)
            left -= len(chunk)
    return digest.digest()


class _PartReader(io.RawIOBase):
    """One part of the staged file as a seekable stream of its own (offset 0 = the part's start).

    The request body of a part: botocore hashes it and aiohttp sends it in small reads, so a
    part is never held in memory whole (a ``bytes`` body is copied once more by aiohttp's
    ``BytesIOPayload``: 2 x 16 MiB per part in flight). No ``fileno()``: the length is the part's.
    """

    def __init__(self, path: Path, part: _Part) -> None:
        super().__init__()
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._start = part.offset
        self._size = part.size
        self._pos = 0

    def readable(self) -> bool:
        """Return True: the part can be read."""
        return True

    def seekable(self) -> bool:
        """Return True: botocore rewinds the body after hashing it."""
        return True

    def tell(self) -> int:
        """Return the position in the part (bytes)."""
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """Move within the part (clamped to it); return the new position (bytes)."""
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        self._pos = min(max(0, base + offset), self._size)
        return self._pos

    def read(self, size: int = -1) -> bytes:
        """Read at least :data:`_CHUNK` bytes (or up to the part's end) when ``size`` is smaller.

        aiohttp asks for 64 KiB at a time, each read a hop to a worker thread: 1 MiB reads cost
        a sixteenth of those hops (a 1 GiB upload took 1.5x as long with 64 KiB reads).
        """
        if size is not None and 0 <= size < _CHUNK:
            size = _CHUNK
        return super().read(size) or b""

    def readinto(self, buffer: Any) -> int:
        """Read up to ``len(buffer)`` bytes of the part into ``buffer``; return how many."""
        view = memoryview(buffer).cast("B")
        wanted = min(len(view), self._size - self._pos)
        if wanted <= 0:
            return 0
        count = os.preadv(self._fd, [view[:wanted]], self._start + self._pos)
        self._pos += count
        return count

    def close(self) -> None:
        """Close the file descriptor."""
        if not self.closed:
            os.close(self._fd)
        super().close()


class S3Store:
    """One S3 (or S3-compatible) bucket: check it, upload staged files to it, HEAD its objects.

    Use :meth:`connect`; the client (and its connection pool) lives as long as the context.

    Args:
        client: an aiobotocore S3 client.
        url: the output URL.
        retry: the retry policy (count, backoff, clock) for every request.
        part_size: bytes per part (at least 5 MiB; grown for very big files, :func:`part_size_for`).
        concurrency: parts of one upload sent at once.
        endpoint: the endpoint's ``host:port`` for messages.
    """

    def __init__(
        self,
        client: S3Client,
        url: StoreUrl,
        *,
        retry: RetryPolicy,
        part_size: int = DEFAULT_PART_SIZE,
        concurrency: int = DEFAULT_UPLOAD_CONCURRENCY,
        endpoint: str = "s3",
    ) -> None:
        self._client = client
        self.url = url
        self._retry = retry
        self._part_size = part_size
        self._concurrency = max(1, concurrency)
        self._endpoint = endpoint
        self._secrets: list[str] = []
        #: Requests sent to the store (every attempt), for the report's ``requests.store``.
        self.requests_sent = 0

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls,
        url: StoreUrl,
        *,
        retry: RetryPolicy,
        part_size: int = DEFAULT_PART_SIZE,
        concurrency: int = DEFAULT_UPLOAD_CONCURRENCY,
        connections: int = 16,
        read_timeout: float = 60.0,
    ) -> AsyncIterator[S3Store]:
        """Open a client for ``url`` from the standard credential chain and endpoint variables.

        Everything comes from the process environment and botocore's files, as for the AWS CLI:
        ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``, ``AWS_PROFILE``,
        ``~/.aws/config`` and ``~/.aws/credentials``, SSO, instance roles; ``AWS_REGION``;
        ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` for an S3-compatible store (path-style).

        ``connections`` bounds the client's connection pool; ``read_timeout`` is in seconds.

        Raises:
            StoreAuthError: no credentials anywhere, or ``AWS_PROFILE`` names no profile.
        """
        env = os.environ
        endpoint_url = next((env[name] for name in ENDPOINT_ENV if env.get(name)), None)
        config = AioConfig(
            retries={"total_max_attempts": 1, "mode": "standard"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            max_pool_connections=max(1, connections),
            connect_timeout=min(read_timeout, 30.0),
            read_timeout=read_timeout,
            # S3-compatible stores (SeaweedFS, MinIO, Ceph) answer path-style requests everywhere.
            s3={"addressing_style": "path"} if endpoint_url else None,
            # The project's proxy rules, not botocore's own reading of the variables: loopback
            # is never proxied and NO_PROXY is judged alike for the API, storage and the store.
            proxies=store_proxies(
                endpoint_url, env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
            ),
            user_agent_extra="batch-export",
        )
        try:
            session = AioSession()
            region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None
            client_cm = session.create_client(
                "s3", region_name=region, endpoint_url=endpoint_url, config=config
            )
        except ProfileNotFound:
            raise StoreAuthError(
                "AWS_PROFILE names a profile that is not in ~/.aws/config or ~/.aws/credentials",
                retryable=False,
            ) from None
        shown = _host_port(endpoint_url) if endpoint_url else "AWS S3"
        async with client_cm as client:
            store = cls(
                client,
                url,
                retry=retry,
                part_size=part_size,
                concurrency=concurrency,
                endpoint=shown,
            )
            try:
                credentials = await session.get_credentials()
            except BotoCoreError:
                credentials = None
            if credentials is not None:
                frozen = await credentials.get_frozen_credentials()
                store._secrets = [
                    value for value in (frozen.secret_key, frozen.token, frozen.access_key) if value
                ]
            yield store

    def secrets(self) -> list[str]:
        """Return the credential values the client uses (for the redactor), once connected."""
        return list(self._secrets)

    # ----------------------------------------------------------------------------- operations

    async def check(self) -> None:
        """Check once at start that the bucket exists and takes the credentials (``HeadBucket``).

        Raises:
            UsageError: code ``store_not_found`` (no bucket), ``store_auth`` (credentials refused
                or missing) or ``store_error`` (unreachable, 5xx after the retries): exit 2.
        """
        try:
            await self._call(
                "HeadBucket", "", lambda: self._client.head_bucket(Bucket=self.url.bucket)
            )
        except (ObjectStoreError, RetriesExhausted) as exc:
            raise UsageError(f"{self.url}: {exc.message}", code=exc.code) from None

    async def stat(self, key: str, *, job_key: str = "") -> ObjectInfo | None:
        """Return the size and ``sha256`` metadata of object ``key``, or None when it is missing.

        Raises:
            ObjectStoreError: and subclasses, as for uploads.
            RetriesExhausted: ``store_error`` retries spent.
        """
        try:
            answer = await self._call(
                "HeadObject",
                job_key,
                lambda: self._client.head_object(Bucket=self.url.bucket, Key=key),
                missing_ok=True,
            )
        except _Missing:
            return None
        metadata = {name.lower(): value for name, value in answer.get("Metadata", {}).items()}
        return ObjectInfo(size=int(answer["ContentLength"]), sha256=metadata.get("sha256"))

    async def upload(
        self,
        path: Path,
        key: str,
        *,
        size: int,
        sha256: str,
        job_key: str = "",
        on_bytes: Callable[[int], None] | None = None,
    ) -> UploadResult:
        """Upload the staged, verified file ``path`` (``size`` bytes) as object ``key``.

        The object appears only when complete; its metadata records ``sha256``. An interrupted
        multipart upload of the same key left by an earlier run is resumed when the store holds
        only parts of this very file, else aborted. ``on_bytes(n)`` is called as parts are
        confirmed (bytes of this call only).

        Raises:
            StoreAuthError: credentials refused (not retried; aborts the multipart upload).
            StoreNotFound: the bucket is gone.
            ObjectStoreError: a non-retryable answer (e.g. the final ETag is not the parts sent).
            RetriesExhausted: ``store_error`` retries spent on one request.
        """
        part_size = part_size_for(size, part_size=self._part_size)
        if size <= part_size:
            return await self._put_single(
                path, key, size=size, sha256=sha256, job_key=job_key, on_bytes=on_bytes
            )
        return await self._put_multipart(
            path,
            key,
            parts=_plan(size, part_size),
            sha256=sha256,
            job_key=job_key,
            on_bytes=on_bytes,
        )

    async def abort_leftovers(self, key: str, *, job_key: str = "") -> int:
        """Abort every unfinished multipart upload of exactly ``key``; return how many.

        Raises:
            ObjectStoreError: and subclasses, as for uploads.
        """
        uploads = await self._uploads_of(key, job_key)
        for upload_id in uploads:
            await self._abort(key, upload_id, job_key)
        return len(uploads)

    # ---------------------------------------------------------------------------- internals

    async def _put_single(
        self,
        path: Path,
        key: str,
        *,
        size: int,
        sha256: str,
        job_key: str,
        on_bytes: Callable[[int], None] | None,
    ) -> UploadResult:
        part = _Part(number=1, offset=0, size=size)

        async def put() -> Any:
            md5 = await asyncio.to_thread(_part_md5, path, part)
            with _PartReader(path, part) as body:
                return await self._client.put_object(
                    Bucket=self.url.bucket,
                    Key=key,
                    Body=cast("IO[bytes]", body),
                    ContentLength=size,
                    ContentMD5=base64.b64encode(md5).decode("ascii"),
                    ContentType="application/zip",
                    Metadata={"sha256": sha256},
                )

        answer = await self._call("PutObject", job_key, put)
        if on_bytes is not None:
            on_bytes(size)
        return UploadResult(
            key=key, etag=str(answer.get("ETag", "")), parts=1, parts_sent=1, resumed=False
        )

    async def _put_multipart(
        self,
        path: Path,
        key: str,
        *,
        parts: list[_Part],
        sha256: str,
        job_key: str,
        on_bytes: Callable[[int], None] | None,
    ) -> UploadResult:
        upload_id, held = await self._resumable(path, key, parts, job_key)
        resumed = upload_id is not None
        if upload_id is None:
            answer = await self._call(
                "CreateMultipartUpload",
                job_key,
                lambda: self._client.create_multipart_upload(
                    Bucket=self.url.bucket,
                    Key=key,
                    ContentType="application/zip",
                    Metadata={"sha256": sha256},
                ),
            )
            upload_id = str(answer["UploadId"])
        md5s: dict[int, bytes] = dict(held)
        todo = [part for part in parts if part.number not in held]
        try:
            await self._send_parts(path, key, upload_id, todo, md5s, job_key, on_bytes)
            ordered = [md5s[part.number] for part in parts]
            completed = await self._call(
                "CompleteMultipartUpload",
                job_key,
                lambda: self._client.complete_multipart_upload(
                    Bucket=self.url.bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={
                        "Parts": [
                            {"PartNumber": part.number, "ETag": f'"{md5s[part.number].hex()}"'}
                            for part in parts
                        ]
                    },
                ),
            )
        except JobError:
            with contextlib.suppress(JobError):
                await self._abort(key, upload_id, job_key)
            raise
        except asyncio.CancelledError:
            log.warning(
                "upload of s3://%s/%s interrupted: the next run resumes it (a bucket lifecycle "
                "rule AbortIncompleteMultipartUpload removes it if no run comes)",
                self.url.bucket,
                key,
                extra={"event": "upload_interrupted"},
            )
            raise
        etag = str(completed.get("ETag", ""))
        match = _MULTIPART_ETAG.match(etag)
        if match and f"{match.group(1)}-{match.group(2)}" != multipart_etag(ordered):
            raise ObjectStoreError(
                f"the store completed {key} with ETag {etag}, not the parts sent",
                job_key=job_key,
                retryable=False,
            )
        return UploadResult(
            key=key, etag=etag, parts=len(parts), parts_sent=len(todo), resumed=resumed
        )

    async def _send_parts(
        self,
        path: Path,
        key: str,
        upload_id: str,
        todo: list[_Part],
        md5s: dict[int, bytes],
        job_key: str,
        on_bytes: Callable[[int], None] | None,
    ) -> None:
        gate = asyncio.Semaphore(self._concurrency)

        async def send(part: _Part) -> None:
            async with gate:

                async def put() -> Any:
                    # Read again for every attempt: a refused part is re-sent from the staged file.
                    md5 = await asyncio.to_thread(_part_md5, path, part)
                    md5s[part.number] = md5
                    with _PartReader(path, part) as body:
                        return await self._client.upload_part(
                            Bucket=self.url.bucket,
                            Key=key,
                            UploadId=upload_id,
                            PartNumber=part.number,
                            Body=cast("IO[bytes]", body),
                            ContentLength=part.size,
                            ContentMD5=base64.b64encode(md5).decode("ascii"),
                        )

                await self._call("UploadPart", job_key, put)
            if on_bytes is not None:
                on_bytes(part.size)

        try:
            async with asyncio.TaskGroup() as group:
                for part in todo:
                    group.create_task(send(part))
        except BaseExceptionGroup as failed:
            # One part failed for good and the group cancelled the others: raise that one error
            # (a refusal of the credentials first: it is the run's, not the job's).
            errors = _job_errors(failed)
            if not errors:
                raise
            errors.sort(key=lambda error: not isinstance(error, StoreAuthError))
            raise errors[0] from None

    async def _resumable(
        self, path: Path, key: str, parts: list[_Part], job_key: str
    ) -> tuple[str | None, dict[int, bytes]]:
        """Find an interrupted upload of ``key`` holding only parts of ``path``; abort the others.

        Returns ``(upload_id, {part number: md5})`` of the upload to resume, or ``(None, {})``.
        """
        try:
            uploads = await self._uploads_of(key, job_key)
        except StoreAuthError:
            # No s3:ListBucketMultipartUploads: nothing to resume is known; a fresh upload it is
            # (a refusal of the credentials themselves shows again at CreateMultipartUpload).
            log.warning(
                "cannot list the unfinished uploads of s3://%s/%s (permission): starting afresh",
                self.url.bucket,
                key,
                extra={"event": "upload_list_refused"},
            )
            return None, {}
        chosen: tuple[str | None, dict[int, bytes]] = (None, {})
        by_number = {part.number: part for part in parts}
        for upload_id in reversed(uploads):  # the newest first
            if chosen[0] is None:
                held = await self._matching_parts(path, key, upload_id, by_number, job_key)
                if held is not None:
                    chosen = (upload_id, held)
                    continue
            await self._abort(key, upload_id, job_key)
        return chosen

    async def _matching_parts(
        self, path: Path, key: str, upload_id: str, by_number: dict[int, _Part], job_key: str
    ) -> dict[int, bytes] | None:
        """Return the MD5s of the upload's parts if every one is this file's part, else None."""
        held: dict[int, bytes] = {}
        marker = 0
        while True:
            answer = await self._call(
                "ListParts",
                job_key,
                lambda marker=marker: self._client.list_parts(  # type: ignore[misc]
                    Bucket=self.url.bucket, Key=key, UploadId=upload_id, PartNumberMarker=marker
                ),
                missing_ok=True,
            )
            for listed in answer.get("Parts", []):
                part = by_number.get(int(listed["PartNumber"]))
                match = _PLAIN_ETAG.match(str(listed.get("ETag", "")))
                if part is None or int(listed["Size"]) != part.size or not match:
                    return None
                md5 = await asyncio.to_thread(_part_md5, path, part)
                if md5.hex() != match.group(1):
                    return None
                held[part.number] = md5
            if not answer.get("IsTruncated"):
                return held
            marker = int(answer.get("NextPartNumberMarker", 0))

    async def _uploads_of(self, key: str, job_key: str) -> list[str]:
        """Return the ids of unfinished multipart uploads of exactly ``key``, oldest first."""
        found: list[tuple[str, str]] = []
        key_marker: str | None = None
        id_marker: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.url.bucket, "Prefix": key}
            if key_marker is not None:
                kwargs["KeyMarker"] = key_marker
                kwargs["UploadIdMarker"] = id_marker or ""
            answer = await self._call(
                "ListMultipartUploads",
                job_key,
                lambda kwargs=kwargs: self._client.list_multipart_uploads(**kwargs),  # type: ignore[misc]
            )
            for upload in answer.get("Uploads", []):
                if upload.get("Key") == key and upload.get("UploadId"):
                    found.append((str(upload.get("Initiated", "")), str(upload["UploadId"])))
            if not answer.get("IsTruncated"):
                break
            key_marker = answer.get("NextKeyMarker")
            id_marker = answer.get("NextUploadIdMarker")
            if not key_marker:
                break
        return [upload_id for _, upload_id in sorted(found)]

    async def _abort(self, key: str, upload_id: str, job_key: str) -> None:
        try:
            await self._call(
                "AbortMultipartUpload",
                job_key,
                lambda: self._client.abort_multipart_upload(
                    Bucket=self.url.bucket, Key=key, UploadId=upload_id
                ),
                missing_ok=True,
            )
        except _Missing:
            pass  # already gone

    async def _call(
        self,
        operation: str,
        job_key: str,
        request: Callable[[], Awaitable[_T]],
        *,
        missing_ok: bool = False,
    ) -> _T:
        """Send one request, retrying ``store_error`` answers with the retry policy.

        Raises:
            _Missing: a 404 when ``missing_ok``.
            ObjectStoreError: (and subclasses) a non-retryable answer.
            RetriesExhausted: retries spent (code ``store_error``).
        """
        budget = self._retry.budget(job_key)
        while True:
            self.requests_sent += 1
            try:
                return await request()
            except (ClientError, BotoCoreError) as exc:
                error, s3_code = self._translate(exc, operation, job_key)
            if missing_ok and error.http_status == 404 and s3_code != "NoSuchBucket":
                raise _Missing from None
            if not error.retryable:
                raise error
            await budget.spend(error)

    def _translate(
        self, exc: BaseException, operation: str, job_key: str
    ) -> tuple[ObjectStoreError, str]:
        """Turn a botocore error into the project's tree and the store's error code.

        The message names the operation, the endpoint and the store's code, never a credential.
        """
        error, s3_code = self._classify(exc, operation, job_key), ""
        if isinstance(exc, ClientError):
            s3_code = str(exc.response.get("Error", {}).get("Code", ""))
        return error, s3_code

    def _classify(self, exc: BaseException, operation: str, job_key: str) -> ObjectStoreError:
        where = f"{operation} at {self._endpoint}"
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return StoreAuthError(
                "no usable object-store credentials: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or ~/.aws/credentials",
                job_key=job_key,
                retryable=False,
            )
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            text = f"{code or status} from {where}"
            if code in _AUTH_CODES or status in {401, 403}:
                return StoreAuthError(
                    f"the object store refused the credentials ({text})",
                    http_status=status,
                    job_key=job_key,
                    retryable=False,
                )
            if code == "NoSuchBucket" or (status == 404 and operation == "HeadBucket"):
                return StoreNotFound(
                    f"no bucket {self.url.bucket!r} ({text})",
                    http_status=status,
                    job_key=job_key,
                    retryable=False,
                )
            retryable = status >= 500 or status == 429 or code in _RETRYABLE_4XX or status == 0
            return ObjectStoreError(
                f"the object store answered {text}",
                http_status=status,
                job_key=job_key,
                retryable=retryable,
            )
        if isinstance(exc, BotoConnectionError | HTTPClientError):
            return ObjectStoreError(
                f"network error talking to the object store ({type(exc).__name__}, {where})",
                job_key=job_key,
            )
        return ObjectStoreError(
            f"object-store client error ({type(exc).__name__}, {where})",
            job_key=job_key,
            retryable=False,
        )


class ObjectUploader:
    """The runner's uploader for an object-store output (its ``Uploader`` hook, SPEC §8).

    Packages are staged under the staging dir at their output path; each one is uploaded to
    ``<prefix>/<path>``, then its staged file is removed.

    Args:
        store: the connected, checked store.
        check_existing: ``--check-existing``: HEAD done objects before skipping them.
        concurrency: HEAD requests at once while confirming done objects.
    """

    def __init__(
        self, store: S3Store, *, check_existing: bool = False, concurrency: int = 16
    ) -> None:
        self._store = store
        self._check_existing = check_existing
        self._concurrency = max(1, concurrency)

    @property
    def requests_sent(self) -> int:
        """Requests sent to the object store so far (every attempt, the start-up check too)."""
        return self._store.requests_sent

    def key_of(self, relpath: str) -> str:
        """Return the object key of the package at output path ``relpath``."""
        return self._store.url.key_for(relpath)

    def location(self, relpath: str) -> str:
        """Return the object URL of the package at output path ``relpath``: ``s3://bucket/key``."""
        return f"{self._store.url.scheme}://{self._store.url.bucket}/{self.key_of(relpath)}"

    async def upload(
        self, job: Job, staged: Path, on_bytes: Callable[[int], None] | None = None
    ) -> None:
        """Upload the staged, verified package of ``job`` (size and sha256 from its record).

        ``on_bytes(n)`` is called as parts are confirmed (progress, bytes).

        When the staged file is gone (a crash after the store confirmed the upload but before
        ``done`` was saved), a HEAD that finds the object with the recorded size and sha256 is
        the confirmation.

        Raises:
            StoreAuthError: credentials refused (the run's breaker opens).
            ObjectStoreError: code ``staged_missing`` (no staged file and no such object: the next
                run downloads again), or the store failed for good.
            RetriesExhausted: ``store_error`` retries spent.
        """
        record = job.record
        if record.bytes is None or record.sha256 is None:
            raise ObjectStoreError(
                "no verified size and sha256 recorded for the staged file",
                code="staged_missing",
                job_key=job.key,
                retryable=False,
            )
        key = self.key_of(job.spec.relpath)
        if not await asyncio.to_thread(staged.is_file):
            if self._matches(await self._store.stat(key, job_key=job.key), record):
                return
            raise ObjectStoreError(
                f"the staged file {staged} is gone and {self._store.url.bucket}/{key} is not "
                "complete: the next run downloads the package again",
                code="staged_missing",
                job_key=job.key,
                retryable=False,
            )
        await self._store.upload(
            staged,
            key,
            size=record.bytes,
            sha256=record.sha256,
            job_key=job.key,
            on_bytes=on_bytes,
        )
        await asyncio.to_thread(_remove_staged, staged)

    async def staged_intact(self, record: JobRecord, staged: Path) -> bool:
        """Tell whether ``staged`` is still the verified package of ``record`` (a failed upload's).

        True when it is a regular file (not followed through a symlink) with the recorded size
        and sha256: the next run uploads it again instead of downloading the package anew
        (SPEC §8). Reads the whole file once (in a worker thread) when the size matches.
        """
        if record.bytes is None or record.sha256 is None:
            return False
        return await asyncio.to_thread(_same_file, staged, record.bytes, record.sha256)

    async def confirm(self, records: list[JobRecord]) -> set[str]:
        """Return the keys of the done jobs whose objects may be taken as present.

        Without ``--check-existing`` that is all of them, with no request (SPEC §8); with it, the
        ones a HEAD finds with the recorded size and ``sha256`` metadata. A HEAD that fails counts
        as missing (a 403 is what S3 answers for a missing object without ``s3:ListBucket``).
        """
        if not self._check_existing:
            return {record.key for record in records}
        gate = asyncio.Semaphore(self._concurrency)
        present: set[str] = set()

        async def look(record: JobRecord) -> None:
            async with gate:
                try:
                    info = await self._store.stat(self.key_of(record.relpath), job_key=record.key)
                except (ObjectStoreError, RetriesExhausted):
                    return
            if self._matches(info, record):
                present.add(record.key)

        async with asyncio.TaskGroup() as group:
            for record in records:
                group.create_task(look(record))
        return present

    @staticmethod
    def _matches(info: ObjectInfo | None, record: JobRecord) -> bool:
        return info is not None and info.size == record.bytes and info.sha256 == record.sha256


def _same_file(path: Path, size: int, sha256: str) -> bool:
    """Return whether ``path`` is a regular file of ``size`` bytes whose sha256 is ``sha256``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size != size:
            return False
        try:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
        except OSError:
            return False
    return digest == sha256


def _remove_staged(staged: Path) -> None:
    """Remove an uploaded package's staged file (a failure leaves it for the operator: harmless)."""
    with contextlib.suppress(OSError):
        staged.unlink()


def _job_errors(group: BaseExceptionGroup[BaseException]) -> list[JobError]:
    found: list[JobError] = []
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            found.extend(_job_errors(error))
        elif isinstance(error, JobError):
            found.append(error)
    return found


class _Missing(Exception):
    """A 404 where the caller takes "missing" as an answer."""


def _host_port(url: str) -> str:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.hostname}:{port}"
