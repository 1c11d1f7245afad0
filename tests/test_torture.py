"""The torture harness in CI: its short form, its fault proxy, and what it found.

``test_short_run`` runs ``python -m tests.torture --short --json`` (named crash points,
random SIGKILLs under network chaos, every network fault scenario, a short list of time
scenarios, cancellation workers and fork rounds, the outbox's crash points and kills; about
a minute and a half on an idle machine) and
asserts every must-be-zero figure. The long run behind the README's table is
``python -m tests.torture --kills 1000``.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import jwt as pyjwt
import pytest
from aioresponses import CallbackResult, aioresponses
from yarl import URL

import tokenjournal as tj
from tests.torture import journals, rules
from tests.torture.clocks import SimClock, Ticker
from tests.torture.crashes import crash_round
from tests.torture.procs import ROOT
from tests.torture.proxy import FaultProxy
from tests.torture.timephase import NoIatMinter
from tokenjournal._faults import OUTBOX_POINTS
from tokenjournal._faults import SESSION_POINTS as CRASH_POINTS
from tokenjournal._journal import Holder, Stale
from tokenjournal.server import ReferenceServer
from tokenjournal.testing import FakeClock

AUTH = "http://127.0.0.1:9"  # aioresponses answers; nothing listens there

DEVICE = {"deviceId": "0b7f3c1e-5d7a-4c36-9f1e-2f7c1d9a8b01"}
SIGNIN = {"email": "demo@example.com", "password": "demo", "deviceInfo": DEVICE}


def test_short_run_loses_no_session() -> None:
    """The CI form of the runner: every must-be-zero figure is zero, every point crashed."""
    run = subprocess.run(
        [sys.executable, "-m", "tests.torture", "--short", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert run.stdout, run.stderr[-3000:]
    figures = json.loads(run.stdout)
    command = figures["command"]  # carries the seed: the way to reproduce a failure
    assert figures["must_be_zero"] == dict.fromkeys(figures["must_be_zero"], 0), (
        command,
        figures["must_be_zero"],
        figures["crash_rounds"],
        figures["network"],
        figures["sessions_lost_details"],
        figures["exceptions_details"],
        [t for t in figures["time"] if not t["ok"]],
        figures["cancellation"]["details"],
    )
    assert run.returncode == 0 and figures["passed"], command
    for point in CRASH_POINTS:
        assert figures["crashes_injected"].get(point, 0) >= 1, (command, point)
    assert all(r["recovered"] for r in figures["crash_rounds"]), command
    assert figures["random_kills"] >= 30, command
    assert figures["server_rotations"] == figures["committed_refreshes"] > 0, command
    assert figures["outside_window_recoveries"] == figures["outside_window_clean"] >= 2
    assert all(n["ok"] for n in figures["network"]), command
    sealed = figures["sealed_kill_phase"]  # issue 16: the kills again, on sealed journals
    assert sealed["random_kills"] >= 10 and sealed["readable_tokens"] == 0, (command, sealed)
    assert sealed["server_rotations"] == sealed["committed_refreshes"] > 0, (command, sealed)
    # Phases 4 and 5 ran and bit where they must (issue 11): their rows are in the table.
    assert {"hung processes", "stuck transactions", "refresh storms"} <= set(
        figures["must_be_zero"]
    )
    kinds = {t["kind"] for t in figures["time"]}
    assert kinds == {"clock", "idle"}, (command, figures["time"])
    assert all(t["ok"] for t in figures["time"]), (command, figures["time"])
    cancel = figures["cancellation"]
    assert cancel["workers"] >= 4 and cancel["calls"] >= 60, (command, cancel)
    assert cancel["outcomes"].get("timeout", 0) >= 1, (command, cancel["outcomes"])
    assert cancel["fork_refresh_requests"] and all(
        n == 1 for n in cancel["fork_refresh_requests"]
    ), (command, cancel["details"])
    # Phase 6, the durable outbox (issue 13): every delivery crash point was hit and
    # recovered, the kills happened, readings went through, none lost or applied twice.
    outbox = figures["outbox"]
    for point in OUTBOX_POINTS:
        assert outbox["crashes_injected"].get(point, 0) >= 1, (command, point, outbox)
    assert outbox["crash_failures"] == [], (command, outbox)
    assert outbox["kills"] >= 20 and outbox["enqueued"] > 0, (command, outbox)
    assert outbox["delivered"] + outbox["dead_letters"] >= outbox["enqueued"], (command, outbox)
    assert (outbox["lost"], outbox["applied_twice"]) == (0, 0), (command, outbox)


# ----------------------------------------------------------------------------- regressions


async def test_after_send_crash_point_dies_after_the_request_reached_the_server(
    server: ReferenceServer, tmp_path: Path
) -> None:
    """Regression: aiohttp's ``on_request_chunk_sent`` runs *before* the chunk is written,
    so ``after_send`` used to die with nothing sent (a second ``after_intent``). Now the
    server has rotated when the worker dies, and the next start is a grace replay."""
    outcome = await crash_round(server, tmp_path, "after_send")
    assert outcome.crashed and outcome.recovered, outcome.problems
    stats = server.stats()
    assert (stats["rotations"], stats["grace_replays"], stats["signins"]) == (1, 1, 1)


# ----------------------------------------------------------------------------- phases 4, 5


async def test_sim_clock_steps_the_wall_clock_but_not_the_monotonic_one(
    server: ReferenceServer,
) -> None:
    clock = SimClock(server, skew=86400.0)
    assert clock.time() == pytest.approx(server.now() + 86400.0, abs=1.0)
    mono = clock.monotonic()
    clock.step(-3600.0)
    assert clock.time() == pytest.approx(server.now() + 82800.0, abs=1.0)
    assert clock.monotonic() == pytest.approx(mono, abs=1.0)
    async with Ticker(server, dt=10.0):
        before = clock.monotonic()
        await asyncio.wait_for(clock.sleep(60.0), 5.0)  # virtual seconds: a few real ticks
        assert clock.monotonic() - before >= 60.0


async def test_no_iat_minter_leaves_iat_out_and_still_verifies(server: ReferenceServer) -> None:
    async with tj.TokenManager(server.url, journal=tj.MemoryJournal()) as tm:
        minter = server.state.minter
        server.state._minter = NoIatMinter("k" * 40, 60.0)
        try:
            tokens = await tm.sign_in(email="demo@example.com", password="demo")
        finally:
            server.state._minter = minter
    claims = pyjwt.decode(tokens.access_token, options={"verify_signature": False})
    assert "exp" in claims and "iat" not in claims


@pytest.mark.parametrize(
    ("exc", "verdict"),
    [
        (TimeoutError(), "timeout"),
        (tj.SessionEnded("token_expired"), "ended"),
        (tj.NotSignedIn("x"), "not_signed_in"),
        (tj.JournalError("journal j: cannot start a transaction within a transaction"), "stuck"),
        (tj.JournalError("journal j is locked by another process beyond the busy"), "stuck"),
        (tj.JournalError("journal j is read-only"), "error"),
        (tj.NetworkError("down"), "error"),
        (RuntimeError("the TokenManager is not open: use `async with tm:`"), "misuse"),
        (RuntimeError("Safety level may not be changed inside a transaction"), "raw"),
        (ValueError("Invalid isoformat string"), "raw"),
        (RecursionError(), "raw"),
    ],
)
def test_rules_classify(exc: BaseException, verdict: str) -> None:
    """What phases 4 and 5 count: a raw error, a stuck transaction, a loss."""
    assert rules.classify(exc) == verdict


# ----------------------------------------------------------------------------- the proxy


async def _signin(url: str, timeout: float = 5.0) -> int | str:
    """POST a sign-in through ``url``; the status, or the name of the client error."""
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{url}/auth/signin", json=SIGNIN, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp,
        ):
            await resp.read()
            return resp.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        return type(exc).__name__


@pytest.mark.parametrize(
    ("mode", "reaches_server"),
    [("reset", False), ("reset_after", True), ("truncate", True)],
)
async def test_proxy_breaks_the_answer(
    server: ReferenceServer, mode: str, reaches_server: bool
) -> None:
    async with FaultProxy(server.port, truncate_at=20) as proxy:
        proxy.script(mode)  # type: ignore[arg-type]
        outcome = await _signin(proxy.url)
        assert isinstance(outcome, str), f"{mode} let a whole answer through"
        assert server.stats()["signins"] == int(reaches_server)
        assert await _signin(proxy.url) == 200  # one-shot: the next exchange passes
        assert proxy.counts[mode] == 1


@pytest.mark.parametrize(
    ("mode", "reaches_server"), [("blackhole", False), ("blackhole_after", True)]
)
async def test_proxy_black_holes(server: ReferenceServer, mode: str, reaches_server: bool) -> None:
    async with FaultProxy(server.port) as proxy:
        proxy.mode = mode  # type: ignore[assignment]
        assert await _signin(proxy.url, timeout=0.3) in ("TimeoutError", "ServerTimeoutError")
        assert server.stats()["signins"] == int(reaches_server)
        proxy.mode = "pass"
        assert await _signin(proxy.url) == 200


async def test_proxy_stall_delays_but_delivers(server: ReferenceServer) -> None:
    async with FaultProxy(server.port, stall_seconds=0.05) as proxy:
        proxy.script("stall")
        assert await _signin(proxy.url) == 200
        proxy.stall_seconds = 30.0
        proxy.script("stall")
        assert await _signin(proxy.url, timeout=0.3) in ("TimeoutError", "ServerTimeoutError")
        assert server.stats()["signins"] == 2  # the stalled one was served all the same


def test_proxy_refuses_unknown_modes() -> None:
    with pytest.raises(ValueError, match="unknown proxy mode"):
        FaultProxy(1).script("explode")  # type: ignore[arg-type]


async def test_a_refresh_never_undoes_a_journaled_sign_out(tmp_path: Path) -> None:
    """Regression: with a sign-out journaled (what ``mid_sign_out`` leaves, finished in the
    background by the next start), a call that needed a refresh replaced the sign-out
    intent with a refresh intent and committed a new pair: one more crash before the logout
    went out, and the next start carried on signed in. Now the refresh refuses."""
    clock = FakeClock()
    stale = tj.TokenSet("old-a", "old-r", None, None)
    path = tmp_path / "tokens.db"
    journal = tj.SQLiteJournal(path)
    await journal.open()
    await journal.store_tokens("default", stale, clock.time())
    await journal.begin_sign_out("default", clock.time())
    await journal.close()
    logout_may_answer = asyncio.Event()

    async def slow_logout(url: URL, **_: Any) -> CallbackResult:
        await logout_may_answer.wait()
        return CallbackResult(status=204)

    with aioresponses() as mock:
        mock.post(f"{AUTH}/auth/logout", callback=slow_logout)
        mock.post(f"{AUTH}/auth/refresh", payload={"appToken": "new-a", "refreshToken": "new-r"})
        async with tj.TokenManager(AUTH, journal=path, clock=clock) as tm:
            with pytest.raises(tj.NotSignedIn):
                await tm.refresh()  # the app wants a fresh token while the logout is out
            record = await tm.journal.load("default")
            assert record.intent is not None and record.intent.kind == "sign_out"
            assert ("POST", URL(f"{AUTH}/auth/refresh")) not in mock.requests
            logout_may_answer.set()
        assert tm.state is tj.SessionState.SIGNED_OUT
    record = await journals.read(path)
    assert record.tokens is None and record.intent is None and record.ended_code == "signed_out"


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
async def test_begin_refresh_keeps_a_journaled_sign_out(tmp_path: Path, kind: str) -> None:
    """The same across processes: another process's refresh must not replace the intent of
    a sign-out journaled after it last looked (its begin_refresh answers Stale)."""
    journal: tj.Journal = (
        tj.SQLiteJournal(tmp_path / "t.db") if kind == "sqlite" else tj.MemoryJournal()
    )
    await journal.open()
    try:
        generation = await journal.store_tokens("default", tj.TokenSet("a", "r"), 0.0)
        await journal.begin_sign_out("default", 1.0)
        began = await journal.begin_refresh(
            "default", Holder.for_this_process(), generation, 2.0, 10.0
        )
        assert isinstance(began, Stale)
        intent = (await journal.load("default")).intent
        assert intent is not None and intent.kind == "sign_out"
    finally:
        await journal.close()


async def test_the_sealed_pass_scanner_sees_plain_tokens_and_not_sealed_ones(
    tmp_path: Path,
) -> None:
    """The sealed kill pass counts tokens readable in a journal's raw files: not blind."""
    pair = tj.TokenSet("access-0123456789abcdef", "refresh-0123456789abcdef")
    for name, seal, readable in (("plain.db", None, 2), ("sealed.db", tj.Seal(bytes(32)), 0)):
        journal = tj.SQLiteJournal(tmp_path / name, seal=seal)
        await journal.open()
        await journal.store_tokens("default", pair, 1.0)
        await journal.close()
        assert journals.readable_tokens(tmp_path / name, pair) == readable, name
