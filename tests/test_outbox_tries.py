"""One item's delivery, try by try (docs/architecture.md section 8): what each try renews,
sends and records, what a failed try logs, how long the waits between tries are, where a
crash point stops it, and what the end of a delivery (delivered, refused, paused, lost,
closed, a journal failure) hands back to the deliverer and to the journal.

Most tests drive ``Outbox._deliver`` on a scripted host (:class:`Host`: a journal that
records what it is asked, answers the test gives); the rest run a manager against loopback
servers. Timing runs on :class:`FakeClock`; real-time bounds only stop a hang.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import AsyncIterator
from email.utils import formatdate
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

import tokenjournal as tj
from tokenjournal import _faults, _outbox
from tokenjournal._journal import Holder
from tokenjournal._outbox import Outbox, OutboxItem, Settle, _NoAnswer, dead_reason
from tokenjournal.server import ReferenceServer
from tokenjournal.testing import FakeClock

from .conftest import manager, wait_until
from .test_outbox_delivery import FakeHost, StuckClock, fake_outbox, still_waiting

NOW = 1_700_000_000.0  # a start the fake clock adds to exactly
BOUND = 20.0  # a real-time bound against a hang, never reached
URL = "http://127.0.0.1:9/api/readings"  # never contacted: _send is scripted


class Host(FakeHost):
    """A host whose journal records renewals (with the item whose try each counts),
    releases (``("untried", ids)`` when their claims' tries are taken back) and settles.
    ``kept``: the item ids a renewal finds still ours (``None``: every one we hold)."""

    def __init__(self, clock: FakeClock | None = None) -> None:
        journal = SimpleNamespace(
            outbox_renew=self._renew, outbox_release=self._release, outbox_settle=self._settle
        )
        super().__init__(clock or FakeClock(NOW), journal)
        self.renews: list[tuple[Any, ...]] = []
        self.released: list[Any] = []
        self.settled: list[Settle] = []
        self.kept: set[str] | None = None
        self.renew_error: Exception | None = None
        self.allowed = True
        self.outbox: Outbox | None = None

    def bearer_allowed(self, url: str) -> bool:
        return self.allowed

    async def _renew(
        self, account: str, name: str, holder: Any, now: float, ttl: float, *, tried: Any
    ) -> Any:
        self.renews.append((account, name, holder.id, now, ttl, tried))
        if self.renew_error is not None:
            raise self.renew_error
        assert self.outbox is not None
        return set(self.outbox._held) if self.kept is None else self.kept

    async def _release(
        self, account: str, name: str, holder: Any, ids: Any, *, untried: bool
    ) -> None:
        assert (account, name, holder.id) == ("acct", "box", "h")
        self.released.append(("untried", ids) if untried else ids)

    async def _settle(self, account: str, name: str, group: Any) -> list[bool]:
        assert (account, name) == ("acct", "box")
        self.settled.extend(group)
        return [True] * len(group)


def scripted(host: Host, answers: list[Any], **options: Any) -> tuple[Outbox, list[str]]:
    """An outbox on ``host`` whose tries get ``answers`` in turn: a status, a
    ``(status, headers)`` pair, or an exception to raise. Returns it and the ids sent."""
    outbox = Outbox(
        host,  # type: ignore[arg-type]
        "box",
        limits=_outbox.OutboxLimits(),
        ordered=options.get("ordered", True),
        concurrency=1,
        max_backoff=options.get("max_backoff", 30.0),
    )
    host.outbox = outbox
    sent: list[str] = []
    queue = list(answers)

    async def send(item: OutboxItem) -> tuple[int, dict[str, str]]:
        sent.append(item.id)
        answer = queue.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer if isinstance(answer, tuple) else (answer, {})

    outbox._send = send  # type: ignore[method-assign]
    return outbox, sent


def claimed(outbox: Outbox, uid: str = "a", attempts: int = 1) -> OutboxItem:
    """An item as a claim hands it over: leased to us for a whole ``lease_ttl``, its
    ``attempts`` counting this claim."""
    item = _outbox.build_item("POST", URL, json={"uid": uid}, now=NOW)
    item = OutboxItem(item.id, item.method, item.url, item.headers, item.body, NOW, 1, attempts)
    clock = outbox._host.clock
    outbox._held[item.id] = clock.time() + outbox._host.lease_ttl
    return item


async def deliver(outbox: Outbox, item: OutboxItem) -> bool:
    done = await asyncio.wait_for(outbox._deliver(item), BOUND)
    await asyncio.wait_for(outbox._settled_all(), BOUND)
    return done


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


# --------------------------------------------------------------------------- what a try records


@pytest.mark.parametrize(
    ("claims", "answers", "settle"),
    [
        (1, [200], (200, False, "", 1)),
        (1, [503, 503, 201], (201, False, "", 3)),
        (1, [422], (422, True, dead_reason(422), 1)),
        (1, [503, 429, 422], (422, True, dead_reason(422), 3)),
        (3, [503, 410], (410, True, dead_reason(410), 4)),  # an earlier run's claims count
    ],
)
async def test_a_settle_says_the_status_the_verdict_and_how_many_tries_it_took(
    claims: int, answers: list[int], settle: tuple[Any, ...]
) -> None:
    """``attempts`` is the claims before this one plus the tries of this one: a dead letter
    says how often the item was tried. Leases are renewed before each retry, not before
    the first try (the claim has just taken them)."""
    host = Host()
    outbox, sent = scripted(host, answers)
    item = claimed(outbox, attempts=claims)
    assert await deliver(outbox, item) is True
    assert host.settled == [Settle(item.id, *settle)]
    assert sent == [item.id] * len(answers)
    assert [renew[-1] for renew in host.renews] == [item.id] * (len(answers) - 1)


async def test_each_failed_try_is_logged_with_what_failed_and_the_next_try(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tokenjournal")
    host = Host()
    refresh_failed = tj.NetworkError("the auth server could not be reached: timeout")
    outbox, sent = scripted(host, [503, refresh_failed, _NoAnswer("ClientOSError"), 200])
    item = claimed(outbox)
    assert await deliver(outbox, item) is True
    tries = [m.split(" again in ")[0] for m in messages(caplog, logging.INFO)]
    assert tries == [
        "outbox box failed (HTTP 503); try 2",
        "outbox box failed (network_error); try 3",  # the refresh after a 401 failed
        "outbox box failed (ClientOSError); try 4",
    ]
    assert host.settled == [Settle(item.id, 200, False, "", 4)]
    assert sent == [item.id] * 4
    assert not messages(caplog, logging.WARNING)


async def test_the_wait_after_a_failed_try_starts_at_half_a_second_and_doubles() -> None:
    """Full jitter on 0.5 s, 1 s, 2 s, ... capped at ``max_backoff`` (the draws are
    replayed from the seed)."""
    random.seed(2026)
    draws = random.Random(2026)
    host = Host()
    outbox, _ = scripted(host, [503, 503, 503, 503, 200], max_backoff=1.5)
    assert await deliver(outbox, claimed(outbox)) is True
    expected = [cap * draws.random() for cap in (0.5, 1.0, 1.5, 1.5)]
    assert host.clock.sleeps == pytest.approx(expected, rel=1e-12)


async def test_an_item_is_tried_for_as_long_as_it_takes() -> None:
    """No budget: seven refusals in a row, each asking for two minutes, and still the item
    is tried again (a retry budget would put it back in line with its count lost)."""
    host = Host()
    busy = (503, {"Retry-After": "120"})
    outbox, sent = scripted(host, [busy] * 7 + [200])
    item = claimed(outbox)
    assert await deliver(outbox, item) is True
    assert host.clock.sleeps == [120.0] * 7
    assert sent == [item.id] * 8
    assert host.settled == [Settle(item.id, 200, False, "", 8)]
    assert host.released == []


async def test_a_retry_after_date_is_read_on_the_managers_wall_clock() -> None:
    host = Host()
    outbox, _ = scripted(host, [(503, {"Retry-After": formatdate(NOW + 20, usegmt=True)}), 200])
    assert await deliver(outbox, claimed(outbox)) is True
    assert host.clock.sleeps == [20.0]


@pytest.mark.parametrize(("allowed", "verdict"), [(False, True), (True, False)])
async def test_a_401_without_a_bearer_is_refused_at_once_and_with_one_it_is_retried(
    allowed: bool, verdict: bool
) -> None:
    host = Host()
    host.allowed = allowed
    outbox, sent = scripted(host, [401, 200])
    item = claimed(outbox)
    assert await deliver(outbox, item) is True
    if verdict:
        assert host.settled == [Settle(item.id, 401, True, _outbox.NO_BEARER, 1)]
        assert sent == [item.id]
    else:
        assert host.settled == [Settle(item.id, 200, False, "", 2)]


# --------------------------------------------------------------------------- crash points


class Died(BaseException):
    """What ``os._exit`` does here instead of ending the test run."""


@pytest.mark.parametrize(
    ("point", "answers", "sends"),
    [
        ("before_send", [200], 0),  # leased, nothing sent
        ("after_answer", [503, 200], 1),  # the first answer is in, nothing journaled
        ("before_settle", [503, 200], 2),  # only a final answer reaches it
    ],
)
async def test_a_crash_point_stops_delivery_where_it_says(
    monkeypatch: pytest.MonkeyPatch, point: str, answers: list[int], sends: int
) -> None:
    def die(code: int) -> None:
        raise Died(code)

    monkeypatch.setattr(_faults, "_armed", None)  # restored after the test
    monkeypatch.setattr(_faults.os, "_exit", die)
    _faults.arm(point)
    host = Host()
    outbox, sent = scripted(host, answers)
    item = claimed(outbox)
    with pytest.raises(Died):
        await outbox._deliver(item)
    assert len(sent) == sends
    assert outbox._to_settle == []  # nothing settled: the next run sends it again


# --------------------------------------------------------------------------- leases


async def test_an_item_no_longer_ours_is_not_sent() -> None:
    host = Host()
    outbox, sent = scripted(host, [200])
    item = claimed(outbox)
    outbox._held.clear()  # released meanwhile (a pause, a failed settle)
    assert await deliver(outbox, item) is False
    assert (sent, host.renews, host.settled) == ([], [], [])


async def test_an_item_taken_over_while_we_waited_is_left_to_its_new_holder() -> None:
    """A renewal before a retry finds the lease gone (this process paused past it): the
    item is not sent again from here, and nothing of it is kept."""
    host = Host()
    outbox, sent = scripted(host, [503, 200])
    item = claimed(outbox)
    other = claimed(outbox, "b")
    host.kept = {other.id}
    assert await deliver(outbox, item) is False
    assert sent == [item.id]
    assert host.settled == []
    assert list(outbox._held) == [other.id]


@pytest.mark.parametrize(("left", "renews"), [(20.0, 0), (15.5, 0), (15.0, 1), (12.0, 1)])
async def test_a_first_try_renews_only_a_lease_half_spent(left: float, renews: int) -> None:
    host = Host()
    outbox, _ = scripted(host, [])
    outbox._held = {"a": NOW + left}
    assert await outbox._still_ours("a", retry=False) is True
    assert host.renews == [("acct", "box", "h", NOW, 30.0, None)] * renews  # counts no try


async def test_a_renewal_extends_every_lease_we_keep_and_forgets_the_others() -> None:
    host = Host()
    outbox, _ = scripted(host, [])
    outbox._held = {"a": NOW + 29.0, "b": NOW + 1.0, "c": NOW + 2.0}
    host.kept = {"a", "b"}
    assert await outbox._still_ours("a", retry=True) is True  # fresh, but a retry renews
    assert host.renews == [("acct", "box", "h", NOW, 30.0, "a")]
    host.clock.advance(1.0)
    assert await outbox._still_ours("b", retry=False) is True  # renewed with "a": no call
    assert await outbox._still_ours("c", retry=False) is False  # lost: no call either
    assert await outbox._still_ours("zz", retry=True) is False  # never ours
    assert len(host.renews) == 1
    assert outbox._held == {"a": NOW + 30.0, "b": NOW + 30.0}


async def test_giving_back_every_lease_at_the_end_logs_a_journal_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tokenjournal")

    async def outbox_release(account: str, name: str, holder: Any, ids: Any, **kw: Any) -> None:
        assert (account, name, holder.id, ids, kw) == ("acct", "box", "h", None, {})
        raise tj.JournalError("disk I/O error")

    outbox = fake_outbox(FakeHost(FakeClock(), SimpleNamespace(outbox_release=outbox_release)))
    outbox._held = {"a": 1.0}
    await outbox._release_all()  # the leases lapse on their own: logged, not raised
    assert outbox._held == {}
    assert messages(caplog, logging.INFO) == [
        "outbox box: could not release leases: disk I/O error"
    ]


# --------------------------------------------------------------------------- how a delivery ends


async def test_a_lost_session_pauses_delivery_and_the_rest_of_the_line_goes_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tokenjournal")
    host = Host()
    outbox, sent = scripted(host, [tj.SessionEnded("token_expired")])
    first, second = claimed(outbox, "a"), claimed(outbox, "b")
    await asyncio.wait_for(outbox._deliver_in_order([first, second]), BOUND)
    assert outbox.paused
    assert sent == [first.id]  # the next item is not tried without a session
    assert host.released == [[first.id], ("untried", [second.id])]
    assert host.settled == []
    assert messages(caplog, logging.INFO) == [
        "outbox box paused: no session; it resumes after the next sign-in"
    ]


async def test_a_journal_failure_puts_the_item_back_in_line_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="tokenjournal")
    host = Host()
    outbox, sent = scripted(host, [503, 200])
    first, second = claimed(outbox, "a"), claimed(outbox, "b")
    host.renew_error = tj.JournalError("database is locked")
    await asyncio.wait_for(outbox._deliver_in_order([first, second]), BOUND)
    assert sent == [first.id]
    assert host.released == [[first.id], ("untried", [second.id])]
    assert messages(caplog, logging.WARNING) == [
        f"outbox box: item {first.id} back in line: database is locked"
    ]


async def test_a_close_during_the_wait_puts_the_item_back_in_line_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="tokenjournal")
    host = Host(StuckClock(NOW))
    outbox, sent = scripted(host, [503, 200])
    item = claimed(outbox)
    delivering = asyncio.ensure_future(outbox._deliver(item))
    await wait_until(lambda: bool(host.clock.sleeps))  # in its backoff
    host.close()
    assert await asyncio.wait_for(delivering, BOUND) is False
    assert (sent, host.released) == ([item.id], [[item.id]])
    assert caplog.records == []


async def test_a_close_during_a_try_stops_the_line_there() -> None:
    """The manager began closing while a request was out (its session is going away): the
    item and the rest of the batch go back in line, and nothing more is sent."""
    host = Host()
    outbox, _ = scripted(host, [])
    sent: list[str] = []

    async def send_while_closing(item: OutboxItem) -> Any:
        sent.append(item.id)
        host.close()
        raise RuntimeError("the TokenManager is closed")

    outbox._send = send_while_closing  # type: ignore[method-assign]
    first, second = claimed(outbox, "a"), claimed(outbox, "b")
    await asyncio.wait_for(outbox._deliver_in_order([first, second]), BOUND)
    assert sent == [first.id]
    assert host.released == [[first.id], ("untried", [second.id])]


async def test_an_idle_deliverer_wakes_at_close(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_outbox, "IDLE_POLL", 3600.0)  # no idle poll during the test
    host = FakeHost(StuckClock())
    outbox = fake_outbox(host)
    waiting = asyncio.ensure_future(outbox._idle())
    assert await still_waiting(waiting)
    host.close()
    assert await asyncio.wait_for(waiting, BOUND) is False
    assert await asyncio.wait_for(outbox._idle(), BOUND) is False  # closed: no wait at all


async def test_a_paused_deliverer_waits_for_a_sign_in_it_has_not_seen() -> None:
    host = FakeHost(StuckClock())
    outbox = fake_outbox(host)
    waiting = asyncio.ensure_future(outbox._idle(paused=True))
    assert await still_waiting(waiting)  # no sign-in yet: nothing to look at
    host.emit(tj.EventKind.SIGNED_IN)
    assert await asyncio.wait_for(waiting, BOUND) is True


# --------------------------------------------------------------------------- one request


class Api:
    """A loopback API: ``/hold`` answers when ``release`` is set, ``/moved`` redirects to
    ``/ok``, ``/endless`` sends 2 MiB of a body that never ends."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.hits: list[tuple[str, str]] = []
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.server = TestServer(app, host="127.0.0.1")

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.hits.append((request.path, request.headers.get("Idempotency-Key", "")))
        if request.path == "/hold":
            await self.release.wait()
        if request.path == "/moved":
            raise web.HTTPTemporaryRedirect("/ok")
        if request.path == "/endless":
            response = web.StreamResponse()
            await response.prepare(request)
            for _ in range(32):
                await response.write(b"x" * (64 * 1024))
            await self.release.wait()
            return response
        return web.Response(status=200)

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    a = Api()
    await a.server.start_server()
    try:
        yield a
    finally:
        a.release.set()
        await a.server.close()


async def send_once(api: Api, path: str, attempt_timeout: float) -> tuple[int, Any]:
    host = Host()
    host.retry = SimpleNamespace(attempt_timeout=attempt_timeout)  # type: ignore[assignment]
    async with aiohttp.ClientSession() as http:
        host.outbox_http = lambda: http  # type: ignore[attr-defined]
        outbox = fake_outbox(host)
        item = _outbox.build_item("POST", api.url(path), data=b"body", now=NOW)
        return await asyncio.wait_for(outbox._send(item), BOUND)


async def test_one_try_gives_up_after_attempt_timeout(api: Api) -> None:
    with pytest.raises(_NoAnswer) as raised:
        await send_once(api, "/hold", attempt_timeout=0.05)
    assert raised.value.detail in ("TimeoutError", "ServerTimeoutError")


async def test_a_redirect_is_an_answer_not_followed(api: Api) -> None:
    status, headers = await send_once(api, "/moved", attempt_timeout=BOUND)
    assert (status, headers["Location"]) == (307, "/ok")
    assert [path for path, _ in api.hits] == ["/moved"]


async def test_an_answer_is_read_up_to_a_mebibyte_and_no_further(api: Api) -> None:
    """A body that never ends does not hold the delivery: past 1 MiB the rest is dropped."""
    status, _ = await send_once(api, "/endless", attempt_timeout=BOUND)
    assert status == 200


async def test_a_redirect_answer_makes_a_dead_letter(
    server: ReferenceServer, journal_path: Path, api: Api
) -> None:
    async with manager(server, journal_path, clock=FakeClock()) as tm:
        outbox = tm.outbox("readings")
        await outbox.enqueue("POST", api.url("/moved"), json={"uid": "a"})
        await outbox.drain(timeout=3600)
        [dead] = await outbox.dead_letters()
    assert (dead.status, dead.reason) == (307, "HTTP 307 Temporary Redirect")
    assert [path for path, _ in api.hits] == ["/moved"]


# --------------------------------------------------------------------------- the deliverer


async def test_a_claim_the_journal_refused_is_logged_and_delivery_goes_on(
    server: ReferenceServer, journal_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tokenjournal")
    async with manager(server, journal_path, clock=FakeClock()) as tm:
        original = tm.journal.outbox_claim
        calls: list[int] = []

        async def outbox_claim(*args: Any) -> Any:
            calls.append(1)
            if len(calls) == 1:
                raise tj.JournalError("database is locked")
            return await original(*args)

        tm.journal.outbox_claim = outbox_claim  # type: ignore[method-assign]
        outbox = tm.outbox("readings")
        await outbox.enqueue("POST", server.url + "/api/readings", json={"uid": "a"})
        await outbox.drain(timeout=60)
    assert messages(caplog, logging.WARNING) == [
        "outbox readings: cannot claim items: database is locked"
    ]
    assert server.stats()["items_applied"] == 1


async def test_leases_are_renewed_before_a_retry_and_not_before_a_first_try(
    server: ReferenceServer, journal_path: Path
) -> None:
    server.set_api_faults([{"kind": "status", "status": 503}])
    async with manager(server, journal_path, clock=FakeClock()) as tm:
        original = tm.journal.outbox_renew
        renewed: list[tuple[set[str], str | None]] = []

        async def outbox_renew(*args: Any, tried: str | None = None) -> Any:
            kept = await original(*args, tried=tried)
            renewed.append((kept, tried))
            return kept

        tm.journal.outbox_renew = outbox_renew  # type: ignore[method-assign]
        outbox = tm.outbox("readings")
        first = await outbox.enqueue("POST", server.url + "/api/readings", json={"uid": "a"})
        await outbox.drain(timeout=60)  # 503, then delivered
        assert renewed == [({first}, first)]  # the retry's try counted on its item
        await outbox.enqueue("POST", server.url + "/api/readings", json={"uid": "b"})
        await outbox.drain(timeout=60)  # delivered at the first try
        assert renewed == [({first}, first)]


async def test_close_with_a_request_out_gives_its_lease_back(
    server: ReferenceServer, journal_path: Path, api: Api
) -> None:
    """close() cancels the request out; the item stays pending, its lease given back (not
    left to lapse), so the next run, or another process, sends it at once."""
    async with manager(server, journal_path, clock=FakeClock()) as tm:
        outbox = tm.outbox("readings", ordered=False, concurrency=2)
        await outbox.enqueue("POST", api.url("/hold"), json={"uid": "a"})
        await wait_until(lambda: len(api.hits) == 1)
        account = tm.account
    journal = tj.SQLiteJournal(journal_path)
    await journal.open()
    try:
        stats = await journal.outbox_stats(account, "readings", NOW)
    finally:
        await journal.close()
    assert (stats.pending, stats.in_flight) == (1, 0)


class PausingClock(FakeClock):
    """A fake clock whose sleeps of the outbox's backoff (under a minute) never end after the
    ``tries``-th: the deliverer is caught waiting between tries."""

    def __init__(self, tries: int) -> None:
        super().__init__()
        self.tries, self.backoffs = tries, 0

    async def sleep(self, seconds: float) -> None:
        if seconds < 60:
            self.backoffs += 1
            if self.backoffs >= self.tries:
                await asyncio.Event().wait()
        await super().sleep(seconds)


async def test_an_items_tries_and_the_untried_rest_are_counted_across_a_close(
    server: ReferenceServer, journal_path: Path
) -> None:
    """Regression: the first item of a line, refused three times (503) and still waiting
    when the app closed, came back with ``attempts`` 1 (the claim's count: the retries were
    lost with the lease), and the items behind it, never sent, with 1 each. The retries are
    counted as they go out, and the untried items' counts are taken back."""
    server.set_api_faults([{"kind": "status", "status": 503}] * 3)
    clock = PausingClock(tries=3)
    async with manager(server, journal_path, clock=clock) as tm:
        outbox = tm.outbox("readings")
        keys = [
            await outbox.enqueue("POST", server.url + "/api/readings", json={"uid": uid})
            for uid in "abc"
        ]
        await wait_until(lambda: clock.backoffs >= 3)
        account = tm.account
    journal = tj.SQLiteJournal(journal_path)
    await journal.open()
    try:
        holder = Holder("elsewhere:1:x", os.getpid(), "elsewhere")
        taken = await journal.outbox_claim(account, "readings", holder, NOW, 30.0, 10, True)
    finally:
        await journal.close()
    assert [(i.id, i.attempts) for i in taken] == [(keys[0], 3 + 1), (keys[1], 1), (keys[2], 1)]
    assert server.stats()["items_applied"] == 0


async def test_an_item_in_flight_here_is_not_sent_twice_when_its_lease_lapses(
    server: ReferenceServer, journal_path: Path, api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our own lease on an item whose request is still out lapses (a slow answer): the next
    claim hands it back to us, and the deliverer leaves it to the try already out."""
    monkeypatch.setattr(_outbox, "IDLE_POLL", 0.01)
    clock = FakeClock()
    sends: list[str] = []
    original = Outbox._send

    async def send(self: Outbox, item: OutboxItem) -> Any:
        sends.append(item.id)
        return await original(self, item)

    monkeypatch.setattr(Outbox, "_send", send)
    async with manager(server, journal_path, clock=clock) as tm:
        claim = tm.journal.outbox_claim
        claimed_ids: list[str] = []

        async def outbox_claim(*args: Any) -> Any:
            taken = await claim(*args)
            claimed_ids.extend(i.id for i in taken)
            return taken

        tm.journal.outbox_claim = outbox_claim  # type: ignore[method-assign]
        outbox = tm.outbox("readings", ordered=False, concurrency=2)
        key = await outbox.enqueue("POST", api.url("/hold"), json={"uid": "a"})
        await wait_until(lambda: len(api.hits) == 1)
        clock.advance(tm.lease_ttl + 1)  # the request is still out
        await wait_until(lambda: claimed_ids == [key, key])  # taken again by our own claim
        for _ in range(20):
            await asyncio.sleep(0)  # a second delivery would start now
        assert sends == [key]
        api.release.set()
        await outbox.drain(timeout=60)
    assert api.hits == [("/hold", key)]
