"""The durable outbox (invariant 14, docs/architecture.md section 8), against the reference
server on loopback: durable before acknowledged, one Idempotency-Key for life, at most one
process in flight per item, settled only by a 2xx or a permanent refusal.

No test sleeps for timing: waits poll a condition with a bound, and backoff runs on the
FakeClock where a test looks at it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import tokenjournal as tj
from tokenjournal._journal import MIGRATIONS, SCHEMA_VERSION
from tokenjournal.server import ReferenceServer, ServerConfig
from tokenjournal.testing import FakeClock

from .conftest import DEMO, manager, wait_until

ROOT = Path(__file__).resolve().parents[1]
WORKER = [sys.executable, "-m", "tests.harness.outbox_worker"]
#: A drain that must finish: a bound against a hang, never reached. On a FakeClock each of
#: drain's polls moves the clock on, so the bound is long in fake seconds too.
LONG = 3600.0
URL0 = "http://127.0.0.1:1/r"  # never contacted


def readings(server: ReferenceServer) -> list[dict[str, Any]]:
    return server.readings()


def assert_once(server: ReferenceServer, expected: int) -> None:
    stats = server.stats()
    assert stats["items_applied"] == expected
    assert stats["items_applied_twice"] == 0
    uids = [r["body"].get("uid") for r in readings(server)]
    assert len(set(uids)) == len(uids) == expected


async def run_worker(*args: str, env: dict[str, str] | None = None) -> tuple[int, list[Any]]:
    proc = await asyncio.create_subprocess_exec(
        *WORKER,
        *args,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    lines = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
    assert proc.returncode is not None
    if proc.returncode not in (0, -9):
        raise AssertionError(err.decode()[-2000:])
    return proc.returncode, lines


# --------------------------------------------------------------------------- enqueue


async def test_enqueue_is_durable_and_concurrent_callers_share_commits(
    server: ReferenceServer, journal_path: Path
) -> None:
    async with manager(server, journal_path, sign_in=False) as tm:  # paused: nobody signed in
        outbox = tm.outbox("readings")
        before = tm.journal.durable_commits
        url = server.url + "/api/readings"
        ids = await asyncio.gather(*(outbox.enqueue("POST", url, json={"n": i}) for i in range(99)))
        commits = tm.journal.durable_commits - before
        assert len(set(ids)) == 99
        assert commits <= 10, f"99 concurrent enqueues took {commits} commits"
        assert (await outbox.stats()).pending == 99
    # Read back by another connection: committed, in order, ids kept.
    with contextlib.closing(sqlite3.connect(journal_path)) as db, db:
        rows = db.execute("SELECT id FROM outbox ORDER BY seq").fetchall()
    assert [r[0] for r in rows] == ids


async def test_a_crash_right_after_enqueue_returns_loses_nothing(
    server: ReferenceServer, journal_path: Path
) -> None:
    # The child is not signed in, so its items can reach the server only through the file.
    code, lines = await run_worker(
        "--url", server.url, "--journal", str(journal_path), "--mode", "enqueue_and_die",
        "--count", "5",
    )  # fmt: skip
    assert code == -9
    acknowledged = [e["id"] for e in lines if e["ev"] == "enqueued"]
    assert len(acknowledged) == 5
    async with manager(server, journal_path) as tm:
        outbox = tm.outbox("readings")
        await outbox.drain(timeout=LONG)
        assert (await outbox.stats()).delivered == 5
    assert [r["key"] for r in readings(server)] == acknowledged
    assert_once(server, 5)


async def test_credentials_are_refused_and_no_token_is_stored(
    server: ReferenceServer, journal_path: Path
) -> None:
    async with manager(server, journal_path) as tm:
        outbox = tm.outbox("readings")
        for header in ("Authorization", "cookie", "Proxy-Authorization", "Idempotency-Key"):
            with pytest.raises(ValueError, match=header):
                await outbox.enqueue("POST", server.url + "/api/readings", headers={header: "x"})
        with pytest.raises(ValueError, match="credentials"):
            await outbox.enqueue("POST", "http://u:p@127.0.0.1:1/api/readings")
        with pytest.raises(ValueError, match="json or data"):
            await outbox.enqueue("POST", server.url, json={}, data=b"")
        await outbox.enqueue("POST", server.url + "/api/readings", json={"uid": "a"})
        await outbox.drain(timeout=LONG)
        assert tm.tokens is not None
        secrets = (tm.tokens.access_token, tm.tokens.refresh_token or "-")
    with contextlib.closing(sqlite3.connect(journal_path)) as db, db:
        rows = db.execute("SELECT url, headers, body FROM outbox").fetchall()
    for row in rows:
        assert not any(s in str(row) for s in secrets)


# --------------------------------------------------------------------------- delivery


async def test_each_item_is_sent_with_its_id_as_idempotency_key_in_order(
    server: ReferenceServer, journal_path: Path
) -> None:
    server.set_api_faults([{"kind": "status", "status": 503, "count": 2}])
    async with manager(server, journal_path, clock=FakeClock()) as tm:
        outbox = tm.outbox("readings")
        ids = [
            await outbox.enqueue("POST", server.url + "/api/readings", json={"uid": f"u{n}"})
            for n in range(10)
        ]
        await outbox.drain(timeout=LONG)
        stats = await outbox.stats()
    assert (stats.pending, stats.delivered, stats.dead) == (0, 10, 0)
    assert [r["key"] for r in readings(server)] == ids  # FIFO, the key is the id
    assert_once(server, 10)


async def test_a_lost_answer_is_retried_with_the_same_key_and_applied_once(
    server: ReferenceServer, journal_path: Path
) -> None:
    server.set_api_faults([{"kind": "drop_after_commit", "count": 2}])
    async with manager(server, journal_path, clock=FakeClock()) as tm:
        outbox = tm.outbox("readings")
        item = await outbox.enqueue("POST", server.url + "/api/readings", json={"uid": "x"})
        await outbox.drain(timeout=3600)
    stats = server.stats()
    assert stats["keys_seen_twice"] == 1  # the second drop was answered from the first answer
    assert [r["key"] for r in readings(server)] == [item]
    assert_once(server, 1)


async def test_retry_after_is_honoured_and_backoff_is_capped(
    server: ReferenceServer, journal_path: Path
) -> None:
    clock = FakeClock()
    server.set_api_faults(
        [
            {"kind": "status", "status": 429, "retry_after": 7},
            {"kind": "status", "status": 502, "count": 12},
        ]
    )
    async with manager(server, journal_path, clock=clock) as tm:
        outbox = tm.outbox("readings", max_backoff=2.0)
        await outbox.enqueue("POST", server.url + "/api/readings", json={"uid": "x"})
        await outbox.drain(timeout=LONG)
    assert 7 in clock.sleeps
    assert max(s for s in clock.sleeps if s != 7) <= 2.0
    assert_once(server, 1)


async def test_a_401_refreshes_once_and_replays_through_the_middleware(
    journal_path: Path,
) -> None:
    async with ReferenceServer(ServerConfig(test_mode=True, access_ttl=60)) as server:
        async with manager(server, journal_path) as tm:
            await server.advance(120)  # the access token is dead on the server only
            outbox = tm.outbox("readings")
            await outbox.enqueue("POST", server.url + "/api/readings", json={"uid": "x"})
            await outbox.drain(timeout=LONG)
        stats = server.stats()
        assert (stats["rotations"], stats["api_401"]) == (1, 1)
        assert_once(server, 1)


async def test_a_permanent_refusal_is_a_dead_letter_and_retry_dead_puts_it_back(
    server: ReferenceServer, journal_path: Path
) -> None:
    events: list[tj.TokenEvent] = []
    server.set_api_faults([{"kind": "status", "status": 422}])
    async with manager(server, journal_path) as tm:
        tm.subscribe(events.append)
        outbox = tm.outbox("readings")
        refused = await outbox.enqueue("POST", server.url + "/api/readings", json={"uid": "a"})
        after = await outbox.enqueue("POST", server.url + "/api/readings", json={"uid": "b"})
        await outbox.drain(timeout=LONG)
        stats = await outbox.stats()
        assert (stats.pending, stats.delivered, stats.dead) == (0, 1, 1)
        [dead] = await outbox.dead_letters()
        assert (dead.id, dead.status, dead.method, dead.attempts) == (refused, 422, "POST", 1)
        assert dead.reason == "HTTP 422 Unprocessable Content" or dead.reason.startswith("HTTP 422")
        assert dead.url == server.url + "/api/readings"
        assert [r["key"] for r in readings(server)] == [after]  # delivery went on
        assert any(e.kind is tj.EventKind.OUTBOX_DEAD for e in events)
        assert await outbox.retry_dead() == 1
        await outbox.drain(timeout=LONG)
        assert await outbox.dead_letters() == []
        assert (await outbox.stats()).delivered == 2
    assert [r["key"] for r in readings(server)] == [after, refused]  # the same key
    assert_once(server, 2)


async def test_delivery_pauses_when_the_session_ends_and_resumes_after_sign_in(
    server: ReferenceServer, journal_path: Path
) -> None:
    clock = FakeClock()
    async with manager(server, journal_path, clock=clock) as tm:
        outbox = tm.outbox("readings")
        assert tm.tokens is not None and tm.tokens.refresh_token is not None
        server.state.store.revoke_by_token(tm.tokens.refresh_token, server.now(), "test")
        await outbox.enqueue("POST", server.url + "/api/readings", json={"uid": "a"})
        with pytest.raises(TimeoutError):
            await outbox.drain(timeout=5)
        assert tm.state is tj.SessionState.ENDED
        assert outbox.paused
        assert (await outbox.stats()).pending == 1  # kept, never dropped
        await outbox.enqueue("POST", server.url + "/api/readings", json={"uid": "b"})
        requests = server.stats()["api_200"] + server.stats()["api_401"]
        await tm.sign_in(**DEMO)
        await outbox.drain(timeout=LONG)
        assert not outbox.paused
        assert server.stats()["api_401"] + server.stats()["api_200"] == requests + 2
    assert_once(server, 2)


async def test_sign_out_pauses_and_keeps_the_outbox(
    server: ReferenceServer, journal_path: Path
) -> None:
    async with manager(server, journal_path, clock=FakeClock()) as tm:
        outbox = tm.outbox("readings")
        await tm.sign_out()
        await outbox.enqueue("POST", server.url + "/api/readings", json={"uid": "a"})
        with pytest.raises(TimeoutError):
            await outbox.drain(timeout=2)
        assert (await outbox.stats()).pending == 1
        await tm.sign_in(**DEMO)
        await outbox.drain(timeout=LONG)
        await tm.sign_out()
        await outbox.enqueue("POST", server.url + "/api/readings", json={"uid": "b"})
        assert await outbox.clear() == 1  # only when asked
        stats = await outbox.stats()
        assert (stats.pending, stats.delivered) == (0, 0)
        await tm.sign_in(**DEMO)
        await outbox.drain(timeout=LONG)
    assert_once(server, 1)


async def test_unordered_delivery_keeps_at_most_concurrency_in_flight(
    server: ReferenceServer, journal_path: Path
) -> None:
    server.set_api_faults([{"kind": "delay_before", "seconds": 0.05, "count": 40}])
    in_flight = peak = 0
    original = tj.Outbox._send

    async def counting(self: tj.Outbox, item: Any) -> Any:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            return await original(self, item)
        finally:
            in_flight -= 1

    tj.Outbox._send = counting  # type: ignore[method-assign]
    try:
        async with manager(server, journal_path) as tm:
            outbox = tm.outbox("readings", ordered=False, concurrency=3)
            await asyncio.gather(
                *(
                    outbox.enqueue("POST", server.url + "/api/readings", json={"uid": f"{n}"})
                    for n in range(20)
                )
            )
            await outbox.drain(timeout=LONG)
    finally:
        tj.Outbox._send = original  # type: ignore[method-assign]
    assert 1 < peak <= 3
    assert_once(server, 20)


async def test_a_full_outbox_rejects_or_drops_the_oldest(
    server: ReferenceServer, journal_path: Path
) -> None:
    events: list[tj.TokenEvent] = []
    url = server.url + "/api/readings"
    async with manager(server, journal_path, sign_in=False) as tm:
        tm.subscribe(events.append)
        strict = tm.outbox("strict", max_items=3)
        for n in range(3):
            await strict.enqueue("POST", url, json={"uid": f"s{n}"})
        with pytest.raises(tj.OutboxFull) as raised:
            await strict.enqueue("POST", url, json={"uid": "s3"})
        assert isinstance(raised.value, tj.TokenJournalError)
        assert raised.value.code == "outbox_full"
        small = tm.outbox("small", max_bytes=200)
        with pytest.raises(tj.OutboxFull):
            await small.enqueue("POST", url, data=b"x" * 300)
        lossy = tm.outbox("lossy", max_items=3, when_full="drop_oldest")
        for n in range(5):
            await lossy.enqueue("POST", url, json={"uid": f"d{n}"})
        stats = await lossy.stats()
        assert (stats.pending, stats.dropped) == (3, 2)
        assert sum(e.kind is tj.EventKind.OUTBOX_DROPPED for e in events) == 2
        assert (await strict.stats()).pending == 3
        await tm.sign_in(**DEMO)
        await lossy.drain(timeout=LONG)
        await strict.drain(timeout=LONG)
    assert sorted(r["body"]["uid"] for r in readings(server)) == [
        "d2", "d3", "d4", "s0", "s1", "s2",
    ]  # fmt: skip


async def test_outbox_options_are_checked_and_one_object_per_name(
    server: ReferenceServer, journal_path: Path
) -> None:
    tm = tj.TokenManager(server.url, journal=journal_path)
    outbox = tm.outbox("a", ordered=False, concurrency=2)
    assert tm.outbox("a", ordered=False, concurrency=2) is outbox
    with pytest.raises(ValueError, match="other options"):
        tm.outbox("a")
    for bad in ({"max_items": 0}, {"when_full": "never"}, {"concurrency": 0}):
        with pytest.raises(ValueError):
            tm.outbox("b", **bad)
    # Infinite: the pause between tries grew without bound; refused here, not in delivery.
    for backoff in (0.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="max_backoff must be > 0 and finite"):
            tm.outbox("b", max_backoff=backoff)
    with pytest.raises(RuntimeError, match="not open"):
        await outbox.enqueue("POST", server.url)


async def test_memory_journal_outbox_delivers_too(server: ReferenceServer) -> None:
    async with manager(server, tj.MemoryJournal()) as tm:
        outbox = tm.outbox("readings", ordered=False)
        for n in range(5):
            await outbox.enqueue("POST", server.url + "/api/readings", json={"uid": f"{n}"})
        await outbox.drain(timeout=LONG)
        assert (await outbox.stats()).delivered == 5
    assert_once(server, 5)


async def test_bodies_and_tokens_never_reach_the_logs(
    server: ReferenceServer, journal_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server.set_api_faults([{"kind": "status", "status": 503}, {"kind": "status", "status": 400}])
    async with manager(server, journal_path, clock=FakeClock()) as tm:
        outbox = tm.outbox("readings")
        await outbox.enqueue("POST", server.url + "/api/readings", json={"uid": "BODY-SECRET"})
        await outbox.drain(timeout=LONG)
        assert tm.tokens is not None
        secrets = (tm.tokens.access_token, tm.tokens.refresh_token or "-", "BODY-SECRET")
        [dead] = await outbox.dead_letters()
        text = repr(dead) + repr(await outbox.stats())
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "outbox" in logged
    for secret in secrets:
        assert secret not in logged
        assert secret not in text


# --------------------------------------------------------------------------- processes


async def test_two_processes_share_one_outbox_without_double_delivery(
    server: ReferenceServer, journal_path: Path
) -> None:
    async with manager(server, journal_path):
        pass  # signed in on the shared journal
    common = ("--url", server.url, "--journal", str(journal_path), "--mode", "deliver")
    results = await asyncio.gather(
        run_worker(*common, "--count", "40", "--prefix", "a", "--unordered"),
        run_worker(*common, "--count", "40", "--prefix", "b", "--unordered"),
    )
    assert all(code == 0 for code, _ in results)
    assert server.stats()["keys_seen_twice"] == 0  # no item was ever sent twice
    assert_once(server, 80)


async def test_a_dead_holders_items_are_taken_over(
    server: ReferenceServer, journal_path: Path
) -> None:
    async with manager(server, journal_path):
        pass
    # The server holds each request a while, so the killed process dies with items leased.
    server.set_api_faults([{"kind": "delay_before", "seconds": 0.3, "count": 4}])
    proc = await asyncio.create_subprocess_exec(
        *WORKER, "--url", server.url, "--journal", str(journal_path), "--mode", "serve",
        "--count", "10", "--unordered", cwd=ROOT, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await wait_until(lambda: server.stats()["faults_injected"] >= 2)
    finally:
        proc.kill()
        await proc.wait()
    assert proc.stdout is not None
    out = (await proc.stdout.read()).decode().splitlines()
    acknowledged = {e["id"] for e in map(json.loads, out) if e["ev"] == "enqueued"}
    with contextlib.closing(sqlite3.connect(journal_path)) as db, db:
        leased = db.execute("SELECT count(*) FROM outbox WHERE holder IS NOT NULL").fetchone()[0]
    assert leased >= 1  # the dead process left leases behind
    async with manager(server, journal_path) as tm:
        outbox = tm.outbox("readings")
        await outbox.drain(timeout=LONG)
        stats = await outbox.stats()
    assert stats.pending == 0
    # Every acknowledged item arrived (one killed mid-enqueue may have arrived too), once.
    assert len(acknowledged) >= 2
    assert acknowledged <= {r["key"] for r in readings(server)}
    assert_once(server, len(readings(server)))


# --------------------------------------------------------------------------- cancellation


@pytest.mark.parametrize("steps", range(0, 60, 3))
async def test_cancelling_delivery_at_any_await_loses_nothing_and_settles_once(
    server: ReferenceServer, tmp_path: Path, steps: int
) -> None:
    journal = tmp_path / "tokens.db"
    async with manager(server, journal, sign_in=True):
        pass
    tm = tj.TokenManager(server.url, journal=journal)
    outbox = tm.outbox("readings", ordered=steps % 2 == 0)
    await tm.open()
    for n in range(3):
        await outbox.enqueue("POST", server.url + "/api/readings", json={"uid": f"u{n}"})
    for _ in range(steps):
        await asyncio.sleep(0)
    for task in list(tm._background):
        task.cancel()
    await tm.close()
    applied = server.stats()["items_applied"]
    async with manager(server, journal, sign_in=False) as tm2:
        outbox2 = tm2.outbox("readings")
        await outbox2.drain(timeout=LONG)
        stats = await outbox2.stats()
    assert stats.pending == 0 and stats.dead == 0
    assert stats.delivered == 3  # each item settled exactly once, none lost
    assert server.stats()["items_applied"] >= applied
    assert_once(server, 3)


async def test_drain_times_out_on_the_managers_clock(
    server: ReferenceServer, journal_path: Path
) -> None:
    clock = FakeClock()
    async with manager(server, journal_path, sign_in=False, clock=clock) as tm:
        outbox = tm.outbox("readings")
        await outbox.enqueue("POST", server.url + "/api/readings", json={})
        began = clock.monotonic()
        with pytest.raises(TimeoutError):
            await outbox.drain(timeout=3)
        assert 3 <= clock.monotonic() - began < 4


# --------------------------------------------------------------------------- journal


async def test_a_schema_1_journal_migrates_to_the_outbox_schema(journal_path: Path) -> None:
    journal_path.parent.mkdir(parents=True)
    with contextlib.closing(sqlite3.connect(journal_path)) as db, db:
        for statement in MIGRATIONS[0]:
            db.execute(statement)
        db.execute("INSERT INTO meta VALUES ('device_id', 'x')")
        db.execute("PRAGMA user_version = 1")
    old = tj.SQLiteJournal(journal_path, read_only=True)
    with pytest.raises(tj.JournalError, match="migrates it when it next opens it"):
        await old.open()  # read-only cannot add the newer columns: it says what to do
    journal = tj.SQLiteJournal(journal_path)
    await journal.open()
    assert await journal.outbox_summary(0.0) == []
    await journal.close()
    with contextlib.closing(sqlite3.connect(journal_path)) as db, db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
        assert db.execute("SELECT value FROM meta").fetchone()[0] == "x"


# --------------------------------------------------------------------------- status


def test_status_shows_each_outbox_pending_in_flight_dead_and_oldest_age(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tokenjournal._journal import Holder
    from tokenjournal._outbox import OutboxLimits, Settle, build_item
    from tokenjournal.cli import main

    path = tmp_path / "tokens.db"

    async def build() -> None:
        journal = tj.SQLiteJournal(path)
        await journal.open()
        now = time.time()
        items = [
            build_item("POST", "https://api.example/r", json={"s": "BODY-SECRET"}, now=now - 90)
            for _ in range(4)
        ]
        for item in items:
            await journal.outbox_add("alice", "readings", item, OutboxLimits())
        [first] = await journal.outbox_claim(
            "alice", "readings", Holder.for_this_process(), now, 3600.0 * 24 * 365 * 50, 1, True
        )
        settles = [Settle(items[3].id, 404, True, "HTTP 404"), Settle(items[2].id, 200)]
        assert await journal.outbox_settle("alice", "readings", settles) == [True, True]
        assert await journal.outbox_settle("alice", "readings", settles) == [False, False]
        assert first.id == items[0].id
        await journal.close()

    asyncio.run(build())
    assert main(["status", "--journal", str(path)]) == 0
    out = capsys.readouterr().out
    assert "outboxes  1" in out
    line = next(x for x in out.splitlines() if "alice/readings" in x)
    assert "2 pending (1 in flight), 1 dead, 1 delivered, 0 dropped, oldest" in line
    assert "BODY-SECRET" not in out
    assert main(["status", "--journal", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    [outbox] = data["outboxes"]
    assert (outbox["pending"], outbox["in_flight"], outbox["dead"]) == (2, 1, 1)
    assert outbox["oldest_age"] > 0


async def test_a_close_right_after_enqueue_stops_delivery_quietly(
    server: ReferenceServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression: the deliverer's first try could start after close() had begun; the
    middleware then raised the manager's "not open" RuntimeError out of the deliverer,
    which was logged as failed background work. Now the item just stays pending."""
    caplog.set_level(logging.WARNING, logger="tokenjournal")
    for n in range(20):
        journal = tmp_path / f"t{n}.db"
        async with manager(server, journal, sign_in=False) as tm:
            outbox = tm.outbox("readings")
            await outbox.enqueue("POST", server.url + "/api/readings", json={"n": n})
        async with manager(server, journal, sign_in=False) as tm:
            assert (await tm.outbox("readings").stats()).pending == 1
    assert not [r for r in caplog.records if "failed" in r.getMessage()]


