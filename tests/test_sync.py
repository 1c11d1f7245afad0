"""The blocking manager (tokenjournal.sync): the async manager's guarantees, from any thread."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import tokenjournal as tj
import tokenjournal.sync as tjs
from tokenjournal.testing import FakeClock, reference_server

from .conftest import DEMO
from .harness.threaded import ThreadedReferenceServer
from .test_browser_signin import CLIENT, Browser


@pytest.fixture
def server() -> Iterator[ThreadedReferenceServer]:
    with ThreadedReferenceServer() as srv:
        yield srv


def test_same_constructor_arguments_as_the_async_manager() -> None:
    ours = inspect.signature(tjs.TokenManager.__init__).parameters
    theirs = inspect.signature(tj.TokenManager.__init__).parameters
    assert [(p.name, p.kind, p.default) for p in ours.values()] == [
        (p.name, p.kind, p.default) for p in theirs.values()
    ]


#: The async manager's public names with no blocking twin, and why: an aiohttp session and
#: an async iterator have no blocking use (``subscribe`` is the events' twin), and
#: ``access_token`` answers a fresh token without a thread hop already.
NO_TWIN = {"client_session", "events", "fresh_token"}


def public(cls: type) -> dict[str, Any]:
    return {n: v for n, v in vars(cls).items() if not n.startswith("_")}


def test_every_public_method_has_a_blocking_twin() -> None:
    """Every public name of the async manager (and of its outbox) has a twin here, a method
    taking ``timeout`` or a property; regression: ``outbox`` and ``sign_in_browser`` had
    none (the list of twins was written by hand, so a new async method went unnoticed)."""
    for theirs, ours, skip in (
        (tj.TokenManager, tjs.TokenManager, NO_TWIN),
        (tj.Outbox, tjs.Outbox, {"start"}),  # the manager starts delivery
    ):
        names = set(public(theirs)) - skip
        assert names <= set(public(ours)), sorted(names - set(public(ours)))
        for name in names:
            twin = public(ours)[name]
            if isinstance(public(theirs)[name], property):
                assert isinstance(twin, property), name
            elif name != "subscribe":  # it waits for nothing
                assert "timeout" in inspect.signature(twin).parameters, name
    assert set(inspect.signature(tjs.TokenManager.outbox).parameters) == {
        *inspect.signature(tj.TokenManager.outbox).parameters,
        "timeout",
    }
    assert inspect.signature(tjs.TokenManager.sign_in_browser).parameters.keys() == (
        inspect.signature(tj.TokenManager.sign_in_browser).parameters.keys()
    )


def test_sign_in_token_sign_out_and_the_same_error_classes(
    server: ThreadedReferenceServer, journal_path: Path
) -> None:
    with tjs.TokenManager(server.url, journal_path) as tm:
        assert tm.state is tj.SessionState.SIGNED_OUT
        with pytest.raises(tj.NotSignedIn):
            tm.access_token(timeout=10)
        with pytest.raises(tj.SignInFailed):
            tm.sign_in(email="demo@example.com", password="wrong", timeout=10)
        pair = tm.sign_in(**DEMO, timeout=10)
        assert tm.state is tj.SessionState.VALID and tm.tokens == pair
        assert tm.access_token() == pair.access_token
        assert tm.refresh(timeout=10).access_token != pair.access_token
        tm.sign_out(timeout=10)
        assert tm.state is tj.SessionState.SIGNED_OUT and tm.tokens is None
    assert "eyJ" not in repr(tm)  # fingerprints only


def test_device_flow_and_set_tokens_have_blocking_twins(tmp_path: Path) -> None:
    with ThreadedReferenceServer(device_interval=1) as server:
        protocol = tj.OAuth2Protocol(
            server.url + "/oauth/token",
            client_id="tokenjournal-demo",
            client_auth="none",
            device_authorization_url=server.url + "/oauth/device_authorization",
        )
        shown: list[tj.DeviceCode] = []

        def on_code(code: tj.DeviceCode) -> None:  # runs on the manager's thread
            shown.append(code)
            server.run(lambda: server.server.device_action(code.user_code, "approve"))

        with tjs.TokenManager(server.url, tmp_path / "a.db", protocol=protocol) as tm:
            tokens = tm.sign_in_device(on_code, timeout=30)
            assert tm.state is tj.SessionState.VALID and tm.tokens == tokens and shown
        with tjs.TokenManager(server.url, tmp_path / "b.db") as other:
            other.set_tokens(tokens, timeout=10)
            assert other.tokens == tokens and other.access_token() == tokens.access_token


def test_a_closed_manager_refuses_calls_and_cannot_reopen(
    server: ThreadedReferenceServer, journal_path: Path
) -> None:
    tm = tjs.TokenManager(server.url, journal_path)
    with pytest.raises(RuntimeError, match="not open"):
        tm.access_token()
    with tm:
        tm.sign_in(**DEMO)
    tm.close()  # twice is fine
    with pytest.raises(RuntimeError, match="closed"):
        tm.access_token()
    with pytest.raises(RuntimeError, match="closed"):
        tm.open()


def test_50_threads_across_an_expiry_make_one_refresh(
    server: ThreadedReferenceServer, journal_path: Path
) -> None:
    """Invariant 4 through the thread hop: every thread joins the one refresh."""
    clock = FakeClock()
    with tjs.TokenManager(server.url, journal_path, clock=clock) as tm:
        first = tm.sign_in(**DEMO).access_token
        clock.advance(901)
        server.advance(901)
        barrier = threading.Barrier(50)

        def worker(_: int) -> list[str]:
            barrier.wait()
            return [tm.access_token(timeout=30) for _ in range(20)]

        with ThreadPoolExecutor(50) as pool:
            seen = {token for tokens in pool.map(worker, range(50)) for token in tokens}
    assert len(seen) == 1 and first not in seen
    assert server.stats()["rotations"] == 1
    assert tm.manager.refresh_requests == 1


def test_a_timed_out_caller_does_not_cancel_the_shared_refresh(
    server: ThreadedReferenceServer, journal_path: Path
) -> None:
    """Invariant 7: TimeoutError for the impatient caller; the refresh commits for the rest."""
    clock = FakeClock()
    with tjs.TokenManager(server.url, journal_path, clock=clock) as tm:
        events: list[tj.EventKind] = []
        tm.subscribe(lambda e: events.append(e.kind))
        old = tm.sign_in(**DEMO).access_token
        clock.advance(901)
        server.set_faults([{"kind": "delay_after", "seconds": 1}])
        with pytest.raises(TimeoutError):
            tm.access_token(timeout=0.05)
        new = tm.access_token(timeout=30)  # joins the same refresh, which went on
    assert new != old
    assert server.stats()["rotations"] == 1
    assert tm.manager.refresh_requests == 1
    assert events.count(tj.EventKind.REFRESHED) == 1
    assert tj.EventKind.REFRESH_FAILED not in events


def test_a_close_that_times_out_leaves_no_caller_waiting_for_ever(
    server: ThreadedReferenceServer, journal_path: Path
) -> None:
    """close(timeout=) ends the loop thread even with a refresh in flight: the caller that
    waited on it gets an error at once (not a future no loop will ever complete), and the
    refresh's intent stays for the next start (invariant 6)."""
    tm = tjs.TokenManager(server.url, journal_path)
    tm.open()
    tm.sign_in(**DEMO)
    server.set_faults([{"kind": "delay_before", "seconds": 30}])
    outcome: list[BaseException | tj.TokenSet] = []

    def waiter() -> None:
        try:
            outcome.append(tm.refresh())  # no timeout of its own
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while tm.state is not tj.SessionState.REFRESHING:  # the request is at the server
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(TimeoutError):
        tm.close(timeout=0.2)
    thread.join(10)
    assert not thread.is_alive(), "a caller was left waiting on a stopped loop"
    assert isinstance(outcome[0], RuntimeError) and "closed" in str(outcome[0])
    server.set_faults([])


