"""`tokenjournal status`: what a journal holds, read without changing a byte of it.

The journal is opened with ``SQLiteJournal(path, read_only=True)``: no creation, no
migration, no write. Tokens are never shown, only their fingerprints. Every failure to read
(missing, locked, corrupt, newer schema) becomes one line on stderr and a non-zero exit.

A journal is a file anyone with access may have edited: every text field it holds (account,
device id, ended code, lease holder and host, the path itself) is escaped and cut short
before it is printed, and every number is rendered without trusting it to be in range.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TextIO

from .._errors import JournalError, TokenJournalError
from .._journal import AccountRecord, SQLiteJournal, pid_alive, this_host
from .._numbers import MAX_EPOCH
from .._outbox import OutboxStats
from .._terminal import printable
from .._tokens import fingerprint
from ._args import Formatter, Subparsers, positive

#: How long `status` waits for a journal another process has locked before saying so.
DEFAULT_WAIT: Final = 2.0
EXIT_UNREADABLE: Final = 1


@dataclass(frozen=True, slots=True)
class IntentStatus:
    """A pending journaled operation (a refresh the server may already have seen)."""

    kind: str
    started_at: float
    age: float
    refresh_fingerprint: str
    generation: int


@dataclass(frozen=True, slots=True)
class LeaseStatus:
    """Who holds the account's cross-process refresh lease, and whether it still counts."""

    holder: str
    pid: int
    host: str
    expires_at: float
    expired: bool
    holder_alive: bool | None  # None: another host, cannot tell


@dataclass(frozen=True, slots=True)
class AccountStatus:
    """One account as the journal holds it. Fingerprints only, never a token."""

    account: str
    state: str  # "signed_in", "ended" or "signed_out"
    generation: int
    access_fingerprint: str
    refresh_fingerprint: str
    access_expires_at: float | None
    ended_code: str | None
    ended_at: float | None
    intent: IntentStatus | None
    lease: LeaseStatus | None
    #: The key id that sealed the row (its fingerprints were kept at write, keyed), or None.
    sealed_by: str | None = None


@dataclass(frozen=True, slots=True)
class JournalStatus:
    """A whole journal at the moment it was read."""

    path: str
    device_id: str
    read_at: float
    accounts: tuple[AccountStatus, ...]
    #: The key id the journal was last sealed with; None: plain (file mode 0600 only).
    sealed_by: str | None = None
    #: Every durable outbox (per account): pending (in flight among them), dead letters,
    #: delivered and dropped so far, the oldest pending item's age.
    outboxes: tuple[OutboxStats, ...] = ()


def _account_status(record: AccountRecord, now: float) -> AccountStatus:
    tokens = record.tokens
    sealed = record.sealed
    if tokens is not None or (sealed is not None and sealed.signed_in):
        state = "signed_in"
    elif record.ended_code is not None and record.ended_code != "signed_out":
        state = "ended"
    else:
        state = "signed_out"
    intent = None
    if record.intent is not None:
        i = record.intent
        intent = IntentStatus(
            i.kind, i.started_at, now - i.started_at, i.refresh_fingerprint, i.generation
        )
    lease = None
    if record.lease is not None:
        lz = record.lease
        local = lz.host == this_host()
        lease = LeaseStatus(
            lz.holder,
            lz.pid,
            lz.host,
            lz.expires_at,
            lz.expires_at <= now,
            pid_alive(lz.pid) if local else None,
        )
    if sealed is not None:
        # Read without the key: the keyed fingerprints the journal kept when it wrote them.
        access_fp, refresh_fp = sealed.access_fingerprint, sealed.refresh_fingerprint
        expires = sealed.expires_at
    else:
        access_fp = fingerprint(tokens.access_token if tokens else None)
        refresh_fp = fingerprint(tokens.refresh_token if tokens else None)
        expires = tokens.expires_at_epoch if tokens else None
    return AccountStatus(
        account=record.account,
        state=state,
        generation=record.generation,
        access_fingerprint=access_fp,
        refresh_fingerprint=refresh_fp,
        access_expires_at=expires,
        ended_code=record.ended_code if state == "ended" else None,
        ended_at=record.ended_at,
        intent=intent,
        lease=lease,
        sealed_by=sealed.key_id if sealed is not None else None,
    )


