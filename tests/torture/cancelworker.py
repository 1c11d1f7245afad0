"""The cancellation worker: random ``wait_for`` timeouts around every public coroutine.

``python -m tests.torture.cancelworker --url URL --journal PATH --mode cancel --seed N``
runs ``--ops`` random calls of ``open``, ``close``, ``access_token``, ``refresh``,
``sign_in``, ``sign_out``, ``set_tokens`` (plus ``close`` while a refresh is in flight and
two ``open`` at once), each inside ``asyncio.wait_for`` with a random timeout, some while
another process (a plain ``sqlite3`` child) holds the journal's write lock for up to 1.5 s,
well inside the SDK's 5 s busy timeout. Then it checks that no transaction was left open
and either closes the manager or drops it without ``close()``: the process must exit either
way, and the driver counts it as hung if it does not.

``--mode fork`` constructs one manager, then forks ``--children`` processes that each open
it and ask for an access token at the same instant (the journal holds an expired pair): one
refresh request must go out, not one per child.

One JSON line per event on stdout, never a token:

* ``op``       a call's outcome (``ok``, ``timeout``, ``error``, ``not_signed_in``, ...)
* ``lost``     the session was lost (``SessionEnded``; ``NotSignedIn`` with no sign-out asked)
* ``raw``      an exception that is not the SDK's documented kind escaped a call
* ``stuck``    a transaction was left open (a later write failed, another process was
               locked out beyond the busy timeout)
* ``iterator`` an ``events()`` iterator was still open after ``close()``
* ``done``     the work is over (``dropped``: the manager was not closed); exit must follow
* ``child``    (fork) one child's outcome and how many refresh requests it sent
"""

from __future__ import annotations

import time

T0 = time.time()

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import sqlite3  # noqa: E402
import sys  # noqa: E402
from collections.abc import Awaitable, Callable  # noqa: E402
from typing import Any, Final  # noqa: E402

import tokenjournal as tj  # noqa: E402

from . import rules  # noqa: E402
from .journals import DEMO  # noqa: E402

EXIT_RAW: Final = 4
#: Every public coroutine, weighted towards the calls an app makes most.
OPS: Final = {
    "open": 1,
    "close": 1,
    "access_token": 3,
    "refresh": 2,
    "sign_in": 1,
    "sign_out": 1,
    "set_tokens": 2,
    "close_during_refresh": 1,
    "double_open": 1,
}
TIMEOUTS: Final = (0.0005, 0.002, 0.01, 0.05, 0.2, 0.5, 3.0)
RETRY: Final = tj.RetryPolicy(
    max_attempts=4, max_elapsed=4.0, base_delay=0.05, max_delay=0.5, attempt_timeout=0.6
)
#: Another process takes the write lock and holds it; prints ``held`` or ``blocked``.
HOLD: Final = """
import sqlite3, sys, time
c = sqlite3.connect(sys.argv[1], timeout=float(sys.argv[3]), isolation_level=None)
try:
    c.execute("BEGIN IMMEDIATE")
except sqlite3.OperationalError as exc:
    print("blocked", exc, flush=True)
    sys.exit(0)
print("held", flush=True)
time.sleep(float(sys.argv[2]))
c.execute("ROLLBACK")
"""
#: How long the lock holder (or the final probe) waits for the write lock. The SDK's own
#: transactions last milliseconds: anything longer is a transaction someone left open.
PROBE_WAIT: Final = 3.0


