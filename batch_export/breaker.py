"""The run-wide circuit breaker (SPEC §9): stop a run whose failures are plainly not the jobs' own.

Pure: :class:`Breaker` is fed what happened (an API answer, an attempt that got no answer, a job's
request that failed for good, the object store refusing the credentials) and answers with a
:class:`Verdict`; the runner acts on it. Nothing here does I/O, sleeps or reads a clock.

It opens when

* the API rejects the key: a 401, or a 403 with the same ``error.code`` for
  :data:`KEY_STREAK` jobs in a row across at least :data:`KEY_AOIS` AOIs, with no success between
  (a 2xx answer, or a 4xx other than 401/403/408/429 — the key was accepted);
* the API host is unreachable: the retries of :data:`NETWORK_STREAK` jobs in a row spent on
  network errors (no HTTP answer at all), with no answer from the API between;
* the object store refuses the credentials (``store_auth``), once.

Jobs whose failures count toward an opening are *held*: their outcome waits for the verdict. When
the breaker opens they are left ``pending`` like every unfinished job (nothing was wrong with them);
when the streak breaks (a success, another code) they are *released* and fail as usual.

Until an answer of this run has accepted the key (:attr:`Breaker.key_proven`), a 403 on one AOI
alone (or of several codes) cannot be told from a bad key, so every 401/403 failure stays held; one
still held when the run ends fails without counting toward abandoning its job (the runner's rule:
a wrong or expired key must not abandon a small nightly's jobs, SPEC §9 extended).

While the API looks unreachable (an attempt got no answer and none has been answered since), only
:data:`PROBES` jobs may send (the *probes*, counting those already out of retries); the others
wait. So an unreachable API costs ``PROBES`` jobs' retries plus the requests already under way when
the first attempt failed, not every job's.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Final, TypeVar

from batch_export.errors import UNREACHABLE_CODES

__all__ = [
    "KEY_AOIS",
    "KEY_STREAK",
    "NETWORK_CODES",
    "NETWORK_STREAK",
    "PROBES",
    "Breaker",
    "Cause",
    "Opened",
    "Verdict",
    "interleave_by_aoi",
]

#: Jobs in a row whose PUT got a 403 with the same error code ...
KEY_STREAK: Final = 5
#: ... across at least this many AOIs: the key, not the jobs.
KEY_AOIS: Final = 2
#: Jobs in a row whose retries were spent on network errors: the API host is unreachable.
NETWORK_STREAK: Final = 3
#: Jobs that may keep sending while the API looks unreachable.
PROBES: Final = 3
#: Error codes of a request that got no HTTP answer: the one table of the error tree.
NETWORK_CODES: Final = UNREACHABLE_CODES
#: HTTP statuses that say nothing about the key (flow control, server trouble).
_NEUTRAL: Final = frozenset({408, 429})


_T = TypeVar("_T")


def interleave_by_aoi(items: Iterable[_T], aoi_of: Callable[[_T], str]) -> Iterator[_T]:
    """Yield ``items`` round-robin over their AOIs, each AOI's own items in their given order.

    The admission order of a run. A bad key answers 403 to every AOI, a forbidden AOI only to its
    own jobs; the breaker tells the two apart only once the 403s span :data:`KEY_AOIS` AOIs. In
    manifest order a manifest whose first 500 jobs share one AOI would spend 500 requests before
    the second AOI speaks; interleaved, the first :data:`KEY_STREAK` requests already span the AOIs.
    It also spreads a run's first requests fairly over the AOIs. Stable; ``O(n)``.
    """
    queues: dict[str, deque[_T]] = {}
    for item in items:
        queues.setdefault(aoi_of(item), deque()).append(item)
    lanes = deque(queues.values())
    while lanes:
        lane = lanes.popleft()
        yield lane.popleft()
        if lane:
            lanes.append(lane)


class Cause(enum.StrEnum):
    """Why the breaker opened (the report's ``breaker.cause``)."""

    API_KEY = "api_key"
    API_UNREACHABLE = "api_unreachable"
    STORE_AUTH = "store_auth"


@dataclass(frozen=True, slots=True)
class Opened:
    """The breaker opened.

    Attributes:
        cause: why.
        code: the error code behind it (``invalid_api_key``, ``network_error``, ``store_auth``).
        http_status: the HTTP status behind it, if any.
        jobs: the jobs whose failures opened it (in a row).
        aois: the distinct AOIs among them.
        message: the failures' last message (already redacted by the caller).
    """

    cause: Cause
    code: str
    http_status: int | None
    jobs: int
    aois: int
    message: str

    def describe(self) -> str:
        """One line naming the cause, for the log (no secrets: the message came redacted)."""
        if self.cause is Cause.API_KEY:
            status = f"HTTP {self.http_status} {self.code}"
            where = f" across {self.aois} AOIs" if self.aois > 1 else ""
            return (
                f"the API rejects the key ({status} for {self.jobs} job(s) in a row{where}, "
                f"no success between: {self.message}); check the API key"
            )
        if self.cause is Cause.API_UNREACHABLE:
            return (
                f"the API is unreachable ({self.code}: retries spent by {self.jobs} jobs in a row, "
                f"no answer between: {self.message})"
            )
        return f"the object store refuses the credentials ({self.message})"


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the runner must do after an observation.

    Attributes:
        held: the observed job's failure counts toward an opening: hold its outcome.
        released: held jobs (keys) whose failures turned out to be their own: let them fail now.
        opened: the breaker opened now: stop sending, leave the held and unfinished jobs pending.
    """

    held: bool = False
    released: tuple[str, ...] = ()
    opened: Opened | None = None


_NOTHING: Final = Verdict()


@dataclass(slots=True)
class _Streak:
    """Jobs in a row with the same kind of failure."""

    code: str = ""
    jobs: int = 0
    aois: set[str] = field(default_factory=set)
    held: list[str] = field(default_factory=list)

    def reset(self) -> tuple[str, ...]:
        released = tuple(self.held)
        self.code, self.jobs, self.aois, self.held = "", 0, set(), []
        return released


@dataclass(slots=True)
class Breaker:
    """The breaker's state; feed it observations, act on the :class:`Verdict`.

    Attributes:
        opened: how it opened, once it has (it never closes within a run).
        key_failures, network_failures: jobs counted in the current streaks (for the report).
    """

    opened: Opened | None = None
    _key: _Streak = field(default_factory=_Streak)
    _network: _Streak = field(default_factory=_Streak)
    _suspect: bool = False  # an attempt got no answer, and no answer came since
    _key_proven: bool = False  # an answer of this run accepted the key
    _doubtful: list[str] = field(default_factory=list)  # held 403s out of the streak, key unproven
    _probes: set[str] = field(default_factory=set)

    @property
    def key_proven(self) -> bool:
        """Whether an answer of this run accepted the key (a 2xx, or a 4xx that is no 401/403/408/429)."""
        return self._key_proven

    @property
    def key_failures(self) -> int:
        """Jobs in the current 403 streak."""
        return self._key.jobs

    @property
    def network_failures(self) -> int:
        """Jobs in the current network-error streak."""
        return self._network.jobs

    # -- per attempt

    def answered(self, status: int) -> Verdict:
        """The API answered an attempt with HTTP ``status``: it is reachable; maybe the key works."""
        if self.opened is not None:
            return _NOTHING
        released = self._network.reset()
        self._suspect = False
        self._probes.clear()
        key_accepted = (200 <= status < 300) or (
            400 <= status < 500 and status not in (401, 403) and status not in _NEUTRAL
        )
        if key_accepted:
            self._key_proven = True
            released += self._key.reset() + tuple(self._doubtful)
            self._doubtful = []
        return Verdict(released=released) if released else _NOTHING

    def no_answer(self, job: str) -> None:
        """An attempt of ``job`` got no HTTP answer (a network error; it may be retried)."""
        self._suspect = True
        self._take_probe(job)

    def may_send(self, job: str) -> bool:
        """Whether ``job`` may send an API request now (False once open).

        While the API looks unreachable, only the probes may: at most :data:`PROBES` jobs, counting
        those that already spent their retries in the current streak, so that the streak that
        opens the breaker costs about ``PROBES`` jobs' retries.
        """
        if self.opened is not None:
            return False
        return not self._suspect or self._take_probe(job)

    def done(self, job: str) -> None:
        """``job`` will send nothing more (its task ended, or the discover: listings are over).

        Gives back its probe place, if it held one: a probe that ended without failing for good
        (stopped, failed on its own disk, or the listings, which are no job: ``""``) would
        otherwise keep it, and with :data:`PROBES` places taken no other job may ever send.
        """
        self._probes.discard(job)

    def _take_probe(self, job: str) -> bool:
        if job in self._probes:
            return True
        if len(self._probes) + self._network.jobs < PROBES:
            self._probes.add(job)
            return True
        return False

    # -- per job

    def request_failed(
        self, job: str, *, aoi: str, http_status: int | None, code: str, message: str
    ) -> Verdict:
        """``job``'s API request failed for good (the error the job would fail with)."""
        self._probes.discard(job)
        if self.opened is not None:
            return Verdict(held=True)  # under way when it opened: pending like the rest
        if http_status == 401:
            self._key.held.append(job)
            return self._open(Cause.API_KEY, code, 401, 1, 1, message)
        if http_status == 403:
            return self._key_failure(job, aoi, code, message)
        if http_status is None and code in NETWORK_CODES:
            return self._network_failure(job, aoi, code, message)
        return _NOTHING

    def store_refused(self, job: str, *, message: str) -> Verdict:
        """The object store refused the credentials for ``job`` (``store_auth``)."""
        if self.opened is None:
            self._key.held.append(job)
            return self._open(Cause.STORE_AUTH, "store_auth", None, 1, 0, message)
        return Verdict(held=True)

    # -- helpers

    def _key_failure(self, job: str, aoi: str, code: str, message: str) -> Verdict:
        streak = self._key
        released: tuple[str, ...] = ()
        if streak.jobs and streak.code != code:
            released = self._release_or_doubt(streak.reset())
        streak.code = code
        streak.jobs += 1
        streak.aois.add(aoi)
        streak.held.append(job)
        if streak.jobs >= KEY_STREAK and len(streak.aois) >= KEY_AOIS:
            opened = self._open(Cause.API_KEY, code, 403, streak.jobs, len(streak.aois), message)
            return Verdict(held=True, released=released, opened=opened.opened)
        if len(streak.held) >= KEY_STREAK:
            # One AOI only so far: most likely that AOI's own permission; let these fail, but keep
            # counting (a 403 of the same code on another AOI still opens the breaker).
            released += self._release_or_doubt(tuple(streak.held))
            streak.held = []
            return Verdict(held=not self._key_proven, released=released)
        return Verdict(held=True, released=released)

    def _release_or_doubt(self, jobs: tuple[str, ...]) -> tuple[str, ...]:
        """``jobs`` out of the key streak: released once the key is proven, else kept held."""
        if self._key_proven:
            return jobs
        self._doubtful.extend(jobs)
        return ()

    def _network_failure(self, job: str, aoi: str, code: str, message: str) -> Verdict:
        streak = self._network
        streak.code = code
        streak.jobs += 1
        streak.aois.add(aoi)
        streak.held.append(job)
        if streak.jobs >= NETWORK_STREAK:
            opened = self._open(
                Cause.API_UNREACHABLE, code, None, streak.jobs, len(streak.aois), message
            )
            return Verdict(held=True, opened=opened.opened)
        return Verdict(held=True)

    def _open(
        self,
        cause: Cause,
        code: str,
        http_status: int | None,
        jobs: int,
        aois: int,
        message: str,
    ) -> Verdict:
        self.opened = Opened(cause, code, http_status, jobs, aois, message)
        return Verdict(held=True, opened=self.opened)
