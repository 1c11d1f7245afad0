"""Phase 2: random SIGKILLs of workers that loop over authenticated requests.

``slots`` worker processes run ``GET /api/me`` through ``tm.client_session()`` against the
reference server (test mode, access TTL of a second or two, so a refresh is always near).
Slots share journals when there are more slots than journals, so the cross-process lease
is part of the test. The driver kills each worker at a random moment after its start and
restarts it; some starts are armed at a random refresh crash point instead. With ``chaos``
on, the workers talk through a :class:`~tests.torture.proxy.FaultProxy` and the driver keeps
injecting short network faults (proxy modes) and server faults (test-mode fault script), all
far shorter than the grace window.

What is counted (see :class:`KillFigures`):

* lost sessions: a worker saw ``SessionEnded`` / ``NotSignedIn``. Every restart here lands
  seconds after the kill, far inside the grace window, so each one is a loss inside the
  window (must be 0). The driver signs the journal in again to keep the run going.
* committed refreshes: from the journals' generations (each commit is +1; the driver's own
  sign-ins and any recorded end are taken out), not from event lines a SIGKILL can cut off.
* double rotations: server rotations minus committed refreshes, after a final recovery pass
  that lets every journal finish its pending intent.

With ``sealed`` the same phase runs on journals sealed with a random key (every worker gets
it through its environment), and after the final pass each journal's raw files
(``tokens.db``, ``-wal``, ``-shm``) are scanned for its current tokens (must be 0).
"""

from __future__ import annotations

import asyncio
import base64
import os
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

import tokenjournal as tj
from tokenjournal.server import ReferenceServer, ServerConfig

from . import journals
from .crashes import REFRESH_POINTS
from .procs import CRASHED, KILLED, Worker, spawn
from .proxy import FaultProxy, Mode

EXIT_LOST: Final = 3
EXIT_FATAL: Final = 4
EXIT_JOURNAL: Final = 5

#: Transient faults of the server's test mode, as the chaos task injects them.
SERVER_FAULTS: Final[tuple[dict[str, Any], ...]] = (
    {"kind": "status", "status": 500, "count": 2},
    {"kind": "status", "status": 503, "retry_after": 1},
    {"kind": "status", "status": 429, "retry_after": 1},
    {"kind": "status", "status": 400},
    {"kind": "rotation_in_progress", "count": 2},
    {"kind": "drop_after_commit"},
    {"kind": "truncated"},
    {"kind": "invalid_json"},
    {"kind": "delay_before", "seconds": 0.5},
    {"kind": "delay_after", "seconds": 0.5},
)
PROXY_BURSTS: Final[tuple[Mode, ...]] = (
    "stall",
    "reset",
    "reset_after",
    "truncate",
    "blackhole",
    "blackhole_after",
)


@dataclass
class KillOptions:
    """How hard phase 2 pushes."""

    kills: int = 1000
    slots: int = 4
    journals: int = 3
    access_ttl: float = 2.0
    arm_probability: float = 0.2
    max_life: float = 2.5
    aimed: float = 0.5
    chaos: bool = True
    seed: int = 0
    #: Seal every journal (a random key): the phase's sealed pass.
    sealed: bool = False


@dataclass
class KillFigures:
    """What phase 2 counted."""

    kills: int = 0
    aimed_kills: int = 0
    restarts: int = 0
    starts: int = 0
    crashes: Counter[str] = field(default_factory=Counter)
    lost_inside: int = 0
    lost_outside: int = 0
    lost_details: list[dict[str, Any]] = field(default_factory=list)
    fatal: int = 0
    unexpected_exits: int = 0
    fatal_details: list[dict[str, Any]] = field(default_factory=list)
    worker_errors: Counter[str] = field(default_factory=Counter)
    rotations: int = 0
    grace_replays: int = 0
    committed: int = 0
    refreshed_lines: int = 0
    family_revocations: int = 0
    reuse_detections: int = 0
    api_200: int = 0
    resignins: int = 0
    server_faults: Counter[str] = field(default_factory=Counter)
    server_faults_applied: int = 0
    proxy_faults: Counter[str] = field(default_factory=Counter)
    recovery_sdk: list[float] = field(default_factory=list)
    recovery_restart: list[float] = field(default_factory=list)
    killed_before_first_200: int = 0
    final_check_failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    sealed: bool = False
    #: Sealed pass: current tokens found in plain bytes of a journal's files.
    readable_tokens: int = 0
    #: Sealed pass: journals whose final row was not sealed.
    unsealed_journals: int = 0

    @property
    def double_rotations(self) -> int:
        """Server rotations the clients never committed (or committed twice)."""
        return self.rotations - self.committed


