"""Validation of a whole manifest: sections, exports, defaults, output paths and their collisions.

:func:`parse_manifest` composes the YAML (:mod:`._yaml`), walks the node tree along the key table
(:mod:`._keys`) with the node checks (:mod:`._nodes`), renders every output path (:mod:`._paths`) and
returns a frozen :class:`Manifest`, or raises :class:`ManifestError` with every problem at once, in
position order.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

from batch_export.errors import ManifestError
from batch_export.manifest._keys import _EXPORT, _JOBS_ANY_OF, _SELECTOR, _SELECTOR_ONE_OF, _TOP
from batch_export.manifest._model import (
    ALL,
    DEFAULT_NAME_TEMPLATE,
    ApiSettings,
    DiscoverSelector,
    ExportSpec,
    LimitSettings,
    Manifest,
    OutputSettings,
)
from batch_export.manifest._nodes import _Checks
from batch_export.manifest._paths import (
    _NO_CREATED_DATE,
    _compile_template,
    _quote,
    _relpath_problem,
    _render,
    _TemplatePart,
    _uses,
    path_conflicts,
)
from batch_export.manifest._yaml import (
    _T_MAP,
    _T_NULL,
    _T_SEQ,
    _gc_paused,
    _kind_name,
    _Map,
    _Node,
    _parse_yaml,
    _Report,
    _Scalar,
    _Seq,
)

__all__ = ["load_manifest", "parse_manifest"]


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


class _Validator(_Checks):
    """Walks the node tree along the key/type table (:data:`_TOP`), reporting every problem."""

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
        output_section = self.section(found, "output")
        output, parts = self.output(output_section)
        defaults = self.defaults(self.section(found, "defaults"))
        entries = self.exports(found.get("exports"))
        selectors = self.discover(found.get("discover"), defaults)
        self.something_to_do(root, found)
        exports: tuple[ExportSpec, ...] = ()
        if parts is not None:
            if entries and _uses(parts, "created_date"):
                assert output_section is not None  # the default template has no {created_date}
                node = output_section[1]["path"]
                self.report.error(node.line, node.col, "output.path", _NO_CREATED_DATE)
            else:
                exports = self.plan(entries, defaults, parts)
        if self.report.has_errors():
            return None
        return Manifest(
            path=self.manifest_path,
            api=api,
            limits=limits,
            output=output,
            exports=exports,
            warnings=self.report.warnings(),
            discover=selectors,
        )

    def something_to_do(self, root: _Map, found: dict[str, _Node]) -> None:
        """Report a manifest whose exports: and discover: are both absent or empty."""
        present = [name for name in _JOBS_ANY_OF if name in found]
        for name in present:
            node = found[name]
            if type(node) is not _Seq or node.items:
                return  # something to do, or a shape error reported already
        if not present:
            self.report.error(
                root.line,
                root.col,
                "",
                "missing required key exports (or discover:)",
            )
            return
        node = found[present[0]]
        what = {
            "exports": "export (or a discover: selector)",
            "discover": "selector (or an export)",
        }
        self.report.error(
            node.line, node.col, present[0], f"expected at least one {what[present[0]]}"
        )

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
        where = values.pop("dir", None)
        if isinstance(where, str):
            values["url"] = where
        elif where is not None:
            values["dir"] = where
        if "path" in nodes and "path" not in values:
            values.pop("path", None)
            return OutputSettings(**values), None
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

    def discover(
        self,
        node: _Node | None,
        defaults: tuple[tuple[str, ...] | None, tuple[str, ...] | None],
    ) -> tuple[DiscoverSelector, ...]:
        """Return the ``discover:`` selectors (SPEC §7), with ``defaults:`` applied."""
        if node is None:
            return ()
        if type(node) is not _Seq:
            message = f"expected a list of selectors, got {_kind_name(node)}"
            self.report.error(node.line, node.col, "discover", message)
            return ()
        if node.tag != _T_SEQ:
            self.bad_tag(node, "discover")
        selectors = []
        for index, child in enumerate(node.items):
            path = f"discover[{index}]"
            if type(child) is not _Map:
                self.report.error(
                    child.line,
                    child.col,
                    path,
                    f"expected a mapping with aois: or projects:, got {_kind_name(child)}",
                )
                continue
            if child.tag != _T_MAP:
                self.bad_tag(child, path)
            nodes = self.keys(child, path, _SELECTOR)
            values = self.values(nodes, _SELECTOR, path)
            chosen = sorted(
                (nodes[name] for name in _SELECTOR_ONE_OF if name in nodes),
                key=lambda value: (value.line, value.col),
            )
            if not chosen:
                self.report.error(
                    child.line,
                    child.col,
                    path,
                    "a selector needs aois: (a list of AOI ids, or all) or projects: (a list of "
                    "project ids)",
                )
            elif len(chosen) > 1:
                self.report.error(
                    chosen[1].line,
                    chosen[1].col,
                    path,
                    "set aois: or projects:, not both (a selector lists one kind of thing)",
                )
            if len(chosen) == 1 and len(values) == len(nodes):
                selector = self.selector(index, child, values, defaults)
                if selector is not None:
                    selectors.append(selector)
        return tuple(selectors)

    def selector(
        self,
        index: int,
        node: _Map,
        values: dict[str, Any],
        defaults: tuple[tuple[str, ...] | None, tuple[str, ...] | None],
    ) -> DiscoverSelector | None:
        """Build one valid selector; None when its defaults are invalid or it selects nothing."""
        inputs = values.get("inputs", defaults[0])
        outputs = values.get("outputs", defaults[1])
        if inputs is None or outputs is None:
            return None  # an invalid defaults list, reported already
        if inputs == () and outputs == ():
            self.report.error(
                node.line,
                node.col,
                f"discover[{index}]",
                "nothing selected: inputs and outputs are both empty (set them here, as lists or "
                "all, or in defaults:)",
            )
            return None
        aois = values.get("aois")
        created = values.get("created_after")
        return DiscoverSelector(
            index=index,
            aois=None if aois == ALL else aois,
            all_aois=aois == ALL,
            projects=values.get("projects"),
            statuses=values.get("status"),
            created_after=created if isinstance(created, _dt.datetime) else None,
            created_within=created if isinstance(created, float) else None,
            name_glob=values.get("name_glob"),
            inputs=inputs,
            outputs=outputs,
            name=values.get("name", DEFAULT_NAME_TEMPLATE),
            line=node.line,
        )

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
            relpath = _render(parts, (entry.aoi_id, entry.insight_id, name, name, ""), cache)
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
                        entry.aoi_id,
                        entry.insight_id,
                        inputs,
                        outputs,
                        name,
                        relpath,
                        entry.line,
                        label,
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
        for i, j, kind in path_conflicts([spec.relpath for spec in specs]):
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
