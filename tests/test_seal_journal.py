"""Invariant 15, sealed means unreadable: a journal opened with a Seal keeps no token or
device code readable in ``tokens.db``, ``-wal`` or ``-shm`` at any point (the raw bytes are
scanned, not SQL); a sealed row opens only where it was written; a wrong or missing key is a
JournalError that leaves the files byte-for-byte as they were; sealing a plain journal and
rotating keys survive a SIGKILL at each of their steps with nothing lost."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import sqlite3
import subprocess
import sys
import textwrap
import threading
from argparse import Namespace
from pathlib import Path
from typing import Any

import pytest

import tokenjournal as tj
from tokenjournal._faults import SEAL_POINTS, SESSION_POINTS
from tokenjournal.cli import main
from tokenjournal.cli.reseal import run_reseal
from tokenjournal.server import ReferenceServer

from .conftest import DEMO

KEY = bytes(range(32))
NEW_KEY = bytes(range(100, 132))
ENV = "TJ_TEST_SEAL_KEY"
DEVICE_CODE = "device-code-0123456789-secret"
SUFFIXES = ("", "-wal", "-shm")


def files(path: Path) -> dict[str, bytes]:
    """Every file of the journal as raw bytes (absent ones left out)."""
    out = {}
    for suffix in SUFFIXES:
        p = Path(f"{path}{suffix}")
        if p.exists():
            out[suffix or "db"] = p.read_bytes()
    return out


def digests(path: Path) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in files(path).items()}


def secrets_of(tokens: tj.TokenSet | None) -> set[str]:
    if tokens is None:
        return set()
    return {t for t in (tokens.access_token, tokens.refresh_token) if t}


def leaks(snapshot: dict[str, bytes], secrets: set[str]) -> list[str]:
    """Which secret (or a 16-character piece of it) shows in which file."""
    found = []
    for secret in secrets:
        pieces = {secret, secret[:16], secret[-16:]}
        for name, data in snapshot.items():
            if any(p.encode() in data for p in pieces):
                found.append(f"{tj.fingerprint(secret)} in {name}")
    return found


async def load(path: Path, seal: tj.Seal | None) -> tj._journal.AccountRecord:
    journal = tj.SQLiteJournal(path, seal=seal)
    await journal.open()
    try:
        return await journal.load("default")
    finally:
        await journal.close()


async def plain_journal(path: Path) -> tj.TokenSet:
    journal = tj.SQLiteJournal(path)
    await journal.open()
    pair = tj.TokenSet("plain-access-token-0123456789", "plain-refresh-token-0123456789")
    await journal.store_tokens("default", pair, 1.0)
    await journal.store_tokens(
        "bob", tj.TokenSet("bob-access-0123456789abc", "bob-r-0123456789"), 1.0
    )
    await journal.save_device_code("carol", DEVICE_CODE, 1.0)
    await journal.close()
    return pair


# ----------------------------------------------------------------------------- the scanner


async def test_the_scanner_finds_tokens_in_a_plain_journal(journal_path: Path) -> None:
    """Without a seal the tokens are in the file: the scan below is not blind."""
    pair = await plain_journal(journal_path)
    assert leaks(files(journal_path), secrets_of(pair) | {DEVICE_CODE})


# ----------------------------------------------------------------------------- refresh, sign-out


async def test_no_token_in_any_file_at_any_point_of_sign_in_refresh_and_sign_out(
    server: ReferenceServer, journal_path: Path
) -> None:
    seal = tj.Seal(KEY)
    seen: set[str] = set()
    snapshots: list[dict[str, bytes]] = []
    async with tj.TokenManager(server.url, journal_path, seal=seal) as tm:

        def scan(event: tj.TokenEvent) -> None:
            seen.update(secrets_of(tm.tokens))
            snapshots.append(files(journal_path))

        tm.subscribe(scan)
        seen.update(secrets_of(await tm.sign_in(**DEMO)))
        snapshots.append(files(journal_path))
        for _ in range(3):
            seen.update(secrets_of(await tm.refresh()))
            snapshots.append(files(journal_path))
        record = await tm.journal.load("default")
        assert record.sealed is not None and record.sealed.key_id == seal.key_id
        assert record.tokens == tm.tokens
        await tm.sign_out()
        snapshots.append(files(journal_path))
    snapshots.append(files(journal_path))
    assert len(seen) == 8 and len(snapshots) > 10
    assert [leak for snap in snapshots for leak in leaks(snap, seen)] == []


async def test_a_device_code_is_sealed_too(journal_path: Path) -> None:
    journal = tj.SQLiteJournal(journal_path, seal=tj.Seal(KEY))
    await journal.open()
    await journal.save_device_code("default", DEVICE_CODE, 1.0)
    assert leaks(files(journal_path), {DEVICE_CODE}) == []
    record = await journal.load("default")
    assert record.intent is not None and record.intent.payload == DEVICE_CODE
    await journal.close()
    assert leaks(files(journal_path), {DEVICE_CODE}) == []


async def test_a_sign_out_keeps_the_sealed_pair_readable(journal_path: Path) -> None:
    """Sealed values are bound to the generation, which begin_sign_out steps: the pair is
    sealed anew for it (else the next start could not finish the sign-out)."""
    journal = tj.SQLiteJournal(journal_path, seal=tj.Seal(KEY))
    await journal.open()
    pair = tj.TokenSet("a-0123456789abcdef", "r-0123456789abcdef")
    await journal.store_tokens("default", pair, 1.0)
    before = (await journal.load("default")).generation
    signing_out = await journal.begin_sign_out("default", 2.0)
    record = await journal.load("default")
    assert record.tokens == pair == signing_out.tokens
    # The row itself moved to the sign-out's generation (no second row beside it), so the
    # sign-out can be finished against it.
    assert record.generation == signing_out.generation == before + 1
    assert await journal.accounts() == ["default"]
    await journal.close()
    assert (await load(journal_path, tj.Seal(KEY))).tokens == pair


CHILD = textwrap.dedent(
    """
    import asyncio, sys
    import tokenjournal as tj

    async def main() -> None:
        seal = tj.Seal.from_env("TJ_TEST_SEAL_KEY")
        async with tj.TokenManager(sys.argv[1], sys.argv[2], seal=seal) as tm:
            if sys.argv[3] == "sign_out":
                await tm.sign_out()
            else:
                await tm.refresh()

    asyncio.run(main())
    """
)


def child_env(point: str, key: bytes = KEY) -> dict[str, str]:
    return {**os.environ, ENV: base64.b64encode(key).decode(), "TOKENJOURNAL_CRASH_AT": point}


@pytest.mark.parametrize("point", SESSION_POINTS)
async def test_no_token_in_any_file_after_a_crash_at_each_point(
    server: ReferenceServer, journal_path: Path, point: str
) -> None:
    seal = tj.Seal(KEY)
    async with tj.TokenManager(server.url, journal_path, seal=seal) as tm:
        seen = secrets_of(await tm.sign_in(**DEMO))
    mode = "sign_out" if point == "mid_sign_out" else "refresh"
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, server.url, str(journal_path), mode, env=child_env(point)
    )
    assert await child.wait() == 137
    left = files(journal_path)
    # The pair the dead process received: a grace replay repeats it, a commit stored it.
    async with tj.TokenManager(server.url, journal_path, seal=seal) as tm:
        if point != "mid_sign_out":
            seen |= secrets_of(await tm.refresh())
        seen |= secrets_of(tm.tokens)
    assert server.stats()["signins"] == 1
    assert leaks(left, seen) == [] and leaks(files(journal_path), seen) == []


# ----------------------------------------------------------------------------- rows stay put


@pytest.mark.parametrize("column", ["access_token", "refresh_token"])
async def test_a_sealed_value_copied_to_another_account_does_not_open(
    journal_path: Path, column: str
) -> None:
    journal = tj.SQLiteJournal(journal_path, seal=tj.Seal(KEY))
    await journal.open()
    await journal.store_tokens(
        "alice", tj.TokenSet("alice-a-0123456789", "alice-r-0123456789"), 1.0
    )
    await journal.store_tokens("bob", tj.TokenSet("bob-a-0123456789", "bob-r-0123456789"), 1.0)
    await journal.close()
    with (
        contextlib.closing(sqlite3.connect(journal_path)) as db,
        db,
    ):  # what someone with the file could do
        db.execute(
            f"UPDATE accounts SET {column} = (SELECT {column} FROM accounts WHERE account = "
            "'alice') WHERE account = 'bob'"
        )
    db.close()
    await journal.open()
    with pytest.raises(tj.JournalError, match=f"accounts.{column} does not open") as err:
        await journal.load("bob")
    assert "alice" not in str(err.value) or "bob" in str(err.value)
    assert (await journal.load("alice")).tokens is not None  # the others still open
    await journal.close()


async def test_a_sealed_value_from_an_older_generation_does_not_open(journal_path: Path) -> None:
    journal = tj.SQLiteJournal(journal_path, seal=tj.Seal(KEY))
    await journal.open()
    await journal.store_tokens("default", tj.TokenSet("old-a-0123456789", "old-r-0123456789"), 1.0)
    with contextlib.closing(sqlite3.connect(journal_path)) as db, db:
        old = db.execute("SELECT refresh_token FROM accounts").fetchone()[0]
    db.close()
    await journal.store_tokens("default", tj.TokenSet("new-a-0123456789", "new-r-0123456789"), 2.0)
    with (
        contextlib.closing(sqlite3.connect(journal_path)) as db,
        db,
    ):  # a backup's older token put back
        db.execute("UPDATE accounts SET refresh_token = ?", (old,))
    db.close()
    with pytest.raises(tj.JournalError, match="refresh_token does not open"):
        await journal.load("default")
    await journal.close()


# ----------------------------------------------------------------------------- wrong keys


DIES_WITH_WAL = textwrap.dedent(
    """
    import asyncio, os, sys
    import tokenjournal as tj

    async def main() -> None:
        journal = tj.SQLiteJournal(sys.argv[1], seal=tj.Seal.from_env("TJ_TEST_SEAL_KEY"))
        await journal.open()
        record = await journal.load("default")
        holder = tj._journal.Holder.for_this_process()
        await journal.begin_refresh("default", holder, record.generation, 1.0, 20.0)
        os._exit(137)  # the intent is in the WAL, not yet checkpointed into the file

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("other", [None, tj.Seal(NEW_KEY)], ids=["no-seal", "another-key"])
@pytest.mark.parametrize("wal", ["closed", "in-use", "left-by-a-crash"])
async def test_a_wrong_or_missing_key_is_a_journal_error_and_changes_no_byte(
    server: ReferenceServer, journal_path: Path, other: tj.Seal | None, wal: str
) -> None:
    seal = tj.Seal(KEY)
    async with tj.TokenManager(server.url, journal_path, seal=seal) as tm:
        pair = await tm.sign_in(**DEMO)
    holder = tj.SQLiteJournal(journal_path, seal=seal)
    if wal == "in-use":  # another process has it open, with frames in the WAL
        await holder.open()
        await holder.store_tokens("bob", tj.TokenSet("bob-a-0123456789", "bob-r-0123456789"), 1.0)
    elif wal == "left-by-a-crash":  # the last connection to close would checkpoint it
        done = subprocess.run(
            [sys.executable, "-c", DIES_WITH_WAL, str(journal_path)], env=child_env(""), check=False
        )
        assert done.returncode == 137
    before = digests(journal_path)
    assert ("-wal" in before) == (wal != "closed")
    if wal == "left-by-a-crash":
        assert len(files(journal_path)["-wal"]) > 0
    tm = tj.TokenManager(server.url, journal_path, seal=other)
    with pytest.raises(tj.JournalError, match=f"key id {seal.key_id}") as err:
        await tm.open()
    assert "left untouched" in str(err.value)
    assert digests(journal_path) == before
    await holder.close()
    record = await load(journal_path, seal)
    assert record.tokens == pair  # never signed out
    assert (record.intent is not None) == (wal == "left-by-a-crash")
    assert server.stats()["refresh_requests"] == 0