def test_sys_exit_in_an_event_callback_ends_the_manager_and_leaves_no_caller_waiting(
    server: ThreadedReferenceServer, journal_path: Path
) -> None:
    """A SystemExit from a callback on the loop thread stopped the loop: the call that
    caused the event and every later one (no timeout) waited for ever. Now the first gets
    the SystemExit (or RuntimeError), later ones RuntimeError, and the manager is closed."""

    def on_event(event: tj.TokenEvent) -> None:
        if event.kind is tj.EventKind.SIGNED_IN:
            sys.exit(3)

    tm = tjs.TokenManager(server.url, journal_path)
    tm.open()
    tm.subscribe(on_event)
    outcome: list[object] = []

    def caller() -> None:
        for call in (lambda: tm.sign_in(**DEMO), tm.access_token, tm.refresh):
            try:
                outcome.append(call())
            except BaseException as exc:
                outcome.append(exc)

    thread = threading.Thread(target=caller, daemon=True)
    thread.start()
    thread.join(20)
    assert not thread.is_alive(), "a call waited for ever on the stopped loop"
    assert isinstance(outcome[0], SystemExit | RuntimeError), outcome
    for later in outcome[1:]:
        assert isinstance(later, RuntimeError) and "loop thread ended" in str(later)
    tm.close(timeout=5)  # waits for the loop thread, which closed the manager
    assert not tm._thread or not tm._thread.is_alive()
    assert tm.manager.fresh_token() is None  # closed: no token from memory either
    with tjs.TokenManager(server.url, journal_path) as again:  # the pair was journaled
        assert again.state is tj.SessionState.VALID


