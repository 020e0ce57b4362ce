"""Checks of single nodes: keys of a mapping against the key table, and values by kind (SPEC §3).

Every problem goes to the :class:`._yaml._Report` as ``FILE:LINE:COL: PATH: message``. No message echoes
a value from the ``api`` section, and a key that looks like a literal API key is refused without echo.
"""

from __future__ import annotations

import datetime as _dt
import difflib
import math
import re
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from batch_export.manifest._keys import (
    _AGE,
    _AGE_UNITS,
    _ENV_NAME,
    _RFC3339,
    _SIZE,
    _SIZE_UNITS,
    _Field,
    _Kind,
)
from batch_export.manifest._model import ALL, OBJECT_STORE_SCHEMES
from batch_export.manifest._paths import (
    _CONTROL,
    _compile_name_template,
    _compile_template,
    _quote,
)
from batch_export.manifest._yaml import (
    _T_BOOL,
    _T_FLOAT,
    _T_INT,
    _T_MERGE,
    _T_NULL,
    _T_SEQ,
    _T_STR,
    _T_TIMESTAMP,
    _kind_name,
    _Map,
    _Node,
    _reading,
    _reading_kind,
    _Report,
    _Scalar,
    _Seq,
    _short_tag,
)
from batch_export.units import parse_duration

__all__ = ["api_url_problem"]

_YAML11_TAGS: Final = frozenset({_T_INT, _T_FLOAT, _T_BOOL, _T_NULL, _T_TIMESTAMP, _T_STR})
_SIZE_EXPECTED: Final = "expected a size such as 32MiB, 1GiB, 500MB or a number of bytes"
_STORE_TYPO = re.compile(r"(s3|gs|az):/?(?!/)", re.IGNORECASE)
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]{0,15}")
_WHITE_OR_CONTROL = re.compile(r"[\s\x00-\x1f\x7f-\x9f]")
_MERGE_KEY_MESSAGE: Final = (
    "YAML merge keys (<<) are not supported; use defaults: for shared inputs/outputs, or an alias "
    "(*name) for a whole value"
)


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


