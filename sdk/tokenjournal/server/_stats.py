"""Counters the tests read to prove what the server did."""

from __future__ import annotations

from typing import Final

COUNTERS: Final[tuple[str, ...]] = (
    "signins",
    "refresh_requests",
    "rotations",
    "grace_replays",
    "reuse_detections",
    "family_revocations",
    "api_200",
    "api_401",
    "faults_injected",
    "logouts",
    "device_authorizations",
    # POST /api/readings (the outbox's proof): items applied, requests whose
    # Idempotency-Key was seen before (answered from the first answer, not applied again),
    # and readings applied twice (one `uid` applied under two keys: must stay 0).
    "items_applied",
    "keys_seen_twice",
    "items_applied_twice",
    # Scripted refusals (a 4xx fault other than 401/408/409/425/429): what may become a
    # dead letter, so a torture run can tell a dead letter the server asked for.
    "items_refused",
)


class Stats:
    """In-process counters (they restart at zero with the server, unlike the token store)."""

    __slots__ = ("_values",)

    def __init__(self) -> None:
        self._values: dict[str, int] = dict.fromkeys(COUNTERS, 0)

    def incr(self, name: str, by: int = 1) -> None:
        """Add `by` to one counter; an unknown name is a programming error."""
        if name not in self._values:
            raise KeyError(name)
        self._values[name] += by

    def snapshot(self) -> dict[str, int]:
        """A copy of every counter."""
        return dict(self._values)

    def reset(self) -> None:
        """Zero every counter."""
        self._values = dict.fromkeys(COUNTERS, 0)
