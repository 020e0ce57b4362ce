"""The retry budget shared by the API client and the downloader: count, give up, back off.

Network errors are named by the one table in :func:`batch_export.http.describe_failure`.

Backoff: exponential with full jitter, ``uniform(0, min(cap, base * 2**n))`` seconds
(:func:`batch_export.lifecycle.backoff_delay`), unless the server named its own wait.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from batch_export.clock import Clock
from batch_export.errors import JobError, RetriesExhausted
from batch_export.lifecycle import backoff_delay

__all__ = ["RetryBudget", "RetryPolicy"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how long to retry one request. Durations in seconds."""

    clock: Clock
    retries: int
    backoff_base: float = 1.0
    backoff_cap: float = 60.0
    rng: random.Random = field(default_factory=random.Random)

    def budget(self, job_key: str) -> RetryBudget:
        """Return a fresh budget for one request (or one transfer) of job ``job_key``."""
        return RetryBudget(self, job_key)


class RetryBudget:
    """Counts the failures of one request; each :meth:`spend` waits or gives up."""

    def __init__(self, policy: RetryPolicy, job_key: str) -> None:
        self._policy = policy
        self._job_key = job_key
        self.failures = 0

    async def spend(
        self,
        exc: JobError,
        *,
        retry_after: float | None = None,
        backoff: bool = True,
        deadline: float | None = None,
    ) -> None:
        """Record the failure ``exc``, then wait before the next try.

        Waits ``retry_after`` seconds when the server named a wait, else the jittered backoff
        (nothing when ``backoff`` is False); never past ``deadline`` (monotonic seconds), so a
        caller bounded by one (``poll_timeout``) wakes up in time to give up.

        Raises:
            RetriesExhausted: more failures than ``retries`` (carries ``exc``'s code and status).
        """
        self.failures += 1
        policy = self._policy
        if self.failures > policy.retries:
            raise RetriesExhausted(
                f"{exc.message} (after {self.failures} attempts)",
                code=exc.code,
                http_status=exc.http_status,
                job_key=self._job_key,
            ) from None
        if retry_after is not None:
            delay = retry_after
        elif backoff:
            delay = backoff_delay(
                self.failures - 1, base=policy.backoff_base, cap=policy.backoff_cap, rng=policy.rng
            )
        else:
            return
        if deadline is not None:
            delay = min(delay, max(0.0, deadline - policy.clock.monotonic()))
        await policy.clock.sleep(delay)
