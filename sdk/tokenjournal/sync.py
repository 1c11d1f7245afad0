"""A blocking :class:`TokenManager` for programs that are not asyncio programs.

Tk, Qt and wx apps, threaded daemons and plain ``requests`` scripts get the same journal, the
same single refresh and the same guarantees as asyncio ones: this manager runs the async
:class:`tokenjournal.TokenManager` on one private event loop in a daemon thread and gives every
public method a blocking twin, callable from any thread::

    import tokenjournal.sync as tjs

    with tjs.TokenManager(AUTH_URL, journal="~/.app/tokens.db") as tm:
        if tm.state is not tj.SessionState.VALID:
            tm.sign_in(email="me@example.com", password="...")
        token = tm.access_token(timeout=10)

The thread model is docs/architecture.md section 1.9: a blocking call hands its coroutine to the
loop thread and waits for the answer; ``timeout`` stops the wait (``TimeoutError``) and cancels
only that caller's coroutine, never the refresh other callers share (invariant 7). A fresh token
is answered without a trip to the loop thread. ``tm.outbox(name)`` gives the durable outbox with
blocking methods (:class:`Outbox`), ``tm.sign_in_browser()`` the browser sign-in.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
import webbrowser
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from types import TracebackType
from typing import Any, Final, TypeVar

from yarl import URL

from ._browser import OpenBrowser
from ._clock import Clock
from ._events import Callback, SessionState, TokenEvent
from ._journal import Journal
from ._manager import TokenManager as AsyncTokenManager
from ._outbox import MAX_BACKOFF, DeadLetter, OutboxStats, WhenFull
from ._outbox import Outbox as AsyncOutbox
from ._protocols import AuthProtocol, DeviceCode
from ._retry import RetryPolicy
from ._seal import Seal
from ._tokens import TokenSet

__all__ = ["Deliver", "Outbox", "TokenManager"]

T = TypeVar("T")

log = logging.getLogger("tokenjournal")

#: How long ``close()`` waits for the loop thread to finish the async ``close()`` (which itself
#: lets an in-flight refresh commit for up to ``CLOSE_WAIT``) when no timeout is given.
CLOSE_TIMEOUT: Final = 30.0
#: How long a close() that timed out waits for what it cancels to finish its cleanup.
LEFTOVER_WAIT: Final = 2.0
#: A loop thread stopped by a SystemExit closes the manager through at most this many more.
MAX_RERAISES: Final = 100

#: Hands a callback and its event to the app's own thread: ``root.after_idle`` for Tk,
#: ``lambda f, e: QTimer.singleShot(0, lambda: f(e))`` for Qt.
Deliver = Callable[[Callback, TokenEvent], object]


class TokenManager:
    """The blocking twin of :class:`tokenjournal.TokenManager`; same arguments, same errors.

    Use it as a (plain) context manager, or ``open()`` and ``close()`` it. Every method may be
    called from any thread; each takes ``timeout`` (seconds, ``None`` waits for ever) and raises
    ``TimeoutError`` when it passes. Calling a blocking method from the manager's own loop
    thread (from a ``subscribe`` callback without ``call=``) raises ``RuntimeError`` instead of
    deadlocking. A closed manager cannot be opened again: make a new one. A process that never
    closes it still exits (its threads are daemons; the journal is built for sudden ends).
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
        # Built here, in the caller's thread, so a bad argument fails at once; nothing in the
        # async manager's constructor touches an event loop.
        self.manager = AsyncTokenManager(
            auth_url,
            journal,
            account,
            protocol,
            refresh_margin,
            grace_period,
            allowed_origins,
            retry=retry,
            clock=clock,
            lease_ttl=lease_ttl,
            allow_insecure_http=allow_insecure_http,
            device_name=device_name,
            device_type=device_type,
            user_agent=user_agent,
            seal=seal,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()  # fork() copies this object but not its loop thread
        self._closed = False
        self._lock = threading.Lock()  # open() and close() one at a time
        self._ended = threading.Event()  # the loop thread stopped on its own (_run_loop)

    def __repr__(self) -> str:
        return f"sync.{self.manager!r}"

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> TokenManager:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def open(self, *, timeout: float | None = None) -> None:
        """Start the loop thread and open the manager (idempotent; see the async ``open``)."""
        self._check_caller()
        with self._lock:
            if self._closed:
                raise RuntimeError("this sync TokenManager is closed: make a new one")
            if self._loop is None:
                loop = asyncio.new_event_loop()
                ready = threading.Event()
                thread = threading.Thread(
                    target=self._run_loop,
                    args=(loop, ready),
                    name=f"tokenjournal-{self.manager.account}",
                    daemon=True,  # never keeps the process alive (the journal survives it)
                )
                thread.start()
                ready.wait()
                self._loop, self._thread = loop, thread
        self._call(self.manager.open, timeout)

    def close(self, *, timeout: float | None = None) -> None:
        """Close the manager (an in-flight refresh may commit first) and end the loop thread.

        Safe to call twice. ``timeout`` defaults to ``CLOSE_TIMEOUT``; when it passes, what
        still runs is cancelled (a refresh's intent stays for the next start), callers still
        waiting get ``RuntimeError``, and this call raises ``TimeoutError``.
        """
        self._check_caller()
        with self._lock:
            loop, thread = self._loop, self._thread
            self._closed = True  # no new calls from here on
            if loop is None or thread is None or not thread.is_alive():
                return
            if self._ended.is_set():  # the thread is closing the manager itself
                thread.join(timeout)
                return
            closed = False
            try:
                _wait(loop, self.manager.close, CLOSE_TIMEOUT if timeout is None else timeout)
                # aiohttp resolves names on the loop's default executor: end its threads too.
                _wait(loop, loop.shutdown_default_executor, timeout)
                closed = True
            finally:
                if not closed:
                    # What still runs is cancelled before the loop stops: a caller waiting on
                    # it gets an error now, not a future that no loop will ever complete, and
                    # a refresh cut here leaves its intent for the next start (invariant 6).
                    # Then a second close() finishes what the first left (HTTP, journal),
                    # as the async manager documents.
                    with contextlib.suppress(Exception):
                        _wait(loop, _cancel_the_rest, LEFTOVER_WAIT)
                        _wait(loop, self.manager.close, LEFTOVER_WAIT)
                loop.call_soon_threadsafe(loop.stop)
                thread.join(timeout)
                if not thread.is_alive():
                    loop.close()

    # ------------------------------------------------------------------ public surface

    @property
    def state(self) -> SessionState:
        """The session's state (a read, no wait)."""
        return self.manager.state

    @property
    def tokens(self) -> TokenSet | None:
        """The current pair (its repr shows fingerprints only; a read, no wait)."""
        return self.manager.tokens

    @property
    def ended_code(self) -> str | None:
        """Why the server ended the session, when it did."""
        return self.manager.ended_code

    def allows(self, url: str) -> bool:
        """Whether the bearer may be sent to ``url`` (invariant 9; the middleware's rule)."""
        return self.manager.middleware.allows(URL(url))

    def access_token(self, *, timeout: float | None = None) -> str:
        """A valid access token: from memory when fresh (no thread hop), else from the one
        shared refresh. A caller that times out leaves the refresh running for the others."""
        self._check_caller()  # even when fresh: the same call must not sometimes hang
        # _ended is set before any caller the dying loop releases: none of them sees a token.
        usable = not (self._closed or self._ended.is_set())
        token = self.manager.fresh_token() if usable else None
        if token is not None:
            return token
        return self._call(self.manager.access_token, timeout)

    def refresh(self, *, timeout: float | None = None) -> TokenSet:
        """Force a refresh now (or join the one in flight); returns the new pair."""
        return self._call(self.manager.refresh, timeout)

    def refresh_for(self, rejected_access_token: str, *, timeout: float | None = None) -> TokenSet:
        """The server rejected ``rejected_access_token`` (a 401): move past it (invariant 10)."""
        return self._call(lambda: self.manager.refresh_for(rejected_access_token), timeout)

    def set_tokens(self, tokens: TokenSet, *, timeout: float | None = None) -> None:
        """Store a pair obtained elsewhere, as a sign-in."""
        self._call(lambda: self.manager.set_tokens(tokens), timeout)

    def sign_in(self, *, timeout: float | None = None, **credentials: str) -> TokenSet:
        """Sign in with the protocol's credentials (Mana: ``email``, ``password``)."""
        return self._call(lambda: self.manager.sign_in(**credentials), timeout)

    def sign_in_device(
        self,
        on_code: Callable[[DeviceCode], Awaitable[None] | None],
        *,
        timeout: float | None = None,
    ) -> TokenSet:
        """Sign in with the OAuth 2.0 device flow; ``on_code`` runs on the manager's thread
        and must not call this manager (show the code, hand it to your UI thread)."""
        return self._call(lambda: self.manager.sign_in_device(on_code), timeout)

    def sign_in_browser(
        self,
        *,
        open_browser: OpenBrowser = webbrowser.open,
        port: int = 0,
        timeout: float = 300,
        prompt: str | None = None,
    ) -> TokenSet:
        """Sign in through the system browser (authorization code with PKCE and a loopback
        redirect); the async ``sign_in_browser``'s arguments. ``timeout`` is its own: how long
        to wait for the browser to come back (:class:`~tokenjournal.SignInFailed` when it
        passes), and this call waits no longer than that flow. ``open_browser`` runs on the
        manager's thread. Call it from a worker thread in a GUI app: it blocks until the
        person has answered in the browser."""
        return self._call(
            lambda: self.manager.sign_in_browser(
                open_browser=open_browser, port=port, timeout=timeout, prompt=prompt
            ),
            None,  # the flow ends on its own: its timeout, then the exchange's retry policy
        )

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
        timeout: float | None = None,
    ) -> Outbox:
        """The durable outbox ``name`` of this account, with blocking methods; the async
        ``outbox``'s arguments and rules (delivery runs on the manager's thread)."""

        async def made() -> AsyncOutbox:
            return self.manager.outbox(
                name,
                max_items=max_items,
                max_bytes=max_bytes,
                when_full=when_full,
                ordered=ordered,
                concurrency=concurrency,
                max_backoff=max_backoff,
            )

        return Outbox(self, self._call(made, timeout))

    def sign_out(self, *, timeout: float | None = None) -> None:
        """Tell the server (journaled first), then clear. Once journaled, the sign-out
        finishes even if this call times out."""
        self._call(self.manager.sign_out, timeout)

    def subscribe(self, callback: Callback, *, call: Deliver | None = None) -> Callable[[], None]:
        """Call ``callback(TokenEvent)`` on every event; returns the unsubscribe function.

        Without ``call`` the callback runs on the manager's loop thread: it must be quick and
        must not call this manager's blocking methods. A ``sys.exit()`` there cannot end the
        process from that thread: it closes the manager instead (the call that caused the
        event raises the ``SystemExit``, later calls ``RuntimeError``). With ``call`` it is
        handed over as ``call(callback, event)``, e.g. ``call=root.after_idle`` runs it on
        Tk's thread.
        """
        if call is None:
            return self.manager.subscribe(callback)
        deliver = call

        def hand_over(event: TokenEvent) -> None:
            deliver(callback, event)

        return self.manager.subscribe(hand_over)

    # ------------------------------------------------------------------ internals

    def _run_loop(self, loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        try:
            loop.run_forever()
        except BaseException:
            # A SystemExit raised on this thread (sys.exit() in an event callback) stopped
            # the loop: the callers waiting on it, and every later call, would wait for ever
            # for a loop that never runs again. They get RuntimeError now (cancelled; later
            # calls refused), and the manager is closed here (a refresh's intent stays for
            # the next start, invariant 6).
            self._ended.set()
            log.exception("a tokenjournal.sync manager's loop thread ended: it is closed")
            for step in (_cancel_the_rest, self.manager.close, loop.shutdown_default_executor):
                task = loop.create_task(asyncio.wait_for(step(), LEFTOVER_WAIT))
                # Each task the SystemExit reaches (the caller awaiting the callback's work)
                # raises it out of the loop once more: run on until the step is done.
                for _ in range(MAX_RERAISES):
                    with contextlib.suppress(BaseException):
                        loop.run_until_complete(task)
                    if task.done():
                        break
            loop.close()
        finally:
            # Whatever is left (close() timed out) is abandoned with the thread; the journal's
            # intent, if any, is replayed by the next start (invariant 6).
            asyncio.set_event_loop(None)

    def _check_caller(self) -> None:
        thread = self._thread
        if thread is not None and os.getpid() != self._pid:
            raise RuntimeError(
                "this tokenjournal.sync.TokenManager was opened before fork(): its loop thread "
                "stayed in the parent; open a new one in the child (same journal)"
            )
        if thread is not None and threading.current_thread() is thread:
            raise RuntimeError(
                "a blocking tokenjournal.sync.TokenManager call was made on the manager's own "
                "thread (from an event callback?): it would wait for itself; pass call= to "
                "subscribe(), or use the async manager (`.manager`) there"
            )

    def _call(self, start: Callable[[], Coroutine[Any, Any, T]], timeout: float | None) -> T:
        """Run ``start()`` on the loop thread and wait up to ``timeout`` for its result."""
        return _wait(self._running_loop(), start, timeout)

    def submit(self, start: Callable[[], Coroutine[Any, Any, T]]) -> concurrent.futures.Future[T]:
        """Run ``start()`` (a coroutine of :attr:`manager`) on the loop thread; its future.

        For adapters that must not block: ``await asyncio.wrap_future(tm.submit(...))``.
        """
        return asyncio.run_coroutine_threadsafe(start(), self._running_loop())

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        """The loop thread's loop, or ``RuntimeError`` saying why there is none."""
        self._check_caller()
        loop = self._loop
        if loop is None or self._closed:
            raise RuntimeError(
                "the sync TokenManager is not open: use `with tm:` or `tm.open()`"
                if not self._closed
                else "the sync TokenManager is closed"
            )
        if self._ended.is_set():
            raise RuntimeError(
                "the sync TokenManager's loop thread ended (an event callback raised "
                "SystemExit?) and closed it: make a new one"
            )
        return loop


def _wait(
    loop: asyncio.AbstractEventLoop,
    start: Callable[[], Coroutine[Any, Any, T]],
    timeout: float | None,
) -> T:
    """Run ``start()`` on ``loop`` (another thread's) and wait up to ``timeout`` for it."""
    future = asyncio.run_coroutine_threadsafe(start(), loop)
    try:
        return future.result(timeout)
    except concurrent.futures.CancelledError:
        # Only close() cancels a caller's coroutine (a timeout has stopped waiting already).
        raise RuntimeError("the sync TokenManager was closed while this call waited") from None
    except concurrent.futures.TimeoutError:
        # Cancels this caller's coroutine only: the async manager awaits its shared refresh
        # through asyncio.shield, so the other callers still get it (invariant 7).
        future.cancel()
        raise TimeoutError(f"no answer within {timeout} s") from None


class Outbox:
    """The blocking twin of :class:`tokenjournal.Outbox` (from :meth:`TokenManager.outbox`):
    the same methods and errors, callable from any thread, each with ``timeout``."""

    def __init__(self, tm: TokenManager, outbox: AsyncOutbox) -> None:
        self._tm = tm
        #: The async outbox, for code running on the manager's thread.
        self.outbox = outbox

    def __repr__(self) -> str:
        return f"sync.Outbox({self.name!r})"

    @property
    def name(self) -> str:
        """The outbox's name."""
        return self.outbox.name

    @property
    def paused(self) -> bool:
        """Whether delivery waits for a sign-in (a read, no wait)."""
        return self.outbox.paused

    def enqueue(
        self,
        method: str,
        url: str,
        *,
        json: Any = None,
        data: bytes | str | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> str:
        """Journal one call; it is durable when this returns its id (the ``Idempotency-Key``).

        When ``timeout`` passes first (a journal busy for that long) this raises
        ``TimeoutError``, but the write goes on, as for a cancelled async ``enqueue``: the
        call is journaled and delivered (a full outbox or a failed journal is then logged),
        so do not enqueue it again, or it is sent twice under two keys.
        """

        async def enqueued() -> str:
            return await self.outbox.enqueue(method, url, json=json, data=data, headers=headers)

        try:
            return self._tm._call(enqueued, timeout)
        except TimeoutError:
            raise TimeoutError(
                f"no answer within {timeout} s; the call goes on (it is journaled and "
                "delivered): do not enqueue it again"
            ) from None

    def drain(self, timeout: float | None = None) -> None:
        """Wait until every item pending when called is delivered or dead-lettered; raises
        ``TimeoutError`` when ``timeout`` seconds (on the manager's clock) pass first."""
        # The async drain keeps its own deadline (and says how many items are left).
        self._tm._call(lambda: self.outbox.drain(timeout), None)

    def stats(self, *, timeout: float | None = None) -> OutboxStats:
        """The outbox's figures."""
        return self._tm._call(self.outbox.stats, timeout)

    def dead_letters(self, *, timeout: float | None = None) -> list[DeadLetter]:
        """The items the server refused for good, oldest first."""
        return self._tm._call(self.outbox.dead_letters, timeout)

    def retry_dead(self, *, timeout: float | None = None) -> int:
        """Put every dead letter back in line (same id, same key); returns how many."""
        return self._tm._call(self.outbox.retry_dead, timeout)

    def clear(self, *, timeout: float | None = None) -> int:
        """Delete every item of this outbox, pending and dead, and its counters; returns how
        many items were deleted."""
        return self._tm._call(self.outbox.clear, timeout)


async def _cancel_the_rest() -> None:
    """Cancel every other task of this loop and let each run its cleanup."""
    rest = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in rest:
        task.cancel()
    await asyncio.gather(*rest, return_exceptions=True)
