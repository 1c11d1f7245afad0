"""The durable outbox: API calls made offline survive crashes and arrive exactly once.

``tm.outbox(name)`` gives an :class:`Outbox`. ``enqueue`` commits the call to the journal
(the same SQLite file as the tokens, ``synchronous=FULL``) before it returns, and returns the
item's id, which every delivery attempt sends as ``Idempotency-Key``: a server that honours
it applies each item once, whatever the network, the crashes and the processes did.
Delivery runs in the background while the manager is open, through the manager's own
middleware (the bearer on allowed origins, a 401 refreshes once and replays), retried by the
one retry loop (:func:`tokenjournal._retry.attempts`) for as long as it takes.

Invariant 14 of docs/architecture.md (section 8 there is this module):

* durable before acknowledged: ``enqueue`` returns after the commit that holds the item;
* at most one in flight: a per-item lease (as for the refresh) across processes; a dead
  holder's items are taken over (its pid is gone, or its lease expired);
* the ``Idempotency-Key`` is the item's id, unchanged across retries, restarts, processes;
* settled only by a 2xx (deleted) or a permanent refusal (a dead letter), never dropped
  for a transient failure; a cancel at any await leaves the item pending.

Concurrent enqueues share one commit (group commit): the SQLite journal batches every write
that arrives while the previous commit is being synced into the next transaction.

The journal owns the SQL; this module holds the data types the journal returns and the
delivery engine. It imports nothing above the journal's layer: the manager is seen through
:class:`OutboxHost`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json as jsonlib
import logging
import math
import sys
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol

import aiohttp
from yarl import URL

from . import _faults
from ._errors import NotSignedIn, OutboxFull, SessionEnded, TokenJournalError
from ._events import EventKind, TokenEvent
from ._protocols import parse_retry_after
from ._retry import RetryPolicy, attempts
from ._tokens import Failure, FailureKind

if TYPE_CHECKING:
    from ._clock import Clock
    from ._journal import Holder, Journal

log = logging.getLogger("tokenjournal")

WhenFull = Literal["reject", "drop_oldest"]
#: Retried, never dead: the request may succeed later (RFC 9110; 425 is RFC 8470).
RETRY_STATUSES: Final = frozenset({401, 408, 409, 425, 429})
#: Backoff between tries of one item grows to this by default, so a network that comes
#: back is noticed within it.
MAX_BACKOFF: Final = 30.0
#: An idle deliverer looks at the journal this often (real time) for items another process
#: enqueued or a dead holder left; its own enqueues wake it at once.
IDLE_POLL: Final = 0.5
#: A deliverer leases up to this many items in one transaction (ordered: of the head).
CLAIM_BATCH: Final = 128
#: Settles are committed in groups of up to this many (sooner when no request is out): a
#: crash may send up to this many delivered items again, with their keys.
SETTLE_GROUP: Final = 64
#: Headers that carry credentials: never stored in an item (the bearer comes at delivery).
CREDENTIAL_HEADERS: Final = frozenset({"authorization", "proxy-authorization", "cookie"})
#: Set by the outbox on every try; an item may not bring its own.
KEY_HEADER: Final = "Idempotency-Key"
#: At most this much of an answer is read (and thrown away): bodies are never kept.
ANSWER_LIMIT: Final = 1 << 20
#: A dead letter's reason for a 401 to a request that carried no bearer.
NO_BEARER: Final = "HTTP 401 Unauthorized (no bearer: the URL's origin is not allowed)"
METHODS: Final = frozenset({"POST", "PUT", "PATCH", "DELETE", "GET"})


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """One journaled call. ``id`` is its ``Idempotency-Key``; ``seq`` its place in line."""

    id: str
    method: str
    url: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    created_at: float
    seq: int = 0
    attempts: int = 0

    def __repr__(self) -> str:
        # Bodies are the app's data: never in a repr, a log line or an exception.
        return (
            f"OutboxItem(id={self.id!r}, method={self.method}, url={self.url!r}, "
            f"body={len(self.body)} bytes)"
        )

    @property
    def size(self) -> int:
        """What the item counts against ``max_bytes``: body, URL and headers."""
        return len(self.body) + len(self.url) + sum(len(k) + len(v) for k, v in self.headers)


@dataclass(frozen=True, slots=True)
class OutboxLimits:
    """``max_items`` / ``max_bytes`` of pending items (``None``: no limit) and what a full
    outbox does with one more: ``reject`` (:class:`OutboxFull`) or ``drop_oldest``."""

    max_items: int | None = None
    max_bytes: int | None = None
    when_full: WhenFull = "reject"


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """An outbox's figures. ``pending`` counts items waiting or in flight; ``in_flight``
    those leased to a process right now; ``delivered`` and ``dropped`` count since the
    outbox was created; ``dead`` the dead letters; ``oldest_age`` the oldest pending item's
    age in seconds (``None`` when nothing is pending)."""

    account: str
    name: str
    pending: int
    in_flight: int
    delivered: int
    dead: int
    dropped: int = 0
    oldest_age: float | None = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An item the server refused for good: ``status`` and a short token-free ``reason``."""

    id: str
    status: int
    reason: str
    method: str
    url: str
    attempts: int
    created_at: float


