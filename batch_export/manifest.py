"""Manifest: YAML text -> validated, frozen :class:`Manifest` of :class:`ExportSpec` (SPEC §3).

Pure: reads the manifest file and nothing else; requests nothing.

How it reads YAML. PyYAML resolves plain scalars the YAML 1.1 way (``012`` is the integer 10, ``on`` is
``True``, ``1:30`` is 90), so values are never judged after loading: the validator works on the node tree,
from each node's tag and style, and rejects a plain scalar where a string is expected whenever its resolved
tag is not ``str``. The tree comes from the libyaml event stream of ``yaml.CSafeLoader`` (pure-Python
``yaml.SafeLoader`` without libyaml) and that loader's own YAML 1.1 resolver, composed by :func:`_compose`
instead of PyYAML's composer: its nodes are slotted (a 100,000-entry manifest composed by ``yaml.compose``
takes about 600 MB and 12 s), it is iterative (no recursion limit) and it sizes every collection as it
closes, which is the memoised count of the expanded graph that the YAML-bomb check needs. An alias inside
its own anchor's node (which PyYAML would turn into a cyclic graph) is rejected as it is met.

Every problem is one line ``FILE:LINE:COL: PATH: message`` and all of them are reported at once, in
position order. No message echoes a value from the ``api`` section, and YAML syntax errors are built from
positions, never from source text, since the source may hold a secret.

The key/type table (:data:`_TOP`) drives both the validator and :func:`manifest_json_schema`, the JSON
Schema shipped as ``batch_export/manifest.schema.json``.
"""

from __future__ import annotations

import datetime as _dt
import difflib
import enum
import gc
import json
import math
import re
import string
import unicodedata
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml
from yaml.events import (
    AliasEvent,
    DocumentStartEvent,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
)

from batch_export.errors import ManifestError
from batch_export.units import parse_duration

__all__ = [
    "DEFAULT_PATH_TEMPLATE",
    "MAX_ALIAS_EXPANSION",
    "STATE_DIR_NAME",
    "ApiSettings",
    "ExportSpec",
    "LimitSettings",
    "Manifest",
    "OutputSettings",
    "load_manifest",
    "manifest_json_schema",
    "parse_manifest",
    "render_relpath",
    "sanitize_path_value",
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


# --------------------------------------------------------------------------------------------------
# The key/type table: one source for the validator and for the JSON Schema.


class _Kind(enum.Enum):
    VERSION = "version"  # the integer 1
    SECTION = "section"  # a mapping of its own keys (_Field.keys)
    EXPORTS = "exports"  # a non-empty list of mappings of _Field.keys
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
}

