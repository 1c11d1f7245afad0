"""TokenSet values and the retry policy: pure, no I/O."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from datetime import UTC, datetime, timedelta

import pytest

import tokenjournal as tj
from tokenjournal._retry import GRACE_GUARD, attempts, transient_error
from tokenjournal._tokens import Failure, FailureKind, to_datetime

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def pair(lifetime: float = 900.0) -> tj.TokenSet:
    return tj.TokenSet("access-secret", "refresh-secret", NOW + timedelta(seconds=lifetime), NOW)


def test_repr_and_str_show_fingerprints_never_tokens() -> None:
    tokens = dataclasses.replace(pair(), id_token="id-token-secret")
    assert tokens.id_token == "id-token-secret"
    for text in (repr(tokens), str(tokens), f"{tokens}", repr([tokens])):
        assert "access-secret" not in text and "refresh-secret" not in text
        assert "id-token-secret" not in text
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


def test_fingerprint_is_short_stable_and_a_dash_for_nothing() -> None:
    assert tj.fingerprint(None) == "-" and tj.fingerprint("") == "-"
    assert tj.fingerprint("access-secret") == hashlib.sha256(b"access-secret").hexdigest()[:8]
    assert tj.fingerprint("é") == hashlib.sha256("é".encode()).hexdigest()[:8]


def test_to_datetime_clamps_to_what_a_datetime_holds() -> None:
    assert to_datetime(None) is None
    assert to_datetime(0.0) == datetime(1970, 1, 1, tzinfo=UTC)
    assert to_datetime(1e20) == datetime(9999, 1, 1, tzinfo=UTC)
    assert to_datetime(-1e20) == datetime(1, 1, 2, tzinfo=UTC)
    with pytest.raises(ValueError):
        to_datetime(math.nan)


def test_lifetime_and_margin_need_both_expiry_and_receipt() -> None:
    expiry_only = tj.TokenSet("a", "r", expires_at=NOW)
    receipt_only = tj.TokenSet("a", "r", received_at=NOW)
    for tokens in (expiry_only, receipt_only):
        assert tokens.lifetime is None
        assert tokens.margin(60.0) == 60.0  # no lifetime: the margin is not clamped
    assert expiry_only.needs_refresh(NOW.timestamp() - 60, 60.0)
    assert not expiry_only.needs_refresh(NOW.timestamp() - 61, 60.0)
    assert not receipt_only.needs_refresh(1e12, 60.0)  # no expiry: only a 401 refreshes
    assert pair(100.0).lifetime == 100.0


def test_a_pair_received_after_its_expiry_has_no_margin_left() -> None:
    late = tj.TokenSet("a", "r", NOW, NOW + timedelta(seconds=10))
    assert late.margin(60.0) == 0.0
    assert late.needs_refresh(NOW.timestamp(), 60.0)
    assert not late.needs_refresh(NOW.timestamp() - 0.5, 60.0)


def test_repr_shows_the_expiry() -> None:
    assert f"expires_at={(NOW + timedelta(seconds=900)).isoformat()})" in repr(pair())
    assert repr(tj.TokenSet("a", None)).endswith("refresh=-, expires_at=None)")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"access_token": 1, "refresh_token": "r"},
        {"access_token": "a", "refresh_token": 1},
        {"access_token": "a", "refresh_token": "r", "token_type": " "},
        {"access_token": "a", "refresh_token": "r", "token_type": None},
        {"access_token": "a", "refresh_token": "r", "received_at": datetime(2026, 1, 1)},
        {"access_token": "a", "refresh_token": "r", "expires_at": 1767225600.0},
    ],
)
def test_tokenset_rejects_wrong_types(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        tj.TokenSet(**kwargs)  # type: ignore[arg-type]


def test_the_grace_pacing_holds_until_the_last_guarded_second() -> None:
    policy = tj.RetryPolicy(base_delay=30.0, max_delay=30.0)
    # Half a second is left before the guard: the next try still goes before it.
    near = policy.delay(1, None, now=120.0 - GRACE_GUARD - 0.5, grace_deadline=120.0, rng=lambda: 1)
    assert near == 0.25
    at_guard = policy.delay(1, None, now=120.0 - GRACE_GUARD, grace_deadline=120.0, rng=lambda: 1)
    assert at_guard == 30.0


def test_a_zero_delay_and_a_zero_retry_after_mean_try_now() -> None:
    policy = tj.RetryPolicy()
    assert policy.delay(1, None, now=0.0, grace_deadline=None, rng=lambda: 0.0) == 0.0
    now = Failure(FailureKind.RATE_LIMITED, "rate_limited", 429, retry_after=0.0)
    assert policy.delay(3, now, now=0.0, grace_deadline=50.0) == 0.0
    late = Failure(FailureKind.SERVER, "server_error", 503, retry_after=40.0)
    assert policy.delay(1, late, now=0.0, grace_deadline=21.0 + GRACE_GUARD) == 10.5
    no_hint = Failure(FailureKind.SERVER, "server_error", 503)
    assert policy.delay(2, no_hint, now=0.0, grace_deadline=None, rng=lambda: 1.0) == 1.0


def test_backoff_starts_at_the_base_delay() -> None:
    policy = tj.RetryPolicy(base_delay=0.5, max_delay=8.0)
    assert (
        policy.backoff_delay(0, lambda: 1.0) == 0.5 and policy.backoff_delay(1, lambda: 1.0) == 0.5
    )


@pytest.mark.parametrize("kind", list(FailureKind))
def test_which_failures_are_retried(kind: FailureKind) -> None:
    retried = {FailureKind.CONFLICT, FailureKind.RATE_LIMITED, FailureKind.SERVER}
    retried.add(FailureKind.MALFORMED)
    assert Failure(kind, "x", 400).retryable is kind.retryable is (kind in retried)


@pytest.mark.parametrize(
    "field", ["max_elapsed", "base_delay", "max_delay", "attempt_timeout", "offline_growth"]
)
def test_every_duration_of_the_policy_must_be_positive(field: str) -> None:
    endless = field == "max_elapsed"  # no deadline: the refresh tries until max_attempts
    message = f"^{field} must be positive{'' if endless else ' and finite'}$"
    for bad in (0.0, -1.0, math.nan):  # NaN passed "<= 0" and poisoned every wait
        with pytest.raises(ValueError, match=message):
            tj.RetryPolicy(**{field: bad})
    if endless:
        assert tj.RetryPolicy(max_elapsed=math.inf).max_elapsed == math.inf
    else:  # a pause that never ends
        with pytest.raises(ValueError, match=message):
            tj.RetryPolicy(**{field: math.inf})
    tj.RetryPolicy(max_attempts=1)


def test_the_fleet_policy_is_the_default_with_longer_offline_pauses() -> None:
    fleet, default = tj.RetryPolicy.fleet(), tj.RetryPolicy()
    assert (fleet.max_delay, fleet.offline_growth) == (90.0, 40.0)
    assert default.offline_growth == 3.0
    assert dataclasses.replace(fleet, max_delay=default.max_delay, offline_growth=3.0) == default


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"access_token": "", "refresh_token": "r"}, "TokenSet.access_token must be"),
        ({"access_token": "a", "refresh_token": ""}, "TokenSet.refresh_token must be"),
        ({"access_token": "a", "refresh_token": "r", "token_type": ""}, "TokenSet.token_type"),
        ({"access_token": "a", "refresh_token": None, "expires_at": 1.0}, "TokenSet.expires_at"),
        ({"access_token": "a", "refresh_token": "r", "id_token": ""}, "TokenSet.id_token must be"),
        ({"access_token": "a", "refresh_token": "r", "id_token": 7}, "TokenSet.id_token must be"),
    ],
)
def test_a_rejected_tokenset_names_the_field(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match="^" + message.replace(".", r"\.")):
        tj.TokenSet(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^NaN is not a time$"):
        to_datetime(math.nan)
    with pytest.raises(ValueError, match=r"^max_attempts must be at least 1$"):
        tj.RetryPolicy(max_attempts=0)


def test_repr_fingerprints_the_refresh_token_too() -> None:
    assert f"refresh={tj.fingerprint('refresh-secret')}," in repr(pair())


# ----------------------------------------------------------------------------- the retry loop


class Pauses:
    """The loop's pause: records each wait; answers ``open`` (False: the owner closed)."""

    def __init__(self, clock: list[float], open_: bool = True) -> None:
        self.clock, self.open, self.waits = clock, open_, []  # type: list[float]

    async def __call__(self, seconds: float) -> bool:
        self.waits.append(seconds)
        self.clock[0] += seconds
        return self.open


