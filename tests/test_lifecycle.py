import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batch_export.errors import IllegalTransition
from batch_export.lifecycle import (
    RECOVERY,
    TRANSITIONS,
    UNFINISHED,
    Aborted,
    Admitted,
    Answered,
    AwaitDownloadSlot,
    AwaitRequestSlot,
    BytesEnded,
    DiscardPart,
    Download,
    DownloadSlotFree,
    Finish,
    Inform,
    JobState,
    JobValue,
    Loaded,
    LocalFailed,
    PollDeadline,
    RequestFailed,
    RequestSlotFree,
    Rules,
    SendPut,
    Skip,
    StatusKind,
    StatusVocabulary,
    StopDownloads,
    StorageRefused,
    TimeOut,
    TransferFailed,
    TransferStarted,
    Upload,
    Uploaded,
    UploadFailed,
    UploadInterrupted,
    Verified,
    Verify,
    VerifyFailed,
    Wait,
    advance,
    backoff_delay,
    is_url_expired,
    job_key,
    next_poll_interval,
    shard_of,
    step,
    url_expiry,
)
from batch_export.manifest import ExportSpec
from batch_export.types import JobRecord, Outcome, Problem

S = JobState

# The SPEC §4 table, written out independently of the implementation's.
SPEC_TABLE = {
    (S.QUEUED, S.REQUESTING),
    (S.REQUESTING, S.PREPARING),
    (S.REQUESTING, S.READY),
    (S.REQUESTING, S.FAILED),
    (S.PREPARING, S.PREPARING),
    (S.PREPARING, S.READY),
    (S.PREPARING, S.FAILED),
    (S.READY, S.DOWNLOADING),
    (S.READY, S.REQUESTING),
    (S.DOWNLOADING, S.VERIFYING),
    (S.DOWNLOADING, S.DOWNLOADING),
    (S.DOWNLOADING, S.REQUESTING),
    (S.DOWNLOADING, S.FAILED),
    (S.VERIFYING, S.DONE),
    (S.VERIFYING, S.UPLOADING),
    (S.VERIFYING, S.DOWNLOADING),
    (S.VERIFYING, S.FAILED),
    (S.UPLOADING, S.DONE),
    (S.UPLOADING, S.UPLOADING),
    (S.UPLOADING, S.FAILED),
    (S.FAILED, S.QUEUED),
    (S.DONE, S.QUEUED),
    (S.FAILED, S.ABANDONED),
    (S.FAILED, S.UPLOADING),  # "the next run, the failed upload's staged file intact" (§8)
    (S.ABANDONED, S.QUEUED),  # "back to queued on an entry change or --retry-abandoned"
}


@pytest.mark.parametrize("current", list(S))
@pytest.mark.parametrize("target", list(S))
def test_transition_table_matches_spec(current: JobState, target: JobState) -> None:
    if (current, target) in SPEC_TABLE:
        assert advance(current, target) is target
    else:
        with pytest.raises(IllegalTransition):
            advance(current, target)


def test_table_has_exactly_the_spec_edges() -> None:
    edges = {(a, b) for a, targets in TRANSITIONS.items() for b in targets}
    assert edges == SPEC_TABLE


@pytest.mark.parametrize(
    ("status", "url", "kind"),
    [
        ("ready", "https://s/x", StatusKind.READY),
        ("SUCCESS", "https://s/x", StatusKind.READY),
        ("Completed", "https://s/x", StatusKind.READY),
        ("available", "https://s/x", StatusKind.READY),
        ("ready", "", StatusKind.READY_WITHOUT_URL),
        ("done", "   ", StatusKind.READY_WITHOUT_URL),
        ("FAILED", "", StatusKind.FAILED),
        ("cancelled", "https://s/x", StatusKind.FAILED),
        ("Expired", "", StatusKind.FAILED),
        ("pending", "", StatusKind.PENDING),
        ("IN_PROGRESS", "", StatusKind.PENDING),
        ("CREATED", "https://s/x", StatusKind.PENDING),
        ("something-new", "", StatusKind.PENDING),
    ],
)
def test_default_vocabulary(status: str, url: str, kind: StatusKind) -> None:
    assert StatusVocabulary().classify(status, url) is kind


