"""The run-wide circuit breaker's pure core (SPEC §9): sequences of observations -> verdicts."""

from __future__ import annotations

import pytest

from batch_export.breaker import PROBES, Breaker, Cause, Verdict, interleave_by_aoi


def forbidden(breaker: Breaker, job: str, aoi: str, code: str = "invalid_api_key") -> Verdict:
    breaker.answered(403)
    return breaker.request_failed(job, aoi=aoi, http_status=403, code=code, message="no")


def unreachable(breaker: Breaker, job: str) -> Verdict:
    breaker.no_answer(job)
    return breaker.request_failed(
        job, aoi="a", http_status=None, code="network_error", message="refused"
    )


def test_five_403s_of_one_code_across_two_aois_open_it() -> None:
    breaker = Breaker()
    verdicts = [forbidden(breaker, f"j{n}", "a1" if n % 2 else "a2") for n in range(5)]
    assert [v.held for v in verdicts] == [True] * 5
    assert [v.opened is not None for v in verdicts] == [False] * 4 + [True]
    opened = verdicts[-1].opened
    assert opened is not None
    assert (opened.cause, opened.code, opened.http_status, opened.jobs, opened.aois) == (
        Cause.API_KEY,
        "invalid_api_key",
        403,
        5,
        2,
    )
    assert opened.describe().startswith(
        "the API rejects the key (HTTP 403 invalid_api_key for 5 job(s) in a row across 2 AOIs"
    )
    assert not breaker.may_send("j9")  # open: nothing more is sent


def test_a_success_between_breaks_the_streak_and_releases_the_held() -> None:
    breaker = Breaker()
    for n in range(4):
        assert forbidden(breaker, f"j{n}", f"a{n}").held
    assert breaker.answered(200) == Verdict(released=("j0", "j1", "j2", "j3"))
    for n in range(4, 8):
        assert forbidden(breaker, f"j{n}", f"a{n}").opened is None
    assert breaker.opened is None


def test_a_400_means_the_key_was_accepted() -> None:
    breaker = Breaker()
    for n in range(4):
        forbidden(breaker, f"j{n}", f"a{n}")
    assert breaker.answered(400).released == ("j0", "j1", "j2", "j3")
    assert breaker.answered(429) == Verdict() and breaker.answered(503) == Verdict()


def test_403s_on_one_aoi_do_not_open_it_and_are_released() -> None:
    breaker = Breaker()
    breaker.answered(200)  # the key was accepted in this run: the 403s are that AOI's own
    verdicts = [forbidden(breaker, f"j{n}", "only", "permission_denied") for n in range(12)]
    assert breaker.opened is None
    assert verdicts[4] == Verdict(released=("j0", "j1", "j2", "j3", "j4"))
    assert verdicts[9] == Verdict(released=("j5", "j6", "j7", "j8", "j9"))
    assert verdicts[11].held  # j10, j11 wait for the next verdict (or the end of the run)
    # The same code on a second AOI then opens it: the streak was never broken by a success.
    assert forbidden(breaker, "j12", "other", "permission_denied").opened is not None


def test_another_code_starts_a_new_streak() -> None:
    breaker = Breaker()
    breaker.answered(200)  # the key works: released jobs fail as their own
    for n in range(4):
        forbidden(breaker, f"j{n}", f"a{n}", "code_a")
    verdict = forbidden(breaker, "j4", "a4", "code_b")
    assert verdict.released == ("j0", "j1", "j2", "j3") and verdict.held
    assert breaker.opened is None and breaker.key_failures == 1


def test_a_401_opens_it_at_once() -> None:
    breaker = Breaker()
    verdict = breaker.request_failed(
        "j0", aoi="a", http_status=401, code="unauthorized", message="m"
    )
    assert verdict.held and verdict.opened is not None
    assert verdict.opened.cause is Cause.API_KEY


def test_three_jobs_out_of_retries_on_network_errors_open_it() -> None:
    breaker = Breaker()
    assert unreachable(breaker, "j0").opened is None
    assert unreachable(breaker, "j1").opened is None
    opened = unreachable(breaker, "j2").opened
    assert opened is not None and opened.cause is Cause.API_UNREACHABLE
    assert opened.describe() == (
        "the API is unreachable (network_error: retries spent by 3 jobs in a row, no answer "
        "between: refused)"
    )


def test_an_answer_breaks_the_network_streak() -> None:
    breaker = Breaker()
    unreachable(breaker, "j0")
    unreachable(breaker, "j1")
    assert breaker.answered(503).released == ("j0", "j1")  # reachable, even if unhappy
    assert unreachable(breaker, "j2").opened is None
    assert breaker.network_failures == 1