@dataclass(frozen=True, slots=True)
class Settle:
    """How a delivery ended: delivered (``status`` 2xx) or dead (with ``reason``)."""

    item_id: str
    status: int
    dead: bool = False
    reason: str = ""
    attempts: int = 0


def dead_reason(status: int) -> str:
    """A short reason built from the status alone: the server's own text may quote anything
    (a token echoed back, the body), so none of it is kept."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "unknown status"
    return f"HTTP {status} {phrase}"


def classify(
    status: int, headers: Mapping[str, str], now: float, *, bearer_sent: bool = True
) -> Failure | None:
    """``None`` for a 2xx (settle); a retryable :class:`Failure` for 401/408/409/425/429 and
    5xx (``Retry-After`` read); a ``REJECTED`` one for anything else (a dead letter), and for
    a 401 to a request that carried no bearer (``bearer_sent=False``)."""
    if 200 <= status < 300:
        return None
    if status == 401 and not bearer_sent:
        # No refresh can help a request that had no bearer (its origin is not in
        # allowed_origins): retrying for ever would hide a configuration error.
        return Failure(FailureKind.REJECTED, "http_401", 401, NO_BEARER)
    retry_after = parse_retry_after(headers, now)
    if status == 429:
        return Failure(FailureKind.RATE_LIMITED, "rate_limited", status, "", retry_after)
    if status >= 500:
        return Failure(FailureKind.SERVER, "server_error", status, "", retry_after)
    if status in RETRY_STATUSES:
        return Failure(FailureKind.CONFLICT, f"http_{status}", status, "", retry_after)
    return Failure(FailureKind.REJECTED, f"http_{status}", status, dead_reason(status))


def build_item(
    method: str,
    url: str,
    *,
    json: Any = None,
    data: bytes | str | None = None,
    headers: Mapping[str, str] | None = None,
    now: float,
) -> OutboxItem:
    """Check and freeze a call into an item with a new id (a UUID4: the Idempotency-Key)."""
    method = method.upper() if isinstance(method, str) else ""
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}")
    u = URL(url) if isinstance(url, str) else None
    if u is None or u.scheme not in ("http", "https") or not u.host:
        raise ValueError("url must be an absolute http(s) URL")
    if u.user is not None or u.password is not None:
        raise ValueError("url must not carry credentials: the bearer is added at delivery")
    if json is not None and data is not None:
        raise ValueError("pass json or data, not both")
    stored: dict[str, str] = {}
    for key, value in (headers or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError("headers must map str to str")
        if key.lower() in CREDENTIAL_HEADERS:
            raise ValueError(
                f"the {key} header is not stored in an outbox item (no token is ever "
                "journaled with a call): the manager's middleware adds the bearer at delivery"
            )
        if key.lower() == KEY_HEADER.lower():
            raise ValueError("the outbox sets Idempotency-Key itself (the item's id)")
        stored[key] = value
    if json is not None:
        body = jsonlib.dumps(json, separators=(",", ":"), allow_nan=False).encode()
        if not any(k.lower() == "content-type" for k in stored):
            stored["Content-Type"] = "application/json"
    elif isinstance(data, str):
        body = data.encode()
    elif isinstance(data, bytes | bytearray | memoryview):
        body = bytes(data)
    elif data is None:
        body = b""
    else:
        raise TypeError("data must be bytes or str")
    return OutboxItem(uuid.uuid4().hex, method, str(u), tuple(stored.items()), body, now)


class OutboxHost(Protocol):
    """What an :class:`Outbox` needs of its :class:`~tokenjournal.TokenManager`."""

    @property
    def account(self) -> str:
        """The manager's account (outboxes are per account)."""
        ...

    @property
    def journal(self) -> Journal:
        """The manager's journal."""
        ...

    @property
    def retry(self) -> RetryPolicy:
        """The manager's retry policy (``attempt_timeout`` bounds one try)."""
        ...

    @property
    def lease_ttl(self) -> float:
        """How long a lease on an item lasts without renewal (wall clock)."""
        ...

    @property
    def is_open(self) -> bool:
        """Whether the manager is open (delivery runs only then)."""
        ...

    @property
    def clock(self) -> Clock:
        """The manager's clock."""
        ...

    @property
    def holder(self) -> Holder:
        """The manager's lease identity (re-derived after fork)."""
        ...

    def bearer_allowed(self, url: str) -> bool:
        """Whether the middleware sends the bearer to ``url`` (``allowed_origins``)."""
        ...

    def outbox_http(self) -> aiohttp.ClientSession:
        """The session deliveries use: the manager's middleware installed, no redirects."""
        ...

    def emit_event(self, kind: EventKind, code: str | None) -> None:
        """Emit an event on the manager's hub."""
        ...

    def subscribe(self, callback: Callable[[TokenEvent], object]) -> Callable[[], None]:
        """Events of the manager."""
        ...

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        """Run ``coro`` as the manager's own work (close() waits for it, then cancels)."""
        ...

    async def closing(self) -> None:
        """Returns when the manager starts closing."""
        ...