async def test_a_plain_process_cannot_write_after_another_sealed_the_journal(
    journal_path: Path,
) -> None:
    plain = tj.SQLiteJournal(journal_path)
    await plain.open()
    await plain.store_tokens(
        "default", tj.TokenSet("a-0123456789abcdef", "r-0123456789abcdef"), 1.0
    )
    sealing = tj.SQLiteJournal(journal_path, seal=tj.Seal(KEY))
    await sealing.open()  # seals in place
    pair = tj.TokenSet("a2-0123456789abcdef", "r2-0123456789abcdef")
    with pytest.raises(tj.JournalError) as err:
        await plain.store_tokens("default", pair, 2.0)
    assert str(err.value) == (
        f"journal {journal_path} was sealed (key id {tj.Seal(KEY).key_id}) by another process "
        "since this one opened it; open it with that seal"
    )
    await plain.close()
    await sealing.close()
    assert leaks(files(journal_path), secrets_of(pair)) == []


async def test_a_read_only_open_with_the_wrong_key_is_refused(journal_path: Path) -> None:
    """Read-only opens have no probe (they write nothing): the connection's check refuses a
    seal that does not hold the journal's key, before any row is read."""
    sealed = tj.SQLiteJournal(journal_path, seal=tj.Seal(KEY))
    await sealed.open()
    await sealed.store_tokens("default", tj.TokenSet("a-0123456789abcdef", "r-0123456789"), 1.0)
    await sealed.close()
    other = tj.Seal(NEW_KEY)
    with pytest.raises(tj.JournalError) as err:
        await tj.SQLiteJournal(journal_path, seal=other, read_only=True).open()
    assert str(err.value).startswith(
        f"journal {journal_path} is sealed with key id {tj.Seal(KEY).key_id}, which this seal "
        f"(key id {other.key_id}) does not hold"
    )


