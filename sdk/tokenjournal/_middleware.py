"""The aiohttp client middleware: the bearer on allowed origins, and the 401 rule.

aiohttp runs client middlewares once per hop of a redirect chain, so the origin check below
is made for every hop and a redirect to a foreign origin never carries the bearer
(invariants 9 and 10, docs/architecture.md section 2).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from aiohttp import ClientHandlerType, ClientRequest, ClientResponse, hdrs, payload
from yarl import URL

from ._transport import is_loopback

if TYPE_CHECKING:
    from ._manager import TokenManager

BEARER: Final = "Bearer "


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

    __slots__ = ("_manager",)

    def __init__(self, manager: TokenManager) -> None:
        self._manager = manager

    def allows(self, url: URL) -> bool:
        """Whether the bearer may be sent to ``url`` (invariant 9)."""
        manager = self._manager
        origin = (url.scheme.lower(), (url.host or "").lower(), url.port)
        if origin not in manager.allowed_origins:
            return False
        return url.scheme == "https" or is_loopback(url.host) or manager.allow_insecure_http

    async def __call__(self, request: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        """Run one hop of a request through the bearer and 401 rules."""
        if hdrs.AUTHORIZATION in request.headers or not self.allows(request.url):
            return await handler(request)
        token = await self._manager.access_token()
        request.headers[hdrs.AUTHORIZATION] = BEARER + token
        response = await handler(request)
        if response.status != 401:
            return response
        if not _replayable(request):
            # The body cannot be sent again: hand back the 401, but move past the rejected
            # token so the caller's own retry carries a fresh one (invariant 10).
            await self._manager.refresh_for(token)
            return response
        response.release()
        fresh = await self._manager.refresh_for(token)
        request.headers[hdrs.AUTHORIZATION] = BEARER + fresh.access_token
        return await handler(request)
