"""`tokenjournal status`: reads a journal without changing it; fingerprints, never tokens."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import tokenjournal as tj
from tokenjournal._journal import SCHEMA_VERSION, Holder
from tokenjournal.cli import main

NOW = 1_800_000_000.0
DEAD = Holder("otherhost:4242:abcd1234", 4242, "otherhost")


def pair(n: int, lifetime: float = 900.0) -> tj.TokenSet:
    when = datetime.fromtimestamp(NOW, tz=UTC)
    return tj.TokenSet(
        f"access-secret-{n}", f"refresh-secret-{n}", when + timedelta(seconds=lifetime), when
    )


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def _build(path: Path) -> None:
    journal = tj.SQLiteJournal(path)
    await journal.open()
    try:
        await journal.store_tokens("alice", pair(1), NOW)
        await journal.begin_refresh("alice", DEAD, 1, NOW + 10, 30.0)
        await journal.store_tokens("bob", pair(2), NOW)
        await journal.end_session("bob", "token_expired", NOW + 20)
        await journal.store_tokens("carol", pair(3), NOW)
        leaving = await journal.begin_sign_out("carol", NOW + 30)
        await journal.finish_sign_out("carol", NOW + 31, leaving.generation)
    finally:
        await journal.close()


@pytest.fixture
def journal_file(tmp_path: Path) -> Path:
    """alice: signed in with a pending refresh and a lease; bob: ended; carol: signed out."""
    path = tmp_path / "tokens.db"
    asyncio.run(_build(path))
    return path


def status(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["status", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_text_report_shows_every_account_state_with_fingerprints_only(
    journal_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = digest(journal_file)
    code, out, err = status(capsys, "--journal", str(journal_file))
    assert (code, err) == (0, "")
    assert "account alice" in out and "account bob" in out and "account carol" in out
    assert "signed in" in out
    assert "ended by the server: token_expired at 2027-01-15 08:00:20Z" in out
    assert "signed out" in out
    # the pending refresh: kind, start, the refresh token's fingerprint, the lease holder
    assert "refresh pending" in out and "started 2027-01-15 08:00:10Z" in out
    assert f"refresh token {tj.fingerprint('refresh-secret-1')}" in out
    assert "otherhost:4242:abcd1234 (pid 4242, on another host)" in out
    assert tj.fingerprint("access-secret-1") in out
    assert "secret" not in out  # invariant 8: no token, only fingerprints
    assert digest(journal_file) == before


def test_json_report_is_machine_readable(
    journal_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = status(capsys, "--journal", str(journal_file), "--json")
    assert code == 0
    data = json.loads(out)
    accounts = {a["account"]: a for a in data["accounts"]}
    alice, bob, carol = accounts["alice"], accounts["bob"], accounts["carol"]
    assert alice["state"] == "signed_in" and alice["generation"] == 1
    assert alice["access_expires_at"] == NOW + 900
    assert alice["intent"]["kind"] == "refresh" and alice["intent"]["started_at"] == NOW + 10
    assert alice["intent"]["refresh_fingerprint"] == tj.fingerprint("refresh-secret-1")
    assert alice["lease"]["holder"] == DEAD.id and alice["lease"]["pid"] == 4242
    assert bob["state"] == "ended" and bob["ended_code"] == "token_expired"
    assert bob["ended_at"] == NOW + 20 and bob["access_fingerprint"] == "-"
    assert carol["state"] == "signed_out" and carol["ended_code"] is None
    assert len(data["device_id"]) == 36
    assert "secret" not in out


def test_a_lease_of_a_dead_local_process_is_reported_gone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "j.db"

    async def build() -> None:
        journal = tj.SQLiteJournal(path)
        await journal.open()
        holder = Holder.for_this_process()
        gone = Holder(f"{holder.host}:999999:x", 999_999_999, holder.host)
        await journal.store_tokens("a", pair(1), NOW)
        await journal.begin_refresh("a", gone, 1, NOW, 30.0)
        await journal.close()

    asyncio.run(build())
    code, out, _ = status(capsys, "--journal", str(path))
    assert code == 0 and "pid 999999999, gone" in out


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Another connection holding an exclusive lock on the journal, as a stuck writer would."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA locking_mode = EXCLUSIVE")
    conn.execute("BEGIN EXCLUSIVE")
    conn.execute("UPDATE accounts SET updated_at = updated_at")
    try:
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()


def _one_line_failure(code: int, out: str, err: str) -> None:
    assert code != 0
    assert out == ""
    assert err.startswith("tokenjournal status: ") and err.endswith("\n")
    assert err.count("\n") == 1, err


def test_missing_journal_is_one_line_and_not_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "nope" / "tokens.db"
    code, out, err = status(capsys, "--journal", str(path))
    _one_line_failure(code, out, err)
    assert "does not exist" in err
    assert not path.parent.exists()


def test_locked_journal_is_one_line_and_untouched(
    journal_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = digest(journal_file)
    with exclusive_lock(journal_file):
        code, out, err = status(capsys, "--journal", str(journal_file), "--wait", "0.2")
    _one_line_failure(code, out, err)
    assert "locked" in err
    assert digest(journal_file) == before


def test_corrupt_journal_is_one_line_and_untouched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tokens.db"
    path.write_bytes(b"\x00garbage, not SQLite\xff" * 512)
    before = digest(path)
    code, out, err = status(capsys, "--journal", str(path))
    _one_line_failure(code, out, err)
    assert "corrupt" in err
    assert digest(path) == before


def test_newer_schema_is_one_line_and_untouched(
    journal_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conn = sqlite3.connect(journal_file)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    before = digest(journal_file)
    code, out, err = status(capsys, "--journal", str(journal_file))
    _one_line_failure(code, out, err)
    assert "newer" in err and f"schema {SCHEMA_VERSION + 1}" in err
    assert digest(journal_file) == before


def test_sqlite_file_that_is_not_a_journal_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    before = digest(path)
    code, out, err = status(capsys, "--journal", str(path))
    _one_line_failure(code, out, err)
    assert "not a tokenjournal journal" in err
    assert digest(path) == before


def test_a_folder_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = status(capsys, "--journal", str(tmp_path))
    _one_line_failure(code, out, err)


def test_status_leaves_a_live_journal_usable(
    journal_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Reading never takes anything a writer needs: the next open and write still work."""
    assert status(capsys, "--journal", str(journal_file))[0] == 0

    async def write() -> int:
        journal = tj.SQLiteJournal(journal_file)
        await journal.open()
        try:
            return await journal.store_tokens("alice", pair(9), NOW + 100)
        finally:
            await journal.close()

    assert asyncio.run(write()) == 2
    assert os.stat(journal_file).st_mode & 0o777 == 0o600
