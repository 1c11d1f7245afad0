"""The journal: where tokens, refresh intents and cross-process leases live durably.

:class:`SQLiteJournal` keeps them in one SQLite file (WAL, ``synchronous=FULL``,
``secure_delete``, schema in ``user_version``), all access through one aiosqlite connection,
every state change one ``BEGIN IMMEDIATE`` transaction. :class:`MemoryJournal` implements
the same :class:`Journal` protocol in memory, for tests and for users who opt out of disk.

The journal keeps its share of the invariants (docs/architecture.md section 2; the journal
itself is section 5):

* a refresh token is replaced only in the transaction that stores its successor
  (:meth:`Journal.commit_refresh`, a compare-and-swap on the account's generation;
  invariants 2 and 13);
* an intent is written before a refresh token is sent, and cleared by that same commit
  (invariants 1 and 6);
* the lease row makes one process the refresher per account across processes (invariant 4);
* with a :class:`~tokenjournal.Seal`, every column listed in :data:`SECRET_TABLES` is sealed
  on write and opened on read (invariant 15, docs/architecture.md section 7).
* an outbox item is committed before ``enqueue`` returns, and one per-item lease keeps it in
  flight in at most one process (invariant 14; the engine is :mod:`tokenjournal._outbox`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import logging
import math
import os
import socket
import sqlite3
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal, Protocol, TypeVar, cast, runtime_checkable

import aiosqlite

from ._errors import JournalError
from ._faults import crash_point
from ._outbox import DeadLetter, OutboxItem, OutboxLimits, OutboxStats, Settle
from ._protocols import MAX_LIFETIME
from ._seal import Seal, Unopenable, is_sealed, key_id_of
from ._tokens import TokenSet, fingerprint, to_datetime

SCHEMA_VERSION: Final = 4
BUSY_TIMEOUT_MS: Final = 5000
#: SQLite's own busy wait cannot be interrupted; the journal waits in slices this long, so
#: a call whose caller was cancelled stops waiting for the lock at the next slice.
BUSY_SLICE_MS: Final = 25
#: The slice of a wait for the write lock that another read may end sooner (``unless``).
QUICK_BUSY_MS: Final = 1
#: The longest full path SQLite opens: its Unix VFS keeps 512 bytes and room for the
#: "-journal" suffix (measured with SQLite 3.40: 504 bytes open, 505 do not).
SQLITE_PATH_BYTES: Final = 504
log = logging.getLogger("tokenjournal")
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
            this_host(),
        )


@functools.cache  # on a waiter's path; a process never leaves its PID namespace
def this_host() -> str:
    """Where a lease's pid means something: the host name, with the PID namespace where the
    system has one. Containers may share a host name and a journal (a pod's shared volume,
    ``--network host``) but not their process ids: a holder's pid read in another namespace
    names nobody there, and its live lease would be taken. Across namespaces a lease is
    left to its expiry."""
    name = socket.gethostname()
    try:
        return f"{name} pid:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:  # no /proc (macOS, a locked-down container): the host name alone
        return name


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
class SealInfo:
    """What a sealed row shows without its key: who sealed it, and fingerprints kept at write."""

    key_id: str
    signed_in: bool
    access_fingerprint: str
    refresh_fingerprint: str
    expires_at: float | None = None


@dataclass(frozen=True, slots=True)
class AccountRecord:
    """One account's row, as read in one transaction.

    ``sealed`` is set for a sealed row; a journal opened read-only without the key then has
    ``tokens=None`` (what ``status`` shows comes from ``sealed``).
    """

    account: str
    tokens: TokenSet | None
    generation: int
    ended_code: str | None = None
    ended_at: float | None = None
    intent: Intent | None = None
    lease: Lease | None = None
    sealed: SealInfo | None = None


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


#: The largest process id (``pid_t`` is a signed 32-bit integer).
MAX_PID: Final = 2**31 - 1


def pid_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists on this host (a dead lease holder can be skipped).

    Only a positive ``pid_t`` names one process: ``kill(0, 0)`` asks about our own process
    group and ``kill(-1, 0)`` about every process we may signal, so either would call an
    edited lease's holder alive; one past ``pid_t`` would raise ``OverflowError``.
    """
    if not 0 < pid <= MAX_PID:
        return False
    try:
        # A mutant sending a real signal here would hang up the mutation runner itself,
        # whose pid the tests' lease holders carry: not mutated.
        os.kill(pid, 0)  # pragma: no mutate
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

    async def begin_sign_out(self, account: str, now: float) -> AccountRecord:
        """Journal a sign-out before the server is told, so a crash finishes it next start.

        Returns the record as the sign-out leaves it: its pair is the one to log out, its
        generation (one more than before, so an in-flight refresh cannot commit over the
        sign-out) is what :meth:`finish_sign_out` expects. With no pair nothing is written;
        with a sign-out already journaled, that one is returned unchanged.
        """
        ...

    async def finish_sign_out(
        self, account: str, now: float, expected_generation: int
    ) -> int | None:
        """Clear the pair and the intent after the server was told: a compare-and-swap.

        Returns the new generation, or ``None`` when the generation moved since
        :meth:`begin_sign_out` (a sign-in made meanwhile, here or in another process, or
        another finish of the same sign-out): the newer decision stays.
        """
        ...

    async def save_device_code(self, account: str, payload: str, now: float) -> None:
        """Journal a pending RFC 8628 device code, so a restart keeps polling it."""
        ...

    async def clear_device_code(self, account: str) -> None:
        """Forget the pending device code."""
        ...

    async def save_metadata(self, issuer: str, document: str, now: float) -> None:
        """Keep ``issuer``'s discovery document (JSON text), read at wall time ``now``."""
        ...

    async def load_metadata(self, issuer: str) -> tuple[str, float] | None:
        """The kept discovery document of ``issuer`` and when it was read, or ``None``."""
        ...

    # -- the outbox (docs/architecture.md section 8) ------------------------------------

    async def outbox_add(
        self, account: str, outbox: str, item: OutboxItem, limits: OutboxLimits
    ) -> int | None:
        """Store ``item`` durably (concurrent calls may share one commit). Returns how many
        oldest items ``drop_oldest`` dropped to make room, or ``None`` when the outbox is full
        and ``limits.when_full`` is ``reject`` (nothing was stored). A call cancelled once
        it has started still stores the item (its caller cannot tell otherwise, and would
        enqueue the call twice), and logs what it could not return."""
        ...

    async def outbox_claim(
        self,
        account: str,
        outbox: str,
        holder: Holder,
        now: float,
        lease_ttl: float,
        limit: int,
        ordered: bool,
    ) -> list[OutboxItem]:
        """Lease up to ``limit`` pending items nobody live holds (a dead holder's are taken
        over) and count a try on each. ``ordered``: only the head of the line, stopping at
        the first item another holder has."""
        ...

    async def outbox_renew(
        self,
        account: str,
        outbox: str,
        holder: Holder,
        now: float,
        lease_ttl: float,
        *,
        tried: str | None = None,
    ) -> set[str]:
        """Extend every lease ``holder`` has in this outbox; returns the ids still held.
        ``tried``: also count a try on that item, if ``holder`` still has it (a retry is
        about to go out), so an item's ``attempts`` survives a release or a crash."""
        ...

    async def outbox_release(
        self,
        account: str,
        outbox: str,
        holder: Holder,
        ids: list[str] | None,
        *,
        untried: bool = False,  # pragma: no mutate (a mutant here is a Protocol member)
    ) -> None:
        """Give up ``holder``'s leases on ``ids`` (``None``: all of them): back in line.
        ``untried``: none of them was sent under this lease, so the try their claim counted
        is taken back."""
        ...

    async def outbox_settle(
        self, account: str, outbox: str, settles: Sequence[Settle]
    ) -> list[bool]:
        """In one durable transaction, per item: delivered, delete it and count it; dead,
        keep it as a dead letter. Whether each was settled by this call (``False``: already
        settled, e.g. by another process that took it over)."""
        ...

    async def outbox_waiting(self, account: str, outbox: str, upto: int | None) -> tuple[int, int]:
        """``(pending items with seq <= upto, upto)``; ``upto=None`` means every item now."""
        ...

    async def outbox_stats(self, account: str, outbox: str, now: float) -> OutboxStats:
        """The outbox's figures."""
        ...

    async def outbox_dead(self, account: str, outbox: str) -> list[DeadLetter]:
        """The dead letters, oldest first."""
        ...

    async def outbox_retry_dead(self, account: str, outbox: str) -> int:
        """Put every dead letter back in line; returns how many."""
        ...

    async def outbox_clear(self, account: str, outbox: str) -> int:
        """Delete every item and the counters of the outbox; returns how many items."""
        ...

    async def outbox_summary(self, now: float) -> list[OutboxStats]:
        """The figures of every outbox in the journal (every account)."""
        ...


# --------------------------------------------------------------------------- memory


