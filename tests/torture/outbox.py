"""Phase 6: the durable outbox under crashes, SIGKILLs and network faults (issue 13).

Two parts, both against the reference server's ``POST /api/readings``, which honours
``Idempotency-Key`` and counts items applied, keys seen twice and readings applied twice:

1. Crash points of a delivery (``before_send``, ``after_send``, ``after_answer``,
   ``before_settle``): a worker armed at the point enqueues three readings and dies
   delivering the first; a fresh worker on the same journal delivers. Every reading the
   dead worker acknowledged arrives once; the dead worker's request, if it reached the
   server, comes back with its key and is answered from the first answer.
2. Random SIGKILLs: ``slots`` workers on ``journals`` shared journals enqueue a reading every
   few milliseconds and deliver all along, through a :class:`~tests.torture.proxy.FaultProxy`
   and the server's API faults (5xx, 429 with Retry-After, lost answers, slow answers, and
   now and then a 422 refusal), killed at a random moment and restarted; some starts are
   armed at a delivery crash point. A last clean worker per journal drains it.

Counted (:class:`OutboxFigures`): readings enqueued (acknowledged: ``enqueue`` returned),
delivered, lost (acknowledged, neither applied nor a dead letter: must be 0), applied twice
(must be 0), dead letters, dead letters the server did not refuse (must be 0), items left
pending after the final drain (must be 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

from tokenjournal._faults import OUTBOX_POINTS
from tokenjournal.server import ReferenceServer, ServerConfig

from . import journals
from .procs import CRASHED, KILLED, Worker, spawn
from .proxy import FaultProxy, Mode

MODULE: Final = "tests.torture.outboxworker"
#: Faults of ``POST /api/readings`` the chaos task injects, one at a time.
API_FAULTS: Final[tuple[dict[str, Any], ...]] = (
    {"kind": "status", "status": 503, "count": 3},
    {"kind": "status", "status": 500},
    {"kind": "status", "status": 429, "retry_after": 1},
    {"kind": "drop_after_commit", "count": 2},
    {"kind": "delay_before", "seconds": 0.3, "count": 2},
    {"kind": "status", "status": 422},  # a refusal: one dead letter (if the answer arrives)
)
PROXY_BURSTS: Final[tuple[Mode, ...]] = (
    "stall",
    "reset",
    "reset_after",
    "truncate",
    "blackhole",
    "blackhole_after",
)
#: After the crash, before recovery: requests the server has seen from the dead worker.
_REACHED: Final = {"before_send": 0, "after_send": 1, "after_answer": 1, "before_settle": 1}


@dataclass
class OutboxOptions:
    """How hard phase 6 pushes."""

    kills: int = 300
    crash_rounds: int = 2
    slots: int = 3
    journals: int = 2
    max_life: float = 2.0
    arm_probability: float = 0.2
    chaos: bool = True
    seed: int = 0


@dataclass
class OutboxFigures:
    """What phase 6 counted (both parts)."""

    crash_rounds: int = 0
    crash_failures: list[str] = field(default_factory=list)
    crashes: dict[str, int] = field(default_factory=dict)
    kills: int = 0
    starts: int = 0
    enqueued: int = 0
    delivered: int = 0
    lost: int = 0
    applied_twice: int = 0
    keys_seen_twice: int = 0
    dead: int = 0
    refused: int = 0
    pending_after_drain: int = 0
    fatal: int = 0
    fatal_details: list[dict[str, Any]] = field(default_factory=list)
    lost_uids: list[str] = field(default_factory=list)
    api_faults: int = 0
    proxy_faults: int = 0
    seconds: float = 0.0

    @property
    def dead_not_refused(self) -> int:
        """Dead letters the server never refused (each refusal makes at most one)."""
        return max(0, self.dead - self.refused)

    def must_be_zero(self) -> dict[str, int]:
        """The rows a passing run has at zero."""
        return {
            "outbox crash points not recovered": len(self.crash_failures),
            "outbox readings lost": self.lost,
            "outbox readings applied twice": self.applied_twice,
            "outbox dead letters the server did not refuse": self.dead_not_refused,
            "outbox items left after the final drain": self.pending_after_drain,
            "outbox workers that failed": self.fatal,
        }


def _journal_items(path: Path) -> tuple[list[str], int]:
    """(uids of the dead letters, pending items) of a journal, read without writing."""
    uri = path.absolute().as_uri() + "?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db, db:
        dead = [json.loads(r[0])["uid"] for r in db.execute("SELECT body FROM outbox WHERE dead")]
        pending = int(db.execute("SELECT count(*) FROM outbox WHERE dead = 0").fetchone()[0])
    return dead, pending


def _acknowledged(worker: Worker) -> list[str]:
    return [str(e["uid"]) for e in worker.all("enqueued")]


async def _wait_applied(server: ReferenceServer, count: int, timeout: float = 5.0) -> int:
    """The server handles a dead worker's last request in this loop: give it a moment."""
    deadline = time.monotonic() + timeout
    while server.stats()["items_applied"] < count and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return server.stats()["items_applied"]


