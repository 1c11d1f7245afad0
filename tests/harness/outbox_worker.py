"""A process that enqueues into and delivers a durable outbox, for tests/test_outbox.py.

``python -m tests.harness.outbox_worker --url URL --journal PATH --mode MODE`` prints one
JSON line per step on stdout (never a token, never a body):

* ``enqueue_and_die``: open the manager, enqueue ``--count`` readings, print each id as soon
  as ``enqueue`` returns, then SIGKILL itself (nothing after the return may be needed);
* ``deliver``: enqueue ``--count`` readings, drain, print the outbox's stats, exit 0;
* ``serve``: enqueue ``--count`` readings and keep delivering until killed.

Readings carry ``uid = PREFIX-n`` so the server can tell one reading applied twice.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from dataclasses import asdict
from typing import Any

import tokenjournal as tj


def say(event: str, **fields: Any) -> None:
    """One JSON line, flushed: a SIGKILL may follow."""
    sys.stdout.write(json.dumps({"ev": event, "pid": os.getpid(), **fields}) + "\n")
    sys.stdout.flush()


async def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.harness.outbox_worker")
    p.add_argument("--url", required=True)
    p.add_argument("--journal", required=True)
    p.add_argument("--mode", choices=("enqueue_and_die", "deliver", "serve"), required=True)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--prefix", default="r")
    p.add_argument("--unordered", action="store_true")
    p.add_argument("--timeout", type=float, default=60.0)
    ns = p.parse_args(argv)
    tm = tj.TokenManager(ns.url, journal=ns.journal)
    async with tm:
        outbox = tm.outbox("readings", ordered=not ns.unordered, concurrency=4)
        say("open", state=tm.state.value)
        for n in range(ns.count):
            item = await outbox.enqueue(
                "POST", ns.url + "/api/readings", json={"uid": f"{ns.prefix}-{n}", "n": n}
            )
            say("enqueued", id=item, n=n)
        if ns.mode == "enqueue_and_die":
            os.kill(os.getpid(), signal.SIGKILL)
        if ns.mode == "serve":
            await asyncio.Event().wait()
        await outbox.drain(timeout=ns.timeout)
        say("drained", stats=asdict(await outbox.stats()))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
