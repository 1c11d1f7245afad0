"""`tokenjournal status` on a journal anyone may have touched (issue 18, item 4), and on
paths SQLite's URI syntax would misread."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import tokenjournal as tj
from tests.hostile.cli import run_cli
from tests.hostile.servers import ESCAPE

NOW = datetime.now(UTC).replace(microsecond=0)
TOKENS = tj.TokenSet("access-secret-xyz", "refresh-secret-xyz", NOW + timedelta(hours=1), NOW)
#: An account name that, printed raw, clears the screen and forges a "signed in" line.
EVIL_ACCOUNT = "x\x1b[2J\x1b[H\r\naccount admin\r\n  state       signed in\x07"


async def _write(path: Path) -> None:
    journal = tj.SQLiteJournal(path)
    async with tj.TokenManager("http://127.0.0.1:9", journal=journal, account=EVIL_ACCOUNT) as tm:
        await tm.set_tokens(TOKENS)
    async with tj.TokenManager("http://127.0.0.1:9", journal=journal, account="ended") as tm:
        await tm.set_tokens(TOKENS)


def tampered_journal(path: Path) -> Path:
    asyncio.run(_write(path))
    # closing(): a connection's own `with` only commits; left open, Python 3.13 warns
    # (ResourceWarning) when it is collected, in whichever test runs then.
    with contextlib.closing(sqlite3.connect(path)) as db, db:  # an attacker with write access
        db.execute("UPDATE meta SET value = ? WHERE key = 'device_id'", (ESCAPE,))
        db.execute(
            "UPDATE accounts SET ended_code = ?, ended_at = 1e300, access_token = NULL,"
            " refresh_token = NULL WHERE account = 'ended'",
            (ESCAPE,),
        )
    return path


def test_tampered_journal_text_is_escaped(tmp_path: Path) -> None:
    """Regression: the account name, device id and ended code were printed raw: escape
    sequences and CR/LF rewrote the terminal and forged a "state signed in" line."""
    run = run_cli("status", "--journal", str(tampered_journal(tmp_path / "t.db")))
    run.assert_contained({TOKENS.access_token, TOKENS.refresh_token})
    assert run.code == 0, run.err
    assert "account admin" not in run.out.splitlines()
    assert "\\x1b[2J" in run.out and "\\x0d\\x0a" in run.out
    assert "ended by the server: \\x1b]0;pwned" in run.out


@pytest.mark.parametrize("name", ["a?b.db", "c#d.db", "e%41f.db", "g?mode=rwc#.db"])
def test_a_path_with_uri_syntax_reads_that_file_and_creates_none(tmp_path: Path, name: str) -> None:
    """Regression: `file:{path}?mode=ro` unquoted: '?' or '#' cut the path short, lost
    mode=ro and created another file ('a', 'c'); '%41' read 'eAf.db'."""
    folder = tmp_path / "j"
    folder.mkdir()
    path = folder / name
    asyncio.run(_write(path))
    before = sorted(p.name for p in folder.iterdir())
    run = run_cli("status", "--journal", str(path))
    assert run.code == 0, run.err
    assert "account ended" in run.out
    # SQLite's own -wal/-shm companions of that very journal may appear; nothing else.
    after = {p.name for p in folder.iterdir()} - {f"{name}-wal", f"{name}-shm"}
    assert sorted(after) == before