def test_vocabulary_override() -> None:
    vocab = StatusVocabulary.from_lists(["Finished"], ["Broken"])
    assert vocab.classify("finished", "u") is StatusKind.READY
    assert vocab.classify("ready", "u") is StatusKind.PENDING
    assert vocab.classify("BROKEN", "") is StatusKind.FAILED
    assert vocab.classify("failed", "") is StatusKind.PENDING


def test_job_key_is_sha256_of_canonical_json() -> None:
    import hashlib
    import json

    spec = ExportSpec("a", "i", ("x",), ("y", "z"), "n", "a/i/n.zip")
    expected = hashlib.sha256(
        json.dumps(["a", "i", ["x"], ["y", "z"], "a/i/n.zip"], separators=(",", ":")).encode()
    ).hexdigest()
    assert job_key(spec) == expected
    assert job_key(ExportSpec("a", "i", ("x",), ("z", "y"), "n", "a/i/n.zip")) != expected
    assert shard_of(expected, 4) == int(expected[:16], 16) % 4


def test_poll_interval_grows_by_half_and_caps() -> None:
    rng = random.Random(1)
    waits = []
    prev = None
    for _ in range(12):
        prev = next_poll_interval(prev, first=5.0, maximum=60.0, rng=rng)
        waits.append(prev)
    assert 4.5 <= waits[0] <= 5.5
    assert 6.0 <= waits[1] <= 9.1
    assert max(waits) <= 60.0
    assert waits[-1] >= 54.0


@given(st.integers(0, 50), st.floats(0.01, 10), st.floats(0.1, 100))
def test_backoff_full_jitter_bounds(attempt: int, base: float, cap: float) -> None:
    delay = backoff_delay(attempt, base=base, cap=cap, rng=random.Random(attempt))
    assert 0.0 <= delay <= min(cap, base * 2.0 ** min(attempt, 30))


def test_url_expiry_forms() -> None:
    s3 = "https://b.s3.amazonaws.com/k?X-Amz-Date=20261129T030000Z&X-Amz-Expires=600&X-Amz-Signature=ab"
    start = 1795921200.0  # 2026-11-29T03:00:00Z
    assert url_expiry(s3, received_at=0) == (start + 600, 600.0)
    goog = "https://storage.googleapis.com/b/k?X-Goog-Date=20261129T030000Z&X-Goog-Expires=60"
    assert url_expiry(goog, received_at=0) == (start + 60, 60.0)
    cloudfront = f"https://d.cloudfront.net/k?Expires={int(start) + 100}&Signature=x"
    assert url_expiry(cloudfront, received_at=start) == (start + 100, 100.0)
    azure = "https://a.blob.core.windows.net/c/k?sv=2022&se=2026-11-29T03:10:00Z&sig=x"
    assert url_expiry(azure, received_at=start) == (start + 600, 600.0)
    assert url_expiry("https://x/k?sig=1", received_at=start) is None
    assert url_expiry("https://x/k?X-Amz-Date=garbage&X-Amz-Expires=10", received_at=start) is None


def test_known_expired_uses_min_of_30s_and_half_lifetime() -> None:
    # A 1-hour URL: refreshed when less than 30 s are left.
    assert not is_url_expired((1000.0, 3600.0), server_now=969.0)
    assert is_url_expired((1000.0, 3600.0), server_now=971.0)
    # A 4-second URL is still used while more than 2 s are left.
    assert not is_url_expired((1000.0, 4.0), server_now=997.5)
    assert is_url_expired((1000.0, 4.0), server_now=998.5)
    assert not is_url_expired(None, server_now=1e12)


