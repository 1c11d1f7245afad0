"""The network edge: send an HttpRequest and read a capped answer."""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp

from ._protocols import MAX_BODY, HttpRequest

Raw = tuple[int, Mapping[str, str], bytes]


class NetworkFailure(Exception):
    """An exchange got no answer (connect/read error or timeout). Carries no token: its text
    is the name of what failed. ``unsent``: the connection was never made (refused,
    unreachable, no DNS), so the request cannot have reached the server; any other failure
    may have come after the server read it."""

    def __init__(self, what: str, *, unsent: bool = False) -> None:
        super().__init__(what)
        self.unsent = unsent


async def send(http: aiohttp.ClientSession, request: HttpRequest, limit: float) -> Raw:
    """Send ``request`` (no redirects: a token endpoint that redirects is misconfigured) and
    return status, headers and at most ``MAX_BODY + 1`` bytes of body: the protocol refuses
    anything larger, so the rest is never read. ``limit`` bounds the whole exchange in
    seconds. No answer at all is a :class:`NetworkFailure`."""
    try:
        return await _exchange(http, request, limit)
    except aiohttp.ClientConnectorError as exc:  # no connection: nothing went out
        raise NetworkFailure(type(exc).__name__, unsent=True) from None
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise NetworkFailure(type(exc).__name__) from None


async def _exchange(http: aiohttp.ClientSession, request: HttpRequest, limit: float) -> Raw:
    async with http.request(
        request.method,
        request.url,
        data=request.body,
        headers=dict(request.headers),
        timeout=aiohttp.ClientTimeout(total=limit),
        allow_redirects=False,
    ) as response:
        body = bytearray()
        async for chunk in response.content.iter_chunked(64 * 1024):
            body += chunk
            if len(body) > MAX_BODY:
                break
        return response.status, dict(response.headers), bytes(body)