RATE = Failure(FailureKind.RATE_LIMITED, "rate_limited", 429, retry_after=7.0)
DOWN = Failure(FailureKind.SERVER, "server_error", 503)


async def _run(policy: tj.RetryPolicy, failures: list[Failure | None], pause: Pauses) -> int:
    tries = 0
    loop = attempts(policy, lambda: pause.clock[0], pause, what="refresh")
    async for attempt in loop:
        tries += 1
        if tries > len(failures):
            return tries
        failure = failures[tries - 1]
        attempt.failed(failure, failure.code if failure else "ClientConnectionError")
    raise AssertionError("unreachable")


async def test_the_loop_retries_until_an_answer_waiting_what_the_policy_says() -> None:
    pause = Pauses([0.0])
    assert await _run(tj.RetryPolicy(), [RATE, None], pause) == 3
    assert pause.waits[0] == 7.0  # Retry-After honoured
    assert 0 <= pause.waits[1] <= tj.RetryPolicy().base_delay * 2


async def test_a_spent_budget_raises_for_the_last_failure() -> None:
    pause = Pauses([0.0])
    with pytest.raises(tj.ServerError, match="server_error"):
        await _run(tj.RetryPolicy(max_attempts=2), [RATE, DOWN, DOWN], pause)
    assert len(pause.waits) == 1
    with pytest.raises(tj.RateLimited) as limited:  # max_elapsed: 7 s would pass 5 s
        await _run(tj.RetryPolicy(max_elapsed=5.0), [RATE], Pauses([0.0]))
    assert limited.value.retry_after == 7.0
    with pytest.raises(tj.NetworkError, match="ClientConnectionError"):
        await _run(tj.RetryPolicy(max_attempts=1), [None], Pauses([0.0]))