async def crash_round(
    server: ReferenceServer, workdir: Path, point: str, index: int, stderr: IO[bytes] | None
) -> list[str]:
    """One delivery crash point; returns the problems (none: recovered as it must)."""
    problems: list[str] = []
    journal = workdir / f"outbox-crash-{point}-{index}.db"
    await journals.sign_in(server.url, journal)
    base = server.stats()
    tag = f"c{index}{point}"
    extra = ("--mode", "once", "--count", "3", "--tag", tag)
    dying = await spawn(
        server.url, journal, "once", crash_at=point, stderr=stderr, module=MODULE, extra=extra
    )
    code = await dying.wait(60)
    if code != CRASHED:
        problems.append(f"the armed worker exited {code}, not at {point}")
    acked = _acknowledged(dying)
    reached = await _wait_applied(server, base["items_applied"] + _REACHED[point])
    if reached - base["items_applied"] != _REACHED[point]:
        problems.append(f"{reached - base['items_applied']} applied before recovery")
    _, pending = _journal_items(journal)
    if pending < len(acked):
        problems.append(f"{pending} items pending for {len(acked)} acknowledged")
    fresh = await spawn(
        server.url, journal, "drain", stderr=stderr, module=MODULE, extra=("--mode", "drain")
    )
    if await fresh.wait(90) != 0 or fresh.first("drained") is None:
        problems.append(f"the fresh worker did not drain: {fresh.events[-2:]}")
    applied = [r["body"]["uid"] for r in server.readings() if r["body"]["uid"].startswith(tag)]
    if sorted(set(acked) - set(applied)):
        problems.append(f"lost: {sorted(set(acked) - set(applied))}")
    if len(applied) != len(set(applied)) or server.stats()["items_applied_twice"]:
        problems.append("a reading was applied twice")
    twice = server.stats()["keys_seen_twice"] - base["keys_seen_twice"]
    if twice != _REACHED[point]:
        problems.append(f"keys seen twice {twice}, expected {_REACHED[point]}")
    if dying.all("fatal") or fresh.all("fatal"):
        problems.append("an exception escaped the SDK")
    return problems


