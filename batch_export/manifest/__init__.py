"""Manifest: YAML text -> validated, frozen :class:`Manifest` of :class:`ExportSpec` (SPEC §3).

Pure: reads the manifest file and nothing else; requests nothing (``discover:`` selectors are only
checked here; :mod:`batch_export.discovery` resolves them against listings). One module per concern:

| module | concern |
|---|---|
| ``_model`` | the value types (:class:`Manifest`, :class:`ExportSpec`, the settings) and shared constants |
| ``_yaml`` | YAML text -> compact node tree (tags, styles, positions), YAML-bomb guard, the problem report |
| ``_keys`` | the key/type table and the JSON Schema generated from it |
| ``_nodes`` | checks of single nodes: keys against the table, values by kind, the literal-key guard |
| ``_paths`` | output path templates, sanitising of field values, collisions of output paths |
| ``_validate`` | the whole manifest: sections, exports, defaults; :func:`load_manifest`, :func:`parse_manifest` |

Every problem is one line ``FILE:LINE:COL: PATH: message`` and all of them are reported at once, in
position order. The one key/type table drives both the validator and :func:`manifest_json_schema`, the JSON
Schema shipped as ``batch_export/manifest.schema.json``.
"""

from __future__ import annotations

from batch_export.manifest._keys import limit_bounds, manifest_json_schema
from batch_export.manifest._model import (
    ALL,
    DEFAULT_NAME_TEMPLATE,
    DEFAULT_PATH_TEMPLATE,
    MAX_ALIAS_EXPANSION,
    OBJECT_STORE_SCHEMES,
    STATE_DIR_NAME,
    ApiSettings,
    AssetChoice,
    DiscoverSelector,
    ExportSpec,
    LimitSettings,
    Manifest,
    OutputSettings,
)
from batch_export.manifest._nodes import api_url_problem
from batch_export.manifest._paths import (
    path_conflicts,
    render_name,
    render_relpath,
    sanitize_path_value,
    template_fields,
)
from batch_export.manifest._validate import load_manifest, parse_manifest

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
    "api_url_problem",
    "limit_bounds",
    "load_manifest",
    "manifest_json_schema",
    "parse_manifest",
    "path_conflicts",
    "render_name",
    "render_relpath",
    "sanitize_path_value",
    "template_fields",
]