async def test_a_sealing_only_the_wal_knows_is_refused_at_open(
    journal_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A reader held its snapshot while another process sealed the journal in place, so the
    sealing could not be checkpointed: the main file still reads plain, and the probe at
    open (which reads the main file alone) finds nothing. The check on the real connection
    sees the WAL and refuses a process without the key."""
    await plain_journal(journal_path)
    with contextlib.closing(sqlite3.connect(journal_path, isolation_level=None)) as reader:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM accounts").fetchall()
        sealing = tj.SQLiteJournal(journal_path, seal=tj.Seal(KEY), busy_timeout=0.1)
        with caplog.at_level(logging.WARNING, logger="tokenjournal"):
            await sealing.open()  # sealed in the WAL; the checkpoint waits for the reader
        plain = tj.SQLiteJournal(journal_path)
        try:
            with pytest.raises(tj.JournalError) as err:
                await plain.open()
        finally:
            reader.execute("COMMIT")
            await sealing.close()
    assert str(err.value).startswith(
        f"journal {journal_path} is sealed (key id {tj.Seal(KEY).key_id}); open it with that key"
    )


async def test_a_process_whose_key_was_rotated_away_cannot_write_under_it(
    journal_path: Path,
) -> None:
    """Another process rotated the journal to a key this one's seal does not hold: a write
    under the old key would hide the row from every process on the new one. The error
    names the key the journal now needs and the keys this seal holds."""
    retired = tj.Seal(bytes(range(200, 232)))
    old, new = tj.Seal(KEY, previous=[retired]), tj.Seal(NEW_KEY, previous=[tj.Seal(KEY)])
    lagging = tj.SQLiteJournal(journal_path, seal=old)
    await lagging.open()
    first = tj.TokenSet("a-0123456789abcdef", "r-0123456789abcdef")
    await lagging.store_tokens("default", first, 1.0)
    rotating = tj.SQLiteJournal(journal_path, seal=new)
    await rotating.open()  # re-seals every row under the new key
    pair = tj.TokenSet("a2-0123456789abcdef", "r2-0123456789abcdef")
    message = (
        f"journal {journal_path} was sealed with key id {new.key_id} by another process "
        f"since this one opened it; this seal holds {old.key_id}, {retired.key_id}"
    )
    with pytest.raises(tj.JournalError) as err:
        await lagging.store_tokens("default", pair, 2.0)
    assert str(err.value) == message
    await lagging.close()
    assert (await rotating.load("default")).tokens == first  # the refused write left no trace
    await rotating.close()
    assert leaks(files(journal_path), secrets_of(pair)) == []


def test_a_seal_goes_with_a_path_not_a_journal_object(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="seal= goes with a journal path"):
        tj.TokenManager("http://127.0.0.1:1", tj.MemoryJournal(), seal=tj.Seal(KEY))
    tm = tj.TokenManager("http://127.0.0.1:1", tmp_path / "t.db", seal=tj.Seal(KEY))
    assert isinstance(tm.journal, tj.SQLiteJournal) and tm.journal.seal is not None
    assert "Seal(key_id=" in repr(tm.journal)


# ----------------------------------------------------------------------------- migration


async def test_a_plain_journal_is_sealed_in_place_and_the_plain_bytes_leave_every_file(
    journal_path: Path,
) -> None:
    pair = await plain_journal(journal_path)
    seal = tj.Seal(KEY)
    journal = tj.SQLiteJournal(journal_path, seal=seal)
    await journal.open()
    commits = journal.durable_commits
    assert commits == 1  # one transaction
    assert leaks(files(journal_path), secrets_of(pair) | {DEVICE_CODE}) == []
    assert (await journal.load("default")).tokens == pair
    assert (await journal.load("carol")).intent.payload == DEVICE_CODE  # type: ignore[union-attr]
    await journal.close()
    assert leaks(files(journal_path), secrets_of(pair) | {DEVICE_CODE}) == []
    with pytest.raises(tj.JournalError, match=seal.key_id):
        await load(journal_path, None)


def table_rows(path: Path) -> dict[str, list[dict[str, object]]]:
    """Every row of the journal's tables as stored (raw SQL, in rowid order)."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.row_factory = sqlite3.Row
        return {
            table: [dict(r) for r in db.execute(f"SELECT * FROM {table} ORDER BY rowid")]
            for table in ("meta", "accounts", "intents", "leases", "outbox", "outbox_counts")
        }


async def test_sealing_in_place_seals_each_secret_of_every_row_and_changes_nothing_else(
    journal_path: Path,
) -> None:
    """Every secret column of every row (an account's three tokens, a device code, an outbox
    item's headers and body) is sealed, a row's keyed fingerprints are set as a sealed write
    sets them, the count is the rows changed; every other column, a NULL secret and a row
    with no secret left (first in the file here) stay exactly as they were."""
    from tokenjournal._journal import Holder
    from tokenjournal._outbox import OutboxLimits, build_item
    from tokenjournal._seal import is_sealed

    plain = tj.SQLiteJournal(journal_path)
    await plain.open()
    await plain.store_tokens("ended", tj.TokenSet("ended-a-0123456789", "ended-r-0123456"), 1.0)
    await plain.end_session("ended", "invalid_grant", 2.0)  # no secret left in its row
    alice = tj.TokenSet("alice-a-0123456789", "alice-r-0123456789", id_token="alice-id-012345")
    bob = tj.TokenSet("bob-a-0123456789", None)
    await plain.store_tokens("alice", alice, 3.0)
    await plain.store_tokens("bob", bob, 4.0)
    await plain.save_device_code("carol", DEVICE_CODE, 5.0)
    item = build_item(
        "POST", "https://api.example/r", json={"s": BODY_SECRET}, headers={"X-K": "v"}, now=6.0
    )
    await plain.outbox_add("alice", "readings", item, OutboxLimits())
    await plain.close()
    before = table_rows(journal_path)

    seal = tj.Seal(KEY)
    journal = tj.SQLiteJournal(journal_path, seal=seal)
    await journal.open()
    try:
        assert journal.sealed_at_open == 4  # alice, bob, carol's device code, the item
        after = table_rows(journal_path)
        expected = {**before, "meta": [*before["meta"], {"key": "sealed_by", "value": seal.key_id}]}
        secret = {
            "accounts": ("access_token", "refresh_token", "id_token"),
            "intents": ("payload",),
            "outbox": ("body", "headers"),
        }
        for table, columns in secret.items():
            rows = []
            for old, new in zip(before[table], after[table], strict=True):
                row = dict(old)
                if any(old[c] is not None for c in columns):
                    row["sealed_by"] = seal.key_id
                    for c in columns:
                        assert (new[c] is None) == (old[c] is None), (table, c)
                        assert old[c] is None or is_sealed(new[c]), (table, c)
                        row[c] = new[c]
                    if table == "accounts":
                        row["access_fp"] = seal.fingerprint(str(old["access_token"]))
                        row["refresh_fp"] = seal.fingerprint(old["refresh_token"])  # type: ignore[arg-type]
                rows.append(row)
            expected[table] = rows
        assert after == expected
        assert [r["refresh_fp"] for r in after["accounts"]] == [
            None,
            seal.fingerprint(alice.refresh_token),
            "-",
        ]
        # ... and each opens to what was there.
        assert (await journal.load("alice")).tokens == alice
        assert (await journal.load("bob")).tokens == bob
        assert (await journal.load("carol")).intent.payload == DEVICE_CODE  # type: ignore[union-attr]
        assert (await journal.load("ended")).ended_code == "invalid_grant"
        claimed = await journal.outbox_claim(
            "alice", "readings", Holder.for_this_process(), 7.0, 30.0, 10, False
        )
        assert claimed == [dataclasses.replace(item, seq=1, attempts=1)]
    finally:
        await journal.close()


SEALER = textwrap.dedent(
    """
    import asyncio, sys
    import tokenjournal as tj

    async def main() -> None:
        journal = tj.SQLiteJournal(sys.argv[1], seal=tj.Seal.from_env("TJ_TEST_SEAL_KEY"))
        await journal.open()

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("point", SEAL_POINTS)
async def test_sealing_in_place_survives_a_sigkill_at_each_step(
    journal_path: Path, point: str
) -> None:
    pair = await plain_journal(journal_path)
    done = subprocess.run(
        [sys.executable, "-c", SEALER, str(journal_path)], env=child_env(point), check=False
    )
    assert done.returncode == 137
    record = await load(journal_path, tj.Seal(KEY))  # the next open finishes the job
    assert record.tokens == pair
    assert leaks(files(journal_path), secrets_of(pair) | {DEVICE_CODE}) == []
    assert (await load(journal_path, tj.Seal(KEY))).sealed is not None


# ----------------------------------------------------------------------------- rotation


async def test_rotation_reseals_every_row_when_the_new_key_first_opens_the_journal(
    journal_path: Path,
) -> None:
    """``previous=``: rows an old key sealed are opened with it and re-sealed under the new
    key at the first open (in one transaction), and every row written after is new-keyed;
    from then on the old key is not needed. ``reseal`` finds nothing left to do."""
    old, new = tj.Seal(KEY), tj.Seal(NEW_KEY, previous=[tj.Seal(KEY)])
    journal = tj.SQLiteJournal(journal_path, seal=old)
    await journal.open()
    await journal.store_tokens("default", tj.TokenSet("a-0123456789abcdef", "r-0123456789abc"), 1.0)
    bob = tj.TokenSet("bob-a-0123456789", "bob-r-0123456789")
    await journal.store_tokens("bob", bob, 1.0)
    await journal.close()

    journal = tj.SQLiteJournal(journal_path, seal=new)
    await journal.open()
    assert (await journal.load("bob")).sealed.key_id == new.key_id  # type: ignore[union-attr]
    pair = tj.TokenSet("a2-0123456789abcdef", "r2-0123456789abc")
    await journal.store_tokens("default", pair, 2.0)  # written: under the new key
    assert (await journal.load("default")).sealed.key_id == new.key_id  # type: ignore[union-attr]
    assert await journal.reseal() == 0
    await journal.close()
    only_new = tj.SQLiteJournal(journal_path, seal=tj.Seal(NEW_KEY))
    await only_new.open()
    assert (await only_new.load("bob")).tokens == bob
    assert (await only_new.load("default")).tokens == pair
    await only_new.close()
    with pytest.raises(tj.JournalError, match=new.key_id):
        await load(journal_path, old)


async def test_reseal_takes_the_older_keys_values_out_of_every_file(journal_path: Path) -> None:
    """A row a process on the older key re-sealed after this one opened: ``reseal`` seals it
    under this key and checkpoints, so the older key's value is in no file (that key may
    leak once retired). One row: the smallest re-seal scrubs too."""
    newer = tj.Seal(NEW_KEY, previous=[tj.Seal(KEY)])
    journal = tj.SQLiteJournal(journal_path, seal=newer)
    await journal.open()
    pair = tj.TokenSet("a-0123456789abcdef", "r-0123456789abcdef")
    await journal.store_tokens("default", pair, 1.0)
    lagging = tj.SQLiteJournal(journal_path, seal=tj.Seal(KEY, previous=[tj.Seal(NEW_KEY)]))
    await lagging.open()  # re-seals the row under the older key
    await lagging.close()
    (row,) = table_rows(journal_path)["accounts"]
    older_values = {str(row["access_token"]), str(row["refresh_token"])}
    assert row["sealed_by"] == tj.Seal(KEY).key_id
    try:
        assert await journal.reseal() == 1
        # Before the close: the last connection's close would checkpoint anyway.
        assert leaks(files(journal_path), older_values) == []
        assert (await journal.load("default")).tokens == pair
    finally:
        await journal.close()


async def test_a_reseal_with_nothing_to_do_waits_for_no_reader(
    journal_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing re-sealed, nothing replaced: no checkpoint, so another process reading the
    journal meanwhile neither holds ``reseal`` up nor earns a warning."""
    journal = tj.SQLiteJournal(journal_path, seal=tj.Seal(KEY), busy_timeout=0.1)
    await journal.open()
    await journal.store_tokens("default", tj.TokenSet("a-0123456789abcdef", "r-01234567"), 1.0)
    reader = sqlite3.connect(journal_path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM accounts").fetchall()
    try:
        with caplog.at_level(logging.DEBUG, logger="tokenjournal"):
            assert await journal.reseal() == 0
    finally:
        reader.execute("COMMIT")
        reader.close()
        await journal.close()
    assert [r.getMessage() for r in caplog.records if r.name == "tokenjournal"] == []


async def test_reseal_refuses_a_row_sealed_with_a_key_it_lacks_and_changes_nothing(
    journal_path: Path,
) -> None:
    """A row sealed under a key this seal does not hold (another process, another tool), even
    while ``meta`` still names this key: re-sealing around it would hide it behind this
    key's id. The refusal names the key, and nothing is written."""
    seal, other = tj.Seal(KEY), tj.Seal(NEW_KEY)
    journal = tj.SQLiteJournal(journal_path, seal=seal)
    await journal.open()
    await journal.store_tokens("default", tj.TokenSet("a-0123456789abcdef", "r-01234567"), 1.0)
    await journal.store_tokens("bob", tj.TokenSet("b-0123456789abcdef", "s-01234567"), 1.0)
    with contextlib.closing(sqlite3.connect(journal_path)) as db, db:
        (generation,) = db.execute(
            "SELECT generation FROM accounts WHERE account = 'bob'"
        ).fetchone()
        sealed = {
            c: other.seal(v, account="bob", column=f"accounts.{c}", generation=generation)
            for c, v in (("access_token", "b2-0123456789abcdef"), ("refresh_token", "s2-0123"))
        }
        db.execute(
            "UPDATE accounts SET access_token = ?, refresh_token = ?, sealed_by = ? "
            "WHERE account = 'bob'",
            (sealed["access_token"], sealed["refresh_token"], other.key_id),
        )
    before = table_rows(journal_path)
    try:
        with pytest.raises(tj.JournalError) as err:
            await journal.reseal()
    finally:
        await journal.close()
    assert str(err.value) == (
        f"journal {journal_path} is sealed with key id {other.key_id}, which this seal (key id "
        f"{seal.key_id}) does not hold; pass that key, or previous=[it] to rotate; the file "
        "was left untouched"
    )
    assert table_rows(journal_path) == before


def _reseal_ns(journal: Path, new: Path, old: Path) -> Namespace:
    return Namespace(
        journal=str(journal),
        key_file=str(new),
        key_env=None,
        key_credential=None,
        keyring=None,
        previous_key_file=[str(old)],
        previous_key_env=None,
    )


async def test_the_reseal_command_rotates_a_key_file(tmp_path: Path, journal_path: Path) -> None:
    old_key, new_key = tmp_path / "old.key", tmp_path / "new.key"
    old = tj.Seal.from_key_file(old_key)
    journal = tj.SQLiteJournal(journal_path, seal=old)
    await journal.open()
    pair = tj.TokenSet("a-0123456789abcdef", "r-0123456789abc")
    await journal.store_tokens("default", pair, 1.0)
    await journal.close()
    out, err = io.StringIO(), io.StringIO()
    code = await asyncio.to_thread(
        run_reseal, _reseal_ns(journal_path, new_key, old_key), out=out, err=err
    )
    new = tj.Seal.from_key_file(new_key)
    assert code == 0 and err.getvalue() == ""
    assert f"1 row(s) re-sealed; sealed (key id {new.key_id})" in out.getvalue()
    assert (await load(journal_path, new)).tokens == pair
    # Without the old key, the command refuses and names it.
    err = io.StringIO()
    ns = _reseal_ns(journal_path, tmp_path / "third.key", old_key)
    ns.previous_key_file = None
    assert await asyncio.to_thread(run_reseal, ns, out=io.StringIO(), err=err) == 1
    assert new.key_id in err.getvalue() and err.getvalue().count("\n") == 1


@pytest.mark.parametrize("point", SEAL_POINTS)
async def test_reseal_survives_a_sigkill_at_each_step(
    tmp_path: Path, journal_path: Path, point: str
) -> None:
    old_key, new_key = tmp_path / "old.key", tmp_path / "new.key"
    old = tj.Seal.from_key_file(old_key)
    journal = tj.SQLiteJournal(journal_path, seal=old)
    await journal.open()
    pair = tj.TokenSet("a-0123456789abcdef", "r-0123456789abc")
    await journal.store_tokens("default", pair, 1.0)
    await journal.save_device_code("carol", DEVICE_CODE, 1.0)
    await journal.close()
    argv = ["reseal", "--journal", str(journal_path), "--key-file", str(new_key)]
    argv += ["--previous-key-file", str(old_key)]
    code = "import sys; from tokenjournal.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run(
        [sys.executable, "-c", code, *argv], env=child_env(point), check=False, capture_output=True
    )
    assert done.returncode == 137, done.stderr
    new = tj.Seal.from_key_file(new_key, previous=[old])
    assert (await load(journal_path, new)).tokens == pair  # nothing lost
    assert await asyncio.to_thread(main, argv) == 0  # and the command finishes the job
    assert (await load(journal_path, tj.Seal.from_key_file(new_key))).tokens == pair
    assert leaks(files(journal_path), secrets_of(pair) | {DEVICE_CODE}) == []


# ----------------------------------------------------------------------------- status


async def test_status_reads_a_sealed_journal_without_the_key(
    journal_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seal = tj.Seal(KEY)
    journal = tj.SQLiteJournal(journal_path, seal=seal)
    await journal.open()
    pair = tj.TokenSet("a-0123456789abcdef", "r-0123456789abc", received_at=None)
    await journal.store_tokens("default", pair, 1.0)
    await journal.close()
    before = digests(journal_path)["db"]
    assert await asyncio.to_thread(main, ["status", "--journal", str(journal_path)]) == 0
    out = capsys.readouterr().out
    assert f"sealed (key id {seal.key_id})" in out and "signed in" in out
    assert seal.fingerprint(pair.refresh_token) in out
    assert pair.refresh_token not in out and pair.access_token not in out
    assert digests(journal_path)["db"] == before


# ----------------------------------------------------------------------------- the outbox

BODY_SECRET = "reading-body-secret-0123456789"
HEADER_SECRET = "header-secret-value-0123456789"


async def test_outbox_bodies_and_headers_are_sealed_and_still_delivered(
    server: ReferenceServer, journal_path: Path
) -> None:
    """An item's body and headers are secrets too (a reading, an API key): sealed in every
    file, opened again for delivery, and the server gets them as enqueued."""
    api = server.url + "/api/readings"
    async with tj.TokenManager(
        server.url, journal_path, seal=tj.Seal(KEY), allowed_origins=[server.url]
    ) as tm:
        await tm.sign_in(**DEMO)
        outbox = tm.outbox("readings")
        await outbox.enqueue(
            "POST", api, json={"note": BODY_SECRET}, headers={"X-Api-Key": HEADER_SECRET}
        )
        assert leaks(files(journal_path), {BODY_SECRET, HEADER_SECRET}) == []
        await outbox.drain(timeout=30)
    assert leaks(files(journal_path), {BODY_SECRET, HEADER_SECRET}) == []
    applied = server.readings()
    assert len(applied) == 1 and BODY_SECRET in json.dumps(applied[0])


async def test_a_sealed_body_copied_to_another_item_does_not_open(journal_path: Path) -> None:
    """The error names the outbox item the body was copied to (by its id), on a claim and on
    the re-seal of a key rotation, which changes nothing."""
    from tokenjournal._journal import Holder
    from tokenjournal._outbox import OutboxLimits, build_item

    journal = tj.SQLiteJournal(journal_path, seal=tj.Seal(KEY))
    await journal.open()
    items = [build_item("POST", "https://api.example/r", json={"n": n}, now=1.0) for n in (0, 1)]
    for item in items:
        await journal.outbox_add("default", "readings", item, OutboxLimits())
    await journal.close()
    with contextlib.closing(sqlite3.connect(journal_path)) as db, db:
        first = db.execute("SELECT body FROM outbox ORDER BY seq LIMIT 1").fetchone()[0]
        db.execute("UPDATE outbox SET body = ? WHERE seq = (SELECT max(seq) FROM outbox)", (first,))
    with contextlib.closing(sqlite3.connect(journal_path)) as db:
        before = db.execute("SELECT * FROM outbox ORDER BY seq").fetchall()
    expected = rf"^journal outbox item '{items[1].id}': column outbox\.body does not open"
    journal = tj.SQLiteJournal(journal_path, seal=tj.Seal(KEY))
    await journal.open()
    try:
        with pytest.raises(tj.JournalError, match=expected):
            await journal.outbox_claim(
                "default", "readings", Holder.for_this_process(), 2.0, 30.0, 10, False
            )
    finally:
        await journal.close()
    rotated = tj.SQLiteJournal(journal_path, seal=tj.Seal(NEW_KEY, previous=[tj.Seal(KEY)]))
    with pytest.raises(tj.JournalError, match=expected):
        await rotated.open()
    with contextlib.closing(sqlite3.connect(journal_path)) as db:
        after = db.execute("SELECT * FROM outbox ORDER BY seq").fetchall()
    assert after == before


async def test_a_plain_outbox_is_sealed_in_place_when_a_seal_first_opens_it(
    journal_path: Path,
) -> None:
    from tokenjournal._journal import Holder
    from tokenjournal._outbox import OutboxLimits, build_item

    journal = tj.SQLiteJournal(journal_path)
    await journal.open()
    item = build_item("POST", "https://api.example/r", json={"s": BODY_SECRET}, now=1.0)
    await journal.outbox_add("default", "readings", item, OutboxLimits())
    await journal.close()
    assert leaks(files(journal_path), {BODY_SECRET})  # plain: the scan sees it
    journal = tj.SQLiteJournal(journal_path, seal=tj.Seal(KEY))
    await journal.open()
    try:
        assert leaks(files(journal_path), {BODY_SECRET}) == []
        (claimed,) = await journal.outbox_claim(
            "default", "readings", Holder.for_this_process(), 2.0, 30.0, 10, False
        )
        assert claimed.body == item.body and claimed.id == item.id
    finally:
        await journal.close()


# ----------------------------------------------------------------------------- hand-edited rows


async def _stored_then_edit(path: Path, sql: str, seal: tj.Seal | None) -> None:
    journal = tj.SQLiteJournal(path, seal=seal)
    await journal.open()
    await journal.store_tokens("default", tj.TokenSet("a-0123456789abcdef", "r-0123456789ab"), 1.0)
    await journal.close()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute(sql)
        conn.commit()


@pytest.mark.parametrize(
    ("sql", "seal", "message"),
    [
        (
            "UPDATE accounts SET access_token = 'tj1:garbage'",
            tj.Seal(KEY),
            "column accounts.access_token ",
        ),
        (
            "UPDATE accounts SET access_token = X'00ff'",
            tj.Seal(KEY),
            "column accounts.access_token holds a bytes, not text; fix or delete the row",
        ),
    ],
    ids=["sealed-garbage", "sealed-bytes"],
)
async def test_a_hand_edited_secret_column_is_named_in_the_error(
    journal_path: Path, sql: str, seal: tj.Seal | None, message: str
) -> None:
    await _stored_then_edit(journal_path, sql, seal)
    with pytest.raises(tj.JournalError, match=re.escape(f"journal account 'default': {message}")):
        await load(journal_path, tj.Seal(KEY))


def test_a_sealed_value_in_a_row_without_a_generation_is_refused_by_name() -> None:
    # Sealed values are bound to their row's generation; a row without one (hand-edited,
    # or a table that lost its column) cannot be opened, and the error says which column.
    from tokenjournal._journal import _opened, _Row

    sealed = tj.Seal(KEY).seal("x", account="default", column="accounts.access_token", generation=1)
    with pytest.raises(
        tj.JournalError,
        match=r"^journal account 'default': column accounts\.access_token is sealed in a row "
        r"without a generation; ",
    ):
        _opened(_Row("default"), tj.Seal(KEY), "accounts", "access_token", None, sealed)


async def test_opening_a_journal_already_sealed_under_the_key_writes_nothing(
    journal_path: Path,
) -> None:
    journal = tj.SQLiteJournal(journal_path, seal=tj.Seal(KEY))
    await journal.open()
    await journal.store_tokens("default", tj.TokenSet("a-0123456789abcdef", "r-0123456789ab"), 1.0)
    await journal.close()
    again = tj.SQLiteJournal(journal_path, seal=tj.Seal(KEY))
    await again.open()
    try:
        assert again.sealed_at_open == 0
        assert again.durable_commits == 0
    finally:
        await again.close()
    # A row a previous key sealed is the one case that is sealed anew at open.
    rotated = tj.SQLiteJournal(journal_path, seal=tj.Seal(NEW_KEY, previous=[KEY]))
    await rotated.open()
    try:
        assert rotated.sealed_at_open == 1
        assert rotated.durable_commits == 1
    finally:
        await rotated.close()


class HeldSeal(tj.Seal):
    """A seal whose third ``seal()`` call waits until told, and that counts its calls."""

    def __init__(self, key: bytes, **kwargs: Any) -> None:
        super().__init__(key, **kwargs)
        self.calls = 0
        self.started, self.go = threading.Event(), threading.Event()

    def seal(self, value: str, *, account: str, column: str, generation: int) -> str:
        self.calls += 1
        if self.calls == 3:
            self.started.set()
            self.go.wait(10)
        return super().seal(value, account=account, column=column, generation=generation)


async def test_a_cancelled_rotation_stops_at_the_next_row_and_keeps_the_old_seal(
    journal_path: Path,
) -> None:
    """A Ctrl-C during `tokenjournal reseal` used to wait until every row was sealed anew,
    then roll it all back (30,000 rows: 5 s after the signal, silent). The sealing now stops
    at its next row; the journal stays as it was, under the old key."""
    journal = tj.SQLiteJournal(journal_path, seal=tj.Seal(KEY))
    await journal.open()
    pairs = {
        f"acct-{i}": tj.TokenSet(f"a-{i:04d}-0123456789", f"r-{i:04d}-0123456789")
        for i in range(40)
    }
    for account, pair in pairs.items():
        await journal.store_tokens(account, pair, 1.0)
    await journal.close()

    held = HeldSeal(NEW_KEY, previous=[tj.Seal(KEY)])
    rotating = tj.SQLiteJournal(journal_path, seal=held)
    opening = asyncio.ensure_future(rotating.open())
    assert await asyncio.to_thread(held.started.wait, 10)
    opening.cancel()
    held.go.set()
    with pytest.raises(asyncio.CancelledError):
        await opening
    await rotating.close()
    assert held.calls <= 4  # the row in hand (two columns) and no further: not 80 calls
    old = tj.SQLiteJournal(journal_path, seal=tj.Seal(KEY))
    await old.open()
    assert await old.sealed_by() == tj.Seal(KEY).key_id
    assert {a: (await old.load(a)).tokens for a in pairs} == pairs
    await old.close()


async def test_a_sealed_row_whose_mark_was_cleared_is_refused_not_sealed_again(
    journal_path: Path,
) -> None:
    """A hand edit or a partial restore cleared sealed_by: the open with the key took the
    sealed text for plain and sealed it again, so "tjs1:..." became the tokens themselves
    (sent as the bearer and the refresh token), and nothing ever said so."""
    journal = tj.SQLiteJournal(journal_path, seal=tj.Seal(KEY))
    await journal.open()
    pair = tj.TokenSet("alice-acc-0123456789", "alice-ref-0123456789")
    await journal.store_tokens("alice", pair, 1.0)
    await journal.close()
    with contextlib.closing(sqlite3.connect(journal_path)) as db, db:
        db.execute("UPDATE accounts SET sealed_by = NULL")
        before = db.execute("SELECT access_token, refresh_token FROM accounts").fetchone()
    again = tj.SQLiteJournal(journal_path, seal=tj.Seal(NEW_KEY, previous=[tj.Seal(KEY)]))
    with pytest.raises(tj.JournalError, match="sealed_by is empty beside a value sealed by"):
        await again.open()
    await again.close()
    with contextlib.closing(sqlite3.connect(journal_path)) as db:
        assert db.execute("SELECT access_token, refresh_token FROM accounts").fetchone() == before
