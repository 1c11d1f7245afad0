"""The network edge: send an HttpRequest and read a capped answer; tell loopback hosts apart."""

from __future__ import annotations

import functools
import ipaddress
import socket
from collections.abc import Mapping

import aiohttp

from ._protocols import MAX_BODY, HttpRequest

Raw = tuple[int, Mapping[str, str], bytes]


class NetworkFailure(Exception):
    """An exchange got no answer (connect/read error or timeout). Carries no token: its text
    is the name of what failed."""


async def send(http: aiohttp.ClientSession, request: HttpRequest, limit: float) -> Raw:
    """Send ``request`` (no redirects: a token endpoint that redirects is misconfigured) and
    return status, headers and at most ``MAX_BODY + 1`` bytes of body: the protocol refuses
    anything larger, so the rest is never read. ``limit`` bounds the whole exchange in
    seconds. No answer at all is a :class:`NetworkFailure`."""
    try:
        return await _exchange(http, request, limit)
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


@functools.lru_cache(maxsize=64)  # pure, and on every request's path: parse each host once
def is_loopback(host: str | None) -> bool:
    """Whether ``host`` is this machine (plain HTTP to it cannot be sniffed on a network)."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def resolves_to_loopback(host: str) -> bool:
    """Whether ``host`` means loopback addresses only, resolving it if it is a name.

    :func:`is_loopback` trusts the name ``localhost`` (it is on every request's path and
    must not touch DNS); this one is for decisions made once, such as binding the server
    in test mode: a name (``localhost`` included: ``/etc/hosts`` may say anything) is
    resolved, and every address it resolves to must be loopback.
    """
    literal = host.strip("[]")
    if not literal:  # binding "" means every interface
        return False
    try:
        return ipaddress.ip_address(literal).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(literal, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    addresses = {info[4][0] for info in infos}
    try:
        return bool(addresses) and all(
            ipaddress.ip_address(str(a).split("%")[0]).is_loopback for a in addresses
        )
    except ValueError:
        return False
