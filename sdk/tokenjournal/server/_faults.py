"""Scripted faults for the refresh endpoints (test mode)."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

FaultKind = Literal[
    "status",
    "delay_before",
    "delay_after",
    "drop_after_commit",
    "rotation_in_progress",
    "truncated",
    "invalid_json",
]

FAULT_KINDS: Final[frozenset[str]] = frozenset(
    {
        "status",
        "delay_before",
        "delay_after",
        "drop_after_commit",
        "rotation_in_progress",
        "truncated",
        "invalid_json",
    }
)
# Long delays would only hang a test run; nothing in the protocol needs more than this.
MAX_DELAY: Final = 60.0
MAX_COUNT: Final = 10_000


@dataclass(frozen=True, slots=True)
class Fault:
    """One scripted misbehaviour, applied to a single refresh call."""

    kind: FaultKind
    status: int = 0
    retry_after: int | None = None
    seconds: float = 0.0


def _int(spec: Mapping[str, Any], key: str, default: int | None) -> int | None:
    value = spec.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"fault field {key!r} must be an integer")
    return value


def parse_fault(spec: object) -> tuple[Fault, int]:
    """Validate one fault dict; return the fault and how many calls it applies to.

    Raises `ValueError` with a readable message for anything malformed, so a typo in a test
    script fails loudly instead of silently injecting nothing.
    """
    if not isinstance(spec, Mapping):
        raise ValueError("each fault must be an object")
    kind = spec.get("kind")
    if not isinstance(kind, str) or kind not in FAULT_KINDS:
        raise ValueError(f"unknown fault kind {kind!r}; expected one of {sorted(FAULT_KINDS)}")
    allowed = {"kind", "count"}
    count = _int(spec, "count", 1)
    if count is None or not 1 <= count <= MAX_COUNT:
        raise ValueError(f"fault count must be between 1 and {MAX_COUNT}")
    if kind == "status":
        allowed |= {"status", "retry_after"}
        status = _int(spec, "status", None)
        if status is None or not 400 <= status <= 599:
            raise ValueError("a status fault needs 'status' between 400 and 599")
        retry_after = _int(spec, "retry_after", None)
        if retry_after is not None and retry_after < 0:
            raise ValueError("retry_after must be >= 0")
        fault = Fault("status", status=status, retry_after=retry_after)
    elif kind in ("delay_before", "delay_after"):
        allowed |= {"seconds"}
        seconds = spec.get("seconds")
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            raise ValueError(f"a {kind} fault needs numeric 'seconds'")
        if not math.isfinite(seconds) or not 0 <= seconds <= MAX_DELAY:
            raise ValueError(f"'seconds' must be between 0 and {MAX_DELAY}")
        fault = Fault(kind, seconds=float(seconds))  # type: ignore[arg-type]
    else:
        fault = Fault(kind)  # type: ignore[arg-type]
    extra = set(spec) - allowed
    if extra:
        raise ValueError(f"unexpected fault fields for {kind!r}: {sorted(map(str, extra))}")
    return fault, count


class FaultScript:
    """An ordered queue of faults; each refresh call takes the next one, if any."""

    __slots__ = ("_queue",)

    def __init__(self) -> None:
        self._queue: deque[list[Any]] = deque()

    def replace(self, specs: Iterable[object]) -> None:
        """Validate every spec first, then swap the script atomically (all or nothing)."""
        parsed = [parse_fault(spec) for spec in specs]
        self._queue = deque([fault, count] for fault, count in parsed)

    def clear(self) -> None:
        """Drop every pending fault."""
        self._queue.clear()

    def take(self) -> Fault | None:
        """Consume one application of the head fault, or return None when the script is empty."""
        if not self._queue:
            return None
        head = self._queue[0]
        fault: Fault = head[0]
        head[1] -= 1
        if head[1] <= 0:
            self._queue.popleft()
        return fault

    def pending(self) -> int:
        """How many fault applications remain."""
        return sum(int(count) for _, count in self._queue)
