"""Browser sign-in: the authorization code flow with PKCE through the system browser and a
loopback redirect, the way desktop apps sign in (RFC 8252 section 7.3, RFC 7636).

The flow makes a PKCE verifier and a ``state``, starts a one-route listener on 127.0.0.1
(never on another interface: the code would cross the network), opens the authorization
URL, and waits for the one redirect that carries the answer or for the timeout. The
listener answers the browser with a small "you can close this tab" page and is gone before
the code is exchanged. Nothing is journaled until the exchange has returned tokens: a crash
anywhere in the flow leaves the account exactly as it was (docs/architecture.md 1.10).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from ._errors import SignInFailed
from ._protocols import HttpRequest, OAuth2Protocol, pkce_challenge
from ._tokens import Failure, TokenSet

if TYPE_CHECKING:
    from ._listener import Listener

log = logging.getLogger("tokenjournal")

#: RFC 7636 4.1 allows 43 to 128 characters; 64 random bytes make 86.
VERIFIER_BYTES: Final = 64
#: Once the answer is in, an opener still running (a browser reading its last page) gets
#: this long, in real seconds, before it is cancelled.
OPENER_WAIT: Final = 10.0

OpenBrowser = Callable[[str], object]


@dataclass(frozen=True, slots=True)
class BrowserIO:
    """What the flow needs of its manager: the code exchange through the one retry loop
    (``secrets`` are stripped from any server text), and a pause ``close()`` cuts short."""

    exchange: Callable[[HttpRequest, Iterable[str]], Awaitable[TokenSet | Failure]]
    pause: Callable[[float], Awaitable[bool]]
    #: Set by ``close()``: it ends the flow while the opener still runs, too.
    closing: asyncio.Event


async def _opened(open_browser: OpenBrowser, url: str) -> None:
    """Open ``url``; a browser that cannot be started is said in the log, with the URL to
    open by hand (it carries no secret: the PKCE verifier never leaves this process).

    A plain function runs in a worker thread: ``webbrowser.open`` waits for a console
    browser (lynx, w3m: what a headless or SSH box has) to exit, and on the event loop that
    wait would keep the listener from answering the very redirect it waits for. What it
    returns, if awaitable, is awaited here, on the loop.
    """
    opened = await asyncio.to_thread(open_browser, url)
    if inspect.isawaitable(opened):
        opened = await opened
    if opened is False:
        log.warning("no browser could be opened; open this URL to sign in: %s", url)


async def run_browser_flow(
    io: BrowserIO,
    protocol: OAuth2Protocol,
    *,
    open_browser: OpenBrowser,
    port: int,
    wait: float,
    prompt: str | None,
) -> TokenSet:
    """Run the browser sign-in; returns the pair (the caller journals it).

    ``SignInFailed`` carries ``access_denied`` (or the server's other code, with its
    description), ``state_mismatch``, ``issuer_mismatch``, ``timeout`` (nothing came back
    within ``wait`` seconds) or the token endpoint's refusal of the code. Closing the
    manager during the wait raises ``RuntimeError``.
    """
    if protocol.authorization_url is None:
        raise ValueError(
            "sign_in_browser needs an OAuth2Protocol with authorization_url "
            "(OAuth2Protocol.discover finds it)"
        )
    verifier = secrets.token_urlsafe(VERIFIER_BYTES)
    state = secrets.token_urlsafe(32)
    # Imported here, not with the module: aiohttp's server side weighs about 2 MiB of memory,
    # paid only by an app that signs in through a browser (an IoT box never does).
    from ._listener import Listener

    listener = Listener(protocol, state)
    opening: asyncio.Future[None] | None = None
    try:
        await listener.start(port)
        redirect_uri = listener.redirect_uri
        url = protocol.build_authorization_url(
            redirect_uri, state, pkce_challenge(verifier), prompt
        )
        # The opener runs as a task the listener answers beside, and close() and a
        # timeout end it: a webview or a desktop portal that never returns must not hold
        # the flow and its port.
        opening = asyncio.ensure_future(_opened(open_browser, url))
        await _while_opening(io, listener, wait, opening)
        answer = await _wait(io, listener, wait)
    finally:
        await asyncio.shield(listener.stop())
        if opening is not None:
            await _settle(opening, listener.answer.done())
    if isinstance(answer, Failure):
        raise SignInFailed(answer.code, description=answer.description)
    exchange = protocol.build_code_exchange(answer, redirect_uri, verifier)
    tokens = await io.exchange(exchange, (answer, verifier, state))
    if isinstance(tokens, Failure):
        raise SignInFailed(tokens.code, description=tokens.description)
    return tokens


async def _while_opening(
    io: BrowserIO, listener: Listener, wait: float, opening: asyncio.Future[None]
) -> None:
    """Until the opener returns (its error is the flow's), the answer comes (a person quick
    in a console browser), or ``close()``; an opener still running after ``wait`` real
    seconds ends the flow as a timeout (it is a program: the person's time is the clock's,
    in :func:`_wait`)."""
    closing = asyncio.ensure_future(io.closing.wait())
    try:
        await asyncio.wait(
            (opening, listener.answer, closing), timeout=wait, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        closing.cancel()
    if io.closing.is_set():
        raise _closed()
    if opening.done():
        opening.result()
    elif not listener.answer.done():
        raise SignInFailed(
            "timeout", description=f"the browser opener did not return within {wait:g} s"
        )


def _closed() -> RuntimeError:
    return RuntimeError("the TokenManager was closed during the browser sign-in")


async def _wait(io: BrowserIO, listener: Listener, wait: float) -> str | Failure:
    """The redirect's answer, or a timeout on the manager's clock, whichever comes first."""
    answer = listener.answer
    if answer.done():
        return answer.result()
    pausing = asyncio.ensure_future(io.pause(wait))
    try:
        await asyncio.wait((answer, pausing), return_when=asyncio.FIRST_COMPLETED)
    finally:
        pausing.cancel()
    if answer.done():
        return answer.result()
    if not pausing.result():
        raise _closed()
    if listener.strays:
        raise SignInFailed(
            "state_mismatch",
            description=f"within {wait:g} s only redirects of another sign-in came back "
            f"({listener.strays}), none of this one",
        )
    raise SignInFailed(
        "timeout", description=f"no answer came back from the browser within {wait:g} s"
    )


async def _settle(opening: asyncio.Future[None], answered: bool) -> None:
    """The opener ends with the flow: after an answer it gets :data:`OPENER_WAIT` to finish,
    otherwise (a timeout, a close, a cancel) it is cancelled at once. A plain opener's
    thread cannot be stopped; it is left to end on its own."""
    if answered and not opening.done():
        await asyncio.wait([opening], timeout=OPENER_WAIT)
    opening.cancel()
    (outcome,) = await asyncio.gather(opening, return_exceptions=True)
    if answered and isinstance(outcome, Exception):
        log.warning("the browser opener failed after the sign-in's answer came: %r", outcome)
