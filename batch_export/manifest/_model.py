"""The manifest's value types and the constants they share (SPEC §3); imports nothing of the project."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

__all__ = [
    "DEFAULT_PATH_TEMPLATE",
    "MAX_ALIAS_EXPANSION",
    "STATE_DIR_NAME",
    "ApiSettings",
    "ExportSpec",
    "LimitSettings",
    "Manifest",
    "OutputSettings",
]

DEFAULT_PATH_TEMPLATE = "{aoi_id}/{insight_id}/{name}.zip"

#: Name of the state dir inside the output dir; no output path may enter it.
STATE_DIR_NAME: Final = ".batch-export"

#: Most nodes that aliases may add to a document beyond its own nodes (YAML-bomb guard).
MAX_ALIAS_EXPANSION: Final = 100_000

#: Longest file or folder name most file systems take, in UTF-8 bytes.
_MAX_COMPONENT_BYTES: Final = 255


@dataclass(frozen=True, slots=True)
class ApiSettings:
    """The manifest's ``api`` section; ``None`` means "not set in the manifest"."""

    url: str | None = None
    key_env: str | None = None
    key_file: Path | None = None  # resolved against the manifest's folder
    ready_statuses: tuple[str, ...] | None = None  # lower-cased
    failed_statuses: tuple[str, ...] | None = None  # lower-cased


@dataclass(frozen=True, slots=True)
class LimitSettings:
    """The manifest's ``limits`` section; ``None`` means "not set". Durations are in seconds."""

    in_flight: int | None = None
    downloads: int | None = None
    rate: float | None = None  # requests/s
    poll_interval: float | None = None
    poll_max_interval: float | None = None
    poll_timeout: float | None = None
    retries: int | None = None
    read_timeout: float | None = None


@dataclass(frozen=True, slots=True)
class OutputSettings:
    """The manifest's ``output`` section."""

    dir: Path | None = None  # resolved against the manifest's folder
    path: str = DEFAULT_PATH_TEMPLATE


@dataclass(frozen=True, slots=True)
class ExportSpec:
    """One export: what to request and where its package goes.

    ``relpath`` is the sanitised output path relative to the output dir, POSIX separators, ending in
    the template's suffix; it never starts with ``/``, never has a ``..`` or empty component and never
    enters the state dir ``.batch-export``.
    """

    aoi_id: str
    insight_id: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    name: str
    relpath: str
    line: int = 0  # 1-based line of the entry in the manifest, for messages


@dataclass(frozen=True, slots=True)
class Manifest:
    """A validated manifest."""

    path: Path
    api: ApiSettings = field(default_factory=ApiSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    output: OutputSettings = field(default_factory=OutputSettings)
    exports: tuple[ExportSpec, ...] = ()
    warnings: tuple[str, ...] = ()
