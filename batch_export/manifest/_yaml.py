"""YAML text -> a compact node tree, and the problem report every manifest message goes through.

PyYAML resolves plain scalars the YAML 1.1 way (``012`` is the integer 10, ``on`` is ``True``, ``1:30`` is
90), so values are never judged after loading: the validator works on the node tree, from each node's tag
and style. The tree comes from the libyaml event stream of ``yaml.CSafeLoader`` (pure-Python
``yaml.SafeLoader`` without libyaml) and that loader's own YAML 1.1 resolver, composed by :func:`_compose`
instead of PyYAML's composer: its nodes are slotted (a 100,000-entry manifest composed by ``yaml.compose``
takes about 600 MB and 12 s), it is iterative (no recursion limit) and it sizes every collection as it
closes, which is the memoised count of the expanded graph that the YAML-bomb check needs. An alias inside
its own anchor's node (which PyYAML would turn into a cyclic graph) is rejected as it is met.

YAML syntax errors are built from positions, never from source text, since the source may hold a secret.
"""

from __future__ import annotations

import datetime as _dt
import gc
import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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

from batch_export.manifest._model import MAX_ALIAS_EXPANSION

__all__: list[str] = []


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
        _syntax_error(exc, report, text)
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


def _syntax_error(exc: yaml.MarkedYAMLError, report: _Report, text: str) -> None:
    mark = exc.problem_mark or exc.context_mark
    line, col = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
    if _char_at(text, line, col) == "\t":
        # libyaml says "found character that cannot start any token" and PyYAML shows '\t'.
        report.error(line, col, "", _TAB_MESSAGE)
        return
    problem = _redact(exc.problem or "invalid YAML")
    message = f"invalid YAML: {problem}"
    if exc.context:
        where = ""
        if exc.context_mark is not None and exc.context_mark is not mark:
            where = f" started at line {exc.context_mark.line + 1}"
        message += f" ({_redact(exc.context)}{where})"
    report.error(line, col, "", message)


_TAB_MESSAGE: Final = (
    "invalid YAML: found a tab character where YAML does not allow one; indent with spaces, "
    "not tabs"
)


def _char_at(text: str, line: int, col: int) -> str:
    """Return the character at 1-based ``line``/``col`` of ``text`` ("" past the end)."""
    start = 0
    for _ in range(line - 1):
        start = text.find("\n", start) + 1
        if start == 0:
            return ""
    end = text.find("\n", start)
    row = text[start:] if end == -1 else text[start:end]
    return row[col - 1 : col]


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
