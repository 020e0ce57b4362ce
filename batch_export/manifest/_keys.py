"""The key/type table of a version-1 manifest and the JSON Schema generated from it (SPEC §3).

:data:`_TOP` is the one description of every key: its kind, bounds, default and documentation. The
validator walks it (:mod:`._validate`, :mod:`._nodes`) and :func:`manifest_json_schema` turns it into the
schema shipped as ``batch_export/manifest.schema.json``.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from batch_export.manifest._model import ALL, DEFAULT_NAME_TEMPLATE, DEFAULT_PATH_TEMPLATE

__all__ = ["limit_bounds", "manifest_json_schema"]

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class _Kind(enum.Enum):
    VERSION = "version"  # the integer 1
    SECTION = "section"  # a mapping of its own keys (_Field.keys)
    EXPORTS = "exports"  # a list of mappings of _Field.keys (it or DISCOVER non-empty)
    ID = "id"  # a non-empty string
    ASSETS = "assets"  # a list of non-empty strings (may be empty), deduplicated
    STATUSES = "statuses"  # a non-empty list of non-empty strings, lower-cased
    URL = "url"  # http(s)://host[:port][/path]
    ENV_NAME = "env_name"  # [A-Za-z_][A-Za-z0-9_]*
    PATH = "path"  # a file system path, relative to the manifest's folder
    TEMPLATE = "template"  # an output path template
    INT = "int"  # a decimal integer in [minimum, maximum]
    RATE = "rate"  # a decimal number > 0
    DURATION = "duration"  # a number of seconds or a duration string, > 0
    SIZE = "size"  # bytes: an integer or a size string such as 32MiB, in [minimum, maximum]
    OUT_DIR = "out_dir"  # a PATH, or an object-store URL s3://bucket/prefix (gs://, az://)
    DISCOVER = "discover"  # a list of mappings of _Field.keys (may be empty)
    AOIS = "aois"  # a non-empty list of AOI ids, or the plain word all
    IDS = "ids"  # a non-empty list of non-empty strings, deduplicated
    TIME_OR_AGE = "time_or_age"  # an RFC 3339 time (a quoted string) or an age such as 30d
    ASSETS_OR_ALL = "assets_or_all"  # an ASSETS list, or the plain word all
    NAME_TEMPLATE = "name_template"  # a selector's name template


@dataclass(frozen=True, slots=True)
class _Field:
    kind: _Kind
    doc: str
    required: bool = False
    minimum: int | None = None
    maximum: int | None = None
    default: Any = None
    keys: Mapping[str, _Field] | None = None


_API: Final[Mapping[str, _Field]] = {
    "url": _Field(
        _Kind.URL,
        "Base URL of the Pixxel API (http:// only for loopback hosts unless --allow-http).",
        default="https://api.pixxel.space",
    ),
    "key_env": _Field(
        _Kind.ENV_NAME,
        "Name of the environment variable holding the API key (never the key itself).",
        default="PIXXEL_API_KEY",
    ),
    "key_file": _Field(
        _Kind.PATH,
        "File holding the API key (e.g. a Docker/Kubernetes secret); relative to the manifest's "
        "folder. Use either key_env or key_file.",
    ),
    "ready_statuses": _Field(
        _Kind.STATUSES,
        "Package statuses meaning ready (case-insensitive); replaces the built-in list.",
    ),
    "failed_statuses": _Field(
        _Kind.STATUSES,
        "Package statuses meaning failed for good (case-insensitive); replaces the built-in list.",
    ),
}

_LIMITS: Final[Mapping[str, _Field]] = {
    "in_flight": _Field(
        _Kind.INT,
        "Jobs being requested or polled at once.",
        minimum=1,
        maximum=100_000,
        default=32,
    ),
    "downloads": _Field(_Kind.INT, "Simultaneous downloads.", minimum=1, maximum=1024, default=4),
    "rate": _Field(
        _Kind.RATE,
        "API requests per second, all jobs together, polls included.",
        default=2,
    ),
    "poll_interval": _Field(
        _Kind.DURATION,
        "First wait between polls (seconds, or 500ms, 90s, 15m, 2h, 1h30m); grows x1.5 with jitter.",
    ),
    "poll_max_interval": _Field(
        _Kind.DURATION, "Longest wait between polls; at least poll_interval."
    ),
    "poll_timeout": _Field(
        _Kind.DURATION, "Per job: pending longer than this fails the job (poll_timeout)."
    ),
    "retries": _Field(
        _Kind.INT,
        "Retries per request for 429/5xx/network errors.",
        minimum=0,
        maximum=100,
    ),
    "read_timeout": _Field(
        _Kind.DURATION, "No bytes for this long on a response is a retryable error."
    ),
    "connections": _Field(
        _Kind.INT,
        "Parallel range connections per download (1: a single stream).",
        minimum=1,
        maximum=256,
        default=8,
    ),
    "segment_min": _Field(
        _Kind.SIZE,
        "Packages larger than this are fetched over several connections: bytes as an integer, or "
        "a size such as 32MiB, 1GiB, 500MB.",
        minimum=1,
        maximum=2**40,
        default="32MiB",
    ),
    "give_up_after": _Field(
        _Kind.INT,
        "A job failing with the same non-retryable code in this many consecutive runs is "
        "abandoned.",
        minimum=1,
        maximum=1000,
        default=3,
    ),
}

_OUTPUT: Final[Mapping[str, _Field]] = {
    "dir": _Field(
        _Kind.OUT_DIR,
        "Output root: a folder relative to the manifest's folder, or an object-store URL "
        "(s3://bucket/prefix, gs://bucket/prefix, az://container/prefix). Default: exports/ beside "
        "the manifest.",
    ),
    "path": _Field(
        _Kind.TEMPLATE,
        "Output path template relative to dir; fields {aoi_id} {insight_id} {name} {insight_name} "
        "{created_date}, nothing else ({created_date} only without explicit exports).",
        default=DEFAULT_PATH_TEMPLATE,
    ),
}

_DEFAULTS: Final[Mapping[str, _Field]] = {
    "inputs": _Field(_Kind.ASSETS, "Input asset ids for entries that set no inputs of their own."),
    "outputs": _Field(
        _Kind.ASSETS, "Output asset ids for entries that set no outputs of their own."
    ),
}

_EXPORT: Final[Mapping[str, _Field]] = {
    "aoi_id": _Field(_Kind.ID, "AOI id (a string: quote ids that look like numbers).", True),
    "insight_id": _Field(
        _Kind.ID, "Insight id (a string: quote ids that look like numbers).", True
    ),
    "inputs": _Field(_Kind.ASSETS, "Input asset ids, in the order sent; replaces defaults.inputs."),
    "outputs": _Field(
        _Kind.ASSETS, "Output asset ids, in the order sent; replaces defaults.outputs."
    ),
    "name": _Field(_Kind.ID, "Name used in the output path; default: the insight_id."),
}

_SELECTOR: Final[Mapping[str, _Field]] = {
    "aois": _Field(
        _Kind.AOIS,
        "AOI ids whose insights to list, or all (unquoted) for every AOI the key can list.",
    ),
    "projects": _Field(_Kind.IDS, "Project ids: every AOI of these projects."),
    "status": _Field(
        _Kind.STATUSES,
        "Insight statuses to export (case-insensitive); default: the ready vocabulary.",
    ),
    "created_after": _Field(
        _Kind.TIME_OR_AGE,
        "Only insights created at or after this: an RFC 3339 time (quoted, with Z or an offset) or "
        "an age such as 30d, 12h, 1w.",
    ),
    "name_glob": _Field(_Kind.ID, "Only insights whose name matches this fnmatch pattern."),
    "inputs": _Field(
        _Kind.ASSETS_OR_ALL,
        "Input asset ids, or all for the names the listing gives; replaces defaults.inputs.",
    ),
    "outputs": _Field(
        _Kind.ASSETS_OR_ALL,
        "Output asset ids, or all for the names the listing gives; replaces defaults.outputs.",
    ),
    "name": _Field(
        _Kind.NAME_TEMPLATE,
        "Output name template; fields {aoi_id} {insight_id} {insight_name} {created_date}.",
        default=DEFAULT_NAME_TEMPLATE,
    ),
}

#: A selector has exactly one of these keys.
_SELECTOR_ONE_OF: Final = ("aois", "projects")

#: A manifest has at least one of these keys with at least one item.
_JOBS_ANY_OF: Final = ("exports", "discover")

_TOP: Final[Mapping[str, _Field]] = {
    "version": _Field(_Kind.VERSION, "Manifest format version: 1.", True),
    "api": _Field(_Kind.SECTION, "Where and how to reach the API.", keys=_API),
    "limits": _Field(
        _Kind.SECTION, "Concurrency, rate and timing; the command line wins.", keys=_LIMITS
    ),
    "output": _Field(_Kind.SECTION, "Where packages are written.", keys=_OUTPUT),
    "defaults": _Field(
        _Kind.SECTION,
        "Selections for entries that set none; an entry's own list replaces these.",
        keys=_DEFAULTS,
    ),
    "exports": _Field(
        _Kind.EXPORTS,
        "Explicit exports; this list or discover must have at least one item.",
        keys=_EXPORT,
    ),
    "discover": _Field(
        _Kind.DISCOVER,
        "Selectors resolved at run time from the API's listings (SPEC section 7).",
        keys=_SELECTOR,
    ),
}


def manifest_json_schema() -> dict[str, Any]:
    """Return the JSON Schema (draft 2020-12) of a version-1 manifest.

    Generated from the same key/type table as the validator. The validator is stricter than the schema
    where JSON Schema cannot follow (YAML 1.1 retyping of plain scalars, collisions of output paths,
    an entry selecting nothing); the schema is what editors need to complete and check keys.
    """
    top = _object_schema(_TOP)
    top["anyOf"] = [
        {"required": [name], "properties": {name: {"minItems": 1}}} for name in _JOBS_ANY_OF
    ]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "batch-export manifest, version 1",
        "description": (
            "A list of Pixxel insight exports for batch-export (SPEC section 3). Quote ids and "
            "names that YAML could read as something else (012, 0x1F, 1:30, yes, no, on, "
            "2026-05-01, ~)."
        ),
        **top,
        "$defs": {
            "assetIds": {
                "type": "array",
                "items": {"type": "string", "minLength": 1},
            },
            "duration": {
                "anyOf": [
                    {"type": "number", "exclusiveMinimum": 0},
                    {"type": "string", "pattern": _DURATION_PATTERN},
                ]
            },
            "all": {"const": ALL, "description": "every item the listing gives"},
        },
    }


# --------------------------------------------------------------------------------------------------
# JSON Schema generation.

_DURATION_PATTERN: Final = (
    r"^(?:[0-9]+(?:\.[0-9]+)?|(?=[0-9])(?:[0-9]+(?:\.[0-9]+)?h)?(?:[0-9]+(?:\.[0-9]+)?m)?"
    r"(?:[0-9]+(?:\.[0-9]+)?s)?(?:[0-9]+(?:\.[0-9]+)?ms)?)$"
)


#: Sizes in bytes (SI and IEC units); the validator parses them with the same units.
_SIZE_UNITS: Final = {
    "B": 1,
    "kB": 10**3,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
}
_SIZE_PATTERN: Final = r"^[0-9]+(?:\.[0-9]+)? ?(?:" + "|".join(_SIZE_UNITS) + ")$"
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?) ?(" + "|".join(_SIZE_UNITS) + ")")

#: Ages for created_after: units in decreasing order, each at most once (w, d, h, m, s).
_AGE_UNITS: Final = {"w": 604_800, "d": 86_400, "h": 3_600, "m": 60, "s": 1}
_AGE_PATTERN: Final = (
    "^(?=[0-9])" + "".join(rf"(?:[0-9]+(?:\.[0-9]+)?{unit})?" for unit in _AGE_UNITS) + "$"
)
_AGE = re.compile(_AGE_PATTERN[1:-1])
_RFC3339_PATTERN: Final = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?(?:[Zz]|[+-][0-9]{2}:[0-9]{2})$"
_RFC3339 = re.compile(_RFC3339_PATTERN[1:-1])


def _object_schema(keys: Mapping[str, _Field]) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "object",
        "additionalProperties": False,
        "properties": {name: _field_schema(spec) for name, spec in keys.items()},
    }
    required = [name for name, spec in keys.items() if spec.required]
    if required:
        schema["required"] = required
    return schema


def _field_schema(spec: _Field) -> dict[str, Any]:
    out: dict[str, Any] = {"description": spec.doc}
    kind = spec.kind
    if kind is _Kind.VERSION:
        out["const"] = 1
    elif kind is _Kind.SECTION:
        assert spec.keys is not None
        out.update(_object_schema(spec.keys))
    elif kind is _Kind.EXPORTS:
        assert spec.keys is not None
        out.update({"type": "array", "items": _object_schema(spec.keys)})
    elif kind is _Kind.ID or kind is _Kind.PATH:
        out.update({"type": "string", "minLength": 1})
    elif kind is _Kind.ASSETS:
        out["$ref"] = "#/$defs/assetIds"
    elif kind is _Kind.STATUSES:
        out.update({"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}})
    elif kind is _Kind.URL:
        out.update(
            {"type": "string", "pattern": r"^[Hh][Tt][Tt][Pp][Ss]?://[^/?#@\s]+(/[^?#\s]*)?$"}
        )
    elif kind is _Kind.ENV_NAME:
        out.update({"type": "string", "pattern": _ENV_NAME.pattern.join("^$")})
    elif kind is _Kind.TEMPLATE:
        out.update({"type": "string", "minLength": 1})
    elif kind is _Kind.INT:
        out.update({"type": "integer", "minimum": spec.minimum, "maximum": spec.maximum})
    elif kind is _Kind.RATE:
        out.update({"type": "number", "exclusiveMinimum": 0})
    elif kind is _Kind.DURATION:
        out["$ref"] = "#/$defs/duration"
    elif kind is _Kind.SIZE:
        out["anyOf"] = [
            {"type": "integer", "minimum": spec.minimum, "maximum": spec.maximum},
            {"type": "string", "pattern": _SIZE_PATTERN},
        ]
    elif kind is _Kind.OUT_DIR:
        out.update({"type": "string", "minLength": 1})
    elif kind is _Kind.DISCOVER:
        assert spec.keys is not None
        item = _object_schema(spec.keys)
        item["oneOf"] = [{"required": [name]} for name in _SELECTOR_ONE_OF]
        out.update({"type": "array", "items": item})
    elif kind is _Kind.AOIS:
        ids = {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}}
        out["anyOf"] = [ids, {"$ref": "#/$defs/all"}]
    elif kind is _Kind.IDS:
        out.update({"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}})
    elif kind is _Kind.TIME_OR_AGE:
        out.update({"type": "string", "pattern": f"{_RFC3339_PATTERN}|{_AGE_PATTERN}"})
    elif kind is _Kind.ASSETS_OR_ALL:
        out["anyOf"] = [{"$ref": "#/$defs/assetIds"}, {"$ref": "#/$defs/all"}]
    elif kind is _Kind.NAME_TEMPLATE:
        out.update({"type": "string", "minLength": 1})
    if spec.default is not None:
        out["default"] = spec.default
    return out


def limit_bounds(name: str) -> tuple[int, int]:
    """Return ``(minimum, maximum)`` of the integer or size key ``limits.<name>`` (its units).

    The one range for the manifest key, its command-line option and the Python API's argument.

    Raises:
        KeyError: no such key, or one without bounds.
    """
    spec = _LIMITS[name]
    if spec.minimum is None or spec.maximum is None:
        raise KeyError(name)
    return int(spec.minimum), int(spec.maximum)