# -- the job machine: every row of SPEC §4 as a table test, no server, disk or sleep ----------------

URL = "https://storage.example/p.zip?X-Amz-Signature=abc"


def rules(**changes: object) -> Rules:
    base: dict[str, object] = {
        "poll_interval": 5.0,
        "poll_max_interval": 60.0,
        "poll_timeout": 100.0,
        "rng": random.Random(7),
    }
    return Rules(**(base | changes))  # type: ignore[arg-type]


def fresh(state: JobState = S.QUEUED, **record: object) -> JobValue:
    return JobValue(
        JobRecord("k" * 64, "aoi", "ins", "n", "aoi/ins/n.zip").evolve(state=state, **record)
    )


def requesting(now: float = 0.0, r: Rules | None = None) -> JobValue:
    value, _ = step(fresh(), Admitted(), r or rules())
    value, _ = step(value, RequestSlotFree(now=now), r or rules())
    return value


def ready(r: Rules | None = None) -> JobValue:
    value, _ = step(requesting(r=r), Answered("ready", URL, now=1.0), r or rules())
    return value


def downloading(r: Rules | None = None) -> JobValue:
    value, _ = step(ready(r), DownloadSlotFree(url_expired=False), r or rules())
    return value


def verifying(r: Rules | None = None) -> JobValue:
    value, _ = step(downloading(r), BytesEnded(), r or rules())
    return value


def test_queued_job_waits_for_a_slot_then_requests() -> None:
    value, actions = step(fresh(), Admitted(), rules())
    assert value.state is S.QUEUED and actions == (AwaitRequestSlot(),)
    value, actions = step(value, RequestSlotFree(now=50.0), rules())
    assert value.state is S.REQUESTING and value.record.attempts == 1
    assert actions == (SendPut(after=0.0, deadline=150.0),)


def test_pending_answer_polls_after_a_growing_jittered_wait() -> None:
    value = requesting()
    value, actions = step(value, Answered("pending", "", now=1.0), rules())
    assert value.state is S.PREPARING and value.record.polls == 0  # the first answer is no poll
    (first,) = actions
    assert isinstance(first, SendPut) and 4.5 <= first.after <= 5.5 and first.deadline == 100.0
    value, actions = step(value, Answered("IN_PROGRESS", "", now=7.0), rules())
    assert value.state is S.PREPARING and value.record.polls == 1
    (second,) = actions
    assert isinstance(second, SendPut) and first.after * 1.5 * 0.9 <= second.after
    assert second.after <= first.after * 1.5 * 1.1


@pytest.mark.parametrize("status", ["ready", "SUCCESS", "completed"])
def test_ready_answer_with_url_waits_for_a_download_slot(status: str) -> None:
    value, actions = step(requesting(), Answered(status, URL, now=3.0), rules())
    assert value.state is S.READY and actions == (AwaitDownloadSlot(),)
    assert value.pending_seconds == 3.0


@pytest.mark.parametrize(
    ("problem"),
    [
        Problem("bad_request", "missing body", 400),
        Problem("forbidden", "no permission", 403),
        Problem("retries_exhausted", "HTTP 503 six times", 503),
    ],
)
@pytest.mark.parametrize("polling", [False, True])
def test_request_failure_fails_the_job_with_the_servers_code(
    problem: Problem, polling: bool
) -> None:
    value = requesting()
    if polling:
        value, _ = step(value, Answered("pending", "", now=1.0), rules())
    value, actions = step(value, RequestFailed(problem), rules())
    assert value.state is S.FAILED and actions == (Finish(Outcome.FAILED),)
    record = value.record
    assert (record.error_code, record.error_message, record.error_http_status) == (
        problem.code,
        problem.message,
        problem.http_status,
    )