class MemoryJournal:
    """A :class:`Journal` in memory: same rules, nothing on disk. For tests and opt-outs.

    Several managers in one process may share one instance (the lease works across them).
    """

    def __init__(self) -> None:
        self._records: dict[str, AccountRecord] = {}
        self._metadata: dict[str, tuple[str, float]] = {}
        self._device_id = str(uuid.uuid4())
        self._commits = 0
        self._items: dict[str, _MemItem] = {}
        self._outbox_counts: dict[tuple[str, str], list[int]] = {}  # [delivered, dropped]
        self._seq = 0

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
        refused = _refused(rec, holder, expected_generation, now)
        if refused is not None:
            return refused
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

    async def begin_sign_out(self, account: str, now: float) -> AccountRecord:
        """Journal the sign-out (see :meth:`Journal.begin_sign_out`)."""
        rec = await self.load(account)
        if rec.tokens is None or _signing_out(rec):
            return rec
        fp = fingerprint(rec.tokens.refresh_token)
        intent = Intent("sign_out", fp, now, rec.generation + 1)
        rec = replace(rec, generation=intent.generation, intent=intent)
        self._put(rec)
        return rec

    async def finish_sign_out(
        self, account: str, now: float, expected_generation: int
    ) -> int | None:
        """Clear the pair, unless a newer decision was made."""
        return await self.end_session(account, "signed_out", now, expected_generation)

    async def save_device_code(self, account: str, payload: str, now: float) -> None:
        """Journal a pending device code."""
        rec = await self.load(account)
        self._put(replace(rec, intent=Intent("device_code", "-", now, rec.generation, payload)))

    async def clear_device_code(self, account: str) -> None:
        """Forget it."""
        rec = await self.load(account)
        if rec.intent is not None and rec.intent.kind == "device_code":
            self._put(replace(rec, intent=None))

    async def save_metadata(self, issuer: str, document: str, now: float) -> None:
        """Keep the discovery document."""
        self._metadata[issuer] = (document, now)
        self._commits += 1

    async def load_metadata(self, issuer: str) -> tuple[str, float] | None:
        """The kept discovery document and when it was read."""
        return self._metadata.get(issuer)

    # -- the outbox ----------------------------------------------------------------------

    def _line(self, account: str, outbox: str) -> list[_MemItem]:
        return sorted(
            (m for m in self._items.values() if m.key == (account, outbox)),
            key=lambda m: m.item.seq,
        )

    def _counts(self, account: str, outbox: str) -> list[int]:
        return self._outbox_counts.setdefault((account, outbox), [0, 0])

    async def outbox_add(
        self, account: str, outbox: str, item: OutboxItem, limits: OutboxLimits
    ) -> int | None:
        """Store the item (see :meth:`Journal.outbox_add`)."""
        line = [m for m in self._line(account, outbox) if not m.dead]
        dropped = _make_room([(m.item.seq, m.item.size) for m in line], item.size, limits)
        if dropped is None:
            return None
        for seq in dropped:
            del self._items[next(m.item.id for m in line if m.item.seq == seq)]
        self._seq += 1
        self._items[item.id] = _MemItem((account, outbox), replace(item, seq=self._seq))
        self._counts(account, outbox)[1] += len(dropped)
        self._commits += 1
        return len(dropped)

    async def outbox_claim(
        self,
        account: str,
        outbox: str,
        holder: Holder,
        now: float,
        lease_ttl: float,
        limit: int,
        ordered: bool,
    ) -> list[OutboxItem]:
        """Lease items (see :meth:`Journal.outbox_claim`)."""
        taken: list[OutboxItem] = []
        for m in self._line(account, outbox):
            if m.dead:
                continue
            if len(taken) >= limit:
                break
            if _leased(m.lease, holder, now):
                if ordered:
                    break
                continue
            m.lease = Lease(holder.id, holder.pid, holder.host, now + lease_ttl)
            m.item = replace(m.item, attempts=m.item.attempts + 1)
            taken.append(m.item)
        if taken:
            self._commits += 1
        return taken

    async def outbox_renew(
        self,
        account: str,
        outbox: str,
        holder: Holder,
        now: float,
        lease_ttl: float,
        *,
        tried: str | None = None,
    ) -> set[str]:
        """Extend our leases (and count a try on ``tried``)."""
        kept: set[str] = set()
        for m in self._line(account, outbox):
            if m.lease is not None and m.lease.holder == holder.id and not m.dead:
                m.lease = replace(m.lease, expires_at=now + lease_ttl)
                kept.add(m.item.id)
                if m.item.id == tried:
                    m.item = replace(m.item, attempts=m.item.attempts + 1)
        return kept

    async def outbox_release(
        self,
        account: str,
        outbox: str,
        holder: Holder,
        ids: list[str] | None,
        *,
        untried: bool = False,
    ) -> None:
        """Give up our leases (taking back the claim's try on ``untried`` items)."""
        for m in self._line(account, outbox):
            mine = m.lease is not None and m.lease.holder == holder.id
            if mine and (ids is None or m.item.id in ids):
                m.lease = None
                if untried:
                    m.item = replace(m.item, attempts=m.item.attempts - 1)

    async def outbox_settle(
        self, account: str, outbox: str, settles: Sequence[Settle]
    ) -> list[bool]:
        """Delete (delivered) or dead-letter the items."""
        self._commits += 1
        return [self._settle(account, outbox, settle) for settle in settles]

    def _settle(self, account: str, outbox: str, settle: Settle) -> bool:
        m = self._items.get(settle.item_id)
        if m is None or m.dead:
            return False
        if settle.dead:
            m.dead, m.lease = True, None
            m.status, m.reason = settle.status, settle.reason
            m.item = replace(m.item, attempts=max(m.item.attempts, settle.attempts))
        else:
            del self._items[settle.item_id]
            self._counts(account, outbox)[0] += 1
        return True

    async def outbox_waiting(self, account: str, outbox: str, upto: int | None) -> tuple[int, int]:
        """Pending items up to a place in line."""
        line = [m.item.seq for m in self._line(account, outbox) if not m.dead]
        if upto is None:
            upto = max(line, default=0)
        return sum(1 for seq in line if seq <= upto), upto

    async def outbox_stats(self, account: str, outbox: str, now: float) -> OutboxStats:
        """The figures."""
        line = self._line(account, outbox)
        pending = [m for m in line if not m.dead]
        delivered, dropped = self._outbox_counts.get((account, outbox), [0, 0])
        oldest = min((m.item.created_at for m in pending), default=None)
        return OutboxStats(
            account,
            outbox,
            len(pending),
            sum(1 for m in pending if m.lease is not None and m.lease.expires_at > now),
            delivered,
            len(line) - len(pending),
            dropped,
            None if oldest is None else max(0.0, now - oldest),
        )

    async def outbox_dead(self, account: str, outbox: str) -> list[DeadLetter]:
        """The dead letters."""
        return [
            DeadLetter(
                m.item.id,
                m.status,
                m.reason,
                m.item.method,
                m.item.url,
                m.item.attempts,
                m.item.created_at,
            )
            for m in self._line(account, outbox)
            if m.dead
        ]

    async def outbox_retry_dead(self, account: str, outbox: str) -> int:
        """Dead letters back in line."""
        dead = [m for m in self._line(account, outbox) if m.dead]
        for m in dead:
            m.dead = False  # status and reason are read only while dead; a new death sets both
        return len(dead)

    async def outbox_clear(self, account: str, outbox: str) -> int:
        """Forget the outbox."""
        line = self._line(account, outbox)
        for m in line:
            del self._items[m.item.id]
        self._outbox_counts.pop((account, outbox), None)
        return len(line)

    async def outbox_summary(self, now: float) -> list[OutboxStats]:
        """Every outbox's figures."""
        keys = {m.key for m in self._items.values()} | set(self._outbox_counts)
        return [await self.outbox_stats(a, o, now) for a, o in sorted(keys)]


@dataclass(slots=True)
class _MemItem:
    """An item in a MemoryJournal, with its lease and dead-letter fields."""

    key: tuple[str, str]
    item: OutboxItem
    lease: Lease | None = None
    dead: bool = False
    status: int = 0
    reason: str = ""


def _leased(lease: Lease | None, holder: Holder, now: float) -> bool:
    """Whether an item's lease keeps it from ``holder`` now: another live holder's, or our
    own that has not expired (an item of ours is in flight here; an expired one of ours
    was left by a task that could not release it)."""
    if lease is None:
        return False
    if lease.holder == holder.id:
        return lease.expires_at > now
    return lease_is_live(lease, holder, now)


def _make_room(line: list[tuple[int, int]], size: int, limits: OutboxLimits) -> list[int] | None:
    """The seqs of the oldest pending items to drop so one more of ``size`` bytes fits
    (``line``: ``(seq, size)`` oldest first), or ``None`` if it is full and may not drop."""
    count, total = len(line), sum(s for _, s in line)
    dropped: list[int] = []
    while (limits.max_items is not None and count + 1 > limits.max_items) or (
        limits.max_bytes is not None and total + size > limits.max_bytes
    ):
        if limits.when_full != "drop_oldest" or len(dropped) == len(line):
            return None
        seq, gone = line[len(dropped)]
        dropped.append(seq)
        count, total = count - 1, total - gone
    return dropped


def _signing_out(rec: AccountRecord) -> bool:
    """A sign-out is journaled: no refresh may replace its intent (it would undo it)."""
    return rec.intent is not None and rec.intent.kind == "sign_out"


def _refused(
    rec: AccountRecord, holder: Holder, expected_generation: int, now: float
) -> Stale | Busy | None:
    """Why ``begin_refresh`` cannot take the lease on ``rec``, or ``None`` if it can."""
    if rec.generation != expected_generation or rec.tokens is None or _signing_out(rec):
        return Stale(rec)
    if lease_is_live(rec.lease, holder, now):
        assert rec.lease is not None
        return Busy(rec.lease)
    return None


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

#: Sealing (docs/architecture.md section 7): which key sealed each row, and the keyed
#: fingerprints ``status`` shows without the key.
_SEALING: Final = (
    "ALTER TABLE accounts ADD COLUMN sealed_by TEXT",
    "ALTER TABLE accounts ADD COLUMN access_fp TEXT",
    "ALTER TABLE accounts ADD COLUMN refresh_fp TEXT",
    "ALTER TABLE intents ADD COLUMN sealed_by TEXT",
)

#: The first schema with the sealing columns (``_SEALING`` is the step that reaches it).
SEALING_SCHEMA: Final = 2
#: Schema 3: the OpenID Connect ID token kept with the pair (NULL for a pair without one).
_ID_TOKEN: Final = ("ALTER TABLE accounts ADD COLUMN id_token TEXT",)


