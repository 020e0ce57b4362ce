"""The pure progress tally of a run: jobs per state, bytes, measured rates, and an honest ETA (SPEC §9).

:class:`Tally` is a :class:`~batch_export.types.RunObserver` that only counts: it does no I/O and
reads time from the clock it is given, so tests drive it with a fake clock. Its :meth:`Tally.snapshot`
is what the unattended progress line (:func:`progress_line`) and the terminal display show.

The ETA is the slower of the run's two pipelines, each measured, never guessed:

* requests: the requests still needed (jobs not yet ready × the requests a request cycle took so
  far, less what the cycles under way already sent) at the limiter's current rate (requests/s);
* bytes: the bytes still expected (announced sizes of packages under way, the mean package size
  for the others) at the download rate measured while downloads were running (bytes/s).

Until both can be measured (one package ready, and bytes seen with a known size) it is unknown.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from batch_export.types import Job, JobResult, JobState, Outcome

__all__ = ["STATE_ORDER", "Snapshot", "Tally", "human_duration", "human_size", "progress_line"]

#: Per-state counts in the order the line shows them; the first six always, the others when not 0.
STATE_ORDER = (
    JobState.QUEUED,
    JobState.REQUESTING,
    JobState.PREPARING,
    JobState.READY,
    JobState.DOWNLOADING,
    JobState.VERIFYING,
    JobState.UPLOADING,
    JobState.DONE,
    JobState.FAILED,
    JobState.ABANDONED,
)
_ALWAYS = frozenset(
    {
        JobState.QUEUED,
        JobState.REQUESTING,
        JobState.PREPARING,
        JobState.DOWNLOADING,
        JobState.DONE,
        JobState.FAILED,
    }
)
#: States whose jobs still need API requests in this run.
_NEED_REQUESTS = frozenset({JobState.QUEUED, JobState.REQUESTING, JobState.PREPARING})
#: States whose jobs still need bytes in this run.
_NEED_BYTES = _NEED_REQUESTS | {JobState.READY, JobState.DOWNLOADING}


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The run's progress at one moment.

    Attributes:
        counts: jobs per state (every :class:`JobState`, as strings, in :data:`STATE_ORDER`).
        bytes: bytes downloaded in this run.
        rate: download rate in bytes/s measured while downloads ran; None before any byte.
        eta: seconds until every job is through, or None while it cannot be measured.
        uploaded: bytes the object store confirmed in this run (object-store output; SPEC §8).
    """

    counts: dict[str, int]
    bytes: int
    rate: float | None
    eta: float | None
    uploaded: int = 0


@dataclass(slots=True)
class _JobPace:
    state: JobState = JobState.QUEUED
    polls_at_cycle: int = 0  # the record's polls when the current request cycle began
    sent_in_cycle: int = 0  # requests of the current request cycle so far
    bytes_done: int = 0
    bytes_total: int | None = None