def test_failed_status_fails_the_job() -> None:
    value, actions = step(requesting(), Answered("Rejected", "", now=1.0), rules())
    assert value.state is S.FAILED and actions == (Finish(Outcome.FAILED),)
    assert value.record.error_code == "package_failed" and value.record.error_http_status == 200
    assert value.record.error_message == "the API reports the package as 'Rejected'"


def test_third_ready_answer_without_url_in_a_row_fails() -> None:
    value = requesting()
    for n, status in enumerate(["ready", "ready", "pending", "ready", "ready"]):
        value, actions = step(value, Answered(status, "", now=float(n)), rules())
        assert value.state is S.PREPARING and isinstance(actions[0], SendPut), n
    value, actions = step(value, Answered("done", " ", now=9.0), rules())
    assert value.state is S.FAILED and value.record.error_code == "ready_without_url"
    assert actions == (Finish(Outcome.FAILED),)
    assert value.record.polls == 5


def test_poll_that_would_pass_poll_timeout_waits_out_the_deadline_then_fails() -> None:
    value = requesting(now=0.0)  # deadline 100
    value, actions = step(value, Answered("queued", "", now=97.0), rules())
    assert value.state is S.PREPARING and actions == (TimeOut(after=3.0),)
    value, actions = step(value, PollDeadline(), rules())
    assert value.state is S.FAILED and actions == (Finish(Outcome.FAILED),)
    assert value.record.error_code == "poll_timeout" and value.record.error_http_status == 200
    assert value.record.error_message == "package still 'queued' after poll_timeout (100 s)"


def test_poll_timeout_counts_over_every_request_cycle_of_the_run() -> None:
    value, _ = step(requesting(now=0.0), Answered("ready", URL, now=40.0), rules())
    value, actions = step(value, DownloadSlotFree(url_expired=True), rules())  # refresh
    assert actions == (AwaitRequestSlot(),)
    value, actions = step(value, RequestSlotFree(now=500.0), rules())
    assert actions == (SendPut(after=0.0, deadline=560.0),)  # 60 s of the 100 s left
    assert value.record.attempts == 2


def test_ready_url_that_is_not_allowed_fails() -> None:
    value, _ = step(
        requesting(), Answered("ready", "http://storage.example/p.zip", now=1.0), rules()
    )
    assert value.state is S.FAILED and value.record.error_code == "url_not_allowed"
    allowed, _ = step(
        requesting(),
        Answered("ready", "http://storage.example/p.zip", now=1.0),
        rules(allow_http=True),
    )
    assert allowed.state is S.READY


def test_ready_goes_to_downloading_when_a_slot_is_free_resuming_the_part() -> None:
    value = replace_record(ready(), part_etag='"e1"')
    value, actions = step(value, DownloadSlotFree(url_expired=False), rules())
    assert value.state is S.DOWNLOADING and actions == (Download(etag='"e1"'),)


def test_expired_url_is_refreshed_at_most_three_times_then_used() -> None:
    value = ready()
    for attempt in range(2, 5):
        value, actions = step(value, DownloadSlotFree(url_expired=True), rules())
        assert value.state is S.READY and actions == (AwaitRequestSlot(),)
        value, _ = step(value, RequestSlotFree(now=10.0), rules())
        assert value.state is S.REQUESTING and value.record.attempts == attempt
        value, _ = step(value, Answered("ready", URL, now=11.0), rules())
    value, actions = step(value, DownloadSlotFree(url_expired=True), rules())
    assert value.state is S.DOWNLOADING and actions == (Download(etag=None),)


def test_transfer_started_records_the_parts_etag() -> None:
    value, actions = step(downloading(), TransferStarted('"abc"'), rules())
    assert value.state is S.DOWNLOADING and value.record.part_etag == '"abc"' and actions == ()


