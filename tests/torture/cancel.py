"""Phase 5: cancellation and lifecycle. Timeouts around every call, dropped managers, forks.

``slots`` slots run :mod:`.cancelworker` processes one after another, each slot on its own
journal (kept across its workers, so each start recovers what the last one left) and behind
its own :class:`~tests.torture.proxy.FaultProxy`, which the driver keeps flipping between
passing, stalling the answer (so refreshes are in flight when a call times out or ``close``
is cancelled) and resetting. A worker makes random calls under random ``wait_for`` timeouts,
some while another process holds the journal's write lock, then closes or drops its manager.

Counted (each must be zero): sessions lost, raw exceptions escaping, stuck transactions,
``events()`` iterators still open after ``close()``, and hung processes: a worker that has
not exited :data:`EXIT_BOUND` s after its ``done`` line (or that never gets there).

Then ``forks`` rounds of the fork test: the journal holds an expired pair, a worker builds
one manager and forks ``children`` processes that ask for a token at the same instant. The
server must see one refresh request; the ones beyond it are counted.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, Final

import tokenjournal as tj
from tokenjournal.server import ReferenceServer, ServerConfig

from . import journals
from .procs import KILLED, Worker, spawn
from .proxy import FaultProxy

MODULE: Final = "tests.torture.cancelworker"
#: A worker must be gone this long after it said ``done``; later, it is hung.
EXIT_BOUND: Final = 5.0
#: Real seconds a worker may take per call before it counts as hung (calls time out at 3 s).
PER_OP: Final = 5.0


@dataclass
class CancelOptions:
    """How hard phase 5 pushes."""

    workers: int = 40
    ops: int = 30
    slots: int = 2
    lock_share: float = 0.3
    drop_share: float = 0.3
    forks: int = 10
    children: int = 4
    seed: int = 0


@dataclass
class CancelFigures:
    """What phase 5 counted."""

    workers: int = 0
    ops: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    dropped: int = 0
    locked_calls: int = 0
    lost: int = 0
    raw: int = 0
    stuck: int = 0
    hung: int = 0
    iterators_open: int = 0
    fork_rounds: int = 0
    fork_requests: list[int] = field(default_factory=list)
    fork_excess: int = 0
    proxy_faults: Counter[str] = field(default_factory=Counter)
    details: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


class CancelPhase:
    """Runs phase 5; :meth:`run` returns the figures."""

    def __init__(
        self, options: CancelOptions, workdir: Path, stderr: IO[bytes] | None = None
    ) -> None:
        self.opt = options
        self.workdir = workdir
        self.stderr = stderr
        self.rng = random.Random(options.seed)
        self.fig = CancelFigures()
        self._started = 0

    async def run(self) -> CancelFigures:
        """The random-cancellation slots, then the fork rounds."""
        began = time.monotonic()
        if self.opt.workers:
            async with ReferenceServer(ServerConfig(test_mode=True)) as server:
                await asyncio.gather(
                    *(self._slot(server, i) for i in range(max(1, self.opt.slots)))
                )
        for index in range(self.opt.forks):
            await self._fork_round(index)
        self.fig.seconds = time.monotonic() - began
        return self.fig

    def _detail(self, what: str, worker: Worker, **extra: Any) -> None:
        if len(self.fig.details) < 40:
            self.fig.details.append({"what": what, "pid": worker.proc.pid, **extra})

    async def _slot(self, server: ReferenceServer, slot: int) -> None:
        journal = self.workdir / f"cancel-{slot}.db"
        await journals.sign_in(server.url, journal)
        async with FaultProxy(server.port, stall_seconds=0.5) as proxy:
            chaos = asyncio.ensure_future(self._chaos(proxy))
            try:
                while self._started < self.opt.workers:
                    self._started += 1
                    seed = self.rng.randrange(2**31)
                    worker = await spawn(
                        proxy.url,
                        journal,
                        "cancel",
                        stderr=self.stderr,
                        module=MODULE,
                        extra=(
                            "--seed",
                            str(seed),
                            "--ops",
                            str(self.opt.ops),
                            "--lock",
                            str(self.opt.lock_share),
                            "--drop",
                            str(self.opt.drop_share),
                        ),
                    )
                    await self._watch(worker, 30.0 + PER_OP * self.opt.ops, seed)
            finally:
                chaos.cancel()
                await asyncio.gather(chaos, return_exceptions=True)
                self.fig.proxy_faults.update({k: v for k, v in proxy.counts.items() if k != "pass"})

    async def _chaos(self, proxy: FaultProxy) -> None:
        """Mostly passing; now and then the answers stall (a refresh in flight) or reset."""
        while True:
            roll = self.rng.random()
            proxy.mode = "stall" if roll < 0.25 else "reset" if roll < 0.3 else "pass"
            await asyncio.sleep(self.rng.uniform(0.1, 0.6))

    async def _watch(self, worker: Worker, budget: float, seed: int | None = None) -> None:
        """Wait for ``done`` (within ``budget``), then for the exit (within the bound)."""
        deadline = time.monotonic() + budget
        while (
            worker.first("done") is None
            and worker.proc.returncode is None
            and time.monotonic() < deadline
        ):
            await asyncio.sleep(0.05)
        done = worker.first("done")
        code = await worker.wait(EXIT_BOUND if done is not None else 0.5)
        self._account(worker, done, code, seed)

    def _account(
        self, worker: Worker, done: dict[str, Any] | None, code: int, seed: int | None
    ) -> None:
        fig = self.fig
        fig.workers += worker.first("ready") is not None
        ops = worker.all("op")
        fig.ops += len(ops)
        fig.locked_calls += sum(1 for o in ops if o.get("locked"))
        fig.outcomes.update(str(o.get("outcome")) for o in ops)
        fig.lost += len(worker.all("lost"))
        fig.raw += len(worker.all("raw"))
        fig.stuck += len(worker.all("stuck"))
        fig.iterators_open += len(worker.all("iterator"))
        for ev in ("lost", "raw", "stuck", "iterator"):
            for e in worker.all(ev)[:3]:
                self._detail(ev, worker, seed=seed, event={k: v for k, v in e.items() if k != "t"})
        if done is not None and done.get("dropped"):
            fig.dropped += 1
        hung_children = int(done.get("hung_children", 0)) if done else 0
        if code == KILLED and worker.killed:
            fig.hung += 1
            where = "after done" if done is not None else "before done"
            last = [e.get("op") or e.get("ev") for e in worker.events[-3:]]
            self._detail(
                "hung",
                worker,
                seed=seed,
                where=where,
                dropped=bool(done and done["dropped"]),
                last=last,
            )
        elif code != 0:
            fig.raw += 1 if not worker.all("raw") else 0
            self._detail("exit", worker, seed=seed, code=code, last=worker.events[-3:])
        fig.hung += hung_children

    async def _fork_round(self, index: int) -> None:
        """An expired pair, one manager, ``children`` forks asking at once: one request."""
        async with ReferenceServer(ServerConfig(test_mode=True)) as server:
            journal = self.workdir / f"fork-{index}.db"
            await journals.sign_in(server.url, journal)
            async with tj.TokenManager(server.url, journal=journal) as tm:
                record = await tm.journal.load(tm.account)
                assert record.tokens is not None
                past = datetime.now(UTC) - timedelta(minutes=1)
                await tm.set_tokens(replace(record.tokens, expires_at=past))
            base = server.stats()
            worker = await spawn(
                server.url,
                journal,
                "fork",
                stderr=self.stderr,
                module=MODULE,
                extra=(
                    "--children",
                    str(self.opt.children),
                    "--start-at",
                    repr(time.time() + 1.5),
                ),
            )
            await self._watch(worker, 90.0)
            requests = server.stats()["refresh_requests"] - base["refresh_requests"]
            self.fig.fork_rounds += 1
            self.fig.fork_requests.append(requests)
            if requests > 1:
                self.fig.fork_excess += requests - 1
                children = [
                    {k: e.get(k) for k in ("index", "outcome", "requests")}
                    for e in worker.all("child")
                ]
                self._detail("fork", worker, requests=requests, children=children)
