"""The state store seam: where job records live between steps (and, durably, between runs).

Every transition the runner makes is saved through :class:`JobStore` before the next step starts.
:class:`SqliteStore` is the durable one (SPEC §5): one SQLite file per state dir, in WAL mode, driven
through ``aiosqlite`` so that the connection lives on its own dedicated thread. Saves from many jobs
share commits (*group commit*): records saved while a commit is in progress go together into the next
transaction, and each ``save`` returns only once its record is committed. :class:`MemoryStore` keeps
everything in memory (tests, ``--dry-run``).

Nothing secret is stored: a :class:`JobRecord` has no URL field and never holds the API key.
"""

from __future__ import annotations

import json
import operator
import shutil
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Protocol, TypedDict

import aiosqlite
import anyio

from batch_export.errors import LocalIOError, UsageError
from batch_export.pace import human_size
from batch_export.segments import SegmentState
from batch_export.types import STATE_FILE, JobRecord, JobState

__all__ = ["SCHEMA_VERSION", "JobRecord", "JobStore", "MemoryStore", "RunInfo", "SqliteStore"]


class RunInfo(TypedDict):
    """One run, as :meth:`JobStore.last_runs` lists it.

    Keys:
        run_id: the run's id (also the report's file name).
        started_at: when it started (epoch seconds).
        finished_at: when it ended (epoch seconds), or ``None`` if it never recorded an end (crash).
        exit_code: its exit code, or ``None`` likewise.
        counts: outcome counts (``{"total": 3, "downloaded": 1, ...}``), or ``None`` likewise.
        pid: the process id that ran it.
    """

    run_id: str
    started_at: float
    finished_at: float | None
    exit_code: int | None
    counts: dict[str, int] | None
    pid: int


class JobStore(Protocol):
    """Where job records are kept. ``save`` returns only once the record is committed."""

    async def load(self, key: str) -> JobRecord | None:
        """Return the stored record for ``key``, if any."""
        ...

    async def load_many(self, keys: Iterable[str]) -> dict[str, JobRecord]:
        """Return the stored records among ``keys``, by key (absent keys are left out)."""
        ...

    async def all_records(self) -> list[JobRecord]:
        """Return every stored record, ordered by ``relpath`` then ``key``."""
        ...

    async def save(self, record: JobRecord) -> None:
        """Commit ``record`` (replacing the one with its key)."""
        ...

    async def load_segments(self, key: str) -> SegmentState | None:
        """Return the segment progress of job ``key``'s ``.part``, if any is stored."""
        ...

    async def save_segments(self, key: str, state: SegmentState | None) -> None:
        """Commit the segment progress of job ``key`` (``None``: forget it)."""
        ...

    async def record_run_start(self, run_id: str, started_at: float, pid: int) -> None:
        """Record that run ``run_id`` started at ``started_at`` (epoch seconds) in process ``pid``."""
        ...

    async def record_run_end(
        self, run_id: str, finished_at: float, exit_code: int, counts: dict[str, int]
    ) -> None:
        """Record how run ``run_id`` ended (``finished_at`` in epoch seconds)."""
        ...

    async def last_runs(self, limit: int) -> list[RunInfo]:
        """Return up to ``limit`` runs, the most recently started first."""
        ...

    async def close(self) -> None:
        """Release resources; further calls are errors."""
        ...