def test_subscribe_with_call_hands_the_event_to_the_apps_thread(
    server: ThreadedReferenceServer, journal_path: Path
) -> None:
    inbox: queue.Queue[tuple[object, tj.TokenEvent]] = queue.Queue()
    ran_on: list[tuple[threading.Thread, tj.EventKind]] = []
    with tjs.TokenManager(server.url, journal_path) as tm:
        unsubscribe = tm.subscribe(
            lambda e: ran_on.append((threading.current_thread(), e.kind)),
            call=lambda f, e: inbox.put((f, e)),  # what root.after_idle does for Tk
        )
        tm.sign_in(**DEMO)
        unsubscribe()
        tm.refresh()
    assert not ran_on  # nothing ran on the manager's thread
    while not inbox.empty():  # the "app's main loop"
        callback, event = inbox.get()
        callback(event)  # type: ignore[operator]
    kinds = [kind for thread, kind in ran_on]
    assert {thread for thread, _ in ran_on} == {threading.current_thread()}
    assert tj.EventKind.SIGNED_IN in kinds and tj.EventKind.REFRESHED not in kinds


def test_a_blocking_call_from_the_managers_own_thread_raises_instead_of_deadlocking(
    server: ThreadedReferenceServer, journal_path: Path
) -> None:
    errors: list[BaseException] = []

    def on_event(event: tj.TokenEvent) -> None:
        try:
            tm.access_token()
        except RuntimeError as exc:
            errors.append(exc)

    with tjs.TokenManager(server.url, journal_path) as tm:
        tm.subscribe(on_event)
        tm.sign_in(**DEMO, timeout=10)  # would hang for ever if the callback could block
    assert errors and "own thread" in str(errors[0])


def test_a_process_that_never_closes_it_still_exits(
    server: ThreadedReferenceServer, tmp_path: Path
) -> None:
    script = textwrap.dedent(
        """
        import sys
        import tokenjournal.sync as tjs
        tm = tjs.TokenManager(sys.argv[1], sys.argv[2])
        tm.open()
        tm.sign_in(email="demo@example.com", password="demo")
        print("signed in", flush=True)
        """
    )
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", script, server.url, str(tmp_path / "j.db")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "signed in" in result.stdout
    assert time.monotonic() - started < 60