def emit(ev: str, **fields: Any) -> None:
    """One JSON line on stdout, flushed at once."""
    sys.stdout.write(json.dumps({"ev": ev, "t": time.time(), "pid": os.getpid(), **fields}) + "\n")
    sys.stdout.flush()


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.torture.cancelworker", description=__doc__)
    p.add_argument("--url", required=True)
    p.add_argument("--journal", required=True)
    p.add_argument("--mode", choices=("cancel", "fork"), default="cancel")
    p.add_argument("--spawned", type=float, default=T0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ops", type=int, default=30, help="calls in cancel mode")
    p.add_argument("--lock", type=float, default=0.3, help="share of calls under a held lock")
    p.add_argument("--drop", type=float, default=0.3, help="chance to drop the manager")
    p.add_argument("--children", type=int, default=4, help="fork mode: children")
    p.add_argument("--start-at", type=float, default=0.0, help="fork mode: when children call")
    return p.parse_args(argv)


class Session:
    """What the worker believes about the session, to tell a loss from its own sign-out."""

    def __init__(self) -> None:
        self.maybe_signed_out = False  # a sign-out was asked (it may finish later)
        self.lost = False  # a loss was reported since the last sign-in

    def judge(self, op: str, exc: BaseException) -> str:
        verdict = rules.classify(exc)
        lost = verdict == "ended" or (verdict == "not_signed_in" and not self.maybe_signed_out)
        if lost and not self.lost:
            self.lost = True
            emit("lost", op=op, kind=type(exc).__name__, code=getattr(exc, "code", None))
        elif verdict == "raw":
            emit("raw", op=op, kind=type(exc).__name__, msg=str(exc)[:200])
        elif verdict == "stuck":
            emit("stuck", op=op, how="call", msg=str(exc)[:200])
        return verdict

    def signed_in(self) -> None:
        self.maybe_signed_out = False
        self.lost = False


class LockHolder:
    """A child process that holds the journal's write lock for a while."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.proc: asyncio.subprocess.Process | None = None

    async def take(self, seconds: float) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            HOLD,
            self.path,
            repr(seconds),
            repr(PROBE_WAIT),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        line = (await self.proc.stdout.readline()).decode().strip()
        if line.startswith("blocked"):
            emit("stuck", op="lock_holder", how="another process locked out", msg=line[:200])

    def busy(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def wait(self) -> None:
        if self.proc is not None:
            await self.proc.wait()


def _probe_write_lock(path: str) -> str | None:
    """Take and drop the write lock from a fresh connection; the error text if it cannot."""
    con = sqlite3.connect(path, timeout=PROBE_WAIT, isolation_level=None)
    try:
        con.execute("BEGIN IMMEDIATE")
        con.execute("ROLLBACK")
        return None
    except sqlite3.OperationalError as exc:
        return str(exc)
    finally:
        con.close()


async def _consume(events: Any) -> None:
    async for _ in events:
        pass


async def cancel_main(ns: argparse.Namespace) -> int:
    rng = random.Random(ns.seed)
    tm = tj.TokenManager(ns.url, journal=ns.journal, retry=RETRY, grace_period=300.0)
    session = Session()
    holder = LockHolder(ns.journal)
    counts: dict[str, int] = {}

    async def call(op: str, make: Callable[[], Awaitable[Any]], timeout: float) -> str:
        try:
            await asyncio.wait_for(make(), timeout)
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            return session.judge(op, exc)
        return "ok"

    # The app's set-up: open, sign in if the last run left the journal signed out.
    session.maybe_signed_out = True  # until we know
    opened = await call("open (set-up)", tm.open, 30.0) == "ok"
    # A sign-out the last run asked for and did not finish is finished by open(), in the
    # background: that is the app's own sign-out, not a loss. Let it land, then sign in.
    for _ in range(100 if opened else 0):
        record = await tm.journal.load(tm.account)
        if record.intent is None or record.intent.kind != "sign_out":
            break
        await asyncio.sleep(0.05)
    if tm.tokens is None:
        await call("sign_in (set-up)", lambda: tm.sign_in(**DEMO), 30.0)
    if tm.tokens is not None:
        session.signed_in()
    iterator = asyncio.ensure_future(_consume(tm.events()))
    emit("ready")

    names, weights = list(OPS), list(OPS.values())
    op = "open"
    for index in range(ns.ops):
        # After a close, the app usually opens again: calls on a closed manager only
        # exercise the documented RuntimeError.
        reopen = op in ("close", "close_during_refresh") and rng.random() < 0.6
        op = "open" if reopen else rng.choices(names, weights)[0]
        timeout = rng.choice(TIMEOUTS)
        locked = False
        if not holder.busy() and rng.random() < ns.lock:
            await holder.take(rng.uniform(0.2, 1.5))
            locked = True
        if op == "open":
            verdict = await call(op, tm.open, timeout)
        elif op == "close":
            verdict = await call(op, tm.close, timeout)
        elif op == "access_token":
            verdict = await call(op, tm.access_token, timeout)
        elif op == "refresh":
            verdict = await call(op, tm.refresh, timeout)
        elif op == "sign_in":
            verdict = await call(op, lambda: tm.sign_in(**DEMO), timeout)
            if verdict == "ok":
                session.signed_in()
        elif op == "sign_out":
            session.maybe_signed_out = True
            verdict = await call(op, tm.sign_out, timeout)
        elif op == "set_tokens":
            pair = tm.tokens
            if pair is None:
                verdict = "skipped"
            else:
                verdict = await call(op, lambda p=pair: tm.set_tokens(p), timeout)
                if verdict == "ok":
                    session.signed_in()
        elif op == "close_during_refresh":
            refresh = asyncio.ensure_future(tm.refresh())
            await asyncio.sleep(0)
            verdict = await call(op, tm.close, timeout)
            try:
                await asyncio.wait_for(refresh, 30)
            except BaseException as exc:
                if isinstance(exc, KeyboardInterrupt | SystemExit):
                    raise
                session.judge("refresh (closed meanwhile)", exc)
        else:  # double_open: two opens at once on a closed manager
            await call("close", tm.close, 10.0)

            async def both() -> None:
                await asyncio.gather(tm.open(), tm.open())

            verdict = await call(op, both, timeout)
        counts[verdict] = counts.get(verdict, 0) + 1
        emit("op", i=index, op=op, timeout=timeout, locked=locked, outcome=verdict)
        # The app signs in again after a sign-out it asked for.
        if (
            verdict == "ok"
            and op in ("open", "double_open")
            and tm.tokens is None
            and await call("sign_in", lambda: tm.sign_in(**DEMO), 30.0) == "ok"
        ):
            session.signed_in()

    await holder.wait()
    await asyncio.sleep(0.2)  # let background work a timed-out call left settle
    problem = await asyncio.to_thread(_probe_write_lock, ns.journal)
    if problem is not None:
        emit("stuck", op="final probe", how="another process locked out", msg=problem[:200])
    # A write through the manager's own connection, if it is open and signed in.
    pair = tm.tokens
    if pair is not None:
        verdict = await call("set_tokens (final probe)", lambda: tm.set_tokens(pair), 30.0)
        if verdict == "ok":
            session.signed_in()
    dropped = rng.random() < ns.drop
    if not dropped:
        await call("close (final)", tm.close, 30.0)
        try:
            await asyncio.wait_for(asyncio.shield(iterator), 2.0)
        except TimeoutError:
            emit("iterator", open_after_close=True)
    iterator.cancel()
    emit("done", dropped=dropped, counts=counts)
    return 0


# ---------------------------------------------------------------------- fork mode


async def _child(tm: tj.TokenManager, ns: argparse.Namespace, index: int) -> int:
    session = Session()
    await asyncio.wait_for(tm.open(), 30)
    try:
        await asyncio.sleep(max(0.0, ns.start_at - time.time()))
        outcome = "ok"
        try:
            await asyncio.wait_for(tm.access_token(), 30)
        except Exception as exc:
            outcome = session.judge("access_token", exc)
        emit("child", index=index, outcome=outcome, requests=tm.refresh_requests)
    finally:
        await asyncio.wait_for(tm.close(), 30)
    return 0


def fork_main(ns: argparse.Namespace) -> int:
    # Constructed before the fork, as an app that builds its manager at import time would.
    tm = tj.TokenManager(ns.url, journal=ns.journal, retry=RETRY, grace_period=300.0)
    children: list[int] = []
    for index in range(ns.children):
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            code = EXIT_RAW
            try:
                code = asyncio.run(_child(tm, ns, index))
            except BaseException as exc:
                emit("raw", op="child", kind=type(exc).__name__, msg=str(exc)[:200])
            finally:
                sys.stdout.flush()
                os._exit(code)
        children.append(pid)
    deadline = time.monotonic() + 60.0
    hung = 0
    for pid in children:
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                hung += 1
                break
            time.sleep(0.02)
    emit("done", dropped=False, hung_children=hung)
    return 0


def main(argv: list[str] | None = None) -> int:
    ns = _parse(argv)
    emit("start", spawned=ns.spawned, t0=T0)
    if ns.mode == "fork":
        return fork_main(ns)
    return asyncio.run(cancel_main(ns))


if __name__ == "__main__":
    try:
        code = main()
    except Exception as exc:
        emit("raw", op="worker", kind=type(exc).__name__, msg=str(exc)[:200])
        code = EXIT_RAW
    sys.exit(code)