class MemoryStore:
    """A :class:`JobStore` in memory: nothing survives the process (tests, ``--dry-run``).

    Attributes:
        records: the records, by key.
        runs: the runs, in the order they started.
        saves: how many times :meth:`save` was called.
        segments: segment progress, by job key.
    """

    def __init__(self) -> None:
        self.records: dict[str, JobRecord] = {}
        self.runs: list[RunInfo] = []
        self.saves = 0
        self.segments: dict[str, SegmentState] = {}

    async def load_segments(self, key: str) -> SegmentState | None:
        """Return the segment progress of job ``key``, if any."""
        return self.segments.get(key)

    async def save_segments(self, key: str, state: SegmentState | None) -> None:
        """Keep (or, for ``None``, forget) the segment progress of job ``key``."""
        if state is None:
            self.segments.pop(key, None)
        else:
            self.segments[key] = state

    async def load(self, key: str) -> JobRecord | None:
        """Return the record for ``key``, if any."""
        return self.records.get(key)

    async def load_many(self, keys: Iterable[str]) -> dict[str, JobRecord]:
        """Return the records among ``keys``, by key (absent keys are left out)."""
        return {key: self.records[key] for key in keys if key in self.records}

    async def all_records(self) -> list[JobRecord]:
        """Return every record, ordered by ``relpath`` then ``key``."""
        return sorted(self.records.values(), key=lambda r: (r.relpath, r.key))

    async def save(self, record: JobRecord) -> None:
        """Keep ``record``."""
        self.records[record.key] = record
        self.saves += 1

    async def record_run_start(self, run_id: str, started_at: float, pid: int) -> None:
        """Keep the start of run ``run_id`` (``started_at`` in epoch seconds)."""
        self.runs.append(
            RunInfo(
                run_id=run_id,
                started_at=started_at,
                finished_at=None,
                exit_code=None,
                counts=None,
                pid=pid,
            )
        )

    async def record_run_end(
        self, run_id: str, finished_at: float, exit_code: int, counts: dict[str, int]
    ) -> None:
        """Keep the end of run ``run_id`` (``finished_at`` in epoch seconds).

        Raises:
            KeyError: no run ``run_id`` was started.
        """
        for run in self.runs:
            if run["run_id"] == run_id:
                run["finished_at"] = finished_at
                run["exit_code"] = exit_code
                run["counts"] = dict(counts)
                return
        raise KeyError(run_id)

    async def last_runs(self, limit: int) -> list[RunInfo]:
        """Return up to ``limit`` runs, the most recently started first."""
        ordered = sorted(self.runs, key=lambda run: run["started_at"], reverse=True)
        return [RunInfo(**run) for run in ordered[: max(limit, 0)]]

    async def close(self) -> None:
        """Nothing to release."""


# --------------------------------------------------------------------------------------- SQLite

#: Schema migrations, in order: migration ``i`` takes ``PRAGMA user_version`` from ``i`` to ``i + 1``.
#: Each runs in one transaction. Never edit a released migration; append a new one. A field added to
#: :class:`JobRecord` needs a migration adding its column (``tests/test_store.py`` checks this).
_MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """
        CREATE TABLE jobs (
            key               TEXT PRIMARY KEY,
            aoi_id            TEXT NOT NULL,
            insight_id        TEXT NOT NULL,
            name              TEXT NOT NULL,
            relpath           TEXT NOT NULL,
            state             TEXT NOT NULL,
            attempts          INTEGER NOT NULL,
            polls             INTEGER NOT NULL,
            part_etag         TEXT,
            bytes             INTEGER,
            sha256            TEXT,
            error_code        TEXT,
            error_message     TEXT,
            error_http_status INTEGER,
            updated_at        REAL NOT NULL
        ) WITHOUT ROWID
        """,
        """
        CREATE TABLE runs (
            run_id      TEXT PRIMARY KEY,
            started_at  REAL NOT NULL,
            finished_at REAL,
            exit_code   INTEGER,
            counts      TEXT,
            pid         INTEGER
        )
        """,
        "CREATE INDEX runs_started_at ON runs (started_at)",
    ),
    (
        # Segmented downloads (SPEC §4): which byte ranges of a job's .part are on disk.
        """
        CREATE TABLE segments (
            key   TEXT PRIMARY KEY,
            total INTEGER NOT NULL,
            done  TEXT NOT NULL
        ) WITHOUT ROWID
        """,
    ),
    (
        # Abandoned jobs (SPEC §9): consecutive runs failing with the same permanent code.
        "ALTER TABLE jobs ADD COLUMN failure_runs INTEGER NOT NULL DEFAULT 0",
    ),
)
#: The schema version this code writes (``PRAGMA user_version``).
SCHEMA_VERSION: Final = len(_MIGRATIONS)