def journal_file(path: str | os.PathLike[str]) -> Path:
    """The existing journal file at ``path`` (``~`` expanded), as every command names it.

    Raises :class:`~tokenjournal.JournalError` when nothing is there or it is not a regular
    file (a folder, a FIFO, a device). Checked before SQLite sees the path: aiosqlite leaves
    its worker thread to report a failed connect to the event loop later, which may be gone
    by then (a noisy thread error), and a FIFO would block the open.
    """
    shown = SQLiteJournal(path, read_only=True).path
    if shown.exists() and not shown.is_file():
        raise JournalError(f"journal {shown} is not a file")
    if not shown.exists():
        raise JournalError(f"journal {shown} does not exist")
    return shown


async def read_journal(
    path: str | os.PathLike[str], *, wait: float = DEFAULT_WAIT, now: float | None = None
) -> JournalStatus:
    """Read every account of the journal at ``path`` read-only.

    Raises :class:`~tokenjournal.JournalError` when the file is missing, locked for longer
    than ``wait`` seconds, corrupt, not a journal, or of a newer schema.
    """
    shown = journal_file(path)
    journal = SQLiteJournal(shown, read_only=True, busy_timeout=wait)
    await journal.open()
    try:
        device_id = await journal.device_id()
        sealed_by = await journal.sealed_by()
        records = [await journal.load(name) for name in await journal.accounts()]
        moment = time.time() if now is None else now
        outboxes = await journal.outbox_summary(moment)
    finally:
        await journal.close()
    return JournalStatus(
        str(shown),
        device_id,
        moment,
        tuple(_account_status(r, moment) for r in records),
        sealed_by,
        tuple(outboxes),
    )


# --------------------------------------------------------------------------- rendering


