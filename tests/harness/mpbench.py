"""Cross-process refresh: a worker program, its parent-side handle, and the latency figure.

Several processes share one journal file. When the access token expires for all of them at
once, one takes the journal's lease and refreshes; the others wait for its commit and adopt
the new pair. This module measures how long that takes, from the holder's commit to the
last waiting process using the new token::

    python -m tests.harness.mpbench --processes 8 --callers 200 --rounds 5

Each round moves the reference server's clock past the access token's lifetime and tells
every worker to shift its own clock by as much (a :class:`OffsetClock`), so the token is
stale everywhere at once with no sleeping. Workers then run ``callers`` concurrent
``access_token()`` calls. A second burst on the fresh token counts journal round trips on
the hot path (the target is zero).

The worker speaks JSON lines: one command per line on stdin, one reply per command on
stdout, plus ``{"event": ...}`` lines (``ready``, ``begin``) in between. Nothing it prints
contains a token, only fingerprints (invariant 8). ``tests/harness/mp_worker.py`` extends
:class:`Worker` with test-only commands.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any, Final, TypeVar

import aiohttp

from tokenjournal._errors import TokenJournalError
from tokenjournal._events import EventKind, TokenEvent
from tokenjournal._journal import BeginResult, Holder, SQLiteJournal, _Tx
from tokenjournal._manager import TokenManager
from tokenjournal._tokens import fingerprint

#: The repository root: worker programs run there.
ROOT: Final = Path(__file__).resolve().parents[2]
DEMO: Final = {"email": "demo@example.com", "password": "demo"}
#: How far ahead of "now" the parent sets a round's common start: every worker must have
#: read its command by then, even on a busy machine.
START_LEAD: Final = 0.05
#: How long the parent waits for one reply before it calls the worker stuck.
REPLY_TIMEOUT: Final = 60.0
_T = TypeVar("_T")


# --------------------------------------------------------------------------- worker side


class OffsetClock:
    """The system clock moved ``offset`` seconds on, as if that much time had passed.

    A fake clock cannot be shared between processes; a shared offset can: the parent moves
    the server's clock and every worker's by the same amount, so expiry is simultaneous.
    Both clocks move: a manager measures a token's life on the monotonic one.
    """

    __slots__ = ("offset",)

    def __init__(self, offset: float = 0.0) -> None:
        self.offset = offset

    def time(self) -> float:
        """Wall time plus the offset."""
        return time.time() + self.offset

    def monotonic(self) -> float:
        """Monotonic time plus the offset."""
        return time.monotonic() + self.offset

    async def sleep(self, seconds: float) -> None:
        """Sleep for real."""
        await asyncio.sleep(max(0.0, seconds))


class CountingJournal(SQLiteJournal):
    """A :class:`SQLiteJournal` that counts its round trips and reports lease outcomes."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path)
        self.reads = 0
        self.transactions = 0
        self.on_begin: Callable[[BeginResult], None] | None = None

    async def _read(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        self.reads += 1
        return await super()._read(sql, params)

    async def _transaction(
        self,
        body: Callable[[_Tx], _T],
        *,
        write: bool = True,
        unless: Callable[[_Tx], _T | None] | None = None,
    ) -> _T:
        self.transactions += 1
        return await super()._transaction(body, write=write, unless=unless)

    async def begin_refresh(
        self, account: str, holder: Holder, expected_generation: int, now: float, lease_ttl: float
    ) -> BeginResult:
        """Take the lease (see :meth:`SQLiteJournal.begin_refresh`) and report the outcome."""
        result = await super().begin_refresh(account, holder, expected_generation, now, lease_ttl)
        if self.on_begin is not None:
            self.on_begin(result)
        return result


def say(message: dict[str, Any]) -> None:
    """Write one JSON line to stdout, flushed (the parent may be waiting for it)."""
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


class Worker:
    """One process's TokenManager driven by JSON-line commands (``op_<name>`` methods)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.clock = OffsetClock(args.clock_offset)
        self.journal = CountingJournal(args.journal)
        self.journal.on_begin = self._on_begin
        self.tm = TokenManager(
            args.url,
            self.journal,
            account=args.account,
            refresh_margin=args.refresh_margin,
            clock=self.clock,
            lease_ttl=args.lease_ttl,
        )
        self.committed_at: float | None = None
        self.tm.subscribe(self._on_event)

    def _on_event(self, event: TokenEvent) -> None:
        if event.kind is EventKind.REFRESHED:
            self.committed_at = time.monotonic()  # right after this process's commit

    def _on_begin(self, result: BeginResult) -> None:
        say({"event": "begin", "result": type(result).__name__})

    async def run(self) -> None:
        """Open the manager, say ``ready``, then serve commands until ``quit`` or EOF."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        async with self.tm:
            say({"event": "ready", "pid": os.getpid()})
            while line := await reader.readline():
                command = json.loads(line)
                op = command.pop("op")
                if op == "quit":
                    break
                handler = getattr(self, f"op_{op}")
                try:
                    reply = await handler(**command)
                except TokenJournalError as exc:
                    reply = {"error": exc.code}
                say({"op": op, **reply})
        with contextlib.suppress(BrokenPipeError):  # the parent may be gone already
            say({"op": "quit"})

    def _counters(self) -> tuple[int, int, int]:
        return self.tm.refresh_requests, self.journal.reads, self.journal.transactions

    def _delta(self, before: tuple[int, int, int]) -> dict[str, int]:
        after = self._counters()
        return {
            "refresh_requests": after[0] - before[0],
            "reads": after[1] - before[1],
            "transactions": after[2] - before[2],
        }

    async def op_clock(self, offset: float) -> dict[str, Any]:
        """Shift this process's wall clock to ``offset`` seconds ahead of real time."""
        self.clock.offset = offset
        return {}

    async def op_tokens(self, callers: int, at: float | None = None) -> dict[str, Any]:
        """``callers`` concurrent ``access_token()`` calls; which tokens came back, and when.

        With ``at`` (a ``time.monotonic()`` instant, one clock for every process on the
        host), the calls start then, so that every worker asks at the same moment.
        """
        before = self._counters()
        self.committed_at = None
        if at is not None:
            await asyncio.sleep(at - time.monotonic())
        started = time.monotonic()

        async def one() -> tuple[str, float]:
            token = await self.tm.access_token()
            return fingerprint(token), time.monotonic()

        results = await asyncio.gather(*(one() for _ in range(callers)), return_exceptions=True)
        done = [r for r in results if isinstance(r, tuple)]
        errors = [getattr(r, "code", type(r).__name__) for r in results if not isinstance(r, tuple)]
        return {
            "fps": dict(Counter(fp for fp, _ in done)),
            "errors": dict(Counter(errors)),
            "started": started,
            "last": max((t for _, t in done), default=None),
            "committed_at": self.committed_at,
            **self._delta(before),
        }

    async def op_api(self, callers: int) -> dict[str, Any]:
        """``callers`` concurrent ``GET /api/me`` through the middleware (the 401 rule)."""
        before = self._counters()

        async def one(http: aiohttp.ClientSession) -> int:
            async with http.get(f"{self.args.url}/api/me") as response:
                await response.read()
                return response.status

        async with self.tm.client_session() as http:
            results = await asyncio.gather(
                *(one(http) for _ in range(callers)), return_exceptions=True
            )
        statuses = [
            r if isinstance(r, int) else getattr(r, "code", type(r).__name__) for r in results
        ]
        return {
            "statuses": dict(Counter(str(s) for s in statuses)),
            **self._state(),
            **self._delta(before),
        }

    async def op_refresh(self) -> dict[str, Any]:
        """One forced ``refresh()``."""
        before = self._counters()
        tokens = await self.tm.refresh()
        return {"fp": fingerprint(tokens.access_token), **self._delta(before)}

    def _state(self) -> dict[str, Any]:
        tokens = self.tm.tokens
        return {
            "fp": fingerprint(tokens.access_token if tokens else None),
            "state": self.tm.state.value,
            "total_refresh_requests": self.tm.refresh_requests,
        }

    async def op_state(self) -> dict[str, Any]:
        """The manager's in-memory view."""
        return self._state()


def worker_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The worker's command line."""
    parser = argparse.ArgumentParser(prog=prog, description="a tokenjournal test worker")
    parser.add_argument("--url", required=True, help="the auth server")
    parser.add_argument("--journal", required=True, help="the shared journal file")
    parser.add_argument("--account", default="default")
    parser.add_argument("--lease-ttl", type=float, default=None)
    parser.add_argument("--refresh-margin", type=float, default=0.0)
    parser.add_argument("--clock-offset", type=float, default=0.0)
    return parser


def worker_main(worker: type[Worker] = Worker, argv: Sequence[str] | None = None) -> None:
    """Run one worker process (stdout is the reply channel, logs go to stderr)."""
    args = worker_parser().parse_args(argv)
    asyncio.run(worker(args).run())


# --------------------------------------------------------------------------- parent side


class WorkerHandle:
    """The parent's end of one worker process: send commands, await replies and events."""

    def __init__(self, process: asyncio.subprocess.Process, stderr: IO[bytes]) -> None:
        self.process = process
        self.pid = process.pid
        self._stderr = stderr
        self._inbox: list[dict[str, Any]] = []
        self._arrived = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def start(
        cls, program: Sequence[str], args: Sequence[str], stderr: IO[bytes]
    ) -> WorkerHandle:
        """Start ``program args`` and wait for its ``ready`` event."""
        process = await asyncio.create_subprocess_exec(
            *program,
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            cwd=ROOT,  # where ``-m tests.harness...`` resolves
        )
        handle = cls(process, stderr)
        await handle.event("ready")
        return handle

    async def _read(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            self._inbox.append(json.loads(line))
            self._arrived.set()
        self._arrived.set()  # EOF: wake whoever waits, so it can fail fast

    async def _take(self, match: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        # A safety net so a stuck worker fails the run instead of hanging it; callers that
        # expect an answer sooner wrap the call in their own asyncio.timeout().
        async with asyncio.timeout(REPLY_TIMEOUT):
            while True:
                for i, message in enumerate(self._inbox):
                    if match(message):
                        return self._inbox.pop(i)
                if self._reader.done():
                    code = await self.process.wait()
                    raise EOFError(f"worker {self.pid} exited with code {code} (see its stderr)")
                self._arrived.clear()
                await self._arrived.wait()

    def send(self, op: str, **fields: Any) -> None:
        """Write one command; its reply comes from :meth:`reply`."""
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps({"op": op, **fields}) + "\n").encode())

    async def reply(self) -> dict[str, Any]:
        """The next reply (events are kept for :meth:`event`)."""
        return await self._take(lambda m: "op" in m)

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one command and await its reply."""
        self.send(op, **fields)
        return await self.reply()

    async def event(self, name: str, **fields: Any) -> dict[str, Any]:
        """The next ``{"event": name, **fields}`` line."""

        def match(m: dict[str, Any]) -> bool:
            return m.get("event") == name and all(m.get(k) == v for k, v in fields.items())

        return await self._take(match)

    def drain(self, name: str) -> list[dict[str, Any]]:
        """Remove and return every ``name`` event received so far, oldest first."""
        taken = [m for m in self._inbox if m.get("event") == name]
        self._inbox = [m for m in self._inbox if m.get("event") != name]
        return taken

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the worker (SIGKILL, SIGSTOP, SIGCONT)."""
        os.kill(self.pid, sig)

    async def close(self) -> None:
        """Ask the worker to quit (kill it if it does not), reap it, close the pipes."""
        if self.process.returncode is None:
            try:
                self.send("quit")
                assert self.process.stdin is not None
                await self.process.stdin.drain()
            except (ConnectionError, RuntimeError):
                pass
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                self.process.kill()
        await self.process.wait()
        if self.process.stdin is not None:
            self.process.stdin.close()
        await asyncio.gather(self._reader, return_exceptions=True)


async def start_workers(
    program: Sequence[str], args: Sequence[str], count: int, stderr: IO[bytes]
) -> list[WorkerHandle]:
    """Start ``count`` workers at once; if any fails to get ready, close the others."""
    started = await asyncio.gather(
        *(WorkerHandle.start(program, args, stderr) for _ in range(count)),
        return_exceptions=True,
    )
    handles = [h for h in started if isinstance(h, WorkerHandle)]
    failures = [e for e in started if isinstance(e, BaseException)]
    if failures:
        await asyncio.gather(*(h.close() for h in handles))
        raise failures[0]
    return handles


def worker_args(
    url: str,
    journal: str | os.PathLike[str],
    *,
    account: str = "default",
    lease_ttl: float | None = None,
    refresh_margin: float = 0.0,
    clock_offset: float = 0.0,
) -> list[str]:
    """Command-line arguments for a worker."""
    args = ["--url", url, "--journal", os.fspath(journal), "--account", account]
    args += ["--refresh-margin", str(refresh_margin), "--clock-offset", str(clock_offset)]
    if lease_ttl is not None:
        args += ["--lease-ttl", str(lease_ttl)]
    return args


# --------------------------------------------------------------------------- the figure


def _summary(samples: list[float]) -> dict[str, float]:
    """Median and p99 in milliseconds (p99 of a handful of samples is their maximum)."""
    ms = sorted(s * 1000 for s in samples)
    if len(ms) < 2:
        p99 = ms[0] if ms else float("nan")
    else:
        p99 = statistics.quantiles(ms, n=100, method="inclusive")[98]
    return {"median": statistics.median(ms) if ms else float("nan"), "p99": p99, "n": len(ms)}


async def _measure(processes: int, callers: int, rounds: int, stderr: IO[bytes]) -> dict[str, Any]:
    from tokenjournal.testing import reference_server

    with tempfile.TemporaryDirectory(prefix="tokenjournal-mpbench-") as folder:
        path = Path(folder) / "tokens.db"
        async with reference_server() as server:
            ttl = float(server.config.access_ttl)
            async with TokenManager(server.url, path) as tm:
                await tm.sign_in(**DEMO)
            program = [sys.executable, "-m", "tests.harness.mpbench", "worker"]
            args = worker_args(server.url, path)
            workers = await start_workers(program, args, processes, stderr)
            per_process: list[float] = []
            last_process: list[float] = []
            fresh_ops = 0
            late = 0
            requests: list[int] = []
            try:
                offset = 0.0
                for _ in range(rounds):
                    offset += ttl + 1
                    await server.advance(ttl + 1)
                    await asyncio.gather(*(w.call("clock", offset=offset) for w in workers))
                    before = server.stats()["refresh_requests"]
                    # Commands reach the workers one after another, and a worker busy
                    # elsewhere reads its own late: without a common start, a worker that
                    # asks after the holder's commit would count its own late start as the
                    # doorbell's latency.
                    at = time.monotonic() + START_LEAD
                    for w in workers:
                        w.send("tokens", callers=callers, at=at)
                    replies = await asyncio.gather(*(w.reply() for w in workers))
                    requests.append(server.stats()["refresh_requests"] - before)
                    holders = [r for r in replies if r["committed_at"] is not None]
                    if len(holders) != 1 or any(r["errors"] for r in replies):
                        raise RuntimeError(f"round went wrong: {replies}")
                    commit = float(holders[0]["committed_at"])
                    others = [r for r in replies if r is not holders[0]]
                    # From the commit, or from its own start if a worker began after it.
                    lags = [r["last"] - max(commit, r["started"]) for r in others]
                    late += sum(r["started"] > commit for r in others)
                    per_process += lags
                    last_process.append(max(lags, default=0.0))
                    fresh = await asyncio.gather(
                        *(w.call("tokens", callers=callers) for w in workers)
                    )
                    fresh_ops += sum(r["reads"] + r["transactions"] for r in fresh)
            finally:
                await asyncio.gather(*(w.close() for w in workers))
            stats = server.stats()
    return {
        "processes": processes,
        "callers": callers,
        "rounds": rounds,
        "commit_to_each_waiting_process_ms": _summary(per_process),
        "commit_to_last_waiting_process_ms": _summary(last_process),
        "began_after_the_commit": late,
        "refresh_requests_per_round": requests,
        "journal_ops_on_fresh_token": fresh_ops,
        "fresh_calls": processes * callers * rounds,
        "server": {k: stats[k] for k in ("rotations", "grace_replays", "reuse_detections")},
    }


def run_mp_latency(processes: int = 8, callers: int = 200, rounds: int = 5) -> dict[str, Any]:
    """Measure commit-to-adoption latency across ``processes`` sharing one journal.

    Returns a dict: ``commit_to_last_waiting_process_ms`` and
    ``commit_to_each_waiting_process_ms`` (``median``, ``p99``, ``n``), the refresh requests
    the server saw per round (1 is right), and the journal round trips made by the fresh-token
    bursts (0 is right). Workers' logs go to stderr.
    """
    check_sizes(processes, callers, rounds)
    return asyncio.run(_measure(processes, callers, rounds, sys.stderr.buffer))


def check_sizes(processes: int, callers: int, rounds: int) -> None:
    """Raise ValueError for a run that measures nothing (one process has nobody to wake)."""
    if processes < 2 or callers < 1 or rounds < 1:
        raise ValueError("need at least 2 processes, 1 caller and 1 round")


def format_table(result: dict[str, Any]) -> str:
    """The result as a small text table."""
    each = result["commit_to_each_waiting_process_ms"]
    last = result["commit_to_last_waiting_process_ms"]
    rows = [
        ("commit -> each waiting process", each),
        ("commit -> last waiting process", last),
    ]
    lines = [
        f"processes={result['processes']} callers/process={result['callers']} "
        f"rounds={result['rounds']}",
        f"{'latency (ms)':<34}{'median':>9}{'p99':>9}{'n':>5}",
    ]
    lines += [f"{name:<34}{v['median']:>9.1f}{v['p99']:>9.1f}{v['n']:>5}" for name, v in rows]
    lines.append(
        f"waiting processes that began after the commit: {result['began_after_the_commit']} "
        f"of {each['n']} (counted from their own start)"
    )
    lines.append(f"refresh requests per round (server): {result['refresh_requests_per_round']}")
    lines.append(
        f"journal round trips on a fresh token: {result['journal_ops_on_fresh_token']} "
        f"in {result['fresh_calls']} access_token() calls"
    )
    lines.append(f"server: {result['server']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m tests.harness.mpbench [worker ...]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:
        worker_main(Worker, argv[1:])
        return
    parser = argparse.ArgumentParser(
        prog="python -m tests.harness.mpbench",
        description="latency from one process's refresh commit to every other process using it",
    )
    parser.add_argument(
        "--processes", type=int, default=8, help="processes sharing the journal (default 8)"
    )
    parser.add_argument(
        "--callers", type=int, default=200, help="concurrent callers per process (default 200)"
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="refreshes measured, one per round (default 5)"
    )
    parser.add_argument("--json", action="store_true", help="print the raw result as JSON")
    args = parser.parse_args(argv)
    try:
        check_sizes(args.processes, args.callers, args.rounds)
    except ValueError as exc:
        parser.error(str(exc))
    result = run_mp_latency(args.processes, args.callers, args.rounds)
    print(json.dumps(result, indent=2) if args.json else format_table(result))


if __name__ == "__main__":
    main()