_FIELDS: Final = tuple(f.name for f in fields(JobRecord))
_STATE_INDEX: Final = _FIELDS.index("state")
_record_values = operator.attrgetter(*_FIELDS)
_SELECT_JOBS: Final = f"SELECT {', '.join(_FIELDS)} FROM jobs"
_UPSERT_JOB: Final = (
    f"INSERT INTO jobs ({', '.join(_FIELDS)}, updated_at) "
    f"VALUES ({', '.join('?' * (len(_FIELDS) + 1))}) "
    f"ON CONFLICT (key) DO UPDATE SET "
    + ", ".join(f"{name} = excluded.{name}" for name in (*_FIELDS[1:], "updated_at"))
)
#: Keys per ``IN (...)`` query in :meth:`SqliteStore.load_many` (SQLite's bound-parameter limit is
#: 999 before 3.32, 32766 since).
_IN_CHUNK: Final = 500
#: Default time (seconds) a statement waits for another connection's lock before failing.
DEFAULT_BUSY_TIMEOUT: Final = 5.0


def _row_to_record(row: Iterable[Any]) -> JobRecord:
    values = list(row)
    values[_STATE_INDEX] = JobState(values[_STATE_INDEX])
    return JobRecord(*values)


def _record_to_row(record: JobRecord, updated_at: float) -> tuple[Any, ...]:
    values: tuple[Any, ...] = _record_values(record)
    return (*values[:_STATE_INDEX], record.state.value, *values[_STATE_INDEX + 1 :], updated_at)


@dataclass(eq=False)
class _Batch:
    """Records waiting for one shared commit, and the news of how it went.

    ``wake`` is set when the batch is finished, and also when a leader steps down while this batch
    still waits for a flush (then it is replaced by a fresh event, so one waiter takes over).
    """

    records: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    wake: anyio.Event = field(default_factory=anyio.Event)
    finished: bool = False
    error: str | None = None
    cause: BaseException | None = None

    def finish(self, error: str | None = None, cause: BaseException | None = None) -> None:
        self.finished = True
        self.error = error
        self.cause = cause
        self.wake.set()

    def hand_over(self) -> None:
        self.wake.set()
        self.wake = anyio.Event()


