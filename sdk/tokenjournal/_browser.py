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
import html
import inspect
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Final

from aiohttp import web

from ._errors import SignInFailed
from ._protocols import HttpRequest, OAuth2Protocol, pkce_challenge
from ._tokens import Failure, TokenSet

log = logging.getLogger("tokenjournal")

#: Where the browser is sent back to, under the listener's origin.
CALLBACK_PATH: Final = "/callback"
LOOPBACK: Final = "127.0.0.1"
#: RFC 7636 4.1 allows 43 to 128 characters; 64 random bytes make 86.
VERIFIER_BYTES: Final = 64
#: The listener lets the browser receive its page before it is closed, at most this long.
GOODBYE_WAIT: Final = 2.0

OpenBrowser = Callable[[str], object]

_PAGE: Final = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;max-width:28em;margin:3em auto}}</style></head>
<body><h1 id="title">{title}</h1><p id="detail">{detail}</p></body></html>
"""


@dataclass(frozen=True, slots=True)
class BrowserIO:
    """What the flow needs of its manager: the code exchange through the one retry loop
    (``secrets`` are stripped from any server text), and a pause ``close()`` cuts short."""

    exchange: Callable[[HttpRequest, Iterable[str]], Awaitable[TokenSet | Failure]]
    pause: Callable[[float], Awaitable[bool]]


def _page(answer: str | Failure) -> web.Response:
    if isinstance(answer, Failure):
        title = "Sign-in failed"
        reason = answer.description or answer.code
        detail = f"{reason}. You can close this tab and return to the app."
    else:
        title = "Signed in"
        detail = "You can close this tab and return to the app."
    body = _PAGE.format(title=html.escape(title), detail=html.escape(detail))
    response = web.Response(text=body, content_type="text/html")
    response.headers["Cache-Control"] = "no-store"
    return response


class _Listener:
    """The loopback listener: one route, one answer."""

    def __init__(self, protocol: OAuth2Protocol, state: str) -> None:
        self._protocol = protocol
        self._state = state
        self.answer: asyncio.Future[str | Failure] = asyncio.get_running_loop().create_future()
        app = web.Application()
        app.router.add_get(CALLBACK_PATH, self._callback)
        # No access log: the query holds the code. Closing lets the browser have its page.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=GOODBYE_WAIT)
        self.redirect_uri = ""

    async def start(self, port: int) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, LOOPBACK, port)
        await site.start()
        bound = self._runner.addresses[0][1]  # the port the system chose for port=0
        self.redirect_uri = f"http://{LOOPBACK}:{bound}{CALLBACK_PATH}"

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def _callback(self, request: web.Request) -> web.StreamResponse:
        query = {k: v for k, v in request.query.items() if isinstance(v, str)}
        if not {"code", "error", "state"} & set(query):
            # Not an authorization answer (a probe, a reload without parameters): ignored.
            return web.Response(status=400, text="no authorization answer here")
        answer = self._protocol.parse_redirect(query, self._state)
        if not self.answer.done():  # the first answer decides; a reload changes nothing
            self.answer.set_result(answer)
        return _page(answer)


async def _opened(open_browser: OpenBrowser, url: str) -> None:
    """Open ``url``; a browser that cannot be started is said in the log, with the URL to
    open by hand (it carries no secret: the PKCE verifier never leaves this process)."""
    opened = open_browser(url)
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
    listener = _Listener(protocol, state)
    try:
        await listener.start(port)
        redirect_uri = listener.redirect_uri
        url = protocol.build_authorization_url(
            redirect_uri, state, pkce_challenge(verifier), prompt
        )
        await _opened(open_browser, url)
        answer = await _wait(io, listener.answer, wait)
    finally:
        await asyncio.shield(listener.stop())
    if isinstance(answer, Failure):
        raise SignInFailed(answer.code, description=answer.description)
    exchange = protocol.build_code_exchange(answer, redirect_uri, verifier)
    tokens = await io.exchange(exchange, (answer, verifier, state))
    if isinstance(tokens, Failure):
        raise SignInFailed(tokens.code, description=tokens.description)
    return tokens


async def _wait(io: BrowserIO, answer: asyncio.Future[str | Failure], wait: float) -> str | Failure:
    """The redirect's answer, or a timeout, whichever comes first."""
    pausing = asyncio.ensure_future(io.pause(wait))
    try:
        await asyncio.wait((answer, pausing), return_when=asyncio.FIRST_COMPLETED)
    finally:
        pausing.cancel()
    if answer.done():
        return answer.result()
    if pausing.done() and not pausing.cancelled() and not pausing.result():
        raise RuntimeError("the TokenManager was closed during the browser sign-in")
    raise SignInFailed(
        "timeout", description=f"no answer came back from the browser within {wait:g} s"
    )
