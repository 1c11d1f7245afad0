"""Minting and checking tokens: HS256 JWT access tokens, opaque refresh tokens."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import jwt

FamilyKind = Literal["mana", "oauth"]

ALGORITHM: Final = "HS256"


def token_hash(token: str) -> str:
    """SHA-256 hex of a token: what the store keeps instead of the refresh token itself."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def fingerprint(token: str) -> str:
    """A short, non-reversible name for a token, safe for logs (first 8 hex of SHA-256)."""
    return token_hash(token)[:8]


def user_id_for(email: str) -> str:
    """A stable user id derived from the email, so ids survive a server restart."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "mailto:" + email.lower()))


@dataclass(frozen=True, slots=True)
class Family:
    """A chain of refresh tokens that descend from one sign-in."""

    id: str
    kind: FamilyKind
    user_id: str
    email: str
    device_id: str | None
    client_id: str | None
    scope: str | None
    revoked_at: float | None = None
    revoked_reason: str | None = None


@dataclass(frozen=True, slots=True)
class IssuedPair:
    """An access token and refresh token handed out together."""

    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    expires_in: float
    scope: str | None
    #: The OpenID Connect ID token, minted when the scope holds ``openid`` and the route
    #: knows its issuer (a grace replay repeats a stored pair and has none).
    id_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class AccessClaims:
    """The parts of a verified access token the routes need."""

    user_id: str
    email: str
    family_id: str
    exp: float


class TokenMinter:
    """Creates token pairs and verifies access tokens with one HS256 key."""

    __slots__ = ("_access_ttl", "_secret")

    def __init__(self, secret: str, access_ttl: float) -> None:
        self._secret = secret
        self._access_ttl = access_ttl

    def mint(self, family: Family, now: float, issuer: str | None = None) -> IssuedPair:
        """A fresh pair for `family`, issued at server time `now`; with `issuer`, and `openid`
        in the family's scope, an ID token too (OpenID Connect Core 2)."""
        claims: dict[str, Any] = {
            "sub": family.user_id,
            "email": family.email,
            "sid": family.id,
            "iat": int(now),
            "exp": int(now + self._access_ttl),
            "jti": uuid.uuid4().hex,
        }
        if family.device_id is not None:
            claims["did"] = family.device_id
        if family.client_id is not None:
            claims["client_id"] = family.client_id
        if family.scope:
            claims["scope"] = family.scope
        access = jwt.encode(claims, self._secret, algorithm=ALGORITHM)
        id_token = None
        if issuer is not None and "openid" in (family.scope or "").split():
            id_token = self.id_token(family, now, issuer)
        return IssuedPair(
            access_token=access,
            refresh_token=secrets.token_urlsafe(32),
            expires_in=self._access_ttl,
            scope=family.scope,
            id_token=id_token,
        )

    def id_token(self, family: Family, now: float, issuer: str) -> str:
        """An ID token for `family`'s user, for its client, signed like the access tokens.

        HS256 with the server's key: the reference server's clients are its own, and the
        SDK keeps ID tokens for the app without verifying them (the server it got them from
        is the one it trusts already).
        """
        claims: dict[str, Any] = {
            "iss": issuer,
            "sub": family.user_id,
            "aud": family.client_id or "",
            "iat": int(now),
            "exp": int(now + self._access_ttl),
            "auth_time": int(now),
            "email": family.email,
            "email_verified": True,
            "jti": uuid.uuid4().hex,  # every ID token differs, even two in one second
        }
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM)

    def verify(self, token: str, now: float) -> AccessClaims | None:
        """The claims of a correctly signed, unexpired (by the server clock) token, else None."""
        try:
            # PyJWT would compare exp/iat/nbf with the real wall clock; the server has its own
            # clock (advanced by tests), so those checks are off here and done against it below.
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                options={
                    "verify_signature": True,
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                    "require": ["sub", "exp", "iat", "jti", "sid"],
                },
            )
        except jwt.InvalidTokenError:
            return None
        sub, email, sid, exp = (claims.get(k) for k in ("sub", "email", "sid", "exp"))
        if not (isinstance(sub, str) and isinstance(email, str) and isinstance(sid, str)):
            return None
        if isinstance(exp, bool) or not isinstance(exp, int | float) or now >= exp:
            return None
        return AccessClaims(user_id=sub, email=email, family_id=sid, exp=float(exp))
