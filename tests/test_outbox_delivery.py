"""The outbox's delivery machinery (docs/architecture.md section 8): when delivery pauses and
resumes, what ``drain`` raises and when, how settles are grouped and what a failed one does,
which leases a deliverer keeps and gives back, and what it logs.

Timing runs on clocks the test controls: :class:`FakeClock`, or :class:`StuckClock`, whose
sleeps never end by themselves (so a wait that returns was woken by what the test says).
Real-time bounds (``asyncio.wait_for``) only stop a hang; they are never reached.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

import tokenjournal as tj
from tokenjournal import _outbox
from tokenjournal._events import TokenEvent
from tokenjournal._outbox import Outbox, OutboxLimits
from tokenjournal.server import ReferenceServer
from tokenjournal.testing import FakeClock

from .conftest import DEMO, manager, wait_until

LONG = 3600.0  # a drain bound on the fake clock, never reached
BOUND = 20.0  # a real-time bound against a hang, never reached


class StuckClock(FakeClock):
    """A fake clock whose ``sleep`` records the wait and never returns on its own."""

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        await asyncio.Event().wait()


async def eventually(
    read: Callable[[], Awaitable[Any]], check: Callable[[Any], bool], timeout: float = BOUND
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check(await read()):
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


class Gate:
    """A loopback API that holds each request until the test opens the gate, then answers
    with ``status`` (a second origin: the bearer is not sent there)."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.status = 200
        self.keys: list[str] = []
        self.arrived: list[str] = []
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.server = TestServer(app, host="127.0.0.1")

    async def _handle(self, request: web.Request) -> web.Response:
        await request.read()
        key = request.headers.get("Idempotency-Key", "")
        self.arrived.append(key)
        await self.open.wait()
        self.keys.append(key)
        return web.Response(status=self.status)

    def url(self, path: str = "/api/x") -> str:
        return str(self.server.make_url(path))


@pytest.fixture
async def gate() -> AsyncIterator[Gate]:
    g = Gate()
    await g.server.start_server()
    try:
        yield g
    finally:
        g.open.set()
        await g.server.close()


def warnings_with(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.msg]


# --------------------------------------------------------------------------- a fake host


class FakeHost:
    """The little an :class:`Outbox` sees of its manager, with a journal the test scripts."""

    account = "acct"
    lease_ttl = 30.0
    retry = SimpleNamespace(attempt_timeout=10.0)
    holder = SimpleNamespace(id="h", pid=1, host="x")

    def __init__(self, clock: FakeClock, journal: Any = None) -> None:
        self.clock = clock
        self.journal = journal
        self.is_open = True
        self._closing = asyncio.Event()
        self.callbacks: list[Callable[[TokenEvent], object]] = []
        self.events: list[tuple[tj.EventKind, str | None]] = []

    def emit_event(self, kind: tj.EventKind, code: str | None) -> None:
        self.events.append((kind, code))

    def subscribe(self, callback: Callable[[TokenEvent], object]) -> Callable[[], None]:
        self.callbacks.append(callback)
        return lambda: None

    def emit(self, kind: tj.EventKind) -> None:
        event = TokenEvent(kind, self.account, tj.SessionState.VALID, self.clock.time())
        for callback in self.callbacks:
            callback(event)

    async def closing(self) -> None:
        await self._closing.wait()

    def close(self) -> None:
        self.is_open = False
        self._closing.set()


def fake_outbox(host: FakeHost) -> Outbox:
    return Outbox(
        host,  # type: ignore[arg-type]
        "box",
        limits=OutboxLimits(),
        ordered=True,
        concurrency=1,
        max_backoff=30.0,
    )


def _item(server: ReferenceServer, uid: str) -> Any:
    return _outbox.build_item("POST", server.url + "/api/readings", json={"uid": uid}, now=0.0)


async def settles(task: Awaitable[Any]) -> Any:
    return await asyncio.wait_for(task, BOUND)


async def still_waiting(task: asyncio.Future[Any]) -> bool:
    for _ in range(20):
        await asyncio.sleep(0)
    return not task.done()


