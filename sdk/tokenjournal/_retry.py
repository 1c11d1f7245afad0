"""Retry policy: how long to wait before the next try, and when to stop. Pure; no I/O.

The delay curve comes from ``backoff`` (exponential, full jitter). On top of it the SDK
honours ``Retry-After``, waits ~1 s on ``rotation_in_progress``, and paces the tries of a
refresh whose token may already have been rotated so that they land inside the server's
grace window (intent start + grace period) instead of following a blind curve past it
(docs/architecture.md 1.4 and 3.3).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import backoff

from ._protocols import Failure, FailureKind

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

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        for name in ("max_elapsed", "base_delay", "max_delay", "attempt_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")

    def backoff_delay(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        """The full-jitter delay after ``attempt`` (1-based) failed tries, from ``backoff``."""
        curve = backoff.expo(base=2, factor=self.base_delay, max_value=self.max_delay)
        next(curve)  # backoff's generators yield once before the first real value
        value = next(itertools.islice(curve, max(0, attempt - 1), None))
        # Full jitter as backoff.full_jitter computes it, with the draw injectable for tests.
        return value * rng()

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


#: Failure kinds worth another try with the same token.
RETRYABLE: Final = frozenset(
    {FailureKind.CONFLICT, FailureKind.RATE_LIMITED, FailureKind.SERVER, FailureKind.MALFORMED}
)


def is_retryable(failure: Failure) -> bool:
    """Whether a classified failure is transient (docs/architecture.md 3.3)."""
    return failure.kind in RETRYABLE