@dataclass(frozen=True, slots=True)
class SecretTable:
    """A table whose ``columns`` hold secrets: sealed when the journal has a seal.

    Each value is bound (the associated data) to ``table.column``, the row's ``owner``
    column (the account) and its ``generation`` column, so a value copied to another row,
    column or generation does not open. The table has a ``sealed_by`` column: the key id
    that sealed the row (NULL: plain).
    """

    table: str
    owner: str
    generation: str
    columns: tuple[str, ...]
    #: Per column, the column that keeps its keyed fingerprint (for ``status``), or None.
    fingerprints: tuple[str | None, ...]
    #: What the owner column names, for errors: "account", or "outbox item" (its id).
    noun: str = "account"


#: Every secret column of the journal, in one place (table and column names in the SQL
#: built from it come from here, never from input): the in-place sealing at open, the
#: re-sealing after a rotation and the key check all work from this list. A write seals
#: with :func:`_sealed`, a read opens with :func:`_opened`.
SECRET_TABLES: Final = (
    SecretTable(
        "accounts",
        "account",
        "generation",
        ("access_token", "refresh_token", "id_token"),
        ("access_fp", "refresh_fp", None),
    ),
    SecretTable("intents", "account", "generation", ("payload",), (None,)),
    # An item is bound to its own id (the Idempotency-Key) and place in line: a body copied
    # to another item does not open. The body is kept as base64 text when sealed.
    SecretTable("outbox", "id", "seq", ("body", "headers"), (None, None), "outbox item"),
)


def _sealed(
    seal: Seal | None, table: str, column: str, owner: str, generation: int, value: str | None
) -> str | None:
    """What the journal stores for a secret column: ``value`` sealed, or as is without a seal."""
    if value is None or seal is None:
        return value
    return seal.seal(value, account=owner, column=f"{table}.{column}", generation=generation)


#: ``meta`` key: the id of the key the journal was last sealed with (absent: plain).
META_SEALED_BY: Final = "sealed_by"

#: ``meta`` keys of kept discovery documents: this prefix and the issuer.
_METADATA_KEY: Final = "discovery "
#: Schema 4: the durable outbox (invariant 14). ``seq`` is the place in line (never reused),
#: ``id`` the Idempotency-Key; a delivered item is deleted (and counted in
#: ``outbox_counts``), a refused one stays with ``dead = 1``; ``holder``/``pid``/``host``/
#: ``lease_expires`` are the per-item lease, as in ``leases`` for the refresh.
_OUTBOX_SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        account TEXT NOT NULL, name TEXT NOT NULL,
        method TEXT NOT NULL, url TEXT NOT NULL, headers TEXT NOT NULL, body BLOB NOT NULL,
        size INTEGER NOT NULL, created_at REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        dead INTEGER NOT NULL DEFAULT 0, status INTEGER, reason TEXT,
        holder TEXT, pid INTEGER, host TEXT, lease_expires REAL,
        sealed_by TEXT)""",
    "CREATE INDEX IF NOT EXISTS outbox_line ON outbox (account, name, dead, seq)",
    """CREATE TABLE IF NOT EXISTS outbox_counts (
        account TEXT NOT NULL, name TEXT NOT NULL,
        delivered INTEGER NOT NULL DEFAULT 0, dropped INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (account, name))""",
)

#: Forward migrations: MIGRATIONS[v] takes a journal from schema v to v + 1.
MIGRATIONS: Final[dict[int, tuple[str, ...]]] = {
    0: _SCHEMA,
    SEALING_SCHEMA - 1: _SEALING,
    SEALING_SCHEMA: _ID_TOKEN,
    SEALING_SCHEMA + 1: _OUTBOX_SCHEMA,
}

_LOAD_SQL: Final = """
SELECT a.access_token, a.refresh_token, a.expires_at, a.received_at, a.token_type, a.scope,
       a.generation, a.ended_code, a.ended_at, a.id_token,
       i.kind, i.refresh_fp, i.started_at, i.generation, i.payload,
       l.holder, l.pid, l.host, l.expires_at,
       a.sealed_by, a.access_fp, a.refresh_fp, i.sealed_by
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
        size = len(os.fsencode(os.path.abspath(path)))
        if size > SQLITE_PATH_BYTES:
            return (
                f"journal {path} cannot be opened: its full path is {size} bytes long, and "
                f"SQLite takes at most {SQLITE_PATH_BYTES}; choose a shorter one"
            )
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


class _Abandoned(Exception):
    """The caller was cancelled before the commit: the transaction is rolled back."""


@dataclass(slots=True)
class _Tx:
    """A transaction in progress on the connection's worker thread."""

    conn: sqlite3.Connection
    #: It replaced or dropped a secret: after the commit, checkpoint the WAL into the file
    #: and truncate it, so the old value is left in no file of the journal.
    scrub: bool = False
    #: A crash point to pass between the commit and the scrub (the sealing's steps).
    point: str | None = None
    #: Set when nobody waits for this transaction any more: a long body (sealing every row)
    #: stops at its next step instead of finishing work the rollback throws away.
    abandoned: threading.Event | None = None

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, params)


def _is_busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF == sqlite3.SQLITE_BUSY


