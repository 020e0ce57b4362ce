"""The cross-run path rule (batch_export.ownership), as a pure table."""

from __future__ import annotations

import pytest

from batch_export.ownership import index_paths, stored_clash
from batch_export.types import JobRecord, JobState


def rec(
    key: str, relpath: str, state: JobState, *, insight: str = "i1", etag: str | None = None
) -> JobRecord:
    return JobRecord(
        key=key,
        aoi_id="a1",
        insight_id=insight,
        name="n",
        relpath=relpath,
        state=state,
        part_etag=etag,
    )


def clash(
    relpath: str,
    records: list[JobRecord],
    *,
    insight: str = "i2",
    run_keys: tuple[str, ...] = ("me",),
) -> str | None:
    problem = stored_clash(
        relpath,
        key="me",
        aoi_id="a1",
        insight_id=insight,
        stored=index_paths(records),
        run_keys=run_keys,
    )
    return None if problem is None else problem.code


@pytest.mark.parametrize(
    ("relpath", "record", "expected"),
    [
        ("p.zip", rec("k", "p.zip", JobState.DONE), "path_clash"),
        ("p.zip", rec("k", "p.zip", JobState.DOWNLOADING), "path_clash"),
        ("p.zip", rec("k", "p.zip", JobState.FAILED), None),  # owns nothing
        ("p.zip", rec("k", "p.zip", JobState.FAILED, etag='"e"'), "path_clash"),  # keeps a .part
        ("p.zip", rec("k", "p.zip", JobState.QUEUED), None),
        ("p.zip", rec("k", "p.zip", JobState.ABANDONED), None),
        ("p.zip", rec("me", "p.zip", JobState.DONE), None),  # its own record
        ("p.zip", rec("k", "q.zip", JobState.DONE), None),
        ("p.zip", rec("k", "p.zip.part", JobState.DONE), "path_clash"),  # our .part is its file
        (
            "p.zip.part",
            rec("k", "p.zip", JobState.DOWNLOADING),
            "path_clash",
        ),  # our file, its .part
    ],
)
def test_which_stored_records_a_job_may_not_replace(
    relpath: str, record: JobRecord, expected: str | None
) -> None:
    assert clash(relpath, [record]) == expected


def test_the_same_insight_supersedes_an_old_record_that_is_no_job_of_this_run() -> None:
    old = rec("old", "p.zip", JobState.DONE, insight="i2")
    assert clash("p.zip", [old]) is None
    assert clash("p.zip", [old], run_keys=("me", "old")) == "path_clash"  # both are jobs now
    assert clash("p.zip", [rec("old", "p.zip", JobState.DONE, insight="i9")]) == "path_clash"


def test_the_message_names_the_other_job() -> None:
    problem = stored_clash(
        "p.zip",
        key="me",
        aoi_id="a1",
        insight_id="i2",
        stored=index_paths([rec("0123456789abcdef", "p.zip", JobState.DONE)]),
        run_keys=(),
    )
    assert problem is not None
    assert problem.message == (
        "output path 'p.zip' is the done file of job 0123456789ab in the state store "
        "(aoi 'a1', insight 'i1'); set a distinct name template or output.path"
    )