_OUTPUT: Final[Mapping[str, _Field]] = {
    "dir": _Field(
        _Kind.PATH,
        "Output root; relative to the manifest's folder. Default: exports/ beside the manifest.",
    ),
    "path": _Field(
        _Kind.TEMPLATE,
        "Output path template relative to dir; fields {aoi_id} {insight_id} {name}, nothing else.",
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
    "exports": _Field(_Kind.EXPORTS, "The exports: at least one.", True, keys=_EXPORT),
}

_TEMPLATE_FIELDS: Final = ("aoi_id", "insight_id", "name")


# --------------------------------------------------------------------------------------------------
# Public functions.


def load_manifest(path: Path) -> Manifest:
    """Read and validate the manifest at ``path`` (UTF-8 YAML).

    Relative paths inside it (``output.dir``, ``api.key_file``) are anchored at ``path``'s folder.

    Raises:
        ManifestError: with every problem as ``FILE:LINE:COL: PATH: message`` (an unreadable file is
            the single line ``FILE:1:1: (document): cannot read manifest: <reason>``).
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ManifestError([f"{path}:1:1: (document): cannot read manifest: {reason}"]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        line = data.count(b"\n", 0, exc.start) + 1
        col = len(data[line_start : exc.start].decode("utf-8", "replace")) + 1
        raise ManifestError(
            [
                f"{path}:{line}:{col}: (document): the manifest is not UTF-8 text "
                f"(byte 0x{data[exc.start]:02X} cannot be decoded); save it as UTF-8"
            ]
        ) from None
    del data
    return parse_manifest(text, path=path)


def parse_manifest(text: str, *, path: Path) -> Manifest:
    """Validate manifest ``text``; ``path`` names it in messages and anchors relative paths.

    Args:
        text: the YAML text of the manifest.
        path: the manifest's path as given (it is not read); messages start with ``str(path)``, and
            relative paths in the manifest are resolved against ``path.parent.absolute()``.

    Returns:
        The validated manifest; identical entries are merged and noted in ``Manifest.warnings``.

    Raises:
        ManifestError: with every problem as ``FILE:LINE:COL: PATH: message``, in position order.
    """
    report = _Report(str(path))
    with _gc_paused():
        root = _parse_yaml(text, report)
        if report.has_errors():
            raise ManifestError(report.errors())
        manifest = _Validator(report, path).manifest(root)
    if manifest is None or report.has_errors():
        raise ManifestError(report.errors())
    return manifest


def sanitize_path_value(value: str) -> str:
    """Return ``value`` made safe as (part of) one file name component.

    ``/`` and ``\\`` become ``_``; control characters (U+0000–U+001F, U+007F–U+009F) are removed; ``.`` and
    ``..`` become ``_``; trailing dots and spaces are stripped; an empty result becomes ``_``; Windows
    reserved device names (``CON``, ``PRN``, ``AUX``, ``NUL``, ``COM1``–``COM9``, ``LPT1``–``LPT9``, any
    case, also with an extension) get a ``_`` prefix. The result is never empty, never ``.``/``..``
    and holds no separator.
    """
    if _SAFE_VALUE.fullmatch(value) and not _is_reserved(value):
        return value
    text = value.translate(_VALUE_TRANSLATION)
    if text in (".", ".."):
        return "_"
    text = text.rstrip(". ")
    if not text:
        return "_"
    if _is_reserved(text):
        return "_" + text
    return text


def render_relpath(template: str, *, aoi_id: str, insight_id: str, name: str) -> str:
    """Return the output path, relative to the output dir, for one export.

    Args:
        template: an output path template such as :data:`DEFAULT_PATH_TEMPLATE`.
        aoi_id: the AOI id (sanitised with :func:`sanitize_path_value` before substitution).
        insight_id: the insight id (sanitised likewise).
        name: the export's name (sanitised likewise).

    Returns:
        A POSIX relative path that stays under the output dir and out of the state dir.

    Raises:
        ValueError: the template is invalid, or the result is not a safe path (e.g. a component
            longer than 255 UTF-8 bytes); the message says why.
    """
    parts = _compile_template(template)
    relpath = _render(parts, (aoi_id, insight_id, name), {})
    problem = _relpath_problem(relpath)
    if problem is not None:
        raise ValueError(problem)
    return relpath


def manifest_json_schema() -> dict[str, Any]:
    """Return the JSON Schema (draft 2020-12) of a version-1 manifest.

    Generated from the same key/type table as the validator. The validator is stricter than the schema
    where JSON Schema cannot follow (YAML 1.1 retyping of plain scalars, collisions of output paths,
    an entry selecting nothing); the schema is what editors need to complete and check keys.
    """
    top = _object_schema(_TOP)
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
        },
    }


# --------------------------------------------------------------------------------------------------
# JSON Schema generation.

_DURATION_PATTERN: Final = (
    r"^(?:[0-9]+(?:\.[0-9]+)?|(?=[0-9])(?:[0-9]+(?:\.[0-9]+)?h)?(?:[0-9]+(?:\.[0-9]+)?m)?"
    r"(?:[0-9]+(?:\.[0-9]+)?s)?(?:[0-9]+(?:\.[0-9]+)?ms)?)$"
)


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
        out.update({"type": "array", "minItems": 1, "items": _object_schema(spec.keys)})
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
    if spec.default is not None:
        out["default"] = spec.default
    return out


# --------------------------------------------------------------------------------------------------
# Problems.


class _Report:
    """Collects ``FILE:LINE:COL: PATH: message`` lines; sorted by position when read."""

    def __init__(self, file: str) -> None:
        self.file = file
        self._errors: list[tuple[int, int, int, str]] = []
        self._warnings: list[tuple[int, int, int, str]] = []

    def error(self, line: int, col: int, path: str, message: str) -> None:
        text = f"{self.file}:{line}:{col}: {path or '(document)'}: {message}"
        self._errors.append((line, col, len(self._errors), text))

    def warning(self, line: int, col: int, path: str, message: str) -> None:
        text = f"{self.file}:{line}:{col}: {path or '(document)'}: {message}"
        self._warnings.append((line, col, len(self._warnings), text))

    def has_errors(self) -> bool:
        return bool(self._errors)

    def errors(self) -> list[str]:
        return _sorted_unique(self._errors)

    def warnings(self) -> tuple[str, ...]:
        return tuple(_sorted_unique(self._warnings))


def _sorted_unique(items: list[tuple[int, int, int, str]]) -> list[str]:
    return list(dict.fromkeys(text for *_, text in sorted(items)))


# --------------------------------------------------------------------------------------------------
# YAML: events -> compact node tree.

_T_STR: Final = "tag:yaml.org,2002:str"
_T_INT: Final = "tag:yaml.org,2002:int"
_T_FLOAT: Final = "tag:yaml.org,2002:float"
_T_BOOL: Final = "tag:yaml.org,2002:bool"
_T_NULL: Final = "tag:yaml.org,2002:null"
_T_TIMESTAMP: Final = "tag:yaml.org,2002:timestamp"
_T_MERGE: Final = "tag:yaml.org,2002:merge"
_T_SEQ: Final = "tag:yaml.org,2002:seq"
_T_MAP: Final = "tag:yaml.org,2002:map"

_LOADER: Callable[[str], Any] = yaml.CSafeLoader if yaml.__with_libyaml__ else yaml.SafeLoader

# Characters YAML allows in a stream (YAML 1.1 §5.1, printable); anything else is a reader error.
_NOT_PRINTABLE = re.compile("[^\t\n\r\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


class _Scalar:
    __slots__ = ("col", "line", "style", "tag", "value")

    def __init__(self, tag: str, value: str, style: str | None, line: int, col: int) -> None:
        self.tag = tag
        self.value = value
        self.style = style  # None: plain; "'", '"', "|", ">": quoted or block
        self.line = line  # 1-based
        self.col = col  # 1-based


class _Seq:
    __slots__ = ("col", "items", "line", "size", "tag")

    def __init__(self, tag: str, line: int, col: int) -> None:
        self.tag = tag
        self.items: list[_Node] = []
        self.line = line
        self.col = col
        self.size = 0  # once closed: nodes in the expanded subtree, itself included


class _Map:
    __slots__ = ("col", "items", "line", "size", "tag")

    def __init__(self, tag: str, line: int, col: int) -> None:
        self.tag = tag
        self.items: list[_Node] = []  # flat: key, value, key, value, ...
        self.line = line
        self.col = col
        self.size = 0  # once closed: nodes in the expanded subtree, itself included


_Node = _Scalar | _Seq | _Map


class _Composed:
    __slots__ = ("biggest_alias", "own", "root")

    def __init__(
        self, root: _Node | None, own: int, biggest_alias: tuple[int, int, int] = (0, 1, 1)
    ) -> None:
        self.root = root
        self.own = own  # nodes written in the document (aliases not counted)
        self.biggest_alias = biggest_alias  # (expanded size, line, column) of the largest alias


@contextmanager
def _gc_paused() -> Iterator[None]:
    # Composing creates millions of long-lived objects: each GC pass would walk them all for nothing
    # (5x slower on 100,000 entries). Nothing here creates reference cycles.
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _parse_yaml(text: str, report: _Report) -> _Node | None:
    bad = _NOT_PRINTABLE.search(text)
    if bad is not None:
        line, col = _line_col(text, bad.start())
        code = ord(bad.group())
        escape = f"\\u{code:04X}" if code < 0x10000 else f"\\U{code:08X}"
        report.error(
            line,
            col,
            "",
            f"character U+{code:04X} is not allowed in YAML text; write it as an escape inside "
            f'a double-quoted string ("{escape}")',
        )
        return None
    loader = _LOADER(text)
    try:
        composed = _compose(loader, report)
    except yaml.MarkedYAMLError as exc:
        _syntax_error(exc, report)
        return None
    except yaml.YAMLError:
        report.error(1, 1, "", "the manifest is not valid YAML")
        return None
    finally:
        loader.dispose()
    if report.has_errors():
        return None
    root = composed.root
    if root is not None and not isinstance(root, _Scalar):
        extra = root.size - composed.own
        if extra > MAX_ALIAS_EXPANSION:
            _, line, col = composed.biggest_alias
            report.error(
                line,
                col,
                "",
                f"aliases would expand the document by {_count(extra)} nodes beyond its own "
                f"{_count(composed.own)} (the limit is {MAX_ALIAS_EXPANSION:,}): a YAML bomb? "
                "Write the repeated parts out, or use defaults: for shared inputs/outputs",
            )
            return None
    return root


def _compose(loader: Any, report: _Report) -> _Composed:
    """Compose the single document of ``loader``'s event stream into compact nodes.

    While a collection is open its ``size`` holds the extra nodes its aliased or nested children
    bring beyond one node each; when it closes, it becomes the expanded size of its subtree. An alias
    adds its target's size, already known (memoised) since the target is closed: an alias to a node
    still open is recursive and refused.
    """
    get_event = loader.get_event
    resolve = loader.resolve
    resolver_keys = frozenset(loader.yaml_implicit_resolvers)
    always_resolve = None in resolver_keys
    anchors: dict[str, _Node] = {}
    open_anchored: set[int] = set()  # ids of anchored collections not closed yet
    strings: dict[str, str] = {}  # repeated scalars (keys, asset ids) share one str
    stack: list[_Seq | _Map] = []
    parent: _Seq | _Map | None = None
    root: _Node | None = None
    written = 0  # children of closed collections, aliases included
    aliases = 0
    biggest = (0, 1, 1)
    documents = 0
    node: _Node
    while True:
        event = get_event()
        kind = type(event)
        if kind is ScalarEvent:
            value = event.value
            value = strings.setdefault(value, value)
            tag = event.tag
            if tag is None:
                if event.implicit[0] and (always_resolve or value[:1] in resolver_keys):
                    tag = resolve(yaml.ScalarNode, value, event.implicit)
                else:
                    tag = _T_STR
            elif tag == "!":  # the non-specific tag: a string (YAML 1.1 §3.3.2), as in "! 012"
                tag = _T_STR
            mark = event.start_mark
            node = _Scalar(tag, value, event.style or None, mark.line + 1, mark.column + 1)
            if event.anchor is not None:
                anchors[event.anchor] = node
            if parent is None:
                root = node
            else:
                parent.items.append(node)
        elif kind is MappingStartEvent or kind is SequenceStartEvent:
            mark = event.start_mark
            tag = event.tag
            if kind is MappingStartEvent:
                tag = _T_MAP if tag is None or tag == "!" else tag
                node = _Map(tag, mark.line + 1, mark.column + 1)
            else:
                tag = _T_SEQ if tag is None or tag == "!" else tag
                node = _Seq(tag, mark.line + 1, mark.column + 1)
            if event.anchor is not None:
                anchors[event.anchor] = node
                open_anchored.add(id(node))
            if parent is None:
                root = node
            else:
                parent.items.append(node)
                stack.append(parent)
            parent = node
        elif kind is MappingEndEvent or kind is SequenceEndEvent:
            assert parent is not None
            closed = parent
            count = len(closed.items)
            written += count
            closed.size += count + 1
            if open_anchored:
                open_anchored.discard(id(closed))
            if stack:
                parent = stack.pop()
                parent.size += closed.size - 1
            else:
                parent = None
        elif kind is AliasEvent:
            mark = event.start_mark
            target = anchors.get(event.anchor)
            if target is None or id(target) in open_anchored:
                if target is None:
                    message = "alias to an anchor that is not defined before it"
                else:
                    message = (
                        "recursive alias: it refers to the node that contains it (anchored at "
                        f"line {target.line}, column {target.col})"
                    )
                report.error(mark.line + 1, mark.column + 1, "", message)
                target = _Scalar(_T_NULL, "", None, mark.line + 1, mark.column + 1)
            aliases += 1
            if not isinstance(target, _Scalar) and target.size > biggest[0]:
                biggest = (target.size, mark.line + 1, mark.column + 1)
            if parent is None:
                root = target
            else:
                parent.items.append(target)
                if not isinstance(target, _Scalar):
                    parent.size += target.size - 1
        elif kind is DocumentStartEvent:
            documents += 1
            if documents > 1:
                mark = event.start_mark
                report.error(
                    mark.line + 1,
                    mark.column + 1,
                    "",
                    "a manifest is a single YAML document; found a second one (remove this ---)",
                )
                return _Composed(None, 0)
        elif kind is StreamEndEvent:
            own = 0 if root is None else written + 1 - aliases  # nodes written, aliases not
            return _Composed(root, own, biggest)
        # else: StreamStartEvent, DocumentEndEvent


_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")
_KEEP_QUOTED = re.compile(
    r"(['\"])(?:<[a-z ]+>|[^\\]|\\(?:x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|.))\1"
)


def _syntax_error(exc: yaml.MarkedYAMLError, report: _Report) -> None:
    mark = exc.problem_mark or exc.context_mark
    line, col = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
    problem = _redact(exc.problem or "invalid YAML")
    message = f"invalid YAML: {problem}"
    if exc.context:
        where = ""
        if exc.context_mark is not None and exc.context_mark is not mark:
            where = f" started at line {exc.context_mark.line + 1}"
        message += f" ({_redact(exc.context)}{where})"
    report.error(line, col, "", message)


def _redact(text: str) -> str:
    """Drop quoted source fragments (anchor names, tag handles) from a YAML error message."""

    def keep_short(match: re.Match[str]) -> str:
        # A token name ('<stream end>') or a single character stays; anything longer goes.
        return match.group() if _KEEP_QUOTED.fullmatch(match.group()) else "(…)"

    return _QUOTED.sub(keep_short, text)


def _line_col(text: str, index: int) -> tuple[int, int]:
    line_start = text.rfind("\n", 0, index) + 1
    return text.count("\n", 0, index) + 1, index - line_start + 1


def _count(number: int) -> str:
    return f"{number:,}" if number < 10**15 else "more than 10^15"


# --------------------------------------------------------------------------------------------------
# Describing what YAML made of a node, for messages.


def _kind_name(node: _Node) -> str:
    """Name what a node is, never echoing its value: ``a list``, ``a string``, ``nothing``..."""
    if isinstance(node, _Map):
        return "a mapping"
    if isinstance(node, _Seq):
        return "a list"
    if node.style is not None:
        return "a string" if node.tag == _T_STR else "a tagged value"
    return _SCALAR_KINDS.get(node.tag, "a tagged value")


_SCALAR_KINDS: Final = {
    _T_STR: "a string",
    _T_INT: "a number",
    _T_FLOAT: "a number",
    _T_BOOL: "a boolean",
    _T_NULL: "nothing",
    _T_TIMESTAMP: "a date",
}


def _reading(node: _Scalar) -> str:
    """Say what YAML reads a scalar as, e.g. ``the integer 10``."""
    try:
        value = yaml.constructor.SafeConstructor().construct_object(
            yaml.ScalarNode(node.tag, node.value, style=node.style)
        )
    except Exception:
        return f"a value tagged {_short_tag(node.tag)}"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        if math.isnan(value):
            return "the number NaN (not a number)"
        if math.isinf(value):
            return "the number " + ("-infinity" if value < 0 else "infinity")
        return f"the number {value!r}"
    if value is None:
        return "null (no value)"
    if isinstance(value, _dt.datetime):
        return f"the timestamp {value.isoformat()}"
    if isinstance(value, _dt.date):
        return f"the date {value.isoformat()}"
    return f"a value tagged {_short_tag(node.tag)}"


def _reading_kind(node: _Scalar) -> str:
    """Like :func:`_reading`, without the value (for the ``api`` section)."""
    return {
        _T_BOOL: "a boolean",
        _T_INT: "an integer",
        _T_FLOAT: "a number",
        _T_NULL: "null (no value)",
        _T_TIMESTAMP: "a date",
    }.get(node.tag, f"a value tagged {_short_tag(node.tag)}")


def _short_tag(tag: str) -> str:
    return (
        "!!" + tag.removeprefix("tag:yaml.org,2002:")
        if tag.startswith("tag:yaml.org,2002:")
        else tag
    )


def _quote(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


# --------------------------------------------------------------------------------------------------
# Keys: echo rules and the literal-key guard.

_SECRET_NAMES: Final = frozenset(
    {
        "key",
        "apikey",
        "token",
        "apitoken",
        "secret",
        "password",
        "passwd",
        "authorization",
        "auth",
        "accesstoken",
        "authtoken",
        "bearer",
        "bearertoken",
        "credentials",
        "credential",
        "secretkey",
        "privatekey",
        "clientsecret",
        "pixxelapikey",
    }
)
_SECRET_PARTS: Final = ("key", "token", "secret", "passw", "auth", "credential", "bearer")
_LITERAL_KEY_MESSAGE: Final = (
    "the API key must not be written in the manifest; name an environment variable in "
    "api.key_env or a file in api.key_file"
)
_STRICT_ECHO = re.compile(r"[A-Za-z][A-Za-z_\-]{0,23}")
_LOOSE_ECHO = re.compile(r"[^\x00-\x1f\x7f]{1,60}")


def _normalised(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def _is_literal_key(name: str, known: Mapping[str, _Field]) -> bool:
    norm = _normalised(name)
    if norm in _SECRET_NAMES:
        return True
    if any(_normalised(k) == norm for k in known) or difflib.get_close_matches(name, known, 1, 0.8):
        return False  # a typo of a known key such as key_env: "unknown key", with a hint
    return any(part in norm for part in _SECRET_PARTS)


# --------------------------------------------------------------------------------------------------
# Output paths.

_SAFE_VALUE = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,62}(?<!\.)")
_VALUE_TRANSLATION: Final = {
    **{c: None for c in range(0x20)},
    **{c: None for c in range(0x7F, 0xA0)},  # DEL and the C1 controls
    # Bidirectional overrides and marks: they make "\u202egpj.exe" look like "exe.jpg".
    **{c: None for c in (0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A))},
    ord("/"): "_",
    ord("\\"): "_",
}
_RESERVED: Final = frozenset(
    {"CON", "PRN", "AUX", "NUL"}
    | {f"COM{i}" for i in range(1, 10)}
    | {f"LPT{i}" for i in range(1, 10)}
)
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_RESERVED_STARTS: Final = frozenset(name[:3] for name in _RESERVED)

_TemplatePart = tuple[str, int]  # literal text, then index into (aoi_id, insight_id, name) or -1


def _is_reserved(value: str) -> bool:
    if value[:3].upper() not in _RESERVED_STARTS:
        return False
    return value.split(".", 1)[0].rstrip(" ").upper() in _RESERVED


def _compile_template(template: str) -> tuple[_TemplatePart, ...]:
    """Split a path template into literal/field parts; raise ValueError saying what is wrong."""
    if not template:
        raise ValueError("the path template is empty")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(
            f"unbalanced braces in the path template ({exc}); write {{{{ and }}}} for a literal brace"
        ) from None
    parts: list[_TemplatePart] = []
    skeleton = []
    for literal, field_name, spec, conversion in parsed:
        if field_name is None:
            parts.append((literal, -1))
            skeleton.append(literal)
            continue
        shown = (
            "{"
            + field_name
            + ("!" + conversion if conversion else "")
            + (":" + spec if spec else "")
            + "}"
        )
        if field_name == "" or field_name.isdigit():
            raise ValueError(
                f"positional field {shown} in the path template; use {{aoi_id}}, {{insight_id}} "
                "or {name}"
            )
        if "." in field_name or "[" in field_name:
            raise ValueError(
                f"{shown}: attribute or index access is not allowed in the path template; use a "
                "bare {aoi_id}, {insight_id} or {name}"
            )
        if field_name not in _TEMPLATE_FIELDS:
            hint = difflib.get_close_matches(field_name, _TEMPLATE_FIELDS, 1, 0.6)
            did_you_mean = f" (did you mean {{{hint[0]}}}?)" if hint else ""
            raise ValueError(
                f"unknown field {shown} in the path template{did_you_mean}; the fields are "
                "{aoi_id}, {insight_id} and {name}"
            )
        if conversion is not None:
            raise ValueError(
                f"{shown}: conversions (!r, !s, !a) are not allowed in the path template"
            )
        if spec:
            raise ValueError(f"{shown}: format specs are not allowed in the path template")
        parts.append((literal, _TEMPLATE_FIELDS.index(field_name)))
        skeleton.append(literal + "x")
    text = "".join(skeleton)
    if "\\" in text:
        raise ValueError(
            "backslashes are not allowed in the path template; separate folders with /"
        )
    if _CONTROL.search(text):
        raise ValueError("control characters are not allowed in the path template")
    if text.startswith("/"):
        raise ValueError("the path template must be relative to the output dir (no leading /)")
    if re.match(r"[A-Za-z]:", parsed[0][0]):
        raise ValueError("the path template must not start with a drive (C:)")
    components = text.split("/")
    for component in components:
        if component in ("", ".", ".."):
            shown = component or "an empty folder name (// or a trailing /)"
            raise ValueError(
                f"the path template must stay under the output dir: {shown} is not allowed"
            )
    if components[0].casefold() == STATE_DIR_NAME:
        raise ValueError(f"the path template must not write into the state dir {STATE_DIR_NAME}/")
    return tuple(parts)


_DEFAULT_PARTS: Final = _compile_template(DEFAULT_PATH_TEMPLATE)


def _render(
    parts: tuple[_TemplatePart, ...], values: tuple[str, str, str], cache: dict[str, str]
) -> str:
    out = []
    for literal, index in parts:
        out.append(literal)
        if index >= 0:
            value = values[index]
            safe = cache.get(value)
            if safe is None:
                safe = cache[value] = sanitize_path_value(value)
            out.append(safe)
    return "".join(out)


def _relpath_problem(relpath: str) -> str | None:
    """Re-check a rendered path; return what is wrong, or None."""
    if relpath.startswith("/") or "\\" in relpath:
        return f"the output path {_quote(relpath)} is not relative to the output dir"
    components = relpath.split("/")
    for component in components:
        if component in ("", ".", ".."):
            return f"the output path {_quote(relpath)} leaves the output dir"
        if len(component) > _MAX_COMPONENT_BYTES // 4:
            size = len(component.encode("utf-8", "surrogatepass"))
            if size > _MAX_COMPONENT_BYTES:
                return (
                    f"the output path component {_quote(component[:40] + '…')} is {size} bytes "
                    f"long; the limit is {_MAX_COMPONENT_BYTES} (shorten the id or set name)"
                )
    if components[0].casefold() == STATE_DIR_NAME:
        return f"the output path {_quote(relpath)} enters the state dir {STATE_DIR_NAME}/"
    return None


def _path_conflicts(relpaths: list[str]) -> Iterator[tuple[int, int, str]]:
    """Yield ``(i, j, kind)`` for each clash of ``relpaths[i]`` (all distinct) with ``relpaths[j]``.

    Kinds: ``folder`` (path i is a folder of path j), ``part-folder`` (path i + ``.part`` is a folder
    of path j), ``part`` (path i is path j + ``.part``) and ``case`` (the paths differ only in case or
    Unicode normalisation; a warning). Linear in the total length of the paths.
    """
    files = {relpath: i for i, relpath in enumerate(relpaths)}
    folders: dict[str, int] = {}
    for j, relpath in enumerate(relpaths):
        cut = relpath.find("/")
        while cut != -1:
            folders.setdefault(relpath[:cut], j)
            cut = relpath.find("/", cut + 1)
    folded: dict[str, int] = {}
    for i, relpath in enumerate(relpaths):
        other = folders.get(relpath)
        if other is not None:
            yield i, other, "folder"
        other = folders.get(relpath + ".part")
        if other is not None:
            yield i, other, "part-folder"
        if relpath.endswith(".part"):
            other = files.get(relpath[:-5])
            if other is not None:
                yield i, other, "part"
        first = folded.setdefault(unicodedata.normalize("NFC", relpath).casefold(), i)
        if first != i:
            yield i, first, "case"


# --------------------------------------------------------------------------------------------------
# Validation of the node tree.

_DEC_INT = re.compile(r"[-+]?(?:0|[1-9][0-9]*)")
_DEC_NUMBER = re.compile(r"[-+]?(?:(?:0|[1-9][0-9]*)(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER_TAGS: Final = frozenset({_T_INT, _T_FLOAT})


class _Entry:
    __slots__ = ("aoi_id", "col", "index", "inputs", "insight_id", "line", "name", "outputs")

    def __init__(self, index: int, node: _Map, values: dict[str, Any]) -> None:
        self.index = index
        self.line = node.line
        self.col = node.col
        self.aoi_id: str = values["aoi_id"]
        self.insight_id: str = values["insight_id"]
        self.name: str | None = values.get("name")
        self.inputs: tuple[str, ...] | None = values.get("inputs")
        self.outputs: tuple[str, ...] | None = values.get("outputs")


_Section = tuple[dict[str, Any], dict[str, _Node]]  # converted values, value nodes; by key


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class _Validator:
    """Walks the node tree along the key/type table (:data:`_TOP`), reporting every problem."""

    def __init__(self, report: _Report, path: Path) -> None:
        self.report = report
        self.manifest_path = path
        self.base = path.parent.absolute()

    # -- the document -----------------------------------------------------------------------------

    def manifest(self, root: _Node | None) -> Manifest | None:
        if root is None or (type(root) is _Scalar and root.tag == _T_NULL and root.style is None):
            self.report.error(1, 1, "", "the manifest is empty; expected version: 1 and exports:")
            return None
        if type(root) is not _Map:
            self.report.error(
                root.line,
                root.col,
                "",
                f"expected a mapping with version: 1 and exports:, got {_kind_name(root)}",
            )
            return None
        found = self.keys(root, "", _TOP, guard=True)
        if "version" in found:
            self.value(_TOP["version"], found["version"], "version")
        api = self.api(self.section(found, "api"))
        limits = self.limits(self.section(found, "limits"))
        output, parts = self.output(self.section(found, "output"))
        defaults = self.defaults(self.section(found, "defaults"))
        entries = self.exports(found.get("exports"))
        exports = self.plan(entries, defaults, parts) if parts is not None else ()
        if self.report.has_errors():
            return None
        return Manifest(
            path=self.manifest_path,
            api=api,
            limits=limits,
            output=output,
            exports=exports,
            warnings=self.report.warnings(),
        )

    # -- keys -------------------------------------------------------------------------------------

    def keys(
        self, node: _Map, path: str, table: Mapping[str, _Field], *, guard: bool = False
    ) -> dict[str, _Node]:
        """Check a mapping's keys against ``table``; return the known keys' value nodes.

        ``guard`` (top level and ``api``): refuse literal API keys, echo only plain key names.
        """
        found: dict[str, _Node] = {}
        seen: dict[str, _Scalar] = {}
        items = node.items
        for i in range(0, len(items), 2):
            key = items[i]
            if type(key) is not _Scalar or key.tag != _T_STR:
                self.bad_key(key, path, table)
                continue
            name = key.value
            first = seen.get(name)
            if first is not None:
                self.duplicate_key(key, first, path, guard=guard)
                continue
            seen[name] = key
            if name in table:
                found[name] = items[i + 1]
            else:
                self.unknown_key(key, path, table, guard=guard)
        if len(found) < len(table):
            for name, spec in table.items():
                if spec.required and name not in found:
                    self.report.error(node.line, node.col, path, f"missing required key {name}")
        return found

    def duplicate_key(self, key: _Scalar, first: _Scalar, path: str, *, guard: bool) -> None:
        where = f"(first at line {first.line}, column {first.col})"
        if (_STRICT_ECHO if guard else _LOOSE_ECHO).fullmatch(key.value):
            message = f"duplicate key {key.value} {where}"
            self.report.error(key.line, key.col, _join(path, key.value), message)
        else:
            self.report.error(key.line, key.col, path, f"duplicate key {where}")

    def unknown_key(
        self, key: _Scalar, path: str, table: Mapping[str, _Field], *, guard: bool
    ) -> None:
        name = key.value
        if guard and _is_literal_key(name, table):
            where = _join(path, name) if _STRICT_ECHO.fullmatch(name) else path
            self.report.error(key.line, key.col, where, _LITERAL_KEY_MESSAGE)
            return
        if name == "<<":
            self.report.error(key.line, key.col, path, _MERGE_KEY_MESSAGE)
            return
        hint = difflib.get_close_matches(name, table, 1, 0.6)
        message = "unknown key {}" + (f"; did you mean {hint[0]}?" if hint else "")
        message += f" (known keys here: {', '.join(table)})"
        if (_STRICT_ECHO if guard else _LOOSE_ECHO).fullmatch(name):
            self.report.error(key.line, key.col, _join(path, name), message.format(name))
        else:
            self.report.error(key.line, key.col, path, message.format("(name not shown)"))

    def bad_key(self, key: _Node, path: str, table: Mapping[str, _Field]) -> None:
        """Report a key that is not a string: a collection, or a plain scalar YAML retyped."""
        report = self.report
        known = f"known keys here: {', '.join(table)}"
        if type(key) is not _Scalar:
            report.error(
                key.line, key.col, path, f"expected a key name, got {_kind_name(key)} as a key"
            )
        elif key.tag == _T_MERGE:
            report.error(key.line, key.col, path, _MERGE_KEY_MESSAGE)
        elif path == "api" or key.style is not None or not _LOOSE_ECHO.fullmatch(key.value):
            report.error(
                key.line,
                key.col,
                path,
                f"key names are strings; YAML reads this unquoted key as {_reading_kind(key)}, "
                f"and it is not a known key ({known})",
            )
        else:
            report.error(
                key.line,
                key.col,
                path,
                f"unquoted key {key.value} is read by YAML as {_reading(key)} — quote it: "
                f"{_quote(key.value)}; it is not a known key either ({known})",
            )

    # -- values by kind ---------------------------------------------------------------------------

    def value(self, spec: _Field, node: _Node, path: str) -> Any:
        """Convert ``node`` as ``spec.kind`` says; None (reported) when it is not valid."""
        kind = spec.kind
        if kind is _Kind.ID:
            if type(node) is _Scalar and node.tag == _T_STR and node.value:
                return node.value
            return self.identifier(node, path)
        if kind is _Kind.ASSETS:
            return self.assets(node, path)
        if kind is _Kind.STATUSES:
            return self.statuses(node, path)
        if kind is _Kind.URL:
            return self.url(node, path)
        if kind is _Kind.ENV_NAME:
            return self.env_name(node, path)
        if kind is _Kind.PATH:
            return self.path(node, path)
        if kind is _Kind.TEMPLATE:
            return self.template(node, path)
        if kind is _Kind.INT:
            assert spec.minimum is not None and spec.maximum is not None
            return self.integer(node, path, spec.minimum, spec.maximum)
        if kind is _Kind.RATE:
            return self.rate(node, path)
        if kind is _Kind.DURATION:
            return self.duration(node, path)
        if kind is _Kind.VERSION:
            return self.version(node, path)
        raise AssertionError(f"{kind} is walked by its owner")  # SECTION, EXPORTS

    def values(
        self, nodes: dict[str, _Node], table: Mapping[str, _Field], path: str
    ) -> dict[str, Any]:
        """Convert every value in ``nodes``; those that are not valid are left out."""
        out = {}
        for name, node in nodes.items():
            value = self.value(table[name], node, _join(path, name))
            if value is not None:
                out[name] = value
        return out

    def hidden(self, path: str) -> bool:
        """Whether values at ``path`` must never be echoed (the ``api`` section)."""
        return path == "api" or path.startswith("api.")

    def version(self, node: _Node, path: str) -> int | None:
        if type(node) is _Scalar and node.style is None and node.tag == _T_INT:
            if node.value == "1":
                return 1
            if _DEC_INT.fullmatch(node.value):
                self.report.error(
                    node.line,
                    node.col,
                    path,
                    f"unsupported manifest version {node.value}; this batch-export reads version 1",
                )
                return None
        self.report.error(node.line, node.col, path, "expected the integer 1 (version: 1)")
        return None

    def string(self, node: _Node, path: str) -> str | None:
        """Return a string node's value, or report what YAML made of it and return None."""
        if type(node) is _Scalar and node.tag == _T_STR:
            return node.value
        report = self.report
        if type(node) is not _Scalar:
            report.error(node.line, node.col, path, f"expected a string, got {_kind_name(node)}")
        elif node.style is None and node.value == "":
            report.error(node.line, node.col, path, "expected a string, got nothing (empty value)")
        elif node.style is not None or node.tag not in _YAML11_TAGS:
            tag = "(not shown)" if self.hidden(path) else _short_tag(node.tag)
            report.error(node.line, node.col, path, f"expected a string, got a value tagged {tag}")
        elif self.hidden(path):
            report.error(
                node.line,
                node.col,
                path,
                f"expected a string; YAML reads this unquoted value as {_reading_kind(node)} — "
                "quote it (value not shown)",
            )
        else:
            report.error(
                node.line,
                node.col,
                path,
                f"expected a string; unquoted {node.value} is read by YAML as {_reading(node)} — "
                f"quote it: {_quote(node.value)}",
            )
        return None

    def identifier(self, node: _Node, path: str) -> str | None:
        """Return a non-empty string (an id, a name)."""
        text = self.string(node, path)
        if text == "":
            name = path.rsplit(".", 1)[-1]
            self.report.error(node.line, node.col, path, f"{name} must not be empty")
            return None
        # Dots and control characters are fine in an id: the URL percent-encodes them, the path
        # template sanitises them, and log lines escape them (SPEC §3).
        return text

    def string_list(self, node: _Node, path: str) -> list[_Scalar] | None:
        """Return the items of a list of strings, or report why it is not one."""
        if type(node) is not _Seq:
            if type(node) is _Scalar and node.style is None and node.tag == _T_NULL:
                message = "expected a list, got nothing (write [] for an empty list)"
            elif type(node) is _Scalar and node.tag == _T_STR and not self.hidden(path):
                message = f"expected a list, got a string (write [{_quote(node.value)}])"
            else:
                message = f"expected a list, got {_kind_name(node)}"
            self.report.error(node.line, node.col, path, message)
            return None
        if node.tag != _T_SEQ:
            self.bad_tag(node, path)
        items: list[_Scalar] = []
        for i, item in enumerate(node.items):
            if type(item) is _Scalar and item.tag == _T_STR:
                items.append(item)
            else:
                self.string(item, f"{path}[{i}]")
        return items if len(items) == len(node.items) else None

    def assets(self, node: _Node, path: str) -> tuple[str, ...] | None:
        """Return asset ids, deduplicated in first-occurrence order (the order sent to the API)."""
        if type(node) is _Seq and node.tag == _T_SEQ:  # fast path: a list of non-empty strings
            values = []
            for item in node.items:
                if type(item) is not _Scalar or item.tag != _T_STR or not item.value:
                    break
                values.append(item.value)
            else:
                return tuple(dict.fromkeys(values))
        items = self.string_list(node, path)
        if items is None:
            return None
        empty = [i for i, item in enumerate(items) if not item.value]
        for i in empty:
            self.report.error(
                items[i].line, items[i].col, f"{path}[{i}]", "an asset id must not be empty"
            )
        if empty:
            return None
        return tuple(dict.fromkeys(item.value for item in items))

    def statuses(self, node: _Node, path: str) -> tuple[str, ...] | None:
        """Return a non-empty list of status names, lower-cased and deduplicated."""
        items = self.string_list(node, path)
        if items is None:
            return None
        if not items:
            self.report.error(node.line, node.col, path, "expected at least one status")
            return None
        blank = [item for item in items if not item.value.strip()]
        for item in blank:
            self.report.error(item.line, item.col, path, "a status must not be empty")
        return None if blank else tuple(dict.fromkeys(item.value.lower() for item in items))

    def url(self, node: _Node, path: str) -> str | None:
        """Return an http(s) base URL without a trailing ``/``; the value is never echoed."""
        text = self.string(node, path)
        if text is None:
            return None
        problem = None
        try:
            parts = urllib.parse.urlsplit(text)
            _ = parts.port  # raises ValueError on a bad port
        except ValueError:
            problem = "is not a valid URL"
        else:
            if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
                problem = (
                    "must be an http:// or https:// URL with a host, such as "
                    "https://api.pixxel.space"
                )
            elif "@" in parts.netloc:
                problem = (
                    "must not hold user:password@; the key goes in an environment variable "
                    "(api.key_env) or a file (api.key_file)"
                )
            elif parts.query or parts.fragment or text.endswith(("?", "#")):
                problem = "must not have a query (?...) or fragment (#...)"
            elif re.search(r"\s", text) or _CONTROL.search(text):
                problem = "must not contain white space or control characters"
        if problem is not None:
            self.report.error(node.line, node.col, path, f"the API URL {problem} (value not shown)")
            return None
        return text.rstrip("/")

    def env_name(self, node: _Node, path: str) -> str | None:
        """Return the name of an environment variable; the value is never echoed."""
        text = self.string(node, path)
        if text is not None and not _ENV_NAME.fullmatch(text):
            self.report.error(
                node.line,
                node.col,
                path,
                "expected the NAME of an environment variable (letters, digits and _, not "
                "starting with a digit), such as PIXXEL_API_KEY; the value is not shown in "
                "case it is the key itself",
            )
            return None
        return text

    def path(self, node: _Node, path: str) -> Path | None:
        """Return a path; a relative one is anchored at the manifest's folder."""
        text = self.string(node, path)
        problem = None
        if text is None:
            return None
        if not text:
            problem = "expected a path, got an empty string"
        elif text.startswith("~"):
            problem = "~ is not expanded here; write the full path"
        elif "\x00" in text:
            problem = "a path must not contain NUL"
        if problem is not None:
            self.report.error(node.line, node.col, path, problem)
            return None
        given = Path(text)
        return given if given.is_absolute() else self.base / given

    def template(self, node: _Node, path: str) -> str | None:
        """Return a valid output path template."""
        text = self.string(node, path)
        if text is None:
            return None
        try:
            _compile_template(text)
        except ValueError as exc:
            self.report.error(node.line, node.col, path, str(exc))
            return None
        return text

    def number(self, node: _Node, path: str, what: str) -> int | float | None:
        """Return a plain decimal number (an int when written without ``.`` or ``e``)."""
        report = self.report
        if type(node) is not _Scalar:
            report.error(node.line, node.col, path, f"expected {what}, got {_kind_name(node)}")
            return None
        value, plain = node.value, node.style is None
        if (plain and node.tag in _NUMBER_TAGS) or node.tag == _T_STR:
            if plain and _DEC_INT.fullmatch(value):
                return int(value)
            if plain and _DEC_NUMBER.fullmatch(value):
                return float(value)  # also 1e3, which YAML 1.1 reads as a string
            if plain and node.tag in _NUMBER_TAGS:
                message = f"write a plain decimal number: YAML 1.1 reads unquoted {value} as "
                message += _reading(node)
            elif not plain:
                message = (
                    f"expected {what}, got the quoted string {_quote(value)} (remove the quotes)"
                )
            else:
                message = f"expected {what}, got the string {value}"
        elif plain and node.tag == _T_NULL:
            message = f"expected {what}, got nothing"
        elif plain and node.tag in _YAML11_TAGS:
            message = f"expected {what}; unquoted {value} is read by YAML as {_reading(node)}"
        else:
            message = f"expected {what}, got a value tagged {_short_tag(node.tag)}"
        report.error(node.line, node.col, path, message)
        return None

    def integer(self, node: _Node, path: str, low: int, high: int) -> int | None:
        """Return a decimal integer in ``[low, high]``."""
        number = self.number(node, path, "an integer")
        if number is None:
            return None
        if not isinstance(number, int):
            assert type(node) is _Scalar
            message = f"expected a whole number, got {node.value}"
        elif not low <= number <= high:
            message = f"must be between {low} and {high}, got {number}"
        else:
            return number
        self.report.error(node.line, node.col, path, message)
        return None

    def rate(self, node: _Node, path: str) -> float | None:
        """Return a rate in requests/s, above 0 and finite."""
        number = self.number(node, path, "a number")
        if number is None:
            return None
        if not number > 0 or not math.isfinite(number):
            message = f"must be a number of requests/s above 0, got {number:g}"
            self.report.error(node.line, node.col, path, message)
            return None
        return float(number)

    def duration(self, node: _Node, path: str) -> float | None:
        """Return a duration in seconds (> 0) from a number or a string such as ``1h30m``."""
        report = self.report
        seconds: float
        if type(node) is _Scalar and node.tag == _T_STR:
            try:
                seconds = parse_duration(node.value)
            except ValueError as exc:
                report.error(node.line, node.col, path, str(exc))
                return None
        elif type(node) is _Scalar and node.style is None and node.tag in _NUMBER_TAGS:
            if not _DEC_NUMBER.fullmatch(node.value):
                report.error(
                    node.line,
                    node.col,
                    path,
                    "write a plain decimal number of seconds or a duration such as 90s, 15m or "
                    f"1h30m: YAML 1.1 reads unquoted {node.value} as {_reading(node)}",
                )
                return None
            seconds = float(node.value)
        else:
            got = _reading(node) if type(node) is _Scalar else _kind_name(node)
            report.error(
                node.line,
                node.col,
                path,
                f"expected a duration such as 90s, 15m, 1h30m, 500ms or a number of seconds, got "
                f"{got}",
            )
            return None
        if not seconds > 0 or not math.isfinite(seconds):
            report.error(node.line, node.col, path, "a duration here must be more than 0 seconds")
            return None
        return seconds

    def bad_tag(self, node: _Node, path: str) -> None:
        tag = "(not shown)" if self.hidden(path) else _short_tag(node.tag)
        message = f"unexpected explicit tag {tag}; remove it"
        self.report.error(node.line, node.col, path, message)

    # -- sections ---------------------------------------------------------------------------------

    def section(self, found: dict[str, _Node], name: str) -> _Section | None:
        """Return the converted values and value nodes of a section; None if it is not a mapping."""
        node = found.get(name)
        if node is None or (type(node) is _Scalar and node.tag == _T_NULL and node.style is None):
            return {}, {}  # absent, or "limits:" with nothing under it
        if type(node) is not _Map:
            message = f"expected a mapping, got {_kind_name(node)}"
            self.report.error(node.line, node.col, name, message)
            return None
        if node.tag != _T_MAP:
            self.bad_tag(node, name)
        spec = _TOP[name]
        assert spec.keys is not None
        nodes = self.keys(node, name, spec.keys, guard=name == "api")
        return self.values(nodes, spec.keys, name), nodes

    def api(self, section: _Section | None) -> ApiSettings:
        if section is None:
            return ApiSettings()
        values, nodes = section
        if "key_env" in nodes and "key_file" in nodes:
            node = nodes["key_file"]
            self.report.error(
                node.line,
                node.col,
                "api.key_file",
                "set api.key_env or api.key_file, not both: the key must have one source",
            )
        ready, failed = values.get("ready_statuses"), values.get("failed_statuses")
        if ready is not None and failed is not None:
            both = set(ready) & set(failed)
            ready_items, failed_items = nodes["ready_statuses"], nodes["failed_statuses"]
            assert type(ready_items) is _Seq and type(failed_items) is _Seq
            for item in failed_items.items:
                assert type(item) is _Scalar
                status = item.value.lower()
                if status in both:
                    both.discard(status)
                    first = next(
                        other
                        for other in ready_items.items
                        if type(other) is _Scalar and other.value.lower() == status
                    )
                    self.report.error(
                        item.line,
                        item.col,
                        "api.failed_statuses",
                        f"this status is also in api.ready_statuses (line {first.line}, column "
                        f"{first.col}); a status is either ready or failed",
                    )
        return ApiSettings(**values)

    def limits(self, section: _Section | None) -> LimitSettings:
        if section is None:
            return LimitSettings()
        values, nodes = section
        low, high = values.get("poll_interval"), values.get("poll_max_interval")
        if low is not None and high is not None and high < low:
            node = nodes["poll_max_interval"]
            self.report.error(
                node.line,
                node.col,
                "limits.poll_max_interval",
                f"must be at least poll_interval ({high:g} s < {low:g} s)",
            )
        return LimitSettings(**values)

    def output(
        self, section: _Section | None
    ) -> tuple[OutputSettings, tuple[_TemplatePart, ...] | None]:
        """Return the settings and the compiled template (None when the template is unusable)."""
        if section is None:
            return OutputSettings(), None
        values, nodes = section
        if "path" in nodes and "path" not in values:
            return OutputSettings(dir=values.get("dir")), None
        settings = OutputSettings(**values)
        return settings, _compile_template(settings.path)

    def defaults(
        self, section: _Section | None
    ) -> tuple[tuple[str, ...] | None, tuple[str, ...] | None]:
        """Return the default inputs and outputs; None for one that is invalid."""
        if section is None:
            return None, None
        values, nodes = section
        inputs: tuple[str, ...] | None = values.get("inputs", None if "inputs" in nodes else ())
        outputs: tuple[str, ...] | None = values.get("outputs", None if "outputs" in nodes else ())
        return inputs, outputs

    # -- exports ----------------------------------------------------------------------------------

    def exports(self, node: _Node | None) -> list[_Entry]:
        if node is None:
            return []
        if type(node) is not _Seq:
            message = f"expected a list of exports, got {_kind_name(node)}"
            self.report.error(node.line, node.col, "exports", message)
            return []
        if node.tag != _T_SEQ:
            self.bad_tag(node, "exports")
        if not node.items:
            self.report.error(node.line, node.col, "exports", "expected at least one export")
            return []
        entries = []
        for index, child in enumerate(node.items):
            path = f"exports[{index}]"
            if type(child) is not _Map:
                self.report.error(
                    child.line,
                    child.col,
                    path,
                    f"expected a mapping with aoi_id and insight_id, got {_kind_name(child)}",
                )
                continue
            if child.tag != _T_MAP:
                self.bad_tag(child, path)
            nodes = self.keys(child, path, _EXPORT)
            values = self.values(nodes, _EXPORT, path)
            if len(values) == len(nodes) and "aoi_id" in values and "insight_id" in values:
                entries.append(_Entry(index, child, values))
        return entries

    def plan(
        self,
        entries: list[_Entry],
        defaults: tuple[tuple[str, ...] | None, tuple[str, ...] | None],
        parts: tuple[_TemplatePart, ...],
    ) -> tuple[ExportSpec, ...]:
        """Apply defaults, render output paths, merge identical entries, find collisions."""
        report = self.report
        cache: dict[str, str] = {}
        specs: list[ExportSpec] = []
        firsts: list[_Entry] = []  # the entry behind each spec
        by_path: dict[str, int] = {}
        default_inputs, default_outputs = defaults
        for entry in entries:
            inputs = default_inputs if entry.inputs is None else entry.inputs
            outputs = default_outputs if entry.outputs is None else entry.outputs
            if inputs is None or outputs is None:
                continue  # an invalid defaults list, reported already
            label = f"exports[{entry.index}]"
            if not inputs and not outputs:
                report.error(
                    entry.line,
                    entry.col,
                    label,
                    "nothing selected: inputs and outputs are both empty (set them here or in "
                    "defaults:)",
                )
                continue
            name = entry.insight_id if entry.name is None else entry.name
            relpath = _render(parts, (entry.aoi_id, entry.insight_id, name), cache)
            problem = _relpath_problem(relpath)
            if problem is not None:
                report.error(entry.line, entry.col, label, problem)
                continue
            j = by_path.get(relpath)
            if j is None:
                by_path[relpath] = len(specs)
                firsts.append(entry)
                specs.append(
                    ExportSpec(
                        entry.aoi_id, entry.insight_id, inputs, outputs, name, relpath, entry.line
                    )
                )
                continue
            other, first = specs[j], firsts[j]
            where = f"exports[{first.index}] (line {first.line})"
            if (other.aoi_id, other.insight_id, other.inputs, other.outputs, other.name) == (
                entry.aoi_id,
                entry.insight_id,
                inputs,
                outputs,
                name,
            ):
                report.warning(
                    entry.line, entry.col, label, f"identical to {where}; merged into it"
                )
            else:
                report.error(
                    entry.line,
                    entry.col,
                    label,
                    f"output path {_quote(relpath)} is also the output path of {where}; set a "
                    "distinct name or change output.path",
                )
        self.collisions(specs, firsts)
        return tuple(specs)

    def collisions(self, specs: list[ExportSpec], firsts: list[_Entry]) -> None:
        """Report paths that are folders of others or ``.part`` names; warn on case-only clashes."""
        for i, j, kind in _path_conflicts([spec.relpath for spec in specs]):
            entry, other = firsts[i], firsts[j]
            label = f"exports[{entry.index}]"
            shown = _quote(specs[i].relpath)
            where = f"exports[{other.index}] (line {other.line})"
            if kind == "case":
                self.report.warning(
                    entry.line,
                    entry.col,
                    label,
                    f"output path {shown} differs from that of {where} only in letter case or "
                    "Unicode form; they collide on case-insensitive file systems (macOS, Windows)",
                )
                continue
            message = {
                "folder": f"output path {shown} is a folder in the output path of {where}",
                "part-folder": f"the download file {shown}.part is a folder in the output path "
                f"of {where}",
                "part": f"output path {shown} is the download file (.part) of {where}",
            }[kind]
            self.report.error(entry.line, entry.col, label, message)


_YAML11_TAGS: Final = frozenset({_T_INT, _T_FLOAT, _T_BOOL, _T_NULL, _T_TIMESTAMP, _T_STR})
_MERGE_KEY_MESSAGE: Final = (
    "YAML merge keys (<<) are not supported; use defaults: for shared inputs/outputs, or an alias "
    "(*name) for a whole value"
)