class _Paused(Exception):
    """No session (ended, signed out): delivery waits for the next sign-in."""


class Outbox:
    """A named, durable queue of API calls, delivered in the background (see the module
    doc). Get one with ``tm.outbox(name, ...)``; the same name is the same outbox in every
    process and run on the journal (per account). ``name``, ``limits``, ``ordered``,
    ``max_backoff`` and ``concurrency`` (how many items may be in flight at once here: 1 when
    ordered) are its options."""

    def __init__(
        self,
        host: OutboxHost,
        name: str,
        *,
        limits: OutboxLimits,
        ordered: bool,
        concurrency: int,
        max_backoff: float,
    ) -> None:
        self._host = host
        self.name = name
        self.limits = limits
        self.ordered = ordered
        self.concurrency = 1 if ordered else concurrency
        self.max_backoff = max_backoff
        self._wake = asyncio.Event()  # an enqueue here, a sign-in: look again now
        # Set (and replaced) by a sign-in: cuts every backoff pause short, so the first try
        # after a sign-in is immediate; an enqueue does not (no retry storm while down).
        self._signed_in = asyncio.Event()
        self._active: set[str] = set()  # ids a task of ours works on (never claimed twice)
        self._backlog: collections.deque[OutboxItem] = collections.deque()  # claimed, not started
        # Settles waiting for their group commit, and the task that commits them.
        self._to_settle: list[Settle] = []
        self._settler: asyncio.Task[None] | None = None
        self._settle_wake = asyncio.Event()
        self._sending = 0  # requests out right now
        self._settled = asyncio.Event()  # an item settled here: drain looks again
        self._paused = False
        self._signins = 0  # sign-ins seen (a paused deliverer looks again after each)
        self._paused_at = 0  # ... as counted when it last looked
        self._runner: asyncio.Task[Any] | None = None
        self._inflight: set[asyncio.Task[Any]] = set()
        self._held: dict[str, float] = {}  # item id -> our lease's expiry (wall clock)
        host.subscribe(self._on_event)

    def __repr__(self) -> str:
        return f"Outbox({self.name!r}, ordered={self.ordered}, paused={self._paused})"

    @property
    def paused(self) -> bool:
        """Whether delivery waits for a sign-in (the session ended or was signed out)."""
        return self._paused

    # ------------------------------------------------------------------ public surface

    async def enqueue(
        self,
        method: str,
        url: str,
        *,
        json: Any = None,
        data: bytes | str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> str:
        """Journal one call; it is durable when this returns. Returns its id, which every
        delivery attempt sends as ``Idempotency-Key``.

        ``json`` (serialised, ``Content-Type: application/json``) or ``data`` (bytes or
        text) is the body. ``headers`` may not carry credentials (``Authorization``,
        ``Cookie``): the manager's middleware adds the bearer at delivery. Raises
        :class:`~tokenjournal.OutboxFull` when the outbox is full and ``when_full`` is
        ``reject``.

        Cancelling it (a timeout around it, an app shutting down) does not stop the write:
        once ``enqueue`` has checked its arguments the call is journaled and delivered (a full
        outbox or a failed journal is then logged), so never enqueue it again after a
        cancel, or it is sent twice under two keys (:meth:`Journal.outbox_add`).
        """
        self._require_open()
        item = build_item(
            method, url, json=json, data=data, headers=headers, now=self._host.clock.time()
        )
        if self.limits.max_bytes is not None and item.size > self.limits.max_bytes:
            raise OutboxFull(f"outbox {self.name!r}: one item is larger than max_bytes")
        try:
            dropped = await self._host.journal.outbox_add(
                self._host.account, self.name, item, self.limits
            )
        except asyncio.CancelledError:
            # The journal commits a write it queued even for a cancelled caller (and logs a
            # full outbox): the deliverer looks for it now.
            self._wake.set()
            raise
        if dropped is None:
            raise OutboxFull(f"outbox {self.name!r} is full ({self._limits_text()})")
        if dropped:
            log.warning("outbox %s full: dropped the %d oldest item(s)", self.name, dropped)
            self._host.emit_event(EventKind.OUTBOX_DROPPED, self.name)
        self._wake.set()
        return item.id

    async def drain(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 (the API)
        """Wait until every item pending when called (left by earlier runs too) is delivered
        or dead-lettered. Raises ``TimeoutError`` when ``timeout`` seconds (on the manager's
        clock) pass first; the items stay in line."""
        self._require_open()
        clock = self._host.clock
        deadline = None if timeout is None else clock.monotonic() + timeout
        upto: int | None = None
        while True:
            self._settled.clear()
            left, upto = await self._host.journal.outbox_waiting(
                self._host.account, self.name, upto
            )
            if left == 0:
                return
            if not self._host.is_open:
                raise RuntimeError("the TokenManager closed while draining")
            wait = IDLE_POLL / 5
            if deadline is not None:
                remaining = deadline - clock.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"outbox {self.name!r}: {left} item(s) still pending")
                wait = min(wait, remaining)
            await _first(self._settled.wait(), clock.sleep(wait), self._host.closing())

    async def stats(self) -> OutboxStats:
        """``pending``, ``in_flight``, ``delivered``, ``dead``, ``dropped``, ``oldest_age``."""
        return await self._host.journal.outbox_stats(
            self._host.account, self.name, self._host.clock.time()
        )

    async def dead_letters(self) -> list[DeadLetter]:
        """The items the server refused for good, oldest first."""
        return await self._host.journal.outbox_dead(self._host.account, self.name)

    async def retry_dead(self) -> int:
        """Put every dead letter back in line (same id, same key); returns how many."""
        count = await self._host.journal.outbox_retry_dead(self._host.account, self.name)
        self._wake.set()
        return count

    async def clear(self) -> int:
        """Delete every item of this outbox, pending and dead, and its counters; returns how
        many items went. ``sign_out()`` never does this by itself."""
        return await self._host.journal.outbox_clear(self._host.account, self.name)

    # ------------------------------------------------------------------ delivery

    def _require_open(self) -> None:
        if not self._host.is_open:
            raise RuntimeError(
                "the TokenManager is not open: use `async with tm:` or `await tm.open()`"
            )

    def _limits_text(self) -> str:
        parts = [f"max_items={self.limits.max_items}"] if self.limits.max_items else []
        parts += [f"max_bytes={self.limits.max_bytes}"] if self.limits.max_bytes else []
        # The journal reports a full outbox only when a limit is set (_make_room).
        return ", ".join(parts)

    def _on_event(self, event: TokenEvent) -> None:
        if event.kind in (EventKind.SIGNED_IN, EventKind.ADOPTED):
            self._signins += 1
            self._wake.set()
            self._signed_in.set()
            self._signed_in = asyncio.Event()

    def start(self) -> None:
        """Start delivering (the manager calls this once it is open): the first try now."""
        if self._runner is None or self._runner.done():
            self._wake.set()
            self._runner = self._host.spawn(self._run())

    async def _run(self) -> None:
        try:
            while self._host.is_open:
                if self._paused and self._backlog:
                    await self._release_backlog()
                if self._paused:
                    if not await self._idle(paused=True):
                        return
                    if not await self._session_back():
                        continue
                    self._paused = False
                free = self.concurrency - len(self._inflight)
                if free <= 0:
                    await self._idle()
                    continue
                if self._backlog:  # claimed earlier, waiting for a free slot
                    self._start_tasks()
                    continue
                try:
                    items = await self._host.journal.outbox_claim(
                        self._host.account,
                        self.name,
                        self._host.holder,
                        self._host.clock.time(),
                        self._host.lease_ttl,
                        CLAIM_BATCH,
                        self.ordered,
                    )
                except TokenJournalError as exc:  # locked, full: look again after a poll
                    log.warning("outbox %s: cannot claim items: %s", self.name, exc)
                    items = []
                items = [i for i in items if i.id not in self._active]
                if not items:
                    if not await self._idle():
                        return
                    continue
                expires = self._host.clock.time() + self._host.lease_ttl
                for item in items:
                    self._held[item.id] = expires
                if self.ordered:
                    await self._deliver_in_order(items)
                else:
                    self._backlog.extend(items)
                    self._start_tasks()
        finally:
            for task in list(self._inflight):
                task.cancel()
            if self._inflight:
                await asyncio.gather(*self._inflight, return_exceptions=True)
            await asyncio.shield(self._settled_all())
            if self._backlog:
                await asyncio.shield(self._release_backlog())
            await asyncio.shield(self._release_all())

    def _start_tasks(self) -> None:
        """Unordered: start claimed items while fewer than ``concurrency`` are out."""
        while self._backlog and len(self._inflight) < self.concurrency:
            task = asyncio.ensure_future(self._deliver_one(self._backlog.popleft()))
            self._inflight.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._inflight.discard(task)
        self._wake.set()
        if not task.cancelled() and task.exception() is not None:
            log.warning("outbox %s: a delivery failed: %s", self.name, task.exception())

    async def _deliver_in_order(self, items: list[Any]) -> None:
        # The batch waits in the backlog, so what was never sent goes back untried however
        # this ends (paused, closed, cancelled).
        self._backlog.extend(items)
        try:
            while self._backlog:
                if not await self._deliver_one(self._backlog.popleft()):
                    # Paused or closed: the rest of the batch goes back in line, in order
                    # (this item's delivery gave its own lease back).
                    await self._release_backlog()
                    return
        finally:
            # The next claim must see this batch settled, or it would wait for our leases.
            await asyncio.shield(self._settled_all())

    async def _session_back(self) -> bool:
        """Whether the journal holds a pair again (a sign-in here or in another process)."""
        try:
            record = await self._host.journal.load(self._host.account)
        except TokenJournalError:
            return False
        signing_out = record.intent is not None and record.intent.kind == "sign_out"
        return record.tokens is not None and not signing_out

    async def _idle(self, *, paused: bool = False) -> bool:
        """Wait for a wake-up (paused: a sign-in only, not an enqueue), ``close()``, or one
        idle poll (real time: another process may have signed in); whether still open."""
        if paused:
            if self._host.is_open and self._signins == self._paused_at:
                with contextlib.suppress(TimeoutError):
                    waits = (self._signed_in.wait(), self._host.closing())
                    await asyncio.wait_for(_first(*waits), IDLE_POLL)
            self._paused_at = self._signins
            return self._host.is_open
        if not self._wake.is_set():  # closed: closing() has returned, no wait
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_first(self._wake.wait(), self._host.closing()), IDLE_POLL)
        self._wake.clear()
        return self._host.is_open

    async def _pause(self, seconds: float) -> bool:
        """A backoff pause on the manager's clock, cut short by close() or a sign-in."""
        if not self._host.is_open:
            return False
        signed_in = self._signed_in
        await _first(self._host.clock.sleep(seconds), signed_in.wait(), self._host.closing())
        return self._host.is_open

    async def _deliver_one(self, item: OutboxItem) -> bool:
        """Try ``item`` until it settles (True) or delivery pauses or closes (False)."""
        self._active.add(item.id)
        try:
            return await self._deliver(item)
        finally:
            self._active.discard(item.id)

    async def _deliver(self, item: OutboxItem) -> bool:
        policy = RetryPolicy(
            max_attempts=sys.maxsize,
            max_elapsed=math.inf,
            base_delay=min(0.5, self.max_backoff),
            max_delay=self.max_backoff,
        )  # no attempt_timeout: attempts() does not bound a try, _send does
        tries = 0
        try:
            loop = attempts(
                policy, self._host.clock.monotonic, self._pause, what=f"outbox {self.name}"
            )
            async for attempt in loop:
                if not await self._still_ours(item.id, retry=attempt.number > 1):
                    return False  # another process took it over: it is theirs to settle
                _faults.crash_point("before_send")
                tries += 1
                try:
                    status, headers = await self._send(item)
                except (SessionEnded, NotSignedIn):
                    raise _Paused from None
                except RuntimeError:
                    if self._host.is_open:
                        raise
                    # close() began after this try started: the manager (its middleware,
                    # its session) is going away. The item stays pending.
                    await asyncio.shield(self._release([item.id]))
                    return False
                except _NoAnswer as exc:
                    attempt.failed(None, exc.detail)
                    continue
                except TokenJournalError as exc:  # the refresh after a 401 failed for now
                    attempt.failed(None, exc.code)
                    continue
                _faults.crash_point("after_answer")
                failure = classify(
                    status,
                    headers,
                    self._host.clock.time(),
                    bearer_sent=self._host.bearer_allowed(item.url),
                )
                if failure is None or failure.kind is FailureKind.REJECTED:
                    _faults.crash_point("before_settle")
                    dead = failure is not None
                    reason = failure.message if failure else ""
                    # Settles are committed in groups while the next items go out: the
                    # answer is in, so order is kept; a settle lost to a crash only means
                    # the same key is sent again, and the server answers it again.
                    self._queue_settle(
                        Settle(item.id, status, dead, reason, item.attempts + tries - 1)
                    )
                    return True
                attempt.failed(failure, f"HTTP {status}")
        except _Paused:
            if not self._paused:
                self._paused, self._paused_at = True, self._signins
            log.info("outbox %s paused: no session; it resumes after the next sign-in", self.name)
            await asyncio.shield(self._release([item.id]))
            return False
        except TokenJournalError as exc:
            # The loop ended because the manager closed, or the journal failed: the item
            # stays pending and goes back in line.
            if self._host.is_open:
                log.warning("outbox %s: item %s back in line: %s", self.name, item.id, exc)
            await asyncio.shield(self._release([item.id]))
            return False
        return False  # pragma: no cover - the loop ends by returning or raising

    def _queue_settle(self, settle: Settle) -> None:
        self._to_settle.append(settle)
        if len(self._to_settle) >= SETTLE_GROUP:
            self._settle_wake.set()
        if self._settler is None or self._settler.done():
            self._settler = asyncio.ensure_future(self._settle_loop())

    async def _settle_loop(self) -> None:
        """Commit the queued settles: a group when ``SETTLE_GROUP`` are waiting, when no
        request is out (the deliverer waits or idles), or when asked (``_settled_all``)."""
        while self._to_settle:
            while len(self._to_settle) < SETTLE_GROUP and self._sending:
                self._settle_wake.clear()
                await self._settle_wake.wait()
            group, self._to_settle = self._to_settle, []
            try:
                done = await self._host.journal.outbox_settle(self._host.account, self.name, group)
            except TokenJournalError as exc:
                # The items stay pending (our leases go): they are sent again, same keys.
                log.warning("outbox %s: %d settle(s) not committed: %s", self.name, len(group), exc)
                await self._release([s.item_id for s in group])
                continue
            for settle, settled in zip(group, done, strict=True):
                self._held.pop(settle.item_id, None)
                if settled and settle.dead:
                    log.warning(
                        "outbox %s: item %s refused: %s", self.name, settle.item_id, settle.reason
                    )
                    self._host.emit_event(EventKind.OUTBOX_DEAD, self.name)
            self._settled.set()

    async def _settled_all(self) -> None:
        """Commit every queued settle now and wait for it (or for it to fail)."""
        # Callers have no request out (the ordered deliverer between items, the runner once
        # its tasks ended), so the settler waits for nothing: wake it and wait for it.
        self._settle_wake.set()
        while self._settler is not None and not self._settler.done():
            await asyncio.wait({self._settler})

    async def _still_ours(self, item_id: str, *, retry: bool) -> bool:
        """Renew our leases before a retry (counting its try on the item: the claim counted
        only the first) or when they are half spent; whether ``item_id`` is still ours (a
        process paused past its lease may have lost it)."""
        now = self._host.clock.time()
        expires = self._held.get(item_id)
        if expires is None:
            return False
        if not retry and expires - now > self._host.lease_ttl / 2:
            return True
        kept = await self._host.journal.outbox_renew(
            self._host.account,
            self.name,
            self._host.holder,
            now,
            self._host.lease_ttl,
            tried=item_id if retry else None,
        )
        self._held = {held: now + self._host.lease_ttl for held in self._held if held in kept}
        return item_id in self._held

    async def _send(self, item: OutboxItem) -> tuple[int, Mapping[str, str]]:
        """One try: the item's headers, its key, its body; the answer's body is read (capped)
        and thrown away."""
        headers = dict(item.headers)
        headers[KEY_HEADER] = item.id
        http = self._host.outbox_http()
        self._sending += 1
        try:
            async with http.request(
                item.method,
                item.url,
                data=item.body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self._host.retry.attempt_timeout),
                allow_redirects=False,
            ) as response:
                read = 0
                async for chunk in response.content.iter_chunked(64 * 1024):
                    read += len(chunk)
                    if read > ANSWER_LIMIT:
                        break
                return response.status, response.headers
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise _NoAnswer(type(exc).__name__) from None
        finally:
            self._sending -= 1
            if not self._sending:
                self._settle_wake.set()  # nothing out: commit what is waiting

    async def _release(self, ids: list[str], *, untried: bool = False) -> None:
        for item_id in ids:
            self._held.pop(item_id, None)
        try:
            await self._host.journal.outbox_release(
                self._host.account, self.name, self._host.holder, ids, untried=untried
            )
        except (TokenJournalError, RuntimeError) as exc:  # the leases lapse on their own
            log.info("outbox %s: could not release leases: %s", self.name, exc)

    async def _release_backlog(self) -> None:
        """Give back the items claimed and never sent: the try their claim counted is taken
        back, so ``attempts`` counts requests made."""
        ids = [i.id for i in self._backlog]
        self._backlog.clear()
        await self._release(ids, untried=True)

    async def _release_all(self) -> None:
        self._held.clear()
        try:
            await self._host.journal.outbox_release(
                self._host.account, self.name, self._host.holder, None
            )
        except (TokenJournalError, RuntimeError) as exc:
            log.info("outbox %s: could not release leases: %s", self.name, exc)


class _NoAnswer(Exception):
    """No answer at all (connect/read error, timeout); ``detail`` names the error class."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


async def _first(*aws: Awaitable[Any]) -> None:
    """Wait until the first of ``aws`` finishes; cancel the rest."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