def test_storage_refusal_fetches_a_fresh_url_three_times_then_fails() -> None:
    refused = Problem("url_rejected", "storage refused the signed URL (HTTP 403)", 403)
    value = replace_record(downloading(), part_etag='"e"')
    for _ in range(3):
        value, actions = step(value, StorageRefused(refused), rules())
        assert actions == (
            Inform("storage refused the signed URL (HTTP 403); fetching a fresh signed URL"),
            AwaitRequestSlot(),
        )
        value, _ = step(value, RequestSlotFree(now=1.0), rules())
        assert value.state is S.REQUESTING and value.record.part_etag == '"e"'  # resumed later
        value, _ = step(value, Answered("ready", URL, now=2.0), rules())
        value, _ = step(value, DownloadSlotFree(url_expired=False), rules())
    value, actions = step(value, StorageRefused(refused), rules())
    assert value.state is S.FAILED and value.record.error_code == "url_rejected"
    assert actions == (Finish(Outcome.FAILED),)


def test_transfer_failure_fails_and_keeps_the_part() -> None:
    value, actions = step(downloading(), TransferFailed(Problem("retries_exhausted", "x")), rules())
    assert value.state is S.FAILED and actions == (Finish(Outcome.FAILED),)


@pytest.mark.parametrize("during", ["transfer", "verify"])
def test_local_disk_failure_fails_discards_the_part_and_stops_downloads(during: str) -> None:
    value = downloading() if during == "transfer" else verifying()
    value, actions = step(value, LocalFailed(Problem("disk_full", "full"), during), rules())
    assert value.state is S.FAILED and value.record.error_code == "disk_full"
    assert actions == (StopDownloads(), DiscardPart(), Finish(Outcome.FAILED))


def test_a_jobs_own_path_problem_fails_it_alone() -> None:
    value, actions = step(downloading(), LocalFailed(Problem("path_escape", "x"), "path"), rules())
    assert value.state is S.FAILED and actions == (Finish(Outcome.FAILED),)


def test_all_bytes_go_to_verification_then_done() -> None:
    value, actions = step(downloading(), BytesEnded(), rules())
    assert value.state is S.VERIFYING and actions == (Verify(),)
    value = replace_record(value, error_code="old", error_message="old", error_http_status=500)
    value, actions = step(value, Verified(size=12, sha256="ab" * 32), rules())
    assert value.state is S.DONE and actions == (Finish(Outcome.DOWNLOADED),)
    record = value.record
    assert (record.bytes, record.sha256, record.part_etag, record.error_code) == (
        12,
        "ab" * 32,
        None,
        None,
    )


def test_verification_failure_restarts_from_zero_once_then_fails() -> None:
    bad = Problem("zip_crc", "CRC check failed for member 'a'")
    value, actions = step(replace_record(verifying(), part_etag='"e"'), VerifyFailed(bad), rules())
    assert value.state is S.DOWNLOADING and value.record.part_etag is None
    assert actions == (
        DiscardPart(),
        Inform(
            "CRC check failed for member 'a'; downloading it again from 0",
            "verify_retry",
            "zip_crc",
        ),
        AwaitDownloadSlot(),
    )
    value, actions = step(value, DownloadSlotFree(url_expired=False), rules())
    assert actions == (Download(etag=None),)
    value, _ = step(value, BytesEnded(), rules())
    value, actions = step(value, VerifyFailed(bad), rules())
    assert value.state is S.FAILED and value.record.error_code == "zip_crc"
    assert actions == (DiscardPart(), Finish(Outcome.FAILED))


def test_object_store_output_uploads_after_verification() -> None:
    r = rules(object_store=True)
    value, actions = step(verifying(r), Verified(size=5, sha256="cd" * 32), r)
    assert value.state is S.UPLOADING and actions == (Upload(),)
    again, actions = step(value, UploadInterrupted(Problem("store_error", "503")), r)
    assert again.state is S.UPLOADING and actions == (Upload(),)
    done, actions = step(again, Uploaded(), r)
    assert done.state is S.DONE and (done.record.bytes, done.record.sha256) == (5, "cd" * 32)
    assert actions == (Finish(Outcome.DOWNLOADED),)
    failed, actions = step(value, UploadFailed(Problem("store_auth", "denied", 403)), r)
    assert failed.state is S.FAILED and failed.record.error_code == "store_auth"


