"""The token store: refresh-token families, rotation state and device codes in SQLite.

Concurrency model: every public method is one short, synchronous critical section (a single
`BEGIN IMMEDIATE` transaction) that the event loop runs without ever awaiting inside it.
Because the loop cannot switch to another request in the middle of a method, two requests
can never interleave their reads and writes: that, and not SQLite locking, is what
serialises rotations within the server. (`BEGIN IMMEDIATE` still matters when a second
process opens the same file.) The per-token `asyncio.Lock` in `_app` only exists to hold
other callers back while an injected delay keeps a rotation "in progress".

Refresh tokens are kept only as SHA-256 hashes. The one exception is the successor pair
stored on a rotated token: the grace-window rule requires returning the *same* previously
generated pair on replay, so it must be kept until the family is revoked (then it is wiped).
"""

from __future__ import annotations

import os
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final, Literal

from ._tokens import Family, FamilyKind, IssuedPair, token_hash

SCHEMA_VERSION: Final = 1

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS families (
    id             TEXT PRIMARY KEY,
    kind           TEXT NOT NULL,
    user_id        TEXT NOT NULL,
    email          TEXT NOT NULL,
    device_id      TEXT,
    client_id      TEXT,
    scope          TEXT,
    created_at     REAL NOT NULL,
    revoked_at     REAL,
    revoked_reason TEXT
);
CREATE TABLE IF NOT EXISTS refresh_tokens (
    token_hash           TEXT PRIMARY KEY,
    family_id            TEXT NOT NULL REFERENCES families(id),
    generation           INTEGER NOT NULL,
    issued_at            REAL NOT NULL,
    expires_at           REAL NOT NULL,
    rotated_at           REAL,
    successor_hash       TEXT,
    successor_access     TEXT,
    successor_refresh    TEXT,
    successor_expires_in REAL
);
CREATE INDEX IF NOT EXISTS refresh_tokens_family ON refresh_tokens(family_id);
CREATE TABLE IF NOT EXISTS device_codes (
    code_hash  TEXT PRIMARY KEY,
    user_code  TEXT NOT NULL UNIQUE,
    client_id  TEXT NOT NULL,
    scope      TEXT,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    interval   INTEGER NOT NULL,
    last_poll  REAL,
    status     TEXT NOT NULL,
    user_id    TEXT,
    email      TEXT
);
"""

Mint = Callable[[Family, float], IssuedPair]
RefreshError = Literal["invalid_token", "token_expired", "invalid_token_state", "device_mismatch"]
DeviceState = Literal["pending", "approved", "denied", "consumed"]


@dataclass(frozen=True, slots=True)
class RefreshResult:
    """What one refresh did.

    `outcome` is `rotated` (first use of an active token), `replayed` (grace-window reuse) or
    `error` (then `error` holds the code and `revoked` says whether the family was revoked
    by this very call).
    """

    outcome: Literal["rotated", "replayed", "error"]
    pair: IssuedPair | None = None
    family: Family | None = None
    error: RefreshError | None = None
    revoked: bool = False
    grace_expires_at: float | None = None


@dataclass(frozen=True, slots=True)
class DevicePoll:
    """What one device-code poll answered (RFC 8628 section 3.5)."""

    outcome: Literal[
        "issued",
        "authorization_pending",
        "slow_down",
        "access_denied",
        "expired_token",
        "invalid_grant",
    ]
    pair: IssuedPair | None = None


class TokenStore:
    """SQLite-backed state of the reference server. See the module docstring."""

    __slots__ = ("_db", "_path")

    def __init__(self, path: str) -> None:
        self._path = path
        if path != ":memory:" and not os.path.exists(path):
            # The file holds the JWT key and successor pairs: create it private (0600) before
            # SQLite opens it with the process umask.
            fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)
        # isolation_level=None: no implicit transactions, every write is an explicit
        # BEGIN IMMEDIATE ... COMMIT in `_tx`.
        self._db = sqlite3.connect(path, isolation_level=None)
        try:
            self._prepare(path)
        except BaseException:
            # Not a store (random bytes, a client journal, a newer schema): the connection
            # must not outlive the refusal (`tokenjournal serve --db` says why and exits).
            self._db.close()
            raise

    def _prepare(self, path: str) -> None:
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA foreign_keys = ON")
        self._db.execute("PRAGMA secure_delete = ON")
        if path != ":memory:":
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")
            self._db.execute("PRAGMA busy_timeout = 5000")
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"{path}: token store schema {version} is newer than this server ({SCHEMA_VERSION})"
            )
        self._db.executescript(_SCHEMA)
        self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        """Close the database; the store is unusable afterwards."""
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- meta ---------------------------------------------------------------------------

    def jwt_secret(self, generate: Callable[[], str]) -> str:
        """The persisted signing key, created with `generate` on first use."""
        with self._tx() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'jwt_secret'").fetchone()
            if row is not None:
                return str(row["value"])
            secret = generate()
            db.execute("INSERT INTO meta(key, value) VALUES ('jwt_secret', ?)", (secret,))
            return secret

    # -- families -----------------------------------------------------------------------

    def _insert_token(
        self,
        db: sqlite3.Connection,
        family_id: str,
        generation: int,
        pair: IssuedPair,
        now: float,
        refresh_ttl: float,
    ) -> str:
        digest = token_hash(pair.refresh_token)
        db.execute(
            "INSERT INTO refresh_tokens(token_hash, family_id, generation, issued_at, expires_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (digest, family_id, generation, now, now + refresh_ttl),
        )
        return digest

    def _create_family(
        self,
        db: sqlite3.Connection,
        *,
        kind: FamilyKind,
        user_id: str,
        email: str,
        device_id: str | None,
        client_id: str | None,
        scope: str | None,
        now: float,
        refresh_ttl: float,
        mint: Mint,
    ) -> tuple[Family, IssuedPair]:
        family = Family(
            id=uuid.uuid4().hex,
            kind=kind,
            user_id=user_id,
            email=email,
            device_id=device_id,
            client_id=client_id,
            scope=scope,
        )
        db.execute(
            "INSERT INTO families(id, kind, user_id, email, device_id, client_id, scope,"
            " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (family.id, kind, user_id, email, device_id, client_id, scope, now),
        )
        pair = mint(family, now)
        self._insert_token(db, family.id, 0, pair, now, refresh_ttl)
        return family, pair

    def create_family(
        self,
        *,
        kind: FamilyKind,
        user_id: str,
        email: str,
        device_id: str | None,
        client_id: str | None,
        scope: str | None,
        now: float,
        refresh_ttl: float,
        mint: Mint,
    ) -> tuple[Family, IssuedPair]:
        """Start a new family (a sign-in) and issue its first pair."""
        with self._tx() as db:
            return self._create_family(
                db,
                kind=kind,
                user_id=user_id,
                email=email,
                device_id=device_id,
                client_id=client_id,
                scope=scope,
                now=now,
                refresh_ttl=refresh_ttl,
                mint=mint,
            )

    @staticmethod
    def _family(row: sqlite3.Row) -> Family:
        return Family(
            id=row["id"],
            kind=row["kind"],
            user_id=row["user_id"],
            email=row["email"],
            device_id=row["device_id"],
            client_id=row["client_id"],
            scope=row["scope"],
            revoked_at=row["revoked_at"],
            revoked_reason=row["revoked_reason"],
        )

    def _revoke(self, db: sqlite3.Connection, family_id: str, now: float, reason: str) -> bool:
        cur = db.execute(
            "UPDATE families SET revoked_at = ?, revoked_reason = ?"
            " WHERE id = ? AND revoked_at IS NULL",
            (now, reason, family_id),
        )
        # A dead family's successor pairs will never be replayed again: wipe them.
        db.execute(
            "UPDATE refresh_tokens SET successor_access = NULL, successor_refresh = NULL"
            " WHERE family_id = ?",
            (family_id,),
        )
        return cur.rowcount > 0

    def revoke_family(self, family_id: str, now: float, reason: str) -> bool:
        """Revoke the family `family_id`. False if unknown or already revoked."""
        with self._tx() as db:
            return self._revoke(db, family_id, now, reason)

    def family_active(self, family_id: str) -> bool:
        """True when the family exists and has not been revoked."""
        row = self._db.execute(
            "SELECT revoked_at FROM families WHERE id = ?", (family_id,)
        ).fetchone()
        return row is not None and row["revoked_at"] is None

    def family_of(self, refresh_token: str) -> Family | None:
        """The family a refresh token belongs to (read only), or None if unknown."""
        row = self._db.execute(
            "SELECT f.* FROM refresh_tokens t JOIN families f ON f.id = t.family_id"
            " WHERE t.token_hash = ?",
            (token_hash(refresh_token),),
        ).fetchone()
        return None if row is None else self._family(row)

    def revoke_by_token(self, refresh_token: str, now: float, reason: str) -> bool:
        """Revoke the family of `refresh_token` (any generation). False if unknown/already."""
        with self._tx() as db:
            row = db.execute(
                "SELECT family_id FROM refresh_tokens WHERE token_hash = ?",
                (token_hash(refresh_token),),
            ).fetchone()
            if row is None:
                return False
            return self._revoke(db, row["family_id"], now, reason)

    # -- rotation -----------------------------------------------------------------------

    def refresh(
        self,
        refresh_token: str,
        *,
        now: float,
        kind: FamilyKind,
        device_id: str | None,
        client_id: str | None,
        replay: Literal["same", "new"],
        grace: float,
        refresh_ttl: float,
        mint: Mint,
    ) -> RefreshResult:
        """Apply the rotation rules to one presented refresh token (see the package docs).

        Checks, in order: unknown token (or one of the other protocol, or for Mana another
        device's / for OAuth another client's family); revoked family; refresh TTL; then the
        rotation state machine. A revoked family always answers `invalid_token_state`,
        whatever revoked it, so only the call that detects a reuse says `token_expired`.
        """
        digest = token_hash(refresh_token)
        with self._tx() as db:
            row = db.execute(
                "SELECT t.*, f.* FROM refresh_tokens t JOIN families f ON f.id = t.family_id"
                " WHERE t.token_hash = ?",
                (digest,),
            ).fetchone()
            if row is None or row["kind"] != kind:
                return RefreshResult("error", error="invalid_token")
            family = self._family(row)
            if kind == "oauth" and family.client_id != client_id:
                # RFC 6749 section 6: the token must have been issued to this client.
                return RefreshResult("error", family=family, error="invalid_token")
            if kind == "mana" and family.device_id != device_id:
                return RefreshResult("error", family=family, error="device_mismatch")
            if family.revoked_at is not None:
                return RefreshResult("error", family=family, error="invalid_token_state")

            if row["rotated_at"] is None:
                if now >= row["expires_at"]:
                    return RefreshResult("error", family=family, error="token_expired")
                pair = mint(family, now)
                succ = self._insert_token(
                    db, family.id, row["generation"] + 1, pair, now, refresh_ttl
                )
                self._mark_rotated(db, digest, now, succ, pair, keep_time=False)
                return RefreshResult("rotated", pair=pair, family=family)

            deadline = float(row["rotated_at"]) + grace
            if now >= deadline:
                self._revoke(db, family.id, now, "reuse_after_grace")
                return RefreshResult("error", family=family, error="token_expired", revoked=True)
            succ_row = db.execute(
                "SELECT * FROM refresh_tokens WHERE token_hash = ?", (row["successor_hash"],)
            ).fetchone()
            if succ_row is None or succ_row["rotated_at"] is not None:
                self._revoke(db, family.id, now, "reuse_two_generations")
                return RefreshResult(
                    "error", family=family, error="invalid_token_state", revoked=True
                )
            if replay == "same":
                pair = IssuedPair(
                    access_token=row["successor_access"],
                    refresh_token=row["successor_refresh"],
                    expires_in=float(row["successor_expires_in"]),
                    scope=family.scope,
                )
                return RefreshResult(
                    "replayed", pair=pair, family=family, grace_expires_at=deadline
                )
            # Auth0/Okta style: the replay mints a new pair that becomes the family's current
            # one; the successor handed out before is rotated into it (so it, too, only has a
            # grace window left), and this token's window stays anchored at its first rotation.
            pair = mint(family, now)
            new_digest = self._insert_token(
                db, family.id, succ_row["generation"] + 1, pair, now, refresh_ttl
            )
            self._mark_rotated(db, succ_row["token_hash"], now, new_digest, pair, keep_time=False)
            self._mark_rotated(db, digest, now, new_digest, pair, keep_time=True)
            return RefreshResult("replayed", pair=pair, family=family, grace_expires_at=deadline)

    @staticmethod
    def _mark_rotated(
        db: sqlite3.Connection,
        digest: str,
        now: float,
        succ: str,
        pair: IssuedPair,
        *,
        keep_time: bool,
    ) -> None:
        db.execute(
            "UPDATE refresh_tokens SET rotated_at = CASE WHEN ? THEN rotated_at ELSE ? END,"
            " successor_hash = ?, successor_access = ?, successor_refresh = ?,"
            " successor_expires_in = ? WHERE token_hash = ?",
            (keep_time, now, succ, pair.access_token, pair.refresh_token, pair.expires_in, digest),
        )

    # -- device codes (RFC 8628) --------------------------------------------------------

    def create_device_code(
        self,
        *,
        device_code: str,
        user_code: str,
        client_id: str,
        scope: str | None,
        now: float,
        expires_in: float,
        interval: int,
    ) -> None:
        """Record a new pending device authorization."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO device_codes(code_hash, user_code, client_id, scope, created_at,"
                " expires_at, interval, status) VALUES (?, ?, ?, ?, ?, ?, ?, 'pending')",
                (
                    token_hash(device_code),
                    user_code,
                    client_id,
                    scope,
                    now,
                    now + expires_in,
                    interval,
                ),
            )

    def user_code_exists(self, user_code: str) -> bool:
        """Whether `user_code` is already taken (codes must be unique)."""
        row = self._db.execute(
            "SELECT 1 FROM device_codes WHERE user_code = ?", (user_code,)
        ).fetchone()
        return row is not None

    def device_action(
        self,
        user_code: str,
        *,
        approve: bool,
        user_id: str,
        email: str,
        now: float,
    ) -> Literal["approved", "denied", "unknown", "expired", "not_pending"]:
        """Approve (for `email`) or deny a pending device authorization."""
        with self._tx() as db:
            row = db.execute(
                "SELECT * FROM device_codes WHERE user_code = ?", (user_code,)
            ).fetchone()
            if row is None:
                return "unknown"
            if now >= row["expires_at"]:
                return "expired"
            if row["status"] != "pending":
                return "not_pending"
            status: Literal["approved", "denied"] = "approved" if approve else "denied"
            db.execute(
                "UPDATE device_codes SET status = ?, user_id = ?, email = ? WHERE user_code = ?",
                (status, user_id if approve else None, email if approve else None, user_code),
            )
            return status

    def poll_device(
        self,
        device_code: str,
        *,
        client_id: str,
        now: float,
        refresh_ttl: float,
        mint: Mint,
    ) -> DevicePoll:
        """One token-endpoint poll with a device code; issues the pair once when approved."""
        digest = token_hash(device_code)
        with self._tx() as db:
            row = db.execute("SELECT * FROM device_codes WHERE code_hash = ?", (digest,)).fetchone()
            if row is None or row["client_id"] != client_id or row["status"] == "consumed":
                return DevicePoll("invalid_grant")
            if now >= row["expires_at"]:
                return DevicePoll("expired_token")
            status: DeviceState = row["status"]
            last_poll = row["last_poll"]
            db.execute("UPDATE device_codes SET last_poll = ? WHERE code_hash = ?", (now, digest))
            if status == "denied":
                return DevicePoll("access_denied")
            if status == "approved":
                db.execute(
                    "UPDATE device_codes SET status = 'consumed' WHERE code_hash = ?", (digest,)
                )
                _, pair = self._create_family(
                    db,
                    kind="oauth",
                    user_id=row["user_id"],
                    email=row["email"],
                    device_id=None,
                    client_id=client_id,
                    scope=row["scope"],
                    now=now,
                    refresh_ttl=refresh_ttl,
                    mint=mint,
                )
                return DevicePoll("issued", pair=pair)
            # RFC 8628 section 3.5: slow_down is a variant of authorization_pending, and the
            # client must add 5 s to its interval for all later requests; the server does too.
            if last_poll is not None and now - float(last_poll) < row["interval"]:
                db.execute(
                    "UPDATE device_codes SET interval = interval + 5 WHERE code_hash = ?",
                    (digest,),
                )
                return DevicePoll("slow_down")
            return DevicePoll("authorization_pending")
