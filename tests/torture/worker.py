"""The client worker: one process, one TokenManager, killed and restarted by the driver.

``python -m tests.torture.worker --url URL --journal PATH --mode MODE`` prints one JSON line
per event on stdout (the driver's only view into it) and never prints a token:

* ``start``      interpreter up and imports done (``t`` wall time; ``spawned`` from argv)
* ``open``       the TokenManager is open (``intent``: the pending intent's kind and age)
* ``ok``         an authenticated ``GET /api/me`` answered 200 (the first one, then every 100th)
* ``refreshing`` a refresh took the lease and is about to send (the driver aims kills at it)
* ``refreshed``  this process committed a new pair (a ``REFRESHED`` event)
* ``lost``       the session is gone (``SessionEnded`` / ``NotSignedIn``): exit code 3
* ``error``      a tokenjournal error the loop survives (transient, protocol, journal)
* ``fatal``      anything else escaped the SDK: exit code 4 (the harness counts it)
* ``check``      the summary of ``--mode check``

Modes: ``loop`` (GET /api/me through ``tm.client_session()`` until killed or ``--duration``),
``refresh`` (one forced refresh), ``sign_out``, ``check`` (recover, one GET, report, exit).
A crash point is armed by the driver through ``TOKENJOURNAL_CRASH_AT`` (exit code 137); a
sealed run passes its key in ``TOKENJOURNAL_TORTURE_SEAL_KEY``.
"""

from __future__ import annotations

import time

T0 = time.time()  # before the heavy imports: the interpreter's own start-up is part of a restart

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

import aiohttp  # noqa: E402

import tokenjournal as tj  # noqa: E402

from .journals import seal_from_env  # noqa: E402

EXIT_LOST = 3
EXIT_FATAL = 4
EXIT_JOURNAL = 5

#: Short budgets: a worker lives seconds, and the access token lives one or two.
WORKER_RETRY = tj.RetryPolicy(
    max_attempts=5, max_elapsed=8.0, base_delay=0.1, max_delay=1.0, attempt_timeout=1.5
)


def emit(ev: str, **fields: Any) -> None:
    """One JSON line on stdout, flushed at once: a SIGKILL may follow any instruction."""
    sys.stdout.write(json.dumps({"ev": ev, "t": time.time(), "pid": os.getpid(), **fields}) + "\n")
    sys.stdout.flush()


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.torture.worker", description=__doc__)
    p.add_argument("--url", required=True, help="auth server (or fault proxy) base URL")
    p.add_argument("--journal", required=True, help="journal file")
    p.add_argument("--account", default="default")
    p.add_argument("--mode", choices=("loop", "refresh", "sign_out", "check"), default="loop")
    p.add_argument("--grace", type=float, default=300.0, help="the client's grace_period")
    p.add_argument("--pause", type=float, default=0.02, help="seconds between requests (loop)")
    p.add_argument("--duration", type=float, default=0.0, help="stop the loop after (0: never)")
    p.add_argument("--spawned", type=float, default=T0, help="when the driver spawned us")
    p.add_argument(
        "--settle",
        type=float,
        default=30.0,
        help="check: how long to wait for a pending intent to clear",
    )
    return p.parse_args(argv)


async def _me(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url + "/api/me") as resp:
        await resp.read()
        return resp.status


async def _loop(tm: tj.TokenManager, ns: argparse.Namespace) -> int:
    timeout = aiohttp.ClientTimeout(total=4.0)
    ok = 0
    deadline = time.monotonic() + ns.duration if ns.duration > 0 else None
    async with tm.client_session(timeout=timeout) as http:
        while deadline is None or time.monotonic() < deadline:
            try:
                status = await _me(http, ns.url)
            except (tj.SessionEnded, tj.NotSignedIn) as exc:
                emit("lost", code=exc.code, kind=type(exc).__name__)
                return EXIT_LOST
            except tj.TokenJournalError as exc:
                emit("error", kind=type(exc).__name__, code=exc.code)
                await asyncio.sleep(0.1)
                continue
            except (aiohttp.ClientError, TimeoutError) as exc:
                # The API call itself (not the SDK) met the network fault.
                emit("error", kind="api_" + type(exc).__name__, code="api_network")
                await asyncio.sleep(0.1)
                continue
            if status == 200:
                ok += 1
                if ok == 1 or ok % 100 == 0:
                    emit("ok", n=ok, since_start=time.time() - T0)
            else:
                emit("error", kind="api_status", code=str(status))
            await asyncio.sleep(ns.pause)
    return 0


