"""The journal: where tokens, refresh intents and cross-process leases live durably.

:class:`SQLiteJournal` keeps them in one SQLite file (WAL, ``synchronous=FULL``,
``secure_delete``, schema in ``user_version``), all access through one aiosqlite connection,
every state change one ``BEGIN IMMEDIATE`` transaction. :class:`MemoryJournal` implements
the same :class:`Journal` protocol in memory, for tests and for users who opt out of disk.

The journal makes the invariants of design.md hold:

* a refresh token is replaced only in the transaction that stores its successor
  (:meth:`Journal.commit_refresh`, a compare-and-swap on the account's generation);
* an intent is written before a refresh token is sent, and cleared by that same commit;
* the lease row makes one process the refresher per account across processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import sqlite3
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final, Literal, Protocol, TypeVar, runtime_checkable

import aiosqlite

from ._errors import JournalError
from ._tokens import TokenSet, fingerprint, to_datetime

SCHEMA_VERSION: Final = 1
BUSY_TIMEOUT_MS: Final = 5000
IntentKind = Literal["refresh", "sign_out", "device_code"]
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Holder:
    """Who takes a lease: one per TokenManager, unique across processes and hosts."""

    id: str
    pid: int
    host: str

    @classmethod
    def for_this_process(cls) -> Holder:
        """A fresh holder for the current process."""
        return cls(
            f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}",
            os.getpid(),
            socket.gethostname(),
        )


@dataclass(frozen=True, slots=True)
class Intent:
    """A journaled operation that may have reached the server.

    ``refresh`` intents record the fingerprint of the refresh token that is (or may have
    been) sent and when: the server keeps a rotated token usable until ``started_at`` +
    grace, so recovery after a crash replays the same token inside that window.
    """

    kind: IntentKind
    refresh_fingerprint: str
    started_at: float
    generation: int
    payload: str | None = None


@dataclass(frozen=True, slots=True)
class Lease:
    """The cross-process single flight: the holder refreshes, everyone else waits."""

    holder: str
    pid: int
    host: str
    expires_at: float


@dataclass(frozen=True, slots=True)
class AccountRecord:
    """One account's row, as read in one transaction."""

    account: str
    tokens: TokenSet | None
    generation: int
    ended_code: str | None = None
    ended_at: float | None = None
    intent: Intent | None = None
    lease: Lease | None = None


@dataclass(frozen=True, slots=True)
class Started:
    """``begin_refresh`` took the lease; the intent is durable and the token may be sent."""

    intent: Intent


@dataclass(frozen=True, slots=True)
class Busy:
    """Another live holder has the lease: wait for its commit (or for the lease to lapse)."""

    lease: Lease


@dataclass(frozen=True, slots=True)
class Stale:
    """The journal moved on (another process committed): adopt ``record`` and decide again."""

    record: AccountRecord


BeginResult = Started | Busy | Stale


