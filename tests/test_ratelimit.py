import itertools

import anyio
import pytest

from batch_export.ratelimit import MIN_RATE, RateLimiter
from tests.fakes import FakeClock

pytestmark = pytest.mark.anyio


async def test_burst_one_spacing() -> None:
    clock = FakeClock()
    limiter = RateLimiter(4.0, clock=clock)
    times = []
    for _ in range(5):
        await limiter.acquire()
        times.append(clock.now)
    assert [round(t - times[0], 6) for t in times] == [0.0, 0.25, 0.5, 0.75, 1.0]


async def test_fifo_order_between_waiters() -> None:
    clock = FakeClock()
    limiter = RateLimiter(2.0, clock=clock)
    order: list[int] = []

    async def worker(n: int) -> None:
        await limiter.acquire()
        order.append(n)

    async with anyio.create_task_group() as tg:
        for n in range(6):
            tg.start_soon(worker, n)
            await anyio.lowlevel.checkpoint()
    assert order == [0, 1, 2, 3, 4, 5]


async def test_retry_after_pauses_everyone_and_halves_once() -> None:
    clock = FakeClock()
    limiter = RateLimiter(10.0, clock=clock)
    await limiter.acquire()
    limiter.throttled(3.0)
    limiter.throttled(3.0)  # same pause: no second halving
    assert limiter.stats.rate == 5.0
    t0 = clock.now
    await limiter.acquire()
    assert clock.now - t0 == pytest.approx(3.0)
    # A 429 in a new pause halves again, never below the floor.
    for _ in range(20):
        clock.now += 1000
        limiter.throttled(0)
    assert limiter.stats.rate == MIN_RATE
    assert limiter.stats.throttled == 22


async def test_retry_after_clamped_and_garbage_uses_own_pause() -> None:
    clock = FakeClock()
    limiter = RateLimiter(1.0, clock=clock)
    limiter.throttled(10_000.0)
    assert limiter.stats.paused_for == 900.0
    clock.now += 901
    limiter2 = RateLimiter(1.0, clock=clock)
    limiter2.throttled(None)
    assert limiter2.stats.paused_for == pytest.approx(2.0)  # one slot at the halved rate


async def test_rate_climbs_back_when_calm() -> None:
    clock = FakeClock()
    limiter = RateLimiter(8.0, clock=clock)
    limiter.throttled(1.0)
    assert limiter.stats.rate == 4.0
    clock.now += 1.5
    await limiter.acquire()
    assert limiter.stats.rate == 4.0  # not calm long enough yet
    for _ in range(200):
        await limiter.acquire()
    assert limiter.stats.rate == 8.0


class LateClock(FakeClock):
    """Every sleep ends ``late`` seconds after it should (timer granularity, a busy loop)."""

    def __init__(self, late: float) -> None:
        super().__init__()
        self.late = late

    async def sleep(self, seconds: float) -> None:
        await super().sleep(seconds + self.late if seconds > 0 else seconds)


async def test_late_wake_ups_do_not_slow_the_rate() -> None:
    clock = LateClock(late=0.001)  # 1 ms late on a 20 ms interval: 5 % of the rate
    limiter = RateLimiter(50.0, clock=clock)
    granted: list[float] = []

    async def worker() -> None:
        await limiter.acquire()
        granted.append(clock.now)

    async with anyio.create_task_group() as tg:
        for _ in range(101):
            tg.start_soon(worker)
    assert (granted[-1] - granted[0]) / 100 == pytest.approx(0.02, rel=1e-3)
    gaps = [b - a for a, b in itertools.pairwise(granted)]
    assert min(gaps) >= 0.01 - 1e-9  # never closer than half an interval


async def test_idle_bucket_restarts_the_schedule() -> None:
    clock = FakeClock()
    limiter = RateLimiter(10.0, clock=clock)
    await limiter.acquire()
    clock.now += 5.0  # idle: no credit is saved up beyond one request (burst 1)
    await limiter.acquire()
    t0 = clock.now
    await limiter.acquire()
    assert clock.now - t0 == pytest.approx(0.1)
    clock.now += 0.13  # arriving late for an idle bucket gives no catch-up either
    t1 = clock.now
    await limiter.acquire()
    await limiter.acquire()
    assert clock.now - t1 == pytest.approx(0.1)


async def test_climb_returns_fast_below_the_rate_that_drew_the_429_then_probes() -> None:
    clock = FakeClock()
    limiter = RateLimiter(20.0, clock=clock)
    limiter.throttled(1.0)  # at 20/s: halved to 10, ceiling 20
    clock.now += 3.0  # calm from 2 s on: 1 s of climbing, fast, capped at 90 % of the ceiling
    await limiter.acquire()
    assert limiter.stats.rate == pytest.approx(18.0)
    limiter.throttled(1.0)  # the server's limit is below 18/s: halved to 9, ceiling 18
    assert limiter.stats.rate == pytest.approx(9.0)
    clock.now += 2.5
    await limiter.acquire()
    assert limiter.stats.rate == pytest.approx(9.0 + 0.5 * 18 * 0.5)
    clock.now += 1.0
    await limiter.acquire()
    assert limiter.stats.rate == pytest.approx(0.9 * 18)
    clock.now += 10.0  # probing: +1 % of the ceiling per second, up to the ceiling
    await limiter.acquire()
    assert limiter.stats.rate == pytest.approx(0.9 * 18 + 0.01 * 18 * 10)
    clock.now += 1.0  # past the ceiling without a 429: +5 % of the target per second
    await limiter.acquire()
    assert limiter.stats.rate == pytest.approx(18.0 + 0.05 * 20)


