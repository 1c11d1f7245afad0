"""`tokenjournal reseal`: every row of a journal sealed under one key, at once.

After a key rotation (``Seal.from_key_file(new, previous=[old])``) rows are re-sealed under
the new key as they are written; this does all of them in one transaction, so the old key
can go. A plain journal is sealed in place the same way. Nothing printed holds a token or a
key: only key ids and counts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sqlite3
import sys
from pathlib import Path
from typing import Final, TextIO

from .._errors import JournalError, TokenJournalError
from .._journal import SQLiteJournal
from .._seal import Seal
from .._terminal import printable
from ._args import Formatter, Subparsers
from .status import journal_file

EXIT_FAILED: Final = 1

DESCRIPTION: Final = """\
Seal every row of a journal under one key, in one transaction, then scrub the WAL so the
old sealed (or plain) values are left in no file. Use it after a key rotation, so the old
key is no longer needed, or to seal a journal written without a seal.

The new key comes from exactly one of --key-file, --key-env, --key-credential or
--keyring; each --previous-* option names a key the journal may still be sealed with. A
journal sealed with a key none of them holds is refused (one line naming the key id it
needs) and left byte-for-byte unchanged."""

EPILOG: Final = """\
examples:
  rotate a key file:
    tokenjournal reseal --journal /var/lib/myapp/tokens.db \\
        --key-file /etc/myapp/journal.key.new --previous-key-file /etc/myapp/journal.key
  seal a plain journal with the desktop keyring's key for "myapp":
    tokenjournal reseal --journal ~/.local/state/myapp/tokens.db --keyring myapp
  key from a secrets manager (base64 in the environment):
    MYAPP_JOURNAL_KEY=... tokenjournal reseal --journal tokens.db --key-env MYAPP_JOURNAL_KEY"""


def make_seal(ns: argparse.Namespace) -> Seal:
    """The seal the options describe (the new key, and the previous ones)."""
    previous: list[Seal] = []
    for path in ns.previous_key_file or ():
        try:  # loaded, never made: a mistyped path is an error, not a new random key
            previous.append(Seal.from_key_file(path, create=False))
        except ValueError as exc:
            raise ValueError(f"--previous-key-file: {exc}") from None
    previous += [Seal.from_env(n) for n in ns.previous_key_env or ()]
    if ns.key_file is not None:
        return Seal.from_key_file(ns.key_file, previous=previous)
    if ns.key_env is not None:
        return Seal.from_env(ns.key_env, previous=previous)
    if ns.key_credential is not None:
        return Seal.from_systemd_credential(ns.key_credential, previous=previous)
    return Seal.from_keyring(ns.keyring, previous=previous)


def _holds_no_journal(path: Path) -> bool:
    """Whether ``path`` is an SQLite file (or an empty one) at schema 0 with no tables: a
    journal-to-be, which opening it writable would make. Read-only; unreadable: ``False``
    (the journal's own open says what is wrong)."""
    uri = path.absolute().as_uri() + "?mode=ro"
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=0)) as conn:
            version, objects = conn.execute(
                "SELECT (SELECT user_version FROM pragma_user_version),"
                " (SELECT count(*) FROM sqlite_master)"
            ).fetchone()
    except sqlite3.Error:
        return False
    return int(version) == 0 and int(objects) == 0


def _journal_to_reseal(path: str | Path) -> Path:
    """The journal file at ``path``; :class:`~tokenjournal.JournalError` when there is none
    (missing, not a file, empty or a journal-to-be), as ``status`` says it."""
    shown = journal_file(path)
    if _holds_no_journal(shown):
        raise JournalError(f"journal {shown} is not a tokenjournal journal (schema 0)")
    return shown


async def reseal(path: str | Path, seal: Seal) -> int:
    """Open the journal with ``seal`` (which seals a plain one in place) and re-seal every
    row under its key; returns how many rows changed.

    Never makes a journal: a path that holds none (missing, not a file, empty) is refused
    as ``status`` refuses it, and nothing is written.
    """
    shown = await asyncio.to_thread(_journal_to_reseal, path)
    journal = SQLiteJournal(shown, seal=seal)
    await journal.open()  # rows an old key sealed are re-sealed as it opens
    try:
        return journal.sealed_at_open + await journal.reseal()
    finally:
        await journal.close()


def run_reseal(
    ns: argparse.Namespace, *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """The command: one line on stdout, or one on stderr and status 1."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        # First the refusals that need no key: a mistyped --journal must not leave behind
        # the new random key that --key-file makes when its file is missing.
        _journal_to_reseal(ns.journal)
        seal = make_seal(ns)
        changed = asyncio.run(reseal(ns.journal, seal))
    except (TokenJournalError, ValueError, RuntimeError, OSError) as exc:
        err.write(f"tokenjournal reseal: {printable(exc, limit=4096)}\n")
        return EXIT_FAILED
    where = printable(ns.journal, limit=4096)
    out.write(f"{where}: {changed} row(s) re-sealed; sealed (key id {seal.key_id})\n")
    return 0


def register(sub: Subparsers) -> None:
    """Add ``reseal`` and its options to the command line."""
    parser = sub.add_parser(
        "reseal",
        help="seal every row of a journal under one key (after a rotation)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=Formatter,
    )
    parser.add_argument(
        "--journal", required=True, metavar="PATH", help="the journal file (~ is expanded)"
    )
    key = parser.add_mutually_exclusive_group(required=True)
    key.add_argument("--key-file", metavar="PATH", help="32-byte key file (made 0600 if missing)")
    key.add_argument("--key-env", metavar="NAME", help="environment variable with a base64 key")
    key.add_argument(
        "--key-credential", metavar="NAME", help="systemd credential ($CREDENTIALS_DIRECTORY)"
    )
    key.add_argument("--keyring", metavar="SERVICE", help="the desktop keyring's key for SERVICE")
    parser.add_argument(
        "--previous-key-file",
        action="append",
        metavar="PATH",
        help="a key file the journal may still be sealed with (repeatable; must exist)",
    )
    parser.add_argument(
        "--previous-key-env",
        action="append",
        metavar="NAME",
        help="an environment variable with an older base64 key (repeatable)",
    )
    parser.set_defaults(handler=run_reseal)
