"""Authorization codes of the browser sign-in (RFC 6749 4.1, PKCE per RFC 7636).

A code is bound to the client, the redirect URI and the PKCE challenge it was issued for,
lives a minute, and is spent by its first use, right or wrong (RFC 6749 4.1.2: a code
presented twice must fail). Codes are kept in memory: one that outlives a server restart is
one the person can simply ask for again.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import re
import secrets
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import urlsplit

#: RFC 6749 4.1.2 recommends at most ten minutes; a loopback redirect takes a second.
CODE_TTL: Final = 60.0
#: RFC 7636 4.1: 43 to 128 characters of [A-Z] / [a-z] / [0-9] / "-" / "." / "_" / "~".
_VERIFIER: Final = re.compile(r"[A-Za-z0-9\-._~]{43,128}")
#: RFC 7636 4.2: an S256 challenge is 43 characters of base64url.
_CHALLENGE: Final = re.compile(r"[A-Za-z0-9\-_]{43}")
#: Codes waiting at once, at most: a flood of unfinished sign-ins cannot fill the memory.
MAX_PENDING: Final = 10_000


@dataclass(frozen=True, slots=True)
class AuthorizationCode:
    """What a code was issued for."""

    client_id: str
    redirect_uri: str
    code_challenge: str
    scope: str | None
    user_id: str
    email: str
    expires_at: float


def challenge_ok(challenge: str) -> bool:
    """Whether ``challenge`` can be an S256 challenge."""
    return _CHALLENGE.fullmatch(challenge) is not None


def pkce_matches(verifier: str, challenge: str) -> bool:
    """RFC 7636 4.6: ``BASE64URL(SHA256(verifier)) == challenge``, in constant time."""
    if _VERIFIER.fullmatch(verifier) is None:
        return False
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    computed = base64.urlsafe_b64encode(digest).rstrip(b"=")
    return hmac.compare_digest(computed, challenge.encode("ascii", "replace"))


def loopback_redirect(uri: str) -> bool:
    """RFC 8252 7.3 and 8.3: a native app's redirect is ``http`` to a loopback address, any
    port, any path; nothing else is accepted for the public clients this server has."""
    try:
        parts = urlsplit(uri)
        host = parts.hostname or ""
        parts.port  # noqa: B018  (raises ValueError for a port that is not a number)
    except ValueError:
        return False
    if parts.scheme != "http" or parts.fragment or parts.username or parts.password:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(slots=True)
class CodeStore:
    """Codes waiting for their exchange."""

    _codes: dict[str, AuthorizationCode] = field(default_factory=dict)

    def issue(self, grant: AuthorizationCode, now: float) -> str:
        """A new code for ``grant``; expired ones are dropped first."""
        for code in [c for c, g in self._codes.items() if g.expires_at <= now]:
            del self._codes[code]
        if len(self._codes) >= MAX_PENDING:
            self._codes.pop(next(iter(self._codes)))  # the oldest
        code = secrets.token_urlsafe(32)
        self._codes[code] = grant
        return code

    def take(self, code: str, now: float) -> AuthorizationCode | None:
        """The grant of ``code``, spent by this call; ``None`` if unknown, used or expired."""
        grant = self._codes.pop(code, None)
        if grant is None or grant.expires_at <= now:
            return None
        return grant
