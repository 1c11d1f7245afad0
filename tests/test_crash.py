"""Invariant 6: a process SIGKILLed mid-refresh; the next one recovers through the grace window."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
from pathlib import Path

import tokenjournal as tj
from tokenjournal.server import ReferenceServer

from .conftest import DEMO

CHILD = textwrap.dedent(
    """
    import asyncio, sys
    import tokenjournal as tj

    async def main() -> None:
        async with tj.TokenManager(sys.argv[1], sys.argv[2]) as tm:
            print("refreshing", flush=True)
            await tm.refresh()
            print("refreshed", flush=True)  # never reached: killed while waiting

    asyncio.run(main())
    """
)


async def kill_mid_refresh(server: ReferenceServer, journal: Path) -> None:
    """Run a client that refreshes; SIGKILL it after the server rotated, before it answered."""
    # Long enough to kill the client inside it; the server holds the token lock meanwhile.
    server.set_faults([{"kind": "delay_after", "seconds": 2}])
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, server.url, str(journal), stdout=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(20):
            while server.stats()["rotations"] == 0:
                await asyncio.sleep(0.01)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        await child.wait()
        server.set_faults([])
    assert child.returncode == -signal.SIGKILL


async def test_sigkill_mid_refresh_is_recovered_through_the_grace_window(
    server: ReferenceServer, journal_path: Path
) -> None:
    async with tj.TokenManager(server.url, journal_path) as tm:
        before = await tm.sign_in(**DEMO)
    await kill_mid_refresh(server, journal_path)

    record_before = await _load(journal_path)
    assert record_before.intent is not None and record_before.intent.kind == "refresh"
    assert record_before.tokens == before  # the old pair is still the current one

    events: list[tj.EventKind] = []
    async with tj.TokenManager(server.url, journal_path) as tm:
        tm.subscribe(lambda e: events.append(e.kind))
        recovered = await tm.refresh()  # joins the recovery started by open()
        async with tm.client_session() as http, http.get(server.url + "/api/me") as response:
            assert response.status == 200
    assert recovered.refresh_token != before.refresh_token
    assert tj.EventKind.REFRESHED in events
    stats = server.stats()
    assert stats["signins"] == 1  # no new sign-in
    assert (stats["rotations"], stats["grace_replays"], stats["family_revocations"]) == (1, 1, 0)
    assert (await _load(journal_path)).intent is None


async def test_recovery_starts_on_open_without_any_call(
    server: ReferenceServer, journal_path: Path
) -> None:
    async with tj.TokenManager(server.url, journal_path) as tm:
        await tm.sign_in(**DEMO)
    await kill_mid_refresh(server, journal_path)
    async with tj.TokenManager(server.url, journal_path) as tm:
        async with asyncio.timeout(10):
            while server.stats()["grace_replays"] == 0 or tm.state is not tj.SessionState.VALID:
                await asyncio.sleep(0.01)
    assert (await _load(journal_path)).intent is None


async def test_recovery_after_the_window_ends_the_session_cleanly(
    server: ReferenceServer, journal_path: Path
) -> None:
    """The one loss no client can prevent: it ends in SessionEnded, never a hang."""
    async with tj.TokenManager(server.url, journal_path) as tm:
        await tm.sign_in(**DEMO)
    await kill_mid_refresh(server, journal_path)
    await server.advance(301)
    async with tj.TokenManager(server.url, journal_path) as tm:
        try:
            await tm.refresh()
        except tj.SessionEnded as ended:
            assert ended.code == "token_expired"
        else:
            raise AssertionError("a replay after the grace window must end the session")
        assert tm.state is tj.SessionState.ENDED


async def _load(path: Path) -> tj._journal.AccountRecord:
    journal = tj.SQLiteJournal(path, read_only=True)
    await journal.open()
    try:
        return await journal.load("default")
    finally:
        await journal.close()


async def test_a_recovery_that_fails_never_wipes_a_sign_in_made_meanwhile(
    journal_path: Path,
) -> None:
    """Found by the torture run: a journal kept a refresh intent for tokens the server no
    longer knows; a process opened it (the recovery started in the background) and signed in.
    The recovery's `invalid_token` used to end the session over the new sign-in."""
    async with ReferenceServer() as old_server, tj.TokenManager(old_server.url, journal_path) as tm:
        await tm.sign_in(**DEMO)
        record = await tm.journal.load("default")
        await tm.journal.begin_refresh("default", tm._holder, record.generation, 0.0, 0.001)
    async with ReferenceServer() as server:  # a new server: the old tokens are unknown to it
        server.set_faults([{"kind": "delay_before", "seconds": 0.3}])
        async with tj.TokenManager(server.url, journal_path) as tm:
            async with asyncio.timeout(10):
                while server.stats()["refresh_requests"] == 0:  # the recovery has sent
                    await asyncio.sleep(0.01)
            fresh = await tm.sign_in(**DEMO)  # while the recovery waits for its answer
            assert await tm.refresh() == fresh  # joins the recovery: it adopts the sign-in
            assert tm.state is tj.SessionState.VALID
        assert server.stats()["refresh_requests"] == 1
        assert (await _load(journal_path)).tokens == fresh


async def test_end_session_is_a_compare_and_swap(journal_path: Path) -> None:
    journal = tj.SQLiteJournal(journal_path)
    await journal.open()
    first = tj.TokenSet("a1", "r1")
    generation = await journal.store_tokens("default", first, 0.0)
    await journal.store_tokens("default", tj.TokenSet("a2", "r2"), 1.0)
    assert await journal.end_session("default", "invalid_token", 2.0, generation) is None
    assert (await journal.load("default")).tokens == tj.TokenSet("a2", "r2")
    await journal.close()
