"""The manifest's value types and the constants they share (SPEC §3); imports nothing of the project."""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

__all__ = [
    "ALL",
    "DEFAULT_NAME_TEMPLATE",
    "DEFAULT_PATH_TEMPLATE",
    "MAX_ALIAS_EXPANSION",
    "OBJECT_STORE_SCHEMES",
    "STATE_DIR_NAME",
    "ApiSettings",
    "AssetChoice",
    "DiscoverSelector",
    "ExportSpec",
    "LimitSettings",
    "Manifest",
    "OutputSettings",
]

DEFAULT_PATH_TEMPLATE = "{aoi_id}/{insight_id}/{name}.zip"

#: Default ``name`` template of a ``discover:`` selector (SPEC §7).
DEFAULT_NAME_TEMPLATE: Final = "{insight_id}"

#: URL schemes ``output.dir`` may name instead of a local folder (SPEC §8).
OBJECT_STORE_SCHEMES: Final = ("s3", "gs", "az")

#: The plain word that selects everything in ``aois:``, ``inputs:`` and ``outputs:`` (SPEC §7).
ALL: Final = "all"

#: A selector's ``inputs``/``outputs``: asset ids in the order sent, or ``"all"`` (every asset the
#: listing names for the insight).
AssetChoice = tuple[str, ...] | Literal["all"]

#: Name of the state dir inside the output dir; no output path may enter it.
STATE_DIR_NAME: Final = ".batch-export"

#: Most nodes that aliases may add to a document beyond its own nodes (YAML-bomb guard).
MAX_ALIAS_EXPANSION: Final = 100_000


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
    connections: int | None = None  # parallel range connections per download
    segment_min: int | None = None  # bytes: smallest package worth segmenting
    give_up_after: int | None = None  # runs failing with the same non-retryable code


@dataclass(frozen=True, slots=True)
class OutputSettings:
    """The manifest's ``output`` section.

    ``output.dir`` is either a local folder (``dir``, resolved against the manifest's folder) or an
    object-store URL (``url``, kept as written but for a lower-cased scheme and no trailing ``/``, such
    as ``s3://bucket/prefix``; never resolved against anything). At most one of the two is set.
    """

    dir: Path | None = None
    path: str = DEFAULT_PATH_TEMPLATE
    url: str | None = None


@dataclass(frozen=True, slots=True)
class ExportSpec:
    """One export: what to request and where its package goes.

    ``relpath`` is the sanitised output path relative to the output dir, POSIX separators, ending in
    the template's suffix; it never starts with ``/``, never has a ``..`` or empty component and never
    enters the state dir ``.batch-export``. ``source`` names where the job comes from, as the report
    shows it (SPEC §7): ``exports[3]`` for an explicit entry, ``discover[0]`` for a discovered one.
    """

    aoi_id: str
    insight_id: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    name: str
    relpath: str
    line: int = 0  # 1-based line of the entry in the manifest, for messages
    source: str = ""


@dataclass(frozen=True, slots=True)
class DiscoverSelector:
    """One ``discover:`` selector (SPEC §7), resolved at run time from the API's listings.

    Exactly one of ``aois`` (explicit AOI ids), ``all_aois`` (``aois: all``) and ``projects`` says
    which AOIs to list. ``statuses`` is lower-cased (``None``: the ready vocabulary); an insight
    passes ``created_after`` when its ``created_at >= created_after`` and, for an age such as ``30d``,
    when ``created_at >= now - created_within`` (seconds). ``inputs``/``outputs`` already include
    ``defaults:``; ``name`` is the output name template (fields ``{aoi_id}`` ``{insight_id}``
    ``{insight_name}`` ``{created_date}``).
    """

    index: int  # position in discover:, as in "discover[0]"
    aois: tuple[str, ...] | None = None
    all_aois: bool = False
    projects: tuple[str, ...] | None = None
    statuses: tuple[str, ...] | None = None
    created_after: _dt.datetime | None = None  # timezone-aware
    created_within: float | None = None  # seconds before now
    name_glob: str | None = None
    inputs: AssetChoice = ()
    outputs: AssetChoice = ()
    name: str = DEFAULT_NAME_TEMPLATE
    line: int = 0  # 1-based line of the selector in the manifest, for messages

    @property
    def source(self) -> str:
        """Where its jobs come from, as the report names it: ``discover[N]``."""
        return f"discover[{self.index}]"


@dataclass(frozen=True, slots=True)
class Manifest:
    """A validated manifest."""

    path: Path
    api: ApiSettings = field(default_factory=ApiSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    output: OutputSettings = field(default_factory=OutputSettings)
    exports: tuple[ExportSpec, ...] = ()
    warnings: tuple[str, ...] = ()
    discover: tuple[DiscoverSelector, ...] = ()

    @property
    def out_url(self) -> str | None:
        """The object-store URL ``output.dir`` names (``s3://bucket/prefix``), or None for a folder."""
        return self.output.url