def quantiles(values: list[float]) -> tuple[float | None, float | None]:
    """(median, p99) of ``values``; ``None`` when there are none."""
    if not values:
        return None, None
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return statistics.median(ordered), p99


class _Journal:
    """A journal's bookkeeping: generations that were not refreshes are taken out."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.segment_start = 0
        self.committed = 0
        self.lock = asyncio.Lock()  # one re-sign-in at a time when two slots share it


class KillPhase:
    """Runs phase 2; :meth:`run` returns the figures."""

    def __init__(
        self, options: KillOptions, workdir: Path, stderr: IO[bytes] | None = None
    ) -> None:
        self.opt = options
        self.workdir = workdir
        self.stderr = stderr
        self.rng = random.Random(options.seed)
        self.fig = KillFigures()
        self.server: ReferenceServer | None = None
        self.proxy: FaultProxy | None = None
        self.journals: list[_Journal] = []
        key = os.urandom(32) if options.sealed else None
        self.seal = tj.Seal(key) if key is not None else None
        self.seal_key = base64.b64encode(key).decode() if key is not None else None
        self.fig.sealed = options.sealed

    @property
    def url(self) -> str:
        """Where workers connect: the proxy when chaos is on."""
        assert self.server is not None
        return self.proxy.url if self.proxy is not None else self.server.url

    async def run(self) -> KillFigures:
        """Sign in every journal, run the slots until enough kills, recover, count."""
        began = time.monotonic()
        config = ServerConfig(test_mode=True, access_ttl=self.opt.access_ttl)
        async with ReferenceServer(config) as server:
            self.server = server
            if self.opt.chaos:
                self.proxy = FaultProxy(server.port, stall_seconds=0.8, truncate_at=60)
                await self.proxy.start()
            try:
                name = "kill-sealed" if self.seal is not None else "kill"
                for i in range(self.opt.journals):
                    jr = _Journal(self.workdir / f"{name}-{i}.db")
                    jr.segment_start = await journals.sign_in(server.url, jr.path, seal=self.seal)
                    self.journals.append(jr)
                server.reset_stats()
                tasks = [
                    asyncio.ensure_future(self._slot(i, self.journals[i % len(self.journals)]))
                    for i in range(self.opt.slots)
                ]
                chaos = asyncio.ensure_future(self._chaos()) if self.opt.chaos else None
                await asyncio.gather(*tasks)
                if chaos is not None:
                    chaos.cancel()
                    await asyncio.gather(chaos, return_exceptions=True)
                if self.proxy is not None:
                    self.proxy.mode = "pass"
                server.set_faults([])
                await self._final_recovery()
                stats = server.stats()
            finally:
                if self.proxy is not None:
                    await self.proxy.close()
        fig = self.fig
        fig.rotations = stats["rotations"]
        fig.grace_replays = stats["grace_replays"]
        fig.family_revocations = stats["family_revocations"]
        fig.reuse_detections = stats["reuse_detections"]
        fig.api_200 = stats["api_200"]
        fig.server_faults_applied = stats["faults_injected"]
        fig.committed = sum(j.committed for j in self.journals)
        if self.proxy is not None:
            fig.proxy_faults.update({k: v for k, v in self.proxy.counts.items() if k != "pass"})
        fig.seconds = time.monotonic() - began
        return fig

    def _done(self) -> bool:
        return self.fig.kills >= self.opt.kills

    async def _slot(self, slot: int, journal: _Journal) -> None:
        first = True
        while not self._done():
            point = None
            if self.rng.random() < self.opt.arm_probability:
                point = self.rng.choice(REFRESH_POINTS)
            worker = await spawn(
                self.url,
                journal.path,
                "loop",
                crash_at=point,
                stderr=self.stderr,
                seal_key=self.seal_key,
            )
            self.fig.starts += 1
            if not first:
                self.fig.restarts += 1
            first = False
            await self._life(worker)
            await self._account(worker, journal)

    async def _life(self, worker: Worker) -> None:
        """Let the worker run a random while after its start, then SIGKILL it.

        Half the kills are aimed: they wait for the worker's next refresh to start and
        strike a few milliseconds into it, where the interesting windows are (request in
        flight, answer read but not committed, commit done but not announced).
        """
        await worker.started()
        life = self.rng.uniform(0.0, self.opt.max_life)
        aimed = self.rng.random() < self.opt.aimed
        deadline = time.monotonic() + life
        if aimed:
            deadline += self.opt.max_life  # wait for a refresh, but not for ever
        seen = len(worker.all("refreshing"))
        struck = False
        while worker.proc.returncode is None and time.monotonic() < deadline:
            if aimed and len(worker.all("refreshing")) > seen:
                await asyncio.sleep(self.rng.uniform(0.0, 0.03))
                struck = True
                break
            await asyncio.sleep(0.005 if aimed else 0.05)
        worker.kill()
        if await worker.wait(30) == KILLED:  # not if it died at a crash point first
            self.fig.kills += 1
            self.fig.aimed_kills += struck

    async def _account(self, worker: Worker, journal: _Journal) -> None:
        fig = self.fig
        code = worker.proc.returncode
        ok = worker.first("ok")
        fig.refreshed_lines += len(worker.all("refreshed"))
        for error in worker.all("error"):
            fig.worker_errors[str(error.get("kind"))] += 1
        if ok is not None:
            start = worker.first("start")
            if start is not None:
                fig.recovery_sdk.append(ok["t"] - start["t"])
            fig.recovery_restart.append(ok["t"] - worker.spawned)
        elif code == KILLED:
            fig.killed_before_first_200 += 1
        if code == CRASHED and worker.crash_at:
            fig.crashes[worker.crash_at] += 1
        if code == EXIT_FATAL or worker.all("fatal"):
            fig.fatal += 1
            fig.fatal_details.extend(worker.all("fatal"))
        elif code not in (KILLED, CRASHED, EXIT_LOST, EXIT_JOURNAL, 0):
            fig.unexpected_exits += 1  # an import error, say: the run would prove nothing
            fig.fatal_details.append({"exit": code, "events": worker.events[-3:]})
        lost = worker.all("lost")
        if lost or code == EXIT_LOST:
            await self._lost(worker, journal, lost[0] if lost else {"code": f"exit {code}"})

    async def _lost(self, worker: Worker, journal: _Journal, event: dict[str, Any]) -> None:
        """Count the loss, then sign the journal in again so the slot keeps going."""
        opened = worker.first("open") or {}
        age = opened.get("intent_age")
        inside = age is None or age < 300.0
        detail = {"code": event.get("code"), "intent_age": age, "pid": worker.proc.pid}
        self.fig.lost_details.append(detail)
        if inside:
            self.fig.lost_inside += 1
        else:
            self.fig.lost_outside += 1
        assert self.server is not None
        async with journal.lock:
            record = await journals.read(journal.path, seal=self.seal)
            if record.tokens is not None:
                return  # the other slot on this journal signed in again already
            ended = record.ended_code is not None
            journal.committed += record.generation - journal.segment_start - int(ended)
            journal.segment_start = await journals.sign_in(
                self.server.url, journal.path, seal=self.seal
            )
            self.fig.resignins += 1

    async def _chaos(self) -> None:
        """Short faults, one at a time, all far shorter than the grace window."""
        assert self.server is not None and self.proxy is not None
        while True:
            await asyncio.sleep(self.rng.uniform(0.5, 2.5))
            if self.rng.random() < 0.5:
                fault = dict(self.rng.choice(SERVER_FAULTS))
                self.server.set_faults([fault])
                name = fault["kind"] if fault["kind"] != "status" else f"status {fault['status']}"
                self.fig.server_faults[name] += 1
            else:
                self.proxy.mode = self.rng.choice(PROXY_BURSTS)
                await asyncio.sleep(self.rng.uniform(0.2, 1.5))
                self.proxy.mode = "pass"

    async def _final_recovery(self) -> None:
        """Every journal gets one clean worker that finishes what the kills left pending."""
        assert self.server is not None
        for jr in self.journals:
            worker = await spawn(
                self.server.url, jr.path, "check", stderr=self.stderr, seal_key=self.seal_key
            )
            await worker.wait(120)
            check = worker.first("check")
            if check is None or check.get("intent") is not None or check.get("status") != 200:
                events = [{k: v for k, v in e.items() if k != "pid"} for e in worker.events]
                self.fig.final_check_failures.append(f"{jr.path.name}: {events}")
            if worker.all("lost"):
                await self._lost(worker, jr, worker.all("lost")[0])
            record = await journals.read(jr.path, seal=self.seal)
            ended = int(record.tokens is None and record.ended_code is not None)
            jr.committed += record.generation - jr.segment_start - ended
            jr.segment_start = record.generation
            if self.seal is not None:
                self.fig.readable_tokens += journals.readable_tokens(jr.path, record.tokens)
                self.fig.unsealed_journals += record.tokens is not None and record.sealed is None
