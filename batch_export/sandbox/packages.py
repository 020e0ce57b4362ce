"""Deterministic package zips, built on disk once and streamed from there.

A package is a real zip (``ZIP_STORED``, fixed timestamps) with one member per selected asset:
``inputs/<asset id>.tif`` for each input, then ``outputs/<asset id>.tif`` for each output, in the order
requested. Member content is derived from the seed, the AOI, the insight and the asset id: a 1 MiB base
block drawn from a SHA-256-seeded generator, rotated and stamped with a per-piece SHA-256 digest, so
gigabytes are produced at disk speed. The same seed and selection give byte-identical packages across
runs and sandbox instances.

Building is blocking (run it in a worker thread); the zip is written to a temporary file while MD5 and
SHA-256 are computed over the bytes as they are written, then renamed into place, then a small JSON
sidecar with size and digests is renamed next to it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "CHUNK_SIZE",
    "BuiltPackage",
    "Selection",
    "asset_chunks",
    "build_package",
    "load_package",
    "member_names",
    "variant_name",
]

CHUNK_SIZE = 1 << 20
"""Size of the pieces content is generated, written and streamed in (bytes)."""

_FORMAT = 1  # bump when the package layout changes, so old cached files are not reused
_ZIP_DATE = (2026, 11, 29, 0, 0, 0)


@dataclass(frozen=True, slots=True)
class Selection:
    """What a PUT asked for; the identity of a package.

    Attributes:
        aoi_id: AOI id.
        insight_id: Insight id.
        inputs: Input asset ids, in the order sent.
        outputs: Output asset ids, in the order sent.
    """

    aoi_id: str
    insight_id: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    @property
    def package_id(self) -> str:
        """Stable id used in the storage path (32 hex digits)."""
        text = json.dumps([self.aoi_id, self.insight_id, self.inputs, self.outputs])
        return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class BuiltPackage:
    """A package zip on disk.

    Attributes:
        path: The zip file.
        size: Its size (bytes).
        md5: MD5 of its bytes (hex), served as the ``ETag``.
        sha256: SHA-256 of its bytes (hex).
    """

    path: Path
    size: int
    md5: str
    sha256: str

    @property
    def etag(self) -> str:
        """The quoted ``ETag`` header value."""
        return f'"{self.md5}"'


def member_names(selection: Selection) -> list[str]:
    """Return the zip member names of a selection, in archive order."""
    return [f"inputs/{a}.tif" for a in selection.inputs] + [
        f"outputs/{a}.tif" for a in selection.outputs
    ]


def variant_name(seed: int, asset_size: int, selection: Selection, *, corrupt: bool) -> str:
    """Return the cache file stem for one concrete rendering of a selection (40 hex digits)."""
    text = json.dumps(
        [
            _FORMAT,
            seed,
            asset_size,
            selection.aoi_id,
            selection.insight_id,
            selection.inputs,
            selection.outputs,
            corrupt,
        ]
    )
    return hashlib.sha256(text.encode()).hexdigest()[:40]


def asset_chunks(
    seed: int, selection: Selection, kind: str, asset_id: str, size: int
) -> Iterator[bytes]:
    """Yield the deterministic content of one asset member, in pieces of up to 1 MiB.

    Args:
        seed: Sandbox seed.
        selection: The selection the asset belongs to (its AOI and insight shape the content).
        kind: ``"inputs"`` or ``"outputs"``.
        asset_id: The asset id.
        size: Total content size (bytes).
    """
    label = "\x1f".join(
        ("batch-export-sandbox-asset", str(seed), selection.aoi_id, selection.insight_id, kind)
    )
    label = f"{label}\x1f{asset_id}"
    root = hashlib.sha256(label.encode()).digest()
    base = random.Random(int.from_bytes(root, "big")).randbytes(min(size, CHUNK_SIZE) or 1)
    index = 0
    remaining = size
    while remaining > 0:
        stamp = hashlib.sha256(root + index.to_bytes(8, "big")).digest()
        shift = int.from_bytes(stamp[:4], "big") % len(base)
        piece = stamp + base[shift:] + base[:shift]
        n = min(remaining, CHUNK_SIZE, len(piece))
        yield piece[:n]
        remaining -= n
        index += 1


class _HashingSink(io.RawIOBase):
    """Write-only, non-seekable stream over a file that hashes what passes and can flip one byte.

    Being non-seekable makes :mod:`zipfile` stream (data descriptors) instead of seeking back to patch
    local headers, so the bytes hashed here are exactly the bytes on disk.
    """

    def __init__(self, raw: BinaryIO) -> None:
        super().__init__()
        self._raw = raw
        self.pos = 0
        self.md5 = hashlib.md5(usedforsecurity=False)
        self.sha256 = hashlib.sha256()
        self.flip_at: int | None = None

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def seek(self, offset: int, whence: int = 0) -> int:
        raise io.UnsupportedOperation("not seekable")

    def tell(self) -> int:
        return self.pos

    def write(self, data: object) -> int:
        view = memoryview(data)  # type: ignore[arg-type]
        flip_at = self.flip_at
        if flip_at is not None and self.pos <= flip_at < self.pos + len(view):
            buf = bytearray(view)
            buf[flip_at - self.pos] ^= 0xFF
            view = memoryview(buf)
            self.flip_at = None
        self._raw.write(view)
        self.md5.update(view)
        self.sha256.update(view)
        self.pos += len(view)
        return len(view)

    def flush(self) -> None:
        self._raw.flush()


def load_package(directory: Path, name: str) -> BuiltPackage | None:
    """Return the package cached as ``directory/name.zip`` if it and its sidecar are intact."""
    path = directory / f"{name}.zip"
    try:
        meta = json.loads((directory / f"{name}.json").read_text())
        size = path.stat().st_size
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("size") != size:
        return None
    md5, sha256 = meta.get("md5"), meta.get("sha256")
    if not isinstance(md5, str) or not isinstance(sha256, str):
        return None
    return BuiltPackage(path=path, size=size, md5=md5, sha256=sha256)


def build_package(
    directory: Path, seed: int, asset_size: int, selection: Selection, *, corrupt: bool = False
) -> BuiltPackage:
    """Build (or reuse) the package zip of ``selection`` under ``directory``; blocking.

    Args:
        directory: Cache folder; created if missing.
        seed: Sandbox seed.
        asset_size: Content size of each member (bytes).
        selection: What to package.
        corrupt: Flip one byte inside the first member's data after its CRC was computed, so
            the zip fails a CRC check while size and digests describe the corrupted bytes.

    Returns:
        The package on disk with its size and digests.
    """
    name = variant_name(seed, asset_size, selection, corrupt=corrupt)
    cached = load_package(directory, name)
    if cached is not None:
        return cached
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb", buffering=0) as raw:
            sink = _HashingSink(raw)
            with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED) as archive:
                members = [("inputs", a) for a in selection.inputs] + [
                    ("outputs", a) for a in selection.outputs
                ]
                for index, (kind, asset_id) in enumerate(members):
                    info = zipfile.ZipInfo(f"{kind}/{asset_id}.tif", date_time=_ZIP_DATE)
                    info.compress_type = zipfile.ZIP_STORED
                    info.create_system = 3
                    info.external_attr = 0o644 << 16
                    info.file_size = asset_size
                    with archive.open(info, "w") as member:
                        if corrupt and index == 0 and asset_size > 0:
                            sink.flip_at = sink.pos + asset_size // 2
                        for piece in asset_chunks(seed, selection, kind, asset_id, asset_size):
                            member.write(piece)
            size = sink.pos
            md5, sha256 = sink.md5.hexdigest(), sink.sha256.hexdigest()
        os.replace(tmp, directory / f"{name}.zip")
        meta = json.dumps({"size": size, "md5": md5, "sha256": sha256})
        fd, meta_tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as handle:
            handle.write(meta)
        os.replace(meta_tmp, directory / f"{name}.json")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return BuiltPackage(path=directory / f"{name}.zip", size=size, md5=md5, sha256=sha256)