def test_a_forked_child_gets_a_clear_error_not_a_hang(
    server: ThreadedReferenceServer, tmp_path: Path
) -> None:
    """fork() copies the manager but not its loop thread: a call in the child would wait
    for ever; it raises instead, and a manager opened in the child works."""
    script = textwrap.dedent(
        """
        import os, sys
        import tokenjournal.sync as tjs
        with tjs.TokenManager(sys.argv[1], sys.argv[2]) as tm:
            tm.sign_in(email="demo@example.com", password="demo")
            pid = os.fork()
            if pid == 0:
                try:
                    tm.refresh(timeout=5)
                except RuntimeError as exc:
                    print("child:", "fork()" in str(exc), flush=True)
                with tjs.TokenManager(sys.argv[1], sys.argv[2]) as fresh:
                    print("child token:", bool(fresh.access_token(timeout=5)), flush=True)
                os._exit(0)
            os.waitpid(pid, 0)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, server.url, str(tmp_path / "j.db")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "child: True" in result.stdout and "child token: True" in result.stdout


CHILD = textwrap.dedent(
    """
    import sys
    import tokenjournal.sync as tjs

    with tjs.TokenManager(sys.argv[1], sys.argv[2]) as tm:
        print("refreshing", flush=True)
        tm.refresh()
        print("refreshed", flush=True)  # never reached: killed while waiting
    """
)


def test_sigkill_of_a_sync_manager_mid_refresh_is_recovered_through_the_grace_window(
    server: ThreadedReferenceServer, journal_path: Path
) -> None:
    """Invariant 6 holds for the sync manager as for the async one (tests/test_crash.py)."""
    with tjs.TokenManager(server.url, journal_path) as tm:
        before = tm.sign_in(**DEMO)
    server.set_faults([{"kind": "delay_after", "seconds": 2}])
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, server.url, str(journal_path)], stdout=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 20
        while server.stats()["rotations"] == 0:  # the server rotated; the child waits on it
            assert time.monotonic() < deadline, "the child never refreshed"
            time.sleep(0.01)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        server.set_faults([])
    assert child.returncode == -signal.SIGKILL

    events: list[tj.EventKind] = []
    with tjs.TokenManager(server.url, journal_path) as tm:
        tm.subscribe(lambda e: events.append(e.kind))
        recovered = tm.refresh(timeout=30)  # joins the recovery open() started
    assert recovered.refresh_token != before.refresh_token
    assert tj.EventKind.REFRESHED in events  # RECOVERING came during open(), before subscribe
    stats = server.stats()
    assert stats["signins"] == 1
    assert (stats["rotations"], stats["grace_replays"], stats["family_revocations"]) == (1, 1, 0)


async def test_fresh_token_answers_only_what_access_token_would_answer_without_a_wait(
    journal_path: Path,
) -> None:
    """The sync manager's hop-free hot path: a token before the refresh margin, else None
    (stale, signed out, closed), so the loop thread decides everything else."""
    clock = FakeClock()
    async with reference_server() as srv:
        tm = tj.TokenManager(srv.url, journal_path, clock=clock)
        assert tm.fresh_token() is None  # not open
        async with tm:
            assert tm.fresh_token() is None  # no pair
            pair = await tm.sign_in(**DEMO)
            assert tm.fresh_token() == pair.access_token
            # Inside the 60 s margin (by more than the 1 s a Date header can round it by):
            # the loop must start a refresh.
            clock.advance(900 - 55)
            assert tm.fresh_token() is None
            assert await tm.access_token() == pair.access_token  # still valid, refreshing
            fresh = await tm.refresh()
            assert tm.fresh_token() == fresh.access_token
            await tm.sign_out()
            assert tm.fresh_token() is None
        assert tm.fresh_token() is None


# ----------------------------------------------------------------------------- the outbox


def test_the_outbox_from_many_threads_delivers_each_call_once(
    server: ThreadedReferenceServer, journal_path: Path
) -> None:
    """A threaded app's offline writes: 8 threads enqueue 5 calls each, every call arrives
    once; a refused one is a dead letter, put back in line and cleared like the async one."""
    api = server.url + "/api/readings"
    with tjs.TokenManager(server.url, journal_path) as tm:
        tm.sign_in(**DEMO, timeout=10)
        outbox = tm.outbox("readings", ordered=False, timeout=10)
        assert (outbox.name, outbox.paused, repr(outbox)) == (
            "readings",
            False,
            "sync.Outbox('readings')",
        )
        with ThreadPoolExecutor(8) as pool:
            ids = list(
                pool.map(
                    lambda n: outbox.enqueue("POST", api, json={"n": n}, timeout=10), range(40)
                )
            )
        outbox.drain(timeout=30)
        assert len(set(ids)) == 40
        stats = outbox.stats(timeout=10)
        assert (stats.delivered, stats.pending, stats.dead) == (40, 0, 0)
        applied = server.run(server.server.readings)
        assert sorted(r["body"]["n"] for r in applied) == list(range(40))

        server.run(lambda: server.server.set_api_faults([{"kind": "status", "status": 422}]))
        refused = outbox.enqueue("POST", api, json={"n": 40})
        outbox.drain(timeout=30)
        assert [d.id for d in outbox.dead_letters(timeout=10)] == [refused]
        assert outbox.retry_dead(timeout=10) == 1
        outbox.drain(timeout=30)  # the fault was used up: delivered this time
        assert outbox.stats().delivered == 41
        assert tm.outbox("readings", ordered=False).outbox is outbox.outbox  # the same one
        with pytest.raises(ValueError, match="other options"):
            tm.outbox("readings")  # ordered: not what it was made with
        assert outbox.clear(timeout=10) == 0  # nothing left to delete
    with pytest.raises(RuntimeError, match="closed"):
        outbox.stats()


def test_an_enqueue_that_times_out_is_still_journaled_not_cancelled(
    server: ThreadedReferenceServer, journal_path: Path
) -> None:
    """An app whose enqueue gave up waiting (the journal held by another program) must not
    be left unsure whether to send the call again (twice would mean two keys, two calls):
    the error says the enqueue goes on, and the call is delivered once. Regression: the
    error was "no answer within 0.1 s", and a cancelled enqueue may or may not have stored
    its item."""
    with tjs.TokenManager(server.url, journal_path) as tm:
        tm.sign_in(**DEMO, timeout=10)
        outbox = tm.outbox("readings")
        with contextlib.closing(sqlite3.connect(journal_path, isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")  # a backup tool holding the write lock
            with pytest.raises(TimeoutError, match="the call goes on"):
                outbox.enqueue("POST", server.url + "/api/readings", json={"n": 1}, timeout=0.1)
            other.execute("ROLLBACK")
        outbox.drain(timeout=30)
        assert outbox.stats().delivered == 1
    assert [r["body"] for r in server.run(server.server.readings)] == [{"n": 1}]


# ----------------------------------------------------------------------------- browser sign-in


def test_browser_sign_in_has_a_blocking_twin(tmp_path: Path) -> None:
    """A desktop app that is not an asyncio app signs in through the browser too (here the
    browser is aiohttp filling in the reference server's form, on the manager's thread)."""
    with ThreadedReferenceServer() as server:
        protocol = asyncio.run(
            tj.OAuth2Protocol.discover(server.url, client_id=CLIENT, scope="openid offline_access")
        )
        browser = Browser()
        with tjs.TokenManager(protocol.token_url, tmp_path / "t.db", protocol=protocol) as tm:
            tokens = tm.sign_in_browser(open_browser=browser, timeout=60)
            assert tm.state is tj.SessionState.VALID and tm.tokens == tokens
            assert tm.access_token() == tokens.access_token
            with pytest.raises(tj.SignInFailed):
                tm.sign_in_browser(open_browser=Browser(action="deny"), timeout=60)
        assert len(browser.urls) == 1
        assert server.stats()["signins"] == 1
