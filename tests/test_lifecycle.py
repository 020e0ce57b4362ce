import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batch_export.errors import IllegalTransition
from batch_export.lifecycle import (
    TRANSITIONS,
    JobState,
    StatusKind,
    StatusVocabulary,
    advance,
    backoff_delay,
    is_url_expired,
    job_key,
    next_poll_interval,
    shard_of,
    url_expiry,
)
from batch_export.manifest import ExportSpec

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
    (S.VERIFYING, S.DOWNLOADING),
    (S.VERIFYING, S.FAILED),
    (S.FAILED, S.QUEUED),
    (S.DONE, S.QUEUED),
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
