"""Configuration of the reference server."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Final, Literal

ConflictMode = Literal["serialize", "409"]
ReplayStyle = Literal["same", "new"]

DEMO_USER: Final = ("demo@example.com", "demo")
DEMO_CLIENT_ID: Final = "tokenjournal-demo"
# PyJWT warns about HMAC keys shorter than the hash (RFC 7518 section 3.2); with warnings as
# errors in the test suite a short key would break every sign-in, so refuse it up front.
MIN_JWT_SECRET_BYTES: Final = 32


def _positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Settings of one reference-server instance.

    Durations are in seconds. Secrets (`users` passwords, client secrets, `jwt_secret`) are
    left out of the repr so a config can be printed or logged safely.
    """

    access_ttl: float = 900.0
    """Lifetime of an access token (the JWT `exp` is `iat + access_ttl`)."""
    refresh_ttl: float = 30 * 86400.0
    """Lifetime of a refresh token from the moment it is issued."""
    grace: float = 300.0
    """How long a rotated refresh token may be replayed to get its successor pair again."""
    db_path: str = ":memory:"
    """SQLite file for the token store; `:memory:` keeps state only for this process."""
    test_mode: bool = False
    """Enable the `/_test/*` routes (clock, faults, stats, device approval) and the demo user."""
    users: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    """`(email, password)` accounts. Empty + test mode gives `demo@example.com` / `demo`."""
    conflict: ConflictMode = "serialize"
    """Concurrent refreshes of one token: `serialize` (all get the same pair) or `409`."""
    oauth_replay: ReplayStyle = "same"
    """OAuth grace replay: `same` pair (django-oauth-toolkit) or a `new` pair (Auth0, Okta)."""
    clients: tuple[tuple[str, str | None], ...] = field(
        default=((DEMO_CLIENT_ID, None),), repr=False
    )
    """OAuth clients as `(client_id, secret)`; a `None` secret marks a public client."""
    jwt_secret: str | None = field(default=None, repr=False)
    """HS256 key. `None`: random per start, or persisted in the database when it is a file."""
    max_body: int = 64 * 1024
    """Largest request body accepted, in bytes (larger ones get 413)."""
    device_expires_in: float = 600.0
    """Lifetime of a device code (RFC 8628 `expires_in`)."""
    device_interval: int = 5
    """Initial polling interval of the device flow, in seconds."""
    header_timeout: float = 15.0
    """A connection must send a whole request head within this long of opening (and an
    idle keep-alive connection is closed after it): slowloris clients are dropped."""
    read_timeout: float = 30.0
    """A request body must arrive within this long (else 408)."""
    max_connections: int = 1024
    """Open connections beyond this are answered 503 and closed at once (`serve` only)."""

    def __post_init__(self) -> None:
        for name in (
            "access_ttl",
            "refresh_ttl",
            "device_expires_in",
            "header_timeout",
            "read_timeout",
        ):
            _positive(name, getattr(self, name))
        if isinstance(self.grace, bool) or not isinstance(self.grace, int | float):
            raise TypeError("grace must be a number")
        if not math.isfinite(self.grace) or self.grace < 0:
            raise ValueError("grace must be a finite number >= 0")
        if self.conflict not in ("serialize", "409"):
            raise ValueError("conflict must be 'serialize' or '409'")
        if self.oauth_replay not in ("same", "new"):
            raise ValueError("oauth_replay must be 'same' or 'new'")
        if isinstance(self.max_body, bool) or not isinstance(self.max_body, int):
            raise TypeError("max_body must be an int")
        if self.max_body < 1024:
            raise ValueError("max_body must be at least 1024 bytes")
        if isinstance(self.device_interval, bool) or not isinstance(self.device_interval, int):
            raise TypeError("device_interval must be an int")
        if self.device_interval < 1:
            raise ValueError("device_interval must be >= 1")
        if isinstance(self.max_connections, bool) or not isinstance(self.max_connections, int):
            raise TypeError("max_connections must be an int")
        if self.max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        if not self.db_path:
            raise ValueError("db_path must not be empty (use ':memory:')")
        emails = [email for email, _ in self.users]
        if len(set(emails)) != len(emails):
            raise ValueError("users contains a duplicate email")
        client_ids = [client_id for client_id, _ in self.clients]
        if len(set(client_ids)) != len(client_ids):
            raise ValueError("clients contains a duplicate client_id")
        if self.jwt_secret is not None and len(self.jwt_secret.encode()) < MIN_JWT_SECRET_BYTES:
            raise ValueError(f"jwt_secret must be at least {MIN_JWT_SECRET_BYTES} bytes")

    @property
    def effective_users(self) -> tuple[tuple[str, str], ...]:
        """The accounts that can sign in: `users`, or the demo account in test mode."""
        if not self.users and self.test_mode:
            return (DEMO_USER,)
        return self.users