def pid_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists on this host (a dead lease holder can be skipped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lease_is_live(lease: Lease | None, holder: Holder, now: float) -> bool:
    """Whether ``lease`` belongs to someone else who may still be refreshing."""
    if lease is None or lease.holder == holder.id or lease.expires_at <= now:
        return False
    return not (lease.host == holder.host and not pid_alive(lease.pid))


@runtime_checkable
class Journal(Protocol):
    """Durable storage of tokens, intents and leases. Every method is one transaction."""

    @property
    def durable_commits(self) -> int:
        """Durable (fsynced) transactions so far: the cost of safety, for benchmarks."""
        ...

    async def open(self) -> None:
        """Open (and create or migrate) the journal."""
        ...

    async def close(self) -> None:
        """Close it; safe to call twice."""
        ...

    async def device_id(self) -> str:
        """The journal's device id: a UUID4 made once and kept."""
        ...

    async def accounts(self) -> list[str]:
        """Every account with a row."""
        ...

    async def load(self, account: str) -> AccountRecord:
        """The account's record (a blank one, generation 0, if it has none)."""
        ...

    async def store_tokens(self, account: str, tokens: TokenSet, now: float) -> int:
        """Sign-in: replace the pair, clear any end and intent; returns the new generation."""
        ...

    async def begin_refresh(
        self, account: str, holder: Holder, expected_generation: int, now: float, lease_ttl: float
    ) -> BeginResult:
        """Take the lease and write the refresh intent (kept if one is pending), durably."""
        ...

    async def renew_lease(self, account: str, holder: Holder, now: float, lease_ttl: float) -> bool:
        """Extend our lease before another try; ``False`` if it was lost."""
        ...

    async def commit_refresh(
        self, account: str, holder: Holder, expected_generation: int, tokens: TokenSet, now: float
    ) -> int | None:
        """Store the successor, clear the intent, release the lease: one durable transaction.

        Returns the new generation, or ``None`` when the generation moved (compare-and-swap
        failed: another process committed a newer pair, which stays).
        """
        ...

    async def release(self, account: str, holder: Holder) -> None:
        """Give up the lease. The intent stays: the token may have reached the server."""
        ...

    async def end_session(
        self, account: str, code: str, now: float, expected_generation: int | None = None
    ) -> int | None:
        """The server said the token is dead: clear the pair, record why and when.

        With ``expected_generation`` this is a compare-and-swap: if a newer pair was stored
        meanwhile (a sign-in, another process's refresh), the dead token was an old one, the
        newer pair stays, and ``None`` is returned.
        """
        ...

    async def begin_sign_out(self, account: str, now: float) -> None:
        """Journal a sign-out before the server is told, so a crash finishes it next start."""
        ...

    async def finish_sign_out(self, account: str, now: float) -> int:
        """Clear the pair and the intent after the server was told."""
        ...

    async def save_device_code(self, account: str, payload: str, now: float) -> None:
        """Journal a pending RFC 8628 device code, so a restart keeps polling it."""
        ...

    async def clear_device_code(self, account: str) -> None:
        """Forget the pending device code."""
        ...


# --------------------------------------------------------------------------- memory


class MemoryJournal:
    """A :class:`Journal` in memory: same rules, nothing on disk. For tests and opt-outs.

    Several managers in one process may share one instance (the lease works across them).
    """

    def __init__(self) -> None:
        self._records: dict[str, AccountRecord] = {}
        self._device_id = str(uuid.uuid4())
        self._commits = 0

    def __repr__(self) -> str:
        return f"MemoryJournal(accounts={len(self._records)})"

    @property
    def durable_commits(self) -> int:
        """Transactions that would have been durable (counted to keep the figures comparable)."""
        return self._commits

    async def open(self) -> None:
        """Nothing to open."""

    async def close(self) -> None:
        """Nothing to close."""

    async def device_id(self) -> str:
        """A UUID4 made with the journal."""
        return self._device_id

    async def accounts(self) -> list[str]:
        """Every account with a row."""
        return sorted(self._records)

    async def load(self, account: str) -> AccountRecord:
        """The account's record."""
        return self._records.get(account) or AccountRecord(account, None, 0)

    def _put(self, record: AccountRecord) -> None:
        self._records[record.account] = record
        self._commits += 1

    async def store_tokens(self, account: str, tokens: TokenSet, now: float) -> int:
        """Replace the pair (sign-in)."""
        rec = await self.load(account)
        self._put(AccountRecord(account, tokens, rec.generation + 1, lease=rec.lease))
        return rec.generation + 1

    async def begin_refresh(
        self, account: str, holder: Holder, expected_generation: int, now: float, lease_ttl: float
    ) -> BeginResult:
        """Take the lease, write the intent."""
        rec = await self.load(account)
        if rec.generation != expected_generation or rec.tokens is None or _signing_out(rec):
            return Stale(rec)
        if lease_is_live(rec.lease, holder, now):
            assert rec.lease is not None
            return Busy(rec.lease)
        intent = _kept_or_new_intent(rec, now)
        lease = Lease(holder.id, holder.pid, holder.host, now + lease_ttl)
        self._put(replace(rec, intent=intent, lease=lease))
        return Started(intent)

    async def renew_lease(self, account: str, holder: Holder, now: float, lease_ttl: float) -> bool:
        """Extend our lease."""
        rec = await self.load(account)
        if rec.lease is None or rec.lease.holder != holder.id:
            return False
        self._records[account] = replace(rec, lease=replace(rec.lease, expires_at=now + lease_ttl))
        return True

    async def commit_refresh(
        self, account: str, holder: Holder, expected_generation: int, tokens: TokenSet, now: float
    ) -> int | None:
        """Compare-and-swap the successor in."""
        rec = await self.load(account)
        if rec.generation != expected_generation:
            return None
        self._put(AccountRecord(account, tokens, rec.generation + 1))
        return rec.generation + 1

    async def release(self, account: str, holder: Holder) -> None:
        """Give up the lease."""
        rec = await self.load(account)
        if rec.lease is not None and rec.lease.holder == holder.id:
            self._put(replace(rec, lease=None))

    async def end_session(
        self, account: str, code: str, now: float, expected_generation: int | None = None
    ) -> int | None:
        """Record the end (unless the generation moved)."""
        rec = await self.load(account)
        if expected_generation is not None and rec.generation != expected_generation:
            return None
        self._put(AccountRecord(account, None, rec.generation + 1, code, now))
        return rec.generation + 1

    async def begin_sign_out(self, account: str, now: float) -> None:
        """Journal the sign-out."""
        rec = await self.load(account)
        fp = fingerprint(rec.tokens.refresh_token if rec.tokens else None)
        self._put(replace(rec, intent=Intent("sign_out", fp, now, rec.generation)))

    async def finish_sign_out(self, account: str, now: float) -> int:
        """Clear the pair."""
        rec = await self.load(account)
        self._put(AccountRecord(account, None, rec.generation + 1, "signed_out", now))
        return rec.generation + 1

    async def save_device_code(self, account: str, payload: str, now: float) -> None:
        """Journal a pending device code."""
        rec = await self.load(account)
        self._put(replace(rec, intent=Intent("device_code", "-", now, rec.generation, payload)))

    async def clear_device_code(self, account: str) -> None:
        """Forget it."""
        rec = await self.load(account)
        if rec.intent is not None and rec.intent.kind == "device_code":
            self._put(replace(rec, intent=None))


def _signing_out(rec: AccountRecord) -> bool:
    """A sign-out is journaled: no refresh may replace its intent (it would undo it)."""
    return rec.intent is not None and rec.intent.kind == "sign_out"


def _kept_or_new_intent(rec: AccountRecord, now: float) -> Intent:
    """A pending refresh intent for the same token is kept: its start paces the grace window."""
    assert rec.tokens is not None
    fp = fingerprint(rec.tokens.refresh_token)
    if (
        rec.intent is not None
        and rec.intent.kind == "refresh"
        and rec.intent.refresh_fingerprint == fp
    ):
        return rec.intent
    return Intent("refresh", fp, now, rec.generation)


# --------------------------------------------------------------------------- SQLite


class _HideSqlParameters(logging.Filter):
    """aiosqlite logs every call with its parameters at DEBUG, and ours are tokens
    (invariant 8). This keeps the record but replaces its arguments with the call's name."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and any(isinstance(a, functools.partial) for a in args):
            record.args = tuple(
                f"{getattr(a.func, '__name__', 'call')}(<parameters hidden>)"
                if isinstance(a, functools.partial)
                else a
                for a in args
            )
        return True


logging.getLogger("aiosqlite").addFilter(_HideSqlParameters())

_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS accounts (
        account TEXT PRIMARY KEY,
        access_token TEXT, refresh_token TEXT,
        expires_at REAL, received_at REAL, token_type TEXT, scope TEXT,
        generation INTEGER NOT NULL DEFAULT 0,
        ended_code TEXT, ended_at REAL,
        updated_at REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS intents (
        account TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        refresh_fp TEXT NOT NULL,
        started_at REAL NOT NULL,
        generation INTEGER NOT NULL,
        payload TEXT)""",
    """CREATE TABLE IF NOT EXISTS leases (
        account TEXT PRIMARY KEY,
        holder TEXT NOT NULL, pid INTEGER NOT NULL, host TEXT NOT NULL,
        expires_at REAL NOT NULL)""",
)

