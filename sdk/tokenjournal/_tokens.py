"""The SDK's vocabulary: TokenSet, the value the journal stores and callers receive, with its
expiry arithmetic, and Failure, a failed answer as the protocols classify it."""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

#: A token that lives shorter than this is refreshed at half its life at most, never on every call.
MARGIN_FRACTION: Final = 0.5


def fingerprint(secret: str | None) -> str:
    """A short, stable, non-reversible name for a token: safe for logs, events and CLI output."""
    if not secret:
        return "-"
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()[:8]


def to_datetime(epoch: float | None) -> datetime | None:
    """Epoch seconds to an aware UTC datetime (``None`` stays ``None``).

    A value beyond what a datetime holds (a stored "never expires", an edited row) is
    clamped to the years 1..9999 instead of raising; NaN is no time and raises ValueError.
    """
    if epoch is None:
        return None
    if epoch != epoch:
        raise ValueError("NaN is not a time")
    # 0001-01-02 and 9999-01-01 UTC: a day to spare at each end for time-zone arithmetic.
    return datetime.fromtimestamp(min(max(epoch, -62135510400.0), 253370764800.0), tz=UTC)


@dataclass(frozen=True, slots=True)
class TokenSet:
    """An access token and the refresh token that renews it.

    ``expires_at`` is the access token's expiry as an aware UTC datetime (``None`` when the
    server gave no expiry: such a token is refreshed only when the server answers 401).
    ``received_at`` is when the client received the pair; with ``expires_at`` it gives the
    token's lifetime, which bounds the refresh margin. ``id_token`` is the OpenID Connect ID
    token when the server sent one (a refresh that brings none keeps the previous one). ``repr``
    shows fingerprints only, and never the ID token.
    """

    access_token: str = field(repr=False)
    refresh_token: str | None = field(repr=False)
    expires_at: datetime | None = None
    received_at: datetime | None = None
    token_type: str = "Bearer"
    scope: str | None = None
    id_token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.access_token, str) or not self.access_token:
            raise ValueError("TokenSet.access_token must be a non-empty string")
        if self.refresh_token is not None and (
            not isinstance(self.refresh_token, str) or not self.refresh_token
        ):
            raise ValueError("TokenSet.refresh_token must be a non-empty string or None")
        if self.id_token is not None and (not isinstance(self.id_token, str) or not self.id_token):
            raise ValueError("TokenSet.id_token must be a non-empty string or None")
        if not isinstance(self.token_type, str) or not self.token_type.strip():
            # An empty type read back as "Bearer" made every load look like a new pair.
            raise ValueError("TokenSet.token_type must be a non-empty string")
        for name in ("expires_at", "received_at"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, datetime) or value.tzinfo is None):
                raise ValueError(f"TokenSet.{name} must be an aware datetime or None")

    def __repr__(self) -> str:
        expires = self.expires_at.isoformat() if self.expires_at else None
        return (
            f"TokenSet(access={fingerprint(self.access_token)}, "
            f"refresh={fingerprint(self.refresh_token)}, expires_at={expires})"
        )

    __str__ = __repr__

    @property
    def expires_at_epoch(self) -> float | None:
        """``expires_at`` as epoch seconds."""
        return None if self.expires_at is None else self.expires_at.timestamp()

    @property
    def lifetime(self) -> float | None:
        """Seconds from receipt to expiry, when both are known."""
        if self.expires_at is None or self.received_at is None:
            return None
        return (self.expires_at - self.received_at).total_seconds()

    def is_expired(self, now: float) -> bool:
        """Whether the access token has expired at epoch time ``now``."""
        exp = self.expires_at_epoch
        return exp is not None and now >= exp

    def margin(self, refresh_margin: float) -> float:
        """The refresh margin clamped to a fraction of the token's lifetime.

        Without the clamp a token that lives 60 s under a 60 s margin would be refreshed on
        every call (google-auth's refresh storm).
        """
        lifetime = self.lifetime
        if lifetime is None:
            return refresh_margin
        return max(0.0, min(refresh_margin, lifetime * MARGIN_FRACTION))

    def needs_refresh(self, now: float, refresh_margin: float) -> bool:
        """Whether the access token is inside the refresh margin (or expired) at ``now``."""
        exp = self.expires_at_epoch
        return exp is not None and now >= exp - self.margin(refresh_margin)

    @property
    def secrets(self) -> tuple[str, ...]:
        """Every token of the set, for scrubbing a server's words of them."""
        return tuple(t for t in (self.access_token, self.refresh_token, self.id_token) if t)

    @property
    def sendable(self) -> bool:
        """Whether both tokens are 1*VSCHAR (RFC 6749 A.12/A.17: printable ASCII): a token
        with CR/LF, NUL or non-ASCII fits in no header, and a lone surrogate in no journal."""
        return all(
            t is None or (t.isascii() and t.isprintable())
            for t in (self.access_token, self.refresh_token)
        )


class FailureKind(enum.Enum):
    """What a failed answer means for the session."""

    #: The server says the refresh token is dead: end the session.
    PERMANENT = "permanent"
    #: Another request is rotating this token: wait ~1 s, retry the same token.
    CONFLICT = "conflict"
    #: 429: wait (Retry-After), retry.
    RATE_LIMITED = "rate_limited"
    #: 5xx or ``temporarily_unavailable``: back off, retry.
    SERVER = "server"
    #: A 2xx whose body does not parse: the server may have rotated, so retry like a transient.
    MALFORMED = "malformed"
    #: Any other 4xx: our request was wrong. No retry, tokens kept.
    REJECTED = "rejected"
    #: Device flow: the person has not approved yet (``authorization_pending``).
    PENDING = "pending"
    #: Device flow: poll slower (``slow_down``).
    SLOW_DOWN = "slow_down"

    @property
    def retryable(self) -> bool:
        """Whether an answer of this kind is worth another try with the same token:
        transient (CONFLICT, RATE_LIMITED, SERVER) or possibly rotated (MALFORMED)."""
        return self in _RETRYABLE


@dataclass(frozen=True, slots=True)
class Failure:
    """A failed answer, classified. ``message`` never holds a token.

    ``description`` is the server's own explanation (OAuth's ``error_description``, Mana's
    ``message``), raw but cut to ``MAX_DESCRIPTION`` characters: the manager makes it
    printable and strips secrets from it before anyone sees it.
    """

    kind: FailureKind
    code: str
    status: int
    message: str = ""
    retry_after: float | None = None
    description: str | None = None

    @property
    def retryable(self) -> bool:
        """Whether another try with the same token may succeed (its kind says)."""
        return self.kind.retryable


#: Failure kinds worth another try with the same token (docs/architecture.md 3.3).
_RETRYABLE: Final = frozenset(
    {FailureKind.CONFLICT, FailureKind.RATE_LIMITED, FailureKind.SERVER, FailureKind.MALFORMED}
)
