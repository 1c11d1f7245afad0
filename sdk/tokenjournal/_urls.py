"""Origins and loopback: which hosts are this machine, and what an origin is.

A leaf module (nothing of tokenjournal below it) so that the client (the manager, the
middleware) and the reference server can share these rules without reaching into each other.
"""

from __future__ import annotations

import functools
import ipaddress
import socket

from yarl import URL

#: ``(scheme, host, port)``, all lower-case; the port is yarl's (the scheme's default if absent).
Origin = tuple[str, str, int | None]


def origin(url: str | URL) -> Origin:
    """The origin of ``url``: what a token may be sent to is decided per origin, not per URL."""
    u = URL(url) if isinstance(url, str) else url
    return (u.scheme.lower(), (u.host or "").lower(), u.port)


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
