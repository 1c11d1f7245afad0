"""The loopback listener of browser sign-in (RFC 8252 section 7.3): one route on 127.0.0.1
that takes the one redirect carrying the authorization answer and shows the browser a small
"you can close this tab" page. Its own module so that aiohttp's server side is imported
only by an app that signs in through a browser (``_browser.run_browser_flow``).
"""

from __future__ import annotations

import asyncio
import html
from typing import Final

from aiohttp import web

from ._protocols import OAuth2Protocol
from ._tokens import Failure

#: Where the browser is sent back to, under the listener's origin.
CALLBACK_PATH: Final = "/callback"
LOOPBACK: Final = "127.0.0.1"
#: The listener lets the browser receive its page before it is closed, at most this long.
GOODBYE_WAIT: Final = 2.0

_PAGE: Final = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;max-width:28em;margin:3em auto}}</style></head>
<body><h1 id="title">{title}</h1><p id="detail">{detail}</p></body></html>
"""


def _page(answer: str | Failure, status: int = 200) -> web.Response:
    if status != 200:
        title = "Not this sign-in"
        detail = "This page belongs to another sign-in. Close it and use the app's latest one."
    elif isinstance(answer, Failure):
        title = "Sign-in failed"
        reason = answer.description or answer.code
        detail = f"{reason}. You can close this tab and return to the app."
    else:
        title = "Signed in"
        detail = "You can close this tab and return to the app."
    body = _PAGE.format(title=html.escape(title), detail=html.escape(detail))
    response = web.Response(text=body, content_type="text/html", status=status)
    response.headers["Cache-Control"] = "no-store"
    return response


class Listener:
    """The loopback listener: one route, one answer."""

    def __init__(self, protocol: OAuth2Protocol, state: str) -> None:
        self._protocol = protocol
        self._state = state
        self.answer: asyncio.Future[str | Failure] = asyncio.get_running_loop().create_future()
        #: Redirects that carried another ``state``, ignored (see ``_callback``).
        self.strays = 0
        app = web.Application()
        app.router.add_get(CALLBACK_PATH, self._callback)
        # No access log: the query holds the code. Closing lets the browser have its page.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=GOODBYE_WAIT)
        self._starting: asyncio.Task[None] | None = None
        self.redirect_uri = ""

    async def start(self, port: int) -> None:
        """Listen on 127.0.0.1:``port`` (0: any free port). A cancel does not cut it short:
        aiohttp's site serves before its start returns, and a cancel landing there would
        lose the server with its port bound for the life of the process (a fixed ``port``
        then refuses every later sign-in); :meth:`stop` waits for it."""
        self._starting = asyncio.ensure_future(self._start(port))
        await asyncio.shield(self._starting)

    async def _start(self, port: int) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, LOOPBACK, port)
        await site.start()
        bound = self._runner.addresses[0][1]  # the port the system chose for port=0
        self.redirect_uri = f"http://{LOOPBACK}:{bound}{CALLBACK_PATH}"

    async def stop(self) -> None:
        if self._starting is not None:
            await asyncio.wait([self._starting])
        await self._runner.cleanup()

    async def _callback(self, request: web.Request) -> web.StreamResponse:
        query = {k: v for k, v in request.query.items() if isinstance(v, str)}
        if not {"code", "error", "state"} & set(query):
            # Not an authorization answer (a probe, a reload without parameters): ignored.
            return web.Response(status=400, text="no authorization answer here")
        answer = self._protocol.parse_redirect(query, self._state)
        if isinstance(answer, Failure) and answer.code == "state_mismatch":
            # Not this sign-in's redirect (a stale tab of an earlier try, or any web page or
            # local program that knows the port): nothing in it is believed, and it must not
            # end the sign-in the person is completing in another tab either.
            self.strays += 1
            return _page(answer, status=400)
        if not self.answer.done():  # the first answer decides; a reload changes nothing
            self.answer.set_result(answer)
        return _page(answer)