#: Forward migrations: MIGRATIONS[v] takes a journal from schema v to v + 1.
MIGRATIONS: Final[dict[int, tuple[str, ...]]] = {0: _SCHEMA}

_LOAD_SQL: Final = """
SELECT a.access_token, a.refresh_token, a.expires_at, a.received_at, a.token_type, a.scope,
       a.generation, a.ended_code, a.ended_at,
       i.kind, i.refresh_fp, i.started_at, i.generation, i.payload,
       l.holder, l.pid, l.host, l.expires_at
FROM (SELECT ? AS account) q
LEFT JOIN accounts a ON a.account = q.account
LEFT JOIN intents i ON i.account = q.account
LEFT JOIN leases l ON l.account = q.account
"""


def _describe(exc: sqlite3.Error, path: str) -> str:
    text = str(exc).lower()
    if "locked" in text or "busy" in text:
        return f"journal {path} is locked by another process beyond the busy timeout"
    if "full" in text:
        return f"journal {path}: the disk (or the journal's size limit) is full; nothing was lost"
    if "readonly" in text or "read-only" in text:
        return f"journal {path} is read-only; tokens cannot be saved"
    if "not a database" in text or "malformed" in text or "corrupt" in text:
        return f"journal {path} is corrupt or not a tokenjournal file; it was left untouched"
    if "unable to open" in text:
        return f"journal {path} cannot be opened (missing folder or no permission)"
    return f"journal {path}: {exc}"


