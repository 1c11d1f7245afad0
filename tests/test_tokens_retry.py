"""TokenSet values and the retry policy: pure, no I/O."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

import tokenjournal as tj
from tokenjournal._protocols import Failure, FailureKind
from tokenjournal._retry import GRACE_GUARD

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def pair(lifetime: float = 900.0) -> tj.TokenSet:
    return tj.TokenSet("access-secret", "refresh-secret", NOW + timedelta(seconds=lifetime), NOW)


def test_repr_and_str_show_fingerprints_never_tokens() -> None:
    tokens = pair()
    for text in (repr(tokens), str(tokens), f"{tokens}", repr([tokens])):
        assert "access-secret" not in text and "refresh-secret" not in text
        assert tj.fingerprint("access-secret") in text


def test_margin_is_clamped_to_half_the_lifetime() -> None:
    # A 60 s token under a 60 s margin must not be refreshed on every call.
    short = pair(60.0)
    assert short.margin(60.0) == 30.0
    assert not short.needs_refresh(NOW.timestamp() + 1, 60.0)
    assert short.needs_refresh(NOW.timestamp() + 30, 60.0)
    assert pair(900.0).margin(60.0) == 60.0


def test_expiry_checks() -> None:
    tokens = pair(100.0)
    assert not tokens.is_expired(NOW.timestamp() + 99)
    assert tokens.is_expired(NOW.timestamp() + 100)
    no_expiry = tj.TokenSet("a", "r")
    assert not no_expiry.needs_refresh(1e12, 60.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"access_token": "", "refresh_token": "r"},
        {"access_token": "a", "refresh_token": ""},
        {"access_token": "a", "refresh_token": "r", "expires_at": datetime(2026, 1, 1)},
    ],
)
def test_tokenset_rejects_bad_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        tj.TokenSet(**kwargs)  # type: ignore[arg-type]


def test_backoff_curve_is_exponential_with_full_jitter_and_capped() -> None:
    policy = tj.RetryPolicy(base_delay=0.5, max_delay=8.0)
    assert [policy.backoff_delay(a, lambda: 1.0) for a in range(1, 7)] == [0.5, 1, 2, 4, 8, 8]
    assert policy.backoff_delay(3, lambda: 0.25) == 0.5


def test_retry_after_is_honoured() -> None:
    failure = Failure(FailureKind.RATE_LIMITED, "rate_limited", 429, retry_after=7.0)
    assert tj.RetryPolicy().delay(1, failure, now=0.0, grace_deadline=None) == 7.0


def test_delays_are_paced_to_land_inside_the_grace_window() -> None:
    # 20 s left in the window: a 30 s backoff would overshoot; the pacing keeps half.
    policy = tj.RetryPolicy(base_delay=30.0, max_delay=30.0)
    delay = policy.delay(1, None, now=100.0, grace_deadline=120.0, rng=lambda: 1.0)
    assert delay == pytest.approx((20.0 - GRACE_GUARD) / 2)
    # Past the deadline the window no longer shapes the curve.
    assert policy.delay(1, None, now=200.0, grace_deadline=120.0, rng=lambda: 1.0) == 30.0


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        tj.RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError):
        tj.RetryPolicy(base_delay=-1)
