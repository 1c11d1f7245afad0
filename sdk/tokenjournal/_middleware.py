"""The aiohttp client middleware: the bearer on allowed origins, and the 401 rule.

aiohttp runs client middlewares once per hop of a redirect chain, so the origin check below
is made for every hop and a redirect to a foreign origin never carries the bearer
(invariants 9 and 10, docs/architecture.md section 2).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, Protocol

from aiohttp import ClientHandlerType, ClientRequest, ClientResponse, hdrs, payload
from yarl import URL

from ._tokens import TokenSet
from ._urls import Origin, is_loopback, origin

BEARER: Final = "Bearer "
#: Origins whose decision is remembered; past this the memory starts afresh (an app that
#: talks to more origins than this pays the full check, nothing else).
DECISIONS: Final = 256


class TokenSource(Protocol):
    """What the middleware needs of a :class:`~tokenjournal.TokenManager`."""

    async def access_token(self) -> str:
        """A valid access token."""
        ...

    async def refresh_for(self, rejected_access_token: str) -> TokenSet:
        """Move past a token the server rejected (a 401); the pair to use now."""
        ...


def _replayable(request: ClientRequest) -> bool:
    """A body we can send twice: empty or bytes (JSON and url-encoded forms are bytes).
    A stream or a file may already be spent, so its 401 is returned as it is."""
    body = request.body
    if body == b"":
        return True
    return isinstance(body, payload.BytesPayload) and not body.consumed


class TokenMiddleware:
    """Attach ``Authorization: Bearer`` to allowed origins; on a 401 for the token sent,
    refresh keyed on that token (invariant 10) and replay the request once.

    A request that already carries an ``Authorization`` header is left alone. A request
    whose body cannot be replayed (a stream) gets its 401 back after the refresh. If the
    refresh after a 401 fails, the error (``SessionEnded``, ``TransientError``, ...) is
    raised to the caller.
    """

    __slots__ = ("_allow_insecure_http", "_allowed_origins", "_decisions", "_source")

    def __init__(
        self,
        source: TokenSource,
        allowed_origins: Iterable[str],
        *,
        allow_insecure_http: bool = False,
    ) -> None:
        # Validated here, as aiohttp's own middlewares validate theirs: a typo in an origin
        # must fail at start-up, not silently send no bearer (or the wrong one) later.
        if isinstance(allowed_origins, str):
            raise TypeError("allowed_origins must be a list of URLs, not one string")
        origins: set[Origin] = set()
        for entry in allowed_origins:
            u = URL(entry) if isinstance(entry, str) else None
            if u is None or u.scheme not in ("http", "https") or not u.host:
                raise ValueError(f"allowed_origins: {entry!r} is not an http(s) URL")
            origins.add(origin(u))
        self._source = source
        self._allowed_origins: frozenset[Origin] = frozenset(origins)
        self._allow_insecure_http = bool(allow_insecure_http)
        # The decision depends on the origin alone, and the settings above are read-only:
        # decide once per origin, not once per request.
        self._decisions: dict[tuple[str, str | None, int | None], bool] = {}

    @property
    def allowed_origins(self) -> frozenset[Origin]:
        """The origins the bearer may go to, as ``(scheme, host, port)``."""
        return self._allowed_origins

    @property
    def allow_insecure_http(self) -> bool:
        """Whether plain HTTP to a non-loopback allowed origin may carry the bearer."""
        return self._allow_insecure_http

    def allows(self, url: URL) -> bool:
        """Whether the bearer may be sent to ``url`` (invariant 9)."""
        key = (url.scheme, url.host, url.port)
        decided = self._decisions.get(key)
        if decided is None:
            if len(self._decisions) >= DECISIONS:
                self._decisions.clear()
            decided = self._decisions[key] = self._decide(url)
        return decided

    def _decide(self, url: URL) -> bool:
        if origin(url) not in self._allowed_origins:
            return False
        return url.scheme == "https" or is_loopback(url.host) or self._allow_insecure_http

    async def __call__(self, request: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        """Run one hop of a request through the bearer and 401 rules."""
        if hdrs.AUTHORIZATION in request.headers or not self.allows(request.url):
            return await handler(request)
        token = await self._source.access_token()
        request.headers[hdrs.AUTHORIZATION] = BEARER + token
        response = await handler(request)
        if response.status != 401:
            return response
        if not _replayable(request):
            # The body cannot be sent again: hand back the 401, but move past the rejected
            # token so the caller's own retry carries a fresh one (invariant 10).
            await self._source.refresh_for(token)
            return response
        response.release()
        fresh = await self._source.refresh_for(token)
        request.headers[hdrs.AUTHORIZATION] = BEARER + fresh.access_token
        return await handler(request)
