"""batch-export: bulk exporter for Pixxel insight packages.

Manifest (YAML) -> ``PUT /v0/aoi/{aoi_id}/insights/{insight_id}/download`` -> poll the ``status`` ->
stream the package from its ``signed_url`` -> verified file on disk. The README describes the
commands, the manifest, the report and the error codes.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
