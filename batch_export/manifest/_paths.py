"""Output path templates, sanitising of field values, and the collision check (SPEC §3).

Pure string work: nothing here touches the file system.
"""

from __future__ import annotations

import difflib
import functools
import json
import re
import string
import unicodedata
from collections.abc import Iterator
from typing import Final

from batch_export.manifest._model import DEFAULT_PATH_TEMPLATE, STATE_DIR_NAME

__all__ = [
    "path_conflicts",
    "render_name",
    "render_relpath",
    "sanitize_path_value",
    "template_fields",
]

#: Longest file or folder name most file systems take, in UTF-8 bytes.
_MAX_COMPONENT_BYTES: Final = 255

#: Fields of an output path template, in the order of the values tuple :func:`_render` takes.
_TEMPLATE_FIELDS: Final = ("aoi_id", "insight_id", "name", "insight_name", "created_date")

#: Fields of a ``discover:`` selector's ``name`` template (SPEC §7).
_NAME_FIELDS: Final = ("aoi_id", "insight_id", "insight_name", "created_date")

#: The values :func:`_render` takes: aoi_id, insight_id, name, insight_name, created_date.
_Values = tuple[str, str, str, str, str]


def _quote(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


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

_TemplatePart = tuple[str, int]  # literal text, then an index into _TEMPLATE_FIELDS or -1


def _is_reserved(value: str) -> bool:
    if value[:3].upper() not in _RESERVED_STARTS:
        return False
    return value.split(".", 1)[0].rstrip(" ").upper() in _RESERVED


def _fields_text(fields: tuple[str, ...], last: str) -> str:
    shown = [f"{{{name}}}" for name in fields]
    return ", ".join(shown[:-1]) + f" {last} " + shown[-1]


def _parse_fields(
    template: str, fields: tuple[str, ...], what: str
) -> tuple[list[_TemplatePart], str, str]:
    """Split ``template`` into literal/field parts; return them, the skeleton and the first literal.

    The skeleton is the template with every field replaced by ``x`` (for the path checks).

    Raises:
        ValueError: the template is empty, has unbalanced braces, or a field that is not a bare
            name from ``fields``; the message names ``what`` ("path template", "name template").
    """
    if not template:
        raise ValueError(f"the {what} is empty")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(
            f"unbalanced braces in the {what} ({exc}); write {{{{ and }}}} for a literal brace"
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
                f"positional field {shown} in the {what}; use {_fields_text(fields, 'or')}"
            )
        if "." in field_name or "[" in field_name:
            raise ValueError(
                f"{shown}: attribute or index access is not allowed in the {what}; use a "
                f"bare {_fields_text(fields, 'or')}"
            )
        if field_name not in fields:
            hint = difflib.get_close_matches(field_name, fields, 1, 0.6)
            did_you_mean = f" (did you mean {{{hint[0]}}}?)" if hint else ""
            raise ValueError(
                f"unknown field {shown} in the {what}{did_you_mean}; the fields are "
                f"{_fields_text(fields, 'and')}"
            )
        if conversion is not None:
            raise ValueError(f"{shown}: conversions (!r, !s, !a) are not allowed in the {what}")
        if spec:
            raise ValueError(f"{shown}: format specs are not allowed in the {what}")
        parts.append((literal, _TEMPLATE_FIELDS.index(field_name)))
        skeleton.append(literal + "x")
    return parts, "".join(skeleton), parsed[0][0]


@functools.lru_cache(maxsize=64)
def _compile_template(template: str) -> tuple[_TemplatePart, ...]:
    """Split a path template into literal/field parts; raise ValueError saying what is wrong."""
    parts, text, first = _parse_fields(template, _TEMPLATE_FIELDS, "path template")
    if "\\" in text:
        raise ValueError(
            "backslashes are not allowed in the path template; separate folders with /"
        )
    if _CONTROL.search(text):
        raise ValueError("control characters are not allowed in the path template")
    if text.startswith("/"):
        raise ValueError("the path template must be relative to the output dir (no leading /)")
    if re.match(r"[A-Za-z]:", first):
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


@functools.lru_cache(maxsize=64)
def _compile_name_template(template: str) -> tuple[_TemplatePart, ...]:
    """Split a selector's ``name`` template into parts; raise ValueError saying what is wrong.

    A name is one path component once sanitised, so ``/`` in it is allowed (it becomes ``_``).
    """
    parts, text, _ = _parse_fields(template, _NAME_FIELDS, "name template")
    if _CONTROL.search(text):
        raise ValueError("control characters are not allowed in the name template")
    return tuple(parts)


def _uses(parts: tuple[_TemplatePart, ...], field_name: str) -> bool:
    """Whether compiled ``parts`` use the field ``field_name``."""
    index = _TEMPLATE_FIELDS.index(field_name)
    return any(i == index for _, i in parts)


_DEFAULT_PARTS: Final = _compile_template(DEFAULT_PATH_TEMPLATE)


def _render(parts: tuple[_TemplatePart, ...], values: _Values, cache: dict[str, str]) -> str:
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


def path_conflicts(relpaths: list[str]) -> Iterator[tuple[int, int, str]]:
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


def render_relpath(
    template: str,
    *,
    aoi_id: str,
    insight_id: str,
    name: str,
    insight_name: str | None = None,
    created_date: str | None = None,
) -> str:
    """Return the output path, relative to the output dir, for one export.

    Args:
        template: an output path template such as :data:`DEFAULT_PATH_TEMPLATE`.
        aoi_id: the AOI id (sanitised with :func:`sanitize_path_value` before substitution).
        insight_id: the insight id (sanitised likewise).
        name: the export's name (sanitised likewise).
        insight_name: the insight's name for ``{insight_name}`` (sanitised likewise); default
            ``name``, which is what it means for an explicit ``exports:`` entry.
        created_date: ``YYYY-MM-DD`` for ``{created_date}`` (sanitised likewise); only discovered
            insights have one.

    Returns:
        A POSIX relative path that stays under the output dir and out of the state dir.

    Raises:
        ValueError: the template is invalid, uses ``{created_date}`` without one, or the result is
            not a safe path (e.g. a component longer than 255 UTF-8 bytes); the message says why.
    """
    parts = _compile_template(template)
    if created_date is None and _uses(parts, "created_date"):
        raise ValueError(_NO_CREATED_DATE)
    values = (aoi_id, insight_id, name, name if insight_name is None else insight_name)
    relpath = _render(parts, (*values, created_date or ""), {})
    problem = _relpath_problem(relpath)
    if problem is not None:
        raise ValueError(problem)
    return relpath


def render_name(
    template: str, *, aoi_id: str, insight_id: str, insight_name: str, created_date: str | None
) -> str:
    """Return a discovered job's name from a selector's ``name`` template (SPEC §7).

    The values are substituted as they are (the name is what reports show); the name is sanitised
    when it becomes part of the output path.

    Raises:
        ValueError: the template is invalid, or uses ``{created_date}`` without one.
    """
    parts = _compile_name_template(template)
    if created_date is None and _uses(parts, "created_date"):
        raise ValueError("the name template uses {created_date}, and there is no creation date")
    values = (aoi_id, insight_id, "", insight_name, created_date or "")
    return "".join(literal + (values[index] if index >= 0 else "") for literal, index in parts)


def template_fields(template: str, *, name: bool = False) -> frozenset[str]:
    """Return the fields an output path template (``name``: a selector's name template) uses.

    Raises:
        ValueError: the template is invalid; the message says why.
    """
    parts = _compile_name_template(template) if name else _compile_template(template)
    return frozenset(_TEMPLATE_FIELDS[index] for _, index in parts if index >= 0)


_NO_CREATED_DATE: Final = (
    "{created_date} is the creation date of a discovered insight; explicit exports: entries have "
    "none (use it only in a manifest without exports:, or in a discover: selector's name)"
)
