"""One worker process of the fleet run: many devices, each a real TokenManager with its
own SQLite journal, on one event loop, on the shared simulated clock.

Protocol (JSON lines): the worker prints ``{"ready": n}`` once every device is open (and,
unless ``--resume``, signed in), reads ``{"go": start}`` (the real monotonic instant of
simulated second zero) and, optionally later, ``{"arm": "after_send"}`` (die at the next
refresh that reaches the server: a SIGKILL mid-refresh), runs every device's app until
``--until``, writes its results next to the journals and prints ``{"done": path}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import sys
from pathlib import Path
from typing import Any

import aiohttp

import tokenjournal as tj
from tokenjournal import _faults
from tokenjournal._protocols import HttpRequest
from tokenjournal._transport import Raw

from .clock import DeviceClock, Timeline

DEMO = {"email": "demo@example.com", "password": "demo"}
DAY = 86400.0


class Device(tj.TokenManager):
    """A manager that notes the simulated time of every request it sends to the server."""

    def __init__(self, *args: Any, timeline: Timeline, skew: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.name = str(kwargs["device_name"])
        self.skew = skew
        self.line = timeline
        self.sent: list[float] = []
        self.states: list[tuple[float, str]] = []
        self.subscribe(self._on_event)

    async def open(self) -> None:
        await super().open()
        # Time runs fast here but aiohttp's keep-alive runs on real time: without this, a
        # connection idle for a simulated quarter of an hour would still be pooled, which
        # it never is in life (15 s). A refresh opens its own connection, as it would.
        if self._http is not None:
            await self._http.close()
            self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))

    def _on_event(self, event: tj.TokenEvent) -> None:
        if event.kind is tj.EventKind.STATE:
            self.states.append((round(self.line.now(), 3), event.state.value))

    async def _send(self, request: HttpRequest) -> Raw:
        self.sent.append(round(self.line.now(), 3))
        return await super()._send(request)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.fleet.worker")
    p.add_argument("--url", required=True)
    p.add_argument("--dir", required=True, type=Path)
    p.add_argument("--first", type=int, required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--speed", type=float, required=True)
    p.add_argument("--until", type=float, required=True, help="simulated second to stop at")
    p.add_argument("--use-every", type=float, default=30.0, help="simulated seconds")
    p.add_argument("--skew-share", type=float, default=0.0, help="devices a day off")
    p.add_argument("--grace", type=float, default=300.0)
    p.add_argument("--max-delay", type=float, default=30.0, help="the retry policy's")
    p.add_argument("--offline-growth", type=float, default=3.0, help="the retry policy's")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--resume", action="store_true", help="open existing journals, no sign-in")
    p.add_argument("--stagger", type=float, default=0.0, help="spread the first refresh")
    return p.parse_args(argv)


def say(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def _open(device: Device, resume: bool) -> None:
    await device.open()
    for attempt in range(5):  # thousands signing in at once can overrun the server's backlog
        if resume or device.state is tj.SessionState.VALID:
            return
        try:
            await device.sign_in(**DEMO)
        except tj.TransientError:
            if attempt == 4:
                raise
            await asyncio.sleep(1.0 + attempt)


async def app(
    device: Device, clock: DeviceClock, every: float, until: float, stagger: float
) -> None:
    """What the device's own program does: use its token every ``every`` seconds. With
    ``stagger``, first a refresh at a random point of the first ``stagger`` seconds: devices
    that booted at random times, not together."""
    if stagger:
        await clock.sleep(random.uniform(0.0, stagger))
        with contextlib.suppress(tj.TokenJournalError):
            await device.refresh()
    await clock.sleep(random.uniform(0.0, every))
    while clock.monotonic() < until:
        with contextlib.suppress(tj.TokenJournalError):  # offline or ended: it carries on
            await device.access_token()
        await clock.sleep(every)


async def main(ns: argparse.Namespace) -> None:
    random.seed(ns.seed)
    line = Timeline(ns.speed)
    devices: list[Device] = []
    clocks: list[DeviceClock] = []
    for i in range(ns.first, ns.first + ns.count):
        skew = random.choice((-DAY, DAY)) if random.random() < ns.skew_share else 0.0
        clock = DeviceClock(line, skew)
        clocks.append(clock)
        devices.append(
            Device(
                ns.url,
                ns.dir / f"device-{i}.db",
                grace_period=ns.grace,
                retry=tj.RetryPolicy(max_delay=ns.max_delay, offline_growth=ns.offline_growth),
                clock=clock,
                timeline=line,
                skew=skew,
                device_name=f"device-{i}",
            )
        )
    for start in range(0, len(devices), 50):  # open in batches: a burst of 5,000 is slow
        await asyncio.gather(*(_open(d, ns.resume) for d in devices[start : start + 50]))
    say({"ready": len(devices)})
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    go = json.loads(await reader.readline())
    line.start = float(go["go"])

    async def commands() -> None:
        while line := await reader.readline():
            order = json.loads(line)
            if "arm" in order:
                _faults.arm(order["arm"])

    listening = asyncio.ensure_future(commands())
    stagger = 0.0 if ns.resume else ns.stagger
    await asyncio.gather(
        *(app(d, c, ns.use_every, ns.until, stagger) for d, c in zip(devices, clocks, strict=True))
    )
    listening.cancel()
    results = []
    for start in range(0, len(devices), 200):
        batch = devices[start : start + 200]
        await asyncio.gather(*(d.close() for d in batch))
    for d in devices:
        results.append(
            {
                "device": d.name,
                "sent": d.sent,
                "states": d.states,
                "state": d.state.value,
                "ended": d.ended_code,
                "skewed": d.skew != 0.0,
            }
        )
    out = ns.dir / f"result-{ns.first}{'-resumed' if ns.resume else ''}.json"
    out.write_text(json.dumps(results))
    say({"done": str(out)})


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    asyncio.run(main(parse()))