async def test_acquire_gives_up_when_the_turn_comes_after_the_deadline() -> None:
    clock = FakeClock()
    limiter = RateLimiter(10.0, clock=clock)
    limiter.throttled(20.0)  # everyone paused for 20 s
    t0 = clock.now
    assert await limiter.acquire(deadline=t0 + 3.0) is False
    assert clock.now == t0  # did not wait for a turn it could not use
    assert await limiter.acquire(deadline=t0 + 30.0) is True
    assert clock.now - t0 == pytest.approx(20.0)


async def test_retry_budget_backs_off_with_jitter_then_gives_up() -> None:
    import random

    from batch_export.errors import JobError, RetriesExhausted
    from batch_export.retry import RetryPolicy

    clock = FakeClock()
    budget = RetryPolicy(
        clock=clock, retries=2, backoff_base=1.0, backoff_cap=10.0, rng=random.Random(3)
    ).budget("k")
    error = JobError("API answered HTTP 503", code="http_503", http_status=503)
    await budget.spend(error)
    await budget.spend(error, retry_after=7.0)
    assert 0.0 <= clock.sleeps[0] <= 1.0 and clock.sleeps[1] == 7.0
    with pytest.raises(RetriesExhausted) as info:
        await budget.spend(error)
    assert (info.value.code, info.value.http_status, info.value.job_key) == ("http_503", 503, "k")
    assert info.value.message == "API answered HTTP 503 (after 3 attempts)"
    assert len(clock.sleeps) == 2


class StepClock:
    """Virtual time that moves only when every task waits: straight to the earliest wake-up.

    Unlike :class:`FakeClock`, a sleep really waits (for :meth:`run` to reach its end), so the
    sleeps of concurrent tasks do not add up and a wait that is not on this clock never ends.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []
        self._sleepers: list[tuple[float, anyio.Event]] = []

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.now + 1_800_000_000.0

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        woken = anyio.Event()
        self._sleepers.append((self.now + max(0.0, seconds), woken))
        await woken.wait()

    async def run(self) -> None:
        """Until no one sleeps: wait for every task to block, then jump to the next wake-up."""
        while True:
            await anyio.wait_all_tasks_blocked()
            if not self._sleepers:
                return
            self.now = min(at for at, _ in self._sleepers)
            for item in [s for s in self._sleepers if s[0] <= self.now]:
                self._sleepers.remove(item)
                item[1].set()


async def test_a_queued_deadline_caller_is_refused_in_clock_time_once_its_turn_is_late() -> None:
    clock = StepClock()
    limiter = RateLimiter(4.0, clock=clock)
    limiter.throttled(1.0)  # paused until 1001; halved to 2/s (slots 0.5 s apart) for 2 calm s
    events: list[tuple[str, bool, float]] = []

    async def caller(name: str, deadline: float | None) -> None:
        events.append((name, await limiter.acquire(deadline=deadline), clock.now))

    async with anyio.create_task_group() as tg:
        for name, deadline in [
            ("a", None),  # 1001.0
            ("b", 1000.9),  # before the pause ends: refused on arrival
            ("c", None),  # 1001.5
            ("e", None),  # 1002.0
            ("d", 1001.7),  # behind c and e: refused once c's grant puts the next slot at 1002.0
            ("f", 1002.5),  # exactly at its slot: served
        ]:
            tg.start_soon(caller, name, deadline)
            await anyio.wait_all_tasks_blocked()
        await clock.run()
    assert events == [
        ("b", False, 1000.0),
        ("a", True, 1001.0),
        ("c", True, 1001.5),
        ("d", False, 1001.5),
        ("e", True, 1002.0),
        ("f", True, 1002.5),
    ]
    assert clock.sleeps == [1.0, 0.5, 0.5, 0.5]  # only the head of the queue ever waits
    assert limiter.stats.granted == 4


async def test_a_429_refuses_the_queued_callers_it_pushes_past_their_deadline_at_once() -> None:
    clock = StepClock()
    limiter = RateLimiter(4.0, clock=clock)
    assert await limiter.acquire() is True  # next slot 1000.25
    events: list[tuple[str, bool, float]] = []

    async def caller(name: str, deadline: float | None) -> None:
        events.append((name, await limiter.acquire(deadline=deadline), clock.now))

    async with anyio.create_task_group() as tg:
        tg.start_soon(caller, "head", None)  # sleeping until 1000.25
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(caller, "late", 1010.0)
        tg.start_soon(caller, "patient", 1030.5)
        await anyio.wait_all_tasks_blocked()
        limiter.throttled(30.0)  # paused until 1030, 2/s
        await anyio.wait_all_tasks_blocked()
        assert events == [("late", False, 1000.0)]  # no one waited for a deadline to pass
        await clock.run()
    assert events == [("late", False, 1000.0), ("head", True, 1030.0), ("patient", True, 1030.5)]
    assert clock.sleeps == [0.25, 29.75, 0.5]


async def test_concurrent_deadline_callers_are_paced_exactly_on_a_fake_clock() -> None:
    clock = FakeClock()
    limiter = RateLimiter(4.0, clock=clock)
    granted: list[tuple[bool, float]] = []

    async def caller(deadline: float) -> None:
        granted.append((await limiter.acquire(deadline=deadline), clock.now))

    async with anyio.create_task_group() as tg:
        for _ in range(9):
            tg.start_soon(caller, 1002.0)  # the ninth slot is 1000 + 8 / 4 = 1002.0: all in time
        tg.start_soon(caller, 1002.1)  # the tenth slot, 1002.25, is past its deadline
    assert granted == [(True, 1000.0 + n * 0.25) for n in range(9)] + [(False, 1002.0)]
    assert clock.now - 1000.0 == 2.0  # (9 - 1) / 4 s of fake time, nothing more
    assert clock.sleeps == [0.25] * 8  # one waiter at a time: fake sleeps do not pile up