async def test_a_backoff_pause_ends_at_a_sign_in_or_close_and_at_nothing_else() -> None:
    """Between failed tries the deliverer waits on the manager's clock; a sign-in (here or
    adopted from another process) makes the next try immediate, and close() ends the wait.
    A refresh is no reason to hurry."""
    host = FakeHost(StuckClock())
    outbox = fake_outbox(host)
    for kind in (tj.EventKind.SIGNED_IN, tj.EventKind.ADOPTED):
        pause = asyncio.ensure_future(outbox._pause(30.0))
        for other in (tj.EventKind.REFRESHED, tj.EventKind.STATE, tj.EventKind.SIGNED_OUT):
            host.emit(other)
            assert await still_waiting(pause)
        host.emit(kind)
        assert await settles(pause) is True  # still open: try again now
    pause = asyncio.ensure_future(outbox._pause(30.0))
    assert await still_waiting(pause)
    host.close()
    assert await settles(pause) is False  # closed: the retry loop ends
    sleeps = list(host.clock.sleeps)
    assert await outbox._pause(30.0) is False  # already closed: no wait at all
    assert host.clock.sleeps == sleeps == [30.0] * 3


async def test_a_sign_in_while_the_deliverer_was_busy_is_not_missed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A paused deliverer looks at the session again after every sign-in, also one that came
    while it was not waiting (it would otherwise sleep a whole idle poll)."""
    monkeypatch.setattr(_outbox, "IDLE_POLL", 3600.0)
    host = FakeHost(StuckClock())
    outbox = fake_outbox(host)
    for _ in range(3):
        host.emit(tj.EventKind.SIGNED_IN)  # came while the deliverer was sending
        assert await settles(outbox._idle(paused=True)) is True
    waiting = asyncio.ensure_future(outbox._idle(paused=True))
    assert await still_waiting(waiting)  # nothing new: it waits for the next sign-in
    host.emit(tj.EventKind.ADOPTED)
    assert await settles(waiting) is True
    host.close()
    assert await settles(outbox._idle(paused=True)) is False


@pytest.mark.parametrize(
    ("tokens", "intent", "back"),
    [
        ("pair", None, True),
        ("pair", "refresh", True),
        ("pair", "sign_out", False),  # another process is signing out
        (None, None, False),
        (None, "refresh", False),
        ("unreadable", None, False),
    ],
)
async def test_delivery_resumes_only_when_the_journal_holds_a_pair_not_being_signed_out(
    tokens: str | None, intent: str | None, back: bool
) -> None:
    async def load(account: str) -> Any:
        assert account == "acct"
        if tokens == "unreadable":
            raise tj.JournalError("database is locked")
        kind = None if intent is None else SimpleNamespace(kind=intent)
        return SimpleNamespace(tokens=tokens, intent=kind)

    outbox = fake_outbox(FakeHost(FakeClock(), SimpleNamespace(load=load)))
    assert await outbox._session_back() is back


async def test_leases_given_back_are_exactly_those_asked_and_a_failure_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[Any] = []

    async def outbox_release(
        account: str, name: str, holder: Any, ids: Any, *, untried: bool
    ) -> None:
        calls.append((account, name, holder.id, ids, untried))
        if len(calls) > 1:
            raise tj.JournalError("disk I/O error")

    caplog.set_level(logging.INFO, logger="tokenjournal")
    outbox = fake_outbox(FakeHost(FakeClock(), SimpleNamespace(outbox_release=outbox_release)))
    await outbox._release(["a", "b"])
    assert not caplog.records
    await outbox._release(["c"], untried=True)  # the lease lapses on its own: logged
    assert calls == [("acct", "box", "h", ["a", "b"], False), ("acct", "box", "h", ["c"], True)]
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, "outbox box: could not release leases: disk I/O error")
    ]


# --------------------------------------------------------------------------- with a manager


async def test_an_unexpected_error_in_one_delivery_is_logged_once_with_the_error(
    server: ReferenceServer,
    journal_path: Any,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Unordered delivery runs each item in a task of its own: a bug in one is logged (the
    outbox's name, the error) and the others go on; a delivery that ends well logs nothing."""
    caplog.set_level(logging.WARNING, logger="tokenjournal")
    original = Outbox._send
    failed: list[str] = []

    async def send(self: Outbox, item: Any) -> Any:
        if not failed:
            failed.append(item.id)
            raise RuntimeError("a bug in the app's session")
        return await original(self, item)

    monkeypatch.setattr(Outbox, "_send", send)
    async with manager(server, journal_path, clock=FakeClock()) as tm:
        outbox = tm.outbox("readings", ordered=False, concurrency=2)
        for n in range(4):
            await outbox.enqueue("POST", server.url + "/api/readings", json={"uid": f"u{n}"})
        await wait_until(lambda: server.stats()["items_applied"] == 3)
    assert warnings_with(caplog, "delivery failed") == [
        "outbox readings: a delivery failed: a bug in the app's session"
    ]