@contextlib.asynccontextmanager
async def journal_thread_held(journal: tj.Journal) -> Any:
    """The journal's worker thread busy until the block ends: writes queue meanwhile."""
    import threading

    hold = threading.Event()
    blocker = asyncio.ensure_future(journal._run(lambda conn, abandoned: hold.wait(10)))  # type: ignore[attr-defined]
    try:
        yield
    finally:
        hold.set()
        await blocker


async def test_a_write_cancelled_before_its_group_commit_is_still_committed(
    journal_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Group commit and cancellation: a caller cancelled while its write waits for the next
    group still has it committed, in the same group as the callers that stayed (it used to
    be left out, while one cancelled a moment later was kept: the caller could not tell).
    What it can no longer hear is logged: a drop here."""
    from tokenjournal._outbox import OutboxLimits, build_item

    caplog.set_level(logging.INFO, logger="tokenjournal")
    journal = tj.SQLiteJournal(journal_path)
    await journal.open()
    try:
        await journal.outbox_add("acct", "box", build_item("POST", URL0, now=0.0), OutboxLimits())
        items = [build_item("POST", URL0, json={"n": n}, now=0.0) for n in "ab"]
        one = OutboxLimits(max_items=2, when_full="drop_oldest")
        async with journal_thread_held(journal):
            adds = [asyncio.ensure_future(journal.outbox_add("acct", "box", i, one)) for i in items]
            for _ in range(3):
                await asyncio.sleep(0)  # both writes are queued now
            adds[1].cancel()
            before = journal.durable_commits
        assert await adds[0] == 0
        assert adds[1].cancelled()  # it made room by dropping the first item: logged
        assert journal.durable_commits == before + 1  # one group, with both
        left, _ = await journal.outbox_waiting("acct", "box", None)
        assert left == 2
    finally:
        await journal.close()
    assert [r.getMessage() for r in caplog.records] == [
        "outbox box of account acct full: dropped the 1 oldest item(s)"
    ]


async def test_a_failed_write_whose_caller_was_cancelled_is_logged(
    journal_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tokenjournal")
    journal = tj.SQLiteJournal(journal_path)
    await journal.open()
    try:

        def fails(tx: Any) -> None:
            raise tj.JournalError("disk full")

        async with journal_thread_held(journal):
            write = asyncio.ensure_future(journal._batched(fails))
            await asyncio.sleep(0)
            write.cancel()
        await wait_until(lambda: bool(caplog.records))
    finally:
        await journal.close()
    assert [r.getMessage() for r in caplog.records] == [
        f"journal {journal_path}: a write whose caller was cancelled failed: disk full"
    ]


async def test_a_cancelled_enqueue_still_journals_and_delivers_its_call(
    server: ReferenceServer, journal_path: Path
) -> None:
    """Regression: an enqueue cancelled before its group commit started (a timeout around
    it, an app shutting down) stored nothing, one cancelled later stored its item: the
    caller could not tell, and enqueuing again could send the call twice. Now the write
    always runs to its end, and the call is delivered once."""
    async with manager(server, tj.SQLiteJournal(journal_path)) as tm:
        outbox = tm.outbox("readings")
        async with journal_thread_held(tm.journal):
            enqueue = asyncio.ensure_future(
                outbox.enqueue("POST", server.url + "/api/readings", json={"uid": "a"})
            )
            for _ in range(3):
                await asyncio.sleep(0)  # its write is queued behind the busy thread
            enqueue.cancel()
            with pytest.raises(asyncio.CancelledError):
                await enqueue
        await outbox.drain(timeout=LONG)
        assert (await outbox.stats()).delivered == 1
    assert_once(server, 1)


async def test_a_close_right_after_a_cancelled_enqueue_keeps_its_write(
    server: ReferenceServer, journal_path: Path
) -> None:
    """An app shutting down cancels its tasks, then closes the manager: the write of an
    enqueue cancelled before its group commit started is still made before the journal
    closes."""
    async with manager(server, tj.SQLiteJournal(journal_path), sign_in=False) as tm:
        outbox = tm.outbox("readings")
        enqueue = asyncio.ensure_future(
            outbox.enqueue("POST", server.url + "/api/readings", json={"uid": "a"})
        )
        await asyncio.sleep(0)  # it ran up to its first await; its write has not started
        enqueue.cancel()
        with pytest.raises(asyncio.CancelledError):
            await enqueue
    async with manager(server, tj.SQLiteJournal(journal_path), sign_in=False) as tm:
        assert (await tm.outbox("readings").stats()).pending == 1


async def test_a_cancelled_enqueue_that_fails_says_so_in_the_log(
    server: ReferenceServer, journal_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Its caller is gone, so a full outbox (or a failed journal) is logged: nobody else
    would hear of it, and no "exception was never retrieved" is left behind."""
    caplog.set_level(logging.WARNING, logger="tokenjournal")
    async with manager(server, tj.SQLiteJournal(journal_path), sign_in=False) as tm:
        outbox = tm.outbox("readings", max_items=1)
        await outbox.enqueue("POST", server.url + "/api/readings", json={"uid": "a"})
        async with journal_thread_held(tm.journal):
            enqueue = asyncio.ensure_future(
                outbox.enqueue("POST", server.url + "/api/readings", json={"uid": "b"})
            )
            await asyncio.sleep(0)
            enqueue.cancel()
            with pytest.raises(asyncio.CancelledError):
                await enqueue
        await wait_until(lambda: bool(caplog.records))
        assert (await outbox.stats()).pending == 1
    assert [r.getMessage() for r in caplog.records] == [
        "outbox readings of account default is full: a cancelled enqueue stored nothing"
    ]


async def test_a_401_to_an_origin_without_the_bearer_is_a_dead_letter(
    server: ReferenceServer, journal_path: Path
) -> None:
    """Regression (found by the torture run): an item addressed to an origin the bearer may
    not go to got 401 on every try and was retried for ever. No refresh can fix that; it is
    a dead letter that says why. A 401 to an allowed origin is still retried."""
    other = server.url.replace("127.0.0.1", "localhost")  # the same server, another origin
    async with manager(server, journal_path, clock=FakeClock()) as tm:
        outbox = tm.outbox("readings")
        await outbox.enqueue("POST", other + "/api/readings", json={"uid": "x"})
        await outbox.drain(timeout=LONG)
        [dead] = await outbox.dead_letters()
        assert dead.status == 401 and "origin" in dead.reason
    assert server.stats()["items_applied"] == 0
