"""Retry policy and the one retry loop: how long to wait before the next try, when to stop,
and which exception says so. The policy is pure; the loop waits through an injected pause.

The delay curve comes from ``backoff`` (exponential, full jitter). On top of it the SDK
honours ``Retry-After``, waits ~1 s on ``rotation_in_progress``, and paces the tries of a
refresh whose token may already have been rotated so that they land inside the server's
grace window (intent start + grace period) instead of following a blind curve past it
(docs/architecture.md 1.4 and 3.3).
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import backoff

from ._errors import NetworkError, ProtocolError, RateLimited, ServerError, TransientError
from ._tokens import Failure, FailureKind

log = logging.getLogger("tokenjournal")

#: Each try inside the grace window leaves at least this share of what remains for the next.
GRACE_SHARE: Final = 0.5
#: Never plan a try closer than this to the grace deadline: the request itself takes time.
GRACE_GUARD: Final = 1.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How hard one refresh tries before it raises a :class:`TransientError`.

    ``max_attempts`` and ``max_elapsed`` bound a refresh; the next call (or the next start)
    tries again with the same journaled intent, so giving up never loses the session.
    """

    max_attempts: int = 6
    max_elapsed: float = 60.0
    base_delay: float = 0.5
    max_delay: float = 30.0
    attempt_timeout: float = 15.0
    #: Full jitter on the backoff curve (spreads a fleet's retries); ``False`` gives the bare
    #: curve, for waits a standard fixes (RFC 8628 device polling).
    jitter: bool = True
    #: After a refresh ran out of tries, the next waits a random share of up to
    #: ``offline_growth`` x the time offline so far (at least ``max_delay``, at most 10 x it):
    #: 3 notices the end of a short outage within a minute or two. A fleet that must spare its
    #: server after long outages grows faster: see :meth:`fleet` (docs/fleet.md).
    offline_growth: float = 3.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        for name in ("max_elapsed", "base_delay", "max_delay", "attempt_timeout", "offline_growth"):
            value = getattr(self, name)
            # NaN passes "<= 0" and would poison every wait; an infinite pause never ends.
            # No deadline is fine: the refresh then tries until max_attempts.
            endless = name == "max_elapsed"
            if not value > 0 or (value == math.inf and not endless):
                raise ValueError(f"{name} must be positive" + ("" if endless else " and finite"))

    @classmethod
    def fleet(cls) -> RetryPolicy:
        """Pacing for a fleet that must spare its auth server after a long outage.

        Measured with 10,000 devices (docs/fleet.md): the requests at the server's return
        after a 10-minute outage peak at 2.8 x the steady refresh rate, where the default
        reads 4.6 x. The price: a device whose token lapsed while the server was away waits
        about six minutes on average after its return (p99 14; the default: two, p99 five),
        after a short outage as after a long one, alone or in a fleet, since from its second
        failed try on it pauses a random 30 s to 15 minutes. Everything else is the default.
        """
        return cls(max_delay=90.0, offline_growth=40.0)

    def backoff_delay(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        """The delay after ``attempt`` (1-based) failed tries, from ``backoff`` (full jitter
        unless ``jitter`` is off)."""
        curve = backoff.expo(base=2, factor=self.base_delay, max_value=self.max_delay)
        next(curve)  # backoff's generators yield once before the first real value
        value = next(itertools.islice(curve, max(0, attempt - 1), None))
        # Full jitter as backoff.full_jitter computes it, with the draw injectable for tests.
        return value * rng() if self.jitter else value

    def delay(
        self,
        attempt: int,
        failure: Failure | None,
        *,
        now: float,
        grace_deadline: float | None,
        rng: Callable[[], float] = random.random,
    ) -> float:
        """Seconds to wait before the next try. ``failure`` is ``None`` for a network error.

        Retry-After (or ~1 s on a conflict) is honoured; otherwise backoff with full jitter.
        While the grace deadline is ahead, the delay never spends more than half of what is
        left of it, so another try still fits inside the window.
        """
        if failure is not None and failure.retry_after is not None:
            wait = failure.retry_after
        else:
            wait = self.backoff_delay(attempt, rng)
        if grace_deadline is not None:
            left = grace_deadline - now - GRACE_GUARD
            if left > 0:
                wait = min(wait, left * GRACE_SHARE)
        return max(0.0, wait)


def transient_error(failure: Failure | None, detail: str) -> TransientError | ProtocolError:
    """The exception a spent retry budget raises; ``failure`` is ``None`` for no answer."""
    if failure is None:
        return NetworkError(f"the auth server could not be reached: {detail}")
    if failure.kind is FailureKind.RATE_LIMITED:
        return RateLimited(
            f"the auth server keeps rate limiting ({failure.status})", failure.retry_after
        )
    if failure.kind is FailureKind.MALFORMED:
        # The message says what was wrong ("expires_in is required"), never a token.
        why = f": {failure.message}" if failure.message else ""
        return ProtocolError(
            f"the auth server answered {failure.status} with a malformed body{why}"
        )
    return ServerError(
        f"the auth server keeps failing: {failure.code} ({failure.status})", failure.retry_after
    )


@dataclass(slots=True)
class Attempt:
    """One try of :func:`attempts`; the caller records why it failed before the next."""

    number: int
    failure: Failure | None = None
    detail: str = ""

    def failed(self, failure: Failure | None, detail: str) -> None:
        """This try got ``failure`` (``None``: no answer at all), described by ``detail``."""
        self.failure, self.detail = failure, detail


async def attempts(
    policy: RetryPolicy,
    monotonic: Callable[[], float],
    pause: Callable[[float], Awaitable[bool]],
    *,
    grace_deadline: float | None = None,
    what: str = "auth call",
) -> AsyncIterator[Attempt]:
    """The one retry loop: refresh, sign-in, sign-out and device authorization all use it.

    ``async for attempt in attempts(...)``: make one try; return on success or a final
    answer, else ``attempt.failed(...)`` and go round. Between tries it waits what
    :meth:`RetryPolicy.delay` says (``grace_deadline`` on the ``monotonic`` clock) through
    ``pause``, which returns ``False`` when the owner closed. When the budget is spent, or
    the owner closed, the loop raises :func:`transient_error` for the last failure.
    """
    started = monotonic()
    number = 0
    while True:
        number += 1
        attempt = Attempt(number)
        yield attempt
        now = monotonic()
        delay = policy.delay(number, attempt.failure, now=now, grace_deadline=grace_deadline)
        if number >= policy.max_attempts or now - started + delay > policy.max_elapsed:
            raise transient_error(attempt.failure, attempt.detail)
        log.info("%s failed (%s); try %d again in %.2fs", what, attempt.detail, number + 1, delay)
        if not await pause(delay):
            raise transient_error(attempt.failure, f"{attempt.detail}; closed meanwhile")
