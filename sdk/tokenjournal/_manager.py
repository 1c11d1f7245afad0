"""TokenManager: one account's session, its single-flight refresh, recovery and events.

The data path: ``access_token()`` answers a fresh token from memory with no I/O; a stale one
joins (or starts) the account's one refresh task. That task takes the journal's lease (the
cross-process single flight), writes the intent, sends the old refresh token, commits the
successor durably and only then wakes every waiter. A crash anywhere leaves an intent that
the next start replays first, paced to land inside the server's grace window.

The full account is docs/architecture.md: the data path in section 1, the invariants cited
here by number in section 2.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import functools
import logging
import math
import os
import platform
import random
import webbrowser
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, Final, TypeVar

import aiohttp
from yarl import URL

from . import _doorbell as doorbell
from . import _faults
from ._browser import BrowserIO, OpenBrowser, run_browser_flow
from ._clock import Clock, SystemClock
from ._device import DeviceIO, run_device_flow
from ._errors import (
    CODE_LIMIT,
    DESCRIPTION_LIMIT,
    JournalError,
    NotSignedIn,
    ProtocolError,
    SessionEnded,
    SignInFailed,
    TokenJournalError,
    TransientError,
)
from ._events import Callback, EventHub, EventKind, SessionState, TokenEvent
from ._journal import (
    AccountRecord,
    Busy,
    Holder,
    Journal,
    Lease,
    SQLiteJournal,
    Stale,
    Started,
    lease_is_live,
)
from ._middleware import TokenMiddleware
from ._outbox import MAX_BACKOFF, Outbox, OutboxLimits, WhenFull
from ._protocols import (
    Answer,
    AuthProtocol,
    DeviceCode,
    DeviceInfo,
    HttpRequest,
    ManaProtocol,
    OAuth2Protocol,
)
from ._retry import GRACE_GUARD, RetryPolicy, attempts
from ._seal import Seal
from ._terminal import printable
from ._tokens import Failure, FailureKind, TokenSet, fingerprint
from ._transport import NetworkFailure, Raw, send
from ._urls import is_loopback

log = logging.getLogger("tokenjournal")

_A = TypeVar("_A")

#: How long ``close()`` lets an in-flight refresh finish its commit before leaving its intent.
CLOSE_WAIT: Final = 5.0
#: A lease outlives one try by this much, so a slow answer does not hand the refresh over.
LEASE_SLACK: Final = 5.0
#: Polling for another process's commit: first and longest pause.
WAIT_FIRST: Final = 0.01
WAIT_MAX: Final = 0.05  # while waiting only: ~20 cheap reads a second buys a short tail
#: With the holder's doorbell in reach, reads are only a safety net: fewer of them.
BELL_WAIT_MAX: Final = 0.25
#: The grace rescue (invariant 11) tries again at least this often, as a share of the grace
#: window and in seconds: a network that comes back is noticed within the smaller of the two,
#: and a 300 s window costs about ten requests.
RESCUE_SHARE: Final = 0.1
RESCUE_MAX_GAP: Final = 30.0
#: How long ``sign_out()`` keeps trying to tell the server before it signs out locally.
SIGN_OUT_BUDGET: Final = 10.0
#: After a refresh ran out of tries (the server or the network away), the next one waits
#: min(OFFLINE_FACTOR x retry.max_delay (300 s by default), max(retry.max_delay,
#: retry.offline_growth x time offline)), full jitter above a floor of OFFLINE_FLOOR x
#: retry.max_delay, and callers meanwhile get the last error at once, without a request: one
#: device notices a return within a minute or two of a short outage, and a fleet that lost
#: its server for minutes comes back spread over minutes instead of in one wave
#: (docs/architecture.md 1.5.1).
OFFLINE_FACTOR: Final = 10.0
#: The floor (10 s by default): a device whose server is away sends at most one request per
#: floor however often its app calls (the first caller's burst of retries aside, once); a
#: draw near 0 would let it try again at the next call.
OFFLINE_FLOOR: Final = 1 / 3
#: While the token still works for longer than that pause, the background try comes at a
#: random point of its last BACKGROUND_LEAD x retry.max_delay (60 s by default): nobody is
#: waiting, so it need not hurry, and a fleet's tries then come at the rate its tokens lapse.
BACKGROUND_LEAD: Final = 2.0
#: A pair is refreshed at a random point in the last REFRESH_SPREAD of its life before the
#: margin: devices that signed in together (or came back from an outage together) drift apart
#: instead of refreshing in one wave for ever. Costs about half of it in extra refreshes.
REFRESH_SPREAD: Final = 0.2
#: A pair just received is not refreshed again for staleness within the smaller of this and
#: half its measured life (invariant 12): a device clock that runs ahead, or a server that
#: hands out short-lived tokens, cannot turn every call into a rotation. A 401 still can.
FRESH_FLOOR: Final = 10.0


def wide_spread(life: float, margin: float) -> float:
    """The spread of a pair a fleet may have received at the same moment (a sign-in, the
    first pair after a run of failures): one whole refresh period, the average life of a
    routine pair (``life - margin - REFRESH_SPREAD / 2 x life``), so devices that moved
    together are spread evenly over a period from their first refresh on. A narrower draw
    leaves a wave that each later pair's small spread disperses only slowly, like a random
    walk (docs/fleet.md). Never narrower than ``REFRESH_SPREAD``."""
    return max(REFRESH_SPREAD, 1.0 - REFRESH_SPREAD / 2 - margin / life)


class _LeaseLost(Exception):
    """Our lease lapsed and another process took it: our refresh token may be spent."""


@dataclasses.dataclass(slots=True)
class _Claim:
    """What step 1 of a refresh hands on: the pair to renew, the generation it belongs
    to, the grace deadline (monotonic), and when the lease was last proven ours (monotonic;
    the one mutable field, moved on by each renewal)."""

    tokens: TokenSet
    generation: int
    deadline: float
    proven_at: float
    #: The intent was pending before this claim: its token may already be spent.
    carried: bool = False
    #: A try of this claim may have reached the server (an answer, or a failure after the
    #: connection was made): until a commit, the token may be spent.
    reached: bool = False


def _auth_urls(auth_url: str, protocol: AuthProtocol) -> list[str]:
    """Every URL the manager sends a secret to (refresh token, password, device code), or
    sends a person to type one into (the browser sign-in's authorization page)."""
    urls = [auth_url, protocol.auth_url]
    if isinstance(protocol, OAuth2Protocol):
        others = (
            protocol.device_authorization_url,
            protocol.revocation_url,
            protocol.authorization_url,
        )
        urls += [u for u in others if u]
    return urls


def _scrubbed(failure: Failure, secrets: Iterable[str]) -> Failure:
    """``failure`` with its server-supplied text printable, short, and free of secrets."""
    secrets = tuple(secrets)
    description = failure.description
    return dataclasses.replace(
        failure,
        code=printable(failure.code, limit=CODE_LIMIT, secrets=secrets),
        message=printable(failure.message, secrets=secrets),
        description=None
        if description is None
        else printable(description, limit=DESCRIPTION_LIMIT, secrets=secrets),
    )


class TokenManager:
    """Keeps one account signed in. Use it as an async context manager.

    ``journal`` is a path (``~`` allowed) or a :class:`~tokenjournal.SQLiteJournal` /
    :class:`~tokenjournal.MemoryJournal`. ``protocol`` defaults to
    ``ManaProtocol(auth_url)``. ``refresh_margin`` seconds before expiry a call starts a
    background refresh while still answering with the valid token (clamped to half the
    token's lifetime). ``grace_period`` is the server's grace window: it paces the recovery
    of a refresh interrupted by a crash, and the manager keeps trying on its own inside it
    while a refresh is pending (the grace rescue). ``allowed_origins`` are the origins the
    middleware may send the bearer to (default: the auth server's origin only). Plain HTTP to
    an auth server that is not this machine is refused unless ``allow_insecure_http``: the
    refresh token and the password would cross the network in clear. ``seal`` (a
    :class:`~tokenjournal.Seal`) seals the tokens at rest in the journal at ``journal``.
    """

    def __init__(
        self,
        auth_url: str,
        journal: str | os.PathLike[str] | Journal,
        account: str = "default",
        protocol: AuthProtocol | None = None,
        refresh_margin: float = 60.0,
        grace_period: float = 300.0,
        allowed_origins: list[str] | tuple[str, ...] | None = None,
        *,
        retry: RetryPolicy | None = None,
        clock: Clock | None = None,
        lease_ttl: float | None = None,
        allow_insecure_http: bool = False,
        device_name: str | None = None,
        device_type: str = "python",
        user_agent: str = "tokenjournal",
        seal: Seal | None = None,
    ) -> None:
        url = URL(auth_url) if isinstance(auth_url, str) else None
        if url is None or url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"auth_url must be an http(s) URL, got {auth_url!r}")
        if not isinstance(account, str) or not account:
            raise ValueError("account must be a non-empty string")
        if refresh_margin < 0:
            raise ValueError("refresh_margin must be >= 0")
        if grace_period <= 0:
            raise ValueError("grace_period must be > 0")
        self.auth_url = auth_url
        self.account = account
        self.protocol: AuthProtocol = protocol or ManaProtocol(auth_url)
        self.refresh_margin = float(refresh_margin)
        self.grace_period = float(grace_period)
        self.retry = retry or RetryPolicy()
        self.lease_ttl = lease_ttl or self.retry.attempt_timeout + LEASE_SLACK
        self.allow_insecure_http = allow_insecure_http
        for where in _auth_urls(auth_url, self.protocol):
            u = URL(where)
            if u.scheme == "http" and not is_loopback(u.host) and not allow_insecure_http:
                raise ValueError(
                    f"refusing plain HTTP to {u.host}: refresh tokens and passwords would be "
                    "sent in clear; use https or pass allow_insecure_http=True"
                )
        self._clock: Clock = clock or SystemClock()
        if isinstance(journal, str | os.PathLike):
            self.journal: Journal = SQLiteJournal(journal, seal=seal)
        elif seal is not None:
            # A journal object brings its own: SQLiteJournal(path, seal=...); a MemoryJournal
            # keeps nothing at rest.
            raise TypeError("seal= goes with a journal path; pass it to SQLiteJournal instead")
        elif isinstance(journal, Journal):
            self.journal = journal
        else:
            raise TypeError("journal must be a path, a SQLiteJournal or a MemoryJournal")
        self.middleware = TokenMiddleware(
            self,
            allowed_origins if allowed_origins is not None else [auth_url],
            allow_insecure_http=allow_insecure_http,
        )
        self._device_meta = (device_name or platform.node() or "device", device_type, user_agent)
        self._device: DeviceInfo | None = None
        self._lease_holder = Holder.for_this_process()
        self._bell = doorbell.Doorbell()  # open while we hold the lease: wakes waiters
        self._hub = EventHub()
        self._state = SessionState.SIGNED_OUT
        self._tokens: TokenSet | None = None
        # Monotonic instants the hot path compares against (see _use()).
        self._refresh_at = self._expires_at = math.inf
        self._fresh: tuple[TokenSet | None, float] = (None, math.inf)
        self._generation = 0
        self._ended_code: str | None = None
        self._task: asyncio.Task[TokenSet] | None = None
        self._rescue: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._http: aiohttp.ClientSession | None = None
        self._open = False
        self._lifecycle = asyncio.Lock()  # open() and close() one at a time
        self._closing = asyncio.Event()  # wakes every pause of ours when close() starts
        self._quiet_until = 0.0  # monotonic; no refresh before this (after a failure) ...
        self._lazy_until = 0.0  # ... nor a background one, while the token works, before this
        self._tried_at = -math.inf  # monotonic; when the last refresh try ended (the rescue's gap)
        self._not_before = -math.inf  # ... and when the server's Retry-After on it ends
        self._offline_since: float | None = None  # monotonic start of a run of failed refreshes
        self._offline_error: TransientError | None = None  # what the last one of them raised
        self._in_doubt = False  # the pending intent's token may have reached the server
        self._own_intent: float | None = None  # started_at of the last intent we claimed
        self._one_try = dataclasses.replace(self.retry, max_attempts=1)
        self._intent_anchor = (math.nan, 0.0)  # (intent started_at, its monotonic instant)
        self.refresh_requests = 0  # refresh requests this manager sent (a figure for tests/bench)
        self._outboxes: dict[str, Outbox] = {}
        self._outbox_host = _OutboxHost(self)
        self._outbox_session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return (
            f"TokenManager(account={self.account!r}, state={self._state.value}, "
            f"tokens={self._tokens!r})"
        )

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> TokenManager:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def open(self) -> None:
        """Open the journal and resume what an earlier run left pending (invariant 6).

        Idempotent, also when called concurrently: the second call waits for the first.
        """
        async with self._lifecycle:
            if self._open:
                return
            await self.journal.open()
            try:
                name, kind, agent = self._device_meta
                self._device = DeviceInfo(await self.journal.device_id(), name, kind, agent)
                record = await self.journal.load(self.account)
            except BaseException:
                await asyncio.shield(self.journal.close())
                raise
            self._http = aiohttp.ClientSession(trace_configs=self._trace_configs())
            self._closing = asyncio.Event()
            self._open = True
            self._hub.ended = False
            self._resume(record)
            for outbox in self._outboxes.values():
                outbox.start()  # the first try now (docs/architecture.md section 8)

    def _resume(self, record: AccountRecord) -> None:
        """Take the journal's pair and finish what an earlier run left pending."""
        self._adopt(record, announce=False)
        intent = record.intent
        if intent is not None and intent.kind == "refresh" and record.tokens is not None:
            log.info(
                "resuming an interrupted refresh of account %s (token %s)",
                self.account,
                intent.refresh_fingerprint,
            )
            self._emit(EventKind.RECOVERING)
            self._start_refresh(None, force=True)
        elif intent is not None and intent.kind == "sign_out":
            self._spawn(self._finish_sign_out(record.tokens, record.generation))

    @staticmethod
    def _trace_configs() -> list[aiohttp.TraceConfig]:
        if not _faults.armed():
            return []
        trace = aiohttp.TraceConfig()

        async def sent(*_: object) -> None:
            # aiohttp fires this hook *before* it writes the chunk to the socket; dying here
            # would be "after_intent" again. The write that follows runs in the same loop
            # step, so die on the next one, when the request is already with the kernel.
            asyncio.get_running_loop().call_soon(_faults.crash_point, "after_send")

        trace.on_request_chunk_sent.append(sent)
        return [trace]

    async def close(self) -> None:
        """Let an in-flight refresh commit (bounded wait), then close. Safe to call twice.

        A ``close()`` that is itself cancelled (a shutdown timeout) leaves the rest of the
        job to the next ``close()``, which finishes it; ``events()`` iterators end.
        """
        async with self._lifecycle:
            self._open = False  # no new work from here on
            self._closing.set()  # the rescue and every backoff pause wake up now
            try:
                tasks = (self._task, self._rescue, *self._background)
                pending = [t for t in tasks if t is not None and not t.done()]
                if pending:
                    _, still = await asyncio.wait(pending, timeout=CLOSE_WAIT)
                    for task in still:  # its intent stays in the journal for the next start
                        task.cancel()
                    await asyncio.gather(*pending, return_exceptions=True)
                if self._http is not None:
                    await self._http.close()
                    self._http = None
                if self._outbox_session is not None:
                    await self._outbox_session.close()
                    self._outbox_session = None
                await self.journal.close()
            finally:
                # Even when this close is cut short (a shutdown timeout): the app's
                # `async for event in tm.events()` must end with it, not hang the shutdown.
                self._hub.end_streams()

    # ------------------------------------------------------------------ public surface

    @property
    def state(self) -> SessionState:
        """The session's state."""
        return self._state

    @property
    def tokens(self) -> TokenSet | None:
        """The current pair (its repr shows fingerprints only)."""
        return self._tokens

    @property
    def ended_code(self) -> str | None:
        """Why the server ended the session, when it did."""
        return self._ended_code

    def subscribe(self, callback: Callback) -> Callable[[], None]:
        """Call ``callback(TokenEvent)`` on every event; returns the unsubscribe function."""
        return self._hub.subscribe(callback)

    def events(self) -> AsyncIterator[TokenEvent]:
        """Every event from now on (from this call), as an async iterator; it ends when the
        manager closes (at once if it is closed)."""
        return self._hub.stream()

    def outbox(
        self,
        name: str,
        *,
        max_items: int | None = None,
        max_bytes: int | None = None,
        when_full: WhenFull = "reject",
        ordered: bool = True,
        concurrency: int = 4,
        max_backoff: float = MAX_BACKOFF,
    ) -> Outbox:
        """The durable outbox ``name`` of this account (docs/architecture.md section 8).

        One object per name per manager; the items live in the journal, so the same name
        finds them again after a restart and in every process on the journal. Delivery runs
        in the background while the manager is open, through its middleware.
        ``max_items``/``max_bytes`` bound the pending items; a full outbox raises
        :class:`~tokenjournal.OutboxFull` (``when_full="reject"``) or drops its oldest
        (``"drop_oldest"``, counted and evented). ``ordered=True`` sends item n + 1 only after
        item n settled; ``ordered=False`` keeps up to ``concurrency`` in flight. Backoff
        between tries grows to ``max_backoff`` seconds. Asking again for a name returns the
        same outbox; asking with other options is an error.
        """
        if not isinstance(name, str) or not name or not name.isprintable() or len(name) > 64:
            raise ValueError("an outbox name is 1-64 printable characters")
        for label, limit in (("max_items", max_items), ("max_bytes", max_bytes)):
            if limit is not None and (isinstance(limit, bool) or limit < 1):
                raise ValueError(f"{label} must be a positive integer or None")
        if when_full not in ("reject", "drop_oldest"):
            raise ValueError('when_full must be "reject" or "drop_oldest"')
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if not 0 < max_backoff < math.inf:  # infinite: an item's pauses would grow for ever
            raise ValueError("max_backoff must be > 0 and finite")
        limits = OutboxLimits(max_items, max_bytes, when_full)
        existing = self._outboxes.get(name)
        if existing is not None:
            options = (existing.limits, existing.ordered, existing.max_backoff)
            concurrency_differs = not ordered and existing.concurrency != concurrency
            if options != (limits, ordered, max_backoff) or concurrency_differs:
                raise ValueError(f"outbox {name!r} already exists here with other options")
            return existing
        outbox = Outbox(
            self._outbox_host,
            name,
            limits=limits,
            ordered=ordered,
            concurrency=concurrency,
            max_backoff=max_backoff,
        )
        self._outboxes[name] = outbox
        if self._open:
            outbox.start()
        return outbox

    def client_session(self, **kwargs: Any) -> aiohttp.ClientSession:
        """An ``aiohttp.ClientSession`` with this manager's middleware installed."""
        middlewares = (self.middleware, *kwargs.pop("middlewares", ()))
        return aiohttp.ClientSession(middlewares=middlewares, **kwargs)

    async def access_token(self) -> str:
        """A valid access token: from memory when fresh, else from the one shared refresh."""
        tokens = self._tokens
        if tokens is not None and self._open:  # closed: _join says so, as fresh_token() does
            now = self._clock.monotonic()  # a wall-clock step cannot expire or storm anything
            if now < self._refresh_at:
                return tokens.access_token
            if now < self._expires_at:
                # Inside the margin: answer now, refresh behind the caller's back, one try at
                # a time: nobody waits on it, so a failure just waits for a later call (a
                # fleet whose server is away must not send bursts of retries for tokens
                # that still work).
                if now >= self._lazy_until:
                    self._start_refresh(None, force=False, policy=self._one_try)
                return tokens.access_token
        return (await self._join(None, force=False)).access_token

    def fresh_token(self) -> str | None:
        """The access token if it is fresh now (before its refresh margin), else ``None``.

        No I/O, no await, one read of a snapshot that ``_use`` replaces whole: safe from any
        thread, so :class:`tokenjournal.sync.TokenManager` answers from it without a hop to
        its loop thread. A stale or missing token is ``access_token()``'s to handle.
        """
        tokens, refresh_at = self._fresh
        if tokens is not None and self._open and self._clock.monotonic() < refresh_at:
            return tokens.access_token
        return None

    async def refresh(self) -> TokenSet:
        """Force a refresh now (or join the one in flight); returns the new pair."""
        return await self._join(None, force=True)

    async def refresh_for(self, rejected_access_token: str) -> TokenSet:
        """The server rejected ``rejected_access_token`` (a 401): make sure we move past it.

        If the account's token already changed, the current pair is returned with no refresh
        (invariant 10); otherwise this joins or starts the refresh.
        """
        return await self._join(rejected_access_token, force=True)

    async def set_tokens(self, tokens: TokenSet) -> None:
        """Store a pair obtained elsewhere, as a sign-in."""
        if not isinstance(tokens, TokenSet):
            raise TypeError("set_tokens takes a TokenSet")
        await self._store_sign_in(tokens, fresh=False)

    async def sign_in(self, **credentials: str) -> TokenSet:
        """Sign in with the protocol's credentials (Mana: ``email``, ``password``;
        OAuth 2.0 password grant: ``username``, ``password``)."""
        self._require_open()
        request = self.protocol.build_sign_in(credentials, self._device_info())
        answer = await self._exchange(
            lambda: request, self._reader(None), secrets=credentials.values(), what="sign-in"
        )
        if isinstance(answer, Failure):
            raise SignInFailed(answer.code, description=answer.description)
        await self._store_sign_in(answer)
        return answer

    async def sign_in_device(
        self, on_code: Callable[[DeviceCode], Awaitable[None] | None]
    ) -> TokenSet:
        """Sign in with the OAuth 2.0 device flow (RFC 8628); see :mod:`tokenjournal._device`."""
        self._require_open()
        if not isinstance(self.protocol, OAuth2Protocol):
            raise TypeError("sign_in_device needs an OAuth2Protocol with device_authorization_url")
        io = DeviceIO(
            self._exchange, self._pause, self._clock, self.journal, self.account, self.retry
        )
        tokens = await run_device_flow(io, self.protocol, on_code)
        await self._store_sign_in(tokens)
        return tokens

    async def sign_in_browser(
        self,
        *,
        open_browser: OpenBrowser = webbrowser.open,
        port: int = 0,
        timeout: float = 300,  # noqa: ASYNC109  (the API's name; the wait runs on the clock)
        prompt: str | None = None,
    ) -> TokenSet:
        """Sign in through the system browser: authorization code with PKCE (S256) and a
        loopback redirect to 127.0.0.1 (RFC 8252, RFC 7636); returns the new pair.

        ``open_browser(url)`` shows the authorization page (``webbrowser.open`` by default;
        a plain function runs in a worker thread, a coroutine function on the loop;
        ``False`` logs the URL to open by hand). ``port`` is the listener's (0: any free
        one), ``timeout`` how long to wait for the browser to come back (and for the opener
        to return), ``prompt`` OpenID Connect's (``login``, ``consent``,
        ``select_account``). A redirect of another sign-in (another ``state``) is refused
        and the wait goes on. Refusals, the timeout (``state_mismatch`` if only such
        redirects came) raise :class:`SignInFailed` with ``.code`` and ``.description``;
        ``close()`` ends the wait with ``RuntimeError``; the code exchange is
        retried like any sign-in. The pair is journaled only once the exchange returned it:
        a crash or a failure anywhere before leaves the account as it was.
        See :mod:`tokenjournal._browser`.
        """
        self._require_open()
        if not isinstance(self.protocol, OAuth2Protocol):
            raise TypeError("sign_in_browser needs an OAuth2Protocol with authorization_url")
        if not 0 < timeout < math.inf:  # nan too: it would time out at once
            raise ValueError("timeout must be a finite number of seconds > 0")

        async def exchange(request: HttpRequest, secrets: Iterable[str]) -> TokenSet | Failure:
            return await self._exchange(
                lambda: request, self._reader(None), secrets=secrets, what="code exchange"
            )

        tokens = await run_browser_flow(
            BrowserIO(exchange, self._pause, self._closing),
            self.protocol,
            open_browser=open_browser,
            port=port,
            wait=timeout,
            prompt=prompt,
        )
        await self._store_sign_in(tokens)
        return tokens

    async def sign_out(self) -> None:
        """Tell the server (journaled first, so a crash finishes it next start), then clear."""
        self._require_open()
        if self._task is not None and not self._task.done():
            await asyncio.gather(asyncio.shield(self._task), return_exceptions=True)
        # The pair to log out and the generation to finish on come from the same
        # transaction that journals the sign-out.
        record = await self.journal.begin_sign_out(self.account, self._clock.time())
        # Journaled, the sign-out is decided: from here on no caller gets the old pair (the
        # server may revoke it any moment), and the rest runs to its end even if this caller
        # is cancelled: telling the server and clearing the journal are not the caller's.
        self._adopt(record)
        if record.tokens is None:
            return
        _faults.crash_point("mid_sign_out")
        await asyncio.shield(self._spawn(self._finish_sign_out(record.tokens, record.generation)))

    # ------------------------------------------------------------------ internals: state

    def _require_open(self) -> None:
        if not self._open:
            raise RuntimeError(
                "the TokenManager is not open: use `async with tm:` or `await tm.open()`"
            )

    def _device_info(self) -> DeviceInfo:
        assert self._device is not None
        return self._device

    def _emit(self, kind: EventKind, code: str | None = None) -> None:
        fp = fingerprint(self._tokens.access_token) if self._tokens else "-"
        self._hub.emit(TokenEvent(kind, self.account, self._state, self._clock.time(), fp, code))

    def _set_state(self, state: SessionState) -> None:
        if state is not self._state:
            self._state = state
            self._emit(EventKind.STATE)

    def _use(self, tokens: TokenSet | None, *, fresh: bool = False, wide: bool = False) -> None:
        """Hold ``tokens`` in memory, with the two monotonic instants the hot path compares
        against (invariant 12): what is left of the pair's life is read off the wall clock
        once, here, and from then on measured by the process itself. ``fresh`` marks a pair
        just received from the server: it gets the staleness floor (``FRESH_FLOOR``);
        ``wide`` one a fleet may have received at the same moment: it gets ``wide_spread``.

        A pair without an expiry, or without a refresh token to renew it with, is used until
        the server answers 401.
        """
        self._tokens = tokens
        expires = tokens.expires_at_epoch if tokens is not None else None
        if tokens is None or expires is None or tokens.refresh_token is None:
            self._refresh_at = self._expires_at = math.inf
        else:
            now = self._clock.monotonic()
            self._expires_at = now + (expires - self._clock.time())
            margin = tokens.margin(self.refresh_margin)
            self._refresh_at = self._expires_at - margin
            life = tokens.lifetime
            if life and life > 0:
                spread = wide_spread(life, margin) if wide else REFRESH_SPREAD
                self._refresh_at -= random.random() * spread * life
            if fresh:
                life = tokens.lifetime
                floor = now + (min(FRESH_FLOOR, life / 2) if life and life > 0 else FRESH_FLOOR)
                self._refresh_at = max(self._refresh_at, floor)
                self._expires_at = max(self._expires_at, floor)
        # One tuple, assigned at once: what fresh_token() reads from other threads.
        self._fresh = (tokens, self._refresh_at)

    def _stale(self) -> bool:
        """Whether the pair in memory is inside its refresh margin (monotonic time)."""
        return self._clock.monotonic() >= self._refresh_at

    @property
    def _holder(self) -> Holder:
        """This manager's lease identity, re-derived in a forked child: children of one
        parent must not share it, or they would refresh the same token at once (invariant 4)."""
        if self._lease_holder.pid != os.getpid():
            self._lease_holder = Holder.for_this_process()
        return self._lease_holder

    def _adopt(self, record: AccountRecord, *, announce: bool = True) -> bool:
        """Take the journal's view if it is newer than ours; returns whether it was.

        A pair whose sign-out is journaled is not held: it is being revoked.
        """
        signing_out = record.intent is not None and record.intent.kind == "sign_out"
        tokens = None if signing_out else record.tokens
        if record.generation == self._generation and tokens == self._tokens:
            return False
        newer = record.generation > self._generation
        self._generation = record.generation
        self._use(tokens)
        if tokens is not None:
            self._ended_code = None
            if newer:  # another process's commit: the server is there
                self._back_online()
            self._set_state(SessionState.VALID)
            if announce and newer:
                self._emit(EventKind.ADOPTED)
        elif record.ended_code is not None and record.ended_code != "signed_out":
            self._ended_code = record.ended_code
            self._set_state(SessionState.ENDED)
        else:
            self._set_state(SessionState.SIGNED_OUT)
        return True

    async def _store_sign_in(self, tokens: TokenSet, *, fresh: bool = True) -> None:
        """Store a pair as a sign-in; ``fresh``: the server just sent it (not the app).

        The store runs to its end as the manager's own work even if the caller is cancelled
        (an app's timeout, a Cancel button): the server has issued the pair, and a device or
        browser code is single use, so a pair dropped here costs the person a new approval.
        """
        self._require_open()
        await asyncio.shield(self._spawn(self._stored(tokens, fresh=fresh)))

    async def _stored(self, tokens: TokenSet, *, fresh: bool) -> None:
        generation = await self.journal.store_tokens(self.account, tokens, self._clock.time())
        self._use(tokens, fresh=fresh, wide=True)
        self._generation, self._ended_code = generation, None
        self._back_online()
        self._set_state(SessionState.VALID)
        self._emit(EventKind.SIGNED_IN)
        log.info("signed in account %s (token %s)", self.account, fingerprint(tokens.access_token))

    async def _end(self, code: str, generation: int, description: str | None = None) -> TokenSet:
        """The server says the token of ``generation`` is dead: end the session, unless a
        newer pair was stored meanwhile (a sign-in racing a recovery, another process), in
        which case the dead token was an old one and the newer pair is returned."""
        ended = await self.journal.end_session(
            self.account, code, self._clock.time(), expected_generation=generation
        )
        if ended is None:
            await self._release()
            record = await self.journal.load(self.account)
            self._adopt(record)
            if record.tokens is None:
                raise NotSignedIn(f"account {self.account!r} was signed out meanwhile")
            return record.tokens
        self._generation = ended
        self._use(None)
        self._ended_code = code
        self._set_state(SessionState.ENDED)
        self._emit(EventKind.ENDED, code)
        log.warning("the server ended the session of account %s: %s", self.account, code)
        raise SessionEnded(code, description=description)

    async def _finish_sign_out(self, tokens: TokenSet | None, generation: int) -> None:
        request = self.protocol.build_sign_out(tokens, self._device_info()) if tokens else None
        if tokens is not None and request is not None:
            # The user waits for this: a short budget, then the sign-out is honoured
            # locally even if the server is away (its copy of the token dies on its own).
            budget = min(self.retry.max_elapsed, SIGN_OUT_BUDGET)
            try:
                answer = await self._exchange(
                    lambda: request,
                    lambda status, headers, body: (
                        self.protocol.parse_sign_out(status, headers, body) or True
                    ),
                    policy=dataclasses.replace(self.retry, max_elapsed=budget),
                    secrets=tokens.secrets,
                    what="logout",
                )
            except (TransientError, ProtocolError) as exc:
                log.warning("logout could not reach the server (%s); signing out locally", exc)
            else:
                if isinstance(answer, Failure):
                    log.warning(
                        "the server refused the logout (%s); signing out locally", answer.code
                    )
        finished = await self.journal.finish_sign_out(self.account, self._clock.time(), generation)
        if finished is None:
            # A newer decision (a sign-in here or in another process, or the same sign-out
            # finished elsewhere) was journaled meanwhile: it stands; take it.
            self._adopt(await self.journal.load(self.account))
            return
        self._generation = finished
        self._use(None)
        self._ended_code = None
        self._set_state(SessionState.SIGNED_OUT)
        self._emit(EventKind.SIGNED_OUT)

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        """Run ``coro`` as the manager's own work: ``close()`` waits for it."""
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._reap)
        return task

    def _reap(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("background work of account %s failed: %s", self.account, task.exception())

    # ------------------------------------------------------------------ internals: refresh

    def _start_refresh(
        self, keyed_on: str | None, *, force: bool, policy: RetryPolicy | None = None
    ) -> asyncio.Task[TokenSet]:
        if self._task is None or self._task.done():
            # Inside a run of failures, one try per refresh: the pacing is between them.
            policy = policy or (self.retry if self._offline_since is None else self._one_try)
            flow = self._refresh_flow(keyed_on, force, policy)
            self._task = asyncio.ensure_future(flow)
            self._task.add_done_callback(self._refresh_done)
        return self._task

    def _refresh_done(self, task: asyncio.Task[TokenSet]) -> None:
        self._tried_at = self._clock.monotonic()
        # Retrieve the outcome so a refresh nobody awaited (proactive, recovery) is not
        # reported as "exception never retrieved"; joiners get it through the shield.
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        now = self._clock.monotonic()
        if isinstance(exc, TransientError):
            if self._offline_since is None:
                self._offline_since = now
            longest = OFFLINE_FACTOR * self.retry.max_delay
            offline = now - self._offline_since
            cap = min(longest, max(self.retry.max_delay, self.retry.offline_growth * offline))
            life = self._tokens.lifetime if self._tokens is not None else None
            if life is not None and life > 0:
                cap = min(cap, life)  # never idle longer than a pair lives: it would lapse
            floor = min(cap, OFFLINE_FLOOR * self.retry.max_delay)
            draw = random.random()
            self._quiet_until = now + floor + draw * (cap - floor)
            # A token that still works leaves time: the background try waits for the last
            # stretch before it lapses, which spreads a fleet's tries as its tokens' expiries.
            left = self._expires_at - now
            lead = min(left, BACKGROUND_LEAD * self.retry.max_delay)
            self._lazy_until = (
                now + max(floor, left - (1 - draw) * lead)
                if cap < left < math.inf
                else self._quiet_until
            )
            if exc.retry_after is not None:
                # The server said when: no try sooner (the rescue's included), and callers'
                # spread past it by a share of the floor, so a fleet told the same does not
                # come back in one wave. Believed up to the longest pause: a server that asks
                # for a day does not lock a kiosk out for a day.
                self._not_before = now + min(exc.retry_after, longest)
                told = self._not_before + draw * floor
                self._quiet_until = max(self._quiet_until, told)
                self._lazy_until = max(self._lazy_until, told)
            self._offline_error = exc
        else:
            self._quiet_until = self._lazy_until = now + self.retry.max_delay
        # A journal that failed (disk full at the commit, after the server rotated) leaves the
        # intent pending just like the network does: the window is used either way. An
        # intent whose token cannot have reached the server (every try refused before
        # connecting) risks nothing: it waits for the next refresh like any other.
        pending = isinstance(exc, TransientError | ProtocolError | JournalError)
        if pending and self._in_doubt and self._open:
            self._start_rescue()

    def _back_online(self) -> None:
        """A pair was committed or adopted: the server is there, the run of failures over."""
        self._quiet_until = self._lazy_until = 0.0
        self._offline_since = self._offline_error = None
        self._in_doubt = False

    async def _join(self, keyed_on: str | None, *, force: bool) -> TokenSet:
        self._require_open()
        if self._tokens is None and self._ended_code is not None:
            # Ended once: never ask the server again, but another process (the GUI) may
            # have signed in again on the shared journal since. A cheap read tells.
            self._adopt(await self.journal.load(self.account))
            if self._tokens is None and self._ended_code is not None:
                raise SessionEnded(self._ended_code)
        error, idle = self._offline_error, self._task is None or self._task.done()
        if error is not None and idle and (keyed_on is not None or not force):
            wait = self._quiet_until - self._clock.monotonic()
            if wait > 0:
                # Offline pacing: the last refresh ran out of tries moments ago; another now
                # would be one more request from every device of a fleet at once.
                again = copy.copy(error)
                again.add_note(f"tokenjournal: the next try comes in {wait:.0f} s or later")
                raise again
        # The shield is invariant 7: a caller's cancellation or timeout never reaches the
        # shared refresh that every other caller is waiting on.
        return await asyncio.shield(self._start_refresh(keyed_on, force=force))

    # ------------------------------------------------------------------ internals: rescue

    def _start_rescue(self) -> None:
        if self._rescue is None or self._rescue.done():
            self._rescue = asyncio.ensure_future(self._rescue_flow())
            self._rescue.add_done_callback(self._reap)

    async def _rescue_flow(self) -> None:
        """Invariant 11 (docs/architecture.md 1.5): while a refresh intent is pending, keep
        trying without any caller.

        Each try is one request (callers that come meanwhile join it, so one request is in
        flight at a time), spaced so that a network that comes back is noticed within
        ``min(RESCUE_SHARE * grace_period, RESCUE_MAX_GAP)``, counted from the last try of
        any kind (a caller's replays the same intent); a ``Retry-After`` is honoured
        unless it would pass the grace deadline, where one last try is made just before it.
        Stops on commit, a permanent answer, sign-out, close, or the deadline.
        """
        one_try = dataclasses.replace(self.retry, max_attempts=1)
        gap = min(self.grace_period * RESCUE_SHARE, RESCUE_MAX_GAP)
        announced = False
        self._tried_at = max(self._tried_at, self._clock.monotonic())  # the first try waits too
        while self._open:
            record = await self.journal.load(self.account)
            intent = record.intent
            if intent is None or intent.kind != "refresh" or record.tokens is None:
                return  # committed, ended or signed out meanwhile
            left = self._anchor(intent.started_at) + self.grace_period - self._clock.monotonic()
            if left <= GRACE_GUARD:  # no try could land inside the window any more
                log.warning(
                    "the grace window of account %s closed with its refresh still pending",
                    self.account,
                )
                return
            if not announced:
                announced = True
                self._emit(EventKind.RECOVERING)
            # A whole gap after the last try of any kind: a caller's try (paced by the offline
            # pause) is as good as one of ours, and ours right after it would be a second
            # request inside one gap. Not before the server's Retry-After either, but the
            # last try goes just inside the window, even if Retry-After asked for more.
            tried = self._tried_at
            due = max(tried + gap, self._not_before)
            wait = min(due - self._clock.monotonic(), left - GRACE_GUARD)
            if not await self._pause(max(0.0, wait)):
                return
            if wait > 0 and self._tried_at != tried:
                continue  # a caller tried meanwhile: a whole gap from that try
            try:
                await asyncio.shield(self._start_refresh(None, force=True, policy=one_try))
                return
            except (TransientError, ProtocolError, JournalError):
                pass  # paced above: _refresh_done noted when, and any Retry-After
            except TokenJournalError:
                return  # ended or signed out: nothing left to rescue

    async def _pause(self, seconds: float) -> bool:
        """Sleep on the clock, cut short by ``close()``; returns whether still open."""
        if not self._open:
            return False
        closing = asyncio.ensure_future(self._closing.wait())
        sleeping = asyncio.ensure_future(self._clock.sleep(seconds))
        try:
            await asyncio.wait((closing, sleeping), return_when=asyncio.FIRST_COMPLETED)
        finally:
            closing.cancel()
            sleeping.cancel()
        return self._open

    def _anchor(self, started_at: float) -> float:
        """The monotonic instant at which the intent that started at wall time
        ``started_at`` began: exact for an intent this process wrote, else read off the wall
        clock once (an intent from an earlier run only has its wall time)."""
        if self._intent_anchor[0] != started_at:
            now = self._clock.monotonic() - (self._clock.time() - started_at)
            self._intent_anchor = (started_at, now)
        return self._intent_anchor[1]

    async def _refresh_flow(
        self, keyed_on: str | None, force: bool, policy: RetryPolicy
    ) -> TokenSet:
        """The account's one refresh, in three steps (docs/architecture.md 1.2):

        1. ``_claim``: decide whether a refresh is needed and, if so, take the lease and
           write the intent in one journal transaction (invariants 1, 4, 6);
        2. ``_exchange``: send the old refresh token through the one retry loop, proving
           the lease before each send (invariants 4, 5);
        3. ``_settle``: commit the successor durably, then wake every waiter (invariants 2, 3).
        """
        record: AccountRecord | None = None  # the journal as last read, when memory may lag
        try:
            while True:
                claim = await self._claim(keyed_on, force, record)
                if isinstance(claim, TokenSet):  # fresh, already replaced, or adopted
                    self._set_state(SessionState.VALID)
                    return claim
                try:
                    answer = await self._exchange(
                        functools.partial(self._build_refresh, claim.tokens),
                        self._reader(claim.tokens),
                        policy=policy,
                        grace_deadline=claim.deadline,
                        before_send=functools.partial(self._prove_lease, claim),
                        arrived=functools.partial(setattr, claim, "reached", True),
                        secrets=claim.tokens.secrets,
                        what="refresh",
                    )
                except _LeaseLost:
                    # We were paused past our lease and another process took over: its
                    # refresh is the one we wanted. Adopt its commit (or wait for it).
                    self._bell.ring()
                    log.info("lost the refresh lease of account %s; adopting", self.account)
                    record = await self.journal.load(self.account)
                    force = False
                    continue
                except BaseException:
                    # Budget spent, cancelled, the journal failed: the intent stays for the
                    # next try, and the lease goes now so no other process waits it out.
                    self._in_doubt = claim.carried or claim.reached
                    try:
                        await asyncio.shield(self._release())
                    finally:
                        self._bell.ring()  # after the release, so waiters find it free
                    raise
                self._in_doubt = True  # an answer came: until the commit, the token is spent
                try:
                    return await self._settle(claim, answer)
                finally:
                    self._bell.ring()  # committed (or given up): wake the waiting processes
        except (SessionEnded, NotSignedIn):
            raise
        except BaseException as exc:
            # Whatever went wrong (the network, the journal, a cancel, a bug), the state
            # must not stick at REFRESHING: the tokens are kept, so say whether they work.
            if self._tokens is not None:
                expired = self._clock.monotonic() >= self._expires_at
                self._set_state(SessionState.OFFLINE if expired else SessionState.VALID)
            if isinstance(exc, Exception):
                code = exc.code if isinstance(exc, TokenJournalError) else "internal_error"
                self._emit(EventKind.REFRESH_FAILED, code)
            raise

    async def _claim(
        self, keyed_on: str | None, force: bool, record: AccountRecord | None
    ) -> TokenSet | _Claim:
        """Step 1: the pair to answer with, or the lease and intent to refresh with.

        The pair in memory is trusted as long as its generation is the journal's, which
        ``begin_refresh`` checks in the same transaction that takes the lease: one round trip
        before the request. When the journal moved on, it hands back the newer record, which
        is adopted and decided on again; so is ``record``, when the caller read one.
        """
        adopted = False
        if record is None and self._tokens is None:  # signed in elsewhere meanwhile? Read.
            record = await self.journal.load(self.account)
        while True:
            if record is not None:
                adopted = self._adopt(record)
            tokens = self._tokens
            if tokens is None:
                if self._ended_code is not None and self._ended_code != "signed_out":
                    raise SessionEnded(self._ended_code)
                if record is not None and record.intent is not None:
                    # A journaled sign-out (ours, or one a crash left for open() to finish):
                    # a refresh would replace its intent, and one more crash would undo it.
                    raise NotSignedIn(f"account {self.account!r} is being signed out")
                raise NotSignedIn(f"account {self.account!r} is not signed in")
            if keyed_on is not None and tokens.access_token != keyed_on:
                return tokens  # the rejected token was already replaced (invariant 10)
            pending = record is not None and record.intent is not None
            if not pending and not self._stale() and (adopted or not force):
                return tokens  # fresh: not stale yet, or another process just refreshed it
            if tokens.refresh_token is None:
                # Nothing to renew with (legal in OAuth 2.0): no intent, no request. The
                # token was used until the server rejected it or the app asked for more.
                if not force:
                    return tokens
                return await self._end("no_refresh_token", self._generation)
            now = self._clock.time()
            _faults.crash_point("before_intent")
            # The bell is up before the lease is visible: a process that sees the lease busy
            # can always reach it (docs/architecture.md 1.3).
            self._bell.open(self._holder.id, self.account)
            try:
                began = await self.journal.begin_refresh(
                    self.account, self._holder, self._generation, now, self.lease_ttl
                )
            except BaseException:
                self._bell.ring()
                raise
            if not isinstance(began, Started):
                self._bell.ring()
            if isinstance(began, Stale):
                record = began.record
                continue
            if isinstance(began, Busy):
                record = await self._await_other(self._generation, began.lease)
                force = False  # the other process's commit is the refresh we wanted
                continue
            assert isinstance(began, Started)
            taken_at = self._clock.monotonic()
            _faults.crash_point("after_intent")
            self._set_state(SessionState.REFRESHING)
            if began.intent.started_at == now:  # ours, just written: anchor it exactly
                self._intent_anchor = (now, taken_at)
            deadline = self._anchor(began.intent.started_at) + self.grace_period
            # An intent kept from an earlier try may have a spent token: certainly if another
            # run wrote it; if we did, when one of our tries may have reached the server.
            started = began.intent.started_at
            carried = started != now and (started != self._own_intent or self._in_doubt)
            self._own_intent = started
            return _Claim(tokens, self._generation, deadline, taken_at, carried=carried)

    async def _await_other(self, generation: int, lease: Lease) -> AccountRecord:
        """Another process holds the lease: wait for its bell (its commit, release or death
        wakes us at once), reading the journal between pauses in case no bell rings (another
        host, no abstract sockets, a holder frozen past its lease)."""
        pause = WAIT_FIRST
        bell: asyncio.Task[bool] | None = asyncio.ensure_future(doorbell.rung(lease, self.account))
        try:
            while True:
                if bell is None:
                    await self._clock.sleep(pause)
                else:
                    sleeping = asyncio.ensure_future(self._clock.sleep(pause))
                    try:
                        await asyncio.wait((bell, sleeping), return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        sleeping.cancel()
                # A ring that comes while the read below is on its way may postdate what it
                # reads: only a ring heard before the read says the holder is gone.
                rung = bell is not None and bell.done()
                record = await self.journal.load(self.account)
                # A holder SIGKILLed on this host is noticed by its pid, not after its lease.
                if record.generation != generation or not lease_is_live(
                    record.lease, self._holder, self._clock.time()
                ):
                    return record
                if rung:
                    # Rung, refused or unreachable, and still busy: another holder took over
                    # (listen to it), or this one has no bell we can reach (poll).
                    same = record.lease is None or record.lease.holder == lease.holder
                    lease = record.lease or lease
                    bell = (
                        None if same else asyncio.ensure_future(doorbell.rung(lease, self.account))
                    )
                pause = min(pause * 1.5, WAIT_MAX if bell is None else BELL_WAIT_MAX)
        finally:
            if bell is not None:
                bell.cancel()

    def _build_refresh(self, tokens: TokenSet) -> HttpRequest:
        self.refresh_requests += 1
        return self.protocol.build_refresh(tokens, self._device_info())

    async def _prove_lease(self, claim: _Claim) -> None:
        """Before each send: is the lease still ours? ``begin_refresh`` took it, and that is
        proof while it outlives the try about to start. Past that (paused by SIGSTOP or a
        slow callback, or a long backoff), prove it again by renewing: another process may
        have taken over and spent our token, and sending it again could be reuse two
        generations back."""
        now = self._clock.monotonic()
        if claim.proven_at + self.lease_ttl - now > self.retry.attempt_timeout + LEASE_SLACK / 2:
            return
        if not await self.journal.renew_lease(
            self.account, self._holder, self._clock.time(), self.lease_ttl
        ):
            raise _LeaseLost
        claim.proven_at = now

    async def _settle(self, claim: _Claim, answer: TokenSet | Failure) -> TokenSet:
        """Step 3: a permanent refusal ends the session; a pair is committed before anyone
        sees it, unless another process committed first (then its newer pair is adopted)."""
        if isinstance(answer, Failure):
            if answer.kind is FailureKind.PERMANENT:
                return await self._end(answer.code, claim.generation, answer.description)
            await self._release()
            raise ProtocolError(
                f"the auth server rejected the refresh request: {answer.code} ({answer.status})",
                description=answer.description,
            )
        _faults.crash_point("after_response")
        try:
            committed = await self.journal.commit_refresh(
                self.account, self._holder, claim.generation, answer, self._clock.time()
            )
        except BaseException:
            # Disk full, locked, cancelled: the intent stays for the next try, and the lease
            # goes now so that another process need not wait out its lifetime.
            await asyncio.shield(self._release())
            raise
        if committed is None:
            # We were paused past our lease and another process committed first: its pair
            # is the newer one; ours is a grace replay of the same rotation. Never overwrite.
            record = await self.journal.load(self.account)
            self._adopt(record)
            if record.tokens is None:
                raise NotSignedIn(f"account {self.account!r} was signed out meanwhile")
            return record.tokens
        _faults.crash_point("after_commit")
        self._use(answer, fresh=True, wide=self._offline_since is not None)
        self._generation = committed
        self._back_online()
        self._set_state(SessionState.VALID)
        self._emit(EventKind.REFRESHED)
        log.info("refreshed account %s (token %s)", self.account, fingerprint(answer.access_token))
        return answer

    async def _release(self) -> None:
        try:
            await self.journal.release(self.account, self._holder)
        except JournalError as exc:  # the lease lapses on its own
            log.warning("could not release the refresh lease: %s", exc)

    # ------------------------------------------------------------------ internals: I/O

    async def _exchange(
        self,
        build: Callable[[], HttpRequest],
        parse: Callable[[int, Mapping[str, str], bytes], _A | Failure],
        *,
        policy: RetryPolicy | None = None,
        grace_deadline: float | None = None,
        before_send: Callable[[], Awaitable[None]] | None = None,
        arrived: Callable[[], object] | None = None,
        secrets: Iterable[str] = (),
        what: str = "auth call",
    ) -> _A | Failure:
        """Every call to the auth server: send until an answer or a final failure arrives,
        through the one retry loop (:func:`attempts`) under ``policy``.

        Returns what ``parse`` made of the answer, or a non-retryable :class:`Failure`;
        raises a :class:`TransientError` (or :class:`ProtocolError` for malformed answers)
        when the budget runs out or the manager closes. ``grace_deadline`` is monotonic.
        ``arrived`` is called whenever a try may have reached the server (an answer, or a
        failure after the connection was made). A ``parse`` that raises on what the server
        sent (a third-party protocol, or a case ours missed) has met a malformed answer,
        retried like any other; so is a pair whose tokens no header can carry. A failure's
        code and message are the server's words: they are made printable and stripped of
        ``secrets`` before they reach an exception, a log line, an event or the journal.
        """
        loop = attempts(
            policy or self.retry,
            self._clock.monotonic,
            self._pause,
            grace_deadline=grace_deadline,
            what=what,
        )
        async for attempt in loop:
            if before_send is not None:
                await before_send()
            try:
                status, headers, body = await self._send(build())
            except NetworkFailure as exc:
                if arrived is not None and not exc.unsent:
                    arrived()
                attempt.failed(None, str(exc))
                continue
            if arrived is not None:
                arrived()
            try:
                answer = parse(status, headers, body)
            except Exception as exc:
                log.warning("the auth protocol could not read a %d answer: %s", status, type(exc))
                answer = Failure(FailureKind.MALFORMED, "malformed_body", status, "unreadable")
            if isinstance(answer, TokenSet) and not answer.sendable:
                # A token with CR/LF, NUL or non-ASCII fits in no header (a lone surrogate
                # in no journal): whatever the protocol made of it, the answer is malformed.
                answer = Failure(FailureKind.MALFORMED, "malformed_body", status, "unusable token")
            if not isinstance(answer, Failure):
                return answer
            answer = _scrubbed(answer, secrets)
            if not answer.retryable:
                return answer
            attempt.failed(answer, answer.code)
        raise AssertionError("the retry loop ends by raising")  # pragma: no cover

    def _reader(
        self, previous: TokenSet | None
    ) -> Callable[[int, Mapping[str, str], bytes], Answer]:
        """The protocol's reading of a token answer, at the time it arrives."""

        def read(status: int, headers: Mapping[str, str], body: bytes) -> Answer:
            return self.protocol.parse_tokens(status, headers, body, self._clock.time(), previous)

        return read

    async def _send(self, request: HttpRequest) -> Raw:
        """One HTTP exchange with the auth server; no answer is a ``NetworkFailure``."""
        if self._http is None:
            raise RuntimeError("the TokenManager is closed")
        return await send(self._http, request, self.retry.attempt_timeout)


class _OutboxHost:
    """The manager as an outbox sees it (:class:`tokenjournal._outbox.OutboxHost`)."""

    __slots__ = ("_tm",)

    def __init__(self, tm: TokenManager) -> None:
        self._tm = tm

    @property
    def account(self) -> str:
        return self._tm.account

    @property
    def journal(self) -> Journal:
        return self._tm.journal

    @property
    def retry(self) -> RetryPolicy:
        return self._tm.retry

    @property
    def lease_ttl(self) -> float:
        return self._tm.lease_ttl

    @property
    def is_open(self) -> bool:
        return self._tm._open

    @property
    def clock(self) -> Clock:
        return self._tm._clock

    @property
    def holder(self) -> Holder:
        return self._tm._holder

    def bearer_allowed(self, url: str) -> bool:
        return self._tm.middleware.allows(URL(url))

    def outbox_http(self) -> aiohttp.ClientSession:
        tm = self._tm
        if tm._outbox_session is None or tm._outbox_session.closed:
            if not tm._open:
                raise RuntimeError("the TokenManager is closed")
            tm._outbox_session = aiohttp.ClientSession(
                middlewares=(tm.middleware,), trace_configs=tm._trace_configs()
            )
        return tm._outbox_session

    def emit_event(self, kind: EventKind, code: str | None) -> None:
        self._tm._emit(kind, code)

    def subscribe(self, callback: Callback) -> Callable[[], None]:
        return self._tm.subscribe(callback)

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        return self._tm._spawn(coro)

    async def closing(self) -> None:
        await self._tm._closing.wait()