class SQLiteJournal:
    """A :class:`Journal` in one SQLite file. Several processes may share it.

    ``path`` may start with ``~``. The file is created 0600; a folder that has to be created
    for it is created 0700; an existing folder is never changed. ``read_only=True`` opens it
    without creating, migrating or writing anything (the ``status`` command uses it; without
    a seal, sealed rows then read as :class:`SealInfo` with no tokens).

    With ``seal`` every secret column (:data:`SECRET_TABLES`) is sealed on write. A plain
    journal is sealed in place, in one transaction, by :meth:`open`; a journal sealed with a
    key the seal does not hold (or opened without one) is a :class:`JournalError` from
    :meth:`open` naming the key id it needs, and the file is left byte-for-byte unchanged.

    Every call is one job on aiosqlite's worker thread, a transaction included (BEGIN,
    statements and COMMIT together): a caller that is cancelled or times out never leaves
    the connection inside a transaction, and one cancelled before the commit changes nothing.
    A call that replaces or drops a secret checkpoints the WAL away before it returns, so no
    replaced token stays readable in ``tokens.db``, ``-wal`` or ``-shm``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = BUSY_TIMEOUT_MS / 1000,
        read_only: bool = False,
        seal: Seal | None = None,
    ) -> None:
        if seal is not None and not isinstance(seal, Seal):
            raise TypeError("seal must be a tokenjournal.Seal or None")
        self.path = Path(os.path.expanduser(os.fspath(path)))
        self.busy_timeout = busy_timeout
        self.read_only = read_only
        self.seal = seal
        #: Rows sealed (or re-sealed under this key) when the journal was last opened.
        self.sealed_at_open = 0
        self._db: aiosqlite.Connection | None = None
        # open() and close() one at a time: two concurrent opens must not make two connections.
        self._life = asyncio.Lock()
        self._commits = 0
        self._device_id: str | None = None
        # Group commit: writes that arrive while a commit is being synced wait here and
        # share the next transaction (see _batched).
        self._batch: list[_Write] = []
        self._batch_lock = threading.Lock()
        #: The flush that will take the queued group (None: the next write starts one).
        self._batch_flush: asyncio.Task[None] | None = None
        self._flushes: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        sealed = f", seal={self.seal!r}" if self.seal is not None else ""
        return f"SQLiteJournal({str(self.path)!r}{sealed})"

    @property
    def is_open(self) -> bool:
        """Whether :meth:`open` has made the connection (and :meth:`close` not yet closed it)."""
        return self._db is not None

    @property
    def durable_commits(self) -> int:
        """Write transactions committed with ``synchronous=FULL`` (one WAL fsync each)."""
        return self._commits

    # -- plumbing ----------------------------------------------------------------------

    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("the journal is not open: use `async with TokenManager(...)`")
        return self._db

    async def _run(
        self,
        job: Callable[[sqlite3.Connection, threading.Event], _T],
        db: aiosqlite.Connection | None = None,
    ) -> _T:
        """Run ``job`` as one call on the connection's worker thread.

        Cancelling the awaiting coroutine cannot stop a job the thread has started, so a
        transaction is never split over several calls (the thread would carry on with the
        first half alone); ``abandoned`` tells the job that nobody waits for it any more.
        """
        conn = db if db is not None else self._conn()
        abandoned = threading.Event()

        def call() -> _T:
            # aiosqlite's own connection object, used only on its own worker thread.
            return job(conn._conn, abandoned)

        try:
            # aiosqlite has no public "run this function on the worker thread"; _execute is
            # what each of its own methods uses.
            return cast(_T, await conn._execute(call))  # type: ignore[no-untyped-call]
        except asyncio.CancelledError:
            abandoned.set()
            raise
        except sqlite3.Error as exc:
            raise JournalError(_describe(exc, str(self.path))) from exc

    def _patiently(self, step: Callable[[], _T], abandoned: threading.Event) -> _T:
        """``step``, retried while the file is locked, up to ``busy_timeout``.

        SQLite's own busy wait cannot be interrupted, so it waits in short slices
        (``BUSY_SLICE_MS``) and a job whose caller gave up stops waiting at the next one.
        """
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                return step()
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or abandoned.is_set() or time.monotonic() >= deadline:
                    raise

    def _begin_unless(
        self,
        conn: sqlite3.Connection,
        unless: Callable[[_Tx], _T | None],
        abandoned: threading.Event,
    ) -> _T | None:
        """BEGIN IMMEDIATE, or ``unless``'s answer: asked first, then after each millisecond
        the write lock stays busy, up to ``busy_timeout``. Its whole point is latency: the
        process that holds the lock may be committing the very change ``unless`` looks for,
        and SQLite's own busy wait would sleep through it in steps of up to 10 ms."""

        def begin() -> _T | None:
            answer = unless(_Tx(conn))
            if answer is None:
                conn.execute("BEGIN IMMEDIATE")
            return answer

        conn.execute(f"PRAGMA busy_timeout = {QUICK_BUSY_MS}")
        try:
            return self._patiently(begin, abandoned)
        finally:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_SLICE_MS}")

    async def _read(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        args = tuple(params)

        def job(conn: sqlite3.Connection, abandoned: threading.Event) -> list[sqlite3.Row]:
            return self._patiently(lambda: conn.execute(sql, args).fetchall(), abandoned)

        return await self._run(job)

    async def _transaction(
        self,
        body: Callable[[_Tx], _T],
        *,
        write: bool = True,
        unless: Callable[[_Tx], _T | None] | None = None,
    ) -> _T:
        """Run ``body`` in one BEGIN IMMEDIATE transaction, committed durably.

        ``unless`` reads without the write lock (WAL readers take none); an answer from it
        stands for the whole call, and it is asked again each time the lock is found busy.
        """
        if self.read_only and write:
            raise JournalError(f"journal {self.path} was opened read-only")

        def checked(tx: _Tx) -> _T:
            self._check_sealing(tx)
            return body(tx)

        return await self._run(
            lambda conn, abandoned: self._in_transaction(conn, checked, abandoned, unless)
        )

    def _in_transaction(
        self,
        conn: sqlite3.Connection,
        body: Callable[[_Tx], _T],
        abandoned: threading.Event,
        unless: Callable[[_Tx], _T | None] | None = None,
    ) -> _T:
        if abandoned.is_set():
            raise _Abandoned  # cancelled while queued behind another call: never started
        if unless is None:
            self._patiently(lambda: conn.execute("BEGIN IMMEDIATE"), abandoned)
        else:
            answer = self._begin_unless(conn, unless, abandoned)
            if answer is not None:
                return answer
        tx = _Tx(conn, abandoned=abandoned)
        try:
            result = body(tx)
            if abandoned.is_set():
                raise _Abandoned
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise
        self._commits += 1
        if tx.point is not None:
            crash_point(tx.point)
        if tx.scrub:
            self._scrub(conn)
        return result

    async def _batched(
        self, body: Callable[[_Tx], _T], unheard: Callable[[_T], object] | None = None
    ) -> _T:
        """Run ``body`` in the next group commit: one BEGIN IMMEDIATE ... COMMIT for every
        write that arrived while the previous one was being synced (aiosqlite runs one job
        at a time, so a queue forms exactly while the disk is busy). Durable on return, like
        :meth:`_transaction`. ``body`` must not raise for an expected outcome (return it):
        an exception rolls back the whole group. A queued write is committed even when its
        caller is cancelled (an outbox item is then never in doubt): ``unheard`` gets the
        result that caller cannot, and a failure it cannot hear is logged.
        """
        if self.read_only:
            raise JournalError(f"journal {self.path} was opened read-only")
        self._conn()
        future: asyncio.Future[_T] = asyncio.get_running_loop().create_future()
        with self._batch_lock:
            self._batch.append(_Write(body, future, unheard))
            if self._batch_flush is None:
                self._batch_flush = task = asyncio.ensure_future(self._flush())
                self._flushes.add(task)
                task.add_done_callback(self._flush_ended)
        # A cancelled caller cancels only this future: the write is made all the same
        # (_Write.done).
        return await future

    async def _flush(self) -> None:
        taken: list[_Write] = []

        def job(conn: sqlite3.Connection, abandoned: threading.Event) -> list[Any]:
            with self._batch_lock:  # whatever queued until now, and nothing after
                if abandoned.is_set():
                    return []  # the flush was cancelled before this ran: _flush_ended fails it
                self._take_batch(taken)
            # Every queued write, its caller cancelled or not (see _batched).
            bodies = [write.body for write in taken]
            if not bodies:
                return []
            return self._in_transaction(conn, lambda tx: [b(tx) for b in bodies], abandoned)

        try:
            results = await self._run(job)
        except BaseException as exc:
            with self._batch_lock:  # the job took the group, or never will (see _flush_ended)
                group = list(taken)
            failure = exc if isinstance(exc, Exception) else JournalError("journal closed")
            for write in group:
                write.failed(failure, self.path)
            if not isinstance(exc, Exception):
                raise
            return
        for write, result in zip(taken, results, strict=True):
            write.done(result)

    def _flush_ended(self, task: asyncio.Task[None]) -> None:
        """A flush that ended without taking its group fails it: else its writers would wait
        for ever, and no later write would start a flush. That is a flush cancelled before
        its job ran on the journal's thread, or before its first step (an app cancelling
        every task at shutdown): its coroutine never ran, so no except clause of it can."""
        self._flushes.discard(task)
        group: list[_Write] = []
        with self._batch_lock:
            if self._batch_flush is task:
                self._take_batch(group)
        for write in group:
            write.failed(JournalError("journal closed"), self.path)

    def _take_batch(self, into: list[_Write]) -> None:
        """Move the queued writes into ``into``; the next write starts a new group. Call with
        ``_batch_lock`` held."""
        into.extend(self._batch)
        self._batch.clear()
        self._batch_flush = None

    def _scrub(self, conn: sqlite3.Connection) -> None:
        """Copy the WAL into the file and truncate it to zero bytes.

        ``secure_delete`` zeroes a replaced value in the page SQLite writes next, but in WAL
        mode the page that held it lives on: in earlier WAL frames, and in the main file
        until a checkpoint overwrites it. A TRUNCATE checkpoint does both at once.
        """
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    log.warning("journal %s: checkpoint failed: %s", self.path, exc)
                    return
                busy = 1
            if not busy:
                return
            if time.monotonic() >= deadline:
                # Another process kept reading: the next scrub (or open) finishes the job.
                log.warning("journal %s: checkpoint kept busy by other readers", self.path)
                return

    # -- lifecycle ---------------------------------------------------------------------

    async def open(self) -> None:
        """Open the file (creating it 0600 and its folder 0700 if needed), then migrate.

        Safe to call concurrently and twice: one connection is made.
        """
        async with self._life:
            if self._db is not None:
                return
            try:
                found: os.stat_result | None = self.path.stat()
            except (FileNotFoundError, NotADirectoryError):
                found = None  # _prepare_file names the folder it cannot make
            except OSError as exc:  # a name too long, a loop of links, no permission
                raise JournalError(f"cannot open journal {self.path}: {exc.strerror}") from exc
            if self.read_only:
                if found is None:
                    raise JournalError(f"journal {self.path} does not exist")
                if stat.S_ISDIR(found.st_mode):  # SQLite would only say "disk I/O error"
                    raise JournalError(f"journal {self.path} is a folder, not a journal file")
                # Quoted: a '?', '#' or '%' in the path would otherwise be URI syntax, and
                # SQLite would read (and create!) another file.
                uri = self.path.absolute().as_uri() + "?mode=ro"
                connecting = _connect(uri, uri=True)
            else:
                if found is not None and stat.S_ISREG(found.st_mode) and found.st_size:
                    await self._probe()
                self._prepare_file()
                connecting = _connect(str(self.path))
            try:
                db = await connecting
            except sqlite3.Error as exc:
                raise JournalError(_describe(exc, str(self.path))) from exc
            try:
                await self._run(self._configure, db)
            except BaseException:
                await asyncio.shield(self._close_quietly(db))
                raise
            self._db = db

    async def _probe(self) -> None:
        """Refuse a sealed journal this seal cannot open before writing a byte to it.

        A read-write connection would change the files even when it gives up: the last one
        to close checkpoints a WAL a crash left into the main file, and a read-only one
        rebuilds the ``-shm`` index. This one is ``immutable``: it reads the main file alone
        and touches nothing. What only the WAL knows (a sealing not yet checkpointed) is
        checked again on the real connection; a probe that cannot read (a checkpoint
        copying pages meanwhile) is no verdict either way.
        """
        uri = self.path.absolute().as_uri() + "?mode=ro&immutable=1"
        try:
            db = await _connect(uri, uri=True)
        except sqlite3.Error:
            return
        try:

            def job(conn: sqlite3.Connection, abandoned: threading.Event) -> set[str]:
                return self._needed_keys(conn)

            try:
                needed = await self._run(job, db)
            except JournalError:
                return  # unreadable now: the real connection decides
            self._refuse_unless_openable(needed)
        finally:
            await asyncio.shield(self._close_quietly(db))

    @staticmethod
    def _needed_keys(conn: sqlite3.Connection) -> set[str]:
        """The key ids a journal's rows (and its ``meta``) say sealed them."""
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version < SEALING_SCHEMA:  # before sealing existed: nothing is sealed
            return set()
        parts = ["SELECT value FROM meta WHERE key = ?"]
        parts += [
            f"SELECT sealed_by FROM {t.table} WHERE sealed_by IS NOT NULL"  # noqa: S608
            for t in SECRET_TABLES
        ]
        rows = conn.execute(" UNION ".join(parts), (META_SEALED_BY,)).fetchall()
        return {str(row[0]) for row in rows}

    def _refuse_unless_openable(self, needed: set[str]) -> None:
        if not needed or (self.read_only and self.seal is None):
            return
        if self.seal is None:
            raise JournalError(
                f"journal {self.path} is sealed (key id {', '.join(sorted(needed))}); open it "
                "with that key (seal=tokenjournal.Seal...); the file was left untouched"
            )
        missing = needed - set(self.seal.key_ids)
        if missing:
            raise JournalError(
                f"journal {self.path} is sealed with key id {', '.join(sorted(missing))}, "
                f"which this seal (key id {self.seal.key_id}) does not hold; pass that key, "
                "or previous=[it] to rotate; the file was left untouched"
            )

    def _check_sealing(self, tx: _Tx) -> None:
        """Before each write: another process may have sealed (or re-keyed) the journal
        since this one opened it; writing plain text, or under a key it no longer names,
        would undo that."""
        row = tx.execute("SELECT value FROM meta WHERE key = ?", (META_SEALED_BY,)).fetchone()
        if row is None:
            return
        current = str(row[0])
        if self.seal is None:
            raise JournalError(
                f"journal {self.path} was sealed (key id {current}) by another process "
                "since this one opened it; open it with that seal"
            )
        if current not in self.seal.key_ids:
            raise JournalError(
                f"journal {self.path} was sealed with key id {current} by another process "
                f"since this one opened it; this seal holds {', '.join(self.seal.key_ids)}"
            )

    def _seal_rows(self, tx: _Tx) -> int:
        """Seal every plain secret, and re-seal every row an older key sealed, under this
        seal's key, in the caller's transaction. Returns the rows changed."""
        seal = self.seal
        assert seal is not None
        # Under the write lock: another process may have sealed it with a key we lack since
        # open() looked; re-sealing around its rows would hide them behind our key id.
        self._refuse_unless_openable(self._needed_keys(tx.conn))
        changed = 0
        for t in SECRET_TABLES:
            fps = [c for c in t.fingerprints if c is not None]
            rows = tx.execute(
                f"SELECT rowid, {t.owner}, {t.generation}, sealed_by, {', '.join(t.columns)} "  # noqa: S608
                f"FROM {t.table}"
            ).fetchall()
            for rowid, owner, generation, sealed_by, *values in rows:
                if sealed_by == seal.key_id or all(v is None for v in values):
                    continue
                if tx.abandoned is not None and tx.abandoned.is_set():
                    raise _Abandoned  # a Ctrl-C: roll back now, not after every row
                r = _Row(str(owner), t.noun)
                if sealed_by is None:  # a plain outbox body is bytes; sealed, it is base64
                    if any(is_sealed(v) for v in values):
                        # A hand edit or a partial restore cleared the mark: sealing the
                        # sealed text again would make "tjs1:..." the token itself.
                        kid = next(key_id_of(v) for v in values if is_sealed(v))
                        raise r.bad("sealed_by", f"is empty beside a value sealed by {kid}")
                    values = [_b64(v) if isinstance(v, bytes) else v for v in values]
                plain = [
                    _opened(r, seal if sealed_by is not None else None, t.table, c, generation, v)
                    for c, v in zip(t.columns, values, strict=True)
                ]
                sets = [f"{c} = ?" for c in (*t.columns, *fps)]
                params: list[Any] = [
                    _sealed(seal, t.table, c, str(owner), generation, v)
                    for c, v in zip(t.columns, plain, strict=True)
                ]
                params += [
                    seal.fingerprint(v)
                    for fp, v in zip(t.fingerprints, plain, strict=True)
                    if fp is not None
                ]
                tx.execute(
                    f"UPDATE {t.table} SET {', '.join(sets)}, sealed_by = ? WHERE rowid = ?",  # noqa: S608
                    (*params, seal.key_id, rowid),
                )
                changed += 1
        tx.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (META_SEALED_BY, seal.key_id)
        )
        # The plain (or older) values are still in the main file's old pages: checkpoint.
        tx.scrub = changed > 0
        tx.point = "seal_before_scrub"
        crash_point("seal_before_commit")
        return changed

    def _needs_sealing(self, conn: sqlite3.Connection) -> bool:
        assert self.seal is not None
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (META_SEALED_BY,)).fetchone()
        if row is None or str(row[0]) != self.seal.key_id:
            return True
        return any(
            conn.execute(
                f"SELECT 1 FROM {t.table} WHERE (sealed_by IS NULL AND "  # noqa: S608
                f"({' OR '.join(f'{c} IS NOT NULL' for c in t.columns)})) OR sealed_by != ? "
                "LIMIT 1",
                (self.seal.key_id,),
            ).fetchone()
            for t in SECRET_TABLES
        )

    async def reseal(self) -> int:
        """Re-seal every row under this seal's key (after a rotation), in one transaction.

        Rows sealed by a ``previous`` key, or plain, are sealed anew; then the WAL is
        scrubbed. Returns how many rows changed.
        """
        if self.seal is None:
            raise ValueError("reseal needs a journal opened with a seal")
        return await self._transaction(self._seal_rows)

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

    def _configure(self, conn: sqlite3.Connection, abandoned: threading.Event) -> None:
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {BUSY_SLICE_MS}")  # the rest: _patiently
        # One statement is one snapshot: a journal that another process is creating right
        # now shows no tables at version 0, or its tables at version 1, never a mix.
        row = self._patiently(
            lambda: conn.execute(
                "SELECT (SELECT user_version FROM pragma_user_version),"
                " (SELECT count(*) FROM sqlite_master)"
            ).fetchone(),
            abandoned,
        )
        version, objects = int(row[0]), int(row[1])
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
            if version == 0:
                raise JournalError(f"journal {self.path} is not a tokenjournal journal (schema 0)")
            if version < SCHEMA_VERSION:
                raise JournalError(
                    f"journal {self.path} has schema {version}, older than this tokenjournal "
                    f"({SCHEMA_VERSION}); a TokenManager migrates it when it next opens it"
                )
            self._refuse_unless_openable(self._needed_keys(conn))
            return
        # Checked again on this connection: another process may have sealed it meanwhile.
        self._refuse_unless_openable(self._patiently(lambda: self._needed_keys(conn), abandoned))
        self._patiently(lambda: conn.execute("PRAGMA journal_mode = WAL").fetchall(), abandoned)
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA secure_delete = ON")
        if version < SCHEMA_VERSION:
            self._in_transaction(conn, self._migrate, abandoned)
        if self.seal is not None and self._needs_sealing(conn):
            # A plain journal, or rows a previous key sealed, are sealed in place under this
            # key in one transaction as the journal is first read with it (``previous=``: the
            # old key can go once every journal has been opened once); the scrub takes the
            # plain or old bytes out of every file.
            self.sealed_at_open = self._in_transaction(conn, self._seal_rows, abandoned)
        # A process killed between a commit and its checkpoint left replaced secrets in
        # the WAL: clear them before anything else happens.
        self._scrub(conn)

    @staticmethod
    def _migrate(tx: _Tx) -> None:
        current = int(tx.execute("PRAGMA user_version").fetchone()[0])
        # (another process may have migrated meanwhile)
        for step in range(current, SCHEMA_VERSION):
            for statement in MIGRATIONS[step]:
                tx.execute(statement)
        tx.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('device_id', ?)",
            (str(uuid.uuid4()),),
        )
        tx.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    async def close(self) -> None:
        """Close the connection; safe to call twice."""
        async with self._life:
            if self._flushes:  # writes already accepted are committed (or fail) first
                await asyncio.gather(*self._flushes, return_exceptions=True)
            db, self._db = self._db, None
            if db is not None:
                await self._close_quietly(db)

    @staticmethod
    async def _close_quietly(db: aiosqlite.Connection) -> None:
        with contextlib.suppress(sqlite3.Error, ValueError):
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

    async def sealed_by(self) -> str | None:
        """The id of the key the journal was last sealed with, or ``None`` for a plain one."""
        rows = await self._read("SELECT value FROM meta WHERE key = ?", (META_SEALED_BY,))
        return str(rows[0][0]) if rows else None

    async def accounts(self) -> list[str]:
        """Every account with a row."""
        rows = await self._read("SELECT account FROM accounts ORDER BY account")
        return [str(r[0]) for r in rows]

    async def load(self, account: str) -> AccountRecord:
        """The account's record, read in one statement."""
        rows = await self._read(_LOAD_SQL, (account,))
        return _record(account, tuple(rows[0]), self.seal)

    def _load_in(self, tx: _Tx, account: str) -> AccountRecord:
        row = tx.execute(_LOAD_SQL, (account,)).fetchone()
        assert row is not None
        return _record(account, tuple(row), self.seal)

    # -- writes ------------------------------------------------------------------------

    def _put_tokens(
        self,
        tx: _Tx,
        account: str,
        tokens: TokenSet | None,
        generation: int,
        now: float,
        ended: tuple[str | None, float | None] = (None, None),
    ) -> None:
        received = tokens.received_at.timestamp() if tokens and tokens.received_at else None
        expires = tokens.expires_at_epoch if tokens else None
        if expires is not None:
            # "Never expires" (datetime.max) would not read back as a datetime: keep a
            # lifetime a datetime can hold, the same cap the protocols put on an answer.
            expires = min(expires, (now if received is None else received) + MAX_LIFETIME)
        access = tokens.access_token if tokens else None
        refresh = tokens.refresh_token if tokens else None
        id_token = tokens.id_token if tokens else None
        seal = self.seal if tokens else None
        tx.execute(
            """INSERT INTO accounts (account, access_token, refresh_token, expires_at, received_at,
                   token_type, scope, generation, ended_code, ended_at, updated_at,
                   sealed_by, access_fp, refresh_fp, id_token)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT(account) DO UPDATE SET
                   access_token = excluded.access_token, refresh_token = excluded.refresh_token,
                   expires_at = excluded.expires_at, received_at = excluded.received_at,
                   token_type = excluded.token_type, scope = excluded.scope,
                   generation = excluded.generation, ended_code = excluded.ended_code,
                   ended_at = excluded.ended_at, updated_at = excluded.updated_at,
                   sealed_by = excluded.sealed_by, access_fp = excluded.access_fp,
                   refresh_fp = excluded.refresh_fp, id_token = excluded.id_token""",
            (
                account,
                _sealed(seal, "accounts", "access_token", account, generation, access),
                _sealed(seal, "accounts", "refresh_token", account, generation, refresh),
                expires,
                received,
                tokens.token_type if tokens else None,
                tokens.scope if tokens else None,
                generation,
                ended[0],
                ended[1],
                now,
                seal.key_id if seal else None,
                seal.fingerprint(access) if seal else None,
                seal.fingerprint(refresh) if seal else None,
                _sealed(seal, "accounts", "id_token", account, generation, id_token),
            ),
        )
        # Whatever pair (or device code) the row held before is replaced: scrub it away.
        tx.scrub = True

    async def store_tokens(self, account: str, tokens: TokenSet, now: float) -> int:
        """Replace the pair (sign-in), clear any end and intent."""

        def body(tx: _Tx) -> int:
            rec = self._load_in(tx, account)
            self._put_tokens(tx, account, tokens, rec.generation + 1, now)
            tx.execute("DELETE FROM intents WHERE account = ?", (account,))
            return rec.generation + 1

        return await self._transaction(body)

    async def begin_refresh(
        self, account: str, holder: Holder, expected_generation: int, now: float, lease_ttl: float
    ) -> BeginResult:
        """Take the lease and write the intent in one durable transaction.

        A read comes first (in WAL mode it takes no lock), and again while the write lock
        is busy: when an expiry sends every process on a host here at once, those that find
        the lease taken or the pair already refreshed go and wait on the holder's doorbell
        without queuing for the write lock, where SQLite's busy wait sleeps in steps of up
        to 10 ms and the last in the queue learnt of the holder's commit tens of
        milliseconds late.
        """

        def unless(tx: _Tx) -> BeginResult | None:
            return _refused(self._load_in(tx, account), holder, expected_generation, now)

        def body(tx: _Tx) -> BeginResult:
            rec = self._load_in(tx, account)
            refused = _refused(rec, holder, expected_generation, now)
            if refused is not None:
                return refused
            intent = _kept_or_new_intent(rec, now)
            tx.execute(
                "INSERT OR REPLACE INTO leases (account, holder, pid, host, expires_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (account, holder.id, holder.pid, holder.host, now + lease_ttl),
            )
            if intent is not rec.intent:
                tx.scrub = rec.intent is not None and rec.intent.payload is not None
                tx.execute(
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

        return await self._transaction(body, unless=unless)

    async def renew_lease(self, account: str, holder: Holder, now: float, lease_ttl: float) -> bool:
        """Extend our lease; ``False`` if another holder took it over."""

        def body(tx: _Tx) -> bool:
            cursor = tx.execute(
                "UPDATE leases SET expires_at = ? WHERE account = ? AND holder = ?",
                (now + lease_ttl, account, holder.id),
            )
            return cursor.rowcount == 1

        return await self._transaction(body)

    async def commit_refresh(
        self, account: str, holder: Holder, expected_generation: int, tokens: TokenSet, now: float
    ) -> int | None:
        """Successor in, intent out, lease released: one durable compare-and-swap."""

        def body(tx: _Tx) -> int | None:
            rec = self._load_in(tx, account)
            if rec.generation != expected_generation:
                tx.execute(
                    "DELETE FROM leases WHERE account = ? AND holder = ?", (account, holder.id)
                )
                return None
            self._put_tokens(tx, account, tokens, rec.generation + 1, now)
            tx.execute("DELETE FROM intents WHERE account = ?", (account,))
            tx.execute("DELETE FROM leases WHERE account = ?", (account,))
            return rec.generation + 1

        return await self._transaction(body)

    async def release(self, account: str, holder: Holder) -> None:
        """Give up the lease; the intent stays, since the token may have reached the server."""

        def body(tx: _Tx) -> None:
            tx.execute("DELETE FROM leases WHERE account = ? AND holder = ?", (account, holder.id))

        await self._transaction(body)

    def _end_in(
        self, tx: _Tx, account: str, code: str, now: float, expected_generation: int | None
    ) -> int | None:
        rec = self._load_in(tx, account)
        if expected_generation is not None and rec.generation != expected_generation:
            return None
        self._put_tokens(tx, account, None, rec.generation + 1, now, (code, now))
        tx.execute("DELETE FROM intents WHERE account = ?", (account,))
        tx.execute("DELETE FROM leases WHERE account = ?", (account,))
        return rec.generation + 1

    async def end_session(
        self, account: str, code: str, now: float, expected_generation: int | None = None
    ) -> int | None:
        """Clear the pair, the intent and the lease; record the code and the time (unless
        the generation moved: then nothing changes)."""
        return await self._transaction(
            lambda tx: self._end_in(tx, account, code, now, expected_generation)
        )

    async def begin_sign_out(self, account: str, now: float) -> AccountRecord:
        """Journal the sign-out before the server is told; see :meth:`Journal.begin_sign_out`."""

        def body(tx: _Tx) -> AccountRecord:
            rec = self._load_in(tx, account)
            if rec.tokens is None or _signing_out(rec):
                return rec
            fp = fingerprint(rec.tokens.refresh_token)
            intent = Intent("sign_out", fp, now, rec.generation + 1)
            tx.scrub = rec.intent is not None and rec.intent.payload is not None
            tx.execute(
                "INSERT OR REPLACE INTO intents "
                "(account, kind, refresh_fp, started_at, generation, payload) "
                "VALUES (?, 'sign_out', ?, ?, ?, NULL)",
                (account, fp, now, intent.generation),
            )
            if self.seal is not None:
                # Sealed values are bound to the generation: seal the pair anew for it.
                self._put_tokens(tx, account, rec.tokens, intent.generation, now)
            else:
                tx.execute(
                    "UPDATE accounts SET generation = ?, updated_at = ? WHERE account = ?",
                    (intent.generation, now, account),
                )
            return replace(rec, generation=intent.generation, intent=intent)

        return await self._transaction(body)

    async def finish_sign_out(
        self, account: str, now: float, expected_generation: int
    ) -> int | None:
        """Clear the pair and the intent, unless a newer decision was made (``None``)."""
        return await self._transaction(
            lambda tx: self._end_in(tx, account, "signed_out", now, expected_generation)
        )

    async def save_device_code(self, account: str, payload: str, now: float) -> None:
        """Journal a pending device code."""

        def body(tx: _Tx) -> None:
            rec = self._load_in(tx, account)
            tx.scrub = rec.intent is not None and rec.intent.payload is not None
            seal = self.seal
            tx.execute(
                "INSERT OR REPLACE INTO intents "
                "(account, kind, refresh_fp, started_at, generation, payload, sealed_by) "
                "VALUES (?, 'device_code', '-', ?, ?, ?, ?)",
                (
                    account,
                    now,
                    rec.generation,
                    _sealed(seal, "intents", "payload", account, rec.generation, payload),
                    seal.key_id if seal else None,
                ),
            )

        await self._transaction(body)

    async def clear_device_code(self, account: str) -> None:
        """Forget the pending device code."""

        def body(tx: _Tx) -> None:
            cursor = tx.execute(
                "DELETE FROM intents WHERE account = ? AND kind = 'device_code'", (account,)
            )
            tx.scrub = cursor.rowcount > 0

        await self._transaction(body)

    async def save_metadata(self, issuer: str, document: str, now: float) -> None:
        """Keep the discovery document in ``meta`` (no secret in it: no scrub)."""
        value = json.dumps({"fetched_at": now, "document": document})

        def body(tx: _Tx) -> None:
            tx.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                (_METADATA_KEY + issuer, value),
            )

        await self._transaction(body)

    async def load_metadata(self, issuer: str) -> tuple[str, float] | None:
        """The kept discovery document and when it was read; an unreadable one is none."""
        rows = await self._read("SELECT value FROM meta WHERE key = ?", (_METADATA_KEY + issuer,))
        if not rows:
            return None
        try:
            kept = json.loads(rows[0][0])
            document, fetched_at = kept["document"], kept["fetched_at"]
        except (ValueError, TypeError, KeyError):
            return None
        if not isinstance(document, str) or not isinstance(fetched_at, int | float):
            return None
        return document, float(fetched_at)

    # -- the outbox (docs/architecture.md section 8) ------------------------------------

    async def outbox_add(
        self, account: str, outbox: str, item: OutboxItem, limits: OutboxLimits
    ) -> int | None:
        """Store the item in the next group commit (see :meth:`Journal.outbox_add`)."""
        headers = json.dumps(item.headers)
        seal = self.seal

        def body(tx: _Tx) -> int | None:
            dropped: list[int] = []
            if limits.max_items is not None or limits.max_bytes is not None:
                line = tx.execute(
                    "SELECT seq, size FROM outbox WHERE account = ? AND name = ? AND dead = 0 "
                    "ORDER BY seq",
                    (account, outbox),
                ).fetchall()
                room = _make_room([(int(r[0]), int(r[1])) for r in line], item.size, limits)
                if room is None:
                    return None
                dropped = room
                for seq in dropped:
                    tx.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
            # The place in line is taken here, not left to AUTOINCREMENT: a sealed body is
            # bound to it before the row exists.
            seq = int(
                tx.execute(
                    "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'outbox'),"
                    " 0), coalesce((SELECT max(seq) FROM outbox), 0)) + 1"
                ).fetchone()[0]
            )
            stored_headers: str | None = headers
            stored_body: str | bytes | None = item.body
            if seal is not None:
                stored_headers = _sealed(seal, "outbox", "headers", item.id, seq, headers)
                stored_body = _sealed(seal, "outbox", "body", item.id, seq, _b64(item.body))
            tx.execute(
                "INSERT INTO outbox (seq, id, account, name, method, url, headers, body, size, "
                "created_at, sealed_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    seq,
                    item.id,
                    account,
                    outbox,
                    item.method,
                    item.url,
                    stored_headers,
                    stored_body,
                    item.size,
                    item.created_at,
                    seal.key_id if seal is not None else None,
                ),
            )
            if dropped:  # the counters' row is made by the first drop or delivery
                tx.execute(
                    "INSERT INTO outbox_counts (account, name, dropped) VALUES (?, ?, ?) "
                    "ON CONFLICT(account, name) DO UPDATE SET dropped = dropped + excluded.dropped",
                    (account, outbox, len(dropped)),
                )
            return len(dropped)

        def unheard(dropped: int | None) -> None:
            if dropped is None:
                log.warning(
                    "outbox %s of account %s is full: a cancelled enqueue stored nothing",
                    outbox,
                    account,
                )
            elif dropped:
                log.warning(
                    "outbox %s of account %s full: dropped the %d oldest item(s)",
                    outbox,
                    account,
                    dropped,
                )

        return await self._batched(body, unheard)

    async def outbox_claim(
        self,
        account: str,
        outbox: str,
        holder: Holder,
        now: float,
        lease_ttl: float,
        limit: int,
        ordered: bool,
    ) -> list[OutboxItem]:
        """Lease items in one durable transaction (see :meth:`Journal.outbox_claim`)."""

        def body(tx: _Tx) -> list[OutboxItem]:
            taken: list[OutboxItem] = []
            # Page by page: items others hold may fill any one page, and the free ones
            # behind them are still owed to this caller (as MemoryJournal gives them).
            page, after = (limit if ordered else limit * 4 + 16), 0
            while len(taken) < limit:
                rows = tx.execute(
                    "SELECT seq, id, method, url, headers, body, created_at, attempts, holder, "
                    "pid, host, lease_expires, sealed_by FROM outbox "
                    "WHERE account = ? AND name = ? AND dead = 0 AND seq > ? ORDER BY seq LIMIT ?",
                    (account, outbox, after, page),
                ).fetchall()
                if self._take(rows, taken, holder, now, limit, ordered) or len(rows) < page:
                    break
                after = int(rows[-1]["seq"])
            if taken:
                tx.conn.executemany(
                    "UPDATE outbox SET holder = ?, pid = ?, host = ?, lease_expires = ?, "
                    "attempts = attempts + 1 WHERE seq = ?",
                    [(holder.id, holder.pid, holder.host, now + lease_ttl, i.seq) for i in taken],
                )
            return taken

        return await self._transaction(body)

    def _take(
        self,
        rows: list[sqlite3.Row],
        taken: list[OutboxItem],
        holder: Holder,
        now: float,
        limit: int,
        ordered: bool,
    ) -> bool:
        """Add to ``taken`` the rows ``holder`` may lease, up to ``limit``; whether an
        ordered claim met an item held elsewhere (it stops there)."""
        for row in rows:
            if len(taken) >= limit:
                break
            lease = None
            if row["holder"] is not None:  # claim writes the four together, release clears them
                lease = Lease(
                    str(row["holder"]),
                    int(row["pid"]),
                    str(row["host"]),
                    float(row["lease_expires"]),
                )
            if _leased(lease, holder, now):
                if ordered:
                    return True  # the head is in flight elsewhere: FIFO waits for it
                continue
            taken.append(_item(row, self.seal, attempts_delta=1))
        return False

    async def outbox_renew(
        self,
        account: str,
        outbox: str,
        holder: Holder,
        now: float,
        lease_ttl: float,
        *,
        tried: str | None = None,
    ) -> set[str]:
        """Extend our leases (and count a try on ``tried``); the ids still ours."""

        def body(tx: _Tx) -> set[str]:
            tx.execute(
                "UPDATE outbox SET lease_expires = ?, "
                "attempts = attempts + (id IS ?) "
                "WHERE account = ? AND name = ? AND holder = ? AND dead = 0",
                (now + lease_ttl, tried, account, outbox, holder.id),
            )
            rows = tx.execute(
                "SELECT id FROM outbox WHERE account = ? AND name = ? AND holder = ? AND dead = 0",
                (account, outbox, holder.id),
            ).fetchall()
            return {str(r[0]) for r in rows}

        return await self._transaction(body)

    async def outbox_release(
        self,
        account: str,
        outbox: str,
        holder: Holder,
        ids: list[str] | None,
        *,
        untried: bool = False,
    ) -> None:
        """Give up our leases (all of them with ``ids=None``; taking back the claim's try
        with ``untried``)."""
        clear = (
            "UPDATE outbox SET holder = NULL, pid = NULL, host = NULL, lease_expires = NULL, "
            "attempts = attempts - ? WHERE account = ? AND name = ? AND holder = ?"
        )
        back = int(untried)

        def body(tx: _Tx) -> None:
            if ids is None:
                tx.execute(clear, (back, account, outbox, holder.id))
            else:
                tx.conn.executemany(
                    clear + " AND id = ?", [(back, account, outbox, holder.id, i) for i in ids]
                )

        if ids == []:
            return
        await self._transaction(body)

    async def outbox_settle(
        self, account: str, outbox: str, settles: Sequence[Settle]
    ) -> list[bool]:
        """Delete and count (delivered) or keep as dead letters, in the next group commit."""
        settles = list(settles)

        def body(tx: _Tx) -> list[bool]:
            # A handful of statements per group, not two per item: the group's commit runs
            # on the worker thread while the event loop sends the next items.
            ids = list(dict.fromkeys(settle.item_id for settle in settles))
            pending: set[str] = set()  # the rest: settled already, elsewhere
            for start in range(0, len(ids), 500):  # SQLite's limit on bound parameters
                chunk = tuple(ids[start : start + 500])
                marks = ",".join("?" * len(chunk))
                rows = tx.execute(
                    f"SELECT id FROM outbox WHERE dead = 0 AND id IN ({marks})",  # noqa: S608
                    chunk,
                ).fetchall()
                pending.update(str(r[0]) for r in rows)
            first: dict[str, Settle] = {}  # one verdict per id
            for settle in settles:
                first.setdefault(settle.item_id, settle)
            done = [s for s in first.values() if not s.dead and s.item_id in pending]
            dead = [s for s in first.values() if s.dead and s.item_id in pending]
            tx.conn.executemany("DELETE FROM outbox WHERE id = ?", [(s.item_id,) for s in done])
            tx.conn.executemany(
                "UPDATE outbox SET dead = 1, status = ?, reason = ?, "
                "attempts = max(attempts, ?), holder = NULL, pid = NULL, host = NULL, "
                "lease_expires = NULL WHERE id = ?",
                [(s.status, s.reason, s.attempts, s.item_id) for s in dead],
            )
            if done:
                tx.execute(
                    "INSERT INTO outbox_counts (account, name, delivered) VALUES (?, ?, ?) "
                    "ON CONFLICT(account, name) DO UPDATE SET "
                    "delivered = delivered + excluded.delivered",
                    (account, outbox, len(done)),
                )
            # An id twice in one group (never from one deliverer) counts once.
            seen: set[str] = set()
            result = []
            for settle in settles:
                result.append(settle.item_id in pending and settle.item_id not in seen)
                seen.add(settle.item_id)
            return result

        return await self._batched(body)

    async def outbox_waiting(self, account: str, outbox: str, upto: int | None) -> tuple[int, int]:
        """Pending items up to a place in line."""
        if upto is None:
            rows = await self._read(
                "SELECT count(*), coalesce(max(seq), 0) FROM outbox "
                "WHERE account = ? AND name = ? AND dead = 0",
                (account, outbox),
            )
            return int(rows[0][0]), int(rows[0][1])
        rows = await self._read(
            "SELECT count(*) FROM outbox WHERE account = ? AND name = ? AND dead = 0 AND seq <= ?",
            (account, outbox, upto),
        )
        return int(rows[0][0]), upto

    async def outbox_stats(self, account: str, outbox: str, now: float) -> OutboxStats:
        """The figures, read in one statement."""
        rows = await self._read(
            _STATS_SQL + " WHERE k.account = ? AND k.name = ?", (now, now, account, outbox)
        )
        if not rows:
            return OutboxStats(account, outbox, 0, 0, 0, 0)
        return _stats(rows[0])

    async def outbox_dead(self, account: str, outbox: str) -> list[DeadLetter]:
        """The dead letters, oldest first."""
        rows = await self._read(
            "SELECT id, status, reason, method, url, attempts, created_at FROM outbox "
            "WHERE account = ? AND name = ? AND dead = 1 ORDER BY seq",
            (account, outbox),
        )
        return [
            DeadLetter(
                str(r[0]),
                int(r[1] or 0),
                str(r[2] or ""),
                str(r[3]),
                str(r[4]),
                int(r[5]),
                float(r[6]),
            )
            for r in rows
        ]

    async def outbox_retry_dead(self, account: str, outbox: str) -> int:
        """Dead letters back in line, same id."""

        def body(tx: _Tx) -> int:
            cursor = tx.execute(
                "UPDATE outbox SET dead = 0, status = NULL, reason = NULL "
                "WHERE account = ? AND name = ? AND dead = 1",
                (account, outbox),
            )
            return cursor.rowcount

        return await self._transaction(body)

    async def outbox_clear(self, account: str, outbox: str) -> int:
        """Delete every item and the counters."""

        def body(tx: _Tx) -> int:
            cursor = tx.execute(
                "DELETE FROM outbox WHERE account = ? AND name = ?", (account, outbox)
            )
            tx.execute(
                "DELETE FROM outbox_counts WHERE account = ? AND name = ?", (account, outbox)
            )
            return cursor.rowcount

        return await self._transaction(body)

    async def outbox_summary(self, now: float) -> list[OutboxStats]:
        """Every outbox's figures (none in a schema-1 journal opened read-only)."""
        tables = await self._read(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'outbox_counts'"
        )
        if not int(tables[0][0]):
            return []
        rows = await self._read(_STATS_SQL + " ORDER BY k.account, k.name", (now, now))
        return [_stats(r) for r in rows]