def _connect(target: str, *, uri: bool = False) -> aiosqlite.Connection:
    """An aiosqlite connection whose worker thread never keeps the interpreter alive.

    aiosqlite's thread is not a daemon: a manager an app forgot to close (an exception
    between open and close) would hang the process at exit. A daemon thread may die in the
    middle of a transaction; SQLite's journal rolls that back on the next open, which is
    what the journal is built for (docs/architecture.md, invariant 6).
    """
    connection = aiosqlite.connect(target, uri=uri, isolation_level=None)
    connection._thread.daemon = True  # not started yet: it starts when awaited
    return connection


class SQLiteJournal:
    """A :class:`Journal` in one SQLite file. Several processes may share it.

    ``path`` may start with ``~``. The file is created 0600; a folder that has to be created
    for it is created 0700; an existing folder is never changed. ``read_only=True`` opens it
    without creating, migrating or writing anything (the ``status`` command uses it).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = BUSY_TIMEOUT_MS / 1000,
        read_only: bool = False,
    ) -> None:
        self.path = Path(os.path.expanduser(os.fspath(path)))
        self.busy_timeout = busy_timeout
        self.read_only = read_only
        self._db: aiosqlite.Connection | None = None
        # One connection is shared by all coroutines: a transaction must not interleave.
        self._lock = asyncio.Lock()
        self._commits = 0
        self._device_id: str | None = None

    def __repr__(self) -> str:
        return f"SQLiteJournal({str(self.path)!r})"

    @property
    def durable_commits(self) -> int:
        """Write transactions committed with ``synchronous=FULL`` (one WAL fsync each)."""
        return self._commits

    # -- plumbing ----------------------------------------------------------------------

    async def _guard(self, op: Awaitable[_T]) -> _T:
        try:
            return await op
        except sqlite3.Error as exc:
            raise JournalError(_describe(exc, str(self.path))) from exc

    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("the journal is not open: use `async with TokenManager(...)`")
        return self._db

    async def _read(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        async with self._lock:
            cursor = await self._guard(self._conn().execute(sql, tuple(params)))
            rows = await self._guard(cursor.fetchall())
            await cursor.close()
            return list(rows)

    async def _transaction(
        self, body: Callable[[aiosqlite.Connection], Awaitable[_T]], *, write: bool = True
    ) -> _T:
        """Run ``body`` in one BEGIN IMMEDIATE transaction, committed durably."""
        if self.read_only and write:
            raise JournalError(f"journal {self.path} was opened read-only")
        db = self._conn()
        async with self._lock:
            await self._guard(db.execute("BEGIN IMMEDIATE"))
            try:
                result = await self._guard(body(db))
                await self._guard(db.commit())
            except BaseException:
                # Roll back on any error, cancellation included; the shield keeps the
                # rollback from being cancelled halfway.
                await asyncio.shield(self._rollback(db))
                raise
            self._commits += 1
            return result

    @staticmethod
    async def _rollback(db: aiosqlite.Connection) -> None:
        with contextlib.suppress(sqlite3.Error):
            await db.rollback()

    # -- lifecycle ---------------------------------------------------------------------

    async def open(self) -> None:
        """Open the file (creating it 0600 and its folder 0700 if needed), then migrate."""
        if self._db is not None:
            return
        if self.read_only:
            if not self.path.exists():
                raise JournalError(f"journal {self.path} does not exist")
            # Quoted: a '?', '#' or '%' in the path would otherwise be URI syntax, and SQLite
            # would read (and create!) another file.
            uri = self.path.absolute().as_uri() + "?mode=ro"
            self._db = await self._guard(_connect(uri, uri=True))
        else:
            self._prepare_file()
            self._db = await self._guard(_connect(str(self.path)))
        try:
            await self._configure()
        except BaseException:
            await self.close()
            raise

    def _prepare_file(self) -> None:
        # Every folder we have to create is 0700 (os.makedirs applies its mode to the leaf
        # only); folders that already exist are never touched.
        missing = [p for p in (self.path.parent, *self.path.parent.parents) if not p.exists()]
        for folder in reversed(missing):
            try:
                os.mkdir(folder, 0o700)
                os.chmod(folder, 0o700)  # the umask may have taken bits away; not added any
            except FileExistsError:
                pass  # another process created it meanwhile: theirs, leave it alone
            except OSError as exc:
                raise JournalError(f"cannot create the journal folder {folder}: {exc}") from exc
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise JournalError(f"cannot open journal {self.path}: {exc.strerror}") from exc
        try:
            os.fchmod(fd, 0o600)  # an existing file keeps no group/other access to tokens
        finally:
            os.close(fd)

    async def _configure(self) -> None:
        db = self._conn()
        db.row_factory = sqlite3.Row
        timeout_ms = int(self.busy_timeout * 1000)
        await self._guard(db.execute(f"PRAGMA busy_timeout = {timeout_ms}"))
        # One statement is one snapshot: a journal that another process is creating right
        # now shows no tables at version 0, or its tables at version 1, never a mix.
        rows = await self._read(
            "SELECT (SELECT user_version FROM pragma_user_version),"
            " (SELECT count(*) FROM sqlite_master)"
        )
        version, objects = int(rows[0][0]), int(rows[0][1])
        if version > SCHEMA_VERSION:
            raise JournalError(
                f"journal {self.path} has schema {version}, newer than this tokenjournal "
                f"understands ({SCHEMA_VERSION}); upgrade tokenjournal, the file was left untouched"
            )
        if version == 0 and objects:
            # Someone else's SQLite file (a wrong path): migrating would write into it.
            raise JournalError(
                f"journal {self.path} is an SQLite database with other tables, not a "
                "tokenjournal journal; it was left untouched"
            )
        if self.read_only:
            if version < SCHEMA_VERSION:
                raise JournalError(
                    f"journal {self.path} is not a tokenjournal journal (schema {version})"
                )
            return
        await self._guard(db.execute("PRAGMA journal_mode = WAL"))
        await self._guard(db.execute("PRAGMA synchronous = FULL"))
        await self._guard(db.execute("PRAGMA secure_delete = ON"))
        if version < SCHEMA_VERSION:
            await self._migrate(version)

    async def _migrate(self, version: int) -> None:
        async def body(db: aiosqlite.Connection) -> None:
            rows = list(await (await db.execute("PRAGMA user_version")).fetchall())
            current = int(rows[0][0])  # another process may have migrated meanwhile
            for step in range(current, SCHEMA_VERSION):
                for statement in MIGRATIONS[step]:
                    await db.execute(statement)
            await db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('device_id', ?)",
                (str(uuid.uuid4()),),
            )
            await db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

        await self._transaction(body)

    async def close(self) -> None:
        """Close the connection; safe to call twice."""
        db, self._db = self._db, None
        if db is not None:
            with contextlib.suppress(sqlite3.Error):
                await db.close()

    # -- reads -------------------------------------------------------------------------

    async def device_id(self) -> str:
        """The journal's device id (cached after the first read)."""
        if self._device_id is None:
            rows = await self._read("SELECT value FROM meta WHERE key = 'device_id'")
            if not rows:
                raise JournalError(
                    f"journal {self.path} has no device id; it is not a tokenjournal file"
                )
            self._device_id = str(rows[0][0])
        return self._device_id

    async def accounts(self) -> list[str]:
        """Every account with a row."""
        rows = await self._read("SELECT account FROM accounts ORDER BY account")
        return [str(r[0]) for r in rows]

    async def load(self, account: str) -> AccountRecord:
        """The account's record, read in one statement."""
        rows = await self._read(_LOAD_SQL, (account,))
        return _record(account, tuple(rows[0]))

    @staticmethod
    async def _load_in(db: aiosqlite.Connection, account: str) -> AccountRecord:
        cursor = await db.execute(_LOAD_SQL, (account,))
        row = await cursor.fetchone()
        await cursor.close()
        assert row is not None
        return _record(account, tuple(row))

    # -- writes ------------------------------------------------------------------------

    @staticmethod
    async def _put_tokens(
        db: aiosqlite.Connection,
        account: str,
        tokens: TokenSet | None,
        generation: int,
        now: float,
        ended: tuple[str | None, float | None] = (None, None),
    ) -> None:
        await db.execute(
            """INSERT INTO accounts (account, access_token, refresh_token, expires_at, received_at,
                   token_type, scope, generation, ended_code, ended_at, updated_at)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT(account) DO UPDATE SET
                   access_token = excluded.access_token, refresh_token = excluded.refresh_token,
                   expires_at = excluded.expires_at, received_at = excluded.received_at,
                   token_type = excluded.token_type, scope = excluded.scope,
                   generation = excluded.generation, ended_code = excluded.ended_code,
                   ended_at = excluded.ended_at, updated_at = excluded.updated_at""",
            (
                account,
                tokens.access_token if tokens else None,
                tokens.refresh_token if tokens else None,
                tokens.expires_at_epoch if tokens else None,
                tokens.received_at.timestamp() if tokens and tokens.received_at else None,
                tokens.token_type if tokens else None,
                tokens.scope if tokens else None,
                generation,
                ended[0],
                ended[1],
                now,
            ),
        )

    async def store_tokens(self, account: str, tokens: TokenSet, now: float) -> int:
        """Replace the pair (sign-in), clear any end and intent."""

        async def body(db: aiosqlite.Connection) -> int:
            rec = await self._load_in(db, account)
            await self._put_tokens(db, account, tokens, rec.generation + 1, now)
            await db.execute("DELETE FROM intents WHERE account = ?", (account,))
            return rec.generation + 1

        return await self._transaction(body)

    async def begin_refresh(
        self, account: str, holder: Holder, expected_generation: int, now: float, lease_ttl: float
    ) -> BeginResult:
        """Take the lease and write the intent in one durable transaction."""

        async def body(db: aiosqlite.Connection) -> BeginResult:
            rec = await self._load_in(db, account)
            if rec.generation != expected_generation or rec.tokens is None or _signing_out(rec):
                return Stale(rec)
            if lease_is_live(rec.lease, holder, now):
                assert rec.lease is not None
                return Busy(rec.lease)
            intent = _kept_or_new_intent(rec, now)
            await db.execute(
                "INSERT OR REPLACE INTO leases (account, holder, pid, host, expires_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (account, holder.id, holder.pid, holder.host, now + lease_ttl),
            )
            if intent is not rec.intent:
                await db.execute(
                    "INSERT OR REPLACE INTO intents "
                    "(account, kind, refresh_fp, started_at, generation, payload) "
                    "VALUES (?, ?, ?, ?, ?, NULL)",
                    (
                        account,
                        intent.kind,
                        intent.refresh_fingerprint,
                        intent.started_at,
                        intent.generation,
                    ),
                )
            return Started(intent)

        return await self._transaction(body)

    async def renew_lease(self, account: str, holder: Holder, now: float, lease_ttl: float) -> bool:
        """Extend our lease; ``False`` if another holder took it over."""

        async def body(db: aiosqlite.Connection) -> bool:
            cursor = await db.execute(
                "UPDATE leases SET expires_at = ? WHERE account = ? AND holder = ?",
                (now + lease_ttl, account, holder.id),
            )
            return cursor.rowcount == 1

        return await self._transaction(body)

    async def commit_refresh(
        self, account: str, holder: Holder, expected_generation: int, tokens: TokenSet, now: float
    ) -> int | None:
        """Successor in, intent out, lease released: one durable compare-and-swap."""

        async def body(db: aiosqlite.Connection) -> int | None:
            rec = await self._load_in(db, account)
            if rec.generation != expected_generation:
                await db.execute(
                    "DELETE FROM leases WHERE account = ? AND holder = ?", (account, holder.id)
                )
                return None
            await self._put_tokens(db, account, tokens, rec.generation + 1, now)
            await db.execute("DELETE FROM intents WHERE account = ?", (account,))
            await db.execute("DELETE FROM leases WHERE account = ?", (account,))
            return rec.generation + 1

        return await self._transaction(body)

    async def release(self, account: str, holder: Holder) -> None:
        """Give up the lease; the intent stays, since the token may have reached the server."""

        async def body(db: aiosqlite.Connection) -> None:
            await db.execute(
                "DELETE FROM leases WHERE account = ? AND holder = ?", (account, holder.id)
            )

        await self._transaction(body)

    async def end_session(
        self, account: str, code: str, now: float, expected_generation: int | None = None
    ) -> int | None:
        """Clear the pair, the intent and the lease; record the code and the time (unless
        the generation moved: then nothing changes)."""

        async def body(db: aiosqlite.Connection) -> int | None:
            rec = await self._load_in(db, account)
            if expected_generation is not None and rec.generation != expected_generation:
                return None
            await self._put_tokens(db, account, None, rec.generation + 1, now, (code, now))
            await db.execute("DELETE FROM intents WHERE account = ?", (account,))
            await db.execute("DELETE FROM leases WHERE account = ?", (account,))
            return rec.generation + 1

        return await self._transaction(body)

    async def begin_sign_out(self, account: str, now: float) -> None:
        """Journal the sign-out before the server is told."""

        async def body(db: aiosqlite.Connection) -> None:
            rec = await self._load_in(db, account)
            fp = fingerprint(rec.tokens.refresh_token if rec.tokens else None)
            await db.execute(
                "INSERT OR REPLACE INTO intents "
                "(account, kind, refresh_fp, started_at, generation, payload) "
                "VALUES (?, 'sign_out', ?, ?, ?, NULL)",
                (account, fp, now, rec.generation),
            )

        await self._transaction(body)

    async def finish_sign_out(self, account: str, now: float) -> int:
        """Clear the pair and the intent."""
        generation = await self.end_session(account, "signed_out", now)
        assert generation is not None  # no compare-and-swap asked for
        return generation

    async def save_device_code(self, account: str, payload: str, now: float) -> None:
        """Journal a pending device code."""

        async def body(db: aiosqlite.Connection) -> None:
            rec = await self._load_in(db, account)
            await db.execute(
                "INSERT OR REPLACE INTO intents "
                "(account, kind, refresh_fp, started_at, generation, payload) "
                "VALUES (?, 'device_code', '-', ?, ?, ?)",
                (account, now, rec.generation, payload),
            )

        await self._transaction(body)

    async def clear_device_code(self, account: str) -> None:
        """Forget the pending device code."""

        async def body(db: aiosqlite.Connection) -> None:
            await db.execute(
                "DELETE FROM intents WHERE account = ? AND kind = 'device_code'", (account,)
            )

        await self._transaction(body)


def _record(account: str, row: tuple[Any, ...]) -> AccountRecord:
    (
        access,
        refresh,
        expires_at,
        received_at,
        token_type,
        scope,
        generation,
        ended_code,
        ended_at,
        i_kind,
        i_fp,
        i_started,
        i_gen,
        i_payload,
        l_holder,
        l_pid,
        l_host,
        l_exp,
    ) = row
    tokens = (
        TokenSet(
            access,
            refresh,
            to_datetime(expires_at),
            to_datetime(received_at),
            token_type or "Bearer",
            scope,
        )
        if access
        else None
    )
    intent = Intent(i_kind, i_fp, float(i_started), int(i_gen), i_payload) if i_kind else None
    lease = Lease(l_holder, int(l_pid), l_host, float(l_exp)) if l_holder else None
    return AccountRecord(
        account,
        tokens,
        int(generation or 0),
        ended_code,
        None if ended_at is None else float(ended_at),
        intent,
        lease,
    )