def test_while_unreachable_only_the_probes_send() -> None:
    breaker = Breaker()
    assert breaker.may_send("j0")
    breaker.no_answer("j0")  # the first attempt without an answer: the API looks unreachable
    assert breaker.may_send("j0")  # a probe keeps retrying
    assert [breaker.may_send(f"j{n}") for n in range(1, 6)] == [True] * (PROBES - 1) + [False] * 3
    # A probe out of retries keeps its place (the streak counts it): still no one else.
    assert breaker.request_failed(
        "j1", aoi="a", http_status=None, code="network_error", message="m"
    ).held
    assert not breaker.may_send("j4")
    # A probe whose request ended otherwise frees its place.
    assert (
        breaker.request_failed("j2", aoi="a", http_status=200, code="poll_timeout", message="m")
        == Verdict()
    )
    assert breaker.may_send("j4")
    assert not breaker.may_send("j5")
    breaker.answered(200)  # an answer: everyone may send again
    assert breaker.may_send("j5")


def test_a_job_that_raced_the_first_error_is_no_probe() -> None:
    breaker = Breaker()
    for n in range(5):  # five first attempts under way together, all without an answer
        breaker.no_answer(f"j{n}")
    assert [breaker.may_send(f"j{n}") for n in range(5)] == [True] * PROBES + [False] * 2


def test_store_auth_opens_it_once() -> None:
    breaker = Breaker()
    verdict = breaker.store_refused("j0", message="InvalidAccessKeyId")
    assert verdict.opened is not None and verdict.opened.cause is Cause.STORE_AUTH
    assert (
        verdict.opened.describe() == "the object store refuses the credentials (InvalidAccessKeyId)"
    )
    assert breaker.store_refused("j1", message="again") == Verdict(held=True)


def test_other_failures_are_the_jobs_own() -> None:
    breaker = Breaker()
    for code, status in (("poll_timeout", 200), ("http_503", 503), ("unknown_asset", 400)):
        assert (
            breaker.request_failed("j", aoi="a", http_status=status, code=code, message="m")
            == Verdict()
        )
    assert breaker.opened is None


# ------------------------------------------------------------------------------ admission order


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        ([], []),
        (["a1"], ["a1"]),
        (["a1", "a2", "a3", "b1", "b2", "c1"], ["a1", "b1", "c1", "a2", "b2", "a3"]),
        (["b1", "a1", "b2", "a2"], ["b1", "a1", "b2", "a2"]),
        (["a1", "a2", "a3"], ["a1", "a2", "a3"]),
    ],
)
def test_admission_takes_the_aois_in_turn_keeping_each_aois_order(
    items: list[str], expected: list[str]
) -> None:
    assert list(interleave_by_aoi(items, lambda item: item[0])) == expected


def test_a_sender_that_is_done_frees_its_probe_place() -> None:
    # A discover: listing is no job: its attempt without an answer took a probe place, and it
    # never fails as a job would. Unless it gives the place back, two probes out of retries fill
    # the PROBES places and every other job waits at the gate for ever (a run that never ends).
    breaker = Breaker()
    breaker.no_answer("")  # the listing's attempt (no job)
    breaker.done("")  # the listing is over
    assert unreachable(breaker, "j0").opened is None
    assert unreachable(breaker, "j1").opened is None
    assert breaker.may_send("j2")  # the third probe
    assert unreachable(breaker, "j2").opened is not None


def test_a_probe_whose_task_ended_otherwise_frees_its_place() -> None:
    breaker = Breaker()
    for n in range(PROBES):
        breaker.no_answer(f"j{n}")
    assert not breaker.may_send("j9")
    breaker.done("j0")  # stopped, or failed on its own disk: it will send nothing more
    assert breaker.may_send("j9")
    breaker.done("j-unknown")  # a sender that held no place: nothing changes
    assert not breaker.may_send("j10")


def test_403s_stay_held_while_no_answer_accepted_the_key() -> None:
    # One AOI, a key no answer has accepted yet: a bad key and a forbidden AOI look the same, so
    # the failures wait for a verdict (a later success) or the end of the run, where they fail
    # without counting toward abandoning the job (a wrong key must not abandon a nightly's jobs).
    breaker = Breaker()
    verdicts = [forbidden(breaker, f"j{n}", "only", "permission_denied") for n in range(7)]
    assert all(v == Verdict(held=True) for v in verdicts) and not breaker.key_proven
    assert forbidden(breaker, "j7", "only", "other_code") == Verdict(held=True)  # a new streak
    verdict = breaker.answered(200)
    assert breaker.key_proven and breaker.opened is None
    assert sorted(verdict.released) == sorted(f"j{n}" for n in range(8))


def test_a_400_proves_the_key_and_a_403_does_not() -> None:
    breaker = Breaker()
    breaker.answered(403)
    breaker.answered(429)
    assert not breaker.key_proven
    breaker.answered(400)
    assert breaker.key_proven
