"""The SDK against the same misbehaving servers: only errors from the tree come out."""

from __future__ import annotations

import contextlib

import pytest

import tokenjournal as tj
from tests.hostile.servers import running
from tokenjournal.testing import FakeClock

RETRY = tj.RetryPolicy(max_attempts=2, max_elapsed=5.0, base_delay=0.01, attempt_timeout=2.0)


@pytest.mark.parametrize(
    "trick", ["nan_exp", "huge_exp", "escape_code", "echo_token", "deep_json", "garbage"]
)
async def test_sign_in_and_refresh_raise_only_errors_from_the_tree(trick: str) -> None:
    """Regression: a JWT exp of NaN or 400 digits made sign_in raise a raw ValueError or
    OverflowError. A pair whose exp is unusable is kept without expiry."""
    with running(trick) as server:
        async with tj.TokenManager(
            server.url, journal=tj.MemoryJournal(), clock=FakeClock(), retry=RETRY
        ) as tm:
            try:
                tokens = await tm.sign_in(email="demo@example.com", password="demo")
            except tj.TokenJournalError as exc:
                assert not any(t in str(exc) for t in server.tokens)
                return
            if trick in ("nan_exp", "huge_exp"):
                assert tokens.expires_at is None
            with contextlib.suppress(tj.TokenJournalError):  # its text: see the test below
                await tm.refresh()


async def test_a_refresh_error_never_quotes_a_token_the_server_echoed() -> None:
    with running("echo_token") as server:
        async with tj.TokenManager(
            server.url, journal=tj.MemoryJournal(), clock=FakeClock(), retry=RETRY
        ) as tm:
            await tm.sign_in(email="demo@example.com", password="demo")
            with pytest.raises(tj.TokenJournalError) as caught:
                await tm.refresh()
    assert not any(t in str(caught.value) for t in server.tokens)
