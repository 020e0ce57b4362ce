"""The state store: SQLite durability, schema versions, group commit, cancellation, runs (SPEC §5)."""

from __future__ import annotations

import dataclasses
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import closing
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from batch_export.errors import LocalIOError, UsageError
from batch_export.lifecycle import JobState
from batch_export.segments import SegmentState
from batch_export.store import (
    SCHEMA_VERSION,
    JobRecord,
    JobStore,
    MemoryStore,
    SqliteStore,
)

pytestmark = pytest.mark.anyio


def rec(n: int | str, **changes: object) -> JobRecord:
    key = f"{n:064x}" if isinstance(n, int) else n
    return JobRecord(
        key=key,
        aoi_id=f"aoi-{n}",
        insight_id="ins-1",
        name=f"job{n}",
        relpath=f"aoi-{n}/ins-1/job{n}.zip",
    ).evolve(**changes)


FULL = JobRecord(
    key="9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    aoi_id="aoi_7c1e",
    insight_id="ins-ndvi-002",
    name="Field 12 — north (ünïcode)",
    relpath="aoi_7c1e/ins-ndvi-002/field 12.zip",
    state=JobState.FAILED,
    attempts=3,
    polls=17,
    part_etag='"d41d8cd98f00b204e9800998ecf8427e-3"',
    bytes=2**40 + 7,
    sha256="e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    error_code="retries_exhausted",
    error_message="storage answered 503 five times; last: 'Slow Down'\nsecond line",
    error_http_status=503,
)
SPARSE = rec(1)  # every optional field None, counters 0, state queued


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = await SqliteStore.open(tmp_path / "state")
    try:
        yield s
    finally:
        await s.close()