class SqliteStore:
    """A durable :class:`JobStore`: ``<state-dir>/state.sqlite3``, in WAL mode (SPEC §5).

    Open it with :meth:`open`; close it with :meth:`close` (or use ``async with``). One connection,
    on ``aiosqlite``'s dedicated thread; every statement on it is serialized by an internal lock, so
    a read never sees a batch that is not yet committed.

    Group commit: :meth:`save` queues its record in the open batch; if no commit is in progress the
    caller becomes the *leader*, takes the batch and commits it in one transaction (one
    ``executemany`` upsert, one ``COMMIT``); otherwise it waits. When the leader's batch is
    committed, every waiter of that batch returns, and if more records were queued meanwhile, the
    leader hands the next batch over to one of its waiters. Within a batch the last save of a key
    wins.

    Cancellation: a batch once taken is always written to the end (the write is shielded, which
    delays a cancelled leader by at most one commit, bounded by the busy timeout); a leader cancelled
    before taking its batch hands it to a waiter. A cancelled ``save`` may still commit its record.

    Attributes:
        path: the database file.
        commits: transactions committed by group commit so far (for tests and statistics).
        saves: calls to :meth:`save` so far.
    """

    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        """Wrap an open, migrated connection; use :meth:`open` instead."""
        self._db = db
        self.path = path
        self.commits = 0
        self.saves = 0
        self._lock = anyio.Lock()
        self._open_batch = _Batch()
        self._inflight: _Batch | None = None
        self._leading = False
        self._closing = False
        self._closed = False

    # ------------------------------------------------------------------------------ opening

    @classmethod
    async def open(
        cls, state_dir: Path, *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT
    ) -> SqliteStore:
        """Open (creating if needed) the store in ``state_dir`` and bring its schema up to date.

        Args:
            state_dir: the state dir; created with its parents if missing. Must be on a local file
                system (SQLite's WAL needs shared memory that network file systems lack).
            busy_timeout: how long (seconds) a statement waits for another connection's lock.

        Returns:
            The open store.

        Raises:
            UsageError: the state dir cannot be created, the file is not a SQLite database (or is
                damaged), it or one of its journal files is a symlink, it cannot be opened or put in
                WAL mode, or it was written by a newer batch-export.
        """
        try:
            await anyio.Path(state_dir).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(
                f"cannot create the state dir {state_dir}: {exc.strerror or exc}"
            ) from exc
        path = state_dir / STATE_FILE
        for name in (STATE_FILE, f"{STATE_FILE}-wal", f"{STATE_FILE}-shm", f"{STATE_FILE}-journal"):
            if (state_dir / name).is_symlink():  # SQLite would write through it, outside the dir
                raise UsageError(f"{state_dir / name} is a symlink; refusing to use it (remove it)")
        try:
            # isolation_level=None: no implicit transactions; we BEGIN and COMMIT ourselves.
            db = await aiosqlite.connect(path, isolation_level=None)
        except sqlite3.Error as exc:
            raise _open_error(path, exc) from exc
        try:
            await _configure(db, path, busy_timeout)
            await _migrate(db, path)
            await _check_integrity(db, path)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await db.close()
            if isinstance(exc, sqlite3.Error):
                raise _open_error(path, exc) from exc
            raise
        return cls(db, path)

    async def __aenter__(self) -> SqliteStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ------------------------------------------------------------------------------ reading

    async def load(self, key: str) -> JobRecord | None:
        """Return the committed record for ``key``, if any.

        Raises:
            LocalIOError: the store is closed or the read failed (code ``"state_store"``).
        """
        rows = await self._read(f"{_SELECT_JOBS} WHERE key = ?", (key,))
        return _row_to_record(rows[0]) if rows else None

    async def load_many(self, keys: Iterable[str]) -> dict[str, JobRecord]:
        """Return the committed records among ``keys``, by key (absent keys are left out).

        One query per 500 distinct keys (no per-key round trip): 100,000 keys take well under a
        second.

        Raises:
            LocalIOError: the store is closed or the read failed (code ``"state_store"``).
        """
        wanted = list(dict.fromkeys(keys))
        found: dict[str, JobRecord] = {}
        async with self._lock:
            self._check_open()
            for start in range(0, len(wanted), _IN_CHUNK):
                chunk = wanted[start : start + _IN_CHUNK]
                sql = f"{_SELECT_JOBS} WHERE key IN ({', '.join('?' * len(chunk))})"
                for row in await self._fetchall(sql, chunk):
                    record = _row_to_record(row)
                    found[record.key] = record
        return found

    async def all_records(self) -> list[JobRecord]:
        """Return every committed record, ordered by ``relpath`` then ``key`` (for ``status``).

        Raises:
            LocalIOError: the store is closed or the read failed (code ``"state_store"``).
        """
        rows = await self._read(f"{_SELECT_JOBS} ORDER BY relpath, key")
        return [_row_to_record(row) for row in rows]

    async def last_runs(self, limit: int) -> list[RunInfo]:
        """Return up to ``limit`` runs, the most recently started first.

        Raises:
            LocalIOError: the store is closed or the read failed (code ``"state_store"``).
        """
        rows = await self._read(
            "SELECT run_id, started_at, finished_at, exit_code, counts, pid FROM runs "
            "ORDER BY started_at DESC, rowid DESC LIMIT ?",
            (max(limit, 0),),
        )
        return [
            RunInfo(
                run_id=run_id,
                started_at=started_at,
                finished_at=finished_at,
                exit_code=exit_code,
                counts=None if counts is None else json.loads(counts),
                pid=pid,
            )
            for run_id, started_at, finished_at, exit_code, counts, pid in rows
        ]

    # ------------------------------------------------------------------------------ writing

    async def save(self, record: JobRecord) -> None:
        """Commit ``record`` (replacing the one with its key); return once it is committed.

        Concurrent saves share commits (see the class docstring). ``updated_at`` is the time of
        this call (epoch seconds).

        Raises:
            LocalIOError: the commit of the batch holding ``record`` failed (disk full, I/O error,
                lock held past the busy timeout), or the store is closed; code ``"state_store"``,
                ``job_key`` is ``record.key``. The record may or may not be stored then.
        """
        if self._closing:
            raise _closed_error(record.key)
        self.saves += 1
        batch = self._open_batch
        batch.records[record.key] = _record_to_row(record, time.time())
        await self._settle(batch)
        if batch.error is not None:
            raise LocalIOError(batch.error, code="state_store", job_key=record.key) from batch.cause

    async def load_segments(self, key: str) -> SegmentState | None:
        """Return the segment progress of job ``key``'s ``.part``, if any is stored.

        Raises:
            LocalIOError: the store is closed or the read failed (code ``"state_store"``).
        """
        rows = await self._read("SELECT total, done FROM segments WHERE key = ?", (key,))
        if not rows:
            return None
        total, done = rows[0]
        try:
            ranges = tuple((int(a), int(b)) for a, b in json.loads(done))
        except (ValueError, TypeError):
            return None  # unreadable: fetch the package again rather than trust it
        return SegmentState(int(total), ranges)

    async def save_segments(self, key: str, state: SegmentState | None) -> None:
        """Commit the segment progress of job ``key`` (``None``: forget it).

        Raises:
            LocalIOError: the store is closed or the commit failed (code ``"state_store"``).
        """
        if state is None:
            await self._write("DELETE FROM segments WHERE key = ?", (key,))
            return
        await self._write(
            "INSERT INTO segments (key, total, done) VALUES (?, ?, ?) "
            "ON CONFLICT (key) DO UPDATE SET total = excluded.total, done = excluded.done",
            (key, state.total, json.dumps(state.done, separators=(",", ":"))),
        )

    async def record_run_start(self, run_id: str, started_at: float, pid: int) -> None:
        """Commit the start of run ``run_id``.

        Args:
            run_id: the run's id.
            started_at: when it started (epoch seconds).
            pid: the process running it.

        Raises:
            LocalIOError: the store is closed or the commit failed (code ``"state_store"``).
        """
        await self._write(
            "INSERT INTO runs (run_id, started_at, pid) VALUES (?, ?, ?)",
            (run_id, started_at, pid),
        )

    async def record_run_end(
        self, run_id: str, finished_at: float, exit_code: int, counts: dict[str, int]
    ) -> None:
        """Commit how run ``run_id`` ended.

        Args:
            run_id: the run's id, as given to :meth:`record_run_start`.
            finished_at: when it ended (epoch seconds).
            exit_code: the process exit code.
            counts: outcome counts, stored as JSON.

        Raises:
            KeyError: no run ``run_id`` was started.
            LocalIOError: the store is closed or the commit failed (code ``"state_store"``).
        """
        changed = await self._write(
            "UPDATE runs SET finished_at = ?, exit_code = ?, counts = ? WHERE run_id = ?",
            (finished_at, exit_code, json.dumps(counts, sort_keys=True), run_id),
        )
        if changed == 0:
            raise KeyError(run_id)

    async def close(self) -> None:
        """Commit the saves still queued, then close the connection. Closing twice is harmless.

        A queued batch whose commit fails reports to its savers, not here.

        Raises:
            LocalIOError: closing the connection failed (code ``"state_store"``).
        """
        if self._closed:
            return
        self._closing = True
        try:
            while True:
                if self._inflight is not None:
                    batch = self._inflight
                elif self._open_batch.records:
                    batch = self._open_batch
                else:
                    break
                await self._settle(batch)
        finally:
            with anyio.CancelScope(shield=True):
                async with self._lock:
                    self._closed = True
                    try:
                        await self._db.close()
                    except sqlite3.Error as exc:
                        raise LocalIOError(
                            f"closing the state store {self.path} failed: {exc}", code="state_store"
                        ) from exc

    # ------------------------------------------------------------------------------ group commit

    async def _settle(self, batch: _Batch) -> None:
        """Return once ``batch`` is finished, leading the flush whenever nobody else does."""
        while not batch.finished:
            if self._leading:
                await batch.wake.wait()
            else:
                await self._lead()

    async def _lead(self) -> None:
        """Take the open batch and commit it; then hand the next batch, if any, to its waiters."""
        self._leading = True
        try:
            async with self._lock:  # cancellable: nothing is taken yet
                batch = self._open_batch
                self._open_batch = _Batch()
                self._inflight = batch
                with anyio.CancelScope(shield=True):
                    await self._commit_batch(batch)
        finally:
            self._inflight = None
            self._leading = False
            if self._open_batch.records:
                self._open_batch.hand_over()

    async def _commit_batch(self, batch: _Batch) -> None:
        """Upsert ``batch`` in one transaction; always finish it (with an error if it failed)."""
        try:
            if self._closed:
                batch.finish(f"the state store {self.path} is closed")
                return
            if not batch.records:
                batch.finish()
                return
            await self._rollback_quietly()  # never build on a transaction an interruption left open
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                await self._db.executemany(_UPSERT_JOB, batch.records.values())
                await self._db.commit()
            except BaseException:
                await self._rollback_quietly()
                raise
        except sqlite3.Error as exc:
            batch.finish(_commit_failed(self.path, exc), exc)
        else:
            self.commits += 1
            batch.finish()
        finally:
            if not batch.finished:
                batch.finish(f"the commit to the state store {self.path} was interrupted")

    async def _rollback_quietly(self) -> None:
        try:
            if self._db.in_transaction:
                await self._db.rollback()
        except sqlite3.Error:
            pass  # the original error is the one worth reporting

    # ------------------------------------------------------------------------------ plumbing

    def _check_open(self) -> None:
        if self._closed:
            raise _closed_error(None)

    async def _fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        """Run a query (the caller holds the lock), translating SQLite errors."""
        try:
            return list(await self._db.execute_fetchall(sql, params))
        except sqlite3.Error as exc:
            raise LocalIOError(
                f"reading the state store {self.path} failed: {exc}", code="state_store"
            ) from exc

    async def _read(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        async with self._lock:
            self._check_open()
            return await self._fetchall(sql, params)

    async def _write(self, sql: str, params: Iterable[Any]) -> int:
        """Run one statement in its own committed transaction; return the rows it changed."""
        changed = 0
        async with self._lock:
            self._check_open()
            with anyio.CancelScope(shield=True):
                try:
                    await self._rollback_quietly()
                    await self._db.execute("BEGIN IMMEDIATE")
                    try:
                        cursor = await self._db.execute(sql, params)
                        changed = cursor.rowcount
                        await self._db.commit()
                    except BaseException:
                        await self._rollback_quietly()
                        raise
                except sqlite3.Error as exc:
                    raise LocalIOError(_commit_failed(self.path, exc), code="state_store") from exc
        return changed


def _commit_failed(path: Path, exc: sqlite3.Error) -> str:
    """The one line for a commit that failed; a full disk says what to free (nothing else will)."""
    if getattr(exc, "sqlite_errorname", "") != "SQLITE_FULL":
        return f"the state store {path} could not commit: {exc}"
    try:
        free = human_size(shutil.disk_usage(path.parent).free)
    except OSError:
        free = "?"
    return (
        f"the state store {path} could not commit: the disk holding it is full ({free} free); "
        "free space there (the .part files of unfinished downloads may be deleted: they are "
        "downloaded again)"
    )


def _closed_error(job_key: str | None) -> LocalIOError:
    return LocalIOError("the state store is closed", code="state_store", job_key=job_key)


def _open_error(path: Path, exc: sqlite3.Error) -> UsageError:
    name = getattr(exc, "sqlite_errorname", "")
    if name == "SQLITE_NOTADB":
        return UsageError(f"{path} is not a SQLite database (is --state-dir right?)")
    if name == "SQLITE_CORRUPT":
        return _damaged(path, str(exc))
    return UsageError(f"cannot open the state store {path}: {exc}")


def _damaged(path: Path, detail: str) -> UsageError:
    return UsageError(
        f"the state store {path} is damaged ({' '.join(detail.split())[:200]}); restore a backup, "
        "or move it aside "
        "to start afresh (done jobs whose files are present are then downloaded again)"
    )


async def _check_integrity(db: aiosqlite.Connection, path: Path) -> None:
    """Refuse a damaged (e.g. truncated) database before anything is requested.

    ``PRAGMA quick_check`` reads every page once without checking indexes against tables (SQLite
    docs, "PRAGMA quick_check"): milliseconds for 100,000 jobs.

    Raises:
        UsageError: the check found damage.
    """
    rows = list(await db.execute_fetchall("PRAGMA quick_check(1)"))
    verdict = str(rows[0][0]) if rows else "no answer"
    if verdict != "ok":
        raise _damaged(path, verdict)


async def _configure(db: aiosqlite.Connection, path: Path, busy_timeout: float) -> None:
    """Set the connection's pragmas; raise :class:`UsageError` if WAL mode is refused."""
    await db.execute(f"PRAGMA busy_timeout = {max(0, round(busy_timeout * 1000))}")
    rows = list(await db.execute_fetchall("PRAGMA journal_mode = WAL"))
    mode = str(rows[0][0]).lower() if rows else ""
    if mode != "wal":
        raise UsageError(
            f"the state store {path} cannot use WAL mode (journal_mode is {mode or 'unknown'}); "
            "the state dir must be on a local file system"
        )
    # synchronous=NORMAL in WAL mode: COMMIT returns once the transaction is written to the WAL file
    # (in the OS page cache), without waiting for fsync. A committed transaction therefore survives
    # kill -9 of this process -- the failure we guard against (SPEC §5) -- and the database stays
    # consistent even on power loss; only a power cut or OS crash may lose the last commits.
    await db.execute("PRAGMA synchronous = NORMAL")
    await db.execute("PRAGMA foreign_keys = ON")


async def _user_version(db: aiosqlite.Connection) -> int:
    rows = list(await db.execute_fetchall("PRAGMA user_version"))
    return int(rows[0][0])


def _too_new(path: Path, version: int) -> UsageError:
    return UsageError(
        f"the state store {path} was written by a newer batch-export (schema version {version}; "
        f"this version knows up to {SCHEMA_VERSION}): upgrade batch-export or use another --state-dir"
    )


async def _migrate(db: aiosqlite.Connection, path: Path) -> None:
    """Apply the migrations the database lacks, one transaction each.

    Raises:
        UsageError: the database's schema version is newer than :data:`SCHEMA_VERSION`.
        sqlite3.Error: a migration failed (rolled back; the caller translates it).
    """
    version = await _user_version(db)
    if version > SCHEMA_VERSION:
        raise _too_new(path, version)
    while version < SCHEMA_VERSION:
        await db.execute("BEGIN IMMEDIATE")
        try:
            # Re-read under the write lock: another process may have migrated meanwhile.
            version = await _user_version(db)
            if version > SCHEMA_VERSION:
                raise _too_new(path, version)
            if version < SCHEMA_VERSION:
                for statement in _MIGRATIONS[version]:
                    await db.execute(statement)
                version += 1
                await db.execute(f"PRAGMA user_version = {version}")
            await db.commit()
        except BaseException:
            with anyio.CancelScope(shield=True):
                if db.in_transaction:
                    await db.rollback()
            raise
