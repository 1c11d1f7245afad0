"""What the driver does to journals directly: sign in, read a record, scan the raw files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

import tokenjournal as tj
from tokenjournal._journal import AccountRecord

DEMO: Final = {"email": "demo@example.com", "password": "demo"}
#: A sealed run's key (base64), passed to the workers through their environment.
SEAL_ENV: Final = "TOKENJOURNAL_TORTURE_SEAL_KEY"


def seal_from_env() -> tj.Seal | None:
    """The seal a sealed run's worker uses (``None`` in a plain run)."""
    return tj.Seal.from_env(SEAL_ENV) if os.environ.get(SEAL_ENV) else None


def readable_tokens(journal: Path, tokens: tj.TokenSet | None) -> int:
    """How many of the pair's tokens show in the raw bytes of the journal's files."""
    if tokens is None:
        return 0
    files = [Path(f"{journal}{s}") for s in ("", "-wal", "-shm")]
    blobs = [f.read_bytes() for f in files if f.exists()]
    secrets = [t for t in (tokens.access_token, tokens.refresh_token) if t]
    return sum(1 for t in secrets if any(t.encode() in b for b in blobs))


async def sign_in(
    url: str, journal: Path, account: str = "default", seal: tj.Seal | None = None
) -> int:
    """Sign the demo user in on ``journal``; returns the journal generation afterwards."""
    async with tj.TokenManager(url, journal=journal, account=account, seal=seal) as tm:
        await tm.sign_in(**DEMO)
        return (await tm.journal.load(account)).generation


async def read(
    journal: Path, account: str = "default", seal: tj.Seal | None = None
) -> AccountRecord:
    """The account's record, read through a read-only connection (nothing is written)."""
    store = tj.SQLiteJournal(journal, read_only=True, seal=seal)
    await store.open()
    try:
        return await store.load(account)
    finally:
        await store.close()


def fp(record: AccountRecord) -> str:
    """Fingerprint of the record's refresh token (``-`` when signed out)."""
    return tj.fingerprint(record.tokens.refresh_token if record.tokens else None)