@pytest.mark.parametrize("state", [S.FAILED, S.DONE])
def test_failed_and_done_jobs_are_queued_again_by_the_next_run(state: JobState) -> None:
    value, actions = step(fresh(state), Loaded(file_intact=False, force=False), rules())
    assert value.state is S.QUEUED and actions == ()


def test_done_job_with_its_file_is_skipped_unless_forced() -> None:
    value, actions = step(fresh(S.DONE), Loaded(file_intact=True, force=False), rules())
    assert value.state is S.DONE and actions == (Skip(),)
    value, actions = step(fresh(S.DONE), Loaded(file_intact=True, force=True), rules())
    assert value.state is S.QUEUED and actions == ()


@pytest.mark.parametrize("state", sorted(UNFINISHED))
def test_crash_recovery_sends_unfinished_jobs_to_requesting_keeping_the_part(
    state: JobState,
) -> None:
    value, actions = step(fresh(state, part_etag='"p"', attempts=2), Loaded(False, False), rules())
    assert value.state is state and value.recovering and actions == ()
    value, actions = step(value, Admitted(), rules())
    assert actions == (AwaitRequestSlot(),)
    value, actions = step(value, RequestSlotFree(now=0.0), rules())
    assert value.state is S.REQUESTING and not value.recovering
    assert value.record.part_etag == '"p"' and value.record.attempts == 3
    assert actions == (SendPut(after=0.0, deadline=100.0),)


def test_crash_during_upload_resumes_the_upload_without_a_put() -> None:
    assert RECOVERY[S.UPLOADING] is S.UPLOADING
    value, _ = step(fresh(S.UPLOADING, bytes=5, sha256="s"), Loaded(False, False), rules())
    value, actions = step(value, Admitted(), rules())
    assert value.state is S.UPLOADING and actions == (Upload(),)


def test_failed_upload_with_its_staged_file_intact_uploads_again_without_a_put() -> None:
    failed = fresh(S.FAILED, bytes=5, sha256="s", error_code="store_error")
    value, actions = step(
        failed, Loaded(False, False, staged_intact=True), rules(object_store=True)
    )
    assert value.state is S.UPLOADING and value.recovering and actions == ()
    value, actions = step(value, Admitted(), rules(object_store=True))
    assert value.state is S.UPLOADING and not value.recovering and actions == (Upload(),)
    done, actions = step(value, Uploaded(), rules(object_store=True))
    assert done.state is S.DONE and done.record.error_code is None
    assert actions == (Finish(Outcome.DOWNLOADED),)


@pytest.mark.parametrize(
    ("staged", "force", "object_store"),
    [(False, False, True), (True, True, True), (True, False, False)],
)
def test_failed_job_is_queued_when_its_staged_file_cannot_be_used(
    staged: bool, force: bool, object_store: bool
) -> None:
    failed = fresh(S.FAILED, bytes=5, sha256="s")
    r = rules(object_store=object_store)
    value, actions = step(failed, Loaded(False, force, staged_intact=staged), r)
    assert value.state is S.QUEUED and not value.recovering and actions == ()


@pytest.mark.parametrize("state", [S.QUEUED, S.READY, S.DOWNLOADING, S.VERIFYING, S.PREPARING])
def test_an_error_without_a_row_fails_the_job_through_legal_edges(state: JobState) -> None:
    value, actions = step(fresh(state), Aborted(Problem("internal_error", "a bug")), rules())
    assert value.state is S.FAILED and value.record.error_code == "internal_error"
    assert actions == (Finish(Outcome.FAILED),)