async def _settle(tm: tj.TokenManager, ns: argparse.Namespace) -> None:
    """Wait (up to ``--settle`` s) until no intent is pending: open() resumes an interrupted
    refresh or sign-out in the background, and a call may start a proactive refresh."""
    began = time.monotonic()
    while time.monotonic() - began < ns.settle:
        # A refresh task may be scheduled and not have written its intent yet: wait for the
        # manager's own work too, or the check races it (it read "no intent", then saw one).
        busy = [t for t in (tm._task, tm._rescue) if t is not None and not t.done()]
        if busy:
            await asyncio.wait(busy, timeout=0.5)
            continue
        record = await tm.journal.load(ns.account)
        if record.intent is None or tm.state is tj.SessionState.ENDED:
            return
        await asyncio.sleep(0.02)


async def _check(tm: tj.TokenManager, ns: argparse.Namespace) -> int:
    """Let the start-up recovery run, make one authenticated call, say what we see."""
    status: int | str | None = None
    began = time.monotonic()
    await _settle(tm, ns)
    if tm.state is not tj.SessionState.SIGNED_OUT:
        try:
            async with tm.client_session(timeout=aiohttp.ClientTimeout(total=10)) as http:
                status = await _me(http, ns.url)
        except (tj.SessionEnded, tj.NotSignedIn) as exc:
            emit("lost", code=exc.code, kind=type(exc).__name__)
            status = "lost:" + exc.code
        await _settle(tm, ns)  # the call may have started a proactive refresh
    waited = time.monotonic() - began
    record = await tm.journal.load(ns.account)
    emit(
        "check",
        state=tm.state.value,
        status=status,
        generation=record.generation,
        intent=record.intent.kind if record.intent else None,
        ended=record.ended_code,
        access_fp=tj.fingerprint(record.tokens.access_token) if record.tokens else "-",
        refresh_fp=tj.fingerprint(record.tokens.refresh_token) if record.tokens else "-",
        waited=waited,
        refresh_requests=tm.refresh_requests,
        lease=None
        if record.lease is None
        else {
            "pid": record.lease.pid,
            "mine": record.lease.pid == os.getpid(),
            "expires_in": record.lease.expires_at - time.time(),
        },
    )
    return EXIT_LOST if isinstance(status, str) else 0


async def main(argv: list[str] | None = None) -> int:
    ns = _parse(argv)
    emit("start", spawned=ns.spawned, t0=T0)
    tm = tj.TokenManager(
        ns.url,
        journal=ns.journal,
        account=ns.account,
        grace_period=ns.grace,
        retry=WORKER_RETRY,
        seal=seal_from_env(),  # the sealed pass of phase 2
    )

    def on_event(event: tj.TokenEvent) -> None:
        if event.kind is tj.EventKind.STATE and event.state is tj.SessionState.REFRESHING:
            emit("refreshing")  # the driver may aim a kill at the refresh in flight
        elif event.kind in (
            tj.EventKind.REFRESHED,
            tj.EventKind.ADOPTED,
            tj.EventKind.RECOVERING,
            tj.EventKind.ENDED,
            tj.EventKind.SIGNED_OUT,
        ):
            emit(event.kind.value, code=event.code, fp=event.fingerprint)

    tm.subscribe(on_event)
    try:
        # Read what the last run left before open() starts recovering it (open() reuses
        # the already open journal).
        await tm.journal.open()
        before = await tm.journal.load(ns.account)
        await tm.open()
    except tj.JournalError as exc:
        await tm.journal.close()
        emit("error", kind="JournalError", code=exc.code, where="open")
        return EXIT_JOURNAL
    try:
        intent = before.intent
        emit(
            "open",
            intent=intent.kind if intent else None,
            intent_age=(time.time() - intent.started_at) if intent else None,
            generation=before.generation,
        )
        if ns.mode == "loop":
            return await _loop(tm, ns)
        if ns.mode == "refresh":
            await tm.refresh()
            return 0
        if ns.mode == "sign_out":
            await tm.sign_out()
            return 0
        return await _check(tm, ns)
    except (tj.SessionEnded, tj.NotSignedIn) as exc:
        emit("lost", code=exc.code, kind=type(exc).__name__)
        return EXIT_LOST
    except tj.TokenJournalError as exc:
        emit("error", kind=type(exc).__name__, code=exc.code)
        return 1
    finally:
        await tm.close()


if __name__ == "__main__":
    try:
        code = asyncio.run(main())
    except Exception as exc:  # the harness counts anything that escaped the SDK
        emit("fatal", kind=type(exc).__name__, msg=str(exc)[:200])
        code = EXIT_FATAL
    sys.exit(code)
