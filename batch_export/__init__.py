"""batch-export: bulk exporter for Pixxel insight packages.

Manifest (YAML) -> ``PUT /v0/aoi/{aoi_id}/insights/{insight_id}/download`` -> poll the ``status`` ->
stream the package from its ``signed_url`` -> verified file on disk (or object store). Every state
change is saved, so a re-run (cron) or a crash never loses or repeats work.

From the command line: ``batch-export run manifest.yaml`` (``batch-export --help``). From Python::

    import batch_export

    result = batch_export.export("manifest.yaml", out="exports", rate=2.0)  # blocking
    result = await batch_export.export_async("manifest.yaml")  # inside a running event loop
    result.exit_code, result.counts, result.jobs  # the same facts as the JSON run report

Errors: :class:`BatchExportError` is the root; a bad manifest raises :class:`ManifestError`, a bad
option value :class:`UsageError`, a state dir in use :class:`LockHeldError`. A run whose jobs fail
does not raise: ``result.exit_code`` is 1 and ``result.jobs`` says why. The README describes the
commands, the manifest, the report and the error codes.
"""

__version__ = "0.1.0"  # before the imports: modules below read it

from batch_export.errors import BatchExportError, LockHeldError, ManifestError, UsageError
from batch_export.exporter import export, export_async
from batch_export.types import ExportResult

__all__ = [
    "BatchExportError",
    "ExportResult",
    "LockHeldError",
    "ManifestError",
    "UsageError",
    "__version__",
    "export",
    "export_async",
]