_DEC_INT = re.compile(r"[-+]?(?:0|[1-9][0-9]*)")
_DEC_NUMBER = re.compile(r"[-+]?(?:(?:0|[1-9][0-9]*)(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
_NUMBER_TAGS: Final = frozenset({_T_INT, _T_FLOAT})


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class _Checks:
    """Checks keys and values of single nodes along the key table, reporting every problem."""

    def __init__(self, report: _Report, path: Path) -> None:
        self.report = report
        self.manifest_path = path
        self.base = path.parent.absolute()

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
        if kind is _Kind.SIZE:
            assert spec.minimum is not None and spec.maximum is not None
            return self.size(node, path, spec.minimum, spec.maximum)
        if kind is _Kind.OUT_DIR:
            return self.out_dir(node, path)
        if kind is _Kind.AOIS:
            return self.aois(node, path)
        if kind is _Kind.IDS:
            return self.ids(node, path, "a project id")
        if kind is _Kind.TIME_OR_AGE:
            return self.time_or_age(node, path)
        if kind is _Kind.ASSETS_OR_ALL:
            return self.assets_or_all(node, path)
        if kind is _Kind.NAME_TEMPLATE:
            return self.name_template(node, path)
        raise AssertionError(f"{kind} is walked by its owner")  # SECTION, EXPORTS, DISCOVER

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
        problem = api_url_problem(text)
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

    def size(self, node: _Node, path: str, low: int, high: int) -> int | None:
        """Return a size in bytes in ``[low, high]``: an integer, or a string such as ``32MiB``."""
        size: int | float
        if type(node) is _Scalar and node.style is None and node.tag in _NUMBER_TAGS:
            number = self.number(node, path, "a number of bytes")
            if number is None:
                return None
            size = number
        elif type(node) is _Scalar and node.tag == _T_STR:
            match = _SIZE.fullmatch(node.value.strip())
            if match is None:
                message = f"{_SIZE_EXPECTED}, got {_quote(node.value)}"
                if _DEC_INT.fullmatch(node.value.strip()):
                    message += " (remove the quotes for a number of bytes)"
                self.report.error(node.line, node.col, path, message)
                return None
            number_text, unit = match.groups()
            size = round(float(number_text) * _SIZE_UNITS[unit])
        else:
            got = _reading(node) if type(node) is _Scalar else _kind_name(node)
            self.report.error(node.line, node.col, path, f"{_SIZE_EXPECTED}, got {got}")
            return None
        if not isinstance(size, int):
            message = f"expected a whole number of bytes, got {size:g}"
        elif not low <= size <= high:
            message = f"must be between {low} and {high:,} bytes, got {size:,}"
        else:
            return size
        self.report.error(node.line, node.col, path, message)
        return None

    def out_dir(self, node: _Node, path: str) -> Path | str | None:
        """Return the output root: a local folder (a :class:`Path`) or an object-store URL."""
        if type(node) is not _Scalar or node.tag != _T_STR or "://" not in node.value:
            typo = _STORE_TYPO.match(node.value) if type(node) is _Scalar else None
            if typo is not None:
                scheme = typo.group(1).lower()
                self.report.error(
                    node.line,
                    node.col,
                    path,
                    f"an object-store URL starts with {scheme}:// (two slashes), as in "
                    f"{scheme}://bucket/prefix; for a local folder named {scheme}: write ./{scheme}:",
                )
                return None
            return self.path(node, path)
        text = node.value
        scheme, _, rest = text.partition("://")
        bucket, _, prefix = rest.partition("/")
        problem = None
        if scheme.lower() not in OBJECT_STORE_SCHEMES:
            shown = f"{scheme}://" if _SCHEME.fullmatch(scheme) else "this URL scheme"
            problem = (
                f"{shown} is not an object store batch-export writes to; use a local folder or "
                "s3://bucket/prefix, gs://bucket/prefix or az://container/prefix"
            )
        elif "@" in bucket:
            problem = (
                "must not hold credentials (user@ or key@): they come from the store's standard "
                "environment and files, never from the manifest (value not shown)"
            )
        elif not bucket:
            problem = f"names no bucket; write {scheme.lower()}://bucket/prefix"
        elif ":" in bucket:
            problem = (
                "the bucket must not carry a port; name an S3-compatible endpoint with "
                "AWS_ENDPOINT_URL"
            )
        elif "?" in text or "#" in text:
            problem = "an object-store URL must not have a query (?...) or fragment (#...)"
        elif _WHITE_OR_CONTROL.search(text):
            problem = "an object-store URL must not contain white space or control characters"
        if problem is not None:
            self.report.error(node.line, node.col, path, problem)
            return None
        prefix = prefix.rstrip("/")
        return f"{scheme.lower()}://{bucket}" + (f"/{prefix}" if prefix else "")

    def plain_all(self, node: _Node, path: str, what: str) -> bool:
        """Whether ``node`` is the plain word ``all``; a quoted ``"all"`` is reported (ambiguous)."""
        if type(node) is not _Scalar or node.tag != _T_STR or node.value != ALL:
            return False
        if node.style is not None:
            self.report.error(
                node.line,
                node.col,
                path,
                f"write all without quotes for {what}, or a list such as [{_quote(ALL)}] for an "
                "id that is the word all",
            )
        return True

    def aois(self, node: _Node, path: str) -> tuple[str, ...] | str | None:
        """Return AOI ids, or ``"all"`` for the plain word ``all``."""
        if self.plain_all(node, path, "every AOI the key can list"):
            return ALL if type(node) is _Scalar and node.style is None else None
        if type(node) is _Scalar and node.tag == _T_STR and node.style is None:
            message = (
                f"expected a list of AOI ids or the word all, got a string (write "
                f"[{_quote(node.value)}])"
            )
            self.report.error(node.line, node.col, path, message)
            return None
        return self.ids(node, path, "an AOI id")

    def ids(self, node: _Node, path: str, what: str) -> tuple[str, ...] | None:
        """Return a non-empty list of non-empty ids, deduplicated in first-occurrence order."""
        items = self.string_list(node, path)
        if items is None:
            return None
        if not items:
            self.report.error(node.line, node.col, path, "expected at least one id")
            return None
        empty = [i for i, item in enumerate(items) if not item.value]
        for i in empty:
            item = items[i]
            self.report.error(item.line, item.col, f"{path}[{i}]", f"{what} must not be empty")
        return None if empty else tuple(dict.fromkeys(item.value for item in items))

    def time_or_age(self, node: _Node, path: str) -> _dt.datetime | float | None:
        """Return an aware UTC datetime (RFC 3339) or an age in seconds (``30d``, ``12h``)."""
        text = self.string(node, path)
        if text is None:
            return None
        text = text.strip()
        problem = None
        if _AGE.fullmatch(text):
            seconds = sum(
                float(number) * _AGE_UNITS[unit]
                for number, unit in re.findall(r"([0-9.]+)([a-z])", text)
            )
            if seconds > 0 and math.isfinite(seconds):
                return seconds
            problem = "an age here must be more than 0"
        elif _RFC3339.fullmatch(text):
            try:
                when = _dt.datetime.fromisoformat(text.upper().replace("Z", "+00:00"))
            except ValueError:
                problem = f"{_quote(text)} is not a valid time (check the month, day and hour)"
            else:
                return when.astimezone(_dt.UTC)
        elif re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", text):
            problem = (
                f"a time of day and a zone are needed too, such as {_quote(text + 'T00:00:00Z')}"
            )
        elif re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9:.]+", text):
            problem = f"{_quote(text)} has no time zone; add Z (UTC) or an offset such as +05:30"
        else:
            problem = (
                'expected an RFC 3339 time such as "2026-11-01T00:00:00Z" or an age such as 30d, '
                f"12h or 1w, got {_quote(text)}"
            )
        self.report.error(node.line, node.col, path, problem)
        return None

    def assets_or_all(self, node: _Node, path: str) -> tuple[str, ...] | str | None:
        """Return asset ids, or ``"all"`` for the plain word ``all``."""
        if self.plain_all(node, path, "every asset the listing names"):
            return ALL if type(node) is _Scalar and node.style is None else None
        return self.assets(node, path)

    def name_template(self, node: _Node, path: str) -> str | None:
        """Return a valid ``name`` template of a selector."""
        text = self.string(node, path)
        if text is None:
            return None
        try:
            _compile_name_template(text)
        except ValueError as exc:
            self.report.error(node.line, node.col, path, str(exc))
            return None
        return text

    def bad_tag(self, node: _Node, path: str) -> None:
        tag = "(not shown)" if self.hidden(path) else _short_tag(node.tag)
        message = f"unexpected explicit tag {tag}; remove it"
        self.report.error(node.line, node.col, path, message)


def api_url_problem(text: str) -> str | None:
    """Return why ``text`` cannot be an API base URL (``"must not hold user:password@; …"``), or None.

    The one rule for ``api.url``, ``--api-url``, ``BATCH_EXPORT_API_URL`` and the Python API's
    ``api_url``: an http(s) URL with a host, without userinfo, query or fragment, white space or
    control characters. The message never quotes the value (it may hold a secret).
    """
    try:
        parts = urllib.parse.urlsplit(text)
        _ = parts.port  # raises ValueError on a bad port
    except ValueError:
        return "is not a valid URL"
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL with a host, such as https://api.pixxel.space"
    if "@" in parts.netloc:
        return (
            "must not hold user:password@; the key goes in an environment variable "
            "(api.key_env) or a file (api.key_file)"
        )
    if parts.query or parts.fragment or text.endswith(("?", "#")):
        return "must not have a query (?...) or fragment (#...)"
    if re.search(r"\s", text) or _CONTROL.search(text):
        return "must not contain white space or control characters"
    return None