async def reopen(tmp_path: Path) -> SqliteStore:
    return await SqliteStore.open(tmp_path / "state")


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Yield to the event loop until ``predicate`` holds (no sleeping; bounded by fail_after)."""
    with anyio.fail_after(10):
        while not predicate():
            await anyio.lowlevel.checkpoint()


def sql(tmp_path: Path, query: str) -> list[tuple[object, ...]]:
    with closing(sqlite3.connect(tmp_path / "state" / "state.sqlite3")) as db:
        return db.execute(query).fetchall()


# ------------------------------------------------------------------------------ opening, schema


async def test_open_creates_dir_and_sets_pragmas(tmp_path: Path) -> None:
    async with await SqliteStore.open(tmp_path / "a" / "b") as s:
        assert s.path == tmp_path / "a" / "b" / "state.sqlite3"
        assert s.path.is_file()
        pragmas = {}
        for name in ("journal_mode", "synchronous", "busy_timeout", "foreign_keys", "user_version"):
            rows = list(await s._db.execute_fetchall(f"PRAGMA {name}"))
            pragmas[name] = rows[0][0]
    assert pragmas == {
        "journal_mode": "wal",
        "synchronous": 1,  # NORMAL
        "busy_timeout": 5000,
        "foreign_keys": 1,
        "user_version": SCHEMA_VERSION,
    }


async def test_jobs_table_has_a_column_per_field(store: SqliteStore, tmp_path: Path) -> None:
    # A field added to JobRecord needs a migration adding its column.
    columns = [row[1] for row in sql(tmp_path, "PRAGMA table_info(jobs)")]
    # (Later migrations add columns after updated_at: the order does not matter, names are used.)
    assert sorted(columns) == sorted(
        [f.name for f in dataclasses.fields(JobRecord)] + ["updated_at"]
    )
    run_columns = [row[1] for row in sql(tmp_path, "PRAGMA table_info(runs)")]
    assert run_columns == ["run_id", "started_at", "finished_at", "exit_code", "counts", "pid"]


async def test_empty_v0_database_is_migrated(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    with closing(sqlite3.connect(tmp_path / "state" / "state.sqlite3")) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (0,)
        db.execute("CREATE TABLE unrelated (x)")  # make it a real, non-empty file
        db.commit()
    async with await reopen(tmp_path) as s:
        await s.save(FULL)
        assert await s.load(FULL.key) == FULL
    assert sql(tmp_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    tables = {row[0] for row in sql(tmp_path, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"jobs", "runs", "unrelated"} <= tables


async def test_reopening_a_current_database_does_not_migrate_again(tmp_path: Path) -> None:
    async with await reopen(tmp_path) as s:
        await s.save(FULL)
    async with await reopen(tmp_path) as s:
        assert await s.load(FULL.key) == FULL
    assert sql(tmp_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    async with await reopen(tmp_path):
        pass
    with closing(sqlite3.connect(tmp_path / "state" / "state.sqlite3")) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        db.commit()
    with pytest.raises(UsageError, match="written by a newer batch-export") as info:
        await reopen(tmp_path)
    assert str(tmp_path / "state" / "state.sqlite3") in info.value.message
    assert info.value.code == "usage"


async def test_not_a_database_is_refused_naming_the_path(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    path = tmp_path / "state" / "state.sqlite3"
    path.write_bytes(b"this is a report, not a database\n" * 200)
    with pytest.raises(UsageError, match="not a SQLite database") as info:
        await reopen(tmp_path)
    assert str(path) in info.value.message
    assert path.read_bytes().startswith(b"this is a report")  # left untouched


async def test_uncreatable_state_dir_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="cannot create the state dir"):
        await SqliteStore.open(tmp_path / "file" / "state")


# ------------------------------------------------------------------------------ records


async def test_every_field_round_trips_exactly(store: SqliteStore, tmp_path: Path) -> None:
    before = time.time()
    await store.save(FULL)
    await store.save(SPARSE)
    after = time.time()
    assert await store.load(FULL.key) == FULL
    assert await store.load(SPARSE.key) == SPARSE
    loaded = await store.load(FULL.key)
    assert loaded is not None and loaded.state is JobState.FAILED
    assert await store.load("0" * 64) is None
    await store.close()

    async with await reopen(tmp_path) as again:
        assert await again.load(FULL.key) == FULL
        assert await again.load(SPARSE.key) == SPARSE
    rows = sql(tmp_path, "SELECT state, updated_at FROM jobs ORDER BY key")
    assert {row[0] for row in rows} == {"failed", "queued"}  # the string value, not the enum's repr
    assert all(before <= float(str(row[1])) <= after for row in rows)  # epoch seconds


async def test_every_state_round_trips(store: SqliteStore) -> None:
    for n, state in enumerate(JobState):
        await store.save(rec(n, state=state))
    for n, state in enumerate(JobState):
        loaded = await store.load(rec(n).key)
        assert loaded is not None and loaded.state is state


def test_records_hold_nothing_url_like() -> None:
    assert not [f.name for f in dataclasses.fields(JobRecord) if "url" in f.name.lower()]


async def test_save_replaces_the_record_with_its_key(store: SqliteStore) -> None:
    await store.save(rec(1))
    await store.save(rec(1, state=JobState.REQUESTING, attempts=1))
    assert await store.load(rec(1).key) == rec(1, state=JobState.REQUESTING, attempts=1)
    assert len(await store.all_records()) == 1


async def test_load_many_returns_twenty_thousand_records(store: SqliteStore) -> None:
    total = 20_000

    async def writer(first: int) -> None:
        for n in range(first, total, 200):
            await store.save(rec(n))

    async with anyio.create_task_group() as tg:
        for first in range(200):
            tg.start_soon(writer, first)

    keys = [rec(n).key for n in range(total)]
    missing = [rec(f"absent-{n}").key for n in range(100)]
    started = time.perf_counter()
    found = await store.load_many([*keys, *missing, *keys[:50]])  # duplicates are harmless
    elapsed = time.perf_counter() - started
    assert len(found) == total
    assert found[keys[12_345]] == rec(12_345)
    assert not set(missing) & found.keys()
    assert elapsed < 10  # ~0.2 s here: chunked IN queries, no per-key round trip
    assert await store.load_many([]) == {}
    assert len(await store.all_records()) == total


async def test_all_records_is_ordered_by_relpath(store: SqliteStore) -> None:
    for n in (3, 1, 2):
        await store.save(rec(n))
    assert [r.relpath for r in await store.all_records()] == [rec(n).relpath for n in (1, 2, 3)]


# ------------------------------------------------------------------------------ group commit


async def test_concurrent_saves_share_commits_and_are_durable(
    store: SqliteStore, tmp_path: Path
) -> None:
    count = 500
    before = store.commits
    async with anyio.create_task_group() as tg:
        for n in range(count):
            tg.start_soon(store.save, rec(n, attempts=n))
    commits = store.commits - before
    assert store.saves == count
    assert 1 <= commits <= 5  # 1 measured: every save joined the first batch
    await store.close()

    async with await reopen(tmp_path) as again:
        found = await again.load_many(rec(n).key for n in range(count))
    assert found == {rec(n).key: rec(n, attempts=n) for n in range(count)}


async def test_repeated_saves_from_many_tasks_batch_per_round(store: SqliteStore) -> None:
    workers, rounds = 100, 20

    async def worker(n: int) -> None:
        for attempt in range(rounds):
            await store.save(rec(n, attempts=attempt))

    async with anyio.create_task_group() as tg:
        for n in range(workers):
            tg.start_soon(worker, n)
    assert store.saves == workers * rounds
    assert store.commits <= 2 * rounds  # ~one commit per round, not one per save
    assert all(r.attempts == rounds - 1 for r in await store.all_records())


async def test_last_write_wins_within_a_batch(store: SqliteStore) -> None:
    async with anyio.create_task_group() as tg:
        for attempts in range(50):
            tg.start_soon(store.save, rec(7, attempts=attempts))
    assert store.commits <= 2
    assert await store.load(rec(7).key) == rec(7, attempts=49)


async def test_leader_cancelled_mid_commit_does_not_strand_waiters(
    store: SqliteStore, tmp_path: Path
) -> None:
    # Another connection holds the write lock, so the leader's commit waits (busy timeout).
    with closing(
        sqlite3.connect(tmp_path / "state" / "state.sqlite3", isolation_level=None)
    ) as other:
        other.execute("BEGIN IMMEDIATE")
        leader_scope = anyio.CancelScope()
        waiter_scopes = [anyio.CancelScope() for _ in range(20)]
        finished: list[int] = []

        async def leader() -> None:
            with leader_scope:
                await store.save(rec(0))

        async def waiter(n: int) -> None:
            with waiter_scopes[n]:
                await store.save(rec(n + 1))
                finished.append(n)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(leader)
                await wait_until(lambda: store._inflight is not None)  # batch taken, commit waits
                for n in range(20):
                    tg.start_soon(waiter, n)
                await wait_until(lambda: len(store._open_batch.records) == 20)
                leader_scope.cancel()
                for scope in waiter_scopes[:5]:  # the first in line to take over, too
                    scope.cancel()
                await anyio.lowlevel.checkpoint()
                other.execute("COMMIT")  # let the leader's commit through

    assert sorted(finished) == list(range(5, 20))
    found = await store.load_many(rec(n).key for n in range(21))
    # The leader's batch was taken, so it was written to the end despite the cancellation;
    # cancelled waiters may still have their record committed (it was already queued).
    assert rec(0).key in found
    assert {rec(n + 1).key for n in range(5, 20)} <= found.keys()


async def test_leader_cancelled_before_taking_the_batch_hands_it_over(
    store: SqliteStore,
) -> None:
    leader_scope = anyio.CancelScope()
    finished: list[int] = []

    async def leader() -> None:
        with leader_scope:
            await store.save(rec(0))

    async def waiter(n: int) -> None:
        await store.save(rec(n))
        finished.append(n)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            async with store._lock:  # e.g. a run record being written: the leader queues for it
                tg.start_soon(leader)
                await wait_until(lambda: store._leading)
                for n in range(1, 11):
                    tg.start_soon(waiter, n)
                await wait_until(lambda: len(store._open_batch.records) == 11)
                leader_scope.cancel()
                await wait_until(lambda: not store._leading)  # the leader stepped down...
                await wait_until(lambda: store._leading)  # ...and a waiter took over
            # lock released: the new leader commits the whole batch

    assert leader_scope.cancelled_caught
    assert sorted(finished) == list(range(1, 11))
    assert store.commits == 1
    assert len(await store.load_many(rec(n).key for n in range(11))) == 11


async def test_failed_commit_fails_every_waiter_of_the_batch(store: SqliteStore) -> None:
    await store.save(rec(0))
    ((pages,),) = await store._db.execute_fetchall("PRAGMA page_count")
    await store._db.execute(f"PRAGMA max_page_count = {pages}")  # the "disk" is now full
    errors: dict[str, BaseException] = {}

    async def saver(n: int) -> None:
        record = rec(n, error_message="x" * 20_000)
        try:
            await store.save(record)
        except LocalIOError as exc:
            errors[record.key] = exc

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for n in range(1, 41):
                tg.start_soon(saver, n)

    assert len(errors) == 40
    for key, exc in errors.items():
        assert isinstance(exc, LocalIOError)
        assert exc.code == "state_store"
        assert exc.job_key == key
        assert "full" in exc.message
        assert isinstance(exc.__cause__, sqlite3.OperationalError)
    assert await store.load(rec(1).key) is None  # rolled back

    await store._db.execute("PRAGMA max_page_count = 1073741823")  # space again: store still works
    await store.save(rec(1))
    assert await store.load(rec(1).key) == rec(1)


async def test_save_after_close_is_an_error(tmp_path: Path) -> None:
    s = await reopen(tmp_path)
    await s.close()
    await s.close()  # harmless
    with pytest.raises(LocalIOError, match="closed") as info:
        await s.save(rec(1))
    assert info.value.code == "state_store"
    with pytest.raises(LocalIOError, match="closed"):
        await s.load(rec(1).key)


KILL_SNIPPET = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import anyio

    from batch_export.lifecycle import JobState
    from batch_export.store import JobRecord, SqliteStore


    async def main() -> None:
        store = await SqliteStore.open(Path(sys.argv[1]))

        async def saver(worker: int) -> None:
            for n in range(1_000_000):
                key = f"w{worker}-{n}"
                record = JobRecord(key, "aoi", "ins", key, key + ".zip", JobState.DONE, bytes=n)
                await store.save(record)
                print(key, flush=True)  # only after save returned

        async with anyio.create_task_group() as tg:
            for worker in range(8):
                tg.start_soon(saver, worker)


    anyio.run(main)
    """
)