async def test_a_settle_the_journal_refused_is_logged_and_the_item_sent_again_at_once(
    server: ReferenceServer, journal_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The answer came but its settle was not committed: the item goes back in line at once
    (its lease given back, not left to lapse: the clock here never moves), is sent again
    with the same key, and the server applies it once."""
    caplog.set_level(logging.WARNING, logger="tokenjournal")
    async with manager(server, journal_path, clock=StuckClock()) as tm:
        original = tm.journal.outbox_settle
        groups: list[int] = []

        async def outbox_settle(account: str, name: str, group: Any) -> Any:
            groups.append(len(group))
            if len(groups) == 1:
                raise tj.JournalError("disk full")
            return await original(account, name, group)

        tm.journal.outbox_settle = outbox_settle  # type: ignore[method-assign]
        outbox = tm.outbox("readings")
        key = await outbox.enqueue("POST", server.url + "/api/readings", json={"uid": "a"})
        await asyncio.wait_for(outbox.drain(), BOUND)
        assert (await outbox.stats()).delivered == 1
    assert groups == [1, 1]
    assert warnings_with(caplog, "not committed") == [
        "outbox readings: 1 settle(s) not committed: disk full"
    ]
    assert [r["key"] for r in server.readings()] == [key]
    assert server.stats()["keys_seen_twice"] == 1
    assert server.stats()["items_applied"] == 1


async def test_a_refusal_is_logged_and_announced_once_with_the_outbox_name(
    server: ReferenceServer, journal_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tokenjournal")
    events: list[tj.TokenEvent] = []
    server.set_api_faults([{"kind": "status", "status": 422}])
    async with manager(server, journal_path, clock=FakeClock()) as tm:
        tm.subscribe(events.append)
        outbox = tm.outbox("readings")
        refused = await outbox.enqueue("POST", server.url + "/api/readings", json={"uid": "a"})
        await outbox.enqueue("POST", server.url + "/api/readings", json={"uid": "b"})
        await outbox.drain()  # no timeout: waits as long as it takes
        assert (await outbox.stats()).delivered == 1
    dead = [(e.kind, e.code) for e in events if e.kind is tj.EventKind.OUTBOX_DEAD]
    assert dead == [(tj.EventKind.OUTBOX_DEAD, "readings")]
    assert warnings_with(caplog, "refused") == [
        f"outbox readings: item {refused} refused: {_outbox.dead_reason(422)}"
    ]


async def test_settles_are_committed_in_groups_of_sixty_four_while_a_request_is_out(
    server: ReferenceServer, journal_path: Any, gate: Gate
) -> None:
    """Group commit of settles (SETTLE_GROUP): while any request is out, answers are
    committed 64 at a time, no sooner; when none is out, what waits is committed at once."""
    assert _outbox.SETTLE_GROUP == 64
    async with manager(server, journal_path, clock=FakeClock()) as tm:
        original = tm.journal.outbox_settle
        groups: list[int] = []

        async def outbox_settle(account: str, name: str, group: Any) -> Any:
            groups.append(len(group))
            return await original(account, name, group)

        tm.journal.outbox_settle = outbox_settle  # type: ignore[method-assign]
        outbox = tm.outbox("readings", ordered=False, concurrency=2)
        await outbox.enqueue("POST", gate.url())  # held by the gate: a request out
        for n in range(65):
            await outbox.enqueue("POST", server.url + "/api/readings", json={"uid": f"u{n}"})
        await wait_until(lambda: bool(groups))
        await wait_until(lambda: server.stats()["items_applied"] == 65)
        assert groups == [64]
        await eventually(lambda: outbox.stats(), lambda s: s.delivered == 64)  # committing
        assert groups == [64]  # the 65th waits for the request still out
        gate.open.set()
        await asyncio.wait_for(outbox.drain(), BOUND)
        assert groups == [64, 2]
        assert (await outbox.stats()).delivered == 66


# --------------------------------------------------------------------------- drain


async def test_drain_times_out_with_how_many_are_left_polling_every_tenth_of_a_second(
    server: ReferenceServer, journal_path: Any
) -> None:
    clock = FakeClock()
    async with manager(server, journal_path, sign_in=False, clock=clock) as tm:
        outbox = tm.outbox("readings")
        for n in range(2):
            await outbox.enqueue("POST", server.url + "/api/readings", json={"uid": f"u{n}"})
        before = len(clock.sleeps)
        with pytest.raises(TimeoutError) as raised:
            await outbox.drain(timeout=0.25)
        assert str(raised.value) == "outbox 'readings': 2 item(s) still pending"
        # drain looks again every IDLE_POLL / 5 of the manager's clock, the last wait cut
        # to the deadline: a FakeClock test knows how far a drain moves its clock.
        assert clock.sleeps[before:] == pytest.approx([0.1, 0.1, 0.05])
        assert (await outbox.stats()).pending == 2  # the items stay in line


async def test_drain_raises_when_the_manager_closes_meanwhile(
    server: ReferenceServer, journal_path: Any
) -> None:
    clock = StuckClock()
    async with manager(server, journal_path, sign_in=False, clock=clock) as tm:
        outbox = tm.outbox("readings")
        await outbox.enqueue("POST", server.url + "/api/readings", json={"uid": "a"})
        draining = asyncio.ensure_future(outbox.drain())
        await wait_until(lambda: _outbox.IDLE_POLL / 5 in clock.sleeps)  # drain waits
        await tm.close()  # the drain's clock never moves: close() itself must wake it
        with pytest.raises(RuntimeError) as raised:
            await asyncio.wait_for(draining, BOUND)
    assert str(raised.value) == "the TokenManager closed while draining"


async def test_drain_waits_only_for_the_items_pending_when_it_was_called(
    server: ReferenceServer, journal_path: Any, gate: Gate
) -> None:
    """An item enqueued while a drain runs is not waited for (here it never gets through:
    the server answers 503 and the clock of its backoff never moves)."""
    server.set_api_faults([{"kind": "status", "status": 503, "count": 100}])
    async with manager(server, journal_path, clock=StuckClock()) as tm:
        looks: list[int] = []
        original = tm.journal.outbox_waiting

        async def outbox_waiting(account: str, name: str, upto: Any) -> Any:
            result = await original(account, name, upto)
            looks.append(result[0])
            return result

        tm.journal.outbox_waiting = outbox_waiting  # type: ignore[method-assign]
        outbox = tm.outbox("readings", ordered=False, concurrency=2)
        first = await outbox.enqueue("POST", gate.url())
        draining = asyncio.ensure_future(outbox.drain())
        await wait_until(lambda: looks == [1])
        await outbox.enqueue("POST", server.url + "/api/readings", json={"uid": "late"})
        await wait_until(lambda: server.stats()["faults_injected"] >= 1)  # in its backoff
        gate.open.set()
        await asyncio.wait_for(draining, BOUND)
        assert gate.keys == [first]
        stats = await outbox.stats()
        assert (stats.delivered, stats.pending) == (1, 1)


# --------------------------------------------------------------------------- pause and resume


def count_looks(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Record each time a paused deliverer looks at the journal for a session."""
    looks: list[bool] = []
    original = Outbox._session_back

    async def session_back(self: Outbox) -> bool:
        looks.append(await original(self))
        return looks[-1]

    monkeypatch.setattr(Outbox, "_session_back", session_back)
    return looks


async def test_a_paused_deliverer_wakes_for_a_sign_in_not_for_an_enqueue(
    server: ReferenceServer, journal_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_outbox, "IDLE_POLL", 3600.0)  # no idle poll during the test
    looks = count_looks(monkeypatch)
    async with manager(server, journal_path, sign_in=False, clock=FakeClock()) as tm:
        outbox = tm.outbox("readings")
        await outbox.enqueue("POST", server.url + "/api/readings", json={"uid": "a"})
        await wait_until(lambda: outbox.paused)
        for n in range(3):  # journaled, but no reason to look for a session
            await outbox.enqueue("POST", server.url + "/api/readings", json={"uid": f"b{n}"})
        for _ in range(20):
            await asyncio.sleep(0)  # the deliverer runs (a look would be a thread hop away)
        assert looks == []
        await tm.sign_in(**DEMO)
        await asyncio.wait_for(outbox.drain(), BOUND)
        assert looks == [True]
        assert outbox.paused is False
    assert server.stats()["items_applied"] == 4


async def test_a_paused_deliverer_keeps_looking_each_idle_poll(
    server: ReferenceServer, journal_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process may sign in: a paused deliverer looks at the journal each idle poll
    (real time; shortened here) for as long as the manager is open."""
    monkeypatch.setattr(_outbox, "IDLE_POLL", 0.01)
    looks = count_looks(monkeypatch)
    async with manager(server, journal_path, sign_in=False, clock=FakeClock()) as tm:
        outbox = tm.outbox("readings")
        await outbox.enqueue("POST", server.url + "/api/readings", json={"uid": "a"})
        await wait_until(lambda: len(looks) >= 3)
        assert not any(looks)
        await tm.sign_in(**DEMO)
        await asyncio.wait_for(outbox.drain(), BOUND)
    assert server.stats()["items_applied"] == 1


async def test_a_pause_gives_back_every_claimed_item_and_delivery_resumes(
    server: ReferenceServer, journal_path: Any
) -> None:
    """Unordered, one slot: three items claimed in one batch; the first finds no session,
    so all three go back in line (another process may take them) until a sign-in."""
    async with manager(server, journal_path, sign_in=False, clock=StuckClock()) as tm:
        for uid in "abc":  # as an earlier run left them: claimed in one batch
            item = _item(server, uid)
            await tm.journal.outbox_add(tm.account, "readings", item, OutboxLimits())
        outbox = tm.outbox("readings", ordered=False, concurrency=1)
        await wait_until(lambda: outbox.paused)
        await eventually(lambda: outbox.stats(), lambda s: s.in_flight == 0)  # given back
        await tm.sign_in(**DEMO)
        await asyncio.wait_for(outbox.drain(), BOUND)
        assert (await outbox.stats()).delivered == 3


# --------------------------------------------------------------------------- leases and order


async def test_a_claimed_batch_stays_leased_while_it_waits_for_a_free_slot(
    server: ReferenceServer, journal_path: Any, gate: Gate
) -> None:
    """Unordered, one slot: the items claimed with the one being sent wait in this process
    and stay leased to it (in flight), so no other process sends them meanwhile."""
    async with manager(server, journal_path, clock=FakeClock()) as tm:
        for path in ("/a", "/b", "/c"):
            item = _outbox.build_item("POST", gate.url(path), now=0.0)
            await tm.journal.outbox_add(tm.account, "readings", item, OutboxLimits())
        outbox = tm.outbox("readings", ordered=False, concurrency=1)
        await wait_until(lambda: len(gate.arrived) == 1)
        for _ in range(20):
            await asyncio.sleep(0)
        assert (await outbox.stats()).in_flight == 3
        gate.open.set()
        await asyncio.wait_for(outbox.drain(), BOUND)
        assert len(gate.keys) == 3


async def test_ordered_delivery_claims_a_batch_once_and_waits_behind_a_head_held_elsewhere(
    server: ReferenceServer, journal_path: Any
) -> None:
    """Ordered: the head of the line is leased by another live process, so nothing behind it
    goes first; when that lease lapses the head is taken over, then the rest follow in
    order, all of them claimed in one transaction."""
    from tokenjournal._journal import Holder

    clock = FakeClock()
    async with manager(server, journal_path, clock=clock) as tm:
        items = [_item(server, uid) for uid in "abcd"]
        for item in items:
            await tm.journal.outbox_add(tm.account, "readings", item, OutboxLimits())
        other = Holder.for_this_process()  # alive: this very process, another manager
        [head] = await tm.journal.outbox_claim(
            tm.account, "readings", other, clock.time(), tm.lease_ttl, 1, True
        )
        assert head.id == items[0].id
        claims: list[int] = []
        original = tm.journal.outbox_claim

        async def outbox_claim(*args: Any) -> Any:
            taken = await original(*args)
            if taken:
                claims.append(len(taken))
            return taken

        tm.journal.outbox_claim = outbox_claim  # type: ignore[method-assign]
        outbox = tm.outbox("readings")
        await outbox.drain(timeout=LONG)  # moves the clock past the other's lease
    assert [r["key"] for r in server.readings()] == [i.id for i in items]
    assert claims == [4]


async def test_the_deliverer_forgets_the_leases_it_no_longer_holds(
    server: ReferenceServer, journal_path: Any
) -> None:
    """What a deliverer remembers of its leases is dropped as items settle or go back in
    line, so a long run holds no memory per item delivered."""
    async with manager(server, journal_path, sign_in=False, clock=FakeClock()) as tm:
        outbox = tm.outbox("readings")
        for n in range(3):
            await outbox.enqueue("POST", server.url + "/api/readings", json={"uid": f"u{n}"})
        await wait_until(lambda: outbox.paused)
        await wait_until(lambda: not outbox._held)  # given back by the pause
        await tm.sign_in(**DEMO)
        await outbox.drain(timeout=LONG)
        await wait_until(lambda: not outbox._held)  # settled (drain may return first)
        assert (await outbox.stats()).delivered == 3


async def test_a_settle_whose_lease_was_lost_meanwhile_is_still_committed() -> None:
    """A process paused past its lease may learn (renewing for another item) that an item
    it has an answer for was taken over: its settle still goes to the journal, which says
    whether it was still to settle, and the rest of the group is settled as usual."""
    from tokenjournal._outbox import Settle

    groups: list[list[str]] = []

    async def outbox_settle(account: str, name: str, group: Any) -> list[bool]:
        groups.append([s.item_id for s in group])
        return [False, True]  # the first was settled by the process that took it over

    host = FakeHost(FakeClock(), SimpleNamespace(outbox_settle=outbox_settle))
    outbox = fake_outbox(host)
    outbox._held["kept"] = host.clock.time() + host.lease_ttl  # "lost" is no longer held
    outbox._queue_settle(Settle("lost", 200))
    outbox._queue_settle(Settle("kept", 422, True, "HTTP 422"))
    await settles(outbox._settled_all())
    assert groups == [["lost", "kept"]]
    assert host.events == [(tj.EventKind.OUTBOX_DEAD, "box")]
    assert outbox._held == {}


async def test_an_answer_that_comes_while_a_failed_commit_is_handled_is_still_committed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A group the journal refused goes back in line; a settle queued meanwhile is committed
    in the next group, not left waiting for some later answer (or lost at close)."""
    from tokenjournal._outbox import Settle

    caplog.set_level(logging.INFO, logger="tokenjournal")
    groups: list[list[str]] = []
    released: list[Any] = []

    async def outbox_settle(account: str, name: str, group: Any) -> list[bool]:
        groups.append([s.item_id for s in group])
        if len(groups) == 1:
            outbox._queue_settle(Settle("b", 200))  # answered during this commit
            raise tj.JournalError("disk full")
        return [True] * len(group)

    async def outbox_release(account: str, name: str, holder: Any, ids: Any, **kw: Any) -> None:
        released.append((ids, kw))

    journal = SimpleNamespace(outbox_settle=outbox_settle, outbox_release=outbox_release)
    outbox = fake_outbox(FakeHost(FakeClock(), journal))
    outbox._queue_settle(Settle("a", 200))
    await settles(outbox._settled_all())
    assert groups == [["a"], ["b"]]
    assert released == [(["a"], {"untried": False})]  # tried: their tries stay counted
    assert outbox._to_settle == []
    assert warnings_with(caplog, "not committed") == [
        "outbox box: 1 settle(s) not committed: disk full"
    ]
