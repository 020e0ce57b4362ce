"""Who owns an output path across runs: the state store's records against this run's jobs (pure).

A run checks its own jobs' paths against each other (manifest validation, :func:`discovery.merge`);
this module checks them against what earlier runs left in the state store, so that a job never
replaces a file the store records as another job's. The rule (README "Output paths across runs"):

* a stored record *owns* its path when it is ``done`` (the file is its package), in progress
  (``requesting`` … ``uploading``: its ``.part`` may be there) or keeps a ``.part`` to resume
  (``part_etag`` set); a ``queued``, ``failed`` or ``abandoned`` record without a ``.part`` owns
  nothing;
* a job of this run clashes with an owning record of another key at the same path, at the path
  plus ``.part`` (the job's download file would be the other's package) or at the path less
  ``.part`` (the job's package would be the other's download file);
* except when the record is *superseded*: same AOI and insight, and its key is not a job of this
  run (an edited entry, or a selector whose listing now names other assets: the new selection of
  the same insight replaces the old package);
* a clashing job fails with ``path_clash`` naming the other before any request.

No I/O: the runner reads the records and acts on the verdict.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Final

from batch_export.discovery import PATH_CLASH
from batch_export.types import JobRecord, JobState, Problem

__all__ = ["PATH_CLASH", "StoredPaths", "index_paths", "stored_clash"]

_PART: Final = ".part"
#: States in which a record may have a ``.part`` or a committed file at its path.
_OWNING: Final = frozenset(
    {
        JobState.REQUESTING,
        JobState.PREPARING,
        JobState.READY,
        JobState.DOWNLOADING,
        JobState.VERIFYING,
        JobState.UPLOADING,
        JobState.DONE,
    }
)
_SHOWN_CHARS: Final = 60

#: Stored records by ``relpath`` (several keys may share one).
StoredPaths = Mapping[str, Collection[JobRecord]]


def index_paths(records: Iterable[JobRecord]) -> dict[str, list[JobRecord]]:
    """Group ``records`` by ``relpath``, keeping only those that own their path (see module doc)."""
    found: dict[str, list[JobRecord]] = {}
    for record in records:
        if record.state in _OWNING or record.part_etag is not None:
            found.setdefault(record.relpath, []).append(record)
    return found


def stored_clash(
    relpath: str,
    *,
    key: str,
    aoi_id: str,
    insight_id: str,
    stored: StoredPaths,
    run_keys: Collection[str],
) -> Problem | None:
    """Return the ``path_clash`` of a job at ``relpath`` with an owning stored record, if any.

    Args:
        relpath: The job's output path, relative to the output dir (``/``-separated).
        key: The job's key (its own record never clashes).
        aoi_id: The job's AOI.
        insight_id: The job's insight.
        stored: Owning records by path, from :func:`index_paths`.
        run_keys: Every job key of this run (a record among them is not superseded).

    Returns:
        ``None`` when the job may write its path, else the problem naming the other job.
    """
    candidates = [relpath, relpath + _PART]
    if relpath.endswith(_PART):
        candidates.append(relpath[: -len(_PART)])
    for where in candidates:
        for record in stored.get(where, ()):
            if record.key == key:
                continue
            same_insight = record.aoi_id == aoi_id and record.insight_id == insight_id
            if same_insight and record.key not in run_keys:
                continue  # superseded: the new selection of the same insight replaces it
            return Problem(PATH_CLASH, _message(relpath, record))
    return None


def _message(relpath: str, record: JobRecord) -> str:
    what = "the done file" if record.state is JobState.DONE else "the download in progress"
    where = f"output path {_shown(relpath)}"
    if record.relpath != relpath:
        where += f" (with its .part) overlaps {_shown(record.relpath)}, which"
    return (
        f"{where} is {what} of job {record.key[:12]} in the state store "
        f"(aoi {_shown(record.aoi_id)}, insight {_shown(record.insight_id)}); "
        "set a distinct name template or output.path"
    )


def _shown(text: str) -> str:
    return repr(text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "…")