async def test_saved_records_survive_sigkill(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with subprocess.Popen(
        [sys.executable, "-c", KILL_SNIPPET, str(state)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        watchdog = threading.Timer(60, proc.kill)  # never hang the suite on a stuck child
        watchdog.start()
        try:
            printed: list[str] = []
            for line in proc.stdout:
                printed.append(line)
                if len(printed) >= 400:
                    break
            proc.send_signal(signal.SIGKILL)  # right after the 400th save returned
            proc.wait(timeout=30)
            printed.append(proc.stdout.read())  # lines already in the pipe when it died
            stderr = proc.stderr.read()
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == -signal.SIGKILL, stderr
    keys = [line for line in "".join(printed).split("\n")[:-1] if line]  # complete lines only
    assert len(keys) >= 400, stderr
    assert (state / "state.sqlite3-wal").exists()  # it died without checkpointing

    async with await SqliteStore.open(state) as after:
        found = await after.load_many(keys)
    assert sorted(found) == sorted(keys)
    assert all(r.state is JobState.DONE for r in found.values())


# ------------------------------------------------------------------------------ runs, both stores


@pytest.fixture(params=["memory", "sqlite"])
async def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[JobStore]:
    s: JobStore = MemoryStore() if request.param == "memory" else await reopen(tmp_path)
    try:
        yield s
    finally:
        await s.close()


async def test_run_start_and_end_round_trip(any_store: JobStore) -> None:
    await any_store.record_run_start("run-a", 1_700_000_000.25, 4242)
    await any_store.record_run_start("run-b", 1_700_000_100.5, 4343)
    await any_store.record_run_end(
        "run-a", 1_700_000_050.75, 1, {"total": 3, "downloaded": 1, "skipped": 1, "failed": 1}
    )
    assert await any_store.last_runs(10) == [
        {
            "run_id": "run-b",
            "started_at": 1_700_000_100.5,
            "finished_at": None,  # crashed, or still running
            "exit_code": None,
            "counts": None,
            "pid": 4343,
        },
        {
            "run_id": "run-a",
            "started_at": 1_700_000_000.25,
            "finished_at": 1_700_000_050.75,
            "exit_code": 1,
            "counts": {"total": 3, "downloaded": 1, "skipped": 1, "failed": 1},
            "pid": 4242,
        },
    ]
    assert [run["run_id"] for run in await any_store.last_runs(1)] == ["run-b"]
    assert await any_store.last_runs(0) == []
    with pytest.raises(KeyError):
        await any_store.record_run_end("never-started", 1.0, 0, {})


async def test_runs_survive_reopen(tmp_path: Path) -> None:
    async with await reopen(tmp_path) as s:
        await s.record_run_start("r1", 10.0, 1)
        await s.record_run_end("r1", 20.0, 0, {"total": 0})
    async with await reopen(tmp_path) as s:
        assert await s.last_runs(5) == [
            {
                "run_id": "r1",
                "started_at": 10.0,
                "finished_at": 20.0,
                "exit_code": 0,
                "counts": {"total": 0},
                "pid": 1,
            }
        ]


async def test_protocol_behaves_alike(any_store: JobStore) -> None:
    for n in (3, 1, 2):
        await any_store.save(rec(n))
    await any_store.save(rec(2, attempts=5))
    assert await any_store.load(rec(2).key) == rec(2, attempts=5)
    assert await any_store.load("missing") is None
    assert await any_store.load_many([rec(1).key, "missing", rec(3).key]) == {
        rec(1).key: rec(1),
        rec(3).key: rec(3),
    }
    assert [r.key for r in await any_store.all_records()] == [rec(n).key for n in (1, 2, 3)]


async def test_segment_progress_round_trips_and_is_forgotten(any_store: JobStore) -> None:
    key = "s" * 64
    assert await any_store.load_segments(key) is None
    state = SegmentState(100 * 1024 * 1024, ((0, 3 << 20), (8 << 20, 9 << 20)))
    await any_store.save_segments(key, state)
    assert await any_store.load_segments(key) == state
    await any_store.save_segments(key, SegmentState(state.total))
    assert await any_store.load_segments(key) == SegmentState(state.total)
    await any_store.save_segments(key, None)
    assert await any_store.load_segments(key) is None


async def test_segment_progress_survives_reopening(tmp_path: Path) -> None:
    store = await reopen(tmp_path)
    state = SegmentState(10, ((0, 4), (6, 10)))
    await store.save_segments("k" * 64, state)
    await store.close()
    store = await reopen(tmp_path)
    try:
        assert await store.load_segments("k" * 64) == state
    finally:
        await store.close()


async def test_a_full_disk_says_what_to_free(store: SqliteStore, tmp_path: Path) -> None:
    # A full state-dir disk left every later run at exit 2 with "database or disk is full" and
    # nothing more: the operator was not told that the .part files filling it may be removed.
    await store.save(rec(0))
    ((pages,),) = await store._db.execute_fetchall("PRAGMA page_count")
    await store._db.execute(f"PRAGMA max_page_count = {pages}")  # the "disk" is now full
    with pytest.raises(LocalIOError) as info:
        await store.record_run_start("r" * 2000, 1.0, 1)  # the start-up write (exit 2 if refused)
    with pytest.raises(LocalIOError) as batch:
        await store.save(rec(1, error_message="x" * 20_000))  # a group commit mid-run
    for exc in (info.value, batch.value):
        assert exc.code == "state_store"
        assert re.fullmatch(
            rf"the state store {re.escape(str(tmp_path / 'state' / 'state.sqlite3'))} could not "
            r"commit: the disk holding it is full \(\d+(\.\d)? [kMGT]?i?B free\); free space there "
            r"\(the \.part files of unfinished downloads may be deleted: they are downloaded "
            r"again\)",
            exc.message,
        ), exc.message
