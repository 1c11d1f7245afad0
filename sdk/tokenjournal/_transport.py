"""The network edge: send an HttpRequest and read a capped answer."""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp

from ._protocols import MAX_BODY, HttpRequest

# Re-exported until the manager and the middleware import them from ``_urls``, their home.
from ._urls import is_loopback as is_loopback
from ._urls import resolves_to_loopback as resolves_to_loopback

Raw = tuple[int, Mapping[str, str], bytes]


async def send(http: aiohttp.ClientSession, request: HttpRequest, limit: float) -> Raw:
    """Send ``request`` (no redirects: a token endpoint that redirects is misconfigured) and
    return status, headers and at most ``MAX_BODY + 1`` bytes of body: the protocol refuses
    anything larger, so the rest is never read. ``limit`` bounds the whole exchange in
    seconds. aiohttp's errors propagate."""
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