@dataclass(slots=True)
class Tally:
    """Counts a run's jobs by state and measures its rates; feed it job events (a RunObserver).

    Args:
        total: jobs in the run.
        clock: monotonic seconds (the run's clock).
        request_rate: the limiter's current rate in requests/s.
    """

    total: int
    clock: Callable[[], float]
    request_rate: Callable[[], float]
    _jobs: dict[str, _JobPace] = field(default_factory=dict)
    _bytes: int = 0
    _uploaded: int = 0
    _active_downloads: int = 0
    _active_since: float = 0.0
    _download_seconds: float = 0.0  # time during which at least one download was running
    _cycles: int = 0  # request cycles that ended with a ready package
    _cycle_requests: int = 0  # the requests those cycles took
    _sizes: list[int] = field(default_factory=list)  # sizes of packages seen (bytes)
    _sized: set[str] = field(default_factory=set)

    def add_jobs(self, count: int) -> None:
        """``count`` more jobs joined the run (discovered at run time)."""
        self.total += count

    # -- RunObserver

    def job_state(self, job: Job) -> None:
        """Track the job's new state (a request cycle's requests, downloads running)."""
        pace = self._jobs.setdefault(job.key, _JobPace())
        state = job.record.state
        if state is JobState.REQUESTING and pace.state is not JobState.REQUESTING:
            pace.polls_at_cycle = job.record.polls
            pace.sent_in_cycle = 1
        elif state is JobState.PREPARING:
            pace.sent_in_cycle = 1 + job.record.polls - pace.polls_at_cycle  # answers so far
        elif state is JobState.READY and pace.state in _NEED_REQUESTS:
            self._cycles += 1
            self._cycle_requests += 1 + job.record.polls - pace.polls_at_cycle
        if state is JobState.DOWNLOADING:
            self._note_size(job)
            pace.bytes_done, pace.bytes_total = job.bytes_done, job.bytes_total
        self._set_state(pace, state)

    def job_bytes(self, job: Job, count: int) -> None:
        """Count ``count`` more bytes of ``job``."""
        self._bytes += count
        pace = self._jobs.setdefault(job.key, _JobPace())
        pace.bytes_done, pace.bytes_total = job.bytes_done, job.bytes_total
        self._note_size(job)

    def job_uploaded(self, job: Job, count: int) -> None:
        """Count ``count`` more bytes of ``job`` the object store confirmed."""
        self._uploaded += count

    def job_finished(self, result: JobResult) -> None:
        """A skipped job counts as done, an abandoned one as abandoned; the others told their state."""
        pace = self._jobs.setdefault(result.key, _JobPace())
        if result.outcome is Outcome.SKIPPED:
            self._set_state(pace, JobState.DONE)
        elif result.outcome is Outcome.ABANDONED:
            self._set_state(pace, JobState.ABANDONED)
        elif result.outcome is Outcome.DOWNLOADED and result.bytes is not None:
            if result.key not in self._sized:
                self._sized.add(result.key)
                self._sizes.append(result.bytes)

    # -- reading

    def snapshot(self) -> Snapshot:
        """Return the counts, bytes, download rate and ETA now."""
        now = self.clock()
        counts = {str(state): 0 for state in STATE_ORDER}
        for pace in self._jobs.values():
            counts[str(pace.state)] += 1
        counts[str(JobState.QUEUED)] += self.total - len(self._jobs)
        seconds = self._download_seconds
        if self._active_downloads:
            seconds += now - self._active_since
        rate = self._bytes / seconds if self._bytes and seconds > 0 else None
        return Snapshot(
            counts=counts,
            bytes=self._bytes,
            rate=rate,
            eta=self._eta(counts, rate),
            uploaded=self._uploaded,
        )

    def _eta(self, counts: dict[str, int], rate: float | None) -> float | None:
        unseen = self.total - len(self._jobs)
        paces = list(self._jobs.values())
        needing_requests = [p for p in paces if p.state in _NEED_REQUESTS]
        needing_bytes = [p for p in paces if p.state in _NEED_BYTES]
        if not needing_requests and not needing_bytes and not unseen:
            return 0.0
        per_cycle = self._cycle_requests / self._cycles if self._cycles else None
        mean_size = sum(self._sizes) / len(self._sizes) if self._sizes else None
        if per_cycle is None or mean_size is None or rate is None:
            return None
        requests = unseen * per_cycle + sum(
            max(0.0, per_cycle - p.sent_in_cycle) if p.state is not JobState.QUEUED else per_cycle
            for p in needing_requests
        )
        expected = unseen * mean_size
        for pace in needing_bytes:
            if pace.bytes_total is not None:
                expected += max(0, pace.bytes_total - pace.bytes_done)
            else:
                expected += max(0.0, mean_size - pace.bytes_done)
        request_rate = self.request_rate()
        request_seconds = requests / request_rate if request_rate > 0 else float("inf")
        return max(request_seconds, expected / rate)

    # -- helpers

    def _note_size(self, job: Job) -> None:
        if job.bytes_total is not None and job.key not in self._sized:
            self._sized.add(job.key)
            self._sizes.append(job.bytes_total)

    def _set_state(self, pace: _JobPace, state: JobState) -> None:
        was = pace.state is JobState.DOWNLOADING
        now = state is JobState.DOWNLOADING
        if now and not was:
            if self._active_downloads == 0:
                self._active_since = self.clock()
            self._active_downloads += 1
        elif was and not now:
            self._active_downloads -= 1
            if self._active_downloads == 0:
                self._download_seconds += self.clock() - self._active_since
        pace.state = state


def human_size(count: float) -> str:
    """``9_800_000_000`` -> ``"9.8 GB"``, ``61_000_000`` -> ``"61 MB"``, ``512`` -> ``"512 B"``.

    Decimal units (1 kB = 1000 bytes), as rich's download bars; one decimal below 10.
    """
    value = float(max(0.0, count))
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 999.5 or unit == "TB":
            break
        value /= 1000.0
    if unit == "B":
        return f"{value:.0f} B"
    return f"{value:.1f} {unit}" if value < 9.95 else f"{value:.0f} {unit}"


def human_duration(seconds: float) -> str:
    """``8040`` -> ``"2h14m"``, ``845`` -> ``"14m05s"``, ``42`` -> ``"42s"``, ``93600`` -> ``"1d02h"``."""
    whole = round(max(0.0, seconds))
    minutes, secs = divmod(whole, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def progress_line(snapshot: Snapshot) -> str:
    """Return the unattended progress line (SPEC §9), e.g.

    ``progress: queued 812 requesting 3 preparing 140 downloading 4 done 41 failed 0 | 9.8 GB at
    61 MB/s | ETA 2h14m`` (``ETA unknown`` until it can be measured).
    """
    counts = " ".join(
        f"{state} {snapshot.counts[str(state)]}"
        for state in STATE_ORDER
        if state in _ALWAYS or snapshot.counts[str(state)]
    )
    rate = human_size(snapshot.rate or 0.0)
    eta = "unknown" if snapshot.eta is None else human_duration(snapshot.eta)
    uploaded = f" | uploaded {human_size(snapshot.uploaded)}" if snapshot.uploaded else ""
    return f"progress: {counts} | {human_size(snapshot.bytes)} at {rate}/s{uploaded} | ETA {eta}"
