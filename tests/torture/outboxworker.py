"""The outbox worker: one process that enqueues readings and delivers them, killed and
restarted by :mod:`tests.torture.outbox`.

``python -m tests.torture.outboxworker --url URL --journal PATH --mode MODE`` prints one JSON
line per event on stdout (never a token, never a body):

* ``start`` / ``open``  interpreter up; the manager open
* ``enqueued``          ``enqueue`` returned for reading ``uid`` (durable from here)
* ``drained``           ``--mode drain``: the outbox is empty (``stats``)
* ``error`` / ``fatal`` a tokenjournal error the loop survives / anything else (exit 4)

Modes: ``once`` (enqueue ``--count`` readings, then wait until they are delivered),
``loop`` (enqueue one reading every ``--pause`` s until killed, delivering all along),
``drain`` (enqueue nothing; deliver what the journal holds, then report). A crash point is
armed by the driver through ``TOKENJOURNAL_CRASH_AT``.
"""

from __future__ import annotations

import time

T0 = time.time()

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from dataclasses import asdict  # noqa: E402
from typing import Any  # noqa: E402

import tokenjournal as tj  # noqa: E402

EXIT_FATAL = 4
#: Short budgets: a worker lives seconds. The outbox retries for as long as it takes anyway.
RETRY = tj.RetryPolicy(
    max_attempts=5, max_elapsed=8.0, base_delay=0.1, max_delay=1.0, attempt_timeout=1.5
)


def emit(ev: str, **fields: Any) -> None:
    """One JSON line, flushed at once: a SIGKILL may follow any instruction."""
    sys.stdout.write(json.dumps({"ev": ev, "t": time.time(), "pid": os.getpid(), **fields}) + "\n")
    sys.stdout.flush()


async def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.torture.outboxworker")
    p.add_argument("--url", required=True)
    p.add_argument("--journal", required=True)
    p.add_argument("--mode", choices=("once", "loop", "drain"), default="loop")
    p.add_argument("--spawned", type=float, default=T0)
    p.add_argument("--count", type=int, default=3)
    p.add_argument("--pause", type=float, default=0.02)
    p.add_argument("--tag", default="w", help="prefix of this start's uids")
    p.add_argument("--unordered", action="store_true")
    p.add_argument("--timeout", type=float, default=60.0)
    ns = p.parse_args(argv)
    emit("start", spawned=ns.spawned)
    async with tj.TokenManager(ns.url, journal=ns.journal, retry=RETRY) as tm:
        outbox = tm.outbox("readings", ordered=not ns.unordered, concurrency=3, max_backoff=1.0)
        emit("open", state=tm.state.value)
        url = ns.url + "/api/readings"
        n = 0
        while ns.mode == "loop" or (ns.mode == "once" and n < ns.count):
            uid = f"{ns.tag}-{n}"
            try:
                await outbox.enqueue("POST", url, json={"uid": uid, "n": n})
            except tj.TokenJournalError as exc:  # a locked journal, say: try the next one
                emit("error", kind=type(exc).__name__, code=exc.code)
            else:
                emit("enqueued", uid=uid)
            n += 1
            if ns.mode == "loop":
                await asyncio.sleep(ns.pause)
        try:
            await outbox.drain(timeout=ns.timeout)
        except TimeoutError:
            record = await tm.journal.load(tm.account)
            emit(
                "stuck",
                state=tm.state.value,
                ended=tm.ended_code,
                paused=outbox.paused,
                intent=record.intent.kind if record.intent else None,
                stats=asdict(await outbox.stats()),
            )
            raise
        emit("drained", stats=asdict(await outbox.stats()))
    return 0


if __name__ == "__main__":
    try:
        code = asyncio.run(main())
    except Exception as exc:  # the harness counts anything that escaped the SDK
        emit("fatal", kind=type(exc).__name__, msg=str(exc)[:200])
        code = EXIT_FATAL
    sys.exit(code)