#: One outbox's figures; the keys are every (account, name) with items or counters.
_STATS_SQL: Final = """
SELECT k.account, k.name,
       (SELECT count(*) FROM outbox o WHERE o.account = k.account AND o.name = k.name
            AND o.dead = 0),
       (SELECT count(*) FROM outbox o WHERE o.account = k.account AND o.name = k.name
            AND o.dead = 0 AND o.holder IS NOT NULL AND o.lease_expires > ?),
       coalesce((SELECT delivered FROM outbox_counts c WHERE c.account = k.account
            AND c.name = k.name), 0),
       (SELECT count(*) FROM outbox o WHERE o.account = k.account AND o.name = k.name
            AND o.dead = 1),
       coalesce((SELECT dropped FROM outbox_counts c WHERE c.account = k.account
            AND c.name = k.name), 0),
       ? - (SELECT min(created_at) FROM outbox o WHERE o.account = k.account
            AND o.name = k.name AND o.dead = 0)
FROM (SELECT account, name FROM outbox_counts
      UNION SELECT account, name FROM outbox) k"""


def _stats(row: Any) -> OutboxStats:
    age = row[7]
    return OutboxStats(
        str(row[0]),
        str(row[1]),
        int(row[2]),
        int(row[3]),
        int(row[4]),
        int(row[5]),
        int(row[6]),
        None if age is None else max(0.0, float(age)),
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _item(row: Any, seal: Seal | None, *, attempts_delta: int) -> OutboxItem:
    """An item from an ``outbox`` row, opened with ``seal`` when it is sealed; its ``attempts``
    plus ``attempts_delta`` (a claim counts the try it is about to make)."""
    raw_headers, body = row["headers"], row["body"]
    if row["sealed_by"] is not None:
        r, seq = _Row(str(row["id"]), "outbox item"), int(row["seq"])
        raw_headers = _opened(r, seal, "outbox", "headers", seq, raw_headers)
        opened = _opened(r, seal, "outbox", "body", seq, body)
        if seal is None or raw_headers is None or opened is None:
            raise r.bad("outbox.body", "is sealed and this journal has no key to open it")
        body = base64.b64decode(opened)
    headers = json.loads(raw_headers)
    return OutboxItem(
        str(row["id"]),
        str(row["method"]),
        str(row["url"]),
        tuple((str(k), str(v)) for k, v in headers),
        bytes(body),
        float(row["created_at"]),
        int(row["seq"]),
        int(row["attempts"]) + attempts_delta,
    )


#: What a datetime can hold, with a day to spare at each end (years 1 and 9999).
_EPOCH_MIN: Final = datetime(1, 1, 2, tzinfo=UTC).timestamp()
_EPOCH_MAX: Final = datetime(9999, 1, 1, tzinfo=UTC).timestamp()
#: Generations are SQLite INTEGERs that get + 1: anything past this was not written by us.
_MAX_GENERATION: Final = 2**62


@dataclass(frozen=True, slots=True)
class _Write:
    """A write waiting for a group commit (:meth:`SQLiteJournal._batched`): its ``body``,
    the ``future`` its caller awaits, and ``unheard``, which gets the result when that caller
    was cancelled (the write is made all the same)."""

    body: Callable[[_Tx], Any]
    future: asyncio.Future[Any]
    unheard: Callable[[Any], object] | None = None

    # Each write is ended once: by the flush that took it, or by _flush_ended when none did.

    def done(self, result: Any) -> None:
        """Committed: the result to the caller, or to ``unheard`` when it was cancelled."""
        if not self.future.cancelled():
            self.future.set_result(result)
        elif self.unheard is not None:
            self.unheard(result)

    def failed(self, failure: Exception, path: Path) -> None:
        """Not committed: the error to the caller, or, when it was cancelled, to the log
        (nobody else would hear of it)."""
        if not self.future.cancelled():
            self.future.set_exception(failure)
        else:
            log.warning("journal %s: a write whose caller was cancelled failed: %s", path, failure)


class _Row:
    """Reads one row's columns, each checked for the type this module writes.

    A row edited by hand (or by a buggy tool) must give a :class:`JournalError` that names
    the row (its account, or an outbox item's id) and the column, or a clamped value, never
    a raw TypeError/OverflowError from deep inside a refresh. The file itself is never
    touched.
    """

    def __init__(self, owner: str, noun: str = "account") -> None:
        self.owner, self.noun = owner, noun

    def bad(self, column: str, why: str) -> JournalError:
        return JournalError(
            f"journal {self.noun} {self.owner!r}: column {column} {why}; "
            "fix or delete the row (the file was left untouched)"
        )

    def text(self, column: str, value: object) -> str | None:
        if value is None or isinstance(value, str):
            return value
        raise self.bad(column, f"holds a {type(value).__name__}, not text")

    def required_text(self, column: str, value: object) -> str:
        text = self.text(column, value)
        if not text:
            raise self.bad(column, "is empty")
        return text

    def number(self, column: str, value: object) -> float | None:
        """Epoch seconds; out-of-range values are clamped to what a datetime can hold."""
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.bad(column, f"holds a {type(value).__name__}, not a number")
        try:
            number = float(value)
        except OverflowError:
            raise self.bad(column, "is out of range") from None
        if math.isnan(number):
            raise self.bad(column, "is NaN")
        return min(max(number, _EPOCH_MIN), _EPOCH_MAX)

    def required_number(self, column: str, value: object) -> float:
        number = self.number(column, value)
        if number is None:
            raise self.bad(column, "is empty")
        return number

    def integer(self, column: str, value: object, high: int) -> int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.bad(column, f"holds a {type(value).__name__}, not an integer")
        if not 0 <= value <= high:
            raise self.bad(column, f"is out of range ({value})")
        return value

    def when(self, column: str, value: object) -> datetime | None:
        return to_datetime(self.number(column, value))


def _opened(
    r: _Row, seal: Seal | None, table: str, column: str, generation: object, value: object
) -> str | None:
    """A secret column as read: opened with ``seal``, or as is without one."""
    text = r.text(f"{table}.{column}", value)
    if text is None or seal is None:
        return text
    if not isinstance(generation, int):
        raise r.bad(f"{table}.{column}", "is sealed in a row without a generation")
    try:
        return seal.open(text, account=r.owner, column=f"{table}.{column}", generation=generation)
    except Unopenable as exc:
        raise r.bad(f"{table}.{column}", str(exc)) from None


def _record(account: str, row: tuple[Any, ...], seal: Seal | None = None) -> AccountRecord:
    r = _Row(account)
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
        id_token,
        i_kind,
        i_fp,
        i_started,
        i_gen,
        i_payload,
        l_holder,
        l_pid,
        l_host,
        l_exp,
        a_sealed_by,
        a_access_fp,
        a_refresh_fp,
        i_sealed_by,
    ) = row
    sealed = None
    if a_sealed_by is not None:
        kid = r.required_text("sealed_by", a_sealed_by)
        sealed = SealInfo(
            kid,
            access is not None,
            r.text("access_fp", a_access_fp) or "-",
            r.text("refresh_fp", a_refresh_fp) or "-",
            r.number("expires_at", expires_at),
        )
        # Without the seal (only a read-only journal gets this far): no tokens.
        access = _opened(r, seal, "accounts", "access_token", generation, access)
        refresh = _opened(r, seal, "accounts", "refresh_token", generation, refresh)
        id_token = _opened(r, seal, "accounts", "id_token", generation, id_token)
        if seal is None:
            access = refresh = id_token = None
    elif any(is_sealed(v) for v in (access, refresh, id_token)):
        # Name the key of the sealed value (the access token may be the plain one).
        kid = next(key_id_of(v) for v in (access, refresh, id_token) if is_sealed(v))
        raise r.bad("sealed_by", f"is empty beside a value sealed by {kid}")
    if i_sealed_by is not None:
        r.required_text("intents.sealed_by", i_sealed_by)
        i_payload = (
            None if seal is None else _opened(r, seal, "intents", "payload", i_gen, i_payload)
        )
    tokens = None
    if r.text("access_token", access):
        received = r.when("received_at", received_at)
        expires = r.number("expires_at", expires_at)
        if expires is not None and received is not None:
            # A row from before the cap (or edited by hand): the same cap as on write.
            expires = min(expires, received.timestamp() + MAX_LIFETIME)
        try:
            tokens = TokenSet(
                access,
                r.text("refresh_token", refresh) or None,
                to_datetime(expires),
                received,
                r.text("token_type", token_type) or "Bearer",
                r.text("scope", scope),
                r.text("id_token", id_token) or None,
            )
        except ValueError as exc:
            raise r.bad("access_token", f"does not make a token pair ({exc})") from None
    intent = None
    if i_kind is not None:
        if i_kind not in ("refresh", "sign_out", "device_code"):
            raise r.bad("intents.kind", f"is not a known kind ({i_kind!r})")
        intent = Intent(
            i_kind,
            r.required_text("intents.refresh_fp", i_fp),
            r.required_number("intents.started_at", i_started),
            r.integer("intents.generation", i_gen, _MAX_GENERATION),
            r.text("intents.payload", i_payload),
        )
    lease = None
    if l_holder is not None:
        lease = Lease(
            r.required_text("leases.holder", l_holder),
            r.integer("leases.pid", l_pid, MAX_PID),
            r.required_text("leases.host", l_host),
            r.required_number("leases.expires_at", l_exp),
        )
    return AccountRecord(
        account,
        tokens,
        r.integer("generation", generation or 0, _MAX_GENERATION),
        r.text("ended_code", ended_code),
        r.number("ended_at", ended_at),
        intent,
        lease,
        sealed,
    )