class OutboxPhase:
    """Runs phase 6; :meth:`run` returns the figures."""

    def __init__(
        self, options: OutboxOptions, workdir: Path, stderr: IO[bytes] | None = None
    ) -> None:
        self.opt = options
        self.workdir = workdir
        self.stderr = stderr
        self.rng = random.Random(options.seed)
        self.fig = OutboxFigures()
        self.acked: set[str] = set()
        self.server: ReferenceServer | None = None
        self.proxy: FaultProxy | None = None

    async def run(self) -> OutboxFigures:
        """Crash points, then random kills, then the final drain and the count."""
        began = time.monotonic()
        fig = self.fig
        async with ReferenceServer(ServerConfig(test_mode=True, access_ttl=5.0)) as server:
            self.server = server
            for index in range(self.opt.crash_rounds):
                for point in OUTBOX_POINTS:
                    problems = await crash_round(server, self.workdir, point, index, self.stderr)
                    fig.crash_rounds += 1
                    fig.crashes[point] = fig.crashes.get(point, 0) + 1
                    fig.crash_failures += [f"{point}: {p}" for p in problems]
            if self.opt.kills:
                await self._kills(server)
            stats = server.stats()
            applied = [str(r["body"].get("uid")) for r in server.readings()]
        fig.applied_twice = stats["items_applied_twice"]
        fig.keys_seen_twice = stats["keys_seen_twice"]
        fig.refused = stats["items_refused"]
        fig.api_faults = stats["faults_injected"]
        dead_uids: set[str] = set()
        for path in sorted(self.workdir.glob("outbox-kill-*.db")):
            dead, pending = _journal_items(path)
            dead_uids.update(dead)
            fig.pending_after_drain += pending
        fig.dead = len(dead_uids)
        fig.enqueued = len(self.acked)
        fig.delivered = len(self.acked & set(applied))
        lost = self.acked - set(applied) - dead_uids
        fig.lost = len(lost)
        fig.lost_uids = sorted(lost)[:20]
        if self.proxy is not None:
            fig.proxy_faults = sum(v for k, v in self.proxy.counts.items() if k != "pass")
        fig.seconds = time.monotonic() - began
        return fig

    async def _kills(self, server: ReferenceServer) -> None:
        paths = [self.workdir / f"outbox-kill-{i}.db" for i in range(self.opt.journals)]
        for path in paths:
            await journals.sign_in(server.url, path)
        url = server.url
        if self.opt.chaos:
            self.proxy = FaultProxy(server.port, stall_seconds=0.8, truncate_at=60)
            await self.proxy.start()
            url = self.proxy.url
        try:
            slots = [
                asyncio.ensure_future(self._slot(i, paths[i % len(paths)], url))
                for i in range(self.opt.slots)
            ]
            chaos = asyncio.ensure_future(self._chaos()) if self.opt.chaos else None
            await asyncio.gather(*slots)
            if chaos is not None:
                chaos.cancel()
                await asyncio.gather(chaos, return_exceptions=True)
            server.set_api_faults([])
            server.set_faults([])
            if self.proxy is not None:
                self.proxy.clear()  # a burst the cancelled chaos task left on ends here
            for index, path in enumerate(paths):
                # The final drain, on a clean network. Through the same URL as the items
                # (the proxy's): the bearer goes only to that origin.
                extra = ("--mode", "drain", *(("--unordered",) if index % 2 else ()))
                final = await spawn(
                    url, path, "drain", stderr=self.stderr, module=MODULE, extra=extra
                )
                if await final.wait(180) != 0:
                    self.fig.fatal += 1
                    self.fig.fatal_details.append({"final": path.name, "events": final.events[-3:]})
        finally:
            if self.proxy is not None:
                await self.proxy.close()

    async def _slot(self, slot: int, journal: Path, url: str) -> None:
        start = 0
        while self.fig.kills < self.opt.kills:
            point = None
            if self.rng.random() < self.opt.arm_probability:
                point = self.rng.choice(OUTBOX_POINTS)
            tag = f"s{slot}r{start}"
            start += 1
            unordered = journal.name.endswith("1.db")  # one journal each way
            extra = ("--mode", "loop", "--tag", tag, *(("--unordered",) if unordered else ()))
            worker = await spawn(
                url, journal, "loop", crash_at=point, stderr=self.stderr, module=MODULE, extra=extra
            )
            self.fig.starts += 1
            await worker.started()
            await asyncio.sleep(self.rng.uniform(0.0, self.opt.max_life))
            worker.kill()
            code = await worker.wait(30)
            if code == KILLED:
                self.fig.kills += 1
            elif code == CRASHED and worker.crash_at:
                self.fig.crashes[worker.crash_at] = self.fig.crashes.get(worker.crash_at, 0) + 1
            elif code != 0:
                self.fig.fatal += 1
                self.fig.fatal_details.append({"exit": code, "events": worker.events[-3:]})
            if worker.all("fatal"):
                self.fig.fatal_details.extend(worker.all("fatal"))
            self.acked.update(_acknowledged(worker))

    async def _chaos(self) -> None:
        assert self.server is not None and self.proxy is not None
        while True:
            await asyncio.sleep(self.rng.uniform(0.3, 1.5))
            if self.rng.random() < 0.6:
                self.server.set_api_faults([dict(self.rng.choice(API_FAULTS))])
            else:
                self.proxy.mode = self.rng.choice(PROXY_BURSTS)
                await asyncio.sleep(self.rng.uniform(0.1, 0.8))
                self.proxy.mode = "pass"
