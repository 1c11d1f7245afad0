"""Bearer auth for ``requests`` and ``httpx``: the middleware's rules, for other clients.

::

    from tokenjournal.adapters import HttpxAuth, RequestsAuth

    session = requests.Session()
    session.auth = RequestsAuth(tm)                # tm: a tokenjournal.sync.TokenManager
    httpx.Client(auth=HttpxAuth(tm))               # the same sync manager
    httpx.AsyncClient(auth=HttpxAuth(async_tm))    # or a tokenjournal.TokenManager

Both send ``Authorization: Bearer`` only where the aiohttp middleware would (invariant 9:
the manager's allowed origins, https unless loopback or allowed), never to a redirect target
on another origin, and on a 401 for the token they sent refresh keyed on that token
(invariant 10: if the account already moved past it, no new refresh) and replay the request
once; a body that cannot be sent again (a generator, a file) gets its 401 back, the token
having moved on (httpx: a multipart form up to 1 MiB is read into memory first, so it is
replayed, as requests does with every form). A request that already has an
``Authorization`` header is left alone (httpx: unless this auth set it, on an earlier send
of the same ``Request``). They log nothing.

One redirect no auth object can police: httpx follows redirects inside the auth flow and
keeps ``Authorization`` from ``http://host`` (port 80) to ``https://host`` (port 443) even
when that origin is not allowed. The token goes then to the same host, over TLS; list
``https://`` origins (the default rule) and the case never arises.

``requests`` and ``httpx`` are optional (extras ``tokenjournal[requests]``,
``tokenjournal[httpx]``): each is imported the first time its adapter is used, and
``import tokenjournal`` imports neither. ``HttpxAuth`` is an ``httpx.Auth`` and, where the
fork is installed, an ``httpx2.Auth`` too, so either client takes it.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
from collections.abc import AsyncGenerator, Generator
from functools import cache
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urljoin

from yarl import URL

from ._manager import TokenManager as AsyncTokenManager
from ._middleware import BEARER
from .sync import TokenManager as SyncTokenManager

if TYPE_CHECKING:
    import httpx
    import httpx2
    import requests
    import requests.auth

    from ._tokens import TokenSet

__all__ = ["HttpxAuth", "RequestsAuth"]

AUTHORIZATION: Final = "Authorization"
#: The httpx flavours HttpxAuth serves, by import name: the project and its maintained fork.
HTTPX_MODULES: Final = ("httpx", "httpx2")

AnyManager = SyncTokenManager | AsyncTokenManager


def _allows(tm: AnyManager, url: str) -> bool:
    """The middleware's own rule (origin in ``allowed_origins``, https unless loopback or
    ``allow_insecure_http``), so the three clients cannot drift apart."""
    middleware = tm.manager.middleware if isinstance(tm, SyncTokenManager) else tm.middleware
    return middleware.allows(URL(url, encoded=True))


def _sent_by_us(headers: Any, token: str) -> bool:
    """Whether the request behind a response carried our bearer: a 401 from a hop that did
    not (a redirect target elsewhere) says nothing about our token."""
    return bool(headers.get(AUTHORIZATION) == BEARER + token)


# ------------------------------------------------------------------------------- requests


class _RequestsFlow:
    """The logic of :class:`RequestsAuth`; the class itself also derives from
    ``requests.auth.AuthBase``, which is only imported when it is first used."""

    def __init__(self, tm: SyncTokenManager, *, timeout: float | None = None) -> None:
        if not isinstance(tm, SyncTokenManager):
            raise TypeError(
                "RequestsAuth takes a tokenjournal.sync.TokenManager (requests is blocking)"
            )
        self.tm = tm
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"RequestsAuth(account={self.tm.manager.account!r})"

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        """Put the bearer on ``r`` if its URL is allowed; watch its answers."""
        if AUTHORIZATION in r.headers or not r.url or not _allows(self.tm, r.url):
            return r
        token = self.tm.access_token(timeout=self.timeout)
        r.headers[AUTHORIZATION] = BEARER + token
        # One hook per prepared request; requests copies hooks onto every redirect hop.
        r.register_hook("response", self._on_response)
        return r

    def _on_response(self, r: requests.Response, **kwargs: Any) -> requests.Response:
        request = r.request
        sent = request.headers.get(AUTHORIZATION, "")
        if not isinstance(sent, str) or not sent.startswith(BEARER):
            return r
        token = sent.removeprefix(BEARER)
        if r.is_redirect:
            self._redirect_rule(r, request)
            return r
        if r.status_code != 401 or not _sent_by_us(request.headers, token):
            return r
        if not _replayable(request.body):
            # Sent once and gone: the caller gets the 401, the next call a fresh token.
            self.tm.refresh_for(token, timeout=self.timeout)
            return r
        fresh = self.tm.refresh_for(token, timeout=self.timeout)
        r.content  # noqa: B018  (read the 401 so its connection goes back to the pool)
        r.close()
        replay = request.copy()
        from requests.cookies import extract_cookies_to_jar

        jar: Any = replay._cookies
        extract_cookies_to_jar(jar, request, r.raw)
        replay.prepare_cookies(jar)
        replay.headers[AUTHORIZATION] = BEARER + fresh.access_token
        # The adapter's send runs no hooks: the replay is never replayed again.
        again = r.connection.send(replay, **kwargs)
        again.history.append(r)
        again.request = replay
        # requests follows a redirect of this answer from `request`, not from `replay`, and
        # runs no hook on `again`: `request` gets the fresh token (not the rejected one,
        # which would cost a second 401) and the redirect rule, here.
        request.headers[AUTHORIZATION] = replay.headers[AUTHORIZATION]
        if again.is_redirect:
            self._redirect_rule(again, request)
        return again

    def _redirect_rule(self, r: requests.Response, request: requests.PreparedRequest) -> None:
        """``r`` redirects; requests builds the next hop from a copy of ``request``. Its own
        rule strips the header on a change of host; ours is the middleware's (exact origin,
        https), applied here before the copy is made."""
        target = r.headers.get("location", "")
        if not _allows(self.tm, urljoin(r.request.url or "", target)):
            del request.headers[AUTHORIZATION]


def _replayable(body: object) -> bool:
    """A body requests can send twice: none, bytes or text (forms and JSON are bytes)."""
    return body is None or isinstance(body, bytes | str)


# ------------------------------------------------------------------------------- httpx


class _HttpxFlow:
    """The logic of :class:`HttpxAuth`; the class itself also derives from ``httpx.Auth``
    (and ``httpx2.Auth``), imported only when it is first used."""

    requires_request_body = False  # a streamed upload stays streamed (it is not replayed)
    requires_response_body = False

    def __init__(self, tm: AnyManager, *, timeout: float | None = None) -> None:
        if not isinstance(tm, SyncTokenManager | AsyncTokenManager):
            raise TypeError("HttpxAuth takes a tokenjournal.TokenManager or its sync twin")
        self.tm = tm
        self.timeout = timeout

    def __repr__(self) -> str:
        manager = self.tm.manager if isinstance(self.tm, SyncTokenManager) else self.tm
        return f"HttpxAuth(account={manager.account!r})"

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        """The flow for ``httpx.Client``: needs the sync manager."""
        tm = self.tm
        if not isinstance(tm, SyncTokenManager):
            raise TypeError(
                "httpx.Client is blocking: give HttpxAuth a tokenjournal.sync.TokenManager "
                "(a tokenjournal.TokenManager serves httpx.AsyncClient)"
            )
        if not _ours(request) or not _allows(tm, str(request.url)):
            yield request
            return
        if _small_form(request):
            request.read()
        token = tm.access_token(timeout=self.timeout)
        _bear(request, token)
        response = yield request
        if not self._rejected(response, token):
            return
        fresh = tm.refresh_for(token, timeout=self.timeout)
        if _httpx_replayable(request):
            _bear(request, fresh.access_token)
            yield request

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        """The flow for ``httpx.AsyncClient``: the async manager on the same loop, or the
        sync one (awaited without blocking the loop)."""
        if not _ours(request) or not _allows(self.tm, str(request.url)):
            yield request
            return
        if _small_form(request):
            await request.aread()
        token = await self._access_token()
        _bear(request, token)
        response = yield request
        if not self._rejected(response, token):
            return
        fresh = await self._refresh_for(token)
        if _httpx_replayable(request):
            _bear(request, fresh.access_token)
            yield request

    @staticmethod
    def _rejected(response: httpx.Response, token: str) -> bool:
        # httpx follows redirects inside the flow: the answer may come from another hop,
        # which httpx sent without our header if it was on another origin.
        return response.status_code == 401 and _sent_by_us(response.request.headers, token)

    async def _access_token(self) -> str:
        tm = self.tm
        if isinstance(tm, AsyncTokenManager):
            return await asyncio.wait_for(tm.access_token(), self.timeout)
        fresh = tm.manager.fresh_token()
        if fresh is not None:
            return fresh
        return await asyncio.wait_for(
            asyncio.wrap_future(tm.submit(tm.manager.access_token)), self.timeout
        )

    async def _refresh_for(self, token: str) -> TokenSet:
        tm = self.tm
        if isinstance(tm, AsyncTokenManager):
            return await asyncio.wait_for(tm.refresh_for(token), self.timeout)
        return await asyncio.wait_for(
            asyncio.wrap_future(tm.submit(lambda: tm.manager.refresh_for(token))), self.timeout
        )


#: Where HttpxAuth notes, in ``Request.extensions``, the header value it set (transports
#: ignore keys they do not know).
BEARER_SET: Final = "tokenjournal.bearer"
#: A multipart form up to this size is read into memory before its first send, so that a
#: 401 can replay it (requests always builds a form in memory); a larger one stays streamed.
FORM_BUFFER: Final = 1 << 20


def _ours(request: httpx.Request) -> bool:
    """Whether the bearer is ours to set: no ``Authorization`` (or the one this flow set
    when the same ``Request`` was sent before: a caller's retry loop around
    ``client.send(request)`` must get a fresh token, not the one the server rejected)."""
    header = request.headers.get(AUTHORIZATION)
    return header is None or header == request.extensions.get(BEARER_SET)


def _bear(request: httpx.Request, token: str) -> None:
    request.headers[AUTHORIZATION] = request.extensions[BEARER_SET] = BEARER + token


def _small_form(request: httpx.Request) -> bool:
    """A multipart upload (``files=``) of known length up to :data:`FORM_BUFFER`: httpx
    streams it from the caller's parts, which a 401 replay could not trust to be readable
    twice, so it is read first."""
    length = request.headers.get("content-length", "")
    return (
        request.headers.get("content-type", "").startswith("multipart/")
        and length.isdigit()
        and int(length) <= FORM_BUFFER
    )


def _httpx_replayable(request: httpx.Request) -> bool:
    """httpx reads a bytes body into the request; a streamed one raises when asked for it."""
    try:
        request.content  # noqa: B018
    except Exception:  # httpx.RequestNotRead (or httpx2's): a stream, sent once
        return False
    return True


# ------------------------------------------------------------------------------- the classes

if TYPE_CHECKING:

    class RequestsAuth(_RequestsFlow, requests.auth.AuthBase):
        """A ``requests`` auth: ``session.auth = RequestsAuth(sync_tm)``."""

    # Both flavours' Auth, as at run time, so either client's type accepts it; their flow
    # methods name their own Request types, hence the ignore.
    class HttpxAuth(_HttpxFlow, httpx.Auth, httpx2.Auth):  # type: ignore[misc]
        """An ``httpx.Auth``: ``httpx.Client(auth=HttpxAuth(sync_tm))``,
        ``httpx.AsyncClient(auth=HttpxAuth(tm))``."""

else:

    def __getattr__(name: str) -> type:
        # PEP 562: the classes are built on first use, so importing this module (or
        # tokenjournal) never imports requests or httpx.
        if name == "RequestsAuth":
            return _requests_auth()
        if name == "HttpxAuth":
            return _httpx_auth()
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@cache
def _requests_auth() -> type:
    try:
        from requests.auth import AuthBase
    except ImportError as exc:
        hint = "RequestsAuth needs requests: pip install 'tokenjournal[requests]'"
        raise ImportError(hint) from exc
    cls = type(
        "RequestsAuth",
        (_RequestsFlow, AuthBase),
        {"__doc__": _RequestsFlow.__doc__, "__module__": __name__},
    )
    globals()["RequestsAuth"] = cls
    return cls


@cache
def _httpx_auth() -> type:
    bases: list[type] = []
    for name in HTTPX_MODULES:
        if importlib.util.find_spec(name) is None:
            continue
        base = importlib.import_module(name).Auth
        if base not in bases:  # httpx2.alias_httpx() makes both names one module
            bases.append(base)
    if not bases:
        raise ImportError("HttpxAuth needs httpx: pip install 'tokenjournal[httpx]'")
    cls = type(
        "HttpxAuth",
        (_HttpxFlow, *bases),
        {"__doc__": _HttpxFlow.__doc__, "__module__": __name__},
    )
    globals()["HttpxAuth"] = cls
    return cls
