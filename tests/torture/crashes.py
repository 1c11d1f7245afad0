"""Phase 1: every named crash point, one deterministic round at a time.

A round: the driver signs in on a fresh journal; a worker armed at the point forces a
refresh (or a sign-out) and dies there (exit 137); the driver checks what the dead process
left in the journal and on the server; a fresh worker on the same journal must recover:

* ``before_intent``   nothing journaled: the old pair is still current, no refresh needed
* ``after_intent``    intent durable, nothing sent: the replay is a plain rotation
* ``after_send``      the server rotated, no answer read: the replay is a grace replay
* ``after_response``  the pair arrived, not committed: the replay is a grace replay
* ``after_commit``    the new pair is already in the journal: nothing to replay
* ``mid_sign_out``    sign-out journaled, server not told: the next start finishes it

and in every case no new sign-in, no family revocation, server rotations equal committed
refreshes. The server keeps a long access TTL here so nothing refreshes by accident and the
counts are exact.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final

from tokenjournal._faults import SESSION_POINTS as CRASH_POINTS
from tokenjournal.server import ReferenceServer

from . import journals
from .procs import CRASHED, spawn

REFRESH_POINTS: Final = tuple(p for p in CRASH_POINTS if p != "mid_sign_out")
#: Server-side effect of the crashed refresh, before recovery: (rotations, requests).
_SEEN_BY_SERVER: Final = {
    "before_intent": 0,
    "after_intent": 0,
    "after_send": 1,
    "after_response": 1,
    "after_commit": 1,
}
#: After recovery: (rotations, grace replays) in total for the round.
_AFTER_RECOVERY: Final = {
    "before_intent": (0, 0),
    "after_intent": (1, 0),
    "after_send": (1, 1),
    "after_response": (1, 1),
    "after_commit": (1, 0),
}


@dataclass
class CrashOutcome:
    """One round at one point."""

    point: str
    crashed: bool
    recovered: bool
    problems: list[str] = field(default_factory=list)
    recovery_seconds: float | None = None


async def _wait_for(server: ReferenceServer, key: str, value: int, timeout: float = 5.0) -> int:
    """The server handles the dead worker's request in this loop: give it a moment."""
    deadline = time.monotonic() + timeout
    while server.stats()[key] < value and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return server.stats()[key]


async def crash_round(
    server: ReferenceServer,
    workdir: Path,
    point: str,
    index: int = 0,
    stderr: IO[bytes] | None = None,
) -> CrashOutcome:
    """Crash a worker at ``point`` and check that a fresh worker recovers (see module doc)."""
    if point not in CRASH_POINTS:
        raise ValueError(f"unknown crash point {point!r}")
    problems: list[str] = []
    journal = workdir / f"crash-{point}-{index}.db"
    await journals.sign_in(server.url, journal)
    start = await journals.read(journal)
    base = server.stats()

    def delta(key: str) -> int:
        return server.stats()[key] - base[key]

    mode = "sign_out" if point == "mid_sign_out" else "refresh"
    dying = await spawn(server.url, journal, mode, crash_at=point, stderr=stderr)
    code = await dying.wait(60)
    crashed = code == CRASHED
    if not crashed:
        problems.append(f"the armed worker exited {code}, not at the crash point")

    # What the dead process left behind.
    left = await journals.read(journal)
    if point == "mid_sign_out":
        if left.intent is None or left.intent.kind != "sign_out":
            problems.append("no sign-out intent after dying mid sign-out")
        if left.tokens is None:
            problems.append("tokens gone before the server was told")
    else:
        seen = _SEEN_BY_SERVER[point]
        got = await _wait_for(server, "rotations", base["rotations"] + seen) - base["rotations"]
        if got != seen:
            problems.append(f"server rotations after the crash: {got}, expected {seen}")
        committed = point == "after_commit"
        if (left.generation == start.generation + 1) != committed:
            problems.append(f"journal generation {left.generation} (start {start.generation})")
        pending = point in ("after_intent", "after_send", "after_response")
        if (left.intent is not None) != pending:
            problems.append(f"intent {'missing' if pending else 'left behind'} after {point}")
        if left.tokens is None:
            problems.append("the journal lost the pair")

    fresh = await spawn(server.url, journal, "check", stderr=stderr)
    code = await fresh.wait(60)
    check = fresh.first("check")
    opened, ok = fresh.first("open"), fresh.first("check")
    recovery = ok["t"] - opened["t"] if ok and opened else None
    if check is None:
        problems.append(f"the fresh worker exited {code} without a summary")
    elif point == "mid_sign_out":
        if check["state"] != "signed_out" or check["intent"] is not None:
            problems.append(f"sign-out not finished: state {check['state']}")
        if delta("logouts") != 1:
            problems.append(f"server logouts {delta('logouts')}, expected 1")
    else:
        if check["state"] != "valid" or check["status"] != 200 or check["intent"] is not None:
            problems.append(
                f"session not recovered: state {check['state']}, GET {check['status']}, "
                f"intent {check['intent']}"
            )
        rotations, replays = _AFTER_RECOVERY[point]
        if (delta("rotations"), delta("grace_replays")) != (rotations, replays):
            problems.append(
                f"server rotations/replays {delta('rotations')}/{delta('grace_replays')}, "
                f"expected {rotations}/{replays}"
            )
        commits = check["generation"] - start.generation
        if commits != delta("rotations"):
            problems.append(f"{commits} committed refreshes for {delta('rotations')} rotations")
    if fresh.all("lost"):
        problems.append(f"session lost: {fresh.all('lost')[0].get('code')}")
    if delta("signins"):
        problems.append("a new sign-in happened")
    if delta("family_revocations"):
        problems.append("the token family was revoked")
    if fresh.all("fatal") or dying.all("fatal"):
        problems.append("an exception escaped the SDK")
    return CrashOutcome(point, crashed, crashed and not problems, problems, recovery)
