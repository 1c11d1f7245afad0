"""The coordinator: one reference server behind the gate, worker processes of devices, a
scenario's timeline of gate changes and kills, and the results gathered for the report."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenjournal.server import ServerConfig

from .clock import Timeline
from .gate import Gate, GatedServer

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Event:
    """At simulated second ``at``: set the gate's mode (and capacity), or kill a slice."""

    at: float
    mode: str | None = None  # up | down | overload
    capacity: int | None = None
    kill_slice: bool = False


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    until: float  # simulated seconds
    events: tuple[Event, ...] = ()
    skew_share: float = 0.0
    kill_share: float = 0.0  # devices in the worker that is killed mid-refresh
    outage: tuple[float, float] | None = None  # the window the figures call "down"
    service: float = 0.0  # simulated seconds an admitted refresh holds its slot
    stagger: bool = True  # devices boot at random times (False: all sign in at once)


@dataclass
class Settings:
    devices: int
    workers: int
    speed: float
    ttl: float = 900.0
    grace: float = 300.0
    use_every: float = 30.0
    retry_after: int = 5
    max_delay: float = 30.0  # the devices' RetryPolicy.max_delay (offline pacing: 10x it)
    offline_growth: float = 3.0  # the devices' RetryPolicy.offline_growth
    journal_root: str = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    progress: Callable[[str], None] = field(default=lambda message: None)


class Worker:
    """A worker process and its JSON-lines channel."""

    def __init__(self, process: asyncio.subprocess.Process, first: int, count: int) -> None:
        self.process, self.first, self.count = process, first, count

    @classmethod
    async def start(cls, args: list[str], first: int, count: int) -> Worker:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "sdk"), str(ROOT)]))
        env.pop("TOKENJOURNAL_CRASH_AT", None)
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.fleet.worker",
            *args,
            "--first",
            str(first),
            "--count",
            str(count),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=ROOT,
            env=env,
            limit=1 << 20,
        )
        return cls(process, first, count)

    async def read(self) -> dict[str, Any] | None:
        assert self.process.stdout is not None
        line = await self.process.stdout.readline()
        return json.loads(line) if line else None

    def send(self, message: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps(message) + "\n").encode())


async def run_scenario(s: Settings, sc: Scenario) -> dict[str, Any]:
    """Run one scenario from sign-in to the last simulated second; returns its raw results."""
    line = Timeline(s.speed)
    gate = Gate(line)
    gate.retry_after = s.retry_after
    gate.service = sc.service
    config = ServerConfig(test_mode=True, access_ttl=s.ttl, grace=s.grace)
    folder = Path(tempfile.mkdtemp(prefix="tokenjournal-fleet-", dir=s.journal_root))
    try:
        async with GatedServer(config, gate) as server:
            common = [
                "--url", server.url, "--dir", str(folder), "--speed", str(s.speed),
                "--until", str(sc.until), "--use-every", str(s.use_every),
                "--skew-share", str(sc.skew_share), "--grace", str(s.grace),
                "--stagger", str(s.ttl * 0.8 if sc.stagger else 0.0),
                "--max-delay", str(s.max_delay), "--offline-growth", str(s.offline_growth),
            ]  # fmt: skip
            victims = round(s.devices * sc.kill_share)
            slices = _slices(s.devices - victims, s.workers)
            if victims:
                slices.append((s.devices - victims, victims))
            workers = [
                await Worker.start([*common, "--seed", str(i + 1)], first, count)
                for i, (first, count) in enumerate(slices)
            ]
            started = time.monotonic()
            for w in workers:
                ready = await w.read()
                if ready is None or "ready" not in ready:
                    raise RuntimeError(f"worker {w.first} did not start: {ready}")
            s.progress(
                f"{sc.name}: {s.devices:,} devices signed in ({time.monotonic() - started:.0f} s)"
            )
            line.start = time.monotonic() + 0.2
            for w in workers:
                w.send({"go": line.start})
            victim = workers[-1] if victims else None
            restarts = 0
            timeline = asyncio.ensure_future(_play(sc, server, victim, s))
            results: list[dict[str, Any]] = []
            following = {asyncio.ensure_future(_follow(w)) for w in workers}
            while following:
                done, following = await asyncio.wait(following, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    w, message = task.result()
                    if message is not None and "done" in message:
                        results += json.loads(Path(message["done"]).read_text())
                    elif w is victim and w.process.returncode == 137:
                        restarts += 1  # died mid-refresh, as armed: start it again
                        s.progress(f"{sc.name}: killed {w.count} devices mid-refresh; restarting")
                        again = await Worker.start(
                            [*common, "--seed", "99", "--resume"], w.first, w.count
                        )
                        await again.read()
                        again.send({"go": line.start})
                        following.add(asyncio.ensure_future(_follow(again)))
                        victim = None
                    else:
                        raise RuntimeError(f"worker {w.first} exited {w.process.returncode}")
            timeline.cancel()
            stats = server.stats()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {
        "scenario": sc.name,
        "title": sc.title,
        "devices": results,
        "buckets": [[sec, outcome, n] for (sec, outcome), n in sorted(gate.buckets.items())],
        "server": {
            k: stats.get(k, 0)
            for k in ("rotations", "grace_replays", "reuse_detections", "family_revocations")
        },
        "restarts": restarts,
        "until": sc.until,
        "outage": sc.outage,
        "ttl": s.ttl,
        "speed": s.speed,
    }


async def _follow(w: Worker) -> tuple[Worker, dict[str, Any] | None]:
    message = await w.read()
    await w.process.wait()
    return w, message


def _slices(count: int, workers: int) -> list[tuple[int, int]]:
    out, first = [], 0
    for i in range(workers):
        n = count // workers + (i < count % workers)
        if n:
            out.append((first, n))
        first += n
    return out


async def _play(sc: Scenario, server: GatedServer, victim: Worker | None, s: Settings) -> None:
    gate, line = server.gate, server.gate.line
    for event in sorted(sc.events, key=lambda e: e.at):
        await asyncio.sleep(line.real_delay(event.at))
        if event.mode is not None:
            if event.capacity is not None:
                gate.capacity = event.capacity
            await (server.down() if event.mode == "down" else server.up(event.mode))
            s.progress(f"{sc.name}: t={event.at:.0f}s server {event.mode}")
        if event.kill_slice and victim is not None:
            victim.send({"arm": "after_response"})


def kill_all(workers: list[Worker]) -> None:
    for w in workers:
        if w.process.returncode is None:
            w.process.send_signal(signal.SIGKILL)