async def test_a_close_during_the_wait_raises_for_the_last_failure_at_once() -> None:
    pause = Pauses([0.0], open_=False)
    with pytest.raises(tj.RateLimited, match="rate limiting") as raised:
        await _run(tj.RetryPolicy(), [RATE, RATE], pause)
    assert raised.value.retry_after == 7.0 and len(pause.waits) == 1
    with pytest.raises(tj.NetworkError, match="ClientConnectionError; closed meanwhile"):
        await _run(tj.RetryPolicy(), [None, None], Pauses([0.0], open_=False))


async def test_each_retry_is_logged_with_what_failed_and_the_wait(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("INFO", logger="tokenjournal"):
        await _run(tj.RetryPolicy(), [RATE], Pauses([0.0]))
    assert "refresh failed (rate_limited); try 2 again in 7.00s" in caplog.messages


async def test_the_loop_paces_inside_the_grace_window_and_may_use_its_whole_budget(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pause = Pauses([0.0])
    loop = attempts(tj.RetryPolicy(), lambda: pause.clock[0], pause, grace_deadline=5.0)
    with caplog.at_level("INFO", logger="tokenjournal"):
        async for attempt in loop:
            if attempt.number == 2:
                break
            attempt.failed(RATE, "rate_limited")
    # Retry-After asked for 7 s; the window (5 s, less the guard) allows half of what is left.
    assert pause.waits == [(5.0 - GRACE_GUARD) * 0.5]
    assert "auth call failed (rate_limited); try 2 again in 2.00s" in caplog.messages
    # A wait that ends exactly at max_elapsed is still inside the budget.
    assert await _run(tj.RetryPolicy(max_elapsed=7.0), [RATE], Pauses([0.0])) == 2


def test_a_malformed_answer_spends_the_budget_as_a_protocol_error() -> None:
    malformed = Failure(FailureKind.MALFORMED, "malformed_body", 200)
    error = transient_error(malformed, "malformed_body")
    assert isinstance(error, tj.ProtocolError)
    assert str(error) == "the auth server answered 200 with a malformed body"
    # What was wrong goes with it: the caller of a device sign-in used to see only the above.
    why = Failure(FailureKind.MALFORMED, "malformed_body", 200, "expires_in is required")
    assert str(transient_error(why, "malformed_body")) == (
        "the auth server answered 200 with a malformed body: expires_in is required"
    )


def test_without_jitter_the_delay_is_the_bare_curve() -> None:
    """``jitter=False`` (device polling, where RFC 8628 fixes the pace): no random draw."""
    policy = tj.RetryPolicy(base_delay=10.0, max_delay=65.0, jitter=False)
    assert [policy.backoff_delay(n, rng=lambda: 0.0) for n in (1, 2, 3, 4)] == [10, 20, 40, 65]
    jittered = tj.RetryPolicy(base_delay=10.0, max_delay=65.0)
    assert [jittered.backoff_delay(n, rng=lambda: 0.5) for n in (1, 2, 3, 4)] == [5, 10, 20, 32.5]