def test_an_error_after_the_outcome_keeps_the_state() -> None:
    value, actions = step(fresh(S.DONE), Aborted(Problem("state_store", "disk full")), rules())
    assert value.state is S.DONE and value.record.error_code == "state_store"
    assert actions == (Finish(Outcome.FAILED),)


@pytest.mark.parametrize(
    ("state", "event"),
    [
        (S.QUEUED, BytesEnded()),
        (S.QUEUED, Answered("ready", URL, now=0.0)),
        (S.REQUESTING, BytesEnded()),
        (S.READY, Verified(1, "s")),
        (S.DOWNLOADING, Answered("ready", URL, now=0.0)),
        (S.VERIFYING, TransferStarted(None)),
        (S.DONE, Admitted()),
        (S.FAILED, RequestSlotFree(now=0.0)),
        (S.PREPARING, Uploaded()),
        (S.VERIFYING, LocalFailed(Problem("disk_full", "x"), "transfer")),
    ],
)
def test_an_event_without_a_row_is_a_bug(state: JobState, event: object) -> None:
    with pytest.raises(IllegalTransition):
        step(fresh(state), event, rules())  # type: ignore[arg-type]


def replace_record(value: JobValue, **changes: object) -> JobValue:
    from dataclasses import replace

    return replace(value, record=value.record.evolve(**changes))


@pytest.mark.parametrize("during", ["transfer", "verify"])
@pytest.mark.parametrize("code", ["disk_full", "read_only_output"])
def test_a_disk_wide_failure_stops_every_download(during: str, code: str) -> None:
    value = downloading() if during == "transfer" else verifying()
    value, actions = step(value, LocalFailed(Problem(code, "x"), during), rules())
    assert value.state is S.FAILED
    assert actions == (StopDownloads(), DiscardPart(), Finish(Outcome.FAILED))


@pytest.mark.parametrize("writable", [True, False])
def test_permission_denied_stops_downloads_only_when_the_output_dir_itself_is_unwritable(
    writable: bool,
) -> None:
    event = LocalFailed(Problem("permission_denied", "x"), "transfer", output_writable=writable)
    value, actions = step(downloading(), event, rules())
    assert value.state is S.FAILED
    stop = () if writable else (StopDownloads(),)
    assert actions == (*stop, DiscardPart(), Finish(Outcome.FAILED))


@pytest.mark.parametrize(
    ("during", "code"),
    [
        ("transfer", "path_too_long"),
        ("transfer", "path_clash"),
        ("verify", "local_io"),
        ("verify", "path_clash"),
        ("path", "path_escape"),
    ],
)
def test_a_jobs_own_path_problem_never_stops_the_others(during: str, code: str) -> None:
    value = verifying() if during == "verify" else downloading()
    value, actions = step(value, LocalFailed(Problem(code, "x"), during), rules())
    assert value.state is S.FAILED and value.record.error_code == code
    assert StopDownloads() not in actions and actions[-1] == Finish(Outcome.FAILED)


@pytest.mark.parametrize(("during", "again"), [("transfer", Download('"e"')), ("verify", Verify())])
def test_no_descriptor_left_backs_off_and_does_the_same_again(during: str, again: object) -> None:
    value = replace_record(verifying() if during == "verify" else downloading(), part_etag='"e"')
    state = value.state
    problem = Problem("too_many_open_files", "cannot write the package: Too many open files")
    waits = []
    for n in range(5):
        value, actions = step(value, LocalFailed(problem, during), rules())
        assert value.state is state and value.local_retries == n + 1
        note, wait, then = actions
        assert isinstance(note, Inform) and note.event == "local_retry"
        assert isinstance(wait, Wait) and then == again
        waits.append(wait.after)
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0]
    value, actions = step(value, LocalFailed(problem, during), rules())
    assert value.state is S.FAILED and value.record.error_code == "too_many_open_files"
    assert actions == (Finish(Outcome.FAILED),)  # the .part is fine: kept for the next run