def when(epoch: float | None) -> str:
    """Epoch seconds as ``2030-01-02 03:04:05Z`` (``-`` for none)."""
    if epoch is None:
        return "-"
    if not (isinstance(epoch, int | float) and 0 <= epoch <= MAX_EPOCH):
        return "?"  # a tampered journal: a number no datetime holds
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def span(seconds: float) -> str:
    """A duration for people: ``45s``, ``12m 03s``, ``3h 20m``, ``9d 4h``."""
    if not isinstance(seconds, int | float) or not math.isfinite(seconds):
        return "?"
    s = int(abs(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def ago(seconds: float) -> str:
    """An age: ``3s ago``, or ``5m 00s in the future`` for a moment after now (a clock that
    was stepped back since, or a tampered journal)."""
    return f"{span(seconds)} in the future" if seconds < 0 else f"{span(seconds)} ago"


def relative(epoch: float, now: float) -> str:
    """``in 5m 00s`` or ``3s ago``."""
    delta = epoch - now if math.isfinite(epoch) and math.isfinite(now) else math.nan
    return f"in {span(delta)}" if delta >= 0 else f"{span(delta)} ago"


def _state_line(a: AccountStatus, now: float) -> str:
    if a.state == "signed_in":
        return "signed in"
    if a.state == "ended":
        at = f" at {when(a.ended_at)} ({relative(a.ended_at, now)})" if a.ended_at else ""
        return f"ended by the server: {printable(a.ended_code)}{at}; sign in again"
    return "signed out"


def _access_line(a: AccountStatus, now: float) -> str:
    if a.state != "signed_in":
        return "-"
    if a.access_expires_at is None:
        return f"{printable(a.access_fingerprint)}, no expiry given (refreshed on a 401)"
    if not math.isfinite(a.access_expires_at):
        return f"{printable(a.access_fingerprint)}, expiry unreadable"
    verb = "expires" if a.access_expires_at > now else "expired"
    return (
        f"{printable(a.access_fingerprint)}, {verb} {when(a.access_expires_at)} "
        f"({relative(a.access_expires_at, now)})"
    )


def _intent_line(a: AccountStatus) -> str:
    i = a.intent
    if i is None:
        return "none"
    what = {
        "refresh": "refresh pending (resumed on the next start, inside the grace window)",
        "sign_out": "sign-out pending (finished on the next start)",
        "device_code": "device sign-in pending",
    }.get(i.kind, printable(i.kind))
    return (
        f"{what}; started {when(i.started_at)} ({ago(i.age)}), "
        f"refresh token {printable(i.refresh_fingerprint)}, generation {i.generation}"
    )


def _lease_line(a: AccountStatus, now: float) -> str:
    lz = a.lease
    if lz is None:
        return "none"
    alive = {None: "on another host", True: "alive", False: "gone"}[lz.holder_alive]
    until = "expired" if lz.expired else f"until {when(lz.expires_at)}"
    return f"{printable(lz.holder)} (pid {lz.pid}, {alive}), {until}"


def _at_rest(key_id: str | None) -> str:
    if key_id is None:
        return "plain (file mode 0600 only)"
    return f"sealed (key id {printable(key_id)})"


def _outbox_line(o: OutboxStats) -> str:
    oldest = "-" if o.oldest_age is None else ago(o.oldest_age)
    return (
        f"  {printable(o.account)}/{printable(o.name)}: {o.pending} pending "
        f"({o.in_flight} in flight), {o.dead} dead, {o.delivered} delivered, "
        f"{o.dropped} dropped, oldest {oldest}"
    )


def render_text(status: JournalStatus) -> str:
    """The human-readable report."""
    now = status.read_at
    lines = [
        f"journal   {printable(status.path, limit=4096)}",
        f"device    {printable(status.device_id)}",
        f"at rest   {_at_rest(status.sealed_by)}",
        f"accounts  {len(status.accounts)}",
    ]
    for a in status.accounts:
        lines += [
            "",
            f"account {printable(a.account)}",
            f"  state       {_state_line(a, now)}",
            f"  access      {_access_line(a, now)}",
            f"  refresh     {printable(a.refresh_fingerprint)}",
            f"  at rest     {_at_rest(a.sealed_by) if a.state == 'signed_in' else '-'}",
            f"  generation  {a.generation}",
            f"  intent      {_intent_line(a)}",
            f"  lease       {_lease_line(a, now)}",
        ]
    if status.outboxes:
        lines += ["", f"outboxes  {len(status.outboxes)}"]
        lines += [_outbox_line(o) for o in status.outboxes]
    return "\n".join(lines)


def as_json(status: JournalStatus) -> dict[str, Any]:
    """The machine-readable report (epoch seconds; fingerprints, never tokens)."""
    data = asdict(status)
    data["schema"] = "tokenjournal.status/1"
    return data


def run_status(
    path: str,
    *,
    json_output: bool = False,
    wait: float = DEFAULT_WAIT,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """The `status` command: print the report; exit status 0, or 1 with one line on stderr."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        status = asyncio.run(read_journal(Path(path), wait=wait))
    except TokenJournalError as exc:
        err.write(f"tokenjournal status: {printable(exc, limit=4096)}\n")
        return EXIT_UNREADABLE
    except OSError as exc:  # e.g. the path names a folder we may not enter
        reason = printable(f"cannot read {path}: {exc.strerror or exc}", limit=4096)
        err.write(f"tokenjournal status: {reason}\n")
        return EXIT_UNREADABLE
    if json_output:
        out.write(json.dumps(as_json(status), indent=2) + "\n")
    else:
        out.write(render_text(status) + "\n")
    return 0


DESCRIPTION: Final = """\
Show what a journal holds, per account: signed in / ended by the server (with the code and
the time) / signed out, the access token's expiry, a pending refresh intent (its kind, start,
age and the refresh token's fingerprint), the refresh lease holder, the generation and the
device id, and whether the tokens are sealed at rest (and by which key id); per durable
outbox: items pending (and in flight), dead letters, delivered, dropped, the oldest pending
item's age. Tokens are never shown, only 8-character fingerprints (a sealed journal is read
without its key: its fingerprints are keyed hashes kept when the tokens were written); outbox
bodies never.

The journal is opened read-only and never modified. A missing, locked, corrupt or
newer-schema journal prints one line to stderr and exits with status 1."""

EPILOG: Final = """\
examples:
  tokenjournal status --journal ~/.local/state/myapp/tokens.db
  tokenjournal status --journal tokens.db --json"""


def register(sub: Subparsers) -> None:
    """Add ``status`` and its options to the command line."""
    parser = sub.add_parser(
        "status",
        help="show what a journal holds (read-only; fingerprints, never tokens)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=Formatter,
    )
    parser.add_argument(
        "--journal", required=True, metavar="PATH", help="the journal file (~ is expanded)"
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument(
        "--wait",
        type=positive,
        default=DEFAULT_WAIT,
        metavar="SECONDS",
        help="how long to wait for a journal another process has locked (default 2)",
    )
    parser.set_defaults(handler=command)


def command(ns: argparse.Namespace) -> int:
    """``tokenjournal status`` as parsed by :func:`register`."""
    return run_status(ns.journal, json_output=ns.json, wait=ns.wait)
