"""The OpenID Connect ID token: kept with the pair, replaced by a refresh that brings one,
kept by one that does not, journaled (schema 2), never in a repr, a log line or an event."""

from __future__ import annotations

import json
import logging
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

import tokenjournal as tj
from tokenjournal._journal import MIGRATIONS, SCHEMA_VERSION
from tokenjournal.server import ReferenceServer, ServerConfig

CLIENT = "tokenjournal-demo"
NOW = 1_700_000_000.0


def answer(**fields: object) -> bytes:
    return json.dumps({"access_token": "acc", "token_type": "Bearer", **fields}).encode()


def protocol() -> tj.OAuth2Protocol:
    return tj.OAuth2Protocol("https://auth.example.com/token", client_id="c")


def test_a_refresh_that_brings_an_id_token_replaces_it_and_one_that_brings_none_keeps_it() -> None:
    p = protocol()
    first = p.parse_tokens(200, {}, answer(refresh_token="r1", id_token="id.one.x"), NOW, None)
    assert isinstance(first, tj.TokenSet) and first.id_token == "id.one.x"
    second = p.parse_tokens(200, {}, answer(id_token="id.two.x"), NOW, first)
    assert isinstance(second, tj.TokenSet) and second.id_token == "id.two.x"
    third = p.parse_tokens(200, {}, answer(), NOW, second)
    assert isinstance(third, tj.TokenSet) and third.id_token == "id.two.x"


@pytest.mark.parametrize("bad", [7, "", "id\r\ntoken", "ïd", ["a"], None])
def test_an_unusable_id_token_keeps_the_previous_one_and_the_pair(bad: object) -> None:
    previous = tj.TokenSet("old", "r", id_token="kept.id.token")
    got = protocol().parse_tokens(200, {}, answer(id_token=bad), NOW, previous)
    assert isinstance(got, tj.TokenSet) and got.access_token == "acc"
    assert got.id_token == "kept.id.token"


def test_the_id_token_is_in_no_repr() -> None:
    tokens = tj.TokenSet("access-token-value", "refresh-token-value", id_token="ID-TOKEN-SECRET")
    assert "ID-TOKEN-SECRET" not in repr(tokens) and "ID-TOKEN-SECRET" not in str(tokens)


def test_an_empty_id_token_is_refused() -> None:
    with pytest.raises(ValueError, match="id_token"):
        tj.TokenSet("a", "r", id_token="")


async def test_the_id_token_survives_the_journal(journal_path: Path) -> None:
    journal = tj.SQLiteJournal(journal_path)
    await journal.open()
    try:
        when = datetime.fromtimestamp(NOW, UTC)
        tokens = tj.TokenSet("a", "r", None, when, "Bearer", "openid", "the.id.token")
        await journal.store_tokens("default", tokens, NOW)
        assert (await journal.load("default")).tokens == tokens
        await journal.store_tokens("default", tj.TokenSet("a2", "r2"), NOW)
        assert (await journal.load("default")).tokens == tj.TokenSet("a2", "r2")
    finally:
        await journal.close()


async def test_a_schema_1_journal_is_migrated_and_keeps_its_pair(journal_path: Path) -> None:
    """A journal written before ID tokens (schema 1) gets the column, keeps its pair and
    its device id, and reads as version 2."""
    journal_path.parent.mkdir(mode=0o700)
    conn = sqlite3.connect(journal_path)
    for statement in MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("INSERT INTO meta (key, value) VALUES ('device_id', 'dev-1')")
    conn.execute(
        "INSERT INTO accounts (account, access_token, refresh_token, generation, updated_at)"
        " VALUES ('default', 'acc', 'ref', 3, 0)"
    )
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    journal = tj.SQLiteJournal(journal_path)
    await journal.open()
    try:
        record = await journal.load("default")
        assert record.tokens == tj.TokenSet("acc", "ref") and record.generation == 3
        assert await journal.device_id() == "dev-1"
    finally:
        await journal.close()
    conn = sqlite3.connect(journal_path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
    columns = [row[1] for row in conn.execute("PRAGMA table_info(accounts)")]
    conn.close()
    assert "id_token" in columns


async def test_end_to_end_the_id_token_is_kept_renewed_and_never_logged(
    journal_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[tj.TokenEvent] = []
    async with ReferenceServer(ServerConfig(test_mode=True)) as server:
        protocol = tj.OAuth2Protocol(
            server.url + "/oauth/token", client_id=CLIENT, scope="openid offline_access"
        )
        with caplog.at_level(logging.DEBUG):
            async with tj.TokenManager(server.url, journal_path, protocol=protocol) as tm:
                tm.subscribe(events.append)
                signed = await tm.sign_in(username="demo@example.com", password="demo")
                assert signed.id_token is not None
                refreshed = await tm.refresh()
                assert refreshed.id_token is not None and refreshed.id_token != signed.id_token
                seen = [signed.id_token, refreshed.id_token, repr(tm)]
            async with tj.TokenManager(server.url, journal_path, protocol=protocol) as tm:
                assert tm.tokens is not None and tm.tokens.id_token == refreshed.id_token
    for id_token in seen[:2]:
        assert id_token not in caplog.text
        assert id_token not in seen[2]
        assert all(id_token not in repr(e) for e in events)
