"""What the driver does to journals directly: sign in, read a record."""

from __future__ import annotations

from pathlib import Path
from typing import Final

import tokenjournal as tj
from tokenjournal._journal import AccountRecord

DEMO: Final = {"email": "demo@example.com", "password": "demo"}


async def sign_in(url: str, journal: Path, account: str = "default") -> int:
    """Sign the demo user in on ``journal``; returns the journal generation afterwards."""
    async with tj.TokenManager(url, journal=journal, account=account) as tm:
        await tm.sign_in(**DEMO)
        return (await tm.journal.load(account)).generation


async def read(journal: Path, account: str = "default") -> AccountRecord:
    """The account's record, read through a read-only connection (nothing is written)."""
    store = tj.SQLiteJournal(journal, read_only=True)
    await store.open()
    try:
        return await store.load(account)
    finally:
        await store.close()


def fp(record: AccountRecord) -> str:
    """Fingerprint of the record's refresh token (``-`` when signed out)."""
    return tj.fingerprint(record.tokens.refresh_token if record.tokens else None)
